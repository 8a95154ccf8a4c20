"""Why a layer's graph shows no residual add, said precisely where the graph tells.

A residual add keeps the stream, perhaps scaled (``scaling.py``), and adds a branch's output. Two layouts
show no such add, and the refusal names them rather than saying only "no residual add":

* several streams, one axis more than a token's hidden states (``[batch, tokens, n, width]``), updated as
  ``post * F(pre * h) + M @ h``: a matrix ``M`` mixes them where a residual add would keep them
  (hyper-connections). No single residual stream exists, so no norm placement either;
* a stream that reaches every add only through an L2 normalisation (nGPT keeps its hidden states on the
  unit sphere): such a module is not a norm kind (``norms.scales_to_unit_length``), so no add keeps the stream.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from .norms import scales_to_unit_length
from .trace_layer import WRAPPED_LAYER

if TYPE_CHECKING:  # analysis asks for the message when it finds no residual add
    from .analysis import LayerGraph

_MATMUL_FUNCTIONS = (torch.matmul, operator.matmul, torch.bmm, torch.einsum)
_MATMUL_METHODS = frozenset({"matmul", "bmm", "__matmul__"})


def no_residual_add_message(graph: LayerGraph, layer_path: str) -> str:
    """One line: what the layer does where a residual add would be, or the plain refusal."""
    name = f"{type(graph.layer).__name__} ({layer_path})"
    mixing = _stream_mixing(graph)
    if mixing is None:
        sphere = _unit_length_streams(graph)
        if sphere:
            modules = ", ".join(f"{path} ({type(graph.layer.get_submodule(path)).__name__})" for path in sphere)
            verb = "scales" if len(sphere) == 1 else "scale"
            return (f"{name} shows no residual add in its traced graph: its adds see the stream only through "
                    f"{modules}, which {verb} each hidden state to length 1 (an L2 normalisation, RMS "
                    f"1/sqrt(width)); that is not a norm kind normswap describes or converts (LayerNorm and "
                    "RMSNorm put out unit RMS), so no add keeps a stream normswap can follow")
        return f"{name} shows no residual add in its traced graph; normswap converts residual transformers only"
    matmul, matrix = mixing
    source = graph.source_of(matmul)
    where = f"{describe_node(matmul)}{f' at {source}' if source else ''}"
    made = "computed from the streams" if matrix in graph.scales.input_dependent else "of learned weights"
    meta = graph.stream_input.meta.get("meta_value")
    shape = list(meta.shape) if isinstance(meta, torch.Tensor) else []
    if len(shape) >= 4:
        what = (f"carries {shape[-2]} residual streams (its stream input has shape {shape}, one axis more than a "
                f"token's hidden states) and mixes them by a matrix {made} ({where})")
    else:
        what = f"mixes its stream by a matrix {made} ({where})"
    return (f"{name} {what} where a residual add would keep the stream; a norm placement is a property of one "
            "residual stream, so normswap can neither describe nor convert this layout")


def describe_node(node: fx.Node) -> str:
    """``torch.matmul``, ``operator.mul``, ``the module mlp``: what an fx node runs, for messages."""
    if node.op == "call_module":
        return f"the module {str(node.target).removeprefix(f'{WRAPPED_LAYER}.')}"
    if node.op == "call_function":
        module = getattr(node.target, "__module__", None) or ""
        module = "operator" if module == "_operator" else module
        return f"{module}.{getattr(node.target, '__name__', node.target)}".lstrip(".")
    return f"the method {node.target}" if node.op == "call_method" else str(node.target)


def _stream_mixing(graph: LayerGraph) -> tuple[fx.Node, fx.Node | None] | None:
    """``(matrix product, the matrix)`` where an add's operand is the stream multiplied by a matrix."""
    for node in graph.nodes:
        if not graph.is_add(node):
            continue
        for operand in node.args[:2]:
            if not isinstance(operand, fx.Node):
                continue
            product = graph.scales.follow(operand).origin
            if not _is_matrix_product(product):
                continue
            inputs = product.all_input_nodes
            streams = [i for i in inputs if graph.scales.follow(i).origin is graph.stream_input]
            if streams:
                others = [i for i in inputs if i not in streams]
                return product, others[0] if others else None
    return None


def _unit_length_streams(graph: LayerGraph) -> list[str]:
    """Modules (paths in the layer) that an add's operand comes from and that scale the stream to unit length."""
    found: list[str] = []
    width = graph.scales.width
    for node in graph.nodes:
        if not graph.is_add(node) or width is None:
            continue
        for operand in node.args[:2]:
            origin = graph.scales.follow(operand).origin if isinstance(operand, fx.Node) else None
            path = graph.module_path(origin) if origin is not None else None
            if path is None or path in found or not origin.args or not isinstance(origin.args[0], fx.Node):
                continue
            reads_stream = graph.scales.follow(origin.args[0]).origin is graph.stream_input
            if reads_stream and scales_to_unit_length(graph.layer.get_submodule(path), width):
                found.append(path)
    return found


def _is_matrix_product(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _MATMUL_FUNCTIONS
    return node.op == "call_method" and node.target in _MATMUL_METHODS
