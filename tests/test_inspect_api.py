"""The Python API: loaded models, custom models, mixed placement and the JSON contract."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from custom_modeling import ToyConfig, ToyModel
from tiny_configs import TINY_CONFIGS

import normswap


def test_loaded_model_inspects_like_its_config(write_config: Any) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(TINY_CONFIGS["llama"])
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    from_model = normswap.inspect(model)
    from_path = normswap.inspect(write_config(config))

    assert from_model.model_class == "LlamaForCausalLM"
    assert from_model.stacks[0].path == "model.layers"
    assert from_model.final_norm is not None and from_model.final_norm.path == "model.norm"
    strip = [[(s.kind, s.placement, [(n.path.removeprefix("model."), n.slot, n.kind) for n in s.norms])
              for s in layer.sublayers] for layer in from_model.layers]
    want = [[(s.kind, s.placement, [(n.path, n.slot, n.kind) for n in s.norms]) for s in layer.sublayers]
            for layer in from_path.layers]
    assert strip == want
    # inspecting works on a meta copy: the real weights are neither moved nor changed
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert all(not p.is_meta for p in model.parameters())


def test_layers_that_differ_make_a_mixed_placement() -> None:
    topology = normswap.inspect(ToyModel(ToyConfig(layouts=("post", "pre", "pre"))))
    assert [layer.placement for layer in topology.layers] == ["post", "pre", "pre"]
    assert topology.placement == "mixed"
    assert topology.summary().startswith("mixed placement, LayerNorm (eps 1e-05)")


def test_layers_without_residual_add_are_refused() -> None:
    with pytest.raises(normswap.TopologyError, match=r"ToyLayer \(layers.0\) shows no residual add"):
        normswap.inspect(ToyModel(ToyConfig(layouts=("no-residual", "no-residual"))))


def test_tracing_failure_names_the_layer_class_and_the_construct() -> None:
    with pytest.raises(normswap.TracingError) as caught:
        normswap.inspect(ToyModel(ToyConfig(layouts=("data-dependent",))))
    message = str(caught.value)
    assert "ToyLayer" in message
    assert "custom_modeling.py" in message and "if hidden_states.sum() > 0:" in message
    assert "data-dependent control flow" in message


def test_json_contract_keys(write_config: Any) -> None:
    payload = json.loads(json.dumps(normswap.inspect(write_config(TINY_CONFIGS["gpt_neox_parallel"])).to_dict()))
    assert {"model_type", "placement", "norm", "embedding_norm", "final_norm", "layers"} <= set(payload)
    assert payload["placement"] == "parallel" and payload["norm"] == "layernorm"
    assert payload["embedding_norm"] is None and payload["final_norm"] == "final_layer_norm"
    layer = payload["layers"][1]
    assert layer["index"] == 1
    (sublayer,) = layer["sublayers"]
    assert sublayer["kind"] == "parallel" and sublayer["placement"] == "parallel"
    assert [(b["kind"], b["reads"]) for b in sublayer["branches"]] == [
        ("attention", ["layers.1.input_layernorm"]), ("mlp", ["layers.1.post_attention_layernorm"])]
    assert [{k: n[k] for k in ("path", "slot", "kind", "eps")} for n in sublayer["norms"]] == [
        {"path": "layers.1.input_layernorm", "slot": "pre", "kind": "layernorm", "eps": 1e-5},
        {"path": "layers.1.post_attention_layernorm", "slot": "pre", "kind": "layernorm", "eps": 1e-5},
    ]


def test_topology_is_frozen(write_config: Any) -> None:
    topology = normswap.inspect(write_config(TINY_CONFIGS["gpt2"]))
    with pytest.raises(AttributeError):
        topology.model_type = "x"  # type: ignore[misc]


def test_topology_errors_carry_the_recipe_note(monkeypatch: pytest.MonkeyPatch) -> None:
    from normswap.detect import pipeline
    from normswap.recipe import Recipe

    note = "what the family's recipe says"
    monkeypatch.setattr(pipeline, "recipe_for", lambda model_type: Recipe("toy", (model_type,), (note,)))
    with pytest.raises(normswap.TopologyError, match=rf"shows no residual add.*recipe note for normswap-toy: {note}"):
        normswap.inspect(ToyModel(ToyConfig(layouts=("no-residual",))))


def test_parallel_branches_sharing_one_norm(write_config: Any) -> None:
    (sublayer,) = normswap.inspect(write_config(TINY_CONFIGS["gptj"])).layers[0].sublayers
    assert [(b.kind, b.reads) for b in sublayer.branches] == [("attention", ("h.0.ln_1",)), ("mlp", ("h.0.ln_1",))]
    assert [n.path for n in sublayer.norms] == ["h.0.ln_1"]


def test_post_norm_branches_read_no_pre_norm(minilm_path: Any) -> None:
    layer = normswap.inspect(minilm_path).layers[2]
    assert [b.reads for sub in layer.sublayers for b in sub.branches] == [(), ()]


def test_module_that_cannot_be_traced_inside_becomes_one_node() -> None:
    topology = normswap.inspect(ToyModel(ToyConfig(layouts=("opaque-attention",))))
    (layer,) = topology.layers
    (sublayer,) = layer.sublayers
    assert (sublayer.kind, sublayer.placement) == ("attention", "pre")
    assert [(n.path, n.slot) for n in sublayer.norms] == [("layers.0.norm", "pre")]
    assert [(n.path, n.kind) for n in layer.inner_norms] == [("layers.0.attn.q_norm", "rmsnorm")]
    assert any("layers.0.attn was traced as one node" in note for note in topology.notes)


def test_detection_passes_an_attention_mask(monkeypatch: pytest.MonkeyPatch, write_config: Any) -> None:
    """Without one, MegatronBERT (BERT's native Pre-LN target) warns the user to pass an attention mask, about
    normswap's own input; GPT-2 asks too (and stays quiet only because its config has no pad token)."""
    from transformers import PreTrainedModel

    masks: list[Any] = []
    original = PreTrainedModel.warn_if_padding_and_no_attention_mask

    def record(self: Any, input_ids: Any, attention_mask: Any) -> None:
        masks.append(attention_mask)
        original(self, input_ids, attention_mask)

    monkeypatch.setattr(PreTrainedModel, "warn_if_padding_and_no_attention_mask", record)
    assert normswap.inspect(write_config(dict(TINY_CONFIGS["megatron_bert"]))).placement == "pre"
    assert normswap.inspect(write_config(dict(TINY_CONFIGS["gpt2"]))).placement == "pre"
    assert len(masks) >= 2 and all(mask is not None for mask in masks)


def test_a_failure_in_model_code_under_a_folder_named_normswap_is_named() -> None:
    """A clone named ``normswap`` holds the venv, so transformers' files have ``/normswap/`` in their paths:
    only normswap's own package folder is skipped, not every path that contains the word."""
    from torch import nn

    from normswap.detect.trace_layer import _describe_failure

    fake = "/home/me/normswap/.venv/lib/python3.11/site-packages/transformers/models/llama/modeling_llama.py"
    code = compile("def forward():\n    raise ValueError('data-dependent branch')\n", fake, "exec")
    namespace: dict = {}
    exec(code, namespace)
    try:
        namespace["forward"]()
    except ValueError as error:
        message = _describe_failure(nn.Linear(2, 2), error)
    assert "at modeling_llama.py:2" in message and "data-dependent branch" in message
