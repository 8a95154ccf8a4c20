"""Residual adds that scale the stream they keep: ``g * h + F``, ``h * c + F * c'``, ``h + r * (F - h)``.

A *scale factor* is whatever does not depend on the layer's inputs: a number in the code, a parameter or
buffer, or arithmetic on them (``(self.lambda_1 * self.lambda_scale).abs()``). A factor that depends on the
inputs (a gate computed from the tokens, a mixing matrix) is not a scale: it belongs to a branch. Following
an operand of an add back through light operations, norms and such factors tells where it comes from, and
what scaled it on the way:

    g * h + attn(N(h))                 residual h, gain g; branch attn
    h * 0.71 + N2(attn(N1(h))) * 0.71  residual h, constant gain 0.71; branch attn, out norm N2
    h + r * (N2(attn(h)) - h)          residual h, interpolation rate r (gain 1 - r); branch attn, out norm N2
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from ..topology import ResidualScale, ScaleExtent, ScaleForm
from .trace_layer import WRAPPED_LAYER

if TYPE_CHECKING:  # analysis builds a ScaleReader over its LayerGraph
    from .analysis import LayerGraph

_MUL_FUNCTIONS = (operator.mul, operator.imul, torch.mul)
_MUL_METHODS = frozenset({"mul", "mul_"})
_DIV_FUNCTIONS = (operator.truediv, operator.itruediv, torch.div)
_DIV_METHODS = frozenset({"div", "div_"})
_SUB_FUNCTIONS = (operator.sub, operator.isub, torch.sub)
_SUB_METHODS = frozenset({"sub", "sub_"})
_EXTENT_ORDER: tuple[ScaleExtent, ...] = ("constant", "scalar", "per-channel")


@dataclass(frozen=True)
class Factor:
    """One multiplication of the stream by a scale factor."""

    extent: ScaleExtent
    tensors: tuple[str, ...]  # parameters and buffers the factor is computed from, relative to the layer
    value: float | None  # the factor, where the code fixes it
    node: fx.Node  # the multiplication


@dataclass(frozen=True)
class Followed:
    """Where an operand comes from: its origin, the norms (call order) and the scale factors on the way."""

    origin: fx.Node
    norms: tuple[fx.Node, ...]
    factors: tuple[Factor, ...] = ()


class ScaleReader:
    """Follows values back through light operations, norms and scale factors, on one traced layer."""

    def __init__(self, graph: LayerGraph) -> None:
        self.graph = graph
        meta = graph.stream_input.meta.get("meta_value")
        self.width = int(meta.shape[-1]) if isinstance(meta, torch.Tensor) and meta.dim() else None
        self.input_dependent: set[fx.Node] = set()
        for node in graph.nodes:
            if node.op == "placeholder" or any(i in self.input_dependent for i in node.all_input_nodes):
                self.input_dependent.add(node)

    def follow(self, node: fx.Node) -> Followed:
        """``node`` back to the first operation that is neither light, nor a norm, nor a scaling."""
        norms: list[fx.Node] = []
        factors: list[Factor] = []
        while True:
            origin, found = self.graph.trace_back(node)
            norms[:0] = found
            split = self._split_scaling(origin)
            if split is None:
                return Followed(origin, tuple(norms), tuple(factors))
            factor, node = split
            factors.append(factor)

    def interpolation(self, residual: Followed, update: Followed) -> tuple[Followed, tuple[Factor, ...]] | None:
        """``h + r * (F - h)``: the branch ``F`` (followed) and the rate's factors, where ``update`` is ``r * (F - h)``
        for the ``h`` that ``residual`` follows. None where ``update`` is no such difference."""
        difference = update.origin
        if not _is_call(difference, _SUB_FUNCTIONS, _SUB_METHODS) or len(difference.args) < 2:
            return None
        minuend, subtrahend = difference.args[:2]
        if not isinstance(minuend, fx.Node) or not isinstance(subtrahend, fx.Node) or update.norms:
            return None
        kept = self.follow(subtrahend)
        if kept.origin is not residual.origin or kept.norms != residual.norms or kept.factors != residual.factors:
            return None
        return self.follow(minuend), update.factors

    def residual_scale(self, form: ScaleForm, factors: tuple[Factor, ...]) -> ResidualScale:
        """The record of what scales the stream; for an interpolation, ``factors`` make the rate ``r``."""
        extent = max((factor.extent for factor in factors), key=_EXTENT_ORDER.index)
        tensors = tuple(dict.fromkeys(t for factor in factors for t in factor.tensors))
        values = [factor.value for factor in factors]
        product = math.prod(v for v in values if v is not None) if None not in values else None
        value = (1.0 - product if form == "interpolation" else product) if product is not None else None
        return ResidualScale(form, extent, tensors, value, self.graph.source_of(factors[0].node))

    def _split_scaling(self, node: fx.Node) -> tuple[Factor, fx.Node] | None:
        """``(factor, scaled value)`` where ``node`` multiplies (or divides) an input-dependent value by a factor."""
        if len(node.args) < 2:
            return None
        left, right = node.args[:2]
        if _is_call(node, _MUL_FUNCTIONS, _MUL_METHODS):
            for factor, scaled in ((left, right), (right, left)):
                found = self._factor(factor, node, invert=False)
                if found is not None and isinstance(scaled, fx.Node) and scaled in self.input_dependent:
                    return found, scaled
        elif _is_call(node, _DIV_FUNCTIONS, _DIV_METHODS) and isinstance(left, fx.Node) and not node.kwargs:
            found = self._factor(right, node, invert=True)
            if found is not None and left in self.input_dependent:
                return found, left
        return None

    def _factor(self, value: object, node: fx.Node, invert: bool) -> Factor | None:
        """A scale factor: a number, or a tensor of one element or one per channel that no input feeds."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if invert and value == 0:
                return None
            return Factor("constant", (), 1.0 / value if invert else float(value), node)
        if not isinstance(value, fx.Node) or value in self.input_dependent:
            return None
        meta = self._value(value)
        if not isinstance(meta, torch.Tensor) or not meta.is_floating_point():
            return None
        tensors = self._sources(value)
        if meta.numel() == 1:
            return Factor("scalar" if tensors else "constant", tensors, None, node)
        if self.width is not None and meta.dim() and meta.shape[-1] == self.width and meta.numel() == self.width:
            return Factor("per-channel", tensors, None, node)
        return None

    def _value(self, node: fx.Node) -> object:
        """The node's meta value; a tensor that fx made a ``get_attr`` by itself (a buffer) is read off the layer."""
        if node.op != "get_attr":
            return node.meta.get("meta_value")
        value: object = self.graph.layer
        for part in str(node.target).removeprefix(f"{WRAPPED_LAYER}.").split("."):
            value = getattr(value, part, None)
        return value

    def _sources(self, node: fx.Node) -> tuple[str, ...]:
        """The parameters and buffers (paths in the layer) that ``node`` is computed from."""
        found: list[str] = []
        todo, seen = [node], set()
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            if current.op == "get_attr":
                found.append(str(current.target).removeprefix(f"{WRAPPED_LAYER}."))
            todo.extend(current.all_input_nodes)
        return tuple(sorted(found))


def _is_call(node: fx.Node, functions: tuple[object, ...], methods: frozenset[str]) -> bool:
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods
