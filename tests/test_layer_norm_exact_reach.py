"""Exact RMSNorm -> LayerNorm where the stream meets tensors that are not nn.Linear maps.

Fused mixture-of-experts weights (3-d, in either layout, with or without biases), raw router weights and composite
models whose stream is sized by a sub-config. The roles (reader or writer, and the stream's axis) are found by
running the model, not by names: each test converts a tiny model with every weight, norm weights included, moved
off its init, and compares the logits with the original's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from test_layer_norm_exact_families import assert_same_logits_and_tokens
from transformers import CONFIG_MAPPING

import normswap
from normswap.cli import main
from normswap.conversion.extra_dimension import convert_to_layer_norm_exact
from normswap.conversion.stream_roles import trace_stream_uses
from normswap.conversion.verify import probe_inputs

_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_DECODER = {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 128, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, **_TOKENS}
_MOE = {**_DECODER, "intermediate_size": 32, "num_experts_per_tok": 2}

# model type, class, config: each stores its experts' weights fused in 3-d tensors
MIXTURES: dict[str, tuple[str, str, Mapping[str, Any]]] = {
    # (experts, 2I, d) gate_up and (experts, d, I) down, read as F.linear; a raw router weight
    "mixtral": ("mixtral", "MixtralForCausalLM", {**_MOE, "num_local_experts": 4}),
    # the transposed layout, (experts, d, 2I) and (experts, I, d), with biases on both and on the router
    "gpt_oss": ("gpt_oss", "GptOssForCausalLM", {**_MOE, "num_local_experts": 4, "layer_types": ["sliding_attention",
                                                                                                "full_attention"]}),
    # its checkpoints keep the experts as input_linear/output_linear; a router module around a raw weight
    "granitemoe": ("granitemoe", "GraniteMoeForCausalLM", {**_MOE, "num_local_experts": 4}),
    # routed experts, a shared expert of nn.Linear maps and a 1-wide nn.Linear gate, all in one branch
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeForCausalLM", {**_MOE, "num_experts": 4, "moe_intermediate_size": 32,
                                                       "shared_expert_intermediate_size": 32}),
    # the experts read the normed stream times each token's routing score, not the norm's output itself
    "llama4_text": ("llama4_text", "Llama4ForCausalLM", {**_MOE, "num_local_experts": 2, "num_experts_per_tok": 1,
                                                         "intermediate_size_mlp": 64}),
}


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter moved off its init; norm weights checked to be nowhere 1 (a unit norm hides a missed fold)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    for norm in normswap.inspect(model).stream_norms:
        assert (model.get_submodule(norm.path).weight - 1).abs().min() > 0, norm.path
    return model.eval()


def mixture(name: str) -> torch.nn.Module:
    model_type, model_class, values = MIXTURES[name]
    torch.manual_seed(0)
    return perturbed(getattr(transformers, model_class)(CONFIG_MAPPING[model_type](**values)))


def composite() -> torch.nn.Module:
    """Qwen3-VL-MoE: the text model's hidden_size and eps live in ``text_config`` only; its embeddings are tied."""
    text = {**_MOE, "num_experts": 4, "moe_intermediate_size": 32, "rope_parameters": {
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
              "deepstack_visual_indexes": []}
    config = CONFIG_MAPPING["qwen3_vl_moe"](text_config=text, vision_config=vision)
    torch.manual_seed(0)
    return perturbed(transformers.Qwen3VLMoeForConditionalGeneration(config))


def assert_same_logits(original: torch.nn.Module, converted: torch.nn.Module) -> None:
    """Logits within 1e-4 x max|reference|, measured here rather than taken from the conversion's own report."""
    inputs = probe_inputs(original, None, None)
    with torch.no_grad():
        reference, actual = original(**inputs).logits, converted(**inputs).logits
    assert float((reference - actual).abs().max()) <= 1e-4 * float(reference.abs().max())


def assert_converted(model: torch.nn.Module, untie: bool = False) -> torch.nn.Module:
    converted, plan, report, _ = convert_to_layer_norm_exact(model, untie=untie)
    assert report.exact and report.relative <= 1e-4
    assert {n.kind for n in normswap.inspect(converted).stream_norms} == {"layernorm"}
    assert plan.kind == "layernorm" and plan.untied == untie
    assert_same_logits(model, converted)
    return converted


@pytest.mark.parametrize("name", list(MIXTURES))
def test_fused_experts_convert_exactly(name: str) -> None:
    model = mixture(name)
    fused = [key for key, tensor in model.state_dict().items() if tensor.dim() == 3]
    assert fused  # the case under test: experts in 3-d tensors
    converted = assert_converted(model)
    wider = converted.state_dict()
    for key in fused:  # exactly one axis, the stream's, one wider
        grown = [a for a, (x, y) in enumerate(zip(model.state_dict()[key].shape, wider[key].shape, strict=True))
                 if y == x + 1]
        assert len(grown) == 1, key


def test_readers_are_found_by_what_they_compute_with() -> None:
    """The router's raw weight and gate_up read the norm's output; down_proj reads what gate_up made, so it writes.
    gpt_oss's transposed layout and biases get the same roles: no name decides."""
    for name, experts in (("mixtral", "model.layers.0.mlp.experts"), ("gpt_oss", "model.layers.0.mlp.experts")):
        model = mixture(name)
        norm = "model.layers.0.post_attention_layernorm"
        uses = trace_stream_uses(model, (norm,), name)
        router = next(key for key in model.state_dict() if key.startswith("model.layers.0.mlp.")
                      and not key.startswith(experts) and key.endswith("weight"))
        assert uses.reads[router] == {norm} and uses.reads[f"{experts}.gate_up_proj"] == {norm}
        assert f"{experts}.down_proj" not in uses.reads and f"{experts}.down_proj" in uses.used


def test_composite_takes_its_width_and_eps_from_the_text_config() -> None:
    model = composite()
    assert getattr(model.config, "rms_norm_eps", None) is None  # nothing to find at the top
    with pytest.raises(normswap.NormswapError, match="ties its input and output embeddings"):
        convert_to_layer_norm_exact(model)
    converted = assert_converted(model, untie=True)
    text = converted.config.text_config
    source = model.config.text_config
    assert text.hidden_size == source.hidden_size + 1 and text.head_dim == source.head_dim
    d = source.hidden_size
    # its q_norm/k_norm (over head_dim) read rms_norm_eps too, so the field keeps its value for them and the
    # stream norms take eps * d/(d+1) in the generated code
    assert text.rms_norm_eps == source.rms_norm_eps
    attention = "model.language_model.layers.0.self_attn"
    assert converted.get_submodule(f"{attention}.q_norm").variance_epsilon == source.rms_norm_eps
    for norm in ("model.language_model.layers.0.input_layernorm", "model.language_model.norm"):
        assert converted.get_submodule(norm).eps == pytest.approx(source.rms_norm_eps * d / (d + 1))
    assert converted.config.vision_config.hidden_size == model.config.vision_config.hidden_size


def jetmoe() -> torch.nn.Module:
    """JetMoE: its layer norms take eps from a default argument, not from the config (only the final norm reads
    ``rms_norm_eps``), and its routing sizes ``torch.split`` by ``expert_size.tolist()``, which no meta run answers."""
    config = CONFIG_MAPPING["jetmoe"](**{**_MOE, "num_local_experts": 4, "kv_channels": 16})
    torch.manual_seed(0)
    return perturbed(transformers.JetMoeForCausalLM(config))


def test_norms_whose_eps_no_config_field_holds_convert_exactly() -> None:
    model = jetmoe()
    layer_norm = model.get_submodule("model.layers.0.input_layernorm")
    model.config.rms_norm_eps = 1e-5  # the final norm's, now unlike the layers' default
    model.get_submodule("model.norm").variance_epsilon = 1e-5
    assert layer_norm.variance_epsilon == 1e-6
    converted = assert_converted(model, untie=True)
    d = model.config.hidden_size
    assert converted.config.rms_norm_eps == pytest.approx(1e-5 * d / (d + 1))  # the field the final norm reads
    assert converted.get_submodule("model.layers.0.input_layernorm").eps == pytest.approx(1e-6 * d / (d + 1))
    assert converted.get_submodule("model.norm").eps == pytest.approx(1e-5 * d / (d + 1))


def test_a_model_without_lm_head_returns_its_output_through_a_projection_back_to_d(tmp_path: Path) -> None:
    """A base model's output is the final norm's, which the map makes ``U`` times the original, d+1 wide: the
    generated code projects it back by ``diag(g) U^T`` (the reader a head would have been), so last_hidden_state
    keeps its width and values. It was refused."""
    model_type, _, values = MIXTURES["mixtral"]
    base = perturbed(transformers.MixtralModel(CONFIG_MAPPING[model_type](**values)))
    converted, source = _exact_last_hidden_state(base)
    assert "self.normswap_output_projection(self.norm(" in source
    _same_through_the_cli(base, converted, tmp_path)  # its code is normswap's own: inspect needs no flag


def test_a_headless_model_whose_stacks_share_the_final_norms_code_is_refused() -> None:
    """T5Model returns the decoder's final norm output, but T5Stack applies the encoder's final norm too, whose
    output the cross-attention reads one dimension wider: one class cannot project only one of them back."""
    config = transformers.T5Config(d_model=64, d_kv=16, num_layers=2, num_heads=4, d_ff=128, vocab_size=128,
                                   decoder_start_token_id=0)
    with pytest.raises(normswap.NormswapError, match="applies another stack's too") as refusal:
        convert_to_layer_norm_exact(perturbed(transformers.T5Model(config)), untie=True)
    assert "\n" not in str(refusal.value)


def test_experts_that_never_run_are_refused_not_guessed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run as the eager loop, the experts never run on the meta device (it asks which experts the routing hit):
    whether gate_up_proj reads or writes is then unknown, and the conversion says so instead of guessing."""
    from normswap.conversion import stream_roles

    monkeypatch.setattr(stream_roles, "_meta_twin_running_experts", stream_roles.meta_twin)
    with pytest.raises(normswap.NormswapError) as refusal:
        convert_to_layer_norm_exact(mixture("mixtral"))
    message = str(refusal.value)
    assert "model.layers.0.mlp.experts.gate_up_proj" in message and "did not run" in message
    assert "\n" not in message


def test_cli_streams_fused_experts_from_per_expert_tensors(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Mixtral checkpoints keep one tensor per expert (w1/w2/w3): streamed, they are fused, mapped, written and
    loaded again by the generated code, which runs its experts at the odd width (grouped_mm cannot)."""
    model = mixture("mixtral")
    model.save_pretrained(tmp_path / "source")
    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "ln"), "--norm", "layernorm", "--exact",
                 "--quiet"]) == 0
    assert "exact: true" in capsys.readouterr().out
    config = json.loads((tmp_path / "ln" / "config.json").read_text())
    assert config["hidden_size"] == 65 and config["normswap"]["exact"] is True
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ln", trust_remote_code=True).eval()
    assert loaded.model.layers[0].mlp.experts.gate_up_proj.shape[-1] == 65
    assert_same_logits_and_tokens(model, loaded)


def test_a_stock_text_config_one_dimension_wider_is_built_without_its_head_check() -> None:
    """OmniASR keeps its language model's config as a stock LlamaConfig (``text_config``), which refuses
    hidden_size 65 with 4 heads; the generated config now builds that field as a subclass without the check."""
    config = CONFIG_MAPPING["omniasr"](
        text_config={"model_type": "llama", **_DECODER, "intermediate_size": 128},
        audio_config={"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2},
        **_TOKENS)
    with pytest.raises(Exception, match="not a multiple of the number of attention heads"):
        CONFIG_MAPPING["llama"](**{**config.text_config.to_dict(), "hidden_size": 65})  # the check lifted
    torch.manual_seed(0)
    model = perturbed(transformers.AutoModelForSeq2SeqLM.from_config(config))
    converted = assert_converted(model, untie=model.config.get_text_config().tie_word_embeddings)
    text = converted.config.text_config
    assert text.hidden_size == 65 and type(text).__name__ == "NormswapWiderLlamaConfig"
    assert isinstance(text, transformers.LlamaConfig) and text.model_type == "llama"
    assert converted.config.audio_config.hidden_size == 64


def _llava(act: str = "gelu") -> torch.nn.Module:
    text = transformers.LlamaConfig(**{**_DECODER, "intermediate_size": 128})
    vision = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8)
    config = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=127,
                                      projector_hidden_act=act)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def test_a_projector_whose_inner_width_is_hidden_size_converts_exactly_with_images() -> None:
    """LLaVA's projector is linear_1 (vision -> hidden_size), act, linear_2 (hidden_size -> stream). Its inner
    width grows by a unit that nothing reads (zero row in, zero column out) and only linear_2 is lifted. Lifting
    linear_1 as well (it too reads no norm and has an output of hidden_size) was 0.28 off with images, which the
    token probes never showed; verification now runs the projector alone, and here the whole model with images."""
    model = _llava()
    converted, _, report, _ = convert_to_layer_norm_exact(model, untie=True)
    assert [check.module for check in report.projections] == ["model.multi_modal_projector"]
    assert report.projections[0].relative is not None and report.projections[0].relative < 1e-5
    image_tokens = (32 // 8) ** 2
    input_ids = torch.randint(3, 120, (2, 6 + image_tokens), generator=torch.Generator().manual_seed(1))
    input_ids[:, 2:2 + image_tokens] = 127
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(input_ids=input_ids, pixel_values=pixels).logits
        logits = converted(input_ids=input_ids, pixel_values=pixels).logits
    assert float((logits - reference).abs().max() / reference.abs().max()) < 1e-5
    projector = converted.model.multi_modal_projector
    assert torch.all(projector.linear_1.weight[-1] == 0) and torch.all(projector.linear_2.weight[:, -1] == 0)


def test_a_projector_that_mixes_across_its_inner_width_fails_the_check() -> None:
    """Padding the inner width is exact only if nothing mixes across it; a softmax over it does, and the check
    that runs the projector alone says so instead of calling the result exact."""
    from normswap.conversion.extra_dimension import orthonormal_lift
    from normswap.conversion.projection_check import check_projections
    from normswap.errors import ExactnessError

    torch.manual_seed(0)
    lift = orthonormal_lift(4)
    for mixing, fails in ((torch.nn.GELU(), False), (torch.nn.Softmax(dim=-1), True)):
        source = torch.nn.Sequential(torch.nn.Linear(3, 4), mixing, torch.nn.Linear(4, 4))
        wider = torch.nn.Sequential(torch.nn.Linear(3, 5), mixing, torch.nn.Linear(5, 5))
        with torch.no_grad():
            wider[0].weight.copy_(torch.cat([source[0].weight, torch.zeros(1, 3)]))
            wider[0].bias.copy_(torch.cat([source[0].bias, torch.zeros(1)]))
            padded = torch.cat([source[2].weight, torch.zeros(4, 1)], dim=1)
            wider[2].weight.copy_((lift @ padded.double()).float())
            wider[2].bias.copy_((lift @ source[2].bias.double()).float())
        original, converted = torch.nn.Module(), torch.nn.Module()
        original.projector, converted.projector = source, wider
        if fails:
            with pytest.raises(ExactnessError, match="mixes across the width"):
                check_projections(original, converted, {"projector": ("projector.0", "projector.2")}, lift, 1e-4)
        else:
            (check,) = check_projections(original, converted, {"projector": ("projector.0", "projector.2")}, lift,
                                         1e-4)
            assert check.relative is not None and check.relative < 1e-6


def test_a_learned_vector_placed_among_image_features_is_lifted_with_them() -> None:
    """LLaVA-NeXT appends ``image_newline`` (a parameter of the stream's width, outside the language model) after
    each row of projected image features; it was refused as a width sized outside the language model. It is
    lifted like the features it sits among, and the whole model with an image matches the original."""
    text = transformers.LlamaConfig(**{**_DECODER, "intermediate_size": 128})
    vision = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8)
    config = transformers.LlavaNextConfig(text_config=text, vision_config=vision, image_token_index=127,
                                          image_grid_pinpoints=[[32, 32], [32, 64]])
    torch.manual_seed(0)
    model = perturbed(transformers.LlavaNextForConditionalGeneration(config))
    converted, plan, _, _ = convert_to_layer_norm_exact(model, untie=True)
    assert "model.image_newline" in plan.writers
    pixels = torch.randn(1, 3, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # base image and 2 tiles
    sizes = torch.tensor([[32, 64]])
    with torch.no_grad():
        features = model.model.get_image_features(pixels, sizes).pooler_output
        image_tokens = sum(rows.shape[0] for rows in features)
        input_ids = torch.randint(3, 120, (1, 6 + image_tokens), generator=torch.Generator().manual_seed(1))
        input_ids[:, 2:2 + image_tokens] = 127
        reference = model(input_ids=input_ids, pixel_values=pixels, image_sizes=sizes).logits
        logits = converted(input_ids=input_ids, pixel_values=pixels, image_sizes=sizes).logits
    assert float((logits - reference).abs().max() / reference.abs().max()) < 1e-5


def test_a_stem_that_moves_the_embeddings_to_the_model_device_is_measured() -> None:
    """Idefics3 runs ``embed_tokens(input_ids).to(self.device)``: on the weightless model that measures the
    embedding stem, ``self.device`` is the meta device, which took the probe's values away."""
    config = transformers.Idefics3Config(
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128, "max_position_embeddings": 64},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "image_size": 64, "patch_size": 32}, image_token_id=127)
    torch.manual_seed(0)
    model = perturbed(transformers.Idefics3ForConditionalGeneration(config))
    _, _, report, _ = convert_to_layer_norm_exact(model, untie=True)
    assert report.exact and report.relative < 1e-5


def test_a_head_input_scaled_by_a_function_of_the_width_is_folded_into_the_head() -> None:
    """MiniCPM3 divides the final hidden states by ``hidden_size / dim_model_base`` before its LM head: one
    dimension wider, the code scales by another factor, and the exact map missed by 1.5e-2 x max|reference|. The
    two codes' scales are measured and their ratio folded into the head."""
    config = transformers.MiniCPM3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
                                         kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                         vocab_size=128, max_position_embeddings=64, dim_model_base=256,
                                         scale_emb=12, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = perturbed(transformers.MiniCPM3ForCausalLM(config))
    converted, _, report, _ = convert_to_layer_norm_exact(model)
    assert report.exact and report.relative < 1e-5
    assert converted.config.hidden_size == 65 and converted.config.logits_scaling != model.config.logits_scaling


def test_a_stem_of_features_keeps_width_d_and_a_fixed_lift_starts_the_stream(tmp_path: Path) -> None:
    """An audio encoder's input is features, not token rows, and its stem ends in a GELU (conv, GELU, conv, GELU),
    which no lift of the convolutions' weights passes: U gelu(x) is no gelu(U x). The stem keeps width d and the
    generated code lifts its output by a fixed U before the first layer; the final norm's output comes back to d
    as in any headless model. It was refused (no token embedding)."""
    config = CONFIG_MAPPING["voxtral_realtime_encoder"](
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=16, intermediate_size=128,
        num_mel_bins=16, max_position_embeddings=64)
    encoder = perturbed(transformers.VoxtralRealtimeEncoder(config))
    converted, source = _exact_last_hidden_state(encoder)
    assert "= self.normswap_stream_lift(" in source
    assert converted.embedder.conv2.weight.shape == encoder.embedder.conv2.weight.shape  # the stem stays d wide
    _same_through_the_cli(encoder, converted, tmp_path)


def test_an_embedding_norm_with_a_weight_and_filtered_branches_convert_exactly() -> None:
    """Inkling's embedding normalises the raw rows with a weighted RMSNorm. Over the lifted rows a LayerNorm gives
    sqrt((d+1)/d) U RMS_1(e); the fixed map U diag(g) U^T / sqrt((d+1)/d) after it gives U (g RMS(e)), the
    stream's first value one dimension wider. Each branch's output then passes a depthwise short convolution (a
    kernel per channel, which does not commute with U): it runs d wide between a fixed U^T and U. It was refused
    (an embedding norm with a weight)."""
    from normswap.conversion.extra_dimension import orthonormal_lift

    config = CONFIG_MAPPING["inkling_text"](**{**_DECODER, "intermediate_size": 64})
    model = perturbed(transformers.AutoModelForCausalLM.from_config(config))
    converted = assert_converted(model)
    assert normswap.inspect(converted).norm == "layernorm"  # the embedding norm too
    ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        reference, actual = model.model.embed_tokens(ids), converted.model.embed_tokens(ids)
    lifted = reference.double() @ orthonormal_lift(64).T
    assert float((lifted - actual.double()).abs().max()) <= 1e-5 * float(reference.abs().max())
    assert type(converted.model.embed_tokens.embed_norm).__name__ == "NormswapLayerNorm"
    layer = converted.model.layers[0]
    assert layer.attn_sconv.conv1d.weight.shape == model.model.layers[0].attn_sconv.conv1d.weight.shape
    assert layer.normswap_stream_lift_attn_sconv.weight.shape == (65, 64)


def _exact_last_hidden_state(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The exact LayerNorm twin of a headless model, its last_hidden_state checked d wide and equal; its code."""
    converted, _, report, generated = convert_to_layer_norm_exact(model)
    assert report.exact and report.relative <= 1e-4
    inputs = probe_inputs(model, None, None)
    with torch.no_grad():
        reference, actual = model(**inputs).last_hidden_state, converted(**inputs).last_hidden_state
    assert actual.shape == reference.shape and converted.config.hidden_size == 65
    assert float((reference - actual).abs().max()) <= 1e-4 * float(reference.abs().max())
    assert normswap.inspect(converted).norm == "layernorm"
    return converted, generated.source


def _same_through_the_cli(model: torch.nn.Module, converted: torch.nn.Module, tmp_path: Path) -> None:
    """``normswap convert --norm layernorm --exact`` on the saved ``model`` writes what the API made: it loads, its
    last_hidden_state equals ``converted``'s, and it inspects as LayerNorm."""
    model.save_pretrained(tmp_path / "source")
    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "ln"), "--norm", "layernorm", "--exact",
                 "--quiet"]) == 0
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "ln", trust_remote_code=True).eval()
    inputs = probe_inputs(model, None, None)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).last_hidden_state, converted(**inputs).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
    assert normswap.inspect(str(tmp_path / "ln")).norm == "layernorm"


def test_a_stack_with_no_final_norm_hands_its_output_back_through_u_transposed(tmp_path: Path) -> None:
    """Pixtral's vision model returns its last layer's output with no final norm, so nothing takes a norm's weight
    there: one dimension wider that output is U h, and a fixed U^T after the layer loop gives h back. Its stem, a
    patch convolution whose output a weighted RMSNorm (ln_pre) normalises, keeps width d and meets the norm, a
    LayerNorm one wider, through a fixed U; U diag(g) U^T / sqrt((d+1)/d) after it starts the stream. Its
    attention sizes q/k/v/o by ``self.embed_dim = config.hidden_size``, which keeps d where the map needs it. It
    was refused (no final norm)."""
    config = CONFIG_MAPPING["pixtral"](hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
                                       intermediate_size=128, image_size=64, patch_size=16)
    model = perturbed(transformers.PixtralVisionModel(config))
    converted, source = _exact_last_hidden_state(model)
    assert "= self.normswap_stream_unlift(" in source
    assert "self.normswap_stream_map(self.ln_pre(self.normswap_stream_lift(" in source
    assert converted.patch_conv.weight.shape == model.patch_conv.weight.shape  # the stem stays d wide

    _same_through_the_cli(model, converted, tmp_path)


def test_a_layer_scale_folds_into_its_branch_and_class_tokens_stay_in_the_stem() -> None:
    """Sapiens2 multiplies the attention branch's output by a learned vector (layer scale): U (lambda * x) is no
    per-channel gain of U x, but lambda folds into the branch's writers (U diag(lambda) W) and becomes 1. Its
    patch convolution, class and register tokens stay d wide before a fixed U; its final norm sits on the model,
    beside an encoder of layer lists named like its base model prefix. It was refused (no final norm found)."""
    config = CONFIG_MAPPING["sapiens2"](hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, image_size=64, patch_size=16, num_register_tokens=2,
                                        num_key_value_heads_per_layer=[4, 4], use_qk_norm=True, use_gated_mlp=True)
    model = perturbed(transformers.Sapiens2Model(config))
    assert normswap.inspect(model).stacks[0].final_norm.path == "norm"
    converted, _ = _exact_last_hidden_state(model)
    assert torch.equal(converted.model.layer[0].layer_scale1.lambda1, torch.ones(65))
    assert converted.embeddings.cls_token.shape == model.embeddings.cls_token.shape


def test_a_modality_towers_last_norm_starts_the_stream_through_a_fixed_map() -> None:
    """Inkling's composite puts its audio tower's output (an embedding of audio tokens, then a weighted RMSNorm)
    and its vision tower's (a projection, then a weighted RMSNorm) into the stream in place of their tokens. Each
    such norm, of the stream norms' class and width outside the layers, becomes a LayerNorm over the lifted input
    and a fixed U diag(g) U^T / sqrt((d+1)/d) after it, so each tower hands the stream U times its original
    features. Token probes do not run the towers: here they run, on their own inputs. It was refused."""
    from normswap.conversion.extra_dimension import orthonormal_lift

    text = {**_DECODER, "intermediate_size": 64, "moe_intermediate_size": 64, "n_routed_experts": 4,
            "n_shared_experts": 1, "num_experts_per_tok": 2, "swa_num_attention_heads": 4,
            "swa_num_key_value_heads": 2, "swa_head_dim": 16, "d_rel": 16}
    config = CONFIG_MAPPING["inkling_mm_model"](
        text_config=text, audio_config={"text_hidden_size": 64, "mel_vocab_size": 32},
        vision_config={"hidden_size": 64, "text_hidden_size": 64, "n_layers": 2, "patch_size": 8})
    model = perturbed(transformers.AutoModelForImageTextToText.from_config(config))
    converted = assert_converted(model)
    lift = orthonormal_lift(64)
    audio = torch.randint(0, 32, (1, 5, model.config.audio_config.num_codebooks))
    pixels = torch.randn(3, 2, 8, 8, 3)  # patches of (time, height, width, channels)
    with torch.no_grad():
        pairs = [(model.model.get_audio_features(audio).last_hidden_state,
                  converted.model.get_audio_features(audio).last_hidden_state),
                 (model.model.get_image_features(pixels).pooler_output,
                  converted.model.get_image_features(pixels).pooler_output)]
    for reference, actual in pairs:
        assert float((reference.double() @ lift.T - actual.double()).abs().max()) <= 1e-5 * float(
            reference.abs().max())
    assert type(converted.model.audio_tower.norm).__name__ == "NormswapLayerNorm"
