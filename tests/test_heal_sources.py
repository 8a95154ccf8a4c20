"""Healing data sources: .txt, .jsonl, a ``datasets`` save_to_disk folder, or the built-in corpus; bad ones
are refused in one line that names the file and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from test_rms_norm import perturbed

import normswap
from normswap.errors import NormswapError
from normswap.healing.api import heal
from normswap.healing.texts import load_texts

TEXTS = [f"Sentence number {index} is about {topic}." for index, topic in
         enumerate(["rivers", "engines", "bread", "planets", "violins", "glaciers"] * 8)]


def test_text_file_gives_one_text_per_nonblank_line(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("\n".join(["  first line  ", "", "second line"]) + "\n", encoding="utf-8")
    assert load_texts(path) == ["first line", "second line"]


def test_jsonl_reads_the_text_field_and_names_a_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_texts(path) == ["one", "two"]
    path.write_text(json.dumps({"text": "one"}) + "\n{not json\n")
    with pytest.raises(NormswapError, match=r"data\.jsonl:2 is not JSON"):
        load_texts(path)
    path.write_text(json.dumps({"body": "one"}) + "\n")
    with pytest.raises(NormswapError, match=r"data\.jsonl:1 has no string 'text' field"):
        load_texts(path)


def test_datasets_folder_with_a_text_column(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"text": [*TEXTS[:3], "", "   "], "label": [0, 1, 0, 1, 0]}).save_to_disk(
        tmp_path / "plain")
    assert load_texts(tmp_path / "plain") == TEXTS[:3]  # blank rows dropped

    splits = datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["held"]}),
                                   "train": datasets.Dataset.from_dict({"text": TEXTS[:4]})})
    splits.save_to_disk(tmp_path / "splits")
    assert load_texts(tmp_path / "splits") == TEXTS[:4]  # the train split when there is one


def test_bad_folders_are_refused_with_the_fix(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"sentence": TEXTS[:3]}).save_to_disk(tmp_path / "no_text")
    with pytest.raises(NormswapError, match=r"no_text has no 'text' column \(columns: sentence\)"):
        load_texts(tmp_path / "no_text")
    (tmp_path / "plain_folder").mkdir()
    with pytest.raises(NormswapError, match="not a datasets save_to_disk folder"):
        load_texts(tmp_path / "plain_folder")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(NormswapError, match="holds no text"):
        load_texts(tmp_path / "empty.txt")


def test_heal_trains_on_a_datasets_folder(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(tmp_path / "corpus")
    teacher = perturbed("llama", "LlamaForCausalLM")
    student = normswap.convert(perturbed("llama", "LlamaForCausalLM"), placement="post")
    _, report = heal(teacher, student, tmp_path / "corpus", max_steps=2, eval_steps=2, batch_size=4,
                     max_length=16, held_out=8, quiet=True, work_dir=tmp_path / "work")
    assert (report.train_texts, report.held_out_texts) == (len(TEXTS) - 8, 8)
    assert report.steps == 2
