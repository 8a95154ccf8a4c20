"""Inspect a Llama-70B-shaped config.json (no weights) and report wall time and peak RSS.

Targets (issue 2): under 10 s and under 1 GiB for ``normswap inspect`` as a user runs it,
i.e. in a fresh process, imports of torch and transformers included. Each repetition is a
fresh subprocess; import time and inspect time are measured inside it, side by side.
Run: ``python benchmarks/inspect_70b.py [--repeat N]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
import normswap
from transformers import LlamaModel  # the modeling code inspect imports, counted as import time
imported = time.perf_counter()
topology = normswap.inspect(sys.argv[1])
done = time.perf_counter()
assert len(topology.layers) == 80 and topology.placement == "pre", topology.summary()
print(json.dumps({"imports": imported - start, "inspect": done - imported, "total": done - start,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "summary": topology.summary()}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        config_path = Path(folder) / "config.json"
        config_path.write_text(json.dumps(LLAMA_70B))
        runs = []
        for _ in range(args.repeat):
            out = subprocess.run([sys.executable, "-c", _CHILD, str(config_path)], check=True,
                                 capture_output=True, text=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    median = {key: statistics.median(run[key] for run in runs) for key in ("imports", "inspect", "total",
                                                                           "peak_rss_mib")}
    print("config: Llama-70B shape (hidden 8192, 80 layers, intermediate 28672, 64 heads, 8 kv heads)")
    print(f"detected: {runs[0]['summary']}")
    print(f"median of {len(runs)} fresh processes:")
    print(f"  imports (torch, transformers, normswap, modeling_llama): {median['imports']:.2f} s")
    print(f"  normswap.inspect(config.json):                          {median['inspect']:.2f} s")
    print(f"  total wall time:                                         {median['total']:.2f} s "
          f"(worst {max(run['total'] for run in runs):.2f} s)")
    print(f"  peak RSS:                                                {median['peak_rss_mib']:.0f} MiB")
    ok = max(run["total"] for run in runs) < 10 and max(run["peak_rss_mib"] for run in runs) < 1024
    print(f"targets (< 10 s, < 1024 MiB, worst run): {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
