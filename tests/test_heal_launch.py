"""``normswap heal`` on two processes (``torchrun``: DDP over gloo on the CPU): DST is written once, by rank 0,
the report is printed once, the figures are one process's within noise, and a failure on rank 1 before any
collective ends both processes with one line and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_rms_norm import perturbed

from normswap.cli import main

FIGURES = ("output_cosine", "pooled_cosine", "spearman", "next_token_kl")
QUICK = ["--max-steps", "12", "--eval-steps", "6", "--batch-size", "8", "--max-length", "24", "--held-out", "24",
         "--quiet"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A tiny Llama and its Post-Norm conversion, made once for the module (one torch thread meanwhile: the
    models are tiny, and the cores shared)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("models")
    perturbed("llama", "LlamaForCausalLM").save_pretrained(folder / "original")
    assert main(["convert", str(folder / "original"), str(folder / "post"), "--placement", "post", "--quiet"]) == 0
    yield folder / "original", folder / "post"
    torch.set_num_threads(threads)


def _torchrun(program: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Two processes on this machine; ``--standalone`` finds a free port (tests may run side by side)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *program], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _ours(stderr: str) -> list[str]:
    """The lines normswap printed (torchrun adds its own report of the failed process after them)."""
    return [line for line in stderr.splitlines() if line.startswith(("Error:", "Stopped by"))]


def test_two_processes_write_dst_once_with_one_process_figures(models: tuple[Path, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    original, converted = models
    runner = Path(__file__).with_name("launch_runner.py")
    # no --data: a causal LM heals on its own samples, which rank 0 alone draws (and caches); rank 1 takes them
    done = _torchrun([str(runner), "heal", str(original), str(converted), str(tmp_path / "two"), *QUICK, "--json"],
                     env={"FAULT_RANK": "1", "FAULT_AT": "sampling"})
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)  # the report, once: two would not parse as one JSON document
    assert printed["steps"] == 12 and _ours(done.stderr) == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["two"]  # nothing else beside DST

    assert main(["heal", str(original), str(converted), str(tmp_path / "one"), *QUICK]) == 0
    capsys.readouterr()
    one, two = ({name: json.loads((tmp_path / folder / "normswap_report.json").read_text())["heal"]["after"][name]
                 for name in FIGURES} for folder in ("one", "two"))
    assert two == {name: printed["after"][name] for name in FIGURES}
    # Both runs train on the same texts each step (a step's 8 texts shared 4 and 4, augmented alike); they differ
    # in how the loss is averaged (two halves' relative errors against one batch's) and in rounding. Measured
    # (20 steps): 3e-5 in cosine and KL, where seeds 0, 1 and 2 of one process spread 0.010 and 0.006.
    assert two == pytest.approx(one, abs=2e-3, rel=0)


def test_a_failure_on_rank_1_before_any_collective_ends_both_with_one_line(models: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    original, converted = models
    runner = Path(__file__).with_name("launch_runner.py")
    done = _torchrun([str(runner), "heal", str(original), str(converted), str(tmp_path / "healed"), *QUICK],
                     env={"FAULT_RANK": "1", "FAULT_AT": "loading"})
    assert done.returncode != 0
    assert _ours(done.stderr) == ["Error: planted fault on rank 1 while loading"], done.stderr[-3000:]
    assert not list(tmp_path.iterdir())  # no DST, and nothing left beside it


def test_lora_adapters_train_on_two_processes_and_merge_once(models: tuple[Path, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """``--lora-rank`` under DDP: each process trains its copy of the adapters, DDP averages their gradients, and
    rank 0 merges them into the one DST; the figures are one process's within noise."""
    pytest.importorskip("peft")
    from safetensors import safe_open

    original, converted = models
    runner = Path(__file__).with_name("launch_runner.py")
    lora = [*QUICK, "--lora-rank", "4"]
    done = _torchrun([str(runner), "heal", str(original), str(converted), str(tmp_path / "two"), *lora, "--json"])
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)
    assert printed["steps"] == 12 and printed["lora"]["rank"] == 4
    assert sorted(path.name for path in tmp_path.iterdir()) == ["two"]
    with safe_open(tmp_path / "two" / "model.safetensors", "pt") as weights:
        assert not [key for key in weights.keys() if "lora" in key]  # noqa: SIM118 (a safetensors handle) merged

    assert main(["heal", str(original), str(converted), str(tmp_path / "one"), *lora]) == 0
    capsys.readouterr()
    one, two = ({name: json.loads((tmp_path / folder / "normswap_report.json").read_text())["heal"]["after"][name]
                 for name in FIGURES} for folder in ("one", "two"))
    assert two["output_cosine"] > json.loads((tmp_path / "two" / "normswap_report.json").read_text()
                                              )["heal"]["before"]["output_cosine"]  # the adapters trained
    # At LoRA's rate (3e-3, ten times full healing's) the two ways of averaging the loss drift further apart than
    # in full healing: measured 0.002 output cosine and 0.005 pooled cosine. Seeds 0, 1 and 2 of one process spread
    # 0.0074, 0.037, 0.13 and 0.0077 (output cosine, pooled cosine, Spearman, KL): each figure must agree within
    # about half its seed spread
    for name, within in {"output_cosine": 4e-3, "pooled_cosine": 1.5e-2, "spearman": 5e-2,
                         "next_token_kl": 4e-3}.items():
        assert two[name] == pytest.approx(one[name], abs=within, rel=0), name
