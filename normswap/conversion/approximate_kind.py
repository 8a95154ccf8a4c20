"""RMSNorm -> LayerNorm, approximate: the same weights in a LayerNorm with bias 0, and a drift report.

LayerNorm also removes the stream's mean, which an RMSNorm model never saw removed, so the function
changes; the report says by how much, and healing (``normswap heal``) closes the gap. Gemma's offset
norms (``(1 + w) * x / rms(x)``) take ``1 + w`` as their LayerNorm weight. For an exact conversion of
Llama, Mistral and Qwen2 use ``exact=True`` (one extra hidden dimension).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..codegen.derive import layer_norm_edits, owner_and_attribute
from ..codegen.edits import ReplaceNormClass
from ..codegen.package import GeneratedModule
from ..detect import inspect
from ..errors import NormswapError
from .generated import generate_family_code
from .norm_kind import NormKindPlan, build_kind_model, check_exact
from .verify import DriftReport, measure_drift, probe_inputs

_RMS_KINDS = frozenset({"rmsnorm", "rmsnorm-offset"})
_LAYER_NORM_KINDS = frozenset({"layernorm", "layernorm-nobias"})


def convert_to_layer_norm_approximate(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None
                                      ) -> tuple[nn.Module, NormKindPlan, DriftReport, GeneratedModule]:
    """The LayerNorm version of a Pre-RMSNorm ``model`` (not exact), its plan and drift report."""
    topology = inspect(model)
    sites = topology.stream_norms
    kinds = {site.kind for site in sites}
    if topology.placement not in ("pre", "parallel") or not kinds <= _RMS_KINDS:
        raise NormswapError(f"{topology.model_type} is '{topology.summary()}'; RMSNorm -> LayerNorm starts from a "
                            "Pre-RMSNorm model")
    probe = inputs or probe_inputs(model, None, None)
    generated, cls, config = generate_family_code(model, topology, layer_norm_edits(model, topology),
                                       "norm RMSNorm -> LayerNorm (approximate: same weights, bias 0)", layer_norm=True)

    state = dict(model.state_dict())
    for site in sites:
        weight = state[f"{site.path}.weight"]
        if site.kind == "rmsnorm-offset":
            weight = (weight.double() + 1.0).to(weight.dtype)  # (1 + w) * n
        state[f"{site.path}.weight"] = weight
        state[f"{site.path}.bias"] = torch.zeros_like(weight)
    plan = NormKindPlan(topology.model_type, generated.model_type, f"generated code: {generated.file_name}",
                        tuple(site.path for site in sites), (), exact=False, kind="layernorm")
    converted = build_kind_model(model, cls, config, state, plan, "norm rmsnorm -> layernorm (approximate)")
    report = measure_drift(model, converted, topology, inspect(converted), probe, exact=False)
    return converted, plan, report, generated


def convert_to_rms_norm_approximate(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None
                                    ) -> tuple[nn.Module, NormKindPlan, DriftReport, GeneratedModule]:
    """RMSNorm for a Post-LN ``model``: not exact, with a drift report.

    A Post-LN norm reads ``h + F(h)`` where ``h`` is the previous norm's output ``g * n + b``, whose mean no
    weight change can remove (DESIGN.md §3); the RMSNorm keeps the weight and the bias, and healing closes
    the gap.
    """
    topology = inspect(model)
    sites = [norm for layer in topology.layers for sub in layer.sublayers for norm in sub.norms]
    sites += [edge for stack in topology.stacks for edge in (stack.embedding_norm, stack.final_norm) if edge]
    if topology.placement != "post" or not {site.kind for site in sites} <= _LAYER_NORM_KINDS:
        raise NormswapError(f"{topology.model_type} is '{topology.summary()}'; the approximate LayerNorm -> RMSNorm "
                            "path is for Post-LN models (Pre-LN models convert exactly)")
    probe = inputs or probe_inputs(model, None, None)
    edits = [ReplaceNormClass(*owner_and_attribute(model, site.path)) for site in sites]
    generated, cls, config = generate_family_code(model, topology, list(dict.fromkeys(edits)),
                                       "norm LayerNorm -> RMSNorm (approximate: Post-LN)", rms_norm=True)
    plan = NormKindPlan(topology.model_type, generated.model_type, f"generated code: {generated.file_name}",
                        tuple(site.path for site in sites), (), exact=False, kind="rmsnorm")
    converted = build_kind_model(model, cls, config, dict(model.state_dict()), plan,
                                 "norm layernorm -> rmsnorm (approximate, Post-LN)")
    report = measure_drift(model, converted, topology, inspect(converted), probe, exact=False)
    return converted, plan, report, generated


def convert_offset_to_rms_norm(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None
                               ) -> tuple[nn.Module, NormKindPlan, Any, GeneratedModule]:
    """Gemma-style ``(1 + w)`` RMSNorms as plain RMSNorms with weight ``1 + w``: exact, and checked."""
    topology = inspect(model)
    sites = topology.stream_norms
    if {site.kind for site in sites} != {"rmsnorm-offset"}:
        raise NormswapError(f"{topology.model_type} has no offset RMSNorms to make plain")
    probe = inputs or probe_inputs(model, None, None)
    edits = [ReplaceNormClass(*owner_and_attribute(model, site.path), new_class="NormswapPlainRMSNorm")
             for site in sites]
    generated, cls, config = generate_family_code(model, topology, list(dict.fromkeys(edits)),
                                       "norm RMSNorm (1 + w) -> RMSNorm (exact: w := 1 + w)", plain_rms_norm=True)
    state = dict(model.state_dict())
    for site in sites:
        weight = state[f"{site.path}.weight"]
        state[f"{site.path}.weight"] = (weight.double() + 1.0).to(weight.dtype)
    plan = NormKindPlan(topology.model_type, generated.model_type, f"generated code: {generated.file_name}",
                        tuple(site.path for site in sites), (), kind="rmsnorm")
    converted = build_kind_model(model, cls, config, state, plan, "norm rmsnorm-offset -> rmsnorm (exact)")
    report = check_exact(model, converted, probe)
    return converted, plan, report, generated
