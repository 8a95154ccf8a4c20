"""DST's tokenizer loads as SRC's did: same class, same special tokens, same ids, and no checkpoint code runs.

A source whose tokenizer_config.json names no class (as openai-community/gpt2's) got its class from its
``model_type``; DST's ``model_type`` is another (``normswap-gpt2``), so DST's tokenizer_config.json must name it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from normswap.cli import main
from normswap.codegen.package import family_model_type
from normswap.conversion.checkpoint import convert_checkpoint

SAMPLE = ["the norms move w1 w2.", "Hello world, branches keep what they read"]
PROMPT = "Do you wish to run the custom code"
LOAD_IN_FRESH_PROCESS = """
import json, sys
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])  # no trust_remote_code: what a user types
print("RESULT " + json.dumps([type(tokenizer).__name__, tokenizer.special_tokens_map,
                              tokenizer(json.loads(sys.argv[2]))["input_ids"]]))
"""


def write_bpe_gpt2(folder: Path) -> Path:
    """A tiny GPT-2 with a byte-level BPE tokenizer whose tokenizer_config.json names no class."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=300, n_positions=64, bos_token_id=256,
                        eos_token_id=256)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(folder)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the norms move", "branches keep what they read"] * 10, vocab_size=280,
                            min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(folder))
    bpe.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return folder


def write_vocab_bert(folder: Path) -> Path:
    """A tiny BERT whose tokenizer is a bare vocab.txt (no tokenizer.json, no tokenizer_config.json)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "norms", "move", "hello", "world", ",", ".",
             "branches", "keep", "what", "they", "read", "w", "##1", "##2"]
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         vocab_size=len(words))).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return folder


def loaded(folder: Path) -> tuple[str, dict[str, Any], list[list[int]]]:
    """Class name, special tokens and ids of ``AutoTokenizer`` on ``folder``, running no checkpoint code."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    return type(tokenizer).__name__, dict(tokenizer.special_tokens_map), tokenizer(SAMPLE)["input_ids"]


def load_in_fresh_process(folder: Path) -> tuple[str, Any]:
    """(output, result) of a plain ``AutoTokenizer.from_pretrained(folder)`` with stdin closed: a prompt shows
    in the output and is answered by end of input (as "no")."""
    done = subprocess.run([sys.executable, "-c", LOAD_IN_FRESH_PROCESS, str(folder), json.dumps(SAMPLE)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False)
    output = done.stdout + done.stderr
    results = [line.partition("RESULT ")[2] for line in done.stdout.splitlines() if "RESULT " in line]
    return output, json.loads(results[-1]) if results else None  # the prompt ends with no newline


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The BPE GPT-2 source and its conversions: Pre -> Post and LayerNorm -> RMSNorm (both generated code)."""
    root = tmp_path_factory.mktemp("gpt2")
    source = write_bpe_gpt2(root / "source")
    outputs = {"source": source}
    for name, option in (("post", {"placement": "post"}), ("rms", {"norm": "rmsnorm"})):
        result = convert_checkpoint(source, root / name, **option)
        assert result.plan.realisation.startswith("generated code")
        outputs[name] = root / name
    return outputs


@pytest.mark.parametrize("output", ["post", "rms"])
def test_gpt2_tokenizer_loads_as_the_source_s(gpt2: dict[str, Path], output: str) -> None:
    source = loaded(gpt2["source"])
    assert source[0] == "GPT2Tokenizer" and source[1]["eos_token"] == "<|endoftext|>"
    assert loaded(gpt2[output]) == source
    settings = json.loads((gpt2[output] / "tokenizer_config.json").read_text())
    assert settings == {"model_max_length": 64, "tokenizer_class": "GPT2Tokenizer"}  # the rest as it was
    report = json.loads((gpt2[output] / "normswap_report.json").read_text())
    assert report["support_files"]["tokenizer_class"] == "GPT2Tokenizer"


@pytest.fixture(scope="module")
def plain_loads(gpt2: dict[str, Path]) -> dict[str, tuple[str, Any]]:
    """A plain ``AutoTokenizer.from_pretrained`` of the source and of its RMSNorm output, each in a fresh process."""
    return {name: load_in_fresh_process(gpt2[name]) for name in ("source", "rms")}


def test_plain_load_in_a_fresh_process_gives_the_source_s_tokenizer(plain_loads: dict[str, tuple[str, Any]]
                                                                     ) -> None:
    source, converted = plain_loads["source"][1], plain_loads["rms"][1]
    assert source is not None and source[0] == "GPT2Tokenizer"
    assert converted == source


@pytest.mark.xfail(strict=True, reason="transformers 5 AutoTokenizer loads config.json through AutoConfig before "
                   "it reads tokenizer_config.json, and AutoConfig asks before a custom config's code (auto_map, "
                   "model_type normswap-*); no file in DST can avoid it while the model needs that config code")
def test_plain_load_does_not_ask_to_run_code(plain_loads: dict[str, tuple[str, Any]]) -> None:
    assert PROMPT not in plain_loads["source"][0]  # the source never asks
    assert PROMPT not in plain_loads["rms"][0]


def test_bert_with_only_vocab_txt_loads_as_the_source_s(tmp_path: Path) -> None:
    source = write_vocab_bert(tmp_path / "source")
    assert main(["convert", str(source), str(tmp_path / "rms"), "--norm", "rmsnorm", "--quiet"]) == 0
    assert (tmp_path / "rms" / "modeling_normswap_bert.py").is_file()
    assert loaded(tmp_path / "rms") == loaded(source)
    assert json.loads((tmp_path / "rms" / "tokenizer_config.json").read_text()) == {"tokenizer_class": "BertTokenizer"}


def test_custom_tokenizer_is_left_as_the_source_had_it(tmp_path: Path) -> None:
    from fault_kit import edit_json, write_tiny_gpt2

    source = write_tiny_gpt2(tmp_path / "source")
    edit_json(source / "tokenizer_config.json", auto_map={"AutoTokenizer": ["tokenization_x.XTokenizer", None]})
    (source / "tokenization_x.py").write_text("raise SystemExit('checkpoint code ran')\n")
    assert main(["convert", str(source), str(tmp_path / "rms"), "--norm", "rmsnorm", "--quiet"]) == 0
    for name in ("tokenizer_config.json", "tokenization_x.py"):
        assert (tmp_path / "rms" / name).read_bytes() == (source / name).read_bytes()


@pytest.fixture(scope="module")
def minilm_rms(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    """The real MiniLM converted to RMSNorm (generated code) once for this module."""
    out = tmp_path_factory.mktemp("minilm") / "mini-rms"
    assert main(["convert", str(minilm_path), str(out), "--norm", "rmsnorm", "--quiet"]) == 0
    return out


def test_minilm_tokenizer_and_processor_load_as_the_source_s(minilm_rms: Path, minilm_path: Path) -> None:
    from transformers import AutoProcessor

    assert family_model_type(json.loads((minilm_rms / "config.json").read_text())["model_type"]) == "bert"
    assert loaded(minilm_rms) == loaded(minilm_path)
    assert loaded(minilm_rms)[0] == "BertTokenizer"
    processors = [AutoProcessor.from_pretrained(path, trust_remote_code=False) for path in (minilm_path, minilm_rms)]
    assert type(processors[0]) is type(processors[1])
    assert processors[0](SAMPLE)["input_ids"] == processors[1](SAMPLE)["input_ids"]
    # MiniLM names its class already: its tokenizer_config.json is copied unchanged
    assert (minilm_rms / "tokenizer_config.json").read_bytes() == (minilm_path / "tokenizer_config.json").read_bytes()
