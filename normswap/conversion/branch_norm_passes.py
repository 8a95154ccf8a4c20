"""The placement changes that add or remove norms on branches (docs/design.md §9), as composed passes.

Each step between two placements (``PLACEMENT_EDGES``, routed by ``route.py``) names passes planned on the
same source and composed into one generated module: "drop out" folds each branch output norm's calibrated
stand-in into the branch's writers, "drop pre" folds each pre norm's into the maps that read it, "add out" and
"add pre" give every branch a new norm started at the calibrated scale of what it reads, and "scale pre" (before
a norm shift to Post-Norm) sets each pre norm's weight to the stream's calibrated scale, folding its own into its
readers.

A mixed model whose sublayers hold their norms only in branch slots (OLMo-Hybrid: Pre-Norm linear-attention layers
among Post-sublayer attention layers; a sandwich attention beside a Pre-Norm MLP) takes the same passes sublayer by
sublayer (``_MIXED_STEPS``, one edge from ``mixed`` to each): each pass acts where its slot needs it and leaves
the sublayers that have the target's norms already.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from torch import nn

from ..detect import inspect
from ..recipe import recipe_for
from ..topology import Topology
from .add_norms import add_out_norms, add_pre_norms
from .chain import chain
from .compose import compose
from .drop_norms import drop_out_norms, drop_pre_norms
from .passes import Pass
from .plan import PlanError
from .registry import PlacementEdge, Planner
from .setup import ConversionSetup
from .stem_norm_shift import shifted_stream_norms, stem_norm_in_every_layer
from .stream_scale import stream_scaled_pre_norms

_PASSES: dict[str, Callable[[nn.Module, Topology], Pass]] = {
    "drop out": drop_out_norms,
    "drop pre": drop_pre_norms,
    "add out": add_out_norms,
    "add pre": add_pre_norms,
    "scale pre": stream_scaled_pre_norms,
    "add missing out": functools.partial(add_out_norms, where_missing=True),
    "add missing pre": functools.partial(add_pre_norms, where_missing=True),
}


# what each pass does, for descriptions (help, the route's debug log)
_PASS_PHRASES = {
    "drop out": "each branch's output norm removed as its calibrated stand-in",
    "drop pre": "each branch's pre norm removed as its calibrated stand-in",
    "add out": "an output norm added to each branch at its calibrated scale",
    "add pre": "a pre norm added before each branch at its calibrated scale",
    "add missing out": "an output norm added, at its calibrated scale, to each branch that has none",
    "add missing pre": "a pre norm added, at its calibrated scale, before each branch that has none",
}


# (from, to) -> the passes, by name, composed into one step between those placements
_BRANCH_NORM_STEPS: dict[tuple[str, str], tuple[str, ...]] = {
    ("sandwich", "pre"): ("drop out",),
    ("post-sublayer", "pre"): ("add pre", "drop out"),
    ("pre", "sandwich"): ("add out",),
    ("pre", "post-sublayer"): ("drop pre", "add out"),
    ("sandwich", "post-sublayer"): ("drop pre",),
    ("post-sublayer", "sandwich"): ("add pre",),
}


def branch_norm_steps(source: str, target: str) -> tuple[str, ...]:
    """The branch-norm passes, by name, that go directly from placement ``source`` to ``target``."""
    return _BRANCH_NORM_STEPS[(source, target)]


def branch_norm_planner(source: str, target: str, native: bool, extra: tuple[str, ...] = ()) -> Planner:
    """The planner of the direct step from ``source`` to ``target``, with the passes ``extra`` after its own."""
    names = branch_norm_steps(source, target) + extra
    conversion = f"placement {source} -> {target} (calibrated stand-ins)"
    return lambda model: branch_norm_setup(model, names, conversion, target, native)


def _edge(source: str, target: str) -> PlacementEdge:
    return PlacementEdge(source, target, lambda context: branch_norm_planner(source, target, context.native),
                         description=f"{'; '.join(_PASS_PHRASES[name] for name in branch_norm_steps(source, target))} "
                                     "(docs/design.md §9)")


# mixed -> target: the passes that may be needed, each planned only where the model has work for it
_MIXED_STEPS: dict[str, tuple[str, ...]] = {
    "pre": ("add missing pre", "drop out"),
    "sandwich": ("add missing pre", "add missing out"),
    "post-sublayer": ("drop pre", "add missing out"),
}
_BRANCH_SLOTS = frozenset({"pre", "out"})


def mixed_planner(target: str, native: bool, extra: tuple[str, ...] = ()) -> Planner:
    """The planner of the step from a mixed model, whose sublayers place branch norms differently, to ``target``
    (with the passes ``extra`` after its own)."""
    def plan(model: nn.Module) -> ConversionSetup:
        topology = inspect(model)
        if stem_norm_in_every_layer(topology):  # MiniMax: Post-Norm read one layer off, first to Pre-Norm
            return _from_stem_norms(model, topology, target, native, extra)
        _require_branch_slots_only(topology)
        held = {norm.slot for layer in topology.layers for sub in layer.sublayers for norm in sub.norms}
        lacking = {slot for slot in _BRANCH_SLOTS
                   if any(not sub.norms_in(slot) for layer in topology.layers for sub in layer.sublayers)}
        names = [name for name in _MIXED_STEPS[target]
                 if (name.startswith("drop") and name.split()[-1] in held)
                 or (name.startswith("add") and name.split()[-1] in lacking)] + list(extra)
        return branch_norm_setup(model, names, f"placement mixed -> {target} (calibrated stand-ins)", target, native)

    return plan


def _require_branch_slots_only(topology: Topology) -> None:
    """The sublayer by sublayer passes move norms on branches; a norm of the stream itself (after an add) or a
    parallel block among sequential sublayers is a different mapping's business, named here."""
    for layer in topology.layers:
        for index, sub in enumerate(layer.sublayers):
            stream_norms = [norm.path for norm in sub.norms if norm.slot not in _BRANCH_SLOTS]
            if stream_norms:
                raise PlanError(
                    f"{topology.model_type} has mixed placement, and sublayer {index} of {layer.path} normalises the "
                    f"stream itself after its add ({', '.join(stream_norms)}) while other sublayers normalise inside "
                    "their branches: the branch-norm passes (docs/design.md §9) add and remove norms on branches only, "
                    "and the norm-shift mapping that moves a stream norm (§3) needs one placement throughout a stack")
            if sub.kind == "parallel":
                raise PlanError(
                    f"{topology.model_type} has mixed placement, and sublayer {index} of {layer.path} is a parallel "
                    "block among sequential sublayers; the branch-norm passes (docs/design.md §9) take a mixed model "
                    "whose sublayers are all sequential")


def _from_stem_norms(model: nn.Module, topology: Topology, target: str, native: bool, extra: tuple[str, ...]
                     ) -> ConversionSetup:
    """A stack that normalises the stream where each layer starts and after an add inside it (``stem_norm_shift``):
    its norms moved onto the branches make it Pre-Norm; from there, ``extra`` (planned on that model) and the route
    to ``target``, each a step of the chain."""
    from .registry import find_route
    from .route import route_planner

    def to_pre(source: nn.Module) -> ConversionSetup:
        return compose(source, topology, [shifted_stream_norms(source, topology)], "placement mixed -> pre",
                       wanted="pre")

    def then_extra(meta: nn.Module) -> ConversionSetup:
        made = inspect(meta)
        return compose(meta, made, [_PASSES[name](meta, made) for name in extra], "")

    steps: list[Planner] = [to_pre, *([then_extra] if extra else [])]
    if target != "pre":
        steps.append(route_planner(find_route("pre", target), native))
    return chain(model, steps)


def _mixed_edge(target: str) -> PlacementEdge:
    return PlacementEdge("mixed", target, lambda context: mixed_planner(target, context.native),
                         description=f"per sublayer, where needed: "
                                     f"{'; '.join(_PASS_PHRASES[name] for name in _MIXED_STEPS[target])} "
                                     "(docs/design.md §9)")


PLACEMENT_EDGES = (*(_edge(source, target) for source, target in _BRANCH_NORM_STEPS),
                   *(_mixed_edge(target) for target in _MIXED_STEPS))


def branch_norm_setup(model: nn.Module, names: Sequence[str], conversion: str, target: str,
                      native: bool = True) -> ConversionSetup:
    """The passes ``names`` planned on ``model`` and composed into one conversion: as the stock family the recipe
    names for ``target`` (with ``native``, where the source has every value it requires), else generated code."""
    topology = inspect(model)
    recipe = recipe_for(topology.model_type) if native else None
    stock = recipe.native_target(target) if recipe is not None else None
    return compose(model, topology, [_PASSES[name](model, topology) for name in names], conversion, stock,
                   wanted=target)
