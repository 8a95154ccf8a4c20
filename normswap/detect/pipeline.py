"""``normswap.inspect``: detect the residual/norm topology of a model.

Pipeline: build the model on the meta device -> find layer stacks and norm modules ->
run once on meta tensors to capture each layer's inputs and the call order -> trace
each distinct layer with torch.fx -> read sublayers off the graph -> place the
embedding and final norms.

A path or config whose stacks have more than 64 layers (``sampling.FULL_BUILD_LAYERS``) is built
with a sample of its layers: at most 64 (``sampling.MAX_SAMPLE_LAYERS``), enough for a prefix, a few
leading layers and two periods of whatever the config says repeats. The sample is checked, and the
topology expanded to the real layer count with a note saying so; a sample that does not hold up is
replaced by the full build. Loaded models are never sampled. See ``sampling.py`` for the rules.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import SourceError, TopologyError
from ..recipe import recipe_for
from ..topology import Layer, NormSite, ResidualScale, Stack, Sublayer, Topology
from .analysis import LayerGraph, LayerReading, NoResidualAddError, OutputPastLastAddError, analyse_layer
from .capture import CapturedRun, LayerCall, capture_run, find_layer_stacks
from .index_loop import IndexLists, index_lists, inspect_index_loop
from .layout_notes import reuse_notes, scale_notes, stand_in_notes
from .norms import NormInfo, classify_norm, own_size
from .sampling import SamplePlan, expand_sample, plan_sample, sample_mismatch
from .signature import input_signature, module_signature
from .source import MetaModel, build_meta_model, load_config, meta_model_from_config
from .stem_norm import lift_stem_norms
from .trace_layer import trace_layer
from .width import named_width, unnamed_width_message

_PROBE_WIDTH = 64  # a weightless module computes the same at any width: probed at this one where none is named
_NORM_LIKE_NAME = re.compile(r"(^|_)(ln|norm|layernorm|layer_norm)(_?\d+)?$|norm$", re.IGNORECASE)


def inspect(model_or_path: str | Path | nn.Module, trust_remote_code: bool = False) -> Topology:
    """Detect where each norm sits relative to each residual add, and what kind of norm it is.

    ``model_or_path`` is a checkpoint folder, a ``config.json``, or a loaded transformers model.
    No weights are read: the model is rebuilt on the meta device.
    """
    if isinstance(model_or_path, nn.Module):
        return _inspect_built(build_meta_model(model_or_path, trust_remote_code))
    config = load_config(model_or_path, trust_remote_code)
    sampled = _inspect_sample(config, trust_remote_code)
    if sampled is not None:
        return sampled
    return _inspect_built(meta_model_from_config(config, trust_remote_code))


def _inspect_sample(config: Any, trust_remote_code: bool) -> Topology | None:
    """The topology from a sample of a deep config's layers; None where the full build must answer."""
    try:
        plan = plan_sample(config)
        if plan is None:
            return None
        return _inspect_built(meta_model_from_config(plan.config, trust_remote_code), plan)
    except Exception:  # noqa: BLE001 - whatever went wrong with the sample, the full build reports it truthfully
        return None


def _inspect_built(meta: MetaModel, sample: SamplePlan | None = None) -> Topology:
    recipe = recipe_for(meta.model_type)
    try:
        return _inspect_meta_model(meta, recipe.notes if recipe else (), sample)
    except TopologyError as error:
        if recipe and recipe.notes:
            raise TopologyError(f"{error} (recipe note for {meta.model_type}: {recipe.notes[0]})") from error
        raise


class _SampleMismatchError(Exception):
    """The built sample does not stand for the full model."""


def _inspect_meta_model(meta: MetaModel, notes: tuple[str, ...], sample: SamplePlan | None = None,
                        stacks: list[tuple[str, list[tuple[str, nn.Module]]]] | None = None) -> Topology:
    model = meta.model
    base_prefix = _base_model_prefix(model)
    stacks = find_layer_stacks(model) if stacks is None else stacks
    if not stacks:
        raise TopologyError(
            f"{type(model).__name__} ({meta.model_type}) has no list of layer modules; "
            "normswap works on transformer stacks"
        )
    layers_by_path = {path: (index, layer) for _, stack in stacks for index, (path, layer) in enumerate(stack)}
    layer_paths = set(layers_by_path)
    norms = _classify_all_norms(model, named_width(model, meta.config, [path for path, _ in stacks]), meta.config)
    model_level_norms = {
        path: model.get_submodule(path) for path in norms
        if not any(path.startswith(layer + ".") for layer in layer_paths) and path.startswith(base_prefix)
        and norms[path].kind != "identity"
    }
    run = capture_run(model, meta.config, layers_by_path, model_level_norms)

    layers: list[Layer] = []
    notes = list(notes)
    analysed: dict[Any, tuple[LayerReading, list[str]]] = {}
    keys: dict[str, Any] = {}
    widths: dict[str, int | None] = {}  # the stream width of each stack, as its first traced layer reads it
    axes: dict[str, int] = {}  # the axis of each stack's stream that holds its channels
    stems: dict[str, tuple[str, ...]] = {}  # each layer's norms on the stream before its first residual
    for stack_path, stack_layers in stacks:
        for index, (path, layer) in enumerate(stack_layers):
            call = run.layer_calls.get(path)
            if call is None:
                continue  # a layer the forward skipped (e.g. a decoder-only pass of an encoder stack)
            relative_norms = {p.removeprefix(path + "."): info for p, info in norms.items()
                              if p.startswith(path + ".")}
            key = keys[path] = _layer_signature(layer, index, relative_norms, call)
            if key not in analysed:
                traced = trace_layer(layer, call, {id(layer.get_submodule(p)) for p in relative_norms})
                graph = LayerGraph(traced, layer, relative_norms)
                try:
                    reading = analyse_layer(graph, path)
                except NoResidualAddError:
                    restacked = _without_addless_stack(stacks, stack_path)
                    try:
                        if restacked is None:
                            raise
                        return _inspect_meta_model(meta, notes, sample, restacked)
                    except TopologyError:
                        lists = index_lists(model, stack_path, norms)
                        if lists is None:
                            raise
                        # no layer modules: the forward runs the layers by index over lists of branches and norms
                        return _index_loop_topology(meta, notes, lists, norms)
                except OutputPastLastAddError as error:
                    restacked = _without_addless_stack(stacks, stack_path, keep=True)
                    if restacked is None:
                        raise
                    try:
                        return _inspect_meta_model(meta, notes, sample, restacked)
                    except TopologyError:
                        raise error from None  # the lists it holds are no stacks either (MobileBERT's FFN list)
                analysed[key] = (reading, sorted(relative_norms))
                notes.extend(f"{path}.{opaque} was traced as one node (tracing inside it failed); norms inside "
                             "it are listed as inner norms" for opaque in traced.opaque)
            reading, all_relative = analysed[key]
            widths.setdefault(stack_path, reading.stream_width)
            axes.setdefault(stack_path, reading.stream_axis)
            stems[path] = tuple(f"{path}.{stem}" for stem in reading.stem_norms)
            layers.append(Layer(
                index=index,
                stack=stack_path,
                path=path,
                layer_class=type(layer).__name__,
                sublayers=tuple(_relocate(sub, path) for sub in reading.sublayers),
                inner_norms=tuple(
                    NormSite(f"{path}.{rel}", "inner", relative_norms[rel].kind, relative_norms[rel].eps,
                             relative_norms[rel].dim, axis=relative_norms[rel].axis)
                    for rel in all_relative if rel not in reading.used_norms and relative_norms[rel].kind != "identity"
                ),
                output_scale=_relocate_scale(reading.output_scale, path),
            ))
    notes.extend(reuse_notes(stacks, run, model_level_norms))
    notes.extend(stand_in_notes(model))

    stack_records, layers = lift_stem_norms(_place_edge_norms(stacks, run, norms, model_level_norms, widths, axes),
                                            layers, stems)
    topology = Topology(
        model_type=meta.model_type,
        model_class=type(model).__name__,
        stacks=tuple(stack_records),
        layers=tuple(layers),
        notes=tuple(notes),
    )
    if sample is not None:
        mismatch = sample_mismatch(sample, stacks, keys)
        if mismatch:
            raise _SampleMismatchError(mismatch)
        topology = expand_sample(topology, sample)
    return replace(topology, notes=(*topology.notes, *scale_notes(topology.layers)))  # over every layer, not a sample


def _index_loop_topology(meta: MetaModel, notes: list[str], lists: IndexLists, norms: dict[str, NormInfo]
                         ) -> Topology:
    """The topology of a model whose forward runs its layers by index over lists of branches and norms."""
    try:
        stack, layers = inspect_index_loop(meta.model, meta.config, lists, norms)
    except TopologyError as error:
        raise TopologyError(f"{lists.describe(meta.model)}; read one index at a time, its forward "
                            f"shows no layout normswap can tell: {error}") from error
    topology = Topology(model_type=meta.model_type, model_class=type(meta.model).__name__, stacks=(stack,),
                        layers=tuple(layers), notes=tuple(notes))
    return replace(topology, notes=(*topology.notes, *scale_notes(topology.layers)))


def _without_addless_stack(stacks: list[tuple[str, list[tuple[str, nn.Module]]]], addless: str, keep: bool = False
                           ) -> list[tuple[str, list[tuple[str, nn.Module]]]] | None:
    """The stacks with ``addless`` (whose layers show no residual add) replaced by the layer lists its layers hold,
    or left out where they hold none and another stack remains (unless ``keep``); None where neither applies.

    A hierarchical vision model keeps a list of stages, each of one width, with a patch embedding, a list of
    residual layers and a norm (SegFormer, PVT-v2): each stage's list is a stack. So does a stage that runs its
    list and then merges patches (FocalNet): its output does not come from a residual add (``keep``: the stages
    are not left out). PVT keeps the patch embeddings in a list of their own beside the layer lists: no residual
    add in them, so no stack."""
    layers = next(found for path, found in stacks if path == addless)
    inner = [find_layer_stacks(layer, (nn.ModuleList, nn.Sequential)) for _, layer in layers]  # CvT's Sequential
    others = [stack for stack in stacks if stack[0] != addless]
    if all(inner):
        nested = [(f"{path}.{inner_path}", [(f"{path}.{layer_path}", module) for layer_path, module in inner_layers])
                  for (path, _), found in zip(layers, inner, strict=True) for inner_path, inner_layers in found]
        position = next(index for index, (path, _) in enumerate(stacks) if path == addless)
        return [*others[:position], *nested, *others[position:]]
    return None if keep else others or None


def _base_model_prefix(model: nn.Module) -> str:
    """Where the base model sits in a model with a head, whose norms (a head's own) are no edge norms of the stream.
    A "base model" that holds nothing but lists of layers is no base model: it is the encoder of a base model whose
    attribute happens to carry the prefix's name (Sapiens2Model.model, its ``base_model_prefix``), and the norm
    after it, on the model itself, is the stream's final norm."""
    base = getattr(model, "base_model", model)
    if base is model or all(isinstance(child, (nn.ModuleList, nn.Sequential)) for child in base.children()):
        return ""
    for path, module in model.named_modules():
        if module is base:
            return path + "."
    return ""


def _classify_all_norms(model: nn.Module, hidden_size: int | None, config: Any) -> dict[str, NormInfo]:
    """Every norm module of the model by path; probes run once per distinct module shape. The width is needed
    only for a norm whose weights do not tell its size (a weightless one, ``nn.Identity``)."""
    cache: dict[Any, NormInfo | None] = {}
    found: dict[str, NormInfo] = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Identity):
            if _NORM_LIKE_NAME.search(path.rsplit(".", 1)[-1]):
                found[path] = NormInfo("identity", None, _needed_width(hidden_size, path, config))
            continue
        key = (type(module), tuple((n, tuple(p.shape)) for n, p in module.named_parameters(recurse=False)),
               tuple(sorted((k, v) for k, v in vars(module).items() if isinstance(v, (int, float, tuple)))))
        if key not in cache:
            cache[key] = classify_norm(module, _PROBE_WIDTH if hidden_size is None else hidden_size)
            if cache[key] is not None and hidden_size is None and own_size(module) is None:
                _needed_width(hidden_size, path, config)  # a weightless norm: its size is the unnamed width
        if cache[key] is not None:
            found[path] = cache[key]  # type: ignore[assignment]
    return found


def _needed_width(hidden_size: int | None, path: str, config: Any) -> int:
    if hidden_size is None:
        raise SourceError(f"{unnamed_width_message(config)} ({path})")
    return hidden_size


def _layer_signature(layer: nn.Module, index: int, norms: dict[str, NormInfo], call: LayerCall) -> Any:
    """Layers with equal signatures have equal topologies, so 80 identical layers are traced once."""
    return module_signature(layer, index), tuple(sorted(norms.items())), input_signature(call.args, call.kwargs)


def _relocate(sub: Sublayer, layer_path: str) -> Sublayer:
    """A template sublayer (paths relative to its layer) placed at ``layer_path``."""
    return replace(
        sub,
        norms=tuple(replace(n, path=f"{layer_path}.{n.path}") for n in sub.norms),
        branches=tuple(replace(b, modules=tuple(f"{layer_path}.{m}" for m in b.modules),
                               reads=tuple(f"{layer_path}.{r}" for r in b.reads),
                               entry=f"{layer_path}.{b.entry}" if b.entry else None) for b in sub.branches),
        residual_scale=_relocate_scale(sub.residual_scale, layer_path),
    )


def _relocate_scale(scale: ResidualScale | None, layer_path: str) -> ResidualScale | None:
    if scale is None:
        return None
    return replace(scale, tensors=tuple(f"{layer_path}.{t}" for t in scale.tensors))


def _place_edge_norms(stacks: list, run: CapturedRun, norms: dict[str, NormInfo],
                      model_level: dict[str, nn.Module], widths: dict[str, int | None],
                      axes: dict[str, int]) -> list[Stack]:
    """Embedding norms run after the previous stack and before a stack; final norms right after it.

    Only a norm as wide as the stack's stream can be one: a norm of a side input computed before the layers
    (per-layer embeddings, 512 wide beside a 64-wide stream) is neither."""
    order = run.call_order
    calls = Counter(order)
    records: list[Stack] = []
    called = [(path, layers) for path, layers in stacks if layers[0][0] in run.layer_calls]
    for position, (stack_path, stack_layers) in enumerate(called):
        first = order.index(stack_layers[0][0])
        last = max(i for i, name in enumerate(order) if name == stack_layers[-1][0])
        previous_end = (max(i for i, name in enumerate(order) if name == called[position - 1][1][-1][0])
                        if position else -1)
        next_start = (order.index(called[position + 1][1][0][0]) if position + 1 < len(called) else len(order))
        parent = stack_path.rsplit(".", 1)[0] + "." if "." in stack_path else ""
        previous_parent = (called[position - 1][0].rsplit(".", 1)[0] + "."
                           if position and "." in called[position - 1][0] else None)
        width = widths.get(stack_path)
        edges = {n for n in model_level if width is None or norms[n].dim == width}
        before = [n for n in order[previous_end + 1:first] if n in edges
                  and not (previous_parent and n.startswith(previous_parent)
                           and not run.hands_on(n, stack_layers[0][0]))]
        if before and not run.feeds_layer(before[-1], stack_layers[0][0]):
            # a norm of the embeddings that positions are added to or a projection reads afterwards (BlenderBot-
            # Small's decoder, FNet) is part of computing the stream, not a norm on it
            before = []
        is_last = position + 1 == len(called)
        after = [n for n in order[last + 1:next_start] if n in edges
                 and (is_last or n.startswith(parent) or run.reads_layer_output(n, stack_layers[-1][0]))]
        passes = sum(calls[path] for path, _ in stack_layers)
        records.append(Stack(
            path=stack_path,
            num_layers=len(stack_layers),
            embedding_norm=_site(before[-1], "embedding", norms) if before else None,
            final_norm=_site(after[0], "final", norms) if after else None,
            width=width,
            axis=axes.get(stack_path, -1),
            passes=passes if passes > len(stack_layers) else None,
        ))
    return records


def _site(path: str, slot: Any, norms: dict[str, NormInfo]) -> NormSite:
    info = norms[path]
    return NormSite(path, slot, info.kind, info.eps, info.dim, axis=info.axis)
