"""Read the sublayers of one traced layer off its fx graph.

The residual stream enters as a placeholder. Walking the graph in order, an add is a
*residual add* when one operand comes from the current stream (through nothing but
norms, dropout and casts) and the other from a branch that reads the stream. For
each residual add, norms are assigned to slots by where they sit:

* ``pre``: between the stream and the branch's first real operation;
* ``out``: between the branch's last real operation and the add;
* ``post``: on the stream itself after the add (the next residual operand, or the
  layer output, reaches the add only through it).

Branches that read the same stream point and meet only at adds form one parallel
sublayer (GPT-J, GPT-NeoX). An operand may reach the stream through a scale factor
(``g * h + F``, ``h + r * (F - h)``): the add is still a residual add, and the sublayer
records what scales the stream (``scaling.py``).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import pairwise

import torch
import torch.fx as fx
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ..errors import TopologyError
from ..topology import Branch, BranchKind, NormSite, ResidualScale, Sublayer, placement_of_slots
from .elementwise_affine import elementwise_affine_message, elementwise_affine_module
from .no_residual_add import describe_node, no_residual_add_message
from .norms import NormInfo, is_norm_stand_in
from .scaling import Followed, ScaleReader
from .stem_norm import TAKEN_AFTER_PRE_NORM
from .stream_axis import LAYOUT_FUNCTIONS, LAYOUT_METHODS, stream_channel_axis
from .token_routes import item_update, scattered_source, selects_positions
from .trace_layer import WRAPPED_LAYER, TracedLayer

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = frozenset({"add", "add_"})
_LIGHT_FUNCTIONS = (F.dropout, torch.dropout, operator.getitem, *LAYOUT_FUNCTIONS)
_LIGHT_METHODS = frozenset({
    "to", "float", "half", "bfloat16", "type", "type_as", "contiguous", "clone", "detach",
    "view", "reshape", "view_as", "reshape_as", *LAYOUT_METHODS,
})
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_CROSS = re.compile(r"cross|encoder_?attn|encdec", re.IGNORECASE)
_SOURCE_LINE = re.compile(r'File "([^"]+)", line (\d+)')


@dataclass
class _RawSublayer:
    add: fx.Node
    residual_norms: list[fx.Node]
    out_norms: list[fx.Node]
    read_point: fx.Node
    pre_norms: list[fx.Node]
    branches: list[set[fx.Node]]
    post_norms: list[fx.Node] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    residual_scale: ResidualScale | None = None
    readers: list[fx.Node] = field(default_factory=list)  # the branches' nodes that read the stream at read_point


class NoResidualAddError(TopologyError):
    """A layer whose graph shows no residual add; the caller may know why (a model without layer modules)."""


class OutputPastLastAddError(TopologyError):
    """A layer whose output is computed from its last residual add by more than norms: a stage that runs its own
    layer list and then a patch merging (FocalNet's ``downsample``); its layer list may be the stack."""


@dataclass(frozen=True)
class LayerReading:
    """What one layer's graph says: its sublayers, the norms they use and what scales its output stream."""

    sublayers: tuple[Sublayer, ...]
    used_norms: frozenset[str]  # relative paths
    output_scale: ResidualScale | None = None
    stream_width: int | None = None  # the width of the stream the layer reads: the size of its channel axis
    stem_norms: tuple[str, ...] = ()  # norms on the stream before the first residual is taken (RWKV's pre_ln)
    stream_axis: int = -1  # the axis of the layer's stream input that holds the channels (1: channels first)


class LayerGraph:
    """Graph queries over one traced layer: which nodes are norms, light, adds, and where they come from."""

    def __init__(self, traced: TracedLayer, layer: nn.Module, norms: dict[str, NormInfo]) -> None:
        self.traced = traced
        self.layer = layer
        self.norms = norms  # relative module path -> what it computes
        self.nodes = list(traced.graph.nodes)
        self.position = {node: index for index, node in enumerate(self.nodes)}
        self.stream_input = next(n for n in self.nodes if n.op == "placeholder" and n.target == traced.stream_input)
        self.scales = ScaleReader(self)

    def module_path(self, node: fx.Node) -> str | None:
        if node.op != "call_module":
            return None
        return str(node.target).removeprefix(f"{WRAPPED_LAYER}.")

    def is_norm(self, node: fx.Node) -> bool:
        return self.module_path(node) in self.norms

    def is_light(self, node: fx.Node) -> bool:
        """Operations that pass the stream on unchanged in meaning: dropout, casts, tuple indexing, and layout changes
        that only move its elements (``permute``, ``transpose``: VitDet's layer permutes its channels-first input
        to channels last, adds there and permutes back), through which the stream is seen."""
        if node.op == "call_module":
            module = self.layer.get_submodule(self.module_path(node) or "")
            passes = isinstance(module, (nn.Dropout, nn.Identity)) or _passes_through(module)
            return (passes or is_norm_stand_in(module)) and not self.is_norm(node)
        if node.op == "call_function":
            if node.target is operator.getitem:
                container = node.args[0].meta.get("meta_value") if isinstance(node.args[0], fx.Node) else None
                return not isinstance(container, torch.Tensor) or selects_positions(node)
            return node.target in _LIGHT_FUNCTIONS
        if node.op == "call_method":
            return node.target in _LIGHT_METHODS
        return False

    def is_add(self, node: fx.Node) -> bool:
        if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
            return True
        return node.op == "call_method" and node.target in _ADD_METHODS

    def summands(self, node: fx.Node) -> list[fx.Node]:
        """What ``node`` adds together, where it is an add or an augmented item assignment (``h[i] += F``): that
        assignment, which later reads of ``h`` depend on, is the add, not the ``h[i] + F`` it writes back."""
        if self.is_add(node):
            if any(item_update(user, self.is_add) and user.args[2] is node for user in node.users):
                return []
            return [arg for arg in node.args[:2] if isinstance(arg, fx.Node)]
        return list(item_update(node, self.is_add) or ())

    def scattered_norms(self, node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
        """``(h, norms)`` where ``node`` writes norms of some of ``h``'s positions back over them
        (``h.masked_scatter(m, N(h[m]))``): the stream ``h``, normalised where the mask routes it."""
        scattered = scattered_source(node)
        if scattered is None:
            return None
        base, source = scattered
        origin, norms = self.trace_back(source, until=base)
        return (base, norms) if origin is base and norms else None

    def trace_back(self, node: fx.Node, until: fx.Node | None = None) -> tuple[fx.Node, list[fx.Node]]:
        """Follow ``node`` back through light operations and norms (not past ``until``); returns (origin, norms in
        call order)."""
        norms: list[fx.Node] = []
        while node is not until:
            item = self.tuple_item(node)
            scattered = self.scattered_norms(node)
            if item is not None:
                node = item
            elif scattered is not None:
                node = scattered[0]
                norms.extend(scattered[1][::-1])
            elif (self.is_norm(node) or self.is_light(node)) and node.args and isinstance(node.args[0], fx.Node):
                if self.is_norm(node):
                    norms.append(node)
                node = node.args[0]
            else:
                break
        return node, norms[::-1]

    def tuple_item(self, node: fx.Node) -> fx.Node | None:
        """``((h,) + rest)[0]`` is ``h``: see through tuple concatenation of layer outputs."""
        if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
            return None
        container, index = node.args
        if isinstance(container, fx.Node) and self.is_add(container) and isinstance(container.args[0], (tuple, list)):
            items = container.args[0]
            if isinstance(index, int) and -len(items) <= index < len(items) and isinstance(items[index], fx.Node):
                return items[index]
        return None

    def inputs_of(self, node: fx.Node) -> list[fx.Node]:
        """Data inputs of ``node``; a tuple item depends only on the item it selects."""
        item = self.tuple_item(node)
        return [item] if item is not None else node.all_input_nodes

    def source_of(self, node: fx.Node, depth: int = 0) -> str | None:
        """``modeling_x.py:123``: the innermost modeling-code frame in the node's stack trace (``depth`` 1: the
        frame that called it)."""
        matches = [m for m in _SOURCE_LINE.finditer(node.stack_trace or "")
                   if m.group(1).rsplit("/", 1)[-1].startswith("modeling_")]
        if len(matches) <= depth:
            return None
        filename, line = matches[-1 - depth].groups()
        return f"{filename.rsplit('/', 1)[-1]}:{line}"


def _passes_through(module: nn.Module) -> bool:
    """A module without parameters or children that returns its input unchanged at inference: stochastic depth
    (CvT's ``CvtDropPath`` on the whole layer output), told by what it does, not by its name."""
    if any(True for _ in module.parameters()) or any(True for _ in module.children()) or module.training:
        return False
    probe = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            output = module(probe)
    except Exception:  # noqa: BLE001 - a module that cannot run on a plain tensor passes nothing through
        return False
    return isinstance(output, torch.Tensor) and output.shape == probe.shape and torch.equal(output, probe)


def analyse_layer(graph: LayerGraph, layer_path: str) -> LayerReading:
    """The sublayers of one layer, the relative paths of the norms they use, and what scales its output.

    Norm and module paths in the result are relative to the layer; ``layer_path`` names it in errors.
    """
    raw = _find_residual_adds(graph)
    if not raw:
        raise NoResidualAddError(no_residual_add_message(graph, layer_path))
    raw = _merge_parallel(raw)
    output_scale = _assign_post_norms(graph, raw, layer_path)
    used: set[str] = set()
    sublayers = []
    for item in raw:
        sites = []
        for slot, nodes in (("pre", item.pre_norms), ("post", item.post_norms), ("out", item.out_norms)):
            for node in nodes:
                path = graph.module_path(node) or ""
                used.add(path)
                info = graph.norms[path]
                sites.append(NormSite(path, slot, info.kind, info.eps, info.dim,
                                      graph.source_of(node), info.axis))
        branches = tuple(_describe_branch(graph, nodes, item.pre_norms, item.readers) for nodes in item.branches)
        parallel = len(branches) > 1
        slots = {site.slot for site in sites}
        sublayers.append(Sublayer(
            kind="parallel" if parallel else branches[0].kind,
            placement=placement_of_slots(slots, parallel),
            branches=branches,
            norms=tuple(sites),
            residual_add=graph.source_of(item.add),
            residual_add_caller=graph.source_of(item.add, depth=1),
            notes=tuple(item.notes),
            residual_scale=item.residual_scale,
        ))
    stem = tuple(graph.module_path(node) or "" for node in raw[0].residual_norms)
    axis = stream_channel_axis(graph, [n for item in raw for n in (*item.pre_norms, *item.post_norms)])
    meta = graph.stream_input.meta.get("meta_value")
    width = int(meta.shape[axis]) if isinstance(meta, torch.Tensor) and meta.dim() else graph.scales.width
    return LayerReading(tuple(sublayers), frozenset(used), output_scale, width, stem, axis)


def _find_residual_adds(graph: LayerGraph) -> list[_RawSublayer]:
    stream: list[fx.Node] = [graph.stream_input]
    raw: list[_RawSublayer] = []
    for node in graph.nodes:
        operands = graph.summands(node)
        if len(operands) != 2:
            continue
        first, second = (graph.scales.follow(op) for op in operands)
        if (first.origin in stream) == (second.origin in stream):
            continue
        residual, update = (first, second) if first.origin in stream else (second, first)
        read = _read_update(graph, residual, update)
        if read is None:
            continue  # h + r * (h' - h) with no rate: no residual is kept
        branch, scale = read
        residual_norms, branch_origin, out_norms = list(residual.norms), branch.origin, list(branch.norms)
        branch_nodes = _branch_nodes(graph, branch_origin, stream)
        valued = _valued_nodes(graph, branch_origin, branch_nodes)
        all_entries = _branch_entries(graph, branch_nodes, stream)
        entries = [entry for entry in all_entries if entry[0] in valued]
        if not entries:
            continue  # e.g. adding a position bias: the other operand does not read the stream
        read_points = {origin for _, origin, _ in entries}
        read_point = max(read_points, key=stream.index)
        pre = _unique(norm for _, origin, norms in entries if origin is read_point for norm in norms)
        pre = [n for n in pre if n not in residual_norms]
        groups = _split_branches(graph, branch_nodes, [e for e, _, _ in entries])
        if out_norms and len(groups) > 1:  # N(A(x) + M(x)): the norm reads their sum, so they are one branch
            groups = [set().union(*groups)]  # (AXK1's routed and shared experts), not a parallel block
        for group in groups:  # each branch remembers the norms its entries read through
            group.update(norm for entry, _, norms in entries if entry in group for norm in norms)
        raw.append(_RawSublayer(node, residual_norms, out_norms, read_point, pre, groups, residual_scale=scale,
                                # every module that reads the stream, a reader of positions only too: each
                                # takes the norm a placement change moves to the branch's input
                                readers=[entry for entry, origin, _ in all_entries if origin is read_point]))
        stream.append(node)
    return raw


def _valued_nodes(graph: LayerGraph, origin: fx.Node, nodes: set[fx.Node]) -> set[fx.Node]:
    """The branch nodes whose values reach its output through floating-point tensors: a read of the stream that
    only picks positions (top-k indices: Mistral Large 4's sparse-attention indexer, with its own norm) passes
    no value of the stream into the branch, so what it reads through is no norm of the branch's input."""
    def valued(node: fx.Node) -> bool:
        value = node.meta.get("meta_value")
        return node in nodes and not (isinstance(value, torch.Tensor)
                                      and not (value.is_floating_point() or value.is_complex()))

    return _reach(origin, graph.inputs_of, valued)


def _reach(start: fx.Node, step: Callable[[fx.Node], Iterable[fx.Node]], keep: Callable[[fx.Node], bool]
           ) -> set[fx.Node]:
    """The nodes reached from ``start`` by ``step`` (inputs or users) through nodes that ``keep`` admits."""
    reached: set[fx.Node] = set()
    todo = [start]
    while todo:
        node = todo.pop()
        if node in reached or not keep(node):
            continue
        reached.add(node)
        todo.extend(step(node))
    return reached


def _read_update(graph: LayerGraph, residual: Followed,
                 update: Followed) -> tuple[Followed, ResidualScale | None] | None:
    """The branch an add's other operand comes from, and what scales the residual it keeps.

    ``h + r * (F - h)`` keeps ``(1 - r) * h``: an interpolation; ``g * h + F`` keeps ``g * h``: a gain.
    """
    interpolated = graph.scales.interpolation(residual, update)
    if interpolated is not None:
        branch, rate = interpolated
        return (branch, graph.scales.residual_scale("interpolation", rate)) if rate else None
    gain = graph.scales.residual_scale("gain", residual.factors) if residual.factors else None
    return update, gain


def _branch_entries(graph: LayerGraph, branch_nodes: set[fx.Node],
                    stream: list[fx.Node]) -> list[tuple[fx.Node, fx.Node, list[fx.Node]]]:
    """Heavy nodes of the branch that read the stream directly: (node, stream point, norms in between)."""
    entries = []
    for node in sorted(branch_nodes, key=graph.position.__getitem__):
        if graph.is_norm(node) or graph.is_light(node) or graph.scattered_norms(node) is not None:
            continue
        for arg in graph.inputs_of(node):
            source, norms = graph.trace_back(arg)
            if source in stream:
                entries.append((node, source, norms))
    return entries


def _branch_nodes(graph: LayerGraph, origin: fx.Node, stream: list[fx.Node]) -> set[fx.Node]:
    """Everything the branch output depends on, back to (not including) the stream points."""
    return _reach(origin, graph.inputs_of,
                  lambda node: node not in stream and node.op not in ("placeholder", "get_attr"))


def _split_branches(graph: LayerGraph, nodes: set[fx.Node], entries: list[fx.Node]) -> list[set[fx.Node]]:
    """Entries whose downstream nodes meet at anything but an add belong to one branch."""
    closures = [_reach(entry, lambda node: node.users, nodes.__contains__) for entry in _unique(entries)]
    groups: list[set[fx.Node]] = []
    for closure in closures:
        joined = [g for g in groups if any(not graph.is_add(n) for n in g & closure)]
        merged = set(closure).union(*joined) if joined else set(closure)
        groups = [g for g in groups if g not in joined] + [merged]
    return sorted(groups, key=lambda g: min(graph.position[n] for n in g))


def _merge_parallel(raw: list[_RawSublayer]) -> list[_RawSublayer]:
    """``h + A(x) + M(x)`` written as two adds: the second branch reads the stream before the first add."""
    merged: list[_RawSublayer] = []
    for item in raw:
        if (merged and item.read_point is merged[-1].read_point and not item.residual_norms
                and item.residual_scale is None):  # s * (h + A(x)) + M(x) scales A too: not one parallel group
            previous = merged[-1]
            previous.branches.extend(item.branches)
            previous.readers.extend(item.readers)
            previous.pre_norms.extend(n for n in item.pre_norms  # the kept stream's norms are no branch's
                                      if n not in previous.pre_norms and n not in previous.residual_norms)
            previous.out_norms.extend(item.out_norms)
            previous.add = item.add
            continue
        merged.append(item)
    return merged


def _assign_post_norms(graph: LayerGraph, raw: list[_RawSublayer], layer_path: str) -> ResidualScale | None:
    """Norms on the stream after an add are that sublayer's post norms; returns what scales the layer output."""
    for previous, item in pairwise(raw):
        previous.post_norms.extend(item.residual_norms)
    if raw[0].residual_norms:
        raw[0].pre_norms[:0] = raw[0].residual_norms
        raw[0].notes.append(TAKEN_AFTER_PRE_NORM)
    output = next(n for n in graph.nodes if n.op == "output")
    result = _first_output(graph, output.args[0])
    if not isinstance(result, fx.Node):
        raise TopologyError(f"{type(graph.layer).__name__} ({layer_path}) returns no tensor normswap can follow")
    output = graph.scales.follow(result)
    if output.origin is not raw[-1].add:
        affine = elementwise_affine_module(graph, output.origin, raw[-1].add)
        if affine is not None:
            raise OutputPastLastAddError(elementwise_affine_message(graph, layer_path, affine))
        source = graph.source_of(output.origin)
        raise OutputPastLastAddError(
            f"{type(graph.layer).__name__} ({layer_path}): the layer output does not come from its last residual add "
            f"(it comes from {describe_node(output.origin)}{f' at {source}' if source else ''}); "
            "normswap cannot tell its norm placement"
        )
    raw[-1].post_norms.extend(output.norms)
    return graph.scales.residual_scale("output", output.factors) if output.factors else None


def _first_output(graph: LayerGraph, result: object) -> object:
    """The hidden states a layer returns: the first element of its output, also through ``(h,) + rest``."""
    while True:
        if isinstance(result, (tuple, list)) and result:
            result = result[0]
        elif isinstance(result, dict) and result:
            result = next(iter(result.values()))
        elif isinstance(result, fx.Node) and graph.is_add(result) and isinstance(result.args[0], (tuple, list)):
            result = result.args[0]  # tuple concatenation, e.g. `(layer_output,) + outputs`
        else:
            return result


def _describe_branch(graph: LayerGraph, nodes: set[fx.Node], pre_norms: list[fx.Node],
                     readers: list[fx.Node]) -> Branch:
    paths = sorted({p for n in nodes if (p := graph.module_path(n)) and not graph.is_norm(n)
                    and not graph.is_light(n)})
    reads = tuple(graph.module_path(n) or "" for n in pre_norms if n in nodes)
    heavy_modules = [n for n in sorted(nodes, key=graph.position.__getitem__)
                     if graph.module_path(n) and not graph.is_norm(n) and not graph.is_light(n)]
    entry = graph.module_path(heavy_modules[0]) if heavy_modules else None
    entry_source = graph.source_of(heavy_modules[0]) if heavy_modules else None
    # a norm's name says nothing of the branch: AXK2's MoE branch runs the gate of ``post_attention_layernorm``
    names = " ".join([".".join(part for part in p.split(".") if "norm" not in part.lower()) for p in paths]
                     + [type(graph.layer.get_submodule(p)).__name__ for p in paths])
    reads_encoder = any(i.op == "placeholder" and "encoder" in str(i.target) for n in nodes for i in n.all_input_nodes)
    kind: BranchKind
    if _ATTENTION.search(names):
        kind = "cross-attention" if reads_encoder or _CROSS.search(names) else "attention"
    else:
        kind = "mlp"
    others = [(paths.index(path), graph.source_of(node)) for node in readers
              if node in nodes and (path := graph.module_path(node)) in paths and path != entry]
    return Branch(kind, tuple(paths), reads, entry, entry_source, tuple(position for position, _ in others),
                  tuple(source for _, source in others))


def _unique(items: object) -> list:
    seen: list = []
    for item in items:  # type: ignore[attr-defined]
        if item not in seen:
            seen.append(item)
    return seen

