"""Conversions as passes (docs/design.md §9): each pass plans one change, and one function composes them.

A pass is planned on the source model (loaded or on the meta device) and its detected topology, and says:
the code edits it makes to the family's modeling source, the config values it sets, the normswap classes
the generated module must ship, the activations it needs measured (calibration sites), and how it rewrites
the tensor program (one ``Step`` per output tensor) once those scales are known. ``compose`` applies the
edits of every pass to one copy of the stock source (one generated module, never generated code of
generated code), runs the tensor rewrites in order (so a later pass builds on what the earlier ones made
of each tensor), and verifies once, against the original. The result is exact only if every pass is.

A new kind of conversion is a new pass file: a function returning a ``Pass``, and the declaration of the step it
makes (``PLACEMENT_EDGES`` or ``NORM_KINDS``, ``registry.py``), from which routes and choices come.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..codegen.edits import Edit
from .calibration import CalibratedScale, CalibrationSite
from .program import Step

Scales = Mapping[CalibrationSite, CalibratedScale]
StepRewrite = Callable[[dict[str, Step], Scales], None]


@dataclass(frozen=True)
class PassMove:
    """One line of a pass's plan: a norm removed (its stand-in folded into ``into``), added, or replaced."""

    action: str  # "fold", "add", "replace", "drop"
    norm: str  # the norm's module path (in the converted model for "add")
    into: tuple[str, ...] = ()  # the tensors a fold changes
    site: CalibrationSite | None = None  # where its scale is measured, if it needs one
    note: str = ""


@dataclass(frozen=True)
class Pass:
    """One planned pass. ``rewrite(steps, scales)`` changes ``steps`` (output key -> Step) in place: it may
    replace steps with ``combine`` over the existing ones, add keys for new tensors and delete removed ones."""

    name: str  # "sandwich -> pre: out norms folded as their stand-ins", shown in the plan and the report
    exact: bool
    placement: str  # the placement the model has after this pass
    edits: tuple[Edit, ...] = ()
    rewrite: StepRewrite | None = None
    calibration: tuple[CalibrationSite, ...] = ()
    moves: tuple[PassMove, ...] = ()
    config_values: Mapping[str, Any] = field(default_factory=dict)
    helpers: frozenset[str] = frozenset()  # package_module flags: "rms_norm", "layer_norm", ...
    notes: tuple[str, ...] = ()
    # what a conversion back needs to undo this pass exactly (docs/design.md §9): the removed norms' vectors and
    # their scales as 0-d tensors, never a copy of a matrix; written beside the weights as carried tensors
    carry: Callable[[dict[str, Step], Scales], dict[str, Step]] | None = None


@dataclass(frozen=True)
class PassReport:
    """What one pass contributed, for the report: its name, whether it is exact, and its measured scales."""

    name: str
    exact: bool
    scales: tuple[CalibratedScale, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "exact": self.exact, "scales": [scale.to_dict() for scale in self.scales]}


def run_rewrites(passes: Sequence[Pass], steps: dict[str, Step], scales: Scales) -> dict[str, Step]:
    """The tensor program after every pass, in order, over ``steps`` (normally ``copy_of`` each source key)."""
    for each in passes:
        if each.rewrite is not None:
            each.rewrite(steps, scales)
    return steps


def calibration_sites(passes: Sequence[Pass]) -> tuple[CalibrationSite, ...]:
    """Every site any pass needs, once each, in order."""
    return tuple(dict.fromkeys(site for each in passes for site in each.calibration))


def pass_reports(passes: Sequence[Pass], scales: Scales) -> tuple[PassReport, ...]:
    return tuple(PassReport(each.name, each.exact, tuple(scales[site] for site in each.calibration if site in scales))
                 for each in passes)

