"""--placement and --norm in one conversion (docs/design.md §8): one generated module, one tensor program, one
verification against the original, exact only if every pass is, and each pass's own figure in the report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from test_convert_native import tiny_model

import normswap
from normswap.conversion.chain import then
from normswap.conversion.program import TensorProgram, combine, constant, copy_of, evaluate


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "normswap", *args], capture_output=True, text=True, timeout=600)


def test_then_runs_the_second_program_on_what_the_first_outputs() -> None:
    first = TensorProgram({"a": combine(lambda x: x * 2, copy_of("x")), "b": copy_of("y"),
                           "c": constant(lambda: torch.ones(()))})
    second = TensorProgram({"d": combine(lambda a, b: a + b, copy_of("a"), copy_of("b")), "b": copy_of("b"),
                            "c": combine(lambda c: c * 3, copy_of("c"))})
    source = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([10.0, 20.0])}
    outputs, _ = evaluate(then(first, second), source, torch.float32)
    assert torch.equal(outputs["d"], torch.tensor([12.0, 24.0]))
    assert torch.equal(outputs["b"], source["y"]) and outputs["b"] is not source["y"]
    assert torch.equal(outputs["c"], torch.full((), 3.0))
    with pytest.raises(KeyError, match="reads z"):
        then(first, TensorProgram({"e": copy_of("z")}))


def test_bert_to_pre_rmsnorm_is_the_norm_shift_alone_in_drift() -> None:
    """BERT -> Pre-RMSNorm: the norm shift (inexact) then the exact centring, so the whole conversion drifts as
    much as its first pass, and the second pass alone is exact."""
    model = tiny_model("bert", "BertForMaskedLM")
    converted = normswap.convert(model, "pre", norm="rmsnorm")
    topology = normswap.inspect(converted)
    assert (topology.placement, topology.norm) == ("pre", "rmsnorm")
    report = converted.normswap_report
    assert [p.exact for p in converted.normswap_plan.plans] == [False, True]
    assert not report.exact and len(report.passes) == 2
    norm_shift, centring = report.passes
    assert centring.exact and centring.relative < 1e-5
    assert report.whole.output_cosine == pytest.approx(norm_shift.output_cosine, abs=1e-4)
    assert report.whole.output_cosine < 0.999  # the norm shift moved it: the comparison can fail


def test_llama_to_post_layernorm_is_one_module_that_generates(tmp_path: Path) -> None:
    model = tiny_model("llama", "LlamaForCausalLM")
    source = tmp_path / "llama"
    model.save_pretrained(source)
    destination = tmp_path / "post-ln"
    done = _cli("convert", str(source), str(destination), "--placement", "post", "--norm", "layernorm", "--exact")
    assert done.returncode == 0, done.stderr
    assert "pass 1: plan: llama RMSNorm -> LayerNorm" in done.stdout
    assert re.search(r"pass 2: plan: normswap-llama-[0-9a-f]{12} \(pre\)", done.stdout)
    code = [path for path in destination.iterdir() if path.name.startswith("modeling_normswap_")]
    assert len(code) == 1
    text = code[0].read_text()
    assert "; then placement pre -> post" in text.splitlines()[1]
    assert text.count("class NormswapLayerNorm(") == 1 and "normswap_generated" not in text
    report = json.loads((destination / "normswap_report.json").read_text())
    assert report["passes"][0]["exact"] and not report["exact"]
    inspected = _cli("inspect", str(destination))  # no --trust-remote-code: the code is normswap's own
    assert inspected.returncode == 0, inspected.stderr
    assert "Post-Norm, LayerNorm" in inspected.stdout
    loaded = transformers.AutoModelForCausalLM.from_pretrained(destination, trust_remote_code=True).eval()
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    cached = loaded.generate(ids, max_new_tokens=6, do_sample=False)
    uncached = loaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_norm_pass_runs_where_the_model_is_pre_norm() -> None:
    """Pre source: the norm kind changes first (exact on Pre-Norm); Post source: after the norm shift."""
    llama = normswap.convert(tiny_model("llama", "LlamaForCausalLM"), "post", norm="layernorm", exact=True)
    assert [p.exact for p in llama.normswap_plan.plans] == [True, False]
    assert llama.normswap_plan.plans[0].source_model_type == "llama"
    bert = normswap.convert(tiny_model("bert", "BertForMaskedLM"), "pre", norm="rmsnorm")
    assert bert.normswap_plan.plans[0].target_model_type == "megatron-bert"


def test_exact_composition_asked_of_an_inexact_placement_says_which_pass() -> None:
    plan = normswap.convert(tiny_model("gpt2", "GPT2LMHeadModel"), "post", norm="rmsnorm").normswap_plan
    assert plan.exact is False and plan.plans[0].exact is True  # centring on Pre-LN, then the shift


def test_healing_a_widened_composition_names_the_way_that_works() -> None:
    from normswap.healing.api import heal

    model = tiny_model("llama", "LlamaForCausalLM")
    converted = normswap.convert(model, "post", norm="layernorm", exact=True)
    with pytest.raises(normswap.NormswapError, match=r"65 wide and the teacher's 64.*heal the inexact pass alone"):
        heal(model, converted, ["some text to heal on"] * 4, max_steps=1, quiet=True)
