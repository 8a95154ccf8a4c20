"""Layers of one class that build different modules (AXK1, AXK2: an MoE in some layers, a dense MLP in others).

Generated code edits a class once for all its instances, so each variant's edits are derived from a layer of that
variant and must agree wherever the variants run the same code. AXK1's MoE layers hold their out norm inside the
MoE (a class its dense layers do not hold), so its variants agree and it converts; AXK2's MoE layers call a gate
around the norm on the same line where its dense layers call the norm itself: that statement runs as each variant
needs, told apart by the class of a module. An edit the variants cannot share that way (a new norm in the layer's
``__init__``, which every variant runs) is refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from test_placements import assert_saved_loads_and_generates_alike

import normswap
from normswap.cli import main
from normswap.codegen.derive import CodegenError
from normswap.codegen.edits import ReadAfterBranch, UnwrapNormCall, VariantStatement, WrapBranchInput
from normswap.codegen.rewrite import apply_edits
from normswap.conversion.route import plan_layout

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
    the adds alike, each rescaled to the stream's scale first (the MoE's router and experts read theirs through a
    cast and by token rows, which pass ``g / s`` on to their weights)."""
    model = axk1()
    converted = normswap.convert(model, target)
    topology = normswap.inspect(converted)
    assert topology.placement == target
    assert not any(norm.slot == "out" for layer in topology.layers for sub in layer.sublayers for norm in sub.norms)
    report = converted.normswap_report  # a chain of passes reports the whole, one composed conversion its drift
    whole = getattr(report, "whole", None) or report.drift
    assert not report.exact and 0.5 < whole.output_cosine < 0.99999
    assert_saved_loads_and_generates_alike(converted, tmp_path)
    if target == "post":  # the rescale before the shift reaches the MoE's router, its experts and shared experts
        plan = plan_layout(model, "post").plan.describe()
        assert ("rescale model.layers.1.post_attention_layernorm into model.layers.1.mlp.gate.weight, "
                "model.layers.1.mlp.experts.gate_up_proj, model.layers.1.mlp.shared_experts.gate_proj.weight") in plan
        assert "rescale model.layers.0.post_attention_layernorm into" in plan and "keep " not in plan


def test_a_converted_variant_model_inspects_without_running_its_code(tmp_path: Path) -> None:
    """The provenance of a conversion from a mixed model ('placement mixed -> pre') is read back, so inspect
    compares the shipped code with what normswap generates instead of refusing it without --trust-remote-code."""
    axk1().save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--placement", "pre", "--quiet"]) == 0
    assert normswap.inspect(str(tmp_path / "dst")).placement == "pre"


def test_a_statement_the_variants_need_differently_runs_as_each_needs(tmp_path: Path) -> None:
    """AXK2's dense layers call their ``post_attention_layernorm`` (a norm) on the line where its MoE layers call a
    gated norm: to post, that call is unwrapped in dense layers only, and the add before it is wrapped in the norm
    itself there and in the gated norm's inner norm in MoE layers, each variant told apart by its MLP's class.
    Back to pre, every tensor is the original's, bit for bit."""
    model = axk2()
    model.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "post"), "--placement", "post", "--quiet"]) == 0
    code = (tmp_path / "post" / "modeling_normswap_axk2.py").read_text()
    dense = 'if type(self.mlp).__name__ == "AXK2MLP":\n            hidden_states = self.post_attention_layernorm('
    assert dense in code
    assert "else:\n            hidden_states = self.post_attention_layernorm.norm(residual + hidden_states)" in code
    converted = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "post", trust_remote_code=True)
    topology = normswap.inspect(converted)
    assert topology.placement == "post"
    assert [[n.path for n in sub.norms] for sub in topology.layers[1].sublayers] == [
        ["model.layers.1.post_attention_layernorm.norm"], ["model.layers.1.input_layernorm.norm"]]
    assert_saved_loads_and_generates_alike(converted, tmp_path / "saved")
    _same_under_lora(converted)
    assert main(["convert", str(tmp_path / "post"), str(tmp_path / "back"), "--placement", "pre",
                 "--trust-remote-code", "--quiet"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", trust_remote_code=True).state_dict()
    original = model.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[key], original[key]) for key in original)


def _same_under_lora(model: torch.nn.Module) -> None:
    """PEFT wraps the linear maps in its own classes; the variant guards read other modules, so each layer still
    runs its own case (LoRA starts as the identity: the output must not move)."""
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model.eval()(ids).logits
        wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=["q_a_proj", "fc1", "fc2", "down_proj"]))
        assert torch.allclose(wrapped.eval()(ids).logits, before, atol=1e-6)


def test_a_norm_added_to_one_variant_only_is_refused() -> None:
    """AXK1 to sandwich adds an out norm to the dense layers' MLP in the layer's own code, which its MoE layers run
    too, where the MoE holds an out norm already."""
    with pytest.raises(normswap.NormswapError, match=r"model\.layers\.0 and model\.layers\.1 \(both AXK1DecoderLayer "
                       r"layers\) place their norms differently .* AddLayerNorm\(norm="):
        normswap.convert(axk1(), "sandwich")


_THREE_VARIANTS = '''class Layer(nn.Module):
    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states
'''


def test_a_variant_statement_runs_each_variants_edits_and_only_those() -> None:
    """Three variants of one statement: the first unwraps the norm, the second leaves it, the third reads its input
    through another module first; each case is the original statement with its own edits, the last the else."""
    dense, gated, inner = ('type(self.mlp).__name__ == "Dense"', 'type(self.mlp).__name__ == "Gated"',
                           'type(self.mlp).__name__ == "Inner"')
    rewritten = apply_edits(_THREE_VARIANTS, [VariantStatement("Layer", 4, (
        (dense, (UnwrapNormCall("Layer", 4, "norm"),)),
        (gated, ()),
        (inner, (WrapBranchInput("Layer", 4, "norm", "inner"),))))])
    assert rewritten == _THREE_VARIANTS.replace(
        "        hidden_states = self.norm(hidden_states)\n",
        f"        if {dense}:\n            pass\n"
        f"        elif {gated}:\n            hidden_states = self.norm(hidden_states)\n"
        "        else:\n            hidden_states = self.norm(self.inner(hidden_states))\n")


def test_a_variant_statement_whose_edit_does_not_apply_is_an_error() -> None:
    with pytest.raises(CodegenError, match=r"did not take the edits of its variant"):
        apply_edits(_THREE_VARIANTS, [VariantStatement("Layer", 4, (
            ("a", (UnwrapNormCall("Layer", 4, "absent"),)), ("b", ())))])


def test_a_variant_case_keeps_the_statements_its_edits_add_before_it() -> None:
    """A case whose edit names the stream in a statement of its own (``ReadAfterBranch``) holds both statements."""
    rewritten = apply_edits(_THREE_VARIANTS, [VariantStatement("Layer", 5, (
        ("a", (ReadAfterBranch("Layer", 5, "mlp", "norm2", "after", "hidden_states"),)), ("b", ())))])
    assert rewritten == _THREE_VARIANTS.replace(
        "        hidden_states = self.mlp(hidden_states)\n",
        "        if a:\n            after = hidden_states\n            hidden_states = self.mlp(self.norm2(after))\n"
        "        else:\n            hidden_states = self.mlp(hidden_states)\n")
