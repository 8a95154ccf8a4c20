"""What a topology must say beside its sublayers: scaled residual streams and reused layers.

These come from the traced graphs (``Layer.residual_scales``), the order of module calls in the meta run,
and the module tree, never from a family's name:

* a residual add that scales the stream it keeps (``g * h + F``) breaks what the norm-shift mapping and
  the exact norm-kind maps assume (docs/design.md §3-§5), so ``inspect`` says so in a note;
* a layer that runs more than once per forward, or a model-level norm that runs between a stack's
  layers, is a stream the layers alone do not describe;
* a norm-free model (``--norm none``, ``--norm dyt``) has normswap's stand-ins where its norms were: no norm kind,
  but what stands there is said.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..topology import Layer, ResidualScale
from .capture import CapturedRun
from .norms import is_norm_stand_in

_ASSUMPTION = "h <- s * h + F(...), not h + F(...); the norm-shift and exact norm-kind maps assume s = 1"


def scale_notes(layers: Sequence[Layer]) -> list[str]:
    """One note per group of layers whose residual adds scale the stream alike."""
    groups: dict[tuple[Any, ...], list[Layer]] = {}
    for layer in layers:
        key = tuple(_relative_key(layer, where, scale) for where, scale in _scales(layer))
        if key:
            groups.setdefault((layer.stack, key), []).append(layer)
    notes = []
    for (_, key), members in groups.items():
        parts = []
        for position, (where, form, extent, tensors, source) in enumerate(key):
            values = sorted({scale.value for layer in members for scale in [_scales(layer)[position][1]]
                             if scale.value is not None})
            shown = f" {values[0]:.4g}" if len(values) == 1 else (
                f" {values[0]:.4g} to {values[-1]:.4g} by layer" if values else "")
            named = f" {', '.join(tensors)}" if tensors else ""
            at = f" ({source})" if source else ""
            parts.append(f"{where}: {extent} {_FORM_WORDS[form]}{named}{shown}{at}")
        notes.append(f"{_span(members)} scale the residual stream they keep ({_ASSUMPTION}): {'; '.join(parts)}")
    return notes


def reuse_notes(stacks: list[tuple[str, list[tuple[str, nn.Module]]]], run: CapturedRun,
                model_level_norms: dict[str, nn.Module]) -> list[str]:
    """Layers that run more than once per forward, and model-level norms that run between a stack's layers."""
    calls = Counter(run.call_order)
    notes = []
    for stack_path, stack_layers in stacks:
        paths = [path for path, _ in stack_layers if path in calls]
        if not paths:
            continue
        repeated = [path for path in paths if calls[path] > 1]
        if repeated:
            notes.append(f"{len(repeated)} of the {len(stack_layers)} layers of {stack_path} run more than once in "
                         f"one forward pass (up to {max(calls[p] for p in repeated)} times): the model reuses them, "
                         "and this topology lists each layer once")
        positions = [i for i, name in enumerate(run.call_order) if name in set(paths)]
        between = dict.fromkeys(name for name in run.call_order[positions[0]:positions[-1]]
                                if name in model_level_norms)
        notes.extend(f"{norm}, a norm outside the layers, also runs between layers of {stack_path}; where it "
                     "normalises the stream there, no layer's sublayers show it" for norm in between)
    return notes


_FORM_WORDS = {"gain": "gain", "interpolation": "interpolation rate (the stream keeps 1 - rate)",
               "output": "output scale"}


def _scales(layer: Layer) -> list[tuple[str, ResidualScale]]:
    found = [(f"sublayer {index}", sub.residual_scale) for index, sub in enumerate(layer.sublayers)
             if sub.residual_scale]
    return [*found, ("layer output", layer.output_scale)] if layer.output_scale else found


def _relative_key(layer: Layer, where: str, scale: ResidualScale) -> tuple[Any, ...]:
    tensors = tuple(t.removeprefix(f"{layer.path}.") for t in scale.tensors)
    return where, scale.form, scale.extent, tensors, scale.source


def _span(layers: list[Layer]) -> str:
    if len(layers) == 1:
        return f"the residual adds of {layers[0].path}"
    return f"the residual adds of {len(layers)} layers ({layers[0].path} to {layers[-1].path})"


_STAND_IN_WHAT = {"NormswapStandIn": "calibrated stand-ins g * x / s + b", "NormswapDyT": "DyT g * tanh(a x) + b"}


def stand_in_notes(model: nn.Module) -> list[str]:
    """``5 residual norms are DyT g * tanh(a x) + b (NormswapDyT), ...``: what a norm-free model runs in its norms'
    places, which computes no per-token statistic and so is no norm placement."""
    found = Counter(type(module).__name__ for module in model.modules() if is_norm_stand_in(module))
    return [f"{count} residual norm{'s are' if count > 1 else ' is'} {_STAND_IN_WHAT.get(name, name)} ({name}), "
            "which compute no per-token statistic: the model is norm-free" for name, count in sorted(found.items())]
