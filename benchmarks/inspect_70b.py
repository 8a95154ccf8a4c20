"""Inspect a Llama-70B-shaped config.json (no weights) and report wall time and peak RSS.

Targets (issue 2): under 10 s and under 1 GiB. Run: ``python benchmarks/inspect_70b.py``.
The time is measured in a fresh subprocess, so it includes importing torch and transformers,
as a user running ``normswap inspect`` would pay; the import-only time is printed beside it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

LLAMA_70B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
}

_CHILD = """
import json, resource, sys, time
start = time.perf_counter()
{body}
elapsed = time.perf_counter() - start
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": elapsed, "peak_rss_mib": peak_kib / 1024}}))
"""


def _measure(body: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _CHILD.format(body=body)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        config_path = Path(folder) / "config.json"
        config_path.write_text(json.dumps(LLAMA_70B))
        imports = _measure("import torch, transformers, normswap\nfrom transformers import LlamaModel")
        run = _measure(
            "import normswap\n"
            f"topology = normswap.inspect({str(config_path)!r})\n"
            "assert len(topology.layers) == 80 and topology.placement == 'pre', topology.summary()\n"
            "print(topology.summary(), file=sys.stderr)"
        )
    print("config: Llama-70B shape (hidden 8192, 80 layers, intermediate 28672, 64 heads, 8 kv heads)")
    print(f"inspect, incl. imports: {run['seconds']:.2f} s   peak RSS {run['peak_rss_mib']:.0f} MiB")
    print(f"imports alone:          {imports['seconds']:.2f} s   peak RSS {imports['peak_rss_mib']:.0f} MiB")
    print(f"inspect work beyond imports: {run['seconds'] - imports['seconds']:.2f} s, "
          f"{run['peak_rss_mib'] - imports['peak_rss_mib']:.0f} MiB")
    ok = run["seconds"] < 10 and run["peak_rss_mib"] < 1024
    print(f"targets (< 10 s, < 1024 MiB): {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
