"""Verification with the weights left on disk (``--verify-offloaded``) gives the in-memory verification's report.

Models above ``--verify-max-size`` are loaded on the meta device and accelerate's hooks read each module's
weights as it runs. The report must not depend on that: each case converts a perturbed tiny model twice, once
verified in memory and once offloaded, and requires equal reports, with the offloaded models really on meta.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_rms_norm import perturbed

from normswap.cli import main
from normswap.conversion import checkpoint, offload
from normswap.conversion.checkpoint import convert_checkpoint

CASES = [
    ("llama", "LlamaForCausalLM", {"placement": "post"}, torch.float32),  # generated code, drift report
    ("bert", "BertModel", {"placement": "pre"}, torch.float32),  # native target, encoder
    ("bart", "BartModel", {"placement": "pre"}, torch.float32),  # encoder-decoder
    ("gpt2", "GPT2LMHeadModel", {"norm": "rmsnorm"}, torch.bfloat16),  # exact in bf16: the fp32 twin is read again
    ("gpt2", "GPT2LMHeadModel", {"norm": "rmsnorm", "dtype": "bfloat16"}, torch.float32),  # fp32 source, bf16 out
    ("llama", "LlamaForCausalLM", {"norm": "layernorm", "exact": True}, torch.float32),  # one dimension wider
    ("llama", "LlamaForCausalLM", {"norm": "layernorm"}, torch.float32),  # approximate
    ("gemma2", "Gemma2ForCausalLM", {"placement": "pre"}, torch.float32),  # calibrated offloaded too: same scales
    ("olmo2", "Olmo2ForCausalLM", {"placement": "sandwich"}, torch.float32),  # new norms at offloaded scales
]


@pytest.mark.parametrize(("config", "model_class", "options", "dtype"), CASES,
                         ids=["-".join([c[0], *map(str, c[2].values()), str(c[3])[6:]]) for c in CASES])
def test_offloaded_report_equals_the_in_memory_one(config: str, model_class: str, options: dict[str, Any],
                                                   dtype: torch.dtype, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model = perturbed(config, model_class, dtype)
    if options.get("exact") and config == "llama":
        model.config.head_dim = model.config.hidden_size // model.config.num_attention_heads
    model.save_pretrained(tmp_path / "source")
    in_memory = convert_checkpoint(tmp_path / "source", tmp_path / "memory", **options).report.to_dict()

    devices: list[str] = []
    load_model, load_converted = checkpoint.load_model, checkpoint._load_converted

    def spy_source(*args: Any, **kwargs: Any) -> torch.nn.Module:
        loaded = load_model(*args, **kwargs)
        devices.append(next(loaded.parameters()).device.type)
        return loaded

    def spy_converted(*args: Any, **kwargs: Any) -> torch.nn.Module:
        loaded = load_converted(*args, **kwargs)
        devices.append(next(loaded.parameters()).device.type)
        return loaded

    monkeypatch.setattr(checkpoint, "load_model", spy_source)
    monkeypatch.setattr(checkpoint, "_load_converted", spy_converted)
    offloaded = convert_checkpoint(tmp_path / "source", tmp_path / "offloaded", verify_max_size="0",
                                   verify_offloaded=True, **options).report.to_dict()

    assert same_figures(offloaded, in_memory)
    assert devices[:2] == ["meta", "meta"]  # the converted model, then the original: both offloaded
    if options.get("norm") == "rmsnorm" and (dtype == torch.bfloat16 or options.get("dtype") == "bfloat16"):
        assert devices == ["meta", "meta", "meta"]  # and the fp32 twin of the exactness bound, read again
    assert not list(tmp_path.glob(".*normswap*"))  # the offload folder is gone


def test_cli_verifies_offloaded_and_says_how_to_when_skipping(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    perturbed("gpt2", "GPT2LMHeadModel").save_pretrained(tmp_path / "source")
    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "skipped"), "--placement", "post", "--quiet",
                 "--verify-max-size", "0", "--json"]) == 0
    skipped = json.loads(capsys.readouterr().out)["report"]
    assert skipped["verified"] is False and "--verify-offloaded" in skipped["reason"]

    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "verified"), "--placement", "post", "--quiet",
                 "--verify-max-size", "0", "--verify-offloaded", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["report"]
    assert report["sublayers"][0]["cosine"] == pytest.approx(1.0) and report["next_token_kl"] > 0


def test_without_accelerate_offloaded_verification_is_refused_before_writing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    perturbed("gpt2", "GPT2LMHeadModel").save_pretrained(tmp_path / "source")
    find_spec = offload.importlib.util.find_spec
    monkeypatch.setattr(offload.importlib.util, "find_spec",
                        lambda name, *rest: None if name == "accelerate" else find_spec(name, *rest))
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "out"), "--placement", "post", "--quiet",
                 "--verify-max-size", "0", "--verify-offloaded"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("Error: --verify-offloaded needs the accelerate package") and "\n" not in error
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_legacy_bin_source_verifies_offloaded(tmp_path: Path) -> None:
    model = perturbed("gpt2", "GPT2LMHeadModel")
    model.save_pretrained(tmp_path / "source")
    (tmp_path / "source" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "source" / "pytorch_model.bin")
    in_memory = convert_checkpoint(tmp_path / "source", tmp_path / "memory", norm="rmsnorm").report.to_dict()
    offloaded = convert_checkpoint(tmp_path / "source", tmp_path / "offloaded", norm="rmsnorm", verify_max_size="0",
                                   verify_offloaded=True).report.to_dict()
    assert offloaded == in_memory
    assert not list(tmp_path.glob(".*normswap*"))


def test_a_generated_code_source_verifies_offloaded(tmp_path: Path) -> None:
    """Converting back from normswap's own generated code: the source loads offloaded through its ``auto_map``."""
    perturbed("llama", "LlamaForCausalLM").save_pretrained(tmp_path / "source")
    convert_checkpoint(tmp_path / "source", tmp_path / "post", placement="post")
    in_memory = convert_checkpoint(tmp_path / "post", tmp_path / "memory", placement="pre",
                                   trust_remote_code=True).report.to_dict()
    offloaded = convert_checkpoint(tmp_path / "post", tmp_path / "offloaded", placement="pre", trust_remote_code=True,
                                   verify_max_size="0", verify_offloaded=True).report.to_dict()
    assert same_figures(offloaded, in_memory)


def same_figures(offloaded: dict[str, Any], in_memory: dict[str, Any]) -> bool:
    """The whole conversion's figures are equal; a conversion of several passes verified offloaded has no per-pass
    figures, which need each pass realised in memory."""
    if offloaded.get("passes") == [] and in_memory.get("passes"):
        in_memory = {**in_memory, "passes": []}
    return offloaded == in_memory


def test_offloaded_verification_says_so_unless_quiet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    perturbed("gpt2", "GPT2LMHeadModel").save_pretrained(tmp_path / "source")
    capsys.readouterr()
    common = ["--placement", "post", "--verify-max-size", "0", "--verify-offloaded", "--json"]
    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "loud"), *common]) == 0
    assert "verifying with the weights offloaded to disk" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "quiet"), *common, "--quiet"]) == 0
    assert "offloaded" not in capsys.readouterr().err


def test_calibration_above_the_limit_without_offloading_is_refused_before_writing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    perturbed("gemma2", "Gemma2ForCausalLM").save_pretrained(tmp_path / "source")
    capsys.readouterr()
    code = main(["convert", str(tmp_path / "source"), str(tmp_path / "out"), "--placement", "pre",
                 "--verify-max-size", "1KB"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "calibrates its norms" in err and "--verify-offloaded" in err
    assert "--no-calibration" in err  # the other way on: unit scales, nothing run before writing
    assert not (tmp_path / "out").exists()
