"""Branch 0 of SAM's vision layers reads a window partition that pads the grid with zeros after its norm.

Pre -> Post keeps that input bit for bit, yet the padded zero vectors, counted as cosine 0, measured it
at 0.84 and refused the conversion; a zero vector only one model reads must still count against it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from test_streaming_relayouts import perturbed

import normswap
from normswap.conversion.checkpoint import convert_checkpoint
from normswap.conversion.verify import _cosine

# a grid of 96 / 16 = 6 patches a side in windows of 4: layer 0 pads it to 8 (28 of its 64 vectors are zero)
_SAM_VISION = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "mlp_dim": 128,
               "image_size": 96, "patch_size": 16, "window_size": 4, "global_attn_indexes": [1],
               "output_channels": 32}


def _perturbed_sam(config_class: str, model_class: str) -> torch.nn.Module:
    """A tiny SAM vision model with every parameter moved (norm weights off 1, biases off 0)."""
    return perturbed(getattr(transformers, model_class)(getattr(transformers, config_class)(**_SAM_VISION)))


@pytest.mark.parametrize(("config_class", "model_class"), [("SamVisionConfig", "SamVisionModel"),
                                                           ("SamHQVisionConfig", "SamHQVisionModel")])
def test_window_padding_keeps_branch_zero_exact(config_class: str, model_class: str, tmp_path: Path) -> None:
    _perturbed_sam(config_class, model_class).save_pretrained(tmp_path / "source")
    result = convert_checkpoint(tmp_path / "source", tmp_path / "out", "post")
    assert result.report is not None
    first = result.report.sublayers[0]
    assert (first.index, first.kind, first.max_abs_diff, first.cosine) == (0, "attention", 0.0, 1.0)
    loaded = transformers.AutoModel.from_pretrained(result.destination, trust_remote_code=True).eval()
    assert normswap.inspect(loaded).placement == "post"
    with torch.no_grad():
        hidden = loaded(pixel_values=torch.randn(1, 3, 96, 96)).last_hidden_state
    assert torch.isfinite(hidden).all()


def test_a_zero_vector_one_model_reads_still_counts() -> None:
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 1.0]])
    assert _cosine(a, a.clone()) == pytest.approx(1.0)
    b = a.clone()
    b[0] = 0.0  # the converted model lost a real vector: cosine 0 there
    assert _cosine(a, b) == pytest.approx(0.5)
    assert _cosine(torch.zeros(3, 2), torch.zeros(3, 2)) == 1.0
