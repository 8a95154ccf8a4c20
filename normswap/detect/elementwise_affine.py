"""Why a layer's output is not its last residual add, said precisely where the graph tells.

MobileBERT's default ``NoNorm`` sits where a Post-Norm model has its norm and computes ``x * weight + bias``, channel
by channel: an elementwise affine map of learned parameters, with no statistic of the token. It normalises nothing,
so such a stream holds no norm whose placement normswap could describe, move or replace; the refusal says so rather
than only that the output comes from some other add.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from .trace_layer import WRAPPED_LAYER

if TYPE_CHECKING:  # analysis asks for the message when a layer's output is past its last residual add
    from .analysis import LayerGraph

_ADDS = (operator.add, torch.add)
_MULS = (operator.mul, torch.mul)


def elementwise_affine_module(graph: LayerGraph, output: fx.Node, last_add: fx.Node) -> str | None:
    """The module (a path relative to the layer) whose weight and bias make ``output`` = ``last_add * weight + bias``
    (either order of either operation), or None where ``output`` is anything else."""
    if output.op != "call_function" or output.target not in _ADDS:
        return None
    for product, bias in (output.args[:2], output.args[1::-1]):
        if not (_is_parameter(bias) and isinstance(product, fx.Node) and product.op == "call_function"
                and product.target in _MULS):
            continue
        for stream, weight in (product.args[:2], product.args[1::-1]):
            if _is_parameter(weight) and isinstance(stream, fx.Node) and graph.scales.follow(stream).origin is last_add:
                owner = str(weight.target).rpartition(".")[0]
                if owner == str(bias.target).rpartition(".")[0]:
                    return owner.removeprefix(f"{WRAPPED_LAYER}.")
    return None


def elementwise_affine_message(graph: LayerGraph, layer_path: str, module: str) -> str:
    """One line: the layer ends in an elementwise affine map where a Post-Norm layer has its norm."""
    kind = type(graph.layer.get_submodule(module)).__name__
    return (f"{type(graph.layer).__name__} ({layer_path}): the layer output is its last residual add times a weight "
            f"plus a bias, channel by channel ({module}, a {kind}): an elementwise affine map, which normalises "
            "nothing, so this residual stream holds no norm whose placement normswap could tell, move or replace")


def _is_parameter(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"
