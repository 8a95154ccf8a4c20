"""Streamed checkpoint conversion gives the in-memory conversion's tensors bit for bit, for every conversion.

Each case saves a perturbed tiny model, converts the folder with ``convert_checkpoint`` (streamed:
tensor by tensor from disk) and the loaded model with ``normswap.convert`` (in memory), and compares
every saved tensor and every carried norm with ``torch.equal`` and equal dtypes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_rms_norm import perturbed

import normswap
from normswap.conversion.checkpoint import CARRIED_FILE, convert_checkpoint
from normswap.io.source_weights import tied_keys

CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("bert", "BertModel", {"placement": "pre"}),
    ("megatron_bert", "MegatronBertModel", {"placement": "post"}),
    ("roberta", "RobertaModel", {"placement": "pre"}),
    ("xlm_roberta_xl", "XLMRobertaXLModel", {"placement": "post"}),
    ("bart", "BartModel", {"placement": "pre"}),
    ("mbart", "MBartModel", {"placement": "post"}),
    ("opt_pre", "OPTForCausalLM", {"placement": "post"}),
    ("opt_post", "OPTForCausalLM", {"placement": "pre"}),
    ("opt_pre", "OPTForCausalLM", {"placement": "post", "native": False}),
    ("bert", "BertForMaskedLM", {"placement": "pre", "native": False}),
    ("gpt2", "GPT2LMHeadModel", {"placement": "post"}),
    ("llama", "LlamaForCausalLM", {"placement": "post"}),
    ("qwen2", "Qwen2ForCausalLM", {"placement": "post"}),
    ("gpt_neox_parallel", "GPTNeoXForCausalLM", {"placement": "post"}),
    ("vit", "ViTModel", {"placement": "post"}),
    ("gpt2", "GPT2LMHeadModel", {"norm": "rmsnorm"}),
    ("gpt2", "GPT2LMHeadModel", {"norm": "rmsnorm", "untie": True}),
    ("bloom", "BloomForCausalLM", {"norm": "rmsnorm"}),
    ("falcon", "FalconForCausalLM", {"norm": "rmsnorm"}),
    ("whisper", "WhisperForConditionalGeneration", {"norm": "rmsnorm"}),
    ("bert", "BertModel", {"norm": "rmsnorm"}),
    ("gemma", "GemmaForCausalLM", {"norm": "rmsnorm"}),
    ("llama", "LlamaForCausalLM", {"norm": "layernorm"}),
    ("llama", "LlamaForCausalLM", {"norm": "layernorm", "exact": True}),
]


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("model*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def expected_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What saving ``model`` keeps: its state dict with each tied group saved once, under its first key."""
    tied = tied_keys(model)
    keys = list(model.state_dict())
    return {key: value for key, value in model.state_dict().items()
            if not any(keys.index(twin) < keys.index(key) for twin in tied.get(key, ()))}


def assert_bit_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


def save(model: torch.nn.Module, folder: Path, **options: Any) -> Path:
    model.save_pretrained(folder, **options)
    return folder


def case_id(case: tuple[str, str, dict[str, Any]]) -> str:
    return "-".join([case[0], *(f"{k}={v}" for k, v in case[2].items())])


@pytest.mark.parametrize(("config", "model_class", "options"), CASES, ids=[case_id(c) for c in CASES])
def test_streamed_equals_in_memory(config: str, model_class: str, options: dict[str, Any], tmp_path: Path) -> None:
    model = perturbed(config, model_class)
    if options.get("exact"):
        model.config.head_dim = model.config.hidden_size // model.config.num_attention_heads
    source = save(model, tmp_path / "source")
    result = convert_checkpoint(source, tmp_path / "out", **options)
    converted = normswap.convert(model, **options)

    assert_bit_identical(saved_tensors(tmp_path / "out"), expected_tensors(converted))
    carried = getattr(converted, "normswap_carried", None) or {}
    if carried:
        assert_bit_identical(load_file(str(tmp_path / "out" / CARRIED_FILE)), carried)
    else:
        assert not (tmp_path / "out" / CARRIED_FILE).exists()
    assert result.report.to_dict().get("verified", True)  # small models are verified


def test_round_trip_through_generated_code_streams_back_to_the_original_bits(tmp_path: Path) -> None:
    model = perturbed("llama", "LlamaForCausalLM")
    source = save(model, tmp_path / "source")
    convert_checkpoint(source, tmp_path / "post", placement="post")
    convert_checkpoint(tmp_path / "post", tmp_path / "back", placement="pre", trust_remote_code=True)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "llama"
    assert_bit_identical(saved_tensors(tmp_path / "back"), saved_tensors(source))


def test_sharded_source_and_sharded_output(tmp_path: Path) -> None:
    model = perturbed("llama", "LlamaForCausalLM")
    source = save(model, tmp_path / "source", max_shard_size="40KB")
    assert (source / "model.safetensors.index.json").is_file()
    convert_checkpoint(source, tmp_path / "out", placement="post", max_shard_size="30KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "out" / name).is_file() for name in shards)
    for name in shards:  # no shard above the limit unless it holds one larger tensor
        tensors = load_file(str(tmp_path / "out" / name))
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 30_000
    assert_bit_identical(saved_tensors(tmp_path / "out"),
                         expected_tensors(normswap.convert(model, placement="post")))


def test_legacy_bin_is_read_with_weights_only_and_written_as_safetensors(tmp_path: Path) -> None:
    model = perturbed("gpt2", "GPT2LMHeadModel")
    source = save(model, tmp_path / "source")
    (source / "model.safetensors").unlink()
    torch.save(model.state_dict(), source / "pytorch_model.bin")
    convert_checkpoint(source, tmp_path / "out", norm="rmsnorm")
    assert not list((tmp_path / "out").glob("*.bin"))
    assert_bit_identical(saved_tensors(tmp_path / "out"), expected_tensors(normswap.convert(model, norm="rmsnorm")))


def test_bf16_checkpoint_streams_in_bf16_and_dtype_overrides(tmp_path: Path) -> None:
    model = perturbed("gpt2", "GPT2LMHeadModel", torch.bfloat16)
    source = save(model, tmp_path / "source")
    convert_checkpoint(source, tmp_path / "bf16", norm="rmsnorm")
    streamed = saved_tensors(tmp_path / "bf16")
    assert {t.dtype for t in streamed.values()} == {torch.bfloat16}
    assert_bit_identical(streamed, expected_tensors(normswap.convert(model, norm="rmsnorm")))

    convert_checkpoint(source, tmp_path / "fp32", norm="rmsnorm", dtype="float32")
    widened = saved_tensors(tmp_path / "fp32")
    assert {t.dtype for t in widened.values()} == {torch.float32}
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"


def test_each_tensor_keeps_its_own_dtype(tmp_path: Path) -> None:
    model = perturbed("gpt2", "GPT2LMHeadModel")
    source = save(model, tmp_path / "source")
    tensors = load_file(str(source / "model.safetensors"))
    mixed = {k: v if "ln_" in k else v.to(torch.bfloat16) for k, v in tensors.items()}  # norms stay fp32
    save_file(mixed, str(source / "model.safetensors"), metadata={"format": "pt"})
    convert_checkpoint(source, tmp_path / "out", placement="post", verify_max_size="0")
    streamed = saved_tensors(tmp_path / "out")
    moved = {k for k in streamed if k not in mixed}
    for key, value in streamed.items():
        if key in mixed and key not in moved:
            assert value.dtype == mixed[key].dtype, key
    assert streamed["transformer.h.0.attn.c_attn.weight"].dtype == torch.bfloat16
    assert any(v.dtype == torch.float32 for k, v in streamed.items() if "ln" in k)


def test_large_models_are_streamed_without_verification_and_say_so(tmp_path: Path) -> None:
    source = save(perturbed("gpt2", "GPT2LMHeadModel"), tmp_path / "source")
    result = convert_checkpoint(source, tmp_path / "out", placement="post", verify_max_size="1KB")
    report = json.loads((tmp_path / "out" / "normswap_report.json").read_text())
    assert report["verified"] is False and "above the verification limit" in report["reason"]
    assert "not verified" in result.report.summary()


def test_many_checkpoints_convert_in_one_process_through_the_public_api(tmp_path: Path) -> None:
    """``normswap.convert_checkpoint`` is the CLI's streamed conversion; a loop pays the imports once."""
    model = perturbed("llama", "LlamaForCausalLM")
    for step in (1, 2):
        save(model, tmp_path / f"checkpoint-{step}")
    script = ("import sys, normswap; lazy = 'torch' not in sys.modules\n"
              "for step in (1, 2):\n"
              "    normswap.convert_checkpoint(f'{sys.argv[1]}/checkpoint-{step}', f'{sys.argv[1]}/post-{step}', "
              "placement='post')\n"
              "print(lazy)")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"  # importing normswap alone does not import torch
    expected = expected_tensors(normswap.convert(model, placement="post"))
    for step in (1, 2):
        assert_bit_identical(saved_tensors(tmp_path / f"post-{step}"), expected)
