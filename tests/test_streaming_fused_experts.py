"""Mixture-of-experts checkpoints stream: per-expert tensors on disk, fused experts in the model.

transformers 5 fuses each MoE layer's experts into ``experts.gate_up_proj`` and ``experts.down_proj`` while
loading, and its ``save_pretrained`` writes them back one tensor per expert. Each case saves a perturbed tiny
MoE model that way, converts the folder with the CLI (streamed: the experts are fused by transformers' own
conversion mapping as the conversion reads them) and the model with ``normswap.convert`` (in memory), and
requires the same tensors bit for bit, an output that ``from_pretrained`` loads with every key in place, and
memory bounded by a few fused tensors.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from test_streaming import assert_bit_identical, expected_tensors, saved_tensors

import normswap
from normswap.cli import main
from normswap.conversion.checkpoint import convert_checkpoint
from normswap.io.source_weights import CheckpointWeights

_DECODER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 128, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 48}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2}),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}
RMS_NORM_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
CASES: list[tuple[str, tuple[str, ...]]] = [
    *[(family, ("--norm", "layernorm")) for family in RMS_NORM_FAMILIES],
    *[(family, ("--placement", "post")) for family in [*RMS_NORM_FAMILIES, "phimoe"]],
    ("phimoe", ("--norm", "rmsnorm")),  # exact: each expert's down_proj is centred
]


def perturbed_moe(family: str, **overrides: Any) -> torch.nn.Module:
    """A tiny MoE model whose every weight, norm weight and bias is moved off its init value (as in
    ``test_rms_norm.perturbed``)."""
    config_class, model_class, fields = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**_DECODER, **fields, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def options_of(arguments: tuple[str, ...]) -> dict[str, str]:
    """``("--norm", "layernorm")`` -> ``{"norm": "layernorm"}``, for ``normswap.convert``."""
    return {flag.removeprefix("--"): value for flag, value in zip(arguments[::2], arguments[1::2], strict=True)}


def save_per_expert(model: torch.nn.Module, folder: Path, **options: Any) -> Path:
    """``save_pretrained``, which writes the experts one tensor each (transformers' original layout)."""
    model.save_pretrained(folder, **options)
    stored = set().union(*(load_file(str(file)).keys() for file in folder.glob("model*.safetensors")))
    assert not any(name.endswith("experts.gate_up_proj") for name in stored)
    assert any(".experts.0." in name for name in stored)
    return folder


def assert_loads_as(folder: Path, converted: torch.nn.Module) -> None:
    """``from_pretrained`` loads every key of the output with nothing left over, as the in-memory conversion."""
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    expected = converted.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize(("family", "arguments"), CASES, ids=[f"{c[0]}{'-'.join(c[1])}" for c in CASES])
def test_per_expert_checkpoint_streams_to_the_in_memory_conversion(family: str, arguments: tuple[str, ...],
                                                                  tmp_path: Path, caplog: Any) -> None:
    model = perturbed_moe(family)
    source = save_per_expert(model, tmp_path / "source")
    assert main(["convert", str(source), str(tmp_path / "out"), *arguments]) == 0
    converted = normswap.convert(model, **options_of(arguments))

    assert_bit_identical(saved_tensors(tmp_path / "out"), expected_tensors(converted))
    assert_loads_as(tmp_path / "out", converted)
    assert "ignoring" not in caplog.text  # every per-expert tensor was used


def test_sharded_and_already_fused_checkpoints_convert_alike(tmp_path: Path) -> None:
    """Experts split over shards fuse across them, in transformers' order (expert 10 after expert 9, where the
    files list it after expert 1); a checkpoint saved fused (``save_original_format=False``) is read as it is.
    Both give the in-memory conversion."""
    model = perturbed_moe("mixtral", num_local_experts=12)
    sharded = save_per_expert(model, tmp_path / "sharded", max_shard_size="100KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    expected = expected_tensors(normswap.convert(model, placement="post"))
    for source in (sharded, tmp_path / "fused"):
        convert_checkpoint(source, tmp_path / f"{source.name}-post", placement="post")
        assert_bit_identical(saved_tensors(tmp_path / f"{source.name}-post"), expected)


def test_round_trip_through_generated_code_gives_back_the_fused_original(tmp_path: Path) -> None:
    """Post and back to Pre is exact: the output holds the original model's fused experts bit for bit."""
    model = perturbed_moe("qwen2_moe")
    source = save_per_expert(model, tmp_path / "source")
    assert main(["convert", str(source), str(tmp_path / "post"), "--placement", "post"]) == 0
    assert main(["convert", str(tmp_path / "post"), str(tmp_path / "back"), "--placement", "pre",
                 "--trust-remote-code"]) == 0
    assert_bit_identical(saved_tensors(tmp_path / "back"), expected_tensors(model))


def test_memory_holds_a_few_fused_tensors_not_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor read from the checkpoint (each expert, each fused tensor) is counted while it lives:
    at most four of the largest fused tensor at once, where the experts are eighteen of them."""
    model = perturbed_moe("mixtral", num_hidden_layers=12)
    source = save_per_expert(model, tmp_path / "source")
    live, peak = [0], [0]
    read = CheckpointWeights.read

    def counted(weights: CheckpointWeights, name: str) -> torch.Tensor:
        tensor = read(weights, name)
        size = tensor.numel() * tensor.element_size()
        live[0] += size
        peak[0] = max(peak[0], live[0])
        weakref.finalize(tensor, lambda: live.__setitem__(0, live[0] - size))
        return tensor

    monkeypatch.setattr(CheckpointWeights, "read", counted)
    convert_checkpoint(source, tmp_path / "out", norm="layernorm", verify_max_size="0")
    largest = max(value.numel() * value.element_size() for value in model.state_dict().values())
    experts = sum(value.numel() * value.element_size() for key, value in model.state_dict().items()
                  if ".experts." in key)
    assert experts >= 18 * largest
    assert 0 < peak[0] <= 4 * largest


def test_a_missing_expert_is_named_with_the_fused_tensor(tmp_path: Path, capsys: Any) -> None:
    source = save_per_expert(perturbed_moe("mixtral"), tmp_path / "source")
    tensors = load_file(str(source / "model.safetensors"))
    kept = {name: value for name, value in tensors.items() if "layers.1.block_sparse_moe.experts.3." not in name}
    save_file(kept, str(source / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["convert", str(source), str(tmp_path / "out"), "--placement", "post"]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "'model.layers.1.mlp.experts.gate_up_proj' (fused from 6 tensors" in error
    assert "(3, 256, 64)" in error and "(4, 256, 64)" in error


def test_experts_that_do_not_stack_are_named(tmp_path: Path, capsys: Any) -> None:
    source = save_per_expert(perturbed_moe("qwen3_moe"), tmp_path / "source")
    tensors = load_file(str(source / "model.safetensors"))
    tensors["model.layers.0.mlp.experts.2.up_proj.weight"] = torch.ones(24, 64)
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["convert", str(source), str(tmp_path / "out"), "--norm", "layernorm"]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "fuses into 'model.layers.0.mlp.experts.gate_up_proj' do not fit together" in error
    assert "'model.layers.0.mlp.experts.2.up_proj.weight' has shape (24, 64) where the other 3 have (32, 64)" in error


def test_a_checkpoint_tensor_split_into_several_streams_piece_by_piece(tmp_path: Path) -> None:
    """DINOv2 with SwiGLU stores gate and up in one tensor (``weights_in``) that transformers splits with Chunk:
    it was refused. Each piece is now built from the whole and converted, and the output (under the model's
    names, which load) equals the in-memory conversion."""
    config = transformers.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128, image_size=32, patch_size=8, use_swiglu_ffn=True)
    torch.manual_seed(0)
    model = transformers.Dinov2Model(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(tmp_path / "source")
    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "out"), "--placement", "post", "--quiet"]) == 0
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    expected = normswap.convert(model, placement="post").eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).last_hidden_state,
                           expected(pixel_values=pixels).last_hidden_state)
    assert normswap.inspect(loaded).placement == "post"
