"""SIGTERM in the middle of a streamed conversion: no DST, no temporary folder, SRC unchanged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from checksums import checksum

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from synthetic_checkpoint import write_llama_checkpoint


def test_sigterm_midway_leaves_nothing(tmp_path: Path) -> None:
    source = tmp_path / "src"
    write_llama_checkpoint(source, hidden=512, intermediate=1408, layers=8, vocab=32000, dtype=torch.float32,
                           shard_size="64MB")  # ~230 MB in 4 shards: long enough to be caught midway
    before = checksum(source)
    destination = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "normswap", "convert", str(source), str(destination),
                                "--placement", "post", "--quiet", "--verify-max-size", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    temporary = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        found = [p for p in tmp_path.glob(".out.normswap-tmp-*") if any(p.glob("*.safetensors"))]
        if found:
            temporary = found[0]
            break
        time.sleep(0.002)
    assert temporary is not None, f"the conversion never started writing: {process.communicate()}"
    os.kill(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert "Stopped by SIGTERM: nothing was written" in err
    assert not destination.exists()
    assert not temporary.exists() and not list(tmp_path.glob(".out.normswap-*"))
    assert checksum(source) == before
