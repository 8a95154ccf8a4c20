"""Which passes take a model from the layout it has to the one asked for (docs/design.md §9).

The edges between placements are declared by the files that plan them (``registry.py``): the norm shift
(Post <-> Pre, §3) in ``api.py``, the branch-norm passes (dropping or adding norms with calibrated stand-ins)
in ``branch_norm_passes.py``, the stream-scaled moves to Post-Norm in ``stream_scaled_moves.py``. A route is the
cheapest sequence of edges; placements meet at Pre-Norm. Every step, and the whole route, first tries the way
home (``return_home.py``): a model the branch-norm passes made goes back to its stock family exactly. A
norm-kind change (``NORM_KINDS``) runs where the model is Pre-Norm, where the exact maps are exact (§4, §5):
before the placement passes when the source is Pre-Norm, after them when it is not; kinds that remove norms go
last, since the placement passes move norms.
"""

from __future__ import annotations

import logging

from torch import nn

from ..detect import inspect
from ..errors import NormswapError
from ..topology import Topology
from .chain import Planner, chain
from .plan import ConversionPlan, require_placement_source
from .registry import EdgeContext, PlacementEdge, find_route, norm_kinds, placements, source_placements
from .setup import ConversionSetup

PRE_LIKE = ("pre", "parallel")
logger = logging.getLogger("normswap")


def plan_layout(model: nn.Module, placement: str | None = None, norm: str | None = None, *, exact: bool = False,
                untie: bool = False, native: bool = True, keep_stream_size: bool = False,
                only: tuple[str, ...] = ()) -> ConversionSetup:
    """The setup for ``--placement`` and/or ``--norm`` on ``model`` (loaded or meta), as one conversion.
    ``keep_stream_size``: a Pre-Norm model moved to post first sets its pre norms to the stream's calibrated scale
    (``stream_scale.py``), so the moved norms keep the stream's size; refused for any other placement change.
    ``only``: with ``--norm none|dyt``, the groups of norms to replace (a stage of a staged removal)."""
    if placement is None and norm is None:
        raise NormswapError("pass placement=, norm= or both")
    if placement is not None and placement not in placements():
        raise NormswapError(f"placement must be one of {', '.join(placements())}, got {placement!r}")
    if norm is not None:
        require_norm_kind(norm)
    if placement is None:
        return norm_planner(norm, exact, untie, only)(model)
    topology = inspect(model)
    source = topology.placement
    if source not in source_placements():
        require_placement_source(topology)  # raises, naming what rules the placement passes out
    edges = find_route(source, placement, ("keep_stream_size",) if keep_stream_size else ())
    logger.debug("route %s -> %s: %s", source, placement,
                 "; ".join(f"{edge.source} -> {edge.target}: {edge.description}" for edge in edges) or "none")
    planners = [route_planner(edges, native)] if edges else []
    if not planners and norm is None:
        return _already(topology, placement)
    if norm is None:
        return chain(model, planners)
    kind = norm_planner(norm, exact, untie, only)
    removes = norm_kinds()[norm].removes_norms
    ordered = [kind, *planners] if source in PRE_LIKE and not removes else [*planners, kind]
    return chain(model, ordered)


def require_norm_kind(norm: str) -> None:
    """Refuse a ``--norm`` no file declares, naming those that are."""
    if norm not in norm_kinds():
        raise NormswapError(f"norm={norm!r}: choose {', '.join(repr(name) for name in norm_kinds())}")


def route_planner(edges: tuple[PlacementEdge, ...], native: bool) -> Planner:
    """One planner for the route: each edge's step (tried home first), run in order by ``chain``, the whole route
    tried home first too."""
    steps = [home_or(edge.target, [edge.plan(EdgeContext(native, between=number < len(edges) - 1))])
             for number, edge in enumerate(edges)]
    return steps[0] if len(steps) == 1 else home_or(edges[-1].target, steps)


def _already(topology: Topology, placement: str) -> ConversionSetup:
    """Nothing to do: the model has ``placement`` already."""
    family = topology.model_type
    return ConversionSetup(ConversionPlan(family, family, topology.placement, placement, "none", exact=True,
                                          notes=(f"{family} already has {placement} placement: nothing to do",)),
                           None, source=topology)


def home_or(target: str, planners: list[Planner]) -> Planner:
    """A model the branch-norm passes made, converted to its stock family's placement, goes back to that family
    (``return_home.py``); any other model takes ``planners``."""
    def plan(model: nn.Module) -> ConversionSetup:
        from .return_home import home_setup

        return home_setup(model, target) or chain(model, planners)

    return plan


def norm_planner(norm: str | None, exact: bool, untie: bool, only: tuple[str, ...] = ()) -> Planner:
    from .norm_change import plan_norm_kind

    return lambda model: plan_norm_kind(model, norm or "", exact=exact, untie=untie, only=only)
