"""Post <-> Pre conversion through native targets, on tiny models with perturbed norms.

Parametrised over families x directions: the realised topology, branch 0, round trips,
save -> load, generate with and without the KV cache, and a training step with gradient
checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from tiny_configs import TINY_CONFIGS
from transformers import CONFIG_MAPPING

import normswap
from normswap.conversion import convert, plan_conversion
from normswap.conversion.checkpoint import convert_checkpoint, tensors_equal
from normswap.conversion.model_outputs import output_parts
from normswap.conversion.verify import measure_drift, probe_inputs


@dataclass(frozen=True)
class Case:
    config: str
    model_class: str
    placement: str
    target_class: str
    branch0_exact: bool  # False where the target family has no slot for it (documented in the plan notes)


CASES = [
    Case("bert", "BertModel", "pre", "MegatronBertModel", True),
    Case("bert", "BertForMaskedLM", "pre", "MegatronBertForMaskedLM", True),
    Case("megatron_bert", "MegatronBertModel", "post", "BertModel", True),
    Case("roberta", "RobertaModel", "pre", "XLMRobertaXLModel", True),
    Case("xlm_roberta_xl", "XLMRobertaXLModel", "post", "RobertaModel", True),
    Case("bart", "BartModel", "pre", "MBartModel", False),
    Case("mbart", "MBartModel", "post", "BartModel", False),
    Case("opt_pre", "OPTForCausalLM", "post", "OPTForCausalLM", False),
    Case("opt_post", "OPTForCausalLM", "pre", "OPTForCausalLM", False),
]
IDS = [f"{c.config}-{c.model_class}-to-{c.placement}" for c in CASES]


def tiny_model(config_name: str, class_name: str) -> torch.nn.Module:
    """A tiny random model whose norm weights and biases are moved away from 1 and 0."""
    fields = dict(TINY_CONFIGS[config_name])
    config = CONFIG_MAPPING[fields.pop("model_type")](**fields)
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(config).eval()
    norm_paths = {n.path for n in normswap.inspect(model).all_norms}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.rsplit(".", 1)[0] in norm_paths:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model


@pytest.fixture(params=CASES, ids=IDS)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


def test_realised_topology_and_branch_zero(case: Case) -> None:
    model = tiny_model(case.config, case.model_class)
    converted = convert(model, case.placement)
    assert type(converted).__name__ == case.target_class
    topology = normswap.inspect(converted)
    assert (topology.placement == "parallel" and case.placement == "pre") or topology.placement == case.placement
    assert converted.config.normswap["conversion"].endswith(f"-> {case.placement}")

    report = measure_drift(model, converted, normswap.inspect(model), topology, probe_inputs(model, None, None),
                           exact=False)
    first = report.sublayers[0]
    if case.branch0_exact:
        assert first.max_abs_diff == 0.0 and first.cosine == pytest.approx(1.0)
        assert not converted.normswap_plan.notes
    else:
        assert first.max_abs_diff > 0
        assert converted.normswap_plan.notes, "an inexact branch 0 must be explained in the plan"
    # later branches drift: a placement change is not exact, and the report must show it
    assert report.output_cosine < 0.999


def test_round_trip_is_bit_identical(case: Case) -> None:
    model = tiny_model(case.config, case.model_class)
    back = convert(convert(model, case.placement), "post" if case.placement == "pre" else "pre")
    assert type(back) is type(model)
    assert tensors_equal(model.state_dict(), back.state_dict())
    inputs = probe_inputs(model, None, None)
    with torch.no_grad():
        assert torch.equal(main_output(model(**inputs)), main_output(back(**inputs)))


def test_saved_checkpoint_loads_natively_and_matches(case: Case, tmp_path: Path) -> None:
    model = tiny_model(case.config, case.model_class)
    source = tmp_path / "source"
    model.save_pretrained(source)
    result = convert_checkpoint(source, tmp_path / "out", case.placement)

    loaded = transformers.AutoModel.from_pretrained(result.destination) if "For" not in case.model_class else \
        getattr(transformers, case.target_class).from_pretrained(result.destination)
    assert type(loaded).__name__.startswith(case.target_class.removesuffix("Model"))
    in_memory = convert(model, case.placement)
    inputs = probe_inputs(model, None, None)
    with torch.no_grad():
        assert torch.equal(main_output(loaded.eval()(**inputs)), main_output(in_memory(**inputs)))
    files = {p.name for p in result.destination.iterdir()}
    assert {"config.json", "model.safetensors", "normswap_report.json", "README.md"} <= files
    assert not list(tmp_path.glob(".*normswap-tmp*"))


def main_output(output: object) -> torch.Tensor:
    for _, part in output_parts(output):  # a dual encoder's hidden states are in its text_model_output
        for name in ("logits", "last_hidden_state"):
            value = getattr(part, name, None)
            if isinstance(value, torch.Tensor):
                return value
    raise AssertionError(f"no main output in {type(output).__name__}")


@pytest.mark.parametrize("config", ["opt_pre", "opt_post"])
def test_converted_decoder_generates_the_same_with_and_without_cache(config: str) -> None:
    model = tiny_model(config, "OPTForCausalLM")
    converted = convert(model, "post" if config == "opt_pre" else "pre")
    prompt = torch.tensor([[5, 17, 42, 7]])
    with_cache = converted.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    without = converted.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert with_cache.shape == (1, 12)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize(("config", "model_class", "placement"),
                         [("bert", "BertForMaskedLM", "pre"), ("opt_post", "OPTForCausalLM", "pre")])
def test_training_step_with_gradient_checkpointing(config: str, model_class: str, placement: str) -> None:
    converted = convert(tiny_model(config, model_class), placement)
    getattr(converted, "activation_checkpointing_enable", converted.gradient_checkpointing_enable)()
    converted.train()
    optimizer = torch.optim.AdamW(converted.parameters(), lr=1e-3)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in converted.named_parameters()}
    loss = converted(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = [n for n, p in converted.named_parameters() if not torch.equal(before[n], p.detach())]
    norm_paths = [n.path for n in normswap.inspect(converted).residual_norms]
    assert any(name.startswith(tuple(norm_paths)) for name in changed)


def test_same_placement_is_a_no_op_that_says_so() -> None:
    model = tiny_model("bert", "BertModel")
    setup = plan_conversion(model, "post")
    assert setup.plan.noop and "already has post placement" in setup.plan.notes[0]
    assert convert(model, "post") is model


def test_plan_is_printable_and_serialisable() -> None:
    import json

    plan = plan_conversion(tiny_model("bert", "BertModel"), "pre").plan
    text = plan.describe()
    assert "embeddings.LayerNorm  ->  pre 0     encoder.layer.0.attention.ln" in text
    assert "post 3 encoder.layer.1.output.LayerNorm  ->  final     encoder.ln" in text
    payload = json.loads(json.dumps(plan.to_dict()))
    assert payload["exact"] is False and payload["realisation"] == "native: megatron-bert"
    assert len(payload["stacks"][0]["moves"]) == 5  # S + 1 entries for S = 4 sublayers


def test_a_layout_no_stock_family_expresses_goes_through_generated_code() -> None:
    """GPT-J has no sequential form in its code: sequential Pre-Norm was refused, and is now generated code."""
    converted = convert(tiny_model("gptj", "GPTJForCausalLM"), "pre")
    assert converted.normswap_plan.realisation.startswith("generated code: modeling_normswap_gptj.py")
    assert type(converted).__module__.startswith("normswap_generated_")


def test_a_head_apart_from_the_embeddings_stays_apart_in_a_stock_target() -> None:
    """A BERT whose MLM decoder holds weights of its own (its config ties them): the stock MegatronBERT target
    built from that config tied them again and took the word embeddings for the decoder."""
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=128)
    model = transformers.BertForMaskedLM(config).eval()
    model.cls.predictions.decoder.weight = torch.nn.Parameter(torch.randn(128, 64))
    converted = convert(model, "pre")
    assert type(converted).__name__ == "MegatronBertForMaskedLM"
    assert torch.equal(converted.get_output_embeddings().weight, model.cls.predictions.decoder.weight)
    assert converted.get_output_embeddings().weight is not converted.get_input_embeddings().weight
