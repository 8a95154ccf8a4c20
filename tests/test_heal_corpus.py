"""Healing data without --data: the shipped corpus (fixed, offline, no harvesting, nothing shared with the
benchmarks' out-of-source text) and, for causal LMs, texts sampled from the teacher and cached."""

from __future__ import annotations

import inspect
import json
import socket
from pathlib import Path

import pytest
from test_rms_norm import perturbed

import normswap
from normswap import corpus
from normswap.cli import main
from normswap.errors import NormswapError
from normswap.healing import api as heal_api
from normswap.healing import teacher_texts
from normswap.healing.texts import load_texts, split_texts

ROOT = Path(__file__).resolve().parent.parent
QUICK = {"max_length": 16, "batch_size": 8, "held_out": 32, "eval_steps": 10, "quiet": True}


def test_shipped_corpus_loads_offline_without_harvesting(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the shipped corpus must not be harvested or fetched")

    monkeypatch.setattr(inspect, "getdoc", refuse)  # how the docstrings are harvested from this machine
    monkeypatch.setattr(socket, "socket", refuse)
    texts = load_texts(None)
    assert texts == corpus.healing_corpus() and len(set(texts)) > 2000
    registers = {line.split("\t", 1)[0] for line in
                 (ROOT / "normswap" / "data" / corpus.HEALING_CORPUS).read_text(encoding="utf-8").splitlines()}
    assert {"fiction", "dialogue", "legal", "technical", "news", "list"} <= registers
    assert corpus.healing_corpus(("news",)) and set(corpus.healing_corpus(("news",))) < set(texts)
    assert '"data/*.txt"' in (ROOT / "pyproject.toml").read_text()  # in the wheel, beside the code


def test_out_of_source_text_shares_nothing_with_the_shipped_corpus() -> None:
    prose = [line for line in (ROOT / "benchmarks" / "data" / "general_prose.txt").read_text().splitlines() if line]
    shipped = corpus.healing_corpus()
    assert len(prose) >= 256
    assert not set(prose) & set(shipped)
    joined = "\n".join(shipped)
    assert not [sentence for sentence in prose if sentence in joined]  # not inside a longer text either


def test_held_out_split_of_the_shipped_corpus_is_deterministic() -> None:
    first, again = split_texts(load_texts(None)), split_texts(load_texts(None))
    assert first == again and len(first.held_out) == 256
    assert set(split_texts(sorted(load_texts(None))).held_out) == set(first.held_out)


def test_teacher_texts_are_sampled_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = perturbed("llama", "LlamaForCausalLM")
    texts = teacher_texts.healing_texts("teacher", teacher, None, 16, tmp_path)
    assert len(set(texts)) > 500 and (tmp_path / teacher_texts.CACHE_FILE).is_file()
    assert teacher_texts.healing_texts(None, teacher, None, 16) == texts  # the default for a causal LM, seeded

    def regenerate(*args: object, **kwargs: object) -> None:
        raise AssertionError("cached texts were sampled again")

    monkeypatch.setattr(teacher_texts, "sample_texts", regenerate)
    assert teacher_texts.healing_texts("teacher", teacher, None, 16, tmp_path) == texts
    other = perturbed("gpt2", "GPT2LMHeadModel")  # another teacher does not reuse them
    with pytest.raises(AssertionError, match="sampled again"):
        teacher_texts.healing_texts("teacher", other, None, 16, tmp_path)


def test_heal_without_data_trains_a_causal_lm_on_its_teachers_texts(tmp_path: Path) -> None:
    teacher = perturbed("llama", "LlamaForCausalLM")
    student = normswap.convert(perturbed("llama", "LlamaForCausalLM"), placement="post")
    _, report = heal_api.heal(teacher, student, max_steps=2, work_dir=tmp_path, **QUICK)
    cached = json.loads((tmp_path / teacher_texts.CACHE_FILE).read_text())
    assert report.train_texts + report.held_out_texts == len(set(cached["texts"]))
    bert = perturbed("bert", "BertModel")  # no LM head: the shipped corpus
    assert teacher_texts.healing_texts(None, bert, None, 16, tmp_path / "bert") == corpus.healing_corpus()


def test_data_teacher_is_refused_in_one_line_for_an_encoder(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    with pytest.raises(NormswapError, match="no causal language-model head"):
        teacher_texts.healing_texts("teacher", perturbed("bert", "BertModel"), None, 16)
    perturbed("bert", "BertModel").save_pretrained(tmp_path / "original")
    assert main(["convert", str(tmp_path / "original"), str(tmp_path / "pre"), "--placement", "pre",
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["heal", str(tmp_path / "original"), str(tmp_path / "pre"), str(tmp_path / "healed"),
                 "--data", "teacher", "--max-steps", "1", "--quiet"]) == 1
    error = capsys.readouterr().err.strip()
    assert "--data teacher" in error and "\n" not in error and "Traceback" not in error
    assert not (tmp_path / "healed").exists()
