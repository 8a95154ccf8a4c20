"""Layers that add to the stream in place at masked positions (``h[mask] += F(N(h[mask]))``, HiggsAudio v2's
text and audio MLPs): the tracer records the assignment as a node later reads depend on, and detection reads it
as a residual add. Tracing failed with "'MetaProxy' object does not support item assignment"."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx as fx
import transformers
from test_detect_reach import _perturbed
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

import normswap
from normswap.detect.capture import LayerCall
from normswap.detect.trace_layer import WRAPPED_LAYER, _describe_failure, trace_layer

HIDDEN, LAYERS, VOCAB, TOKENS = 32, 2, 64, 10


class _MaskedAddLayer(nn.Module):
    """Pre-LN attention-free layer: a plain sublayer, then an MLP added at the masked positions only; with
    ``post``, a Post-LN layer whose norm reads the stream after the in-place add."""

    def __init__(self, post: bool = False) -> None:
        super().__init__()
        self.post = post
        self.mix_norm = nn.LayerNorm(HIDDEN)
        self.mix = nn.Linear(HIDDEN, HIDDEN)
        self.mlp_norm = nn.LayerNorm(HIDDEN)
        self.mlp = nn.Sequential(nn.Linear(HIDDEN, 2 * HIDDEN), nn.GELU(), nn.Linear(2 * HIDDEN, HIDDEN))

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.post:
            hidden_states = self.mix_norm(hidden_states + self.mix(hidden_states))
            hidden_states[mask] += self.mlp(hidden_states[mask])
            return self.mlp_norm(hidden_states)
        hidden_states = hidden_states + self.mix(self.mix_norm(hidden_states))
        hidden_states[mask] += self.mlp(self.mlp_norm(hidden_states[mask]))
        return hidden_states


class _MaskedAddConfig(PretrainedConfig):
    model_type = "normswap-test-masked-add"

    def __init__(self, hidden_size: int = HIDDEN, post: bool = False, **kwargs: object) -> None:
        self.hidden_size, self.post = hidden_size, post
        super().__init__(**kwargs)


class _MaskedAddModel(PreTrainedModel):
    config_class = _MaskedAddConfig
    main_input_name = "input_ids"

    def __init__(self, config: _MaskedAddConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList([_MaskedAddLayer(config.post) for _ in range(LAYERS)])
        self.post_init()

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
        hidden_states, mask = self.embed(input_ids), input_ids % 2 == 0  # the even tokens take the MLP
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask)
        return hidden_states


def test_item_assignment_is_a_node_that_later_reads_depend_on() -> None:
    layer = _perturbed(_MaskedAddLayer())
    stream = torch.randn(1, TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1))
    mask = torch.arange(TOKENS).unsqueeze(0) % 3 == 0
    meta = copy.deepcopy(layer).to("meta")  # traced as detection traces, on the meta device
    traced = trace_layer(meta, LayerCall((stream.to("meta"), mask.to("meta")), {}),
                         {id(meta.mix_norm), id(meta.mlp_norm)})
    (assignment,) = [n for n in traced.graph.nodes if n.op == "call_function" and n.target is operator.setitem]
    (output,) = [n for n in traced.graph.nodes if n.op == "output"]
    assert output.args[0] is assignment  # the layer returns the stream after the assignment
    assert assignment.meta["meta_value"].shape == stream.shape
    root = nn.Module()
    root.add_module(WRAPPED_LAYER, layer)
    with torch.no_grad():  # the graph computes what the layer does (torch.fx prints `h[m] = v; setitem = h`)
        replayed = fx.GraphModule(root, traced.graph)(stream.clone(), mask)
        torch.testing.assert_close(replayed, layer(stream.clone(), mask))


@pytest.mark.parametrize("post", [False, True])
def test_a_masked_add_is_a_residual_add_and_its_norm_placement_is_read(post: bool) -> None:
    topology = normswap.inspect(_perturbed(_MaskedAddModel(_MaskedAddConfig(post=post))))
    slot = "post" if post else "pre"
    assert topology.placement == slot
    for layer in topology.layers:
        mix, mlp = layer.sublayers
        assert [(n.path, n.slot) for n in mix.norms] == [(f"{layer.path}.mix_norm", slot)]
        assert [(n.path, n.slot) for n in mlp.norms] == [(f"{layer.path}.mlp_norm", slot)]
        assert mlp.branches[0].modules == (f"{layer.path}.mlp",)


def test_a_trace_failure_names_what_failed_and_asks_for_no_report() -> None:
    try:
        raise TypeError("'X' object does not support item assignment")
    except TypeError as error:
        message = _describe_failure(nn.Linear(2, 2), error)
    assert "please report" not in message.lower() and "does not support item assignment" in message
    assert "layer's own forward" in message


@pytest.fixture(scope="module")
def higgs() -> nn.Module:
    config = transformers.AutoConfig.for_model(
        "higgs_audio_v2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64, num_codebooks=4,
        codebook_size=32, audio_token_id=5, audio_bos_token_id=6, audio_delay_token_id=7, pad_token_id=0)
    return _perturbed(transformers.AutoModel.from_config(config))


def test_higgs_audio_routes_its_tokens_through_norms_of_their_own(higgs: nn.Module) -> None:
    topology = normswap.inspect(higgs)
    for layer in topology.layers:
        attention, mlps = layer.sublayers
        assert {n.path.rsplit(".", 1)[-1] for n in attention.norms_in("pre")} == {"input_layernorm",
                                                                                 "audio_input_layernorm"}
        assert mlps.kind == "parallel"  # text and audio MLPs read the same stream, each at its own positions
        assert [b.modules[0].rsplit(".", 1)[-1] for b in mlps.branches] == ["mlp", "audio_mlp"]
        assert {n.path.rsplit(".", 1)[-1] for n in mlps.norms_in("pre")} == {"post_attention_layernorm",
                                                                            "audio_post_attention_layernorm"}


@pytest.mark.parametrize("conversion", [{"placement": "post"}, {"norm": "layernorm"}])
def test_higgs_audio_converts_and_the_result_runs_and_inspects(higgs: nn.Module, conversion: dict) -> None:
    converted = normswap.convert(higgs, **conversion)  # verified against the source and re-detected inside
    tokens = torch.randint(8, 128, (1, TOKENS), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        output = converted(input_ids=tokens).logits
    assert output.shape[:2] == (1, TOKENS) and torch.isfinite(output).all()
    target = normswap.inspect(converted)
    if "placement" in conversion:
        assert target.placement == "post"
    else:
        assert {n.kind for layer in target.layers for sub in layer.sublayers for n in sub.norms} == {"layernorm"}


@pytest.mark.parametrize(("conversion", "reason"), [
    ({"placement": "pre"}, "adds its branches to the stream in place, one statement each"),
    ({"norm": "layernorm", "exact": True}, "one weight matrix cannot hold two different norm weights"),
])
def test_higgs_audio_refusals_name_the_structure(higgs: nn.Module, conversion: dict, reason: str) -> None:
    with pytest.raises(normswap.NormswapError) as refused:
        normswap.convert(higgs, **conversion)
    assert reason in str(refused.value) and "please report" not in str(refused.value)
