"""Kill and resume: ``normswap heal`` killed with SIGKILL during training resumes from its last checkpoint
with ``--resume`` and ends where an uninterrupted run of the same steps ends; a checkpoint cut short by a
kill while saving is never resumed from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_rms_norm import perturbed

from normswap.cli import main
from normswap.healing.resume import last_complete_checkpoint
from normswap.healing.texts import load_texts

FIGURES = ("output_cosine", "pooled_cosine", "spearman", "next_token_kl")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The models are tiny: on a busy 2-core machine two torch threads mostly wait for each other (a 40-step
    heal took 65 s with two threads, 2.6 s with one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _checkpoints(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A tiny Llama and its Post-Norm conversion, and heal arguments whose 64 training texts make 8 steps an
    epoch, so that 40 steps cross four epoch boundaries and a checkpoint every 6 steps falls mid-epoch."""
    perturbed("llama", "LlamaForCausalLM").save_pretrained(tmp_path / "original")
    assert main(["convert", str(tmp_path / "original"), str(tmp_path / "post"), "--placement", "post",
                 "--quiet"]) == 0
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(load_texts(None)[:96]) + "\n", encoding="utf-8")
    arguments = ["--data", str(data), "--max-steps", "40", "--eval-steps", "6", "--batch-size", "8",
                 "--max-length", "24", "--held-out", "32", "--quiet"]
    return tmp_path / "original", tmp_path / "post", arguments


def _after(destination: Path) -> dict[str, float]:
    heal = json.loads((destination / "normswap_report.json").read_text())["heal"]
    assert heal["steps"] == 40
    return {name: heal["after"][name] for name in FIGURES}


def test_a_heal_killed_during_training_resumes_to_the_same_figures(tmp_path: Path, one_thread: None,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    original, converted, arguments = _checkpoints(tmp_path)
    work = tmp_path / "work"
    command = ["heal", str(original), str(converted), str(tmp_path / "resumed"), *arguments, "--work-dir", str(work)]
    killed = subprocess.Popen([sys.executable, "-m", "normswap", *command], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    waited = time.monotonic() + 120
    while not list(work.glob("checkpoint-*/trainer_state.json")):  # written last: a whole checkpoint exists
        assert killed.poll() is None, killed.stderr.read().decode() if killed.stderr else ""
        assert time.monotonic() < waited, "no checkpoint within 120 s"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert not (tmp_path / "resumed").exists()  # killed before the end of training

    assert main([*command, "--resume"]) == 0
    assert main(["heal", str(original), str(converted), str(tmp_path / "whole"), *arguments,
                 "--work-dir", str(tmp_path / "whole-work")]) == 0
    capsys.readouterr()
    # Same machine, same threads: the resumed run restores the weights, AdamW's state, the scheduler and the
    # step exactly, and the data order and augmentation are functions of (seed, epoch, row), so the figures
    # agree to rounding (1e-6). Before augmentation was drawn per row, the RNG state restored from the
    # checkpoint was one batch off (the DataLoader reads a batch ahead) and they differed by up to 1e-3.
    resumed, whole = _after(tmp_path / "resumed"), _after(tmp_path / "whole")
    assert resumed == pytest.approx(whole, abs=1e-6, rel=0)


def _saved(work: Path, step: int) -> Path:
    """A checkpoint folder laid out as the Trainer writes one (the content only has to parse)."""
    import torch
    from safetensors.torch import save_file

    folder = work / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"weight": torch.zeros(64)}, str(folder / "model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({"step": step}, folder / name)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return folder


@pytest.mark.parametrize("cut", ["no trainer_state.json", "trainer_state.json cut", "weights cut",
                                 "optimizer cut", "rng state cut"])
def test_a_checkpoint_cut_short_is_skipped_for_the_one_before(tmp_path: Path, cut: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    _saved(tmp_path, 6)
    newest = _saved(tmp_path, 12)
    file = {"trainer_state.json cut": "trainer_state.json", "weights cut": "model.safetensors",
            "optimizer cut": "optimizer.pt", "rng state cut": "rng_state.pth"}.get(cut)
    if file is None:
        (newest / "trainer_state.json").unlink()
    else:
        data = (newest / file).read_bytes()
        (newest / file).write_bytes(data[:len(data) // 2])
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")
    assert "checkpoint-12" in caplog.text and "incomplete" in caplog.text


def test_only_checkpoints_cut_short_is_one_line_saying_what_to_remove(tmp_path: Path, one_thread: None,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    original, converted, arguments = _checkpoints(tmp_path)
    assert last_complete_checkpoint(tmp_path / "work") is None  # no folder: nothing to resume, a fresh start
    (_saved(tmp_path / "work", 6) / "trainer_state.json").unlink()
    capsys.readouterr()
    assert main(["heal", str(original), str(converted), str(tmp_path / "healed"), *arguments,
                 "--work-dir", str(tmp_path / "work"), "--resume"]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "checkpoint-6" in error and "remove" in error
    assert not (tmp_path / "healed").exists()


def test_training_rows_depend_on_seed_epoch_and_row_not_on_the_process_rng() -> None:
    """What makes a resumed run (and every process of a launch) see the rows one uninterrupted process sees."""
    import torch

    from normswap.healing.rows import AugmentedTexts, TokenisedTexts
    from normswap.healing.sampler import LengthBucketSampler

    texts = load_texts(None)[:40]
    rows = AugmentedTexts(TokenisedTexts(texts, None, 24, 256), None, keep=0.0, substitute=0.3, seed=0)
    drawn = []
    for rng_seed in (1, 2):
        torch.manual_seed(rng_seed)  # the process's RNG, as a checkpoint would restore it (or not)
        drawn.append([rows[i]["input_ids"].tolist() for i in range(len(texts))])
    assert drawn[0] == drawn[1]
    rows.set_epoch(1)
    assert [rows[i]["input_ids"].tolist() for i in range(len(texts))] != drawn[0]

    told: list[int] = []
    sampler = LengthBucketSampler(rows.lengths, 8, seed=0, on_epoch=told.append)
    orders = []
    for _ in range(2):
        sampler.set_epoch(3)
        orders.append(list(sampler))
    assert orders[0] == orders[1] and told == [3, 3] and sorted(orders[0]) == list(range(len(texts)))
    sampler.set_epoch(4)
    assert list(sampler) != orders[0]
