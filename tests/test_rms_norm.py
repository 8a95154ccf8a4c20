"""LayerNorm -> RMSNorm on Pre-LN models: exact to fp rounding, checked on models whose every weight,
norm weight and norm bias is perturbed away from its init value (with init values, folding bugs hide)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers
from tiny_configs import TINY_CONFIGS
from transformers import CONFIG_MAPPING

import normswap
from normswap.cli import main
from normswap.conversion import norm_kind
from normswap.conversion.norm_kind import ExactnessError, convert_to_rms_norm
from normswap.conversion.verify import probe_inputs

FAMILIES = [
    ("gpt2", "GPT2LMHeadModel"), ("gpt_neo", "GPTNeoForCausalLM"),
    ("gpt_neox_parallel", "GPTNeoXForCausalLM"), ("gpt_neox_sequential", "GPTNeoXForCausalLM"),
    ("gptj", "GPTJForCausalLM"), ("phi", "PhiForCausalLM"), ("opt_pre", "OPTForCausalLM"),
    ("bloom", "BloomForCausalLM"), ("falcon", "FalconForCausalLM"), ("falcon_sequential", "FalconForCausalLM"),
    ("stablelm", "StableLmForCausalLM"), ("starcoder2", "Starcoder2ForCausalLM"), ("biogpt", "BioGptForCausalLM"),
    ("vit", "ViTModel"), ("whisper", "WhisperForConditionalGeneration"),
    ("cohere", "CohereForCausalLM"),  # its LayerNorm's arguments are (hidden_size, eps), with no bias
    ("olmo", "OlmoForCausalLM"),  # a LayerNorm with no weight and eps in its code
    ("nemotron", "NemotronForCausalLM"),  # LayerNorm1P: (1 + w) * n + b, so the RMSNorm's weight is 1 + w
    ("phimoe", "PhimoeForCausalLM"),  # fused experts: each expert's down_proj is a writer, the router is not
]


def perturbed(config_name: str, class_name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    fields = dict(TINY_CONFIGS[config_name])
    config = CONFIG_MAPPING[fields.pop("model_type")](**fields)
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # biases start at 0 and norm weights at 1: move them all
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.to(dtype)


def outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return norm_kind._final_outputs(out)


@pytest.mark.parametrize(("config", "model_class"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_pre_ln_to_rms_norm_is_exact_in_fp32(config: str, model_class: str) -> None:
    model = perturbed(config, model_class)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = normswap.convert(model, norm="rmsnorm")
    report = converted.normswap_report
    assert report.exact and report.relative <= 1e-4

    inputs = probe_inputs(model, None, None)
    expected, actual = outputs(model, inputs), outputs(converted, inputs)
    reference = max(float(e.abs().max()) for e in expected)
    assert max(float((e - a).abs().max()) for e, a in zip(expected, actual, strict=True)) <= 1e-4 * reference

    source, target = normswap.inspect(model), normswap.inspect(converted)
    # every LayerNorm is an RMSNorm now, weightless where the LayerNorm was (OLMo's); detection does not
    # tell an RMSNorm's bias apart, so Cohere's bias-free LayerNorms become plain "rmsnorm"
    rms_kind = {"layernorm": "rmsnorm", "layernorm-nobias": "rmsnorm", "layernorm-noaffine": "rmsnorm-noaffine",
                "layernorm-offset": "rmsnorm"}
    assert [n.kind for n in target.residual_norms] == [rms_kind[n.kind] for n in source.residual_norms]
    assert [n.eps for n in target.residual_norms] == [n.eps for n in source.residual_norms]  # eps kept
    assert target.placement == source.placement
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the source is untouched


@pytest.mark.parametrize(("config", "model_class"), [("gpt2", "GPT2LMHeadModel"), ("opt_pre", "OPTForCausalLM"),
                                                     ("bloom", "BloomForCausalLM")])
def test_bf16_stays_within_bf16_rounding(config: str, model_class: str) -> None:
    """bf16 keeps 8 significant bits and both models round at every op, so a fixed 1e-4 cannot hold. The bound:
    the conversion may differ from the bf16 original by at most 3x the bf16 original's own distance from fp32."""
    fp32 = perturbed(config, model_class)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    converted = normswap.convert(bf16, norm="rmsnorm")
    assert next(converted.parameters()).dtype == torch.bfloat16
    inputs = probe_inputs(fp32, None, None)
    noise = max(float((a.float() - b).abs().max()) for a, b in zip(outputs(bf16, inputs), outputs(fp32, inputs),
                                                                   strict=True))
    error = max(float((a.float() - b.float()).abs().max()) for a, b in zip(outputs(converted, inputs),
                                                                           outputs(bf16, inputs), strict=True))
    assert 0 < error <= 3 * noise


@pytest.mark.parametrize(("config", "model_class"), [("gpt2", "GPT2LMHeadModel"), ("opt_pre", "OPTForCausalLM")])
def test_tied_embeddings_stay_tied(config: str, model_class: str) -> None:
    model = perturbed(config, model_class)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    converted = normswap.convert(model, norm="rmsnorm")
    assert converted.get_output_embeddings().weight is converted.get_input_embeddings().weight
    assert torch.equal(converted.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_the_exactness_check_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(norm_kind, "_centre_output", lambda module, path, state: None)  # forget to centre
    with pytest.raises(ExactnessError, match=r"differs from the original by .* x max\|reference\| \(tolerance"):
        convert_to_rms_norm(perturbed("gpt2", "GPT2LMHeadModel"))


def test_post_ln_converts_approximately_with_a_drift_report() -> None:
    model = perturbed("bert", "BertForMaskedLM")
    converted = normswap.convert(model, norm="rmsnorm")
    report = converted.normswap_report
    assert report.exact is False and 0.5 < report.output_cosine < 1.0
    assert report.sublayers[0].max_abs_diff > 0  # even branch 0 reads an RMS-normalised embedding now
    topology = normswap.inspect(converted)
    assert topology.placement == "post" and topology.norm == "rmsnorm"
    assert torch.equal(converted.bert.embeddings.LayerNorm.bias, model.bert.embeddings.LayerNorm.bias)  # kept


def test_refusals() -> None:
    with pytest.raises(normswap.NormswapError, match="exact only where every norm reads the residual stream"):
        convert_to_rms_norm(perturbed("bert", "BertModel"))
    llama = perturbed("llama", "LlamaForCausalLM")  # RMSNorms already: nothing to do, as for a placement it has
    assert normswap.convert(llama, norm="rmsnorm") is llama
    with pytest.raises(normswap.NormswapError, match="pass placement=, norm= or both"):
        normswap.convert(perturbed("gpt2", "GPT2LMHeadModel"))


def test_cli_checkpoint_reloads_and_reproduces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = perturbed("gpt2", "GPT2LMHeadModel")
    model.save_pretrained(tmp_path / "source")
    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "rms"), "--norm", "rmsnorm"]) == 0
    out = capsys.readouterr().out
    assert "LayerNorm -> RMSNorm" in out and "exact: max abs diff" in out
    report = json.loads((tmp_path / "rms" / "normswap_report.json").read_text())
    assert report["exact"] is True and report["relative"] <= 1e-4 and report["normswap"]["exact"] is True
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "rms", trust_remote_code=True)
    inputs = probe_inputs(model, None, None)
    in_memory = normswap.convert(model, norm="rmsnorm")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, in_memory(**inputs).logits)
    assert {n.kind for n in normswap.inspect(loaded).residual_norms} == {"rmsnorm"}
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "source"), str(tmp_path / "x")])  # neither --placement nor --norm


def test_ln_bias_folds_into_reader_biases_where_they_exist() -> None:
    model = perturbed("gpt_neo", "GPTNeoForCausalLM")  # attention q/k/v have no bias, the MLP's c_fc has one
    converted, plan, report, _ = convert_to_rms_norm(model)
    assert plan.folded == ("transformer.h.0.ln_2", "transformer.h.1.ln_2")
    for layer in (0, 1):
        folded, kept = converted.transformer.h[layer].ln_2, converted.transformer.h[layer].ln_1
        assert torch.equal(folded.bias, torch.zeros_like(folded.bias))
        assert torch.equal(kept.bias, model.transformer.h[layer].ln_1.bias)  # no bias to take it: kept
        original_fc, beta = model.transformer.h[layer].mlp.c_fc, model.transformer.h[layer].ln_2.bias.double()
        expected = original_fc.bias.double() + original_fc.weight.double() @ beta
        assert torch.allclose(converted.transformer.h[layer].mlp.c_fc.bias.double(), expected, atol=1e-6)
    assert report.relative <= 1e-4


@pytest.mark.parametrize(("config", "model_class"), [("gpt2", "GPT2LMHeadModel"), ("opt_pre", "OPTForCausalLM")])
def test_untie_is_exact_too(config: str, model_class: str) -> None:
    model = perturbed(config, model_class)
    converted = normswap.convert(model, norm="rmsnorm", untie=True)
    assert converted.normswap_report.relative <= 1e-4
    assert converted.get_output_embeddings().weight is not converted.get_input_embeddings().weight
    assert converted.config.tie_word_embeddings is False
    rows = converted.get_input_embeddings().weight.detach().double()
    assert float(rows.mean(-1).abs().max()) < 1e-6  # centred rows ...
    original_head = model.get_output_embeddings().weight
    assert torch.equal(converted.get_output_embeddings().weight, original_head)  # ... not lm_head


def test_untie_refuses_an_embedding_layer_norm_up_front() -> None:
    """No weight change centres the output of BLOOM's embedding LayerNorm: refused before any work, saying why."""
    with pytest.raises(normswap.NormswapError, match=r"word_embeddings_layernorm .*no weight change can undo"):
        normswap.convert(perturbed("bloom", "BloomForCausalLM"), norm="rmsnorm", untie=True)


@pytest.mark.parametrize(("config", "model_class"), [
    ("bloom", "BloomForCausalLM"), ("roberta_prelayernorm", "RobertaPreLayerNormForMaskedLM"),
    ("mbart", "MBartForConditionalGeneration"),
])
def test_an_embedding_layer_norm_becomes_rms_norm_too(config: str, model_class: str) -> None:
    """A --norm rmsnorm result has no LayerNorm left: the embedding norm's input is centred in code."""
    model = perturbed(config, model_class)
    converted = normswap.convert(model, norm="rmsnorm")
    assert converted.normswap_report.exact and converted.normswap_report.relative <= 1e-4
    source, target = normswap.inspect(model), normswap.inspect(converted)
    assert any(stack.embedding_norm for stack in source.stacks)
    assert source.norm == "layernorm" and target.norm == "rmsnorm"  # every norm, the embedding norms included


def test_weightless_layer_norm_becomes_weightless_rms_norm() -> None:
    model = perturbed("olmo", "OlmoForCausalLM")  # OlmoLayerNorm: no weight, no bias, eps 1e-5 in its code
    converted = normswap.convert(model, norm="rmsnorm")
    assert converted.normswap_report.relative <= 1e-4
    norms = normswap.inspect(converted).residual_norms
    assert {(n.kind, n.eps) for n in norms} == {("rmsnorm-noaffine", 1e-5)}


def test_a_model_with_no_layer_norm_or_rms_norm_has_nothing_to_change() -> None:
    """LeViT normalises with BatchNorm only: --norm rmsnorm and --norm layernorm --exact are no-ops that say so
    (they were refusals that called it 'a model whose norms are RMSNorms' or 'with norms after their sublayers')."""
    from normswap.conversion.norm_change import plan_norm_kind

    config = transformers.LevitConfig(image_size=32, hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3],
                                      depths=[1, 1, 1], key_dim=[8, 8, 8], patch_size=16,
                                      down_ops=[["Subsample", 8, 1, 4, 2, 2], ["Subsample", 8, 2, 4, 2, 2]])
    model = transformers.LevitModel(config).eval()
    for norm in ("rmsnorm", "layernorm"):
        setup = plan_norm_kind(model, norm, exact=True)
        assert setup.program is None and setup.plan.realisation == "none"
        assert "levit has no LayerNorm or RMSNorm" in setup.plan.notes[0] and "BatchNorm2d" in setup.plan.notes[0]
        assert normswap.convert(model, norm=norm) is model
    with pytest.raises(normswap.NormswapError, match=r"levit has no norm on its residual stream \(nor a LayerNorm or "
                                                     r"RMSNorm in its branches"):
        normswap.convert(model, "pre")  # adding norms is another conversion (a calibrated stand-in)
    model.encoder.stages[0].layers[0].extra = torch.nn.LayerNorm(16)  # a LayerNorm inspection does not place
    with pytest.raises(normswap.NormswapError):
        plan_norm_kind(model, "rmsnorm")


def test_a_model_inspect_refuses_with_no_layer_norm_or_rms_norm_has_nothing_to_change_either() -> None:
    """MobileNetV2 (convolutions and BatchNorms, no residual stream inspect can describe): --norm is a no-op that
    says so, not the inspection's refusal; a model that normalises otherwise (an L2 norm) keeps the refusal."""
    from normswap.conversion.norm_change import plan_norm_kind

    model = transformers.MobileNetV2Model(transformers.MobileNetV2Config(image_size=32, depth_multiplier=0.25)).eval()
    with pytest.raises(normswap.NormswapError, match="no residual add"):
        normswap.inspect(model)
    setup = plan_norm_kind(model, "rmsnorm")
    assert setup.program is None and "mobilenet_v2 has no LayerNorm or RMSNorm anywhere" in setup.plan.notes[0]

    class L2Norm(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(x, dim=1)

    model.extra = L2Norm()
    with pytest.raises(normswap.NormswapError, match="no residual add"):
        plan_norm_kind(model, "rmsnorm")
