"""The command line ends its process without interpreter teardown: exit codes, output and atexit survive it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers import GPT2Config, GPT2LMHeadModel


def _python(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)


def test_output_is_flushed_and_atexit_handlers_run(tmp_path: Path) -> None:
    result = _python("""
        import atexit, sys
        from normswap.process_exit import exit_without_teardown
        atexit.register(lambda: print("atexit ran"))  # stdout is block-buffered into a pipe: flushed after
        sys.stdout.write("x" * 100000)  # more than one buffer of a pipe
        exit_without_teardown(3)
    """, tmp_path)
    assert result.returncode == 3
    assert result.stdout == "x" * 100000 + "atexit ran\n"


def test_waits_for_a_running_non_daemon_thread(tmp_path: Path) -> None:
    result = _python("""
        import threading, time
        from normswap.process_exit import exit_without_teardown
        def late():
            time.sleep(0.5)
            print("thread finished", flush=True)
        threading.Thread(target=late).start()
        exit_without_teardown(0)
    """, tmp_path)
    assert result.returncode == 0
    assert "thread finished" in result.stdout


@pytest.fixture
def gpt2_checkpoint(tmp_path: Path) -> Path:
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


def _normswap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "normswap", *args], capture_output=True, text=True, timeout=300)


def test_command_line_exit_codes_and_report(gpt2_checkpoint: Path, tmp_path: Path) -> None:
    converted = _normswap("convert", str(gpt2_checkpoint), str(tmp_path / "rms"), "--norm", "rmsnorm", "--quiet",
                          "--json")
    assert converted.returncode == 0, converted.stderr
    assert json.loads(converted.stdout)["report"]["exact"] is True
    assert (tmp_path / "rms" / "config.json").is_file()

    again = _normswap("convert", str(gpt2_checkpoint), str(tmp_path / "rms"), "--norm", "rmsnorm", "--quiet")
    assert again.returncode == 1
    assert again.stderr.startswith("Error: ") and "--overwrite" in again.stderr

    usage = _normswap("convert", str(gpt2_checkpoint))
    assert usage.returncode == 2
    assert "usage:" in usage.stderr
