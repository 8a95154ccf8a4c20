"""RMSNorm -> LayerNorm, approximate: the same weights in a LayerNorm with bias 0, and a drift report.

LayerNorm also removes the stream's mean, which an RMSNorm model never saw removed, so the function
changes; the report says by how much, and healing (``normswap heal``) closes the gap. Gemma's offset
norms (``(1 + w) * x / rms(x)``) take ``1 + w`` as their LayerNorm weight. For an exact conversion of a
Pre-RMSNorm decoder use ``exact=True`` (one extra hidden dimension).
"""

from __future__ import annotations

import torch
from torch import nn

from ..codegen.derive import layer_norm_edits, owner_and_attribute, rms_norm_replacement
from ..codegen.edits import ReplaceNormClass
from ..detect import inspect
from ..errors import NormswapError
from ..topology import Topology
from .generated import generate_family_code
from .norm_kind import NormKindPlan, check_exact
from .program import TensorProgram, combine, copy_of, one_plus
from .setup import ConversionSetup, Verifier
from .verify import DriftReport, measure_drift

_RMS_KINDS = frozenset({"rmsnorm", "rmsnorm-offset", "rmsnorm-noaffine"})
_LAYER_NORM_KINDS = frozenset({"layernorm", "layernorm-nobias", "layernorm-offset"})


def plan_layer_norm_approximate(model: nn.Module) -> ConversionSetup:
    """The LayerNorm version of an RMSNorm ``model`` (not exact), verified by a drift report.

    The same weights in a LayerNorm with bias 0 are as close for norms inside a branch (sandwich,
    post-sublayer) as for pre norms, so any placement takes it; an RMSNorm on the embeddings (AIMv2's) becomes
    a LayerNorm too, so that no RMSNorm is left in the residual path. A weightless RMSNorm (NanoChat's) becomes
    a weightless LayerNorm."""
    topology = inspect(model)
    embedding = tuple(stack.embedding_norm for stack in topology.stacks
                      if stack.embedding_norm is not None and stack.embedding_norm.kind in _RMS_KINDS)
    present = tuple(site for site in (*topology.stream_norms, *embedding) if site.kind != "identity")
    sites = tuple(site for site in present if site.kind in _RMS_KINDS)  # LayerNorms beside them stay as they are
    if not sites or not {site.kind for site in present} <= _RMS_KINDS | _LAYER_NORM_KINDS:
        raise NormswapError(f"{topology.model_type} is '{topology.summary()}'; RMSNorm -> LayerNorm starts from a "
                            "model whose norms are RMSNorms")
    edits = [*layer_norm_edits(model, topology, only={site.path for site in sites}),
             *(ReplaceNormClass(*owner_and_attribute(model, norm.path), new_class="NormswapLayerNorm", wrap=True)
               for norm in embedding)]
    generated, cls, config = generate_family_code(model, topology, list(dict.fromkeys(edits)),
                                       "norm RMSNorm -> LayerNorm (approximate: same weights, bias 0)", layer_norm=True)

    steps = {key: copy_of(key) for key in model.state_dict()}
    for site in sites:
        if site.kind == "rmsnorm-noaffine":  # a weightless LayerNorm stands in: nothing to write
            continue
        weight = steps[f"{site.path}.weight"]
        if site.kind == "rmsnorm-offset":
            weight = combine(one_plus, weight)  # (1 + w) * n
        steps[f"{site.path}.weight"] = weight
        steps[f"{site.path}.bias"] = combine(torch.zeros_like, weight)
    plan = NormKindPlan(topology.model_type, generated.model_type, f"generated code: {generated.file_name}",
                        tuple(site.path for site in sites), (), exact=False, kind="layernorm")
    return ConversionSetup(plan, TensorProgram(steps), cls, config, generated,
                           "norm rmsnorm -> layernorm (approximate)", verify=_drift(topology))


def _drift(topology: Topology) -> Verifier:
    """Inexact conversions are verified by measuring how far each branch's input moved."""
    def verify(original: nn.Module, converted: nn.Module, probe: dict[str, torch.Tensor]) -> DriftReport:
        return measure_drift(original, converted, topology, inspect(converted), probe, exact=False)

    return verify


def plan_rms_norm_approximate(model: nn.Module, exact_impossible: str = "") -> ConversionSetup:
    """RMSNorm for a Post-LN ``model``: not exact, with a drift report.

    A Post-LN norm reads ``h + F(h)`` where ``h`` is the previous norm's output ``g * n + b``, whose mean no
    weight change can remove (docs/design.md §7); the RMSNorm keeps the weight and the bias, and healing closes
    the gap. A Pre-LN model takes this path only with ``exact_impossible``, the reason its exact map failed
    (a vision tower that returns its un-normalised stream: the exact map would centre that output).
    """
    topology = inspect(model)
    sites = [norm for layer in topology.layers for sub in layer.sublayers for norm in sub.norms]
    sites += [edge for stack in topology.stacks for edge in (stack.embedding_norm, stack.final_norm) if edge]
    present = [site for site in sites if site.kind != "identity"]  # a placeholder where a norm is left out
    sites = [site for site in present if site.kind in _LAYER_NORM_KINDS]  # RMSNorms beside them stay as they are
    if (topology.placement in ("pre", "parallel") and not exact_impossible) or not sites or not (
            {site.kind for site in present} <= _LAYER_NORM_KINDS | _RMS_KINDS):
        raise NormswapError(f"{topology.model_type} is '{topology.summary()}'; the approximate LayerNorm -> RMSNorm "
                            "path is for models with norms after their sublayers (Pre-LN models convert exactly)")
    layout = "Post-LN" if topology.placement == "post" else topology.placement
    edits = [rms_norm_replacement(model, site) for site in sites]
    generated, cls, config = generate_family_code(model, topology, list(dict.fromkeys(edits)),
                                       f"norm LayerNorm -> RMSNorm (approximate: {layout})", rms_norm=True)
    plan = NormKindPlan(topology.model_type, generated.model_type, f"generated code: {generated.file_name}",
                        tuple(site.path for site in sites), (), exact=False, kind="rmsnorm",
                        exact_impossible=exact_impossible)
    steps = {key: copy_of(key) for key in model.state_dict()}
    for site in sites:  # Nemotron's (1 + w) LayerNorms: plain weights
        if site.kind == "layernorm-offset":
            steps[f"{site.path}.weight"] = combine(one_plus, steps[f"{site.path}.weight"])
    return ConversionSetup(plan, TensorProgram(steps), cls, config, generated,
                           f"norm layernorm -> rmsnorm (approximate, {layout})", verify=_drift(topology))


def plan_offset_to_rms_norm(model: nn.Module) -> ConversionSetup:
    """Gemma-style ``(1 + w)`` RMSNorms as plain RMSNorms with weight ``1 + w``: exact, and checked. The model's
    other norms must be RMSNorms already (a plain final norm, a weightless embedding norm), and stay as they are."""
    topology = inspect(model)
    norms = [norm for norm in topology.all_norms if norm.kind != "identity"]
    sites = [norm for norm in norms if norm.kind == "rmsnorm-offset"]
    if not sites or not {norm.kind for norm in norms} <= _RMS_KINDS:
        raise NormswapError(f"{topology.model_type} is '{topology.summary()}'; only a model whose norms are all "
                            "RMSNorms, some of them (1 + w), has offset RMSNorms to make plain")
    edits = [ReplaceNormClass(*owner_and_attribute(model, site.path), new_class="NormswapPlainRMSNorm")
             for site in sites]
    generated, cls, config = generate_family_code(model, topology, list(dict.fromkeys(edits)),
                                       "norm RMSNorm (1 + w) -> RMSNorm (exact: w := 1 + w)", plain_rms_norm=True)
    steps = {key: copy_of(key) for key in model.state_dict()}
    for site in sites:
        steps[f"{site.path}.weight"] = combine(one_plus, steps[f"{site.path}.weight"])
    plan = NormKindPlan(topology.model_type, generated.model_type, f"generated code: {generated.file_name}",
                        tuple(site.path for site in sites), (), kind="rmsnorm")
    return ConversionSetup(plan, TensorProgram(steps), cls, config, generated,
                           "norm rmsnorm-offset -> rmsnorm (exact)", verify=check_exact)
