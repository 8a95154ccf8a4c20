"""Layers of one class that build different modules (AXK1, AXK2: an MoE in some layers, a dense MLP in others).

Generated code edits a class once for all its instances, so each variant's edits are derived from a layer of that
variant and must agree wherever the variants run the same code. AXK1's MoE layers hold their out norm inside the
MoE (a class its dense layers do not hold), so its variants agree and it converts; AXK2's MoE layers call a gate
around the norm on the same line where its dense layers call the norm itself, which is refused with that line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from test_placements import assert_saved_loads_and_generates_alike

import normswap
from normswap.cli import main

_SHARED = dict(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, head_dim=8, q_lora_rank=32, kv_lora_rank=32,
               qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, n_shared_experts=1,
               num_experts_per_tok=2, max_position_embeddings=64, mlp_layer_types=["dense", "sparse"])


def _model(model_type: str, **fields: object) -> torch.nn.Module:
    config = transformers.AutoConfig.for_model(model_type, **_SHARED, **fields)
    model = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norm weights away from 1: a weight moved to the wrong place changes the output
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def axk1() -> torch.nn.Module:
    return _model("axk1", n_group=2, topk_group=2)


def axk2() -> torch.nn.Module:
    return _model("axk2", gated_norm_rank=16, layer_types=["indexed_attention", "indexed_attention"])


def test_an_out_norm_over_summed_experts_is_one_branch() -> None:
    """AXK1's MoE normalises the sum of its routed and shared experts: one MLP branch with an out norm (a sandwich
    sublayer), not a parallel block of two MLPs; its dense layers stay Pre-Norm, so the model is mixed."""
    topology = normswap.inspect(axk1())
    assert topology.placement == "mixed"
    dense, sparse = (layer.sublayers[1] for layer in topology.layers)
    assert (dense.kind, dense.placement, [n.path for n in dense.norms]) == (
        "mlp", "pre", ["model.layers.0.post_attention_layernorm"])
    assert (sparse.kind, sparse.placement, len(sparse.branches)) == ("mlp", "sandwich", 1)
    assert [n.path for n in sparse.norms_in("out")] == ["model.layers.1.mlp.post_mlp_layernorm"]


def test_a_branch_is_not_named_after_the_norm_that_holds_its_module() -> None:
    """AXK2's MoE branch runs the gate MLP of its ``post_attention_layernorm``: that is an MLP branch, not attention."""
    kinds = [[sub.kind for sub in layer.sublayers] for layer in normswap.inspect(axk2()).layers]
    assert kinds == [["attention", "mlp"], ["attention", "mlp"]]


@pytest.mark.parametrize("target", ["pre", "post"])
def test_variants_of_one_layer_class_convert(target: str, tmp_path: Path) -> None:
    """To pre the MoE's out norm folds as its stand-in; to post the dense and the MoE layers' pre norms move behind
    the adds alike (the norm the router reads keeps its weight: its readers cannot take g / s)."""
    model = axk1()
    converted = normswap.convert(model, target)
    topology = normswap.inspect(converted)
    assert topology.placement == target
    assert not any(norm.slot == "out" for layer in topology.layers for sub in layer.sublayers for norm in sub.norms)
    report = converted.normswap_report  # a chain of passes reports the whole, one composed conversion its drift
    whole = getattr(report, "whole", None) or report.drift
    assert not report.exact and 0.5 < whole.output_cosine < 0.99999
    assert_saved_loads_and_generates_alike(converted, tmp_path)


def test_a_converted_variant_model_inspects_without_running_its_code(tmp_path: Path) -> None:
    """The provenance of a conversion from a mixed model ('placement mixed -> pre') is read back, so inspect
    compares the shipped code with what normswap generates instead of refusing it without --trust-remote-code."""
    axk1().save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--placement", "pre", "--quiet"]) == 0
    assert normswap.inspect(str(tmp_path / "dst")).placement == "pre"


def test_an_edit_one_variant_needs_and_another_forbids_is_refused_with_its_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """AXK2's dense layers call their ``post_attention_layernorm`` (a norm) at the line where its MoE layers call a
    gated norm: moving the norm means unwrapping that call in one variant and keeping it in the other."""
    axk2().save_pretrained(tmp_path / "src")
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--placement", "post", "--quiet"]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Traceback" not in error
    assert "model.layers.0 and model.layers.1, both AXK2DecoderLayer layers, place their norms differently" in error
    assert "at line 703" in error and "one class's code cannot move a norm in some of its instances" in error
    assert not (tmp_path / "out").exists()


def test_a_norm_added_to_one_variant_only_is_refused() -> None:
    """AXK1 to sandwich adds an out norm to the dense layers' MLP in the layer's own code, which its MoE layers run
    too, where the MoE holds an out norm already."""
    with pytest.raises(normswap.NormswapError, match=r"both AXK1DecoderLayer layers, place their norms differently"):
        normswap.convert(axk1(), "sandwich")
