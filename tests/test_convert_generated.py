"""Post <-> Pre through generated modeling code (libcst rewrite of the family's own source).

Parametrised over families x directions on tiny models with perturbed norms: topology,
branch 0, round trips back to the stock family, save -> load with trust_remote_code (and a
loud refusal without it), generate with and without the KV cache, and a training step with
gradient checkpointing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from test_convert_native import tiny_model

import normswap
from normswap.conversion import convert
from normswap.conversion.checkpoint import convert_checkpoint, tensors_equal
from normswap.conversion.verify import measure_drift, probe_inputs


@dataclass(frozen=True)
class Case:
    config: str
    model_class: str
    placement: str
    auto_class: str
    decoder: bool


CASES = [
    Case("gpt2", "GPT2LMHeadModel", "post", "AutoModelForCausalLM", True),
    Case("llama", "LlamaForCausalLM", "post", "AutoModelForCausalLM", True),
    Case("qwen2", "Qwen2ForCausalLM", "post", "AutoModelForCausalLM", True),
    Case("gpt_neox_parallel", "GPTNeoXForCausalLM", "post", "AutoModelForCausalLM", True),
    Case("opt_pre", "OPTForCausalLM", "post", "AutoModelForCausalLM", True),  # --no-native keeps branch 0 exact
    Case("bert", "BertForMaskedLM", "pre", "AutoModelForMaskedLM", False),
]
IDS = [f"{c.config}-to-{c.placement}" for c in CASES]
BACK = {"pre": "post", "post": "pre"}


@pytest.fixture(params=CASES, ids=IDS)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


def converted_pair(case: Case) -> tuple[torch.nn.Module, torch.nn.Module]:
    model = tiny_model(case.config, case.model_class)
    return model, convert(model, case.placement, native=False)


def test_generated_classes_realise_the_target(case: Case) -> None:
    model, converted = converted_pair(case)
    assert type(converted).__name__ == case.model_class
    assert type(converted).__module__.startswith("normswap_generated_")
    assert re.fullmatch(rf"normswap-{model.config.model_type}-[0-9a-f]{{12}}", converted.config.model_type)
    topology = normswap.inspect(converted)
    assert topology.placement == case.placement
    stack = topology.stacks[0]
    if case.placement == "post":
        assert stack.embedding_norm is not None and stack.final_norm is None
    else:
        assert stack.embedding_norm is None and stack.final_norm is not None
    assert converted.normswap_plan.realisation.startswith("generated code: modeling_normswap_")

    report = measure_drift(model, converted, normswap.inspect(model), topology, probe_inputs(model, None, None),
                           exact=False)
    assert report.sublayers[0].max_abs_diff == 0.0  # branch 0 reads exactly what it read before
    assert report.output_cosine < 0.999


def test_round_trip_returns_to_the_stock_family_bit_for_bit(case: Case) -> None:
    model, converted = converted_pair(case)
    back = convert(converted, BACK[case.placement])
    assert type(back) is type(model)  # the stock transformers class again
    assert tensors_equal(model.state_dict(), back.state_dict())
    inputs = probe_inputs(model, None, None)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, back(**inputs).logits)


def test_saved_checkpoint_needs_trust_remote_code_and_matches(case: Case, tmp_path: Path) -> None:
    model, converted = converted_pair(case)
    model.save_pretrained(tmp_path / "source")
    result = convert_checkpoint(tmp_path / "source", tmp_path / "out", case.placement, native=False)
    out = result.destination
    assert (out / f"modeling_normswap_{model.config.model_type}.py").is_file()
    auto = getattr(transformers, case.auto_class)
    # without trust_remote_code it never loads into the stock class: in a fresh process it is refused
    # (test_generated_registration), and here, where the conversion imported normswap's own copy of the code, which
    # registered the model_type (the digest of that code), it loads as that copy
    assert ".modeling_normswap_" in type(auto.from_pretrained(out)).__module__
    # forcing the stock class by name fails loudly too: the removed norm's slot holds a 0-d tensor, not its vector
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        getattr(transformers, case.model_class).from_pretrained(out)
    loaded = auto.from_pretrained(out, trust_remote_code=True).eval()
    assert type(loaded).__name__ == case.model_class
    assert normswap.inspect(loaded).placement == case.placement
    inputs = probe_inputs(model, None, None)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, converted(**inputs).logits)
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card


DECODERS = [c for c in CASES if c.decoder]


@pytest.mark.parametrize("case", DECODERS, ids=[f"{c.config}-to-{c.placement}" for c in DECODERS])
def test_generate_with_cache_equals_without(case: Case) -> None:
    _, converted = converted_pair(case)
    prompt = torch.tensor([[5, 17, 42, 7]])
    with_cache = converted.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    without = converted.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert with_cache.shape == (1, 12)
    assert torch.equal(with_cache, without)


def test_training_step_with_gradient_checkpointing(case: Case) -> None:
    _, converted = converted_pair(case)
    getattr(converted, "activation_checkpointing_enable", converted.gradient_checkpointing_enable)()
    converted.train()
    optimizer = torch.optim.AdamW(converted.parameters(), lr=1e-3)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = converted(input_ids=ids, labels=ids).loss
    loss.backward()
    norm_grads = [p.grad for n, p in converted.named_parameters() if "norm" in n or "ln" in n or "LayerNorm" in n]
    assert norm_grads and all(g is not None and torch.isfinite(g).all() for g in norm_grads)
    optimizer.step()
    assert torch.isfinite(loss)


def test_cli_round_trip_through_generated_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    from normswap.cli import main

    model = tiny_model("llama", "LlamaForCausalLM")
    model.save_pretrained(tmp_path / "source")
    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "post"), "--placement", "post"]) == 0
    capsys.readouterr()
    # normswap's own code, byte for byte: converting it back needs no --trust-remote-code (issue 17)
    assert main(["convert", str(tmp_path / "post"), str(tmp_path / "back"), "--placement", "pre"]) == 0
    back = tmp_path / "back"
    assert not (back / "modeling_normswap_llama.py").exists()
    assert transformers.AutoConfig.from_pretrained(back).model_type == "llama"
    original = load_file(str(tmp_path / "source" / "model.safetensors"))
    restored = load_file(str(back / "model.safetensors"))
    assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)


def test_vision_model_converts_with_pixel_probes(tmp_path: Path) -> None:
    model = tiny_model("vit", "ViTModel")
    model.save_pretrained(tmp_path / "source")
    result = convert_checkpoint(tmp_path / "source", tmp_path / "out", "post")
    assert result.report is not None and result.report.sublayers[0].max_abs_diff == 0.0
    assert result.report.probe_tokens == 4 * 17  # 4 random images, 16 patches + [CLS]
    loaded = transformers.AutoModel.from_pretrained(result.destination, trust_remote_code=True)
    assert normswap.inspect(loaded).placement == "post"
