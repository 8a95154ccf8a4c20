"""``heal --lora-rank R``: LoRA adapters on the branch projections train instead of every weight, and are merged
into an ordinary checkpoint; what the model cannot do, or what does not go together, is refused in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors import safe_open
from test_rms_norm import perturbed

import normswap
from normswap.cli import main
from normswap.errors import NormswapError
from normswap.healing import api as heal_api
from normswap.healing import checkpoint as heal_checkpoint
from normswap.healing import lora

QUICK = {"max_length": 24, "batch_size": 8, "held_out": 16, "eval_steps": 4, "quiet": True}


def _pair(config: str, model_class: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    return perturbed(config, model_class), normswap.convert(perturbed(config, model_class), placement="post")


def _owners(names: tuple[str, ...], parameter: str) -> bool:
    """Whether ``parameter`` belongs to one of the modules ``names`` (directly)."""
    return parameter.rpartition(".")[0] in names


@pytest.mark.parametrize(("config", "model_class"), [("llama", "LlamaForCausalLM"), ("gpt2", "GPT2LMHeadModel")],
                         ids=["llama-linear", "gpt2-conv1d"])
def test_only_adapters_norms_and_biases_train_and_the_merge_changes_only_those(
        config: str, model_class: str, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher, student = _pair(config, model_class)
    unhealed = {name: value.clone() for name, value in student.state_dict().items()}
    flags = {name: parameter.requires_grad for name, parameter in student.named_parameters()}
    at_merge: dict[str, Any] = {}
    real_merge = lora.LoraAdapters.merge

    def spy(adapters: lora.LoraAdapters) -> torch.nn.Module:
        at_merge["state"] = {name: value.clone() for name, value in adapters.student.state_dict().items()}
        at_merge["training"] = {name for name, p in adapters.student.named_parameters() if p.requires_grad}
        at_merge["adapters"] = adapters
        return real_merge(adapters)

    monkeypatch.setattr(lora.LoraAdapters, "merge", spy)
    _, report = heal_api.heal(teacher, student, max_steps=8, learning_rate=2e-3, lora_rank=4, **QUICK)
    adapters: lora.LoraAdapters = at_merge["adapters"]
    projections, norms = adapters.projections, adapters.norms
    assert projections and norms and report.lora is not None and report.lora["rank"] == 4
    assert report.losses[-1] < report.losses[0]
    assert report.after["output_cosine"] > report.before["output_cosine"]

    # before the merge: the base weights are bit for bit the unhealed ones; only adapters, norms, biases trained
    state = at_merge["state"]
    adapter_keys = {name for name in state if ".lora_A." in name or ".lora_B." in name}
    training = {name.replace(".base_layer.", ".") for name in at_merge["training"] - adapter_keys}
    assert adapter_keys and training == {
        name for name in unhealed if _owners(norms, name) or (_owners(projections, name) and name.endswith("bias"))}
    for name, value in state.items():
        plain = name.replace(".base_layer.", ".")
        if name not in adapter_keys and plain not in training:
            assert torch.equal(value, unhealed[plain]), f"{name} changed while frozen"
    assert any(state[name].abs().sum() > 0 for name in adapter_keys if ".lora_B." in name)  # B starts at 0

    # after it: an ordinary model, the same keys and flags, the weights moved only where LoRA or the norms trained
    healed = student.state_dict()
    assert healed.keys() == unhealed.keys() and not hasattr(student, "peft_config")
    assert {name: p.requires_grad for name, p in student.named_parameters()} == flags
    changed = {name for name in healed if not torch.equal(healed[name], unhealed[name])}
    allowed = {name for name in healed if _owners(projections, name) or _owners(norms, name)}
    assert changed <= allowed
    assert {f"{path}.weight" for path in projections} <= changed  # every wrapped projection got its adapter


def test_the_saved_checkpoint_is_ordinary_and_computes_what_the_merged_student_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    perturbed("llama", "LlamaForCausalLM").save_pretrained(tmp_path / "original")
    assert main(["convert", str(tmp_path / "original"), str(tmp_path / "post"), "--placement", "post",
                 "--quiet"]) == 0
    merged: list[torch.nn.Module] = []
    real_heal = heal_checkpoint.heal

    def keep(*args: Any, **kwargs: Any) -> Any:
        student, report = real_heal(*args, **kwargs)
        merged.append(student)
        return student, report

    monkeypatch.setattr(heal_checkpoint, "heal", keep)
    assert main(["heal", str(tmp_path / "original"), str(tmp_path / "post"), str(tmp_path / "healed"),
                 "--lora-rank", "4", "--max-steps", "6", "--eval-steps", "3", "--batch-size", "8", "--max-length",
                 "24", "--held-out", "16", "--learning-rate", "2e-3", "--quiet"]) == 0
    healed, converted = tmp_path / "healed", tmp_path / "post"

    def keys(folder: Path) -> set[str]:
        with safe_open(str(folder / "model.safetensors"), framework="pt") as opened:
            return set(opened.keys())

    assert keys(healed) == keys(converted) and not any("lora" in key or "base_layer" in key for key in keys(healed))
    assert not list(healed.glob("adapter_*"))
    for code in converted.glob("modeling_normswap_*.py"):
        assert (healed / code.name).read_bytes() == code.read_bytes()
    report = json.loads((healed / "normswap_report.json").read_text())
    assert report["heal"]["lora"]["rank"] == 4 and report["heal"]["steps"] == 6
    config = json.loads((healed / "config.json").read_text())
    assert "peft" not in json.dumps(config) and config["auto_map"] == json.loads(
        (converted / "config.json").read_text())["auto_map"]

    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(healed, trust_remote_code=True,
                                                                     output_loading_info=True)
    assert not any(info.values())  # no missing, unexpected or mismatched keys
    assert type(loaded).__name__ == type(merged[0]).__name__ and normswap.inspect(loaded).placement == "post"
    ids = torch.randint(0, loaded.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, merged[0].eval()(input_ids=ids).logits)


def test_a_rank_below_one_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for rank in ("0", "-2", "four"):
        with pytest.raises(SystemExit) as exited:
            main(["heal", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"), "--lora-rank", rank])
        assert exited.value.code == 2 and "--lora-rank" in capsys.readouterr().err.splitlines()[-1]
    teacher, student = _pair("llama", "LlamaForCausalLM")
    with pytest.raises(NormswapError, match="lora_rank=0"):
        heal_api.heal(teacher, student, lora_rank=0, **QUICK)


def test_without_peft_the_error_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    monkeypatch.setattr(heal_checkpoint, "heal_checkpoint", lambda *a, **k: pytest.fail("loaded without peft"))
    assert main(["heal", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"), "--lora-rank", "8"]) == 1
    error = capsys.readouterr().err.strip()
    assert "pip install 'normswap[heal]'" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_a_model_with_no_projection_peft_can_wrap_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    perturbed("llama", "LlamaForCausalLM").save_pretrained(tmp_path / "original")
    assert main(["convert", str(tmp_path / "original"), str(tmp_path / "post"), "--placement", "post",
                 "--quiet"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(lora, "linear_layout", lambda module: None)  # as if no branch called nn.Linear or Conv1D
    assert main(["heal", str(tmp_path / "original"), str(tmp_path / "post"), str(tmp_path / "healed"),
                 "--lora-rank", "4", "--max-steps", "2", "--held-out", "16", "--quiet"]) == 1
    error = capsys.readouterr().err.strip()
    assert "PEFT can wrap" in error and "leave out --lora-rank" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "healed").exists()


def test_a_checkpoint_resumes_only_as_the_kind_of_run_that_wrote_it(tmp_path: Path) -> None:
    for rank in (None, 4):  # a checkpoint of each kind
        teacher, student = _pair("llama", "LlamaForCausalLM")
        heal_api.heal(teacher, student, max_steps=2, work_dir=tmp_path / str(rank), lora_rank=rank,
                      **{**QUICK, "eval_steps": 2})
    for written, resumed, says in ((None, 4, "without --lora-rank"), (4, None, "with --lora-rank 4"),
                                   (4, 2, "with --lora-rank 4")):
        with pytest.raises(NormswapError, match=says):
            heal_api.heal(teacher, student, max_steps=4, work_dir=tmp_path / str(written), resume=True,
                          lora_rank=resumed, **QUICK)


def test_the_default_learning_rate_is_lora_s_own_with_lora(monkeypatch: pytest.MonkeyPatch) -> None:
    class Reached(BaseException):
        pass

    rates: list[float] = []

    def record(*_args: Any, learning_rate: float, **_options: Any) -> None:
        rates.append(learning_rate)
        raise Reached

    monkeypatch.setattr(heal_api, "training_arguments", record)
    for rank in (4, None):
        teacher, student = _pair("llama", "LlamaForCausalLM")
        with pytest.raises(Reached):
            heal_api.heal(teacher, student, max_steps=1, lora_rank=rank, **QUICK)
    assert rates == [lora.LEARNING_RATE, heal_api.FULL_LEARNING_RATE] and rates[0] > rates[1]


def test_convert_heals_with_lora_and_asks_for_heal_before_healing_options(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``convert --heal --heal-lora-rank R`` heals the conversion with adapters (merged: DST is ordinary); a healing
    option without ``--heal`` is a usage error, not silently ignored."""
    perturbed("llama", "LlamaForCausalLM").save_pretrained(tmp_path / "original")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"text number {i} of a tiny corpus for healing" for i in range(80)))
    with pytest.raises(SystemExit) as usage:
        main(["convert", str(tmp_path / "original"), str(tmp_path / "bad"), "--placement", "post",
              "--heal-lora-rank", "4"])
    assert usage.value.code == 2 and "--heal-lora-rank sets how --heal heals" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "original"), str(tmp_path / "healed"), "--placement", "post", "--heal",
                 "--heal-lora-rank", "4", "--heal-max-time", "15", "--heal-data", str(corpus), "--quiet",
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["heal"]["lora"]["rank"] == 4 and printed["heal"]["steps"] > 0
    with safe_open(str(tmp_path / "healed" / "model.safetensors"), framework="pt") as opened:
        names = opened.keys()
    assert names and not any("lora" in name for name in names)
    assert not (tmp_path / "bad").exists()
