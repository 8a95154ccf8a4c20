"""The conversions normswap knows, gathered from the files that plan them (docs/design.md §9).

A file of this package that plans a conversion declares it beside the planning code: ``PLACEMENT_EDGES``, the
placement changes it makes (from one placement to another, in one step), and ``NORM_KINDS``, the ``--norm``
targets it reaches. Nothing else lists them: ``route.py`` finds the cheapest sequence of edges from the
model's placement to the one asked for, and the command line and the API take their choices from here. A new
kind of conversion is a new file with its declaration, and nothing else.
"""

from __future__ import annotations

import heapq
import importlib
import pkgutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from .plan import PlanError

if TYPE_CHECKING:
    from torch import nn

    from ..topology import Topology
    from .setup import ConversionSetup

Planner = Callable[["nn.Module"], "ConversionSetup"]


@dataclass(frozen=True)
class EdgeContext:
    """How a route uses an edge: ``native`` lets a step land in a stock family the recipe names; ``between`` says
    another edge follows this one, so its result is only the input of the next step."""

    native: bool
    between: bool


@dataclass(frozen=True)
class PlacementEdge:
    """One step from placement ``source`` to ``target``. ``plan(context)`` gives the planner of the step (a model,
    loaded or meta, to its setup). Routes take the cheapest path; ``cost`` below the number of plain edges it
    replaces makes a direct step win over the way through Pre-Norm. An edge with an ``option`` (a keyword of
    ``convert``) is taken only when that option is asked for, and then instead of the plain edges it shadows."""

    source: str
    target: str
    plan: Callable[[EdgeContext], Planner]
    cost: float = 1.0
    option: str = ""
    description: str = ""  # what the step does, for the route's debug log


@dataclass(frozen=True)
class NormKind:
    """A ``--norm`` target. ``plan(model, topology, exact, untie)`` gives the setup; ``already`` are the detected
    norm kinds that are this kind already (nothing to do); ``exact_refusal`` says why ``--exact`` cannot hold, if
    it cannot; ``removes_norms`` kinds run after the placement passes, which move norms."""

    name: str
    plan: Callable[[nn.Module, Topology, bool, bool], ConversionSetup]
    already: frozenset[str] = frozenset()
    exact_refusal: str = ""
    removes_norms: bool = False
    description: str = ""  # what the conversion does, for the next engineer reading the declarations
    plural: str = ""  # "RMSNorms": how a note names norms of this kind
    # kinds that can replace some norms and keep the rest (``--only``, a staged removal): model, groups -> setup
    plan_some: Callable[[nn.Module, tuple[str, ...]], ConversionSetup] | None = None

    @property
    def norms_named(self) -> str:
        return self.plural or f"{self.name} norms"


@cache
def _declarations() -> tuple[tuple[PlacementEdge, ...], tuple[NormKind, ...]]:
    """Every declaration of every module of this package, in module-name order (so routes are deterministic)."""
    from . import __path__ as package_path

    edges: list[PlacementEdge] = []
    kinds: list[NormKind] = []
    for module_info in sorted(pkgutil.iter_modules(package_path), key=lambda info: info.name):
        module = importlib.import_module(f"{__package__}.{module_info.name}")
        edges += getattr(module, "PLACEMENT_EDGES", ())
        kinds += getattr(module, "NORM_KINDS", ())
    return tuple(edges), tuple(kinds)


def placement_edges() -> tuple[PlacementEdge, ...]:
    return _declarations()[0]


def norm_kinds() -> Mapping[str, NormKind]:
    """The ``--norm`` targets by name."""
    return {kind.name: kind for kind in _declarations()[1]}


def placements() -> tuple[str, ...]:
    """The placements a conversion can reach (``--placement`` choices), in declaration order."""
    return tuple(dict.fromkeys(edge.target for edge in placement_edges()))


def source_placements() -> frozenset[str]:
    """The placements some edge leaves: a model of any other placement has no route."""
    return frozenset(edge.source for edge in placement_edges())


def find_route(source: str, target: str, asked: Iterable[str] = ()) -> tuple[PlacementEdge, ...]:
    """The cheapest edges from ``source`` to ``target`` (none where they are one placement). Ties go to fewer
    edges, then to the order of declaration. An ``asked`` option the route does not use is refused in one line."""
    wanted = frozenset(asked)
    usable = _usable_edges(placement_edges(), wanted)
    if source == target:
        path: tuple[PlacementEdge, ...] = ()
    else:
        path = _cheapest(usable, source, target)
    for option in sorted(wanted - {edge.option for edge in path}):
        takes = [f"{edge.source} -> {edge.target}" for edge in placement_edges() if edge.option == option]
        flag = f"--{option.replace('_', '-')}"
        raise PlanError(f"{flag} ({option}=) applies to {' and '.join(takes) or 'no conversion'}; this is {source} "
                        f"-> {target}: leave it out")
    return path


def _usable_edges(edges: Sequence[PlacementEdge], wanted: frozenset[str]) -> list[PlacementEdge]:
    """Plain edges, and the asked-for option edges in place of the plain edges they shadow."""
    shadowed = {(edge.source, edge.target) for edge in edges if edge.option in wanted}

    def usable(edge: PlacementEdge) -> bool:
        return edge.option in wanted if edge.option else (edge.source, edge.target) not in shadowed

    return [edge for edge in edges if usable(edge)]


def _cheapest(edges: Sequence[PlacementEdge], source: str, target: str) -> tuple[PlacementEdge, ...]:
    """Dijkstra over placements, keyed by (cost, edges, declaration order of the path)."""
    order = {id(edge): number for number, edge in enumerate(edges)}
    queue: list[tuple[float, int, tuple[int, ...], str, tuple[PlacementEdge, ...]]] = [(0.0, 0, (), source, ())]
    settled: set[str] = set()
    while queue:
        cost, length, ranks, here, path = heapq.heappop(queue)
        if here == target:
            return path
        if here in settled:
            continue
        settled.add(here)
        for edge in edges:
            if edge.source == here and edge.target not in settled:
                heapq.heappush(queue, (cost + edge.cost, length + 1, (*ranks, order[id(edge)]), edge.target,
                                       (*path, edge)))
    raise PlanError(f"no conversion takes a {source} model to {target}: no sequence of placement passes joins them")
