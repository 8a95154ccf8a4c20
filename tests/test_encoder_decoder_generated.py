"""Encoder-decoders through generated code (issue 17): both stacks, cross-attention a sublayer of its own.

Each stack of an encoder-decoder is rewritten as a single-stack model is: BART Post -> Pre without its
native target, T5, Pegasus Pre -> Post, FSMT Post -> Pre (T5 keeps each sublayer's norm in the sublayer's own
module, so each add takes its own norm). The output loads with the Auto class and ``trust_remote_code``,
re-inspects as the target layout, matches the in-memory conversion, generates with the cache, and converts
back to the original bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from tiny_configs import TINY_CONFIGS
from transformers import CONFIG_MAPPING

import normswap
from normswap.cli import main
from normswap.conversion.verify import probe_inputs

CASES = [  # (tiny config, class, target placement, extra flags)
    ("bart", "BartForConditionalGeneration", "pre", ["--no-native"]),
    ("t5", "T5ForConditionalGeneration", "post", []),
    ("pegasus", "PegasusForConditionalGeneration", "post", []),
    ("fsmt", "FSMTForConditionalGeneration", "pre", []),  # its attention takes its input as query=
    # no embedding norm to become the final norm, and sinusoidal positions the checkpoint does not hold
    ("marian", "MarianMTModel", "pre", []),
]
PEGASUS = {"model_type": "pegasus", "d_model": 64, "encoder_layers": 2, "decoder_layers": 2,
           "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 128,
           "decoder_ffn_dim": 128, "vocab_size": 128, "max_position_embeddings": 64, "pad_token_id": 0,
           "eos_token_id": 1, "decoder_start_token_id": 0}
FSMT = {"model_type": "fsmt", "langs": ["en", "de"], "src_vocab_size": 128, "tgt_vocab_size": 128, "d_model": 64,
        "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
        "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "max_position_embeddings": 64}


def _model(config_name: str, class_name: str) -> torch.nn.Module:
    fields = dict({"pegasus": PEGASUS, "fsmt": FSMT, "marian": {**PEGASUS, "model_type": "marian"}}.get(config_name)
                  or TINY_CONFIGS[config_name])
    config = CONFIG_MAPPING[fields.pop("model_type")](**fields)
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # norm weights away from 1, biases away from 0
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def _generate(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.generate(input_ids=inputs["input_ids"][:1], attention_mask=inputs["attention_mask"][:1],
                          max_new_tokens=4, do_sample=False, use_cache=True, decoder_start_token_id=0)


@pytest.mark.parametrize(("config", "class_name", "placement", "flags"), CASES, ids=[c[0] for c in CASES])
def test_both_stacks_convert_load_and_generate(config: str, class_name: str, placement: str, flags: list[str],
                                               tmp_path: Path) -> None:
    model = _model(config, class_name)
    source = normswap.inspect(model)
    assert len(source.stacks) == 2 and source.placement != placement
    model.save_pretrained(tmp_path / "src")
    # as saved: Marian rebuilds its sinusoidal positions on load rather than saving them
    model = getattr(transformers, class_name).from_pretrained(tmp_path / "src").eval()
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--placement", placement, *flags,
                 "--quiet"]) == 0
    assert list((tmp_path / "dst").glob("modeling_normswap_*.py")), "generated code, not a native target"
    loaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "dst", trust_remote_code=True).eval()
    topology = normswap.inspect(loaded)
    assert topology.placement == placement and len(topology.stacks) == 2
    assert any(sub.kind == "cross-attention" for layer in topology.layers for sub in layer.sublayers)

    in_memory = normswap.convert(model, placement, native=False)
    inputs = probe_inputs(model, None, None)
    with torch.no_grad():
        out, expected, original = (m(**inputs).logits for m in (loaded, in_memory, model))
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, original, atol=1e-3)  # a placement change is not exact
    generated = _generate(loaded, inputs)
    assert torch.equal(generated, _generate(in_memory, inputs)) and generated.shape[-1] > 1

    back = normswap.convert(in_memory, "post" if placement == "pre" else "pre")
    assert type(back) is type(model)
    restored = back.state_dict()
    for key, tensor in model.state_dict().items():
        assert torch.equal(restored[key], tensor), key
