"""Models with no layer modules (XLM, FlauBERT): the model's forward runs ``for i in range(n)`` over lists of
branches (``attentions``, ``ffns``) and of norms (``layer_norm1``, ``layer_norm2``), Post-LN with an embedding norm.

Each index is read as a layer of list items. Conversions go through generated code that rewrites that loop:
Post -> Pre keeps branch 0's input exact (docs/design.md §3) and comes back bit for bit; LayerNorm -> RMSNorm is
approximate on the Post-LN model and exact on its Pre-LN twin (§4). Every parameter is perturbed off its init.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from custom_modeling import ToyConfig
from test_rms_norm import perturbed
from torch import nn

import normswap
from normswap.conversion import convert
from normswap.conversion.checkpoint import convert_checkpoint, tensors_equal
from normswap.conversion.verify import measure_drift, probe_inputs

FAMILIES = [("xlm", "XLMWithLMHeadModel"), ("flaubert", "FlaubertWithLMHeadModel")]
LAYERS = 2


@pytest.fixture(params=FAMILIES, ids=[name for name, _ in FAMILIES])
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return perturbed(*request.param)


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_each_index_of_the_lists_is_a_layer(model: torch.nn.Module) -> None:
    topology = normswap.inspect(model)
    assert topology.placement == "post" and topology.norm == "layernorm"
    (stack,) = topology.stacks
    assert stack.path == "transformer.attentions" and stack.num_layers == LAYERS
    assert stack.embedding_norm is not None and stack.embedding_norm.path == "transformer.layer_norm_emb"
    assert stack.final_norm is None  # the last layer_norm2 is the post norm of the last sublayer, as in BERT
    assert [layer.index for layer in topology.layers] == list(range(LAYERS))
    for layer in topology.layers:
        i = layer.index
        assert layer.path == "transformer" and layer.layer_class == type(model.transformer).__name__
        assert set(layer.items) == {f"attentions.{i}", f"ffns.{i}", f"layer_norm1.{i}", f"layer_norm2.{i}"}
        attention, mlp = layer.sublayers
        assert [n.path for n in attention.norms_in("post")] == [f"transformer.layer_norm1.{i}"]
        assert [n.path for n in mlp.norms_in("post")] == [f"transformer.layer_norm2.{i}"]
        assert attention.branches[0].entry == f"transformer.attentions.{i}"
        assert mlp.branches[0].entry == f"transformer.ffns.{i}"
        assert not attention.norms_in("pre") and not mlp.norms_in("pre")


def test_to_pre_keeps_branch_0_exact_and_returns_bit_for_bit(model: torch.nn.Module) -> None:
    converted = convert(model, "pre")
    assert type(converted).__module__.startswith("normswap_generated_")
    topology = normswap.inspect(converted)
    assert topology.placement == "pre"
    (stack,) = topology.stacks
    assert stack.embedding_norm is None
    assert stack.final_norm is not None and stack.final_norm.path == "transformer.normswap_final_norm"
    for layer in topology.layers:
        attention, mlp = layer.sublayers
        assert [n.path for n in attention.norms_in("pre")] == [f"transformer.layer_norm1.{layer.index}"]
        assert [n.path for n in mlp.norms_in("pre")] == [f"transformer.layer_norm2.{layer.index}"]

    inputs = probe_inputs(model, None, None)
    report = measure_drift(model, converted, normswap.inspect(model), topology, inputs, exact=False)
    assert report.sublayers[0].max_abs_diff == 0.0  # branch 0 reads pre_0 = the old embedding norm, on e
    assert report.sublayers[1].max_abs_diff > 0.0 and report.output_cosine < 0.999  # inexact from branch 1 on

    back = convert(converted, "post")
    assert type(back) is type(model)
    assert tensors_equal(model.state_dict(), back.state_dict())
    assert torch.equal(_logits(model, inputs), _logits(back, inputs))


def test_the_pre_ln_twin_converts_to_rms_norm_exactly(model: torch.nn.Module) -> None:
    pre = convert(model, "pre")
    rms = convert(pre, norm="rmsnorm")
    assert rms.normswap_report.exact and rms.normswap_report.relative <= 1e-4
    topology = normswap.inspect(rms)
    assert topology.placement == "pre" and topology.norm == "rmsnorm"


def test_post_ln_to_rms_norm_replaces_every_norm_of_the_lists(model: torch.nn.Module) -> None:
    converted = convert(model, norm="rmsnorm")
    assert not converted.normswap_report.exact  # §7: a post norm reads a stream no weight change centres
    topology = normswap.inspect(converted)
    assert topology.placement == "post" and topology.norm == "rmsnorm" and len(topology.layers) == LAYERS
    assert topology.embedding_norm is not None
    inputs = probe_inputs(model, None, None)
    assert not torch.equal(_logits(model, inputs), _logits(converted, inputs))


@pytest.mark.parametrize("target", [{"placement": "pre"}, {"norm": "rmsnorm"}], ids=["pre", "rmsnorm"])
def test_saved_checkpoint_loads_runs_and_reinspects(model: torch.nn.Module, target: dict[str, str],
                                                    tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "source")
    result = convert_checkpoint(tmp_path / "source", tmp_path / "out", target.get("placement"),
                                norm=target.get("norm"))
    out = result.destination
    assert (out / f"modeling_normswap_{model.config.model_type}.py").is_file()
    # never the stock class: this process imported normswap's own copy of the code when it converted, which
    # registered the model_type (a fresh process refuses it without trust_remote_code: test_generated_registration)
    assert ".modeling_normswap_" in type(transformers.AutoModelForMaskedLM.from_pretrained(out)).__module__
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(loaded).__name__ == type(model).__name__
    topology = normswap.inspect(loaded)
    if "placement" in target:
        assert topology.placement == "pre" and topology.final_norm is not None
    else:
        assert topology.placement == "post" and topology.norm == "rmsnorm"
    inputs = probe_inputs(model, None, None)
    in_memory = convert(model, **target)
    assert torch.equal(_logits(loaded, inputs), _logits(in_memory, inputs))


class _Branch(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states)


class _ByIndex(transformers.PreTrainedModel):
    """Layers by index over a list of branches and a list of norms; ``config.layouts[0]`` says how each adds."""

    config_class = ToyConfig
    main_input_name = "input_ids"

    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(32, config.hidden_size)
        self.branches = nn.ModuleList([_Branch(config.hidden_size) for _ in range(LAYERS)])
        self.norms = nn.ModuleList([nn.LayerNorm(config.hidden_size) for _ in range(LAYERS)])
        self.post_init()

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
        hidden_states = self.embed(input_ids)
        for i in range(len(self.branches)):
            if self.config.layouts[0] == "pre":
                hidden_states = hidden_states + self.branches[i](self.norms[i](hidden_states))
            elif self.config.layouts[0] == "post":
                hidden_states = self.norms[i](hidden_states + self.branches[i](hidden_states))
            else:  # no residual add: nothing keeps the stream
                hidden_states = self.norms[i](self.branches[i](hidden_states))
        return hidden_states


@pytest.mark.parametrize("layout", ["pre", "post"])
def test_a_loop_by_index_is_read_in_either_placement(layout: str) -> None:
    topology = normswap.inspect(_ByIndex(ToyConfig(layouts=(layout,))))
    assert topology.placement == layout and len(topology.layers) == LAYERS
    for layer in topology.layers:
        (sublayer,) = layer.sublayers
        assert [n.path for n in sublayer.norms_in(layout)] == [f"norms.{layer.index}"]
        assert sublayer.branches[0].entry == f"branches.{layer.index}"
    assert topology.embedding_norm is None and topology.final_norm is None


def test_a_loop_by_index_without_residual_add_is_refused_by_what_holds_what() -> None:
    with pytest.raises(normswap.TopologyError) as refused:
        normswap.inspect(_ByIndex(ToyConfig(layouts=("none",))))
    message = str(refused.value)
    assert "_ByIndex has no layer modules: branches hold its branches and norms its norms" in message
    assert "shows no residual add" in message
