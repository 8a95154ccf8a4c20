"""Healing data without --data: the shipped corpus (fixed, offline, no harvesting, nothing shared with the
benchmarks' out-of-source text) and, for causal LMs, texts sampled from the teacher and cached; with --data teacher,
a masked LM's texts filled in by its MLM head."""

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
    with pytest.raises(NormswapError, match="no language-model head to generate with"):
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


@pytest.fixture(scope="module")
def masked_lm(minilm_path: Path) -> tuple[object, object]:
    """A tiny BERT with an MLM head over MiniLM's vocabulary, its norms perturbed, and MiniLM's tokenizer."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path, trust_remote_code=False)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertForMaskedLM(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model, tokenizer


def test_a_masked_lm_fills_its_own_texts_once_and_caches_them(masked_lm: tuple[object, object], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = masked_lm
    texts = teacher_texts.healing_texts("teacher", model, tokenizer, 16, tmp_path)
    assert len(set(texts)) > 900 and (tmp_path / teacher_texts.CACHE_FILE).is_file()
    assert not [text for text in texts if "[MASK]" in text or "[CLS]" in text or "[PAD]" in text]
    assert teacher_texts.healing_texts(None, model, tokenizer, 16) == corpus.healing_corpus()  # the default

    def refill(*args: object, **kwargs: object) -> None:
        raise AssertionError("cached texts were filled again")

    monkeypatch.setattr(teacher_texts, "fill_texts", refill)
    assert teacher_texts.healing_texts("teacher", model, tokenizer, 16, tmp_path) == texts


def test_masked_filling_draws_from_the_teachers_predictions(masked_lm: tuple[object, object]) -> None:
    """A head biased toward one word fills every mask with it: the texts are the teacher's, not the corpus's;
    a seed gives the same texts again, another seed others."""
    import copy

    import torch

    from normswap.healing.masked_filling import MaskedSampling, fill_texts

    model, tokenizer = masked_lm
    sampling = MaskedSampling(count=12, max_length=12, batch_size=4)
    first = fill_texts(model, tokenizer, sampling)
    assert first == fill_texts(model, tokenizer, sampling) != fill_texts(model, tokenizer, MaskedSampling(
        count=12, max_length=12, batch_size=4, seed=1))
    biased = copy.deepcopy(model)
    word = tokenizer.convert_tokens_to_ids("river")
    with torch.no_grad():
        biased.get_output_embeddings().bias[word] += 50.0
    filled = fill_texts(biased, tokenizer, sampling)
    assert len(filled) == 12 and all(set(text.split()) == {"river"} for text in filled)


def test_masked_filling_needs_a_tokenizer_with_a_mask(masked_lm: tuple[object, object]) -> None:
    model, _ = masked_lm
    with pytest.raises(NormswapError, match="no tokenizer was given; pass --data FILE"):
        teacher_texts.healing_texts("teacher", model, None, 16)


def test_heal_trains_a_masked_lm_on_its_filled_texts(masked_lm: tuple[object, object], tmp_path: Path) -> None:
    model, tokenizer = masked_lm
    student = normswap.convert(model, placement="pre")
    _, report = heal_api.heal(model, student, "teacher", tokenizer=tokenizer, max_steps=2, work_dir=tmp_path,
                              **QUICK)
    cached = json.loads((tmp_path / teacher_texts.CACHE_FILE).read_text())
    assert cached["sampling"]["method"] == "MaskedSampling"
    assert report.train_texts + report.held_out_texts == len(set(cached["texts"]))
