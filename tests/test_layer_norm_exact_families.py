"""Exact RMSNorm -> LayerNorm decided by building the wider model, not by a list of families.

Every family is either converted exactly (logits within 1e-4 x max|reference| in fp32, the same greedy tokens)
or refused with a structural reason; tiny models with every weight, norm weights included, moved off its init.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import CONFIG_MAPPING

import normswap
from normswap.cli import main
from normswap.codegen.package import family_model_type
from normswap.conversion.embedding_stem import EmbeddingStem, measure_embedding_stem
from normswap.conversion.extra_dimension import convert_to_layer_norm_exact, orthonormal_lift
from normswap.conversion.verify import probe_inputs
from normswap.errors import ExactnessError

_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_GQA = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, **_TOKENS}
_T5 = {"d_model": 64, "d_kv": 16, "num_layers": 2, "num_heads": 4, "d_ff": 128, "vocab_size": 128,
       "decoder_start_token_id": 0}  # as T5's checkpoints set it: generate() starts the decoder there
_CPMANT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "dim_head": 16, "dim_ff": 128,
           "vocab_size": 128, "prompt_length": 8, "prompt_types": 4, "segment_types": 8}
EXACT = "exact"


@dataclass(frozen=True)
class Family:
    """A tiny model of one family and what the exact path must do with it: convert (EXACT) or refuse (a regex)."""

    model_type: str
    model_class: str
    outcome: str
    config: Mapping[str, Any] = field(default_factory=dict)
    untie: bool = False  # the family ties its embeddings by default


FAMILIES = [
    Family("llama", "LlamaForCausalLM", EXACT, _GQA),
    Family("qwen2", "Qwen2ForCausalLM", EXACT, _GQA),  # no head_dim in its config: derived, then written
    Family("qwen3", "Qwen3ForCausalLM", EXACT, {**_GQA, "head_dim": 16}),  # q_norm/k_norm stay over head_dim
    Family("phi3", "Phi3ForCausalLM", EXACT, _GQA),  # fused qkv_proj and gate_up_proj, no head_dim in its config
    Family("glm", "GlmForCausalLM", EXACT, {**_GQA, "head_dim": 16}),  # partial rotary
    Family("granite", "GraniteForCausalLM", EXACT, {**_GQA, "embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                                                    "attention_multiplier": 0.2, "logits_scaling": 2.0}),
    Family("smollm3", "SmolLM3ForCausalLM", EXACT, _GQA, untie=True),
    Family("gemma", "GemmaForCausalLM", EXACT, {**_GQA, "head_dim": 16}, untie=True),  # sqrt(d) scale, 1 + w norms
    # each sizes an inner width (heads * head_dim) by hidden_size: o_proj's input, q_norm/k_norm, attn_sub_norm
    Family("helium", "HeliumForCausalLM", EXACT, {**_GQA, "head_dim": 16}),
    Family("olmoe", "OlmoeForCausalLM", EXACT, {**_GQA, "num_experts": 4, "num_experts_per_tok": 2}),
    Family("bitnet", "BitNetForCausalLM", EXACT, _GQA),
    # its vision tower's position embedding, inside the model but sized by the vision config, writes no stream
    Family("phi4_multimodal", "Phi4MultimodalForCausalLM", EXACT, {
        **_GQA, "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                                  "num_hidden_layers": 2},
        "audio_config": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_blocks": 2}}),
    Family("gemma2", "Gemma2ForCausalLM", r"gemma2 is not a Pre-RMSNorm model \(Sandwich-Norm",
           {**_GQA, "head_dim": 16}, untie=True),
    Family("llama4_text", "Llama4ForCausalLM", EXACT,  # fused experts, a per-token factor on a reader's input
           {**_GQA, "head_dim": 16, "num_local_experts": 2, "intermediate_size_mlp": 128}),
    # both stacks map; its config class ties lm_head to the embedding whatever it is given, and it scales what
    # lm_head reads by d_model ** -0.5
    Family("t5", "T5ForConditionalGeneration", EXACT, _T5, untie=True),
    # prepends prompt tokens numbered past its vocabulary and adds a segment embedding before the first layer
    Family("cpmant", "CpmAntForCausalLM", EXACT, _CPMANT, untie=True),
]


def perturbed(family: Family, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The family's tiny model with every parameter moved off its init (norm weights at 1 or 0 hide bugs)."""
    config = CONFIG_MAPPING[family.model_type](**family.config)
    torch.manual_seed(0)
    model = getattr(transformers, family.model_class)(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.to(dtype)


def family(model_type: str) -> Family:
    return next(f for f in FAMILIES if f.model_type == model_type)


def assert_same_logits_and_tokens(original: torch.nn.Module, converted: torch.nn.Module) -> float:
    """Logits within 1e-4 x max|reference| and the same greedy continuation; returns the relative difference."""
    inputs = probe_inputs(original, None, None)
    with torch.no_grad():
        reference, actual = original(**inputs).logits, converted(**inputs).logits
    relative = float((reference - actual).abs().max()) / float(reference.abs().max())
    assert relative <= 1e-4, relative
    prompt = inputs["input_ids"][:2, :8]
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(original.generate(prompt, **options), converted.generate(prompt, **options))
    return relative


@pytest.mark.parametrize("case", FAMILIES, ids=[f.model_type for f in FAMILIES])
def test_exact_or_refused_for_a_structural_reason(case: Family) -> None:
    model = perturbed(case)
    if case.outcome != EXACT:
        with pytest.raises(normswap.NormswapError, match=case.outcome) as refusal:
            convert_to_layer_norm_exact(model, untie=case.untie)
        assert not isinstance(refusal.value, ExactnessError)  # structural, decided before any weight is computed
        assert "\n" not in str(refusal.value)
        return
    d = model.config.hidden_size
    converted, plan, report, _ = convert_to_layer_norm_exact(model, untie=case.untie)
    assert report.exact and report.relative <= 1e-4
    assert converted.config.hidden_size == d + 1 and plan.untied == case.untie
    assert {n.kind for n in normswap.inspect(converted).stream_norms} == {"layernorm"}
    if case.untie:
        assert converted.get_output_embeddings().weight is not converted.get_input_embeddings().weight
        # the config unties the head where its flag ties nothing else; T5's flag also ties the stacks'
        # embed_tokens to shared, which stay tied (the head leaves the generated class's tied weights instead)
        ties = converted.get_expanded_tied_weights_keys(all_submodels=True)
        assert converted.config.tie_word_embeddings is bool(ties)
    assert_same_logits_and_tokens(model, converted)


def test_qwen2_and_phi3_configs_have_no_head_dim_and_get_one_written() -> None:
    """The families that derive head_dim from hidden_size keep their head size one dimension wider."""
    for name in ("qwen2", "phi3"):
        model = perturbed(family(name))
        assert "head_dim" not in model.config.to_dict()
        converted = convert_to_layer_norm_exact(model)[0]
        assert converted.config.head_dim == 16 and converted.config.hidden_size == 65


def test_embedding_scale_is_measured_on_each_width() -> None:
    """Gemma scales its embeddings by sqrt(hidden_size) in code, Granite by a config multiplier, Llama not at all."""
    expected = {"gemma": math.sqrt, "granite": lambda d: 3.0, "llama": lambda d: 1.0}
    for name, scale in expected.items():
        case = family(name)
        for width in (64, 100):  # the stock configs want a multiple of the heads; the fold test covers d + 1
            config = CONFIG_MAPPING[case.model_type](**{**case.config, "head_dim": 16, "hidden_size": width})
            with torch.device("meta"):
                meta = getattr(transformers, case.model_class)(config)
            stem = measure_embedding_stem(meta, "model.layers.0", name)
            assert stem.scale == pytest.approx(scale(width), rel=1e-6) and stem.mean_gain == 0.0, name


def test_tokens_and_embeddings_the_code_adds_leave_the_token_scale_measurable() -> None:
    """CPM-Ant prepends prompt tokens numbered past its vocabulary and adds a segment embedding: the probe looks
    them up as zero rows, and the stem is the token rows' own (the probe table once lacked those ids)."""
    case = family("cpmant")
    with torch.device("meta"):
        meta = transformers.CpmAntForCausalLM(CONFIG_MAPPING[case.model_type](**case.config))
    assert measure_embedding_stem(meta, "cpmant.encoder.layers.0", "cpmant") == EmbeddingStem(1.0)


def test_a_stem_that_centres_folds_its_centring_into_the_rows() -> None:
    """Code that centres the stream (normswap's LayerNorm -> RMSNorm output) sees zero-mean lifted rows: the
    centring of the original rows has to be in the new ones."""
    rows = torch.randn(5, 8, dtype=torch.float64)
    lift = orthonormal_lift(8)
    centred = EmbeddingStem(2.0, -2.0 / 8).fold(rows, EmbeddingStem(4.0), lift)
    assert torch.allclose(centred, 2.0 * (rows - rows.mean(-1, keepdim=True)) @ lift.T / 4.0)


def test_gemma_in_bf16_stays_within_bf16_rounding() -> None:
    """The scale is measured in float32 and folded in float64; the bf16 result is within bf16's own rounding."""
    converted, _, report, _ = convert_to_layer_norm_exact(perturbed(family("gemma"), torch.bfloat16), untie=True)
    assert report.exact and report.relative <= report.tolerance
    assert converted.dtype == torch.bfloat16


def test_gemma_fails_without_folding_the_embedding_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fold is what makes Gemma exact: measured as 1 on both widths, the check refuses with its figure."""
    from normswap.conversion import extra_dimension

    monkeypatch.setattr(extra_dimension, "measure_embedding_stem", lambda *args: EmbeddingStem(1.0))
    with pytest.raises(ExactnessError, match="differs from the original"):
        convert_to_layer_norm_exact(perturbed(family("gemma")), untie=True)


@pytest.mark.parametrize(("dtype", "figure"), [(torch.float32, "adds 33 kB (128 x 65 x 4 bytes)"),
                                               (torch.bfloat16, "adds 17 kB (128 x 65 x 2 bytes)")])
def test_tied_embeddings_are_refused_with_the_cost_of_untie(dtype: torch.dtype, figure: str) -> None:
    for name in ("gemma", "smollm3"):
        with pytest.raises(normswap.NormswapError) as refusal:
            convert_to_layer_norm_exact(perturbed(family(name), dtype))
        message = str(refusal.value)
        assert f"{name} ties its input and output embeddings" in message and "--untie" in message
        assert figure in message and "\n" not in message


def test_untie_reaches_the_exact_path_through_the_api() -> None:
    model = perturbed(family("gemma"))
    converted = normswap.convert(model, norm="layernorm", exact=True, untie=True)
    assert converted.normswap_plan.untied and converted.config.tie_word_embeddings is False
    assert_same_logits_and_tokens(model, converted)


def _load(folder: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


def test_cli_converts_a_phi3_checkpoint_that_reloads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Phi3 (no head_dim in its config; refused by name before) from a folder, streamed and verified."""
    model = perturbed(family("phi3"))
    model.save_pretrained(tmp_path / "source")
    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "ln"), "--norm", "layernorm", "--exact",
                 "--quiet"]) == 0
    assert "exact: true" in capsys.readouterr().out
    config = json.loads((tmp_path / "ln" / "config.json").read_text())
    assert config["hidden_size"] == 65 and config["head_dim"] == 16 and config["normswap"]["exact"] is True
    loaded = _load(tmp_path / "ln")
    assert family_model_type(loaded.config.model_type) == "phi3" != loaded.config.model_type
    assert_same_logits_and_tokens(model, loaded)


def test_cli_tied_checkpoint_needs_untie(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Gemma ties its embeddings: refused with the cost of --untie, converted exactly with it."""
    model = perturbed(family("gemma"))
    model.save_pretrained(tmp_path / "source")
    command = ["convert", str(tmp_path / "source"), str(tmp_path / "ln"), "--norm", "layernorm", "--exact", "--quiet"]
    assert main(command) == 1
    assert "--untie" in capsys.readouterr().err and not (tmp_path / "ln").exists()

    assert main([*command, "--untie"]) == 0
    config = json.loads((tmp_path / "ln" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["hidden_size"] == 65
    with safe_open(tmp_path / "ln" / "model.safetensors", "pt") as written:
        assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(written.keys())
    assert_same_logits_and_tokens(model, _load(tmp_path / "ln"))
