"""Layers that are one index of module lists: a forward that runs ``for i in range(n)`` over lists of branches and
lists of norms (XLM, FlauBERT: ``attentions[i]``, ``layer_norm1[i]``, ``ffns[i]``, ``layer_norm2[i]``).

No module holds one layer, so there is no layer module to trace. The owner's forward is traced whole instead
(branches and norms are leaves) and cut into one graph per index: from the stream the index's first item reads
to the stream the next index's first item reads (after the last index, the output). The analysis of a layer
module's graph reads each cut. Between cuts the stream passes only through light operations and per-token
multiples (XLM's padding mask, ``tensor *= mask``), which no norm placement depends on; a norm met on the way
from the embeddings to the first cut is the embedding norm, one met after the last cut the final norm::

    layer_norm_emb -> [attentions.i -> + -> layer_norm1.i] -> [ffns.i -> + -> layer_norm2.i] x n
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
from torch import nn

from ..errors import TopologyError
from ..topology import Layer, NormSite, Stack, Sublayer
from .analysis import LayerGraph, analyse_layer
from .capture import capture_run
from .norms import NormInfo
from .trace_layer import TracedLayer, trace_layer

_MUL_FUNCTIONS = (operator.mul, operator.imul, torch.mul)
_MUL_METHODS = frozenset({"mul", "mul_"})
_STREAM = "hidden_states"


@dataclass(frozen=True)
class IndexLists:
    """A module whose forward indexes lists of branches and of norms, one item per layer."""

    owner: str  # the module's path ("" for the root)
    branch_lists: tuple[str, ...]  # attribute names, in the owner
    norm_lists: tuple[str, ...]
    length: int

    @property
    def lists(self) -> tuple[str, ...]:
        return (*self.branch_lists, *self.norm_lists)

    def path(self, relative: str) -> str:
        return f"{self.owner}.{relative}" if self.owner else relative

    def items(self, index: int) -> tuple[str, ...]:
        return tuple(f"{name}.{index}" for name in self.lists)

    def describe(self, model: nn.Module) -> str:
        """``XLMModel has no layer modules: ...``: what holds the layers, for messages."""
        return (f"{type(model.get_submodule(self.owner)).__name__} has no layer modules: "
                f"{', '.join(self.branch_lists)} hold its branches and {', '.join(self.norm_lists)} its norms, one "
                "per layer index, and its own forward runs the residual adds and the norms")


def index_lists(model: nn.Module, stack_path: str, norms: dict[str, NormInfo]) -> IndexLists | None:
    """The lists beside the "stack" ``stack_path`` (a list of branches, showing no residual add) where its owner
    also holds lists of norms of the same length: a forward that runs the layers by index. None otherwise.

    Branch lists are the owner's lists of that length whose items hold weight matrices, norms aside."""
    owner, _, _ = stack_path.rpartition(".")
    prefix = f"{owner}." if owner else ""
    length = len(model.get_submodule(stack_path))
    lists = {name: child for name, child in model.get_submodule(owner).named_children()
             if isinstance(child, nn.ModuleList) and len(child) == length}
    norm_lists = tuple(name for name in lists if all(f"{prefix}{name}.{i}" in norms for i in range(length)))
    branch_lists = tuple(name for name, child in lists.items() if name not in norm_lists and all(
        not isinstance(item, (nn.ModuleList, nn.Sequential)) and any(p.dim() >= 2 for p in item.parameters())
        for item in child))
    if not norm_lists or not branch_lists:
        return None
    return IndexLists(owner, branch_lists, norm_lists, length)


def inspect_index_loop(model: nn.Module, config: object, lists: IndexLists, norms: dict[str, NormInfo]
                       ) -> tuple[Stack, list[Layer]]:
    """The stack and layers of a forward that runs its layers by index (module docstring)."""
    owner = model.get_submodule(lists.owner)
    call = capture_run(model, config, {lists.owner: (0, owner)}, {}).layer_calls.get(lists.owner)
    if call is None:
        raise TopologyError(f"{type(owner).__name__} did not run in the meta forward pass of {type(model).__name__}")
    relative = {path.removeprefix(f"{lists.owner}.") if lists.owner else path: info for path, info in norms.items()
                if not lists.owner or path.startswith(f"{lists.owner}.")}
    traced = trace_layer(owner, call, {id(owner.get_submodule(path)) for path in relative}, unrecorded_objects=True)
    whole = LayerGraph(traced, owner, relative)
    entries = [_entry(whole, lists, index) for index in range(lists.length)]
    output = next(node for node in whole.nodes if node.op == "output")
    last, final_norms = _walk_back(whole, _first_tensor(output.args[0]), lists)
    exits = [_walk_back(whole, entry, lists)[0] for entry in entries[1:]] + [last]
    _, embedding_norms = _walk_back(whole, entries[0], lists)
    layers = []
    width = None
    for index, (entry, exit_) in enumerate(zip(entries, exits, strict=True)):
        cut = LayerGraph(TracedLayer(_cut(whole, entry, exit_), _STREAM), owner, relative)
        reading = analyse_layer(cut, f"{type(owner).__name__} (index {index} of {', '.join(lists.lists)})")
        width = width if width is not None else reading.stream_width
        layers.append(Layer(index=index, stack=lists.path(lists.branch_lists[0]), path=lists.owner,
                            layer_class=type(owner).__name__,
                            sublayers=tuple(_placed(sub, lists) for sub in reading.sublayers),
                            output_scale=reading.output_scale,
                            items=lists.items(index)))
    stack = Stack(path=lists.path(lists.branch_lists[0]), num_layers=lists.length,
                  embedding_norm=_site(whole, embedding_norms, lists, "embedding"),
                  final_norm=_site(whole, final_norms, lists, "final"), width=width)
    return stack, layers


def _entry(graph: LayerGraph, lists: IndexLists, index: int) -> fx.Node:
    """The stream index ``index`` receives: the first input of the first of its items the forward calls."""
    items = set(lists.items(index))
    for node in graph.nodes:
        if graph.module_path(node) in items:
            stream = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
            if not isinstance(stream, fx.Node):
                raise TopologyError(f"{lists.path(str(graph.module_path(node)))} is called without a tensor input "
                                    "normswap can follow")
            return stream
    raise TopologyError(f"the forward of {type(graph.layer).__name__} calls no item at index {index} of "
                        f"{', '.join(lists.lists)}")


def _walk_back(graph: LayerGraph, node: fx.Node, lists: IndexLists) -> tuple[fx.Node, list[fx.Node]]:
    """From the stream at ``node`` back through light operations, per-token multiples and norms that are no list
    item, to the node that last computed it; returns that node and the norms passed (nearest first)."""
    passed: list[fx.Node] = []
    while True:
        path = graph.module_path(node)
        if graph.is_norm(node) and not _is_item(path, lists) and node.args and isinstance(node.args[0], fx.Node):
            passed.append(node)
            node = node.args[0]
        elif graph.is_light(node) and node.args and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        elif (scaled := _per_token_multiple(node)) is not None:
            node = scaled
        else:
            return node, passed


def _is_item(path: str | None, lists: IndexLists) -> bool:
    return path is not None and path.rpartition(".")[0] in lists.lists


def _per_token_multiple(node: fx.Node) -> fx.Node | None:
    """``h * m`` where ``m`` holds one number per token (a padding mask, ``[batch, tokens, 1]``): ``h``."""
    is_mul = ((node.op == "call_function" and node.target in _MUL_FUNCTIONS)
              or (node.op == "call_method" and node.target in _MUL_METHODS))
    if not is_mul or len(node.args) < 2 or not all(isinstance(arg, fx.Node) for arg in node.args[:2]):
        return None
    for stream, factor in (node.args[:2], node.args[1::-1]):
        shape = getattr(factor.meta.get("meta_value"), "shape", None)  # type: ignore[union-attr]
        kept = getattr(stream.meta.get("meta_value"), "shape", None)  # type: ignore[union-attr]
        if shape is not None and kept is not None and len(shape) == len(kept) and shape[-1] == 1 != kept[-1]:
            return stream  # type: ignore[return-value]
    return None


def _first_tensor(result: object) -> fx.Node:
    while isinstance(result, (tuple, list, dict)) and result:
        result = next(iter(result.values())) if isinstance(result, dict) else result[0]
    if not isinstance(result, fx.Node):
        raise TopologyError("the model's forward returns no hidden states normswap can follow")
    return result


def _cut(graph: LayerGraph, entry: fx.Node, exit_: fx.Node) -> fx.Graph:
    """One index's graph: what ``exit_`` computes from ``entry`` (a placeholder), other inputs as placeholders."""
    needed: set[fx.Node] = set()
    todo = [exit_]
    while todo:
        node = todo.pop()
        if node in needed or node is entry:
            continue
        needed.add(node)
        todo.extend(node.all_input_nodes)
    if not _depends_on(exit_, entry):
        raise TopologyError(f"the stream after {exit_.name} is not computed from the stream before it")
    cut = fx.Graph()
    copied: dict[fx.Node, fx.Node] = {entry: cut.placeholder(_STREAM)}
    copied[entry].meta = dict(entry.meta)
    for node in graph.nodes:
        if node not in needed:
            continue
        if node.op not in ("get_attr", "call_module", "call_function", "call_method"):
            copied[node] = cut.placeholder(node.name)
            copied[node].meta = dict(node.meta)
            continue
        for source in node.all_input_nodes:
            if source not in copied:  # computed outside the index (a mask): an input of the cut
                copied[source] = cut.placeholder(source.name)
                copied[source].meta = dict(source.meta)
        copied[node] = cut.node_copy(node, copied.__getitem__)
    cut.output(copied[exit_])
    return cut


def _depends_on(node: fx.Node, source: fx.Node) -> bool:
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        current = todo.pop()
        if current is source:
            return True
        if current not in seen:
            seen.add(current)
            todo.extend(current.all_input_nodes)
    return False


def _placed(sub: Sublayer, lists: IndexLists) -> Sublayer:
    """A sublayer read off a cut (paths relative to the owner) with model paths."""
    return replace(
        sub,
        norms=tuple(replace(norm, path=lists.path(norm.path)) for norm in sub.norms),
        branches=tuple(replace(branch, modules=tuple(lists.path(m) for m in branch.modules),
                               reads=tuple(lists.path(r) for r in branch.reads),
                               entry=lists.path(branch.entry) if branch.entry else None) for branch in sub.branches),
    )


def _site(graph: LayerGraph, passed: list[fx.Node], lists: IndexLists, slot: str) -> NormSite | None:
    """The stack norm nearest the loop among ``passed``."""
    if not passed:
        return None
    path = graph.module_path(passed[0]) or ""
    info = graph.norms[path]
    return NormSite(lists.path(path), slot, info.kind, info.eps, info.dim,  # type: ignore[arg-type]
                    graph.source_of(passed[0]))

