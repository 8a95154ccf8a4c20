"""RMSNorm -> LayerNorm, approximate: the same weights in a LayerNorm with bias 0, and a drift report.

LayerNorm also removes the stream's mean, which an RMSNorm model never saw removed, so the function
changes; the report says by how much, and healing (``normswap heal``) closes the gap. Gemma's offset
norms (``(1 + w) * x / rms(x)``) take ``1 + w`` as their LayerNorm weight. For an exact conversion of
Llama, Mistral and Qwen2 use ``exact=True`` (one extra hidden dimension).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ..codegen.derive import layer_norm_edits, modeling_file
from ..codegen.package import GeneratedModule, config_fields, load_generated, package_module
from ..codegen.rewrite import apply_edits
from ..detect import inspect
from ..errors import NormswapError
from ..version import __version__
from .native import build_with_weights
from .norm_kind import NormKindPlan
from .verify import DriftReport, measure_drift, probe_inputs

_RMS_KINDS = frozenset({"rmsnorm", "rmsnorm-offset"})


def convert_to_layer_norm_approximate(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None
                                      ) -> tuple[nn.Module, NormKindPlan, DriftReport, GeneratedModule]:
    """The LayerNorm version of a Pre-RMSNorm ``model`` (not exact), its plan and drift report."""
    topology = inspect(model)
    sites = [*topology.residual_norms, *(s.final_norm for s in topology.stacks if s.final_norm)]
    kinds = {site.kind for site in sites}
    if topology.placement not in ("pre", "parallel") or not kinds <= _RMS_KINDS:
        raise NormswapError(f"{topology.model_type} is '{topology.summary()}'; RMSNorm -> LayerNorm starts from a "
                            "Pre-RMSNorm model")
    probe = inputs or probe_inputs(model, None, None)
    path = modeling_file(model, topology)
    rewritten = apply_edits(path.read_text(encoding="utf-8"), layer_norm_edits(model, topology))
    original = sys.modules[type(model.get_submodule(topology.layers[0].path)).__module__]
    generated = package_module(original, rewritten, type(model.config),
                               "norm RMSNorm -> LayerNorm (approximate: same weights, bias 0)", layer_norm=True)
    module = load_generated(generated)
    cls = getattr(module, type(model).__name__)
    config: Any = getattr(module, generated.config_class).from_dict(config_fields(model.config))
    config.architectures = [type(model).__name__]
    config.auto_map = generated.auto_map(topology.model_type)

    state = dict(model.state_dict())
    for site in sites:
        weight = state[f"{site.path}.weight"]
        if site.kind == "rmsnorm-offset":
            weight = (weight.double() + 1.0).to(weight.dtype)  # (1 + w) * n
        state[f"{site.path}.weight"] = weight
        state[f"{site.path}.bias"] = torch.zeros_like(weight)
    parameter = next(model.parameters())
    converted = build_with_weights(cls, config, state, parameter.dtype, parameter.device)
    converted.train(model.training)
    plan = NormKindPlan(topology.model_type, generated.model_type, f"generated code: {generated.file_name}",
                        tuple(site.path for site in sites), (), exact=False, kind="layernorm")
    converted.config.normswap = {"version": __version__, "source": getattr(model.config, "_name_or_path", None),
                                 "source_model_type": topology.model_type,
                                 "conversion": "norm rmsnorm -> layernorm (approximate)",
                                 "realisation": plan.realisation, "exact": False}
    report = measure_drift(model, converted, topology, inspect(converted), probe, exact=False)
    converted.normswap_plan = plan
    return converted, plan, report, generated
