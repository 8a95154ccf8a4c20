"""Exact RMSNorm -> LayerNorm for multimodal models whose projector into the stream is sized by the language
model's hidden_size inside it (docs/design.md §5).

GLM-ASR's audio projector widens to 2 x hidden_size before its last linear map; MOSS-Transcribe-Diarize's ends in
a LayerNorm over hidden_size. One dimension wider, the family's code would build those widths d+1, which no lift of
the last map makes. The generated code builds each such projector at the source's width (a copy of the config with
the source's values) and lifts its output by ``U`` as it enters the stream. Each test converts a tiny model with
every weight moved off its init, and runs features through the projector into the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from test_layer_norm_exact_reach import perturbed
from transformers import CONFIG_MAPPING

import normswap
from normswap.cli import main
from normswap.conversion.extra_dimension import convert_to_layer_norm_exact, orthonormal_lift
from normswap.conversion.verify import probe_inputs

_TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "max_position_embeddings": 64,
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def glmasr() -> torch.nn.Module:
    """GLM-ASR: linear_1 (audio -> 2 hidden_size), GELU, linear_2 (2 hidden_size -> hidden_size): ends linear."""
    audio = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 2, "num_mel_bins": 16}  # 4 frames of 32 merged into each audio token
    config = CONFIG_MAPPING["glmasr"](text_config={**_TEXT, "model_type": "llama"}, audio_config=audio,
                                      audio_token_id=127)
    torch.manual_seed(0)
    return perturbed(transformers.GlmAsrForConditionalGeneration(config))


def moss() -> torch.nn.Module:
    """MOSS-Transcribe-Diarize: linear_1, SiLU, linear_2 (hidden_size -> hidden_size), then a LayerNorm over
    hidden_size, whose eps is the language model's rms_norm_eps: ends in a norm."""
    audio = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_mel_bins": 16, "max_source_positions": 16}
    config = CONFIG_MAPPING["moss_transcribe_diarize"](text_config={**_TEXT, "model_type": "qwen3"},
                                                       audio_config=audio, audio_token_id=127)
    torch.manual_seed(0)
    return perturbed(transformers.MossTranscribeDiarizeForConditionalGeneration(config))


def _with_features(model: torch.nn.Module, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The logits with the projector's output in place of the audio tokens' embeddings, as the model's forward
    scatters them (``masked_scatter`` at ``audio_token_id``)."""
    embeddings = model.get_input_embeddings()(input_ids)
    projected = model.model.multi_modal_projector(features)
    mask = (input_ids == model.config.audio_token_id).unsqueeze(-1).expand_as(embeddings)
    embeddings = embeddings.masked_scatter(mask, projected.reshape(-1, projected.shape[-1]).to(embeddings.dtype))
    return model(inputs_embeds=embeddings).logits


def _assert_exact_with_features(model: torch.nn.Module, ends_in: type) -> torch.nn.Module:
    converted, _, report, generated = convert_to_layer_norm_exact(model, untie=True)
    assert report.exact and report.relative <= 1e-4
    assert {n.kind for n in normswap.inspect(converted).stream_norms} == {"layernorm"}
    (check,) = report.projections
    assert check.module == "model.multi_modal_projector" and check.relative is not None and check.relative < 1e-6
    assert "normswap_lifted_projector(" in generated.source
    projector, source = converted.model.multi_modal_projector, model.model.multi_modal_projector
    assert isinstance(list(projector.children())[-1], ends_in)
    for key, tensor in source.state_dict().items():  # built at the source's width: every tensor as it was
        assert torch.equal(projector.state_dict()[key], tensor), key
    inputs = probe_inputs(model, None, None)
    with torch.no_grad():
        reference, logits = model(**inputs).logits, converted(**inputs).logits
        assert float((logits - reference).abs().max() / reference.abs().max()) <= 1e-4
        input_ids = torch.randint(3, 120, (2, 10), generator=torch.Generator().manual_seed(1))
        input_ids[:, 2:6] = 127
        width = source.linear_1.in_features
        features = torch.randn(2, 4, width, generator=torch.Generator().manual_seed(2))
        reference = _with_features(model, input_ids, features)
        logits = _with_features(converted, input_ids, features)
        assert float((logits - reference).abs().max() / reference.abs().max()) <= 1e-5
        # the audio positions carry the projector's output: with other features the logits move there
        moved = _with_features(model, input_ids, features + 1.0)
        assert float((moved - reference)[:, 2:].abs().max()) > 1e-3
    return converted


def test_a_projector_ending_in_a_linear_map_over_a_wider_inner_width_is_lifted_exactly() -> None:
    """GLM-ASR was refused: one dimension wider its code builds linear_1 (130, 128) where a lift of linear_2 alone
    keeps (128, 128). Its own forward, mel features through the audio tower and the projector into the audio
    tokens' places, gives the original's logits."""
    model = glmasr()
    converted = _assert_exact_with_features(model, torch.nn.Linear)
    assert converted.model.multi_modal_projector.linear_1.weight.shape == (128, 128)
    assert converted.config.text_config.hidden_size == 65
    input_ids = torch.randint(3, 120, (2, 10), generator=torch.Generator().manual_seed(1))
    input_ids[:, 2:6] = 127  # 32 mel frames: 16 after the tower's stride, 4 audio tokens
    mel = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 32, dtype=torch.long)
    with torch.no_grad():
        reference = model(input_ids=input_ids, input_features=mel, input_features_mask=mask).logits
        logits = converted(input_ids=input_ids, input_features=mel, input_features_mask=mask).logits
        moved = model(input_ids=input_ids, input_features=mel + 1.0, input_features_mask=mask).logits
    assert float((logits - reference).abs().max() / reference.abs().max()) <= 1e-5
    assert float((moved - reference).abs().max()) > 1e-3  # the audio reaches the logits


def test_a_projector_ending_in_a_norm_is_lifted_after_the_norm() -> None:
    """MOSS-Transcribe-Diarize was refused: its projector ends in a LayerNorm over hidden_size, whose output no
    weight change lifts; built at the source's width (eps too: it reads rms_norm_eps, which the map scales for the
    stream's norms), the norm's output is lifted by U after it."""
    model = moss()
    converted = _assert_exact_with_features(model, torch.nn.LayerNorm)
    norm = converted.model.multi_modal_projector.norm
    assert norm.normalized_shape == (64,) and norm.eps == model.model.multi_modal_projector.norm.eps
    assert converted.model.language_model.norm.eps != norm.eps  # the stream's eps * d/(d+1)


def test_the_generated_lift_is_u_without_its_matrix() -> None:
    """``normswap_lift`` (in the generated file) applies the Householder reflection directly: U h, in float64."""
    from normswap.codegen.package import _LIFTED_PROJECTOR_FUNCTIONS

    namespace: dict = {"torch": torch}
    exec(_LIFTED_PROJECTOR_FUNCTIONS, namespace)  # the helper text the generated file carries
    features = torch.randn(3, 5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lifted = namespace["normswap_lift"](features, 2.0)
    assert torch.allclose(lifted, 2.0 * features @ orthonormal_lift(64).T, atol=1e-12)
    assert float(lifted.sum(-1).abs().max()) < 1e-12  # zero mean over d + 1, as the stream


def test_cli_writes_a_checkpoint_that_loads_and_lifts_the_projector(tmp_path: Path) -> None:
    """The converted checkpoint loads through the generated code, its projector at the source's width with the
    lift attached, and generate() runs."""
    model = glmasr()
    model.save_pretrained(tmp_path / "src")
    code = main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--norm", "layernorm", "--exact",
                 "--untie", "--quiet"])
    assert code == 0
    loaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "dst", trust_remote_code=True).eval()
    features = torch.randn(2, 4, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model.model.multi_modal_projector(features).double() @ orthonormal_lift(64).T
        output = loaded.model.multi_modal_projector(features)
    assert float((output - expected).abs().max() / expected.abs().max()) < 1e-6
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        tokens = loaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                                 do_sample=False, pad_token_id=0)
    assert tokens.shape == (1, 5)



def test_a_head_sized_by_the_model_configs_own_hidden_size_is_widened_with_the_language_model() -> None:
    """Ovis2's lm_head and visual embedding table take the model config's own hidden_size, equal to the text
    config's: one dimension wider the head stayed d wide and the conversion was refused. That field is widened
    too; the head reads the final norm, and the visual table (soft visual tokens times its rows, placed among the
    stream's tokens) is lifted like the token embedding."""
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14, "hidden_stride": 1, "vocab_size": 16}
    text = {key: value for key, value in _TEXT.items() if key != "head_dim"}
    config = CONFIG_MAPPING["ovis2"](text_config={**text, "model_type": "qwen2"}, vision_config=vision,
                                     hidden_size=64, vocab_size=128)
    torch.manual_seed(0)
    model = perturbed(transformers.Ovis2ForConditionalGeneration(config))
    converted, _, report, _ = convert_to_layer_norm_exact(model, untie=True)
    assert report.exact and report.relative <= 1e-4
    assert {n.kind for n in normswap.inspect(converted).stream_norms} == {"layernorm"}
    assert converted.lm_head.weight.shape == (128, 65) and converted.config.hidden_size == 65
    (check,) = report.projections
    assert check.module == "model.visual_embeddings_table" and check.relative is not None and check.relative < 1e-5
    input_ids = torch.randint(3, 120, (2, 10), generator=torch.Generator().manual_seed(1))
    visual = torch.softmax(torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(2)), dim=-1)
    with torch.no_grad():
        logits = []
        for each in (model, converted):
            embeddings = each.get_input_embeddings()(input_ids)
            embeddings[:, 2:6] = each.model.visual_embeddings_table(visual)
            logits.append(each(inputs_embeds=embeddings).logits)
    reference, actual = logits
    assert float((actual - reference).abs().max() / reference.abs().max()) <= 1e-5
