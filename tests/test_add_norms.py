"""Adding norms at the calibrated scale (docs/design.md §6): ``add_out_norms`` (pre -> sandwich, parallel blocks one
out norm per branch) and ``add_pre_norms`` (post-sublayer -> sandwich), composed alone and converted in memory.

Checked on models whose every parameter is perturbed off its init: the result inspects as the layout asked for, each
new norm's weight is the scale of what it reads (measured here by hooks of our own, and for the first branch on the
converted model's own norm input), a token of that scale passes the new norm unchanged, the saved model loads with
transformers and generates alike with and without its KV cache, and the output stays near the original's.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from test_layer_norm_exact_weightless import CONFIGS as WEIGHTLESS
from test_layer_norm_exact_weightless import perturbed as weightless_model
from test_rms_norm import perturbed

from normswap.codegen.branch_terms import branch_terms, helper_call_terms
from normswap.codegen.derive import CodegenError
from normswap.codegen.edits import AddLayerNorm
from normswap.conversion.add_norms import AddNormError, _factor, _kind, add_out_norms, add_pre_norms
from normswap.conversion.calibration import CalibratedScale
from normswap.conversion.compose import compose
from normswap.conversion.passes import Pass
from normswap.conversion.setup import convert_in_memory, realise
from normswap.conversion.verify import probe_inputs
from normswap.detect import inspect

# (tiny config, class, pass, the placement after it, the kind of every new norm)
CASES = [
    ("llama", "LlamaForCausalLM", "out", "sandwich", "rmsnorm"),
    ("qwen2", "Qwen2ForCausalLM", "out", "sandwich", "rmsnorm"),
    ("gpt2", "GPT2LMHeadModel", "out", "sandwich", "layernorm"),  # Conv1D writers, LayerNorm with bias 0
    ("gemma", "GemmaForCausalLM", "out", "sandwich", "rmsnorm-offset"),  # (1 + w): starts at w = s - 1
    # no MLP module: the add takes fc2's output through functional dropout, in `(residual + h).view(...)`
    ("opt_pre", "OPTForCausalLM", "out", "sandwich", "layernorm"),
    ("gpt_neox_parallel", "GPTNeoXForCausalLM", "out", "parallel", "layernorm"),  # h + attn + mlp: one norm each
    ("gptj", "GPTJForCausalLM", "out", "parallel", "layernorm"),  # both branches read one pre norm
    ("olmo2", "Olmo2ForCausalLM", "pre", "sandwich", "rmsnorm"),  # its branches read the raw stream
    # weightless LayerNorms (eps in their code): the new norm is normswap's LayerNorm, with a weight, no bias
    ("olmo", "OlmoForCausalLM", "out", "sandwich", "layernorm-nobias"),
    # weightless RMSNorms built from eps alone (no width recorded): the new norm is as wide as the traced stream
    ("nanochat", "NanoChatForCausalLM", "out", "sandwich", "rmsnorm"),
    # the add is inside the module-level dropout_add(x, residual, ...), called in the attention and MLP modules
    ("bloom", "BloomForCausalLM", "out", "sandwich", "layernorm"),
    # Falcon's dropout_add, in a forward whose in-place `mlp_output += attention_output` runs only for parallel configs
    ("falcon_rw", "FalconForCausalLM", "out", "sandwich", "layernorm"),
]
IDS = [f"{case[0]}-{case[2]}" for case in CASES]
PASSES = {"out": add_out_norms, "pre": add_pre_norms}


@functools.cache
def converted(config: str, model_class: str, slot: str, kind: str | None = None
              ) -> tuple[torch.nn.Module, Pass, Any, torch.nn.Module, Any]:
    """(source, the pass, its setup, the converted model, the drift report)."""
    model = weightless_model(config) if config in WEIGHTLESS else perturbed(config, model_class)
    planned = PASSES[slot](model, inspect(model), kind)
    setup = compose(model, inspect(model), [planned], f"test: add {slot} norms")
    result, setup, report = convert_in_memory(model, setup, probe_inputs(model, None, None))
    return model, planned, setup, result.eval(), report


def measured_scales(model: torch.nn.Module, planned: Pass, statistic: str, eps: float) -> dict[str, float]:
    """Each new norm's ``s``, measured by hooks of this test on the source: the mean over real probe tokens of the
    per-token RMS (LayerNorm: standard deviation) of the module's output (out norms: its first item) or input."""
    inputs = probe_inputs(model, None, None)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for move in planned.moves:
        assert move.site is not None
        module = model.get_submodule(move.site.module)

        def keep(value: Any, norm: str = move.norm) -> None:
            first = value[0] if isinstance(value, tuple) else value
            seen[norm] = first.detach().double()

        if move.site.side == "output":
            handles.append(module.register_forward_hook(lambda _m, _a, out, keep=keep: keep(out)))
        else:
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, kwargs, keep=keep: keep(args[0] if args else next(iter(kwargs.values()))),
                with_kwargs=True))
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    mask = inputs["attention_mask"].bool() if "attention_mask" in inputs else None
    return {norm: _mean_scale(value, statistic, eps, mask) for norm, value in seen.items()}


def _mean_scale(value: torch.Tensor, statistic: str, eps: float, mask: torch.Tensor | None) -> float:
    if statistic == "std":
        value = value - value.mean(-1, keepdim=True)
    per_token = (value.pow(2).mean(-1) + eps).sqrt()
    if mask is not None:  # OPT's MLP reads the tokens flattened, (batch * positions, d)
        per_token = per_token[mask] if per_token.shape == mask.shape else per_token[mask.flatten()]
    return float(per_token.mean())


def weight_of(model: torch.nn.Module, norm: str, kind: str) -> torch.Tensor:
    weight = model.get_submodule(norm).weight.detach().double()
    return weight + 1 if kind.endswith("offset") else weight


@pytest.mark.parametrize(("config", "model_class", "slot", "placement", "kind"), CASES, ids=IDS)
def test_the_result_inspects_as_the_placement_with_one_new_norm_per_branch(config: str, model_class: str, slot: str,
                                                                          placement: str, kind: str) -> None:
    model, planned, _, result, _ = converted(config, model_class, slot)
    assert planned.placement == placement and not planned.exact
    target = inspect(result)
    assert target.placement == placement
    added = {move.norm for move in planned.moves}
    branches = sum(len(sub.branches) for layer in inspect(model).layers for sub in layer.sublayers)
    assert len(added) == branches == len(planned.moves)  # a parallel block's branches each get their own
    found = {norm.path: norm for norm in target.residual_norms if norm.slot == slot}
    assert set(found) == added
    assert {norm.kind for norm in found.values()} == {kind}
    assert all(move.action == "add" for move in planned.moves)


@pytest.mark.parametrize(("config", "model_class", "slot", "placement", "kind"), CASES, ids=IDS)
def test_each_new_norm_starts_at_the_scale_of_what_it_reads(config: str, model_class: str, slot: str,
                                                           placement: str, kind: str) -> None:
    model, planned, setup, result, _ = converted(config, model_class, slot)
    site = planned.moves[0].site
    assert site is not None
    expected = measured_scales(model, planned, site.statistic, site.eps)
    for move in planned.moves:
        weight = weight_of(result, move.norm, kind)
        assert torch.allclose(weight, torch.full_like(weight, expected[move.norm]), rtol=1e-5), move.norm
        bias = getattr(result.get_submodule(move.norm), "bias", None)
        assert bias is None or not bias.any()
    assert {scale.site for scale in setup.scales} == {move.site for move in planned.moves}
    assert len(set(expected.values())) == len(expected)  # every norm has a scale of its own


@pytest.mark.parametrize(("config", "model_class", "slot", "placement", "kind"), CASES, ids=IDS)
def test_the_first_new_norm_reads_what_its_scale_was_measured_on(config: str, model_class: str, slot: str,
                                                                placement: str, kind: str) -> None:
    """The first branch reads the same stream in both models, so the converted model's first new norm reads exactly
    what its site measured in the source: its weight is the mean scale of its own input."""
    _, planned, _, result, _ = converted(config, model_class, slot)
    first = planned.moves[0]
    assert first.site is not None
    seen: list[torch.Tensor] = []
    handle = result.get_submodule(first.norm).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().double()))
    inputs = probe_inputs(result, None, None)
    with torch.no_grad():
        result(**inputs)
    handle.remove()
    mask = inputs["attention_mask"].bool() if "attention_mask" in inputs else None
    scale = _mean_scale(seen[0], first.site.statistic, first.site.eps, mask)
    assert float(weight_of(result, first.norm, kind)[0]) == pytest.approx(scale, rel=1e-5)


@pytest.mark.parametrize(("config", "model_class", "slot", "placement", "kind"), CASES, ids=IDS)
def test_a_token_of_the_calibrated_scale_passes_the_new_norm_unchanged(config: str, model_class: str, slot: str,
                                                                      placement: str, kind: str) -> None:
    _, planned, _, result, _ = converted(config, model_class, slot)
    for move in planned.moves:
        assert move.site is not None
        norm = result.get_submodule(move.norm)
        scale = float(weight_of(result, move.norm, kind)[0])
        token = torch.randn(3, norm.weight.shape[-1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        if move.site.statistic == "std":
            token = token - token.mean(-1, keepdim=True)  # a LayerNorm is the identity on zero-mean tokens only
        size = (scale ** 2 - move.site.eps) ** 0.5  # sqrt(mean(x^2) + eps) = s exactly
        token = (token / token.pow(2).mean(-1, keepdim=True).sqrt() * size).float()
        with torch.no_grad():
            assert torch.allclose(norm(token), token, atol=1e-5, rtol=1e-4), move.norm


@pytest.mark.parametrize(("config", "model_class", "slot", "placement", "kind"), CASES, ids=IDS)
def test_the_saved_model_loads_and_generates_alike_with_and_without_cache(config: str, model_class: str, slot: str,
                                                                         placement: str, kind: str,
                                                                         tmp_path: Path) -> None:
    _, _, setup, result, _ = converted(config, model_class, slot)
    result.save_pretrained(tmp_path)
    (tmp_path / setup.generated.file_name).write_text(setup.generated.source, encoding="utf-8")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert inspect(loaded).placement == placement
    inputs = probe_inputs(result, None, None)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, result(**inputs).logits)
    prompt = torch.tensor([[5, 17, 42, 7]])
    with_cache = loaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    without = loaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert with_cache.shape == (1, 12) and torch.equal(with_cache, without)


# the output cosine to the original each case reaches (measured: 0.934 to 0.991; with unit weights 0.68 to 0.99)
LEAST_COSINE = 0.9


@pytest.mark.parametrize(("config", "model_class", "slot", "placement", "kind"), CASES, ids=IDS)
def test_the_output_stays_near_the_original_and_nearer_than_from_unit_weights(config: str, model_class: str,
                                                                              slot: str, placement: str,
                                                                              kind: str) -> None:
    model, planned, _, _, report = converted(config, model_class, slot)
    assert not report.exact
    assert report.drift.output_cosine > LEAST_COSINE, report.summary()
    unplanned = compose(model, inspect(model), [planned], "test: unit weights")
    unit = unplanned.calibrated({site: CalibratedScale(site, 1.0, 1, 0.0) for site in unplanned.calibration})
    inputs = probe_inputs(model, None, None)
    naive = unit.verify(model, realise(model, unit), inputs).drift
    assert report.drift.next_token_kl < naive.next_token_kl
    assert report.drift.output_cosine > naive.output_cosine


def test_olmo2_branches_read_about_what_they_read_before() -> None:
    """post-sublayer -> sandwich: each branch's new pre norm gives it a stream of the size it read in the source,
    on average over tokens (a unit start would give it RMS 1 instead)."""
    model, planned, _, result, _ = converted("olmo2", "Olmo2ForCausalLM", "pre")
    before = measured_scales(model, planned, "rms", 0.0)  # the raw stream each branch read in the source
    inputs = probe_inputs(result, None, None)
    seen: dict[str, torch.Tensor] = {}
    def keep(norm: str, output: torch.Tensor) -> None:
        seen.setdefault(norm, output.detach().double())

    handles = [result.get_submodule(move.norm).register_forward_hook(
        lambda _m, _a, out, norm=move.norm: keep(norm, out)) for move in planned.moves]
    with torch.no_grad():
        result(**inputs)
    for handle in handles:
        handle.remove()
    mask = inputs["attention_mask"].bool() if "attention_mask" in inputs else None
    first = planned.moves[0].norm
    assert _mean_scale(seen[first], "rms", 0.0, mask) == pytest.approx(before[first], rel=1e-3)
    for move in planned.moves:  # later layers' streams moved a little, but each reads about its old size
        assert _mean_scale(seen[move.norm], "rms", 0.0, mask) == pytest.approx(before[move.norm], rel=0.1)


def test_olmo2_query_key_and_value_all_read_the_new_pre_norm() -> None:
    """Every module that read the raw stream (OLMo 2's q, k and v projections) reads the new norm's output."""
    _, planned, _, result, _ = converted("olmo2", "Olmo2ForCausalLM", "pre")
    attention = result.model.layers[0].self_attn
    norm = next(move.norm for move in planned.moves if move.site is not None and move.site.module.endswith("self_attn"))
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, value: torch.Tensor) -> None:
        seen.setdefault(name, value.detach())

    handles = [getattr(attention, name).register_forward_pre_hook(lambda _m, args, name=name: keep(name, args[0]))
               for name in ("q_proj", "k_proj", "v_proj")]
    handles.append(result.get_submodule(norm).register_forward_hook(lambda _m, _a, out: keep("norm", out)))
    with torch.no_grad():
        result(**probe_inputs(result, None, None))
    for handle in handles:
        handle.remove()
    assert all(torch.equal(seen[name], seen["norm"]) for name in ("q_proj", "k_proj", "v_proj"))


def test_another_kind_of_new_norm_on_request() -> None:
    """GPT-2 with RMSNorm out norms (``NormswapRMSNorm.like`` its LayerNorm): sandwich, the new norms RMSNorms whose
    scale is the branch output's RMS, not its standard deviation."""
    model, planned, _, result, report = converted("gpt2", "GPT2LMHeadModel", "out", "rmsnorm")
    target = inspect(result)
    assert target.placement == "sandwich"
    assert {norm.kind for norm in target.residual_norms if norm.slot == "out"} == {"rmsnorm"}
    expected = measured_scales(model, planned, "rms", planned.moves[0].site.eps)
    for move in planned.moves:
        assert float(result.get_submodule(move.norm).weight[0].detach()) == pytest.approx(expected[move.norm], rel=1e-5)
    assert report.drift.output_cosine > LEAST_COSINE


@pytest.mark.parametrize(("config", "model_class", "slot", "message"), [
    ("gemma2", "Gemma2ForCausalLM", "out", "sublayer 0 of model.layers.0 already has an out norm"),
    ("llama", "LlamaForCausalLM", "pre", "sublayer 0 of model.layers.0 already has a pre norm"),
    ("bert", "BertForMaskedLM", "out", "normalises its sum after the add .a post norm., so an out norm beside it"),
])
def test_a_slot_taken_or_no_layout_is_refused_with_its_reason(config: str, model_class: str, slot: str,
                                                              message: str) -> None:
    model = perturbed(config, model_class)
    with pytest.raises(AddNormError, match=message):
        PASSES[slot](model, inspect(model))


def test_a_weightless_norm_that_records_no_width_takes_the_streams() -> None:
    """NanoChat builds its weightless RMSNorms from eps alone: the new norm's ``.like`` call is told the width
    detection traced for the stream, written as the config field that names it (so the generated file serves any
    size), and reads eps from the template, which keeps it; without a traced width the template is refused."""
    model = weightless_model("nanochat")
    topology = inspect(model)
    assert topology.stacks[0].width == model.config.hidden_size
    planned = add_out_norms(model, topology)
    added = [edit for edit in planned.edits if isinstance(edit, AddLayerNorm)]
    assert added and all(edit.keywords == (("affine", "True"), ("width", "config.hidden_size")) for edit in added)
    template = next(norm for norm in topology.residual_norms if norm.kind == "rmsnorm-noaffine")
    expected = r"norm with no weight, and normswap does not know its width \(it records none, and detection traced no"
    with pytest.raises(AddNormError, match=expected):
        _kind(template, model.get_submodule(template.path), None, None)


_LAYER_SOURCE = '''
class Layer:
    def forward(self, hidden_states):
        residual = hidden_states
        attn_output, weights = self.attn(self.ln_1(hidden_states))
        attn_output = self.drop(attn_output)
        hidden_states = residual + attn_output
        residual = hidden_states
        mlp_output = self.mlp(self.ln_2(hidden_states))
        hidden_states = residual + self.scale(mlp_output)
        other = self.other(hidden_states)
        _, second = self.other(hidden_states)
        return hidden_states + second
'''


def test_a_term_is_a_branch_output_through_renames_first_items_and_pass_through_calls_only(tmp_path: Path) -> None:
    """What a new out norm reads is what the branch's module returns: followed back through a rename, a tuple's first
    item and a call that passes its input through (here ``self.drop``), but not through a layer scale (``self.scale``)
    or to a tuple's second item."""
    source = tmp_path / "modeling_layer.py"
    source.write_text(_LAYER_SOURCE, encoding="utf-8")
    lines = _LAYER_SOURCE.splitlines()
    line = lines.index("        hidden_states = residual + attn_output") + 1
    passes = {"self.drop"}.__contains__
    add = branch_terms(source, "Layer", line, {"attn", "mlp"}, passes)
    assert add.terms == ("residual", "attn_output") and add.others() == ("residual",)
    assert add.branches["attn"].term == "attn_output" and add.branches["attn"].input_first
    scaled = branch_terms(source, "Layer", lines.index("        hidden_states = residual + self.scale(mlp_output)") + 1,
                          {"attn", "mlp"}, passes)
    assert scaled.branches == {}  # a layer scale is no pass-through: the term is no module's output
    second = branch_terms(source, "Layer", len(lines), {"other"}, passes)
    assert second.branches == {}  # the second item of what self.other returns is not what calibration measures



_CHOSEN_SOURCE = '''
class Layer:
    def forward(self, hidden_states, extra=None):
        mlp_output = self.mlp(hidden_states) if extra is None else self.mlp(hidden_states, extra)
        hidden_states = hidden_states + mlp_output
        either = self.mlp(hidden_states) if extra is None else self.other(hidden_states)
        hidden_states = hidden_states + either
        scaled = self.mlp(hidden_states) if extra is None else 2.0 * self.mlp(hidden_states)
        return hidden_states + scaled
'''


def test_a_term_chosen_by_a_conditional_expression_is_the_module_both_sides_call(tmp_path: Path) -> None:
    """``self.mlp(h) if flag else self.mlp(h, extra)`` (Moshi's flexible linear): either way the term is what
    ``self.mlp`` returns. Sides that call different modules, or scale the same one differently, leave the term no
    one module's output."""
    source = tmp_path / "modeling_chosen.py"
    source.write_text(_CHOSEN_SOURCE, encoding="utf-8")
    lines = _CHOSEN_SOURCE.splitlines()
    chosen = branch_terms(source, "Layer", lines.index("        hidden_states = hidden_states + mlp_output") + 1,
                          {"mlp"}, lambda _: False)
    assert chosen.branches["mlp"].term == "mlp_output" and chosen.branches["mlp"].factors == ()
    either = branch_terms(source, "Layer", lines.index("        hidden_states = hidden_states + either") + 1,
                          {"mlp", "other"}, lambda _: False)
    assert either.branches == {}
    assert branch_terms(source, "Layer", len(lines), {"mlp"}, lambda _: False).branches == {}


_RESHAPED_SOURCE = '''
class Layer:
    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.feed_forward(hidden_states)
        if self.is_moe_layer:
            hidden_states, _ = hidden_states
        hidden_states = residual + hidden_states.view(residual.shape)
        return hidden_states + self.scale(hidden_states).view(residual.shape)
'''


def test_a_term_re_shaped_by_a_tensor_method_is_the_module_output_it_re_shapes(tmp_path: Path) -> None:
    """Llama 4 adds ``hidden_states.view(residual.shape)``: a view keeps every token's channels, so the term is
    still ``feed_forward``'s output (through the tuple's first item an MoE layer unpacks); a module call's view is not
    followed into that module's input."""
    source = tmp_path / "modeling_reshaped.py"
    source.write_text(_RESHAPED_SOURCE, encoding="utf-8")
    lines = _RESHAPED_SOURCE.splitlines()
    add = branch_terms(source, "Layer", lines.index("        hidden_states = residual + hidden_states.view("
                                                    "residual.shape)") + 1, {"feed_forward"}, lambda _: False)
    assert add.branches["feed_forward"].term == "hidden_states.view(residual.shape)"
    assert branch_terms(source, "Layer", len(lines), {"feed_forward"}, lambda _: False).branches == {}


_PRODUCT_SOURCE = '''
class Layer:
    def forward(self, hidden_states):
        attn_output = self.attn(hidden_states) * self.multiplier
        hidden_states = hidden_states + 0.5 * attn_output / self.config.divisor
        mlp_output = self.gamma * self.mlp(hidden_states)
        return hidden_states + mlp_output
'''


def test_a_branch_output_times_constants_is_read_at_their_product_of_its_scale(tmp_path: Path) -> None:
    """``self.attn(x) * self.multiplier``, then ``0.5 * ... / self.config.divisor`` in the add: the term is the
    attention's output, its factors the three constants, and the new norm's scale is their product's size times
    the output's. A learned per-channel gain (``self.gamma``, a vector parameter: BEiT's layer scale) is measured
    with the output instead (the site's ``channel_scale``); a learned scalar gain is no constant, and is refused
    with that reason."""
    source = tmp_path / "modeling_product.py"
    source.write_text(_PRODUCT_SOURCE, encoding="utf-8")
    lines = _PRODUCT_SOURCE.splitlines()
    add = branch_terms(source, "Layer", lines.index("        hidden_states = hidden_states + 0.5 * attn_output / "
                                                    "self.config.divisor") + 1, {"attn"}, lambda _: False)
    term = add.branches["attn"]
    assert [(factor.text, factor.divides) for factor in term.factors] == [
        ("self.multiplier", False), ("0.5", False), ("self.config.divisor", True)]
    holder = torch.nn.Module()
    holder.multiplier, holder.config = -3.0, transformers.PretrainedConfig(divisor=4)
    factor, channel_scale = _factor(holder, term, "modeling_product.py")
    assert factor == pytest.approx(-3.0 * 0.5 / 4) and channel_scale == ""
    gained = branch_terms(source, "Layer", len(lines), {"mlp"}, lambda _: False).branches["mlp"]
    holder.gamma = torch.nn.Parameter(torch.ones(8))
    assert _factor(holder, gained, "modeling_product.py") == (1.0, "gamma")
    holder.gamma = torch.nn.Parameter(torch.ones(()))
    with pytest.raises(AddNormError, match=r"multiplied by self.gamma .* no number but a Parameter"):
        _factor(holder, gained, "modeling_product.py")

_HELPER_SOURCE = '''
def dropout_add(x, residual, prob, training):
    out = F.dropout(x, p=prob, training=training)
    out = residual + out
    return out


def scaled_add(x, residual):
    return residual + 2 * x


class Attention:
    def forward(self, hidden_states, residual):
        output = self.dense(hidden_states)
        output = dropout_add(output, residual, self.hidden_dropout, training=self.training)
        return scaled_add(self.dense(hidden_states), residual=residual)
'''


def test_a_term_of_an_add_inside_a_module_level_function_is_the_argument_its_call_passes(tmp_path: Path) -> None:
    """BLOOM adds inside ``dropout_add(x, residual, ...)``: the helper's terms are followed back to its parameters
    (through its dropout), and the branch's term is the argument the class's call passes for one of them. A term the
    helper computes (``2 * x``, or a call that does not pass its input through) is no argument, and is refused."""
    source = tmp_path / "modeling_helper.py"
    source.write_text(_HELPER_SOURCE, encoding="utf-8")
    lines = _HELPER_SOURCE.splitlines()
    add_line = lines.index("    out = residual + out") + 1
    call_line = lines.index("        output = dropout_add(output, residual, self.hidden_dropout, "
                            "training=self.training)") + 1
    add = helper_call_terms(source, "Attention", call_line, add_line, {"dense"}, {"F.dropout"}.__contains__)
    assert add.terms == ("residual", "output") and add.others() == ("residual",) and add.helper == "dropout_add"
    assert add.branches["dense"].term == "output" and add.branches["dense"].call_line == call_line - 1
    with pytest.raises(CodegenError, match="the term out of dropout_add's residual add"):  # dropout not passed
        helper_call_terms(source, "Attention", call_line, add_line, {"dense"}, set().__contains__)
    with pytest.raises(CodegenError, match=r"the term 2 \* x of scaled_add's residual add .* is not one of the"):
        helper_call_terms(source, "Attention", len(lines), lines.index("    return residual + 2 * x") + 1, {"dense"},
                          {"F.dropout"}.__contains__)
