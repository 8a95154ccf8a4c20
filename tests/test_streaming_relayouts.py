"""Checkpoint tensors transformers re-lays out while loading, with operations that read the model or its config.

``Split`` sizes the pieces of a fused tensor by the model's parameters (Sarvam-MoE's grouped-query
``query_key_value``), ``PermuteForRope`` reads the head count from the config (Kimi-K2.5's vision ``wqkv``),
and Qwen3-VL-MoE transposes its experts under their own names (``Transpose(check_dims=True)`` compares with the
model's shapes). All were refused; streaming now applies them with the meta model of the config. Each case
converts a saved checkpoint with the CLI and requires the output to load as the in-memory conversion of the
model transformers loads from the source, bit for bit. A tensor the target re-lays out under its own name when it
loads is written through transformers' reverse operation (a plain Transpose, registered for the test, shows the
written layout differs from the model's and loads back to it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from test_streaming import assert_bit_identical, expected_tensors, saved_tensors
from test_streaming_fused_experts import perturbed_moe

import normswap
from normswap.cli import main

_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128, "max_position_embeddings": 64}


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every parameter moved off its init value, in eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


def sarvam_moe() -> torch.nn.Module:
    config = transformers.SarvamMoEConfig(**_TEXT, moe_intermediate_size=32, n_routed_experts=4,
                                          num_experts_per_tok=2, n_group=2, topk_group=2, first_k_dense_replace=1,
                                          pad_token_id=0, eos_token_id=1)
    return perturbed(transformers.AutoModelForCausalLM.from_config(config))


def kimi_k25() -> torch.nn.Module:
    text = {**_TEXT, "model_type": "deepseek_v3", "head_dim": 8, "num_key_value_heads": 4, "kv_lora_rank": 32,
            "q_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
            "moe_intermediate_size": 32, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2,
            "topk_group": 2, "first_k_dense_replace": 1, "bos_token_id": 0, "eos_token_id": 1}
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
              "pos_emb_height": 16, "pos_emb_width": 16}
    config = transformers.Kimi_K25Config(text_config=text, vision_config=vision, projection_hidden_size=64)
    return perturbed(transformers.Kimi_K25ForConditionalGeneration(config))


def qwen3_vl_moe() -> torch.nn.Module:
    text = {**_TEXT, "moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2,
            "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3]}}
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
              "patch_size": 8, "deepstack_visual_indexes": [0]}
    config = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision)
    return perturbed(transformers.Qwen3VLMoeForConditionalGeneration(config))


def assert_loads_as(folder: Path, auto_class: str, converted: torch.nn.Module) -> None:
    """``from_pretrained`` loads every key of the output with nothing left over, as the in-memory conversion."""
    loaded, info = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True,
                                                                     output_loading_info=True)
    assert not any(info.values()), info
    expected = converted.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key


def convert_and_compare(model: torch.nn.Module, auto_class: str, stored: str, arguments: tuple[str, ...],
                        options: dict[str, Any], tmp_path: Path) -> None:
    """Save ``model`` (``stored`` is a tensor the checkpoint has in transformers' original layout), convert it
    with the CLI, and require the in-memory conversion of the model loaded back from the checkpoint."""
    model.save_pretrained(tmp_path / "source")
    assert stored in load_file(str(tmp_path / "source" / "model.safetensors"))
    source = getattr(transformers, auto_class).from_pretrained(tmp_path / "source").eval()
    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "out"), *arguments, "--quiet"]) == 0
    converted = normswap.convert(source, **options)
    assert_bit_identical(saved_tensors(tmp_path / "out"), expected_tensors(converted))
    assert_loads_as(tmp_path / "out", auto_class, converted)


SPLIT_CASES = [(("--placement", "post"), {"placement": "post"}),
               (("--norm", "layernorm", "--exact", "--untie"), {"norm": "layernorm", "exact": True, "untie": True})]


@pytest.mark.parametrize(("arguments", "options"), SPLIT_CASES, ids=["post", "layernorm-exact"])
def test_a_split_sized_by_the_model_streams(arguments: tuple[str, ...], options: dict[str, Any],
                                            tmp_path: Path) -> None:
    """Sarvam-MoE's fused ``query_key_value`` (q 64 rows, k and v 32 each) was refused for ``Split``."""
    convert_and_compare(sarvam_moe(), "AutoModelForCausalLM", "model.layers.0.attention.query_key_value.weight",
                        arguments, options, tmp_path)


def test_a_rope_permutation_read_from_the_config_streams(tmp_path: Path) -> None:
    """Kimi-K2.5's vision tower stores q, k, v in one ``wqkv``, chunked and permuted for RoPE while loading."""
    convert_and_compare(kimi_k25(), "AutoModelForImageTextToText", "vision_tower.encoder.blocks.0.wqkv.weight",
                        ("--placement", "post"), {"placement": "post"}, tmp_path)


def test_experts_stored_transposed_under_their_own_name_stream(tmp_path: Path) -> None:
    """Qwen3-VL-MoE's published checkpoints hold each expert tensor transposed, under the model's own name:
    it was refused. Read through transformers' transpose, converted exactly, written in the model's layout,
    which its loading (it compares shapes) keeps."""
    model = qwen3_vl_moe()
    model.save_pretrained(tmp_path / "saved")
    tensors = load_file(str(tmp_path / "saved" / "model.safetensors"))
    experts = [name for name in tensors if name.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(experts) == 4
    for name in experts:
        tensors[name] = tensors[name].transpose(1, 2).contiguous()
    (tmp_path / "source").mkdir()
    save_file(tensors, str(tmp_path / "source" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "source" / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    source = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "source").eval()
    assert_bit_identical(source.state_dict(), model.state_dict())  # transformers transposes them back

    arguments = ("--norm", "layernorm", "--exact", "--untie")
    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "out"), *arguments, "--quiet"]) == 0
    converted = normswap.convert(source, norm="layernorm", exact=True, untie=True)
    assert_bit_identical(saved_tensors(tmp_path / "out"), expected_tensors(converted))
    assert_loads_as(tmp_path / "out", "AutoModelForImageTextToText", converted)


def test_a_tensor_the_target_transposes_when_loading_is_written_transposed(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """With a plain ``Transpose`` of Qwen2-MoE's router weight under its own name registered, the checkpoint holds
    it transposed. Post (generated code, which transformers does not re-lay out) and back to Pre (the stock class,
    which does) writes it transposed again, and the output loads as the original model, bit for bit."""
    from transformers import conversion_mapping
    from transformers.core_model_loading import Transpose, WeightConverter

    mapping = conversion_mapping.get_checkpoint_conversion_mapping("qwen2_moe")
    router = WeightConverter("mlp.gate.weight", "mlp.gate.weight", operations=[Transpose(0, 1)])
    monkeypatch.setitem(conversion_mapping._checkpoint_conversion_mapping_cache, "qwen2_moe", [*mapping, router])
    model = perturbed_moe("qwen2_moe")
    model.save_pretrained(tmp_path / "source")
    assert load_file(str(tmp_path / "source" / "model.safetensors"))["model.layers.0.mlp.gate.weight"].shape == (64, 4)

    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "post"), "--placement", "post", "--quiet"]) == 0
    assert saved_tensors(tmp_path / "post")["model.layers.0.mlp.gate.weight"].shape == (4, 64)
    assert main(["convert", str(tmp_path / "post"), str(tmp_path / "back"), "--placement", "pre", "--quiet",
                 "--trust-remote-code"]) == 0
    written = saved_tensors(tmp_path / "back")
    assert torch.equal(written["model.layers.1.mlp.gate.weight"], model.model.layers[1].mlp.gate.weight.T)
    assert_loads_as(tmp_path / "back", "AutoModelForCausalLM", model)


def test_an_operation_that_cannot_stream_is_still_refused_by_name(tmp_path: Path, capsys: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An operation normswap does not know (here one after Sarvam-MoE's ``Split``, as a dequantisation would
    be) is refused in one line that names it."""
    from transformers import conversion_mapping
    from transformers.core_model_loading import ConversionOps, WeightConverter

    class Dequantize(ConversionOps):
        def convert(self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str],
                    **kwargs: Any) -> dict[str, Any]:
            return input_dict

    sarvam_moe().save_pretrained(tmp_path / "source")
    mapping = [converter.copy(converter._original_source_patterns, converter._original_target_patterns,
                              operations=[*converter.operations, Dequantize()])
               if isinstance(converter, WeightConverter) and converter._original_source_patterns == ["query_key_value"]
               else converter for converter in conversion_mapping.get_checkpoint_conversion_mapping("sarvam_moe")]
    monkeypatch.setitem(conversion_mapping._checkpoint_conversion_mapping_cache, "sarvam_moe", mapping)
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "out"), "--placement", "post", "--quiet"]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "with Dequantize while loading" in error, error
    assert "query_key_value" in error and "normswap.convert()" in error
