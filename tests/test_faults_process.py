"""The fault and attack suite, part two: cases that need a process of their own.

Permissions are tested without root's override (CI runs as root, which reads mode-000 files): the runner
starts under ``setpriv`` with CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped. Kills, signals, the
file-size limit, a terminal at the prompt and a closed pipe act on real processes.
"""

from __future__ import annotations

import json
import os
import pty
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checksums import checksum
from fault_kit import leftovers, write_tiny_gpt2

from normswap.cli import main

HERE = Path(__file__).parent
SETPRIV = shutil.which("setpriv")
NO_OVERRIDE = [SETPRIV or "setpriv", "--bounding-set=-dac_override,-dac_read_search",
               "--inh-caps=-dac_override,-dac_read_search"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = write_tiny_gpt2(tmp_path_factory.mktemp("pristine") / "gpt2")
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 8}))
    return folder


@pytest.fixture
def src(pristine: Path, tmp_path: Path) -> Path:
    shutil.copytree(pristine, tmp_path / "src")
    return tmp_path / "src"


def normswap_process(*argv: str, **options: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env.update(options.pop("env", {}))  # type: ignore[arg-type]
    return subprocess.Popen([sys.executable, "-m", "normswap", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **options)  # type: ignore[call-overload]


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def _can_drop_the_override(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.write_text("x")
    probe.chmod(0)
    try:
        return SETPRIV is not None and subprocess.run([*NO_OVERRIDE, "cat", str(probe)], capture_output=True,
                                                      check=False).returncode != 0
    finally:
        probe.chmod(0o600)


def test_unreadable_files_and_folders_are_one_line_naming_them(pristine: Path, tmp_path: Path) -> None:
    if not _can_drop_the_override(tmp_path):
        pytest.skip("setpriv cannot drop root's file-permission override here")
    cases = {  # what is made unreadable -> the commands run against it
        "model.safetensors": ["convert"],
        "config.json": ["convert", "inspect"],
        ".": ["convert", "inspect"],
        "generation_config.json": ["convert"],
        "tokenizer.json": ["convert"],
    }
    sources, runs = {}, []
    for index, (target, commands) in enumerate(cases.items()):
        source = tmp_path / f"src{index}"
        shutil.copytree(pristine, source)
        (source / "generation_config.json").write_text(json.dumps({"do_sample": False}))
        sources[target] = source
        for command in commands:
            out = tmp_path / f"out{index}-{command}"
            runs.append((target, command, out, ["inspect", str(source)] if command == "inspect" else
                         ["convert", str(source), str(out), "--placement", "post", "--quiet"]))
    before = {target: checksum(source) for target, source in sources.items()}
    modes = {target: (source / target).stat().st_mode for target, source in sources.items()}
    for target, source in sources.items():
        (source / target).chmod(0)
    try:
        done = subprocess.run([*NO_OVERRIDE, sys.executable, str(HERE / "fault_runner.py"),
                               json.dumps([argv for *_, argv in runs])], capture_output=True, text=True,
                              check=False, timeout=600)
    finally:
        for target, source in sources.items():
            (source / target).chmod(modes[target])
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for (target, command, out, _), result in zip(runs, results, strict=True):
        shown = f"{target} / {command}: {result['stderr']}"
        assert result["code"] == 1, shown
        line = one_error_line(result["stderr"])
        named = sources[target] if target == "." else sources[target] / target
        assert str(named) in line and "ermission denied" in line, shown
        assert not out.exists() and leftovers(tmp_path) == [], shown
    for target, source in sources.items():
        assert checksum(source) == before[target]


def test_a_killed_conversion_leaves_what_the_next_one_sweeps(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "src"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=512, n_layer=8, n_head=8, vocab_size=8192)).save_pretrained(src)
    out = tmp_path / "out"
    killed: list[int] = []
    for kind in ("tmp", "mirror"):  # the second run sweeps the first's, and is killed in its turn
        process = normswap_process("convert", str(src), str(out), "--norm", "rmsnorm", "--quiet")
        deadline = time.monotonic() + 120
        while (not any(f".normswap-{kind}-{process.pid}" in name for name in leftovers(tmp_path))
               and time.monotonic() < deadline):
            assert process.poll() is None, process.communicate()
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate()
        assert any(f".normswap-{kind}-{process.pid}" in name for name in leftovers(tmp_path))
        for earlier in killed:
            assert f"left by normswap process {earlier}, which is no longer running" in stderr, stderr
            assert not any(f"-{earlier}" in name for name in leftovers(tmp_path))
        killed.append(process.pid)
    assert main(["convert", str(src), str(out), "--norm", "rmsnorm", "--quiet", "--verify-max-size", "0"]) == 0
    err = capsys.readouterr().err
    assert f"left by normswap process {killed[-1]}, which is no longer running" in err
    assert leftovers(tmp_path) == []
    assert (out / "config.json").is_file()


@pytest.mark.parametrize("command", ["module", "script"])
def test_ctrl_c_in_the_first_seconds_is_one_line(src: Path, tmp_path: Path, command: str) -> None:
    """A SIGINT at many points of start-up (imports of torch and transformers included): never a traceback."""
    script = shutil.which("normswap", path=str(Path(sys.executable).parent))
    if command == "script" and script is None:
        pytest.skip("the normswap console script is not installed beside this Python")
    delays = [0.15, 0.3, 0.45, 0.6, 0.8, 1.0, 1.3, 1.7, 2.2, 2.8] if command == "module" else [0.3, 0.9, 1.6]
    for delay in delays:
        out = tmp_path / "out"
        argv = ["convert", str(src), str(out), "--placement", "post", "--quiet"]
        if command == "module":
            process = normswap_process(*argv)
        else:
            process = subprocess.Popen([script, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
        if process.returncode == 0:
            shutil.rmtree(out)  # finished first: nothing to interrupt
            continue
        assert "Traceback" not in stderr, f"after {delay} s:\n{stderr}"
        assert process.returncode == 130, f"after {delay} s: {process.returncode}\n{stderr}"
        assert stderr.strip().splitlines()[-1].startswith("Stopped by interrupt"), stderr
        assert not out.exists() and leftovers(tmp_path) == []


def test_the_file_size_limit_is_one_line(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = checksum(src)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    process = normswap_process("convert", str(src), str(out), "--norm", "rmsnorm", "--quiet", preexec_fn=limit)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr
    line = one_error_line(stderr)
    assert "file too large" in line.lower() and "ulimit -f" in line and str(tmp_path) in line
    assert not out.exists() and leftovers(tmp_path) == [] and checksum(src) == before


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 64, "n_head": 4,
                                  "vocab_size": 128}))
    process = normswap_process("inspect", str(config), "--json")
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "{"
    process.stdout.close()  # as `| head -1` does
    stderr = process.stderr.read() if process.stderr else ""
    process.wait(timeout=120)
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
    assert process.returncode == 141


def test_a_custom_tokenizer_never_prompts_and_never_runs(src: Path, tmp_path: Path) -> None:
    """On a terminal, transformers asks "Do you wish to run the custom code? [y/N]" unless trust_remote_code is
    passed; normswap always passes it, so without --trust-remote-code the tokenizer's code never runs."""
    marker = tmp_path / "EXECUTED"
    (src / "tokenization_evil.py").write_text(
        "import os, pathlib\n"
        "pathlib.Path(os.environ['NORMSWAP_TEST_MARKER']).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]},
                  tokenizer_class="EvilTokenizer")
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    env = {**os.environ, "NORMSWAP_TEST_MARKER": str(marker), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1"}

    def on_a_terminal(*flags: str) -> tuple[int, str]:
        pid, terminal = pty.fork()
        if pid == 0:  # the child: stdin, stdout and stderr are the terminal
            os.execve(sys.executable, [sys.executable, "-m", "normswap", "convert", str(src),
                                       str(tmp_path / "out"), "--placement", "post", "--quiet", "--overwrite",
                                       *flags], env)
        seen, answered = b"", False
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            ready, _, _ = select.select([terminal], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(terminal, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                seen += chunk
                if b"[y/N]" in seen and not answered:
                    os.write(terminal, b"y\n")  # what a user at the prompt may well answer
                    answered = True
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), seen.decode(errors="replace")

    code, seen = on_a_terminal()
    assert "Do you wish to run the custom code" not in seen, seen
    assert code == 0, seen
    assert not marker.exists()
    code, seen = on_a_terminal("--trust-remote-code")  # the same file runs when the user asks: the case is real
    assert code == 0, seen
    assert marker.read_text() == "ran"
