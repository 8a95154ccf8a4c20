"""Why a centred stream did not keep a Pre-LN model, where the structure says so (docs/design.md §4).

The exact LayerNorm -> RMSNorm map centres the stream once before the layers and every branch write after that.
When the converted model misses the original, two causes are the model's, not normswap's, and measurable on the
converted model itself:

* something adds to the stream between two layers, outside any branch (YOLOS' mid-position embeddings), or
  feeds the layers a second stream of the same width that starts uncentred (PEGASUS-X's global tokens): a layer
  receives a stream that has a mean, which the previous layer handed on without one;
* a stack hands its stream on with no final norm (SAM's vision encoder, read by its neck's convolutions):
  whatever reads it next sees the centred stream.

Anything else (a layer that makes a centred input uncentred: a write inside the layer that was missed) stays an
exactness failure, because it may be normswap's own fault. Means are over the stream's channel axis, which a
channels-first stream (SqueezeBERT's, VitDet's) keeps on axis 1 between layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..topology import Topology
from .repeatable import same_random_draws

_RELATIVE_MEAN = 1e-5  # float32 centring leaves means of ~1e-7 x the stream; a missed write leaves ~1e-2


def structural_miss(converted: nn.Module, topology: Topology, inputs: dict[str, torch.Tensor]) -> str | None:
    """The structural reason a centred stream cannot keep ``converted``'s original, or None."""
    entering, leaving = _layer_streams(converted, topology, inputs)
    tolerance = max(_RELATIVE_MEAN, 50 * torch.finfo(next(converted.parameters()).dtype).eps)
    for stack in topology.stacks:
        layers = [layer.path for layer in topology.layers if layer.stack == stack.path and layer.path in entering]
        for previous, layer in zip([None, *layers], layers, strict=False):
            if previous is not None and _has_mean(leaving.get(previous, ()), tolerance, stack.axis) is not None:
                return None  # a layer made its stream uncentred: possibly a write normswap missed
            found = _has_mean(entering[layer], tolerance, stack.axis)
            if found is None:
                continue
            index, mean = found
            if index:
                return (f"{layer} receives a second stream of the stream's width (its input {index}) with a mean "
                        f"({mean:.1e} x its size): {stack.path} carries a stream that starts outside the one the "
                        "exact map centres")
            where = f"after {previous} handed it on centred" if previous else "before its first layer"
            return (f"{layer} receives its stream with a mean ({mean:.1e} x its size) {where}: {stack.path} adds to "
                    "its stream outside the branches, which the exact map does not centre")
    for stack in topology.stacks:
        if stack.final_norm is None:
            return (f"{stack.path} hands its stream on with no final norm, so what reads it next is no norm and "
                    "sees the centred stream")
    return None


def _layer_streams(model: nn.Module, topology: Topology, inputs: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
    """The stream-wide tensors each layer receives (the stream first) and the first tensor it returns."""
    entering: dict[str, list[torch.Tensor]] = {}
    leaving: dict[str, list[torch.Tensor]] = {}
    handles = []
    axes = {stack.path: stack.axis for stack in topology.stacks}
    for layer in topology.layers:
        module = model.get_submodule(layer.path)

        def before(_module: nn.Module, args: tuple, kwargs: dict, path: str = layer.path,
                   axis: int = axes.get(layer.stack, -1)) -> None:
            tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.is_floating_point()]
            if tensors and path not in entering and tensors[0].dim() > max(axis, 0):
                width = tensors[0].shape[axis]
                entering[path] = [t.detach() for t in tensors
                                  if t.dim() >= max(2, axis + 1) and t.shape[axis] == width]

        def after(_module: nn.Module, _args: tuple, output: Any, path: str = layer.path) -> None:
            first = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(first, torch.Tensor) and path not in leaving:
                leaving[path] = [first.detach()]

        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad(), same_random_draws():
            model(**inputs)
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return entering, leaving


def _has_mean(tensors: list[torch.Tensor] | tuple, tolerance: float, axis: int) -> tuple[int, float] | None:
    """(position, relative mean) of the first tensor whose per-token mean over the width (on ``axis``) is not ~0,
    or None."""
    for index, tensor in enumerate(tensors):
        wide = tensor.double()
        size = float(wide.abs().max()) or 1.0
        mean = float(wide.mean(axis).abs().max()) / size
        if mean > tolerance:
            return index, mean
    return None
