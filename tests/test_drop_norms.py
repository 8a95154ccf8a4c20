"""Dropping a slot's norms by folding their calibrated stand-ins (docs/design.md §6).

The stand-in is not the norm, so the converted model differs from the source; what must hold to float
rounding is that it equals the source with those norms *replaced by their stand-ins* (``stand_in_reference``),
on models whose every weight, norm weight and bias is perturbed off its init (a unit norm hides a missed fold).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch
import transformers
from torch import nn
from transformers import CONFIG_MAPPING, PretrainedConfig, PreTrainedModel

import normswap
from normswap.conversion import drop_norms, norm_neighbours
from normswap.conversion.calibration import CalibratedScale, CalibrationSite, calibrate
from normswap.conversion.compose import compose
from normswap.conversion.drop_norms import StandInError, drop_out_norms, drop_pre_norms
from normswap.conversion.passes import Pass
from normswap.conversion.program import TensorProgram, copy_of, evaluate
from normswap.conversion.setup import convert_in_memory
from normswap.conversion.stand_in import stand_in_reference
from normswap.conversion.verify import probe_inputs
from normswap.topology import OFFSET_NORM_KINDS

_DECODER = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 128,
            "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 0, "eos_token_id": 1,
            "bos_token_id": 2}
_MOE = {"num_experts": 4, "num_experts_per_tok": 2}
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gemma2": ("gemma2", "Gemma2ForCausalLM", {**_DECODER, "head_dim": 16}),  # offset (1 + w) RMSNorms
    "olmo2": ("olmo2", "Olmo2ForCausalLM", _DECODER),  # post-sublayer: out norms only
    "glm4": ("glm4", "Glm4ForCausalLM", {**_DECODER, "head_dim": 16}),  # its post_attention_layernorm is a pre norm
    # sandwich MoE: a dense first layer, then routed experts (fused 3-d weights) plus a shared expert of linear maps,
    # summed into the MLP's out norm: both must take the stand-in
    "afmoe": ("afmoe", "AfmoeForCausalLM", {**_DECODER, **_MOE, "moe_intermediate_size": 32, "num_shared_experts": 1,
                                            "num_dense_layers": 1, "head_dim": 16}),
    "flex_olmo": ("flex_olmo", "FlexOlmoForCausalLM", {**_DECODER, **_MOE}),  # post-sublayer MoE
    "gpt2": ("gpt2", "GPT2LMHeadModel", {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128}),  # Conv1D, LN
    "mixtral": ("mixtral", "MixtralForCausalLM", {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "llama": ("llama", "LlamaForCausalLM", _DECODER),
    "gptj": ("gptj", "GPTJForCausalLM", {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "vocab_size": 128}),
    # the residual is taken after the input norm: the add reads the norm's output
    "bloom_post_residual": ("bloom", "BloomForCausalLM", {"hidden_size": 64, "n_layer": 2, "n_head": 4,
                                                          "vocab_size": 128,
                                                          "apply_residual_connection_post_layernorm": True}),
    # attention reads its norm's output times a number (attention_in_multiplier): the fold goes through it
    "falcon_h1": ("falcon_h1", "FalconH1ForCausalLM", {
        **_DECODER, "head_dim": 16, "mamba_d_ssm": 128, "mamba_n_heads": 16, "mamba_d_head": 8, "mamba_d_state": 16,
        "mamba_chunk_size": 16, "attention_in_multiplier": 1.7, "attn_out_multiplier": 0.6,
        "ssm_out_multiplier": 0.3, "tie_word_embeddings": False}),
}
CASES = [("gemma2", "out", "pre"), ("olmo2", "out", "none"), ("glm4", "out", "pre"), ("afmoe", "out", "pre"),
         ("flex_olmo", "out", "none"), ("gemma2", "pre", "post-sublayer"), ("glm4", "pre", "post-sublayer"),
         ("gpt2", "pre", "none"), ("llama", "pre", "none"),
         # a router reading a reshaped copy through F.linear of its raw weight, fused experts (experts, 2i, d)
         ("mixtral", "pre", "none"), ("afmoe", "pre", "post-sublayer"), ("falcon_h1", "pre", "none"),
         # q_proj, k_proj and v_proj have no bias: the generated code gives them one for ln_1's beta
         ("gptj", "pre", "none")]
TOLERANCE = 1e-5  # of max|reference|, fp32


def perturbed(family: str) -> torch.nn.Module:
    """Every parameter moved off its init; no norm left a unit norm (``1 + w`` for offset norms)."""
    model_type, model_class, fields = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(CONFIG_MAPPING[model_type](**fields)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    for norm in normswap.inspect(model).residual_norms:
        module = model.get_submodule(norm.path)
        gain = module.weight + 1 if norm.kind in OFFSET_NORM_KINDS else module.weight
        assert (gain - 1).abs().min() > 0, norm.path
        if getattr(module, "bias", None) is not None:
            assert module.bias.abs().min() > 0, norm.path
    return model


def make_pass(model: torch.nn.Module, slot: str) -> Pass:
    return (drop_out_norms if slot == "out" else drop_pre_norms)(model, normswap.inspect(model))


def converted_by(model: torch.nn.Module, pass_: Pass) -> tuple[torch.nn.Module, Any, dict[str, torch.Tensor]]:
    probe = probe_inputs(model, None, None)
    converted, setup, _ = convert_in_memory(model, compose(model, normswap.inspect(model), [pass_], "drop norms"),
                                            probe)
    return converted, setup, probe


def logits(model: torch.nn.Module, probe: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**probe).logits.double()


def relative(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return float((actual - reference).abs().max() / reference.abs().max())


def measured_scales(model: torch.nn.Module, sites: list[CalibrationSite], probe: dict[str, torch.Tensor]
                    ) -> dict[str, float]:
    """Each site's mean per-token RMS (std) over real tokens, computed here from captured norm inputs."""
    captured: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(site.module).register_forward_pre_hook(
        lambda _m, args, path=site.module: captured.__setitem__(path, args[0].detach().double())) for site in sites]
    with torch.no_grad():
        model(**probe)
    for handle in handles:
        handle.remove()
    mask = probe["attention_mask"].bool()
    found = {}
    for site in sites:
        tokens = captured[site.module][mask]
        if site.statistic == "std":
            tokens = tokens - tokens.mean(-1, keepdim=True)
        found[site.module] = float((tokens.pow(2).mean(-1) + site.eps).sqrt().mean())
    return found


@pytest.mark.parametrize(("family", "slot", "placement"), CASES, ids=[f"{f}-{s}" for f, s, _ in CASES])
def test_folded_stand_ins_equal_the_stand_in_reference(family: str, slot: str, placement: str) -> None:
    model = perturbed(family)
    pass_ = make_pass(model, slot)
    assert pass_.placement == placement and not pass_.exact
    converted, setup, probe = converted_by(model, pass_)

    target = normswap.inspect(converted)
    assert target.placement == placement == setup.plan.target_placement
    assert not [norm for norm in target.residual_norms if norm.slot == slot]
    removed = [move.norm.rsplit(".", 1)[-1] for move in pass_.moves]
    assert not any(f"self.{attribute}(" in setup.generated.source for attribute in removed)  # never called

    scales = {scale.site: scale for scale in setup.scales}
    with stand_in_reference(model, pass_, scales):
        reference = logits(model, probe)
    actual, source = logits(converted, probe), logits(model, probe)
    assert relative(actual, reference) <= TOLERANCE
    assert relative(actual, source) > 1e-2  # the stand-in is not the norm

    expected = measured_scales(model, list(scales), probe)
    assert {site.module: scale.scale for site, scale in scales.items()} == pytest.approx(expected, rel=1e-9)
    eps = {norm.path: norm.eps for norm in normswap.inspect(model).residual_norms}
    assert all(site.eps == eps[site.module] and site.side == "input" for site in scales)
    assert {site.statistic for site in scales} == {"std" if family in ("gpt2", "gptj") else "rms"}
    given = sorted(name for name, module in converted.named_modules()
                   if isinstance(module, nn.Linear) and module.bias is not None
                   and getattr(model.get_submodule(name), "bias", None) is None)
    assert ("normswap_give_bias(" in setup.generated.source) == bool(given) == (family == "gptj")
    assert all(converted.get_submodule(name).bias.abs().max() > 0 for name in given)  # W beta, beta perturbed


def test_the_stand_in_reference_can_fail_unfolded_weights() -> None:
    """The same pass with its folds left out (norms removed, writers untouched) misses the reference: the check
    above can fail."""
    model = perturbed("gemma2")
    pass_ = make_pass(model, "out")

    def remove_only(steps: dict, scales: Any) -> None:
        norms = normswap.inspect(model).residual_norms
        drop_norms._remove_norm_tensors(model, [norm for norm in norms if norm.slot == "out"], steps)

    converted, setup, probe = converted_by(model, dataclasses.replace(pass_, rewrite=remove_only))
    with stand_in_reference(model, pass_, {scale.site: scale for scale in setup.scales}):
        reference = logits(model, probe)
    assert relative(logits(converted, probe), reference) > 1e-2


def test_every_writer_of_a_summed_branch_output_takes_the_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """AFMoE's MLP adds a shared expert's output to the routed experts' before its out norm. Folding into the last
    linear map alone (the routed experts) leaves the shared expert unscaled, and the reference sees it."""
    model = perturbed("afmoe")
    found = norm_neighbours.norm_inputs

    def last_writer_only(*args: Any) -> dict[str, norm_neighbours.NormInput]:
        return {norm: dataclasses.replace(read, terms=read.terms[-1:]) for norm, read in found(*args).items()}

    full = make_pass(model, "out")
    (shared,) = [move for move in full.moves if len(move.into) == 2]
    assert {key.rsplit(".", 2)[-2] for key in shared.into} == {"down_proj", "experts"}
    monkeypatch.setattr(drop_norms, "norm_inputs", last_writer_only)
    partial = make_pass(model, "out")
    converted, setup, probe = converted_by(model, partial)
    with stand_in_reference(model, full, {scale.site: scale for scale in setup.scales}):
        reference = logits(model, probe)
    assert relative(logits(converted, probe), reference) > 1e-3


@pytest.mark.parametrize(("family", "slot"), [("gemma2", "out"), ("olmo2", "out"), ("gpt2", "pre")])
def test_stand_in_on_a_token_at_the_calibrated_scale_is_the_norm(family: str, slot: str) -> None:
    """On a token whose own RMS (LayerNorm: std) is ``s``, the stand-in and the norm agree: ``s`` is what the norm
    divides by, ``g`` is ``1 + w`` for Gemma's offset norms, and a LayerNorm's stand-in centres and adds its bias.
    This checks the stand-in against the norm itself, apart from the folds (which share its maths)."""
    model = perturbed(family)
    pass_ = make_pass(model, slot)
    move = pass_.moves[0]
    norm = model.get_submodule(move.norm)
    token = torch.randn(1, 1, 64) * 3 + 0.5
    wide = token.double()
    if move.site.statistic == "std":
        wide = wide - wide.mean()
    scale = float((wide.pow(2).mean() + move.site.eps).sqrt())
    scales = {move.site: CalibratedScale(move.site, scale, 1, 0.0)}
    with torch.no_grad():
        plain, plain_twice = norm(token), norm(token * 2)
        with stand_in_reference(model, dataclasses.replace(pass_, moves=(move,)), scales):
            stood_in, stood_in_twice = norm(token), norm(token * 2)
    assert torch.allclose(stood_in, plain, rtol=1e-5, atol=1e-6)
    # a token of another scale: the norm's output keeps its size, the stand-in's grows with its input
    assert not torch.allclose(stood_in_twice, plain_twice, rtol=1e-2)


@pytest.mark.parametrize(("family", "slot", "reason"), [
    ("llama", "out", "has no out norms"),
    ("bloom_post_residual", "pre", "input_layernorm is read by add, not only by linear maps"),
])
def test_refusals_name_their_structural_reason(family: str, slot: str, reason: str) -> None:
    with pytest.raises(StandInError, match=reason):
        make_pass(perturbed(family), slot)


class GatedConfig(PretrainedConfig):
    model_type = "normswap-toy-gated"

    def __init__(self, hidden_size: int = 16, num_hidden_layers: int = 2, rms: bool = False, variant: str = "",
                 **kwargs: Any) -> None:
        self.hidden_size, self.num_hidden_layers, self.rms, self.variant = hidden_size, num_hidden_layers, rms, variant
        super().__init__(**kwargs)


class GatedLayer(nn.Module):
    """A branch whose output is three terms summed before its out norm: a linear map's output (scaled per channel
    by a LayerScale in the RMSNorm variant), a shared expert's gated by a per-token scalar, and a bias added outside
    any linear map."""

    def __init__(self, config: GatedConfig) -> None:
        super().__init__()
        d = config.hidden_size
        norm = (lambda: nn.RMSNorm(d, eps=1e-6)) if config.rms else (lambda: nn.LayerNorm(d))
        self.norm, self.out_norm = norm(), norm()
        self.up, self.down, self.shared, self.gate = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Linear(d, d), \
            nn.Linear(d, 1)
        self.shift = nn.Parameter(torch.zeros(d))
        self.layer_scale = nn.Parameter(torch.ones(d)) if config.rms else None
        self.variant = config.variant
        self.extra = nn.Linear(d, d)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.norm(hidden_states)
        if self.variant == "scaled-read":  # every reader reads the norm's output times a number
            x = 2.5 * x / 2.0
        if self.variant in ("routed-read", "channel-read"):
            return hidden_states + self._routed(x)
        if self.variant == "sequence-first-read":  # Longformer's and LED's ``h.transpose(0, 1)``: channels stay last
            return hidden_states + self.down(torch.relu(self.up(x.transpose(0, 1)))).transpose(0, 1)
        if self.variant == "channels-first-read":  # the channels moved off the last axis (PVT's, before a conv)
            return hidden_states + self.down(torch.relu(self.up(x.transpose(1, 2).transpose(1, 2))))
        written = self.down(torch.relu(self.up(x)))
        if self.layer_scale is not None:
            written = self.layer_scale * written
        written = written + torch.sigmoid(self.gate(x)) * self.shared(x) + self.shift
        if self.variant == "self-gated":  # scaled per token by a function of itself: not linear in it
            written = written * torch.sigmoid(written.mean(-1, keepdim=True))
        if self.variant == "escaping":  # the branch output is read by something else too
            return hidden_states + self.out_norm(written) + self.extra(written)
        return hidden_states + self.out_norm(written)

    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        """What an MoE block does with its input (GraniteMoE, JetMoE, Kolibri): a router reads it through a cast,
        its weights take the input's dtype (``type_as``: only the dtype is read), an expert reads the rows of the
        tokens routed to it; ``channel-read`` picks channels instead, which no fold of the channels passes."""
        flat = x.reshape(-1, x.shape[-1])
        gates = torch.sigmoid(self.gate(flat.type(torch.float32))).type_as(flat)
        picked = torch.arange(0, flat.shape[0], 2)
        rows = flat[picked] if self.variant == "routed-read" else flat[:, torch.arange(flat.shape[-1] - 1, -1, -1)]
        expert = torch.zeros(flat.shape).index_add(0, picked, gates[picked] * self.shared(rows)[:len(picked)])
        return (self.down(torch.relu(self.up(flat))) + expert).reshape(x.shape)


class GatedModel(PreTrainedModel):
    config_class = GatedConfig
    main_input_name = "input_ids"

    def __init__(self, config: GatedConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(32, config.hidden_size)
        self.layers = nn.ModuleList([GatedLayer(config) for _ in range(config.num_hidden_layers)])
        self.final = nn.RMSNorm(config.hidden_size, eps=1e-6) if config.rms else nn.LayerNorm(config.hidden_size)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        hidden_states = self.embed(input_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.final(hidden_states)


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm-layer-scale"])
def test_every_term_of_a_branch_output_takes_the_stand_in(rms: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The three terms of ``GatedLayer``'s output are found by behaviour and each takes ``diag(g/s) [C]``; a
    LayerNorm's ``beta`` goes onto the one unscaled bias (``down``'s), once. The folded weights, run with the out
    norms gone, equal the source run with the out norms replaced by their stand-ins. (Code generation reads the
    source lines of transformers' modeling files, which a test module is not: the weights alone are checked.)"""
    monkeypatch.setattr(drop_norms, "removed_norm_edits", lambda *args: [])
    model = _perturbed_gated(rms=rms)
    pass_ = make_pass(model, "out")
    assert pass_.moves[0].into == (
        "layers.0.down.weight", "layers.0.down.bias", "layers.0.shared.weight", "layers.0.shared.bias",
        "layers.0.shift")
    ids = {"input_ids": torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))}
    scales = calibrate(model, pass_.calibration, ids)
    steps = {key: copy_of(key) for key in model.state_dict()}
    assert pass_.rewrite is not None
    pass_.rewrite(steps, scales)
    kept = {key: step for key, step in steps.items() if ".out_norm." not in key}
    state, _ = evaluate(TensorProgram(kept), model.state_dict(), torch.float32)
    folded = copy.deepcopy(model)
    for layer in folded.layers:
        layer.out_norm = nn.Identity()
    folded.load_state_dict(state)
    with torch.no_grad():
        with stand_in_reference(model, pass_, scales):
            reference = model(**ids).double()
        actual, source = folded(**ids).double(), model(**ids).double()
    assert relative(actual, reference) <= TOLERANCE
    assert relative(actual, source) > 1e-2


@pytest.mark.parametrize(("variant", "reason"), [
    ("self-gated", "the input of layers.0.out_norm is not a sum of linear maps' outputs"),
    ("escaping", "layers.0.down's part of the input of layers.0.out_norm is also read by linear"),
])
def test_a_branch_output_that_is_not_linear_in_its_writers_is_refused(variant: str, reason: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(drop_norms, "removed_norm_edits", lambda *args: [])
    with pytest.raises(StandInError, match=reason):
        make_pass(GatedModel(GatedConfig(variant=variant)).eval(), "out")


def test_a_pre_norm_read_times_a_number_folds_its_bias_times_that_number(monkeypatch: pytest.MonkeyPatch) -> None:
    """``GatedLayer`` in its ``scaled-read`` variant reads ``2.5 * N(h) / 2``: the readers take ``W diag(g) C / s``
    and, for the LayerNorm's ``beta``, ``b + 1.25 W beta``. The folded weights, run with the pre norms gone (the
    product stays in the code), equal the source run with its pre norms replaced by their stand-ins; ``beta``
    folded once, not 1.25 times, misses them."""
    monkeypatch.setattr(drop_norms, "removed_norm_edits", lambda *args: [])
    model = _perturbed_gated(variant="scaled-read")
    readers = norm_neighbours.pre_norm_readers(model, ["layers.0.norm"])["layers.0.norm"].readers
    assert {reader.weight: reader.factor for reader in readers} == {
        "layers.0.up.weight": 1.25, "layers.0.shared.weight": 1.25, "layers.0.gate.weight": 1.25}
    actual, reference = _pre_norms_folded(model, make_pass(model, "pre"))
    assert relative(actual, reference) <= TOLERANCE
    found = norm_neighbours.pre_norm_readers
    monkeypatch.setattr(drop_norms, "pre_norm_readers", lambda *args: {
        norm: dataclasses.replace(read, readers=tuple(dataclasses.replace(r, factor=1.0) for r in read.readers))
        for norm, read in found(*args).items()})
    actual, reference = _pre_norms_folded(model, make_pass(model, "pre"))
    assert relative(actual, reference) > 1e-3


def test_a_pre_norm_read_as_an_moe_reads_it_folds_into_every_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a cast (``.type``), as a dtype template (``w.type_as(h)`` reads no value of ``h``) and by token rows
    (``h[rows]``), a pre norm's output still reaches only linear maps: all three are found, and the folded weights,
    run with the pre norms gone, equal the source run with its pre norms replaced by their stand-ins. Those three
    refused GraniteMoE, JetMoE and Kolibri to post-sublayer ("read by type_as"); picking channels is still refused."""
    _assert_folds_and_foreign(monkeypatch, "routed-read", {"up", "shared", "gate"}, "channel-read", "__getitem__")


def test_a_pre_norm_read_sequence_first_folds_and_one_read_channels_first_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A transpose that keeps the channels last (Longformer's and LED's sequence-first attention) passes the norm's
    output to its readers whole: they fold, and equal the source with its pre norms replaced by their stand-ins. One
    that moves the channels is still a foreign read."""
    _assert_folds_and_foreign(monkeypatch, "sequence-first-read", {"up"}, "channels-first-read", "transpose")


def _assert_folds_and_foreign(monkeypatch: pytest.MonkeyPatch, variant: str, readers: set[str], foreign: str,
                              read_by: str) -> None:
    """``GatedModel`` in ``variant``: its pre norm's output reaches exactly ``readers`` (modules of the layer), whose
    folded weights, run with the pre norms gone, equal the source with its pre norms replaced by their stand-ins;
    in ``foreign`` the norm's output is read by ``read_by``, which no fold passes."""
    monkeypatch.setattr(drop_norms, "removed_norm_edits", lambda *args: [])
    model = _perturbed_gated(variant=variant)
    found = norm_neighbours.pre_norm_readers(model, ["layers.0.norm"])["layers.0.norm"]
    assert found.reason == "" and {reader.weight for reader in found.readers} == {
        f"layers.0.{reader}.weight" for reader in readers}
    actual, reference = _pre_norms_folded(model, make_pass(model, "pre"))
    assert relative(actual, reference) <= TOLERANCE
    with torch.no_grad():  # the stand-ins are not the norms: the check can fail
        assert relative(model(**_IDS).double(), reference) > 1e-3
    other = GatedModel(GatedConfig(variant=foreign)).eval()
    assert f"layers.0.norm is read by {read_by}" in norm_neighbours.pre_norm_readers(
        other, ["layers.0.norm"])["layers.0.norm"].reason


_IDS = {"input_ids": torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))}


def _pre_norms_folded(model: nn.Module, pass_: Pass) -> tuple[torch.Tensor, torch.Tensor]:
    """``model`` with its pre norms gone and ``pass_``'s folded weights, and ``model`` with its pre norms replaced by
    their stand-ins (the reference the folded model must compute), both on ``_IDS``."""
    scales = calibrate(model, pass_.calibration, _IDS)
    steps = {key: copy_of(key) for key in model.state_dict()}
    assert pass_.rewrite is not None
    pass_.rewrite(steps, scales)
    kept = {key: step for key, step in steps.items() if key.split(".")[-2:-1] != ["norm"]}
    state, _ = evaluate(TensorProgram(kept), model.state_dict(), torch.float32)
    folded = copy.deepcopy(model)
    for layer in folded.layers:
        layer.norm = nn.Identity()
    folded.load_state_dict(state)
    with torch.no_grad(), stand_in_reference(model, pass_, scales):
        return folded(**_IDS).double(), model(**_IDS).double()


def _perturbed_gated(**settings: Any) -> GatedModel:
    """A ``GatedModel`` whose every weight is moved away from its initial value (folding bugs hide at init)."""
    torch.manual_seed(0)
    model = GatedModel(GatedConfig(**settings)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return model
