"""RMSNorm -> LayerNorm exactly, by one extra hidden dimension (docs/design.md §5), on perturbed tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from test_rms_norm import perturbed

import normswap
from normswap.cli import main
from normswap.conversion.extra_dimension import orthonormal_lift
from normswap.conversion.verify import probe_inputs

FAMILIES = [("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"), ("qwen2", "Qwen2ForCausalLM")]


def test_lift_is_orthonormal_and_orthogonal_to_ones() -> None:
    lift = orthonormal_lift(7)
    assert lift.shape == (8, 7)
    assert torch.allclose(lift.T @ lift, torch.eye(7, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(lift.sum(0), torch.zeros(7, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize(("config", "model_class"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_rms_norm_to_layer_norm_is_exact(config: str, model_class: str) -> None:
    """Qwen2's config has no head_dim: the conversion writes the derived one into the wider config."""
    model = perturbed(config, model_class)
    converted = normswap.convert(model, norm="layernorm", exact=True)
    assert converted.normswap_report.relative <= 1e-4
    d = model.config.hidden_size
    assert converted.config.hidden_size == d + 1
    topology = normswap.inspect(converted)
    assert {n.kind for n in topology.residual_norms} == {"layernorm"}
    assert all(n.eps == pytest.approx(model.config.rms_norm_eps * d / (d + 1)) for n in topology.residual_norms)
    inputs = probe_inputs(model, None, None)
    with torch.no_grad():
        expected, actual = model(**inputs).logits, converted(**inputs).logits
    assert float((expected - actual).abs().max()) <= 1e-4 * float(expected.abs().max())


def test_refusals() -> None:
    """Structural refusals name their reason: Gemma 2's sandwich norms, a tie without --untie (T5's, which its
    config class forces, like any other, with the one table untying adds)."""
    with pytest.raises(normswap.NormswapError, match="gemma2 is not a Pre-RMSNorm model"):
        normswap.convert(perturbed("gemma2", "Gemma2ForCausalLM"), norm="layernorm", exact=True)
    with pytest.raises(normswap.NormswapError, match=r"t5 ties .*pass --untie .* adds 33 kB \(128 x 65 x 4 bytes\)"):
        normswap.convert(perturbed("t5", "T5ForConditionalGeneration"), norm="layernorm", exact=True)
    tied = perturbed("qwen2", "Qwen2ForCausalLM")
    tied.config.tie_word_embeddings = True
    with pytest.raises(normswap.NormswapError, match=r"pass --untie .* adds no table .* \(128 x 65 x 4 bytes\)"):
        normswap.convert(tied, norm="layernorm", exact=True)  # the config ties; lm_head is a tensor of its own
    tied.tie_weights()
    with pytest.raises(normswap.NormswapError, match=r"pass --untie .* adds 33 kB \(128 x 65 x 4 bytes\)"):
        normswap.convert(tied, norm="layernorm", exact=True)


def test_cli_exact_checkpoint_reloads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = perturbed("llama", "LlamaForCausalLM")
    model.save_pretrained(tmp_path / "source")
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "ln"), "--norm", "layernorm", "--exact"]) == 0
    assert "RMSNorm -> LayerNorm" in capsys.readouterr().out
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ln", trust_remote_code=True)
    assert loaded.config.hidden_size == model.config.hidden_size + 1
    inputs = probe_inputs(model, None, None)
    with torch.no_grad():
        reference = model(**inputs).logits
        assert float((loaded(**inputs).logits - reference).abs().max()) <= 1e-4 * float(reference.abs().max())


@pytest.mark.parametrize(("config", "model_class"), [("llama", "LlamaForCausalLM"), ("gemma", "GemmaForCausalLM")])
def test_approximate_rms_norm_to_layer_norm_reports_drift(config: str, model_class: str) -> None:
    model = perturbed(config, model_class)
    converted = normswap.convert(model, norm="layernorm")
    report = converted.normswap_report
    assert report.exact is False and 0.5 < report.output_cosine < 1.0 and report.next_token_kl > 0
    source, target = normswap.inspect(model), normswap.inspect(converted)
    assert {n.kind for n in target.residual_norms} == {"layernorm"}
    assert converted.config.hidden_size == model.config.hidden_size  # same width: only the norms change
    site = source.layers[0].sublayers[0].norms[0]
    norm_in = model.get_submodule(site.path)
    norm_out = converted.get_submodule(site.path)
    offset = 1.0 if site.kind == "rmsnorm-offset" else 0.0  # Gemma: (1 + w) becomes the LayerNorm weight
    assert torch.equal(norm_out.weight, norm_in.weight + offset) and not norm_out.bias.any()


def test_gemma_offset_norms_become_plain_rms_norms_exactly() -> None:
    model = perturbed("gemma", "GemmaForCausalLM")
    converted = normswap.convert(model, norm="rmsnorm")
    assert converted.normswap_report.exact and converted.normswap_report.relative <= 1e-4
    assert {n.kind for n in normswap.inspect(converted).residual_norms} == {"rmsnorm"}
    path = normswap.inspect(model).layers[0].sublayers[0].norms[0].path
    assert torch.equal(converted.get_submodule(path).weight, model.get_submodule(path).weight + 1.0)


def test_round_trip_through_both_exact_paths() -> None:
    """RMSNorm -> LayerNorm (one dimension wider) -> RMSNorm again: the outputs stay the original's."""
    model = perturbed("llama", "LlamaForCausalLM")
    back = normswap.convert(normswap.convert(model, norm="layernorm", exact=True), norm="rmsnorm")
    assert {n.kind for n in normswap.inspect(back).residual_norms} == {"rmsnorm"}
    inputs = probe_inputs(model, None, None)
    with torch.no_grad():
        reference, actual = model(**inputs).logits, back(**inputs).logits
    assert float((reference - actual).abs().max()) <= 1e-4 * float(reference.abs().max())


def test_layer_norm_round_trip_through_both_exact_paths() -> None:
    """LayerNorm -> RMSNorm -> LayerNorm by the exact paths, starting from a LayerNorm Llama (one made by the
    extra-dimension map: the stock LayerNorm families cannot take an extra dimension)."""
    layer_norm_model = normswap.convert(perturbed("llama", "LlamaForCausalLM"), norm="layernorm", exact=True)
    rms = normswap.convert(layer_norm_model, norm="rmsnorm")
    back = normswap.convert(rms, norm="layernorm", exact=True)
    assert normswap.inspect(back).norm == "layernorm"
    assert back.config.hidden_size == layer_norm_model.config.hidden_size + 1
    inputs = probe_inputs(layer_norm_model, None, None)
    with torch.no_grad():
        reference, actual = layer_norm_model(**inputs).logits, back(**inputs).logits
    assert float((reference - actual).abs().max()) <= 1e-4 * float(reference.abs().max())
