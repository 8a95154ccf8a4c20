"""SIGTERM in the middle of a streamed conversion: no DST, no temporary folder, SRC unchanged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from checksums import checksum

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from synthetic_checkpoint import write_llama_checkpoint


@pytest.mark.parametrize(("options", "writing"), [
    ([], ".out.normswap-mirror-*"),  # killed while the source shards are copied, during planning
    (["--max-shard-size", "32MB"], ".out.normswap-tmp-*"),  # smaller shards than the source's: planned layout
], ids=["while-copying-during-planning", "while-writing-planned-shards"])
def test_sigterm_midway_leaves_nothing(options: list[str], writing: str, tmp_path: Path) -> None:
    source = tmp_path / "src"
    write_llama_checkpoint(source, hidden=512, intermediate=1408, layers=8, vocab=32000, dtype=torch.float32,
                           shard_size="64MB")  # ~230 MB in 4 shards: long enough to be caught midway
    before = checksum(source)
    destination = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "normswap", "convert", str(source),
                                str(destination), "--placement", "post", "--quiet", "--verify-max-size", "0",
                                *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    caught = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        found = [p for p in tmp_path.glob(writing) if any(p.glob("*.safetensors"))]
        if found:
            caught = found[0]
            break
        time.sleep(0.002)
    assert caught is not None, f"the conversion never started writing: {process.communicate()}"
    os.kill(process.pid, signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGABRT)  # faulthandler prints every thread's stack: where it hangs
        pytest.fail(f"no exit within 60 s of SIGTERM:\n{process.communicate(timeout=60)[1]}")
    assert process.returncode == 143, err
    assert "Stopped by SIGTERM: nothing was written" in err
    assert not destination.exists()
    assert not caught.exists() and not list(tmp_path.glob(".out.normswap-*"))
    assert checksum(source) == before
