"""DST's model card carries the source's card (metadata and text), names the source without an absolute path
(as do config.json and the report), and links nowhere; the healed output's card likewise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_output_tokenizer import loaded, write_bpe_gpt2

from normswap.cli import main
from normswap.conversion.checkpoint import convert_checkpoint

HUB_ID = "acme/tiny-gpt2"
SOURCE_CARD = """---
license: mit
language:
- en
tags: text-generation
datasets:
- acme/stories
base_model: acme/gpt2-base
base_model_relation: finetune
new_version: acme/tiny-gpt2-v2
model-index:
- name: tiny-gpt2
  results:
  - task: {type: text-generation}
    dataset: {name: stories, type: acme/stories}
    metrics:
    - {type: perplexity, value: 12.5}
---

# tiny-gpt2

A tiny story model. Trained with care.
"""


def split_card(card: str) -> tuple[dict[str, Any], str]:
    """(metadata, text) of a card that starts with a YAML block."""
    assert card.startswith("---\n")
    _, metadata, text = card.split("---\n", 2)
    return yaml.safe_load(metadata), text


def output_texts(folder: Path) -> dict[str, str]:
    return {name: (folder / name).read_text(encoding="utf-8")
            for name in ("README.md", "config.json", "normswap_report.json")}


def hub_snapshot(root: Path) -> Path:
    """The BPE GPT-2, with a card, laid out as the Hugging Face cache keeps ``acme/tiny-gpt2``."""
    snapshot = root / "hub" / "models--acme--tiny-gpt2" / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    write_bpe_gpt2(snapshot)
    (snapshot / "README.md").write_text(SOURCE_CARD)
    return snapshot


@pytest.fixture(scope="module")
def minilm_pre(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    """The real MiniLM converted to Pre-Norm (native MegatronBERT) once for this module, SRC given absolute."""
    out = tmp_path_factory.mktemp("card") / "minilm-pre"
    assert main(["convert", str(minilm_path.resolve()), str(out), "--placement", "pre", "--quiet"]) == 0
    return out


def test_minilm_card_keeps_the_source_card(minilm_pre: Path, minilm_path: Path) -> None:
    metadata, text = split_card((minilm_pre / "README.md").read_text())
    source_metadata, source_text = split_card((minilm_path / "README.md").read_text())
    for key in ("license", "language", "datasets", "library_name", "pipeline_tag"):
        assert metadata[key] == source_metadata[key], key
    assert metadata["tags"] == [*source_metadata["tags"], "normswap"]
    # MiniLM's Hub id is not known here; its config's _name_or_path names its parent, never base_model
    assert "base_model" not in metadata and "base_model_relation" not in metadata
    normswap_part, heading, source_part = text.partition("## Source model card")
    assert heading and source_text.strip() in source_part
    assert "not exact" in normswap_part and "`model`" in normswap_part  # named by its folder: given absolute
    assert "http" not in normswap_part and "pypi" not in text.lower()  # links nothing


def test_no_absolute_path_in_card_config_or_report(minilm_pre: Path, minilm_path: Path) -> None:
    config = json.loads((minilm_pre / "config.json").read_text())
    assert config["normswap"]["source"] == "model"
    for name, text in output_texts(minilm_pre).items():
        for path in (minilm_path.resolve(), minilm_pre.parent, Path.home()):
            assert str(path) not in text, (name, path)


def test_hub_snapshot_is_named_by_its_hub_id_and_source_only_metadata_left_out(tmp_path: Path) -> None:
    snapshot = hub_snapshot(tmp_path)
    inexact = convert_checkpoint(snapshot, tmp_path / "post", "post")
    assert inexact.plan.realisation.startswith("generated code") and not inexact.plan.exact
    metadata, text = split_card((tmp_path / "post" / "README.md").read_text())
    assert metadata["base_model"] == HUB_ID  # the source itself, not the source's own parent
    assert "base_model_relation" not in metadata  # a conversion is no adapter, merge, quantization or finetune
    assert metadata["license"] == "mit" and metadata["datasets"] == ["acme/stories"] and metadata["language"] == ["en"]
    assert metadata["tags"] == ["text-generation", "normswap"]
    assert "new_version" not in metadata and "model-index" not in metadata  # its results are not this model's
    assert "`acme/gpt2-base`" in text and "`model-index`" in text  # the card says what it left out
    assert text.rstrip().endswith("A tiny story model. Trained with care.")
    assert json.loads((tmp_path / "post" / "config.json").read_text())["normswap"]["source"] == HUB_ID

    exact = convert_checkpoint(snapshot, tmp_path / "rms", norm="rmsnorm")
    assert exact.plan.exact
    metadata, text = split_card((tmp_path / "rms" / "README.md").read_text())
    assert metadata["model-index"][0]["results"][0]["metrics"][0]["value"] == 12.5  # an exact model's results hold
    assert "**exact**" in text and "not exact" not in text
    for folder in (tmp_path / "post", tmp_path / "rms"):
        assert all(str(tmp_path) not in text for text in output_texts(folder).values())


def test_relative_source_is_named_as_given_and_a_card_is_written_without_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_bpe_gpt2(tmp_path / "models" / "tiny")
    assert main(["convert", "models/tiny", "out", "--norm", "rmsnorm", "--quiet"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["normswap"]["source"] == "models/tiny"
    metadata, text = split_card((tmp_path / "out" / "README.md").read_text())
    assert metadata == {"tags": ["normswap"]}
    assert "`models/tiny`" in text and "## Source model card" not in text
    assert all(str(tmp_path) not in text for text in output_texts(tmp_path / "out").values())


def test_in_memory_conversion_names_its_source_without_an_absolute_path(tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    import normswap

    source = write_bpe_gpt2(tmp_path / "tiny")
    model = GPT2LMHeadModel.from_pretrained(source.resolve())
    converted = normswap.convert(model, norm="rmsnorm")
    assert converted.config.normswap["source"] == "tiny"


def test_healed_card_and_config(tmp_path: Path) -> None:
    snapshot = hub_snapshot(tmp_path)
    assert main(["convert", str(snapshot), str(tmp_path / "post"), "--placement", "post", "--quiet"]) == 0
    assert main(["heal", str(snapshot), str(tmp_path / "post"), str(tmp_path / "healed"), "--trust-remote-code",
                 "--max-steps", "4", "--eval-steps", "2", "--batch-size", "4", "--max-length", "16", "--held-out",
                 "8", "--quiet"]) == 0
    healed = tmp_path / "healed"
    metadata, text = split_card((healed / "README.md").read_text())
    assert metadata["license"] == "mit" and metadata["tags"] == ["text-generation", "normswap"]
    assert metadata["base_model"] == HUB_ID and metadata["base_model_relation"] == "finetune"  # trained from it
    assert "model-index" not in metadata and text.rstrip().endswith("A tiny story model. Trained with care.")
    assert "trust_remote_code=True" in text and "http" not in text.partition("## Source model card")[0]
    provenance = json.loads((healed / "config.json").read_text())["normswap"]
    assert provenance["source"] == HUB_ID
    assert (provenance["healed"]["from"], provenance["healed"]["teacher"]) == ("post", HUB_ID)
    assert all(str(tmp_path) not in text for text in output_texts(healed).values())
    assert loaded(healed) == loaded(snapshot)


def test_source_card_is_parsed_robustly_and_read_only_inside_the_checkpoint(tmp_path: Path) -> None:
    from normswap.io.source_card import parse_card, read_source_card

    crlf = parse_card("\ufeff---\r\nlicense: mit\r\ntags: [a]\r\n---\r\n# Title\r\n")
    assert dict(crlf.metadata) == {"license": "mit", "tags": ["a"]} and crlf.text == "# Title\r\n"
    broken = parse_card("---\nlicense: [mit\n---\n# Kept\n")  # not YAML: the text is kept, the metadata not
    assert dict(broken.metadata) == {} and broken.text == "# Kept\n"
    assert parse_card("# No metadata\n---\nrule above\n").text == "# No metadata\n---\nrule above\n"
    assert dict(parse_card("---\n---\ntext\n").metadata) == {}

    outside = tmp_path / "notes.md"
    outside.write_text("---\nlicense: secret\n---\nprivate notes\n")
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "README.md").symlink_to(outside)
    assert read_source_card(checkpoint) is None  # a link out of the checkpoint is not followed
    (checkpoint / "README.md").unlink()
    (checkpoint / "card.md").write_text("---\nlicense: mit\n---\nshared card\n")
    (checkpoint / "README.md").symlink_to(checkpoint / "card.md")
    card = read_source_card(checkpoint)
    assert card is not None and card.metadata["license"] == "mit" and card.text == "shared card\n"


@pytest.mark.parametrize(("given", "name", "hub_id"), [
    ("/data/hub/models--acme--tiny-gpt2/snapshots/0123abc", HUB_ID, HUB_ID),
    ("/home/someone/models/tiny/", "tiny", None),
    ("~/models/tiny", "tiny", None),
    ("C:\\Users\\someone\\tiny", "tiny", None),
    ("models/./tiny", "models/tiny", None),
    ("gpt2", "gpt2", "gpt2"),  # not a folder here: a Hub id, as a model loaded in memory names it
])
def test_source_identity(given: str, name: str, hub_id: str | None) -> None:
    from normswap.io.source_identity import identify_source

    identity = identify_source(given)
    assert (identity.name, identity.hub_id) == (name, hub_id)
