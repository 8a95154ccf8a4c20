"""Forward time of an exactly converted LayerNorm -> RMSNorm model against its original, side by side.

On CPU, torch's ``F.rms_norm`` is not fused (a few elementwise kernels) while ``F.layer_norm`` is, so the
converted model is expected to be slower there; this script measures by how much, and where the time goes
(the norm kernels alone, timed on the same shapes). Run: ``python benchmarks/forward_rms_norm.py``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F  # noqa: N812
from timing import median_ratio

import normswap


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=512, n_layer=6, n_head=8, vocab_size=8000)).eval()
    converted = normswap.convert(model, norm="rmsnorm").eval()
    ids = torch.randint(0, 8000, (4, 256))

    def forward(m: torch.nn.Module) -> object:
        def run() -> None:
            with torch.no_grad():
                m(input_ids=ids)
        return run

    base, cand, ratio = median_ratio(forward(model), forward(converted), args.repeats)
    print(f"GPT-2 512x6, batch 4x256, forward: LayerNorm {base * 1e3:.1f} ms, RMSNorm {cand * 1e3:.1f} ms, "
          f"ratio {ratio:.3f}")

    x = torch.randn(4, 256, 512)
    weight, bias = torch.randn(512), torch.randn(512)
    norm_base, norm_cand, norm_ratio = median_ratio(
        lambda: F.layer_norm(x, (512,), weight, bias, 1e-5),
        lambda: F.rms_norm(x, (512,), weight, 1e-5) + bias, args.repeats * 10)
    per_forward = 13 * (norm_cand - norm_base)  # 12 residual norms + the final norm
    print(f"one norm on 4x256x512: layer_norm {norm_base * 1e6:.0f} us, rms_norm + bias {norm_cand * 1e6:.0f} us, "
          f"ratio {norm_ratio:.2f}; 13 norms account for {per_forward * 1e3:+.2f} ms of the "
          f"{(cand - base) * 1e3:+.2f} ms forward difference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
