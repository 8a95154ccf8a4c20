"""RMSNorm -> LayerNorm, exact, by one extra hidden dimension (docs/design.md §5).

A trained RMSNorm model's stream does not have zero mean, so LayerNorm cannot replace RMSNorm in place.
Carry the stream into d+1 dimensions with ``U`` ((d+1) x d, orthonormal columns orthogonal to the
all-ones vector): ``h' = U h`` has zero mean and the same norm, so a LayerNorm over d+1 with
``eps' = eps * d/(d+1)`` equals ``sqrt((d+1)/d) * U * RMSNorm_1(h)``. Then

* writers (embedding rows, every branch's output projection): ``W -> U W``;
* readers of a norm with weight g (q/k/v, gate/up, lm_head): ``W -> W diag(g) U^T / sqrt((d+1)/d)``;
* every norm becomes a LayerNorm over d+1 with weight 1, bias 0.

This needs a family that lets ``hidden_size`` differ from ``heads x head_dim`` (an explicit ``head_dim``) and
that uses ``hidden_size`` nowhere else: Llama, Mistral, Qwen2. Everything is computed in float64.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..codegen.derive import layer_norm_edits
from ..codegen.package import GeneratedModule
from ..detect import inspect
from ..errors import NormswapError
from ..topology import Topology
from .generated import generate_family_code
from .norm_kind import ExactnessReport, NormKindPlan, branch_writers, check_exact, linear_calls, linear_layout
from .program import Step, TensorProgram, combine, copy_of
from .setup import ConversionSetup, convert_in_memory

SUPPORTED = frozenset({"llama", "mistral", "qwen2"})


def orthonormal_lift(d: int) -> torch.Tensor:
    """U, (d+1) x d in float64: orthonormal columns orthogonal to the all-ones vector (a Householder reflection)."""
    ones = torch.full((d + 1,), 1.0 / math.sqrt(d + 1), dtype=torch.float64)
    last = torch.zeros(d + 1, dtype=torch.float64)
    last[-1] = 1.0
    v = last - ones
    reflection = torch.eye(d + 1, dtype=torch.float64) - 2.0 * torch.outer(v, v) / v.dot(v)
    return reflection[:, :d]  # the reflection maps e_{d+1} to ones/sqrt(d+1); the other columns are orthogonal to it


def plan_layer_norm_exact(model: nn.Module) -> ConversionSetup:
    """Plan the exact LayerNorm twin of a Pre-RMSNorm model, one hidden dimension wider."""
    topology = inspect(model)
    _require_supported(model, topology)
    norms = tuple(n.path for n in topology.residual_norms)
    final = topology.stacks[0].final_norm.path  # type: ignore[union-attr]
    order, readers = linear_calls(model, norms)
    output_embeddings = _path_of(model, model.get_output_embeddings())
    readers[final] = [output_embeddings]  # lm_head reads a slice of the final norm's output
    writers = branch_writers(order, topology)
    embeddings = [path for path, module in model.named_modules() if isinstance(module, nn.Embedding)
                  and not any(path.startswith(layer.path + ".") for layer in topology.layers)]

    d = int(model.config.hidden_size)
    lift = orthonormal_lift(d)
    scale = math.sqrt((d + 1) / d)
    steps = {key: copy_of(key) for key in model.state_dict()}
    for path in writers:
        _lift_writer(model.get_submodule(path), path, steps, lift)
    for path in embeddings:
        steps[f"{path}.weight"] = combine(lambda weight: _wide(weight, lambda w: w @ lift.T), steps[f"{path}.weight"])
    for norm, found in readers.items():
        gamma = steps.pop(f"{norm}.weight")
        for reader in found:
            if linear_layout(model.get_submodule(reader)) != "out_in":
                raise NormswapError(f"{reader} is not an nn.Linear; the extra-dimension map handles nn.Linear readers")
            steps[f"{reader}.weight"] = combine(
                lambda weight, gamma: (weight.double() * gamma.double() @ lift.T / scale).to(weight.dtype),
                steps[f"{reader}.weight"], gamma)
        steps[f"{norm}.weight"] = combine(lambda gamma: torch.ones(d + 1, dtype=gamma.dtype), gamma)
        steps[f"{norm}.bias"] = combine(lambda gamma: torch.zeros(d + 1, dtype=gamma.dtype), gamma)

    generated, cls, config = _generated_layer_norm_target(model, topology, d)
    plan = NormKindPlan(topology.model_type, generated.model_type, f"generated code: {generated.file_name}",
                        (*norms, final), tuple(writers + embeddings), kind="layernorm")
    return ConversionSetup(plan, TensorProgram(steps), cls, config, generated,
                           f"norm rmsnorm -> layernorm (exact, hidden {d} -> {d + 1})",
                           verify=lambda original, converted, probe: check_exact(original, converted, probe,
                                                                                 logits_only=True))


def convert_to_layer_norm_exact(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None
                                ) -> tuple[nn.Module, NormKindPlan, ExactnessReport, GeneratedModule]:
    """The exact LayerNorm twin of a Pre-RMSNorm model, one hidden dimension wider, verified."""
    converted, setup, report = convert_in_memory(model, plan_layer_norm_exact(model), inputs)
    return converted, setup.plan, report, setup.generated


def _wide(tensor: torch.Tensor, function: Any) -> torch.Tensor:
    """``function`` applied in float64, the result back in the tensor's dtype."""
    return function(tensor.double()).to(tensor.dtype)


def base_family(model_type: str) -> str:
    """``normswap-normswap-llama`` -> ``llama``: generated code keeps its family's code and constraints."""
    while model_type.startswith("normswap-"):
        model_type = model_type.removeprefix("normswap-")
    return model_type


def _require_supported(model: nn.Module, topology: Topology) -> None:
    if base_family(topology.model_type) not in SUPPORTED:
        raise NormswapError(
            f"exact RMSNorm -> LayerNorm adds one hidden dimension, which {topology.model_type} cannot take (its "
            f"code ties hidden_size to the heads or scales by it); supported: {', '.join(sorted(SUPPORTED))}. "
            "Use the approximate conversion instead")
    if topology.placement != "pre" or {n.kind for n in topology.residual_norms} != {"rmsnorm"}:
        raise NormswapError(f"{topology.model_type} is not a Pre-RMSNorm model ({topology.summary()})")
    config = model.config
    head_dim = getattr(config, "head_dim", None)
    if not head_dim:
        raise NormswapError(f"{topology.model_type} needs an explicit head_dim in its config for the extra dimension")
    if model.get_output_embeddings() is None:
        raise NormswapError("exact RMSNorm -> LayerNorm needs the model with its LM head (e.g. LlamaForCausalLM): the "
                            "final norm's weight moves into lm_head")
    if getattr(config, "tie_word_embeddings", False):
        raise NormswapError("the input and output embeddings are tied; the extra-dimension map changes them "
                            "differently, so untie them first (set tie_word_embeddings=False and copy lm_head)")


def _lift_writer(module: nn.Module, path: str, steps: dict[str, Step], lift: torch.Tensor) -> None:
    if linear_layout(module) != "out_in":
        raise NormswapError(f"{path} is not an nn.Linear; the extra-dimension map handles nn.Linear writers")
    for key in (f"{path}.weight", f"{path}.bias"):
        if key in steps:
            steps[key] = combine(lambda tensor: _wide(tensor, lambda t: lift @ t), steps[key])


def _path_of(model: nn.Module, target: nn.Module) -> str:
    return next(path for path, module in model.named_modules() if module is target)


def _generated_layer_norm_target(model: nn.Module, topology: Topology, d: int) -> tuple[GeneratedModule, Any, Any]:
    values = {"hidden_size": d + 1, "head_dim": model.config.head_dim,
              "rms_norm_eps": model.config.rms_norm_eps * d / (d + 1)}
    return generate_family_code(model, topology, layer_norm_edits(model, topology),
                                f"norm RMSNorm -> LayerNorm (exact: one extra hidden dimension, {d} -> {d + 1})",
                                values, layer_norm=True)
