"""Exact RMSNorm -> LayerNorm for models whose RMSNorms have no weight (HRM-Text, NanoChat).

The stream is carried as ``c U h`` with ``c = sqrt((d+1)/d)`` and every eps kept (docs/design.md §5), so a norm's
output is ``c U`` times the original's and may enter the stream: NanoChat normalises its embeddings, HRM-Text hands
each stack's normalised output to the other. Tiny models with every parameter (HRM-Text's frozen initial state
included) moved off its init; the written checkpoint is loaded back and its logits compared.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors import safe_open
from test_streaming_relayouts import perturbed as perturbed_model
from transformers import CONFIG_MAPPING

import normswap
from normswap.cli import main
from normswap.conversion.extra_dimension import orthonormal_lift
from normswap.conversion.verify import probe_inputs

_SMALL = {"hidden_size": 64, "intermediate_size": 128, "vocab_size": 128, "num_attention_heads": 4,
          "max_position_embeddings": 64, "rms_norm_eps": 1e-6}
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    # two stacks run in cycles; each hands its final norm's output to the other's stream; a frozen initial state
    # z_L_init and a constant embedding scale write the stream before the first layer
    "hrm_text": ("HrmTextForCausalLM", {**_SMALL, "head_dim": 16, "num_layers_per_stack": 2, "H_cycles": 2,
                                        "L_cycles": 3, "L_bp_cycles": [2], "num_hidden_layers": 16,
                                        "embedding_scale": 50.0}),
    # one weightless RMSNorm module normalises the embeddings and the last layer's output alike
    "nanochat": ("NanoChatForCausalLM", {**_SMALL, "num_hidden_layers": 2, "num_key_value_heads": 2,
                                         "final_logit_softcapping": 15.0, "bos_token_id": 0, "eos_token_id": 1,
                                         "pad_token_id": 1}),
}


def perturbed(model_type: str) -> torch.nn.Module:
    """The family's tiny model with every parameter moved off its init (zeros and ones hide bugs)."""
    class_name, fields = CONFIGS[model_type]
    torch.manual_seed(0)
    return perturbed_model(getattr(transformers, class_name)(CONFIG_MAPPING[model_type](**fields)))


def test_a_layer_norm_over_a_scaled_lifted_stream_is_the_same_multiple_of_the_lifted_rms_norm() -> None:
    """LN_eps(c U h) = c U RMSNorm_eps(h) with the same eps, even where eps dominates (tiny h), and so a weightless
    norm's output lives at the stream's own scale; with eps * d/(d+1) it does not."""
    d = 8
    lift, c = orthonormal_lift(d), math.sqrt((d + 1) / d)
    for magnitude in (1.0, 1e-3):
        h = torch.randn(5, d, dtype=torch.float64) * magnitude
        eps = 1e-6
        rms = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        stream = c * h @ lift.T
        layer_norm = torch.nn.functional.layer_norm(stream, (d + 1,), eps=eps)
        assert torch.allclose(layer_norm, c * rms @ lift.T, rtol=1e-12, atol=1e-12)
        if magnitude < 1:
            scaled_eps = torch.nn.functional.layer_norm(stream, (d + 1,), eps=eps * d / (d + 1))
            assert not torch.allclose(scaled_eps, c * rms @ lift.T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_weightless_rms_norm_model_converts_exactly_and_reloads(model_type: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    model = perturbed(model_type)
    model.save_pretrained(tmp_path / "source")
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "ln"), "--norm", "layernorm", "--exact"]) == 0
    out = capsys.readouterr().out
    assert "exact: max abs diff" in out and "weightless RMSNorm -> weightless LayerNorm (eps kept)" in out

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ln", trust_remote_code=True).eval()
    d = model.config.hidden_size
    assert loaded.config.hidden_size == d + 1 and loaded.config.rms_norm_eps == model.config.rms_norm_eps
    inputs = probe_inputs(model, None, None)
    with torch.no_grad():
        reference, actual = model(**inputs).logits, loaded(**inputs).logits
    assert float((actual - reference).abs().max()) <= 1e-4 * float(reference.abs().max())

    topology = normswap.inspect(loaded)
    norms = [*topology.stream_norms, *(stack.embedding_norm for stack in topology.stacks if stack.embedding_norm)]
    assert {norm.kind for norm in norms} == {"layernorm-noaffine"}
    with safe_open(str(tmp_path / "ln" / "model.safetensors"), "pt") as written:
        keys = set(written.keys())
    # a weightless target gets no placeholder norm tensors; the stream's writers are one dimension wider
    assert keys == set(loaded.state_dict()) and not any("norm" in key for key in keys)
    assert loaded.get_input_embeddings().weight.shape[-1] == d + 1
