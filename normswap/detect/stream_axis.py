"""Which axis of a layer's stream input holds the channels, seen through the layout changes before its norms.

Most layers read ``(batch, tokens, width)`` and normalise the last axis. Some keep the stream channels first
between layers and change its layout inside: VitDet's layer permutes ``(batch, width, h, w)`` to channels last,
adds and normalises there, and permutes back; SqueezeBERT keeps ``(batch, width, length)`` throughout and its
norm normalises axis 1. The channel axis is the axis a norm on the stream normalises, followed back through the
operations that only move elements (``permute``, ``transpose``, ``view`` keeping the last axis) to the input.
Whatever is added before the layers or after them (an embedding or final norm) must normalise that axis.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

if TYPE_CHECKING:  # analysis asks for the axis once it has found the stream's norms
    from .analysis import LayerGraph

LAYOUT_METHODS = frozenset({"permute", "transpose", "movedim", "flatten", "unflatten"})
LAYOUT_FUNCTIONS = (torch.permute, torch.transpose, torch.movedim, torch.flatten)
_RESHAPES = frozenset({"view", "reshape", "flatten", "unflatten"})
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


def stream_channel_axis(graph: LayerGraph, norms: list[fx.Node]) -> int:
    """The channel axis of the layer's stream input (``-1`` for the last), from the first of ``norms`` whose input
    is the stream seen through layout changes and residual adds; ``-1`` where none is."""
    meta = graph.stream_input.meta.get("meta_value")
    if not isinstance(meta, torch.Tensor) or not meta.dim():
        return -1
    for norm in norms:
        axis = _axis_at_input(graph, norm)
        if axis is not None:
            return -1 if axis == meta.dim() - 1 else axis
    return -1


def _axis_at_input(graph: LayerGraph, norm: fx.Node) -> int | None:
    info = graph.norms.get(graph.module_path(norm) or "")
    if info is None or not norm.args or not isinstance(norm.args[0], fx.Node):
        return None
    node = norm.args[0]
    axis = info.axis % _ndim(node)
    while node is not graph.stream_input:
        previous = _stream_operand(graph, node)
        if previous is None:
            return None
        axis = _axis_before(node, previous, axis)
        if axis is None:
            return None
        node = previous
    return axis


def _stream_operand(graph: LayerGraph, node: fx.Node) -> fx.Node | None:
    """The input of ``node`` that carries the stream: the tensor a layout change or cast reads, or the operand of a
    residual add that comes from the stream input."""
    if _is_add(node):
        kept = [op for op in node.args[:2] if isinstance(op, fx.Node)
                and graph.scales.follow(op).origin is graph.stream_input]
        return kept[0] if len(kept) == 1 else None
    if graph.is_light(node) and node.args and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _axis_before(node: fx.Node, previous: fx.Node, axis: int) -> int | None:
    """Where ``axis`` of ``node``'s output was in ``previous``, its stream input; None where the layout change mixes
    it with other axes."""
    before, after = _ndim(previous), _ndim(node)
    if before < 0 or after < 0:
        return None
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    arguments = list(node.args[1:])
    if name == "permute":
        dims = arguments[0] if len(arguments) == 1 and isinstance(arguments[0], (tuple, list)) else arguments
        return int(dims[axis]) % before
    if name == "transpose" and len(arguments) == 2:
        first, second = (int(a) % before for a in arguments)
        return second if axis == first else first if axis == second else axis
    if name == "movedim" and len(arguments) == 2 and all(isinstance(a, int) for a in arguments):
        order = list(range(before))
        order.insert(arguments[1] % before, order.pop(arguments[0] % before))
        return order[axis]
    if name in _RESHAPES or before != after:
        # a reshape keeps an axis only where it is the last and keeps its size: (b, h*w, c) -> (b, h, w, c)
        shapes = _shape(previous), _shape(node)
        if axis == after - 1 and shapes[0] and shapes[1] and shapes[0][-1] == shapes[1][-1]:
            return before - 1
        return None
    return axis  # dropout, casts, adds: the same layout


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in ("add", "add_")


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    value = node.meta.get("meta_value")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _ndim(node: fx.Node) -> int:
    shape = _shape(node)
    return len(shape) if shape is not None else -1
