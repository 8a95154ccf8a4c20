"""One conversion out of several passes: one generated module, one tensor program, one verification.

``compose`` is the only place passes meet (docs/design.md §8). Planning stays weightless: where a pass
needs calibrated scales, the setup it returns has no program yet, and ``ConversionSetup.calibrated``
builds it once the source model has run on the calibration inputs (in memory, or offloaded to disk).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..topology import Topology
from .generated import generate_family_code
from .native import meta_instance
from .passes import Pass, PassReport, Scales, calibration_sites, pass_reports, run_rewrites
from .program import TensorProgram, copy_of, shapes_of
from .setup import ConversionSetup
from .verify import DriftReport, measure_drift, require_topology


@dataclass(frozen=True)
class ComposedPlan:
    """The plan of a composed conversion: what ``normswap convert`` prints and writes as JSON."""

    source_model_type: str
    target_model_type: str
    source_placement: str
    target_placement: str
    realisation: str
    exact: bool
    passes: tuple[Pass, ...]
    notes: tuple[str, ...] = ()

    noop = False

    def describe(self) -> str:
        lines = [f"plan: {self.source_model_type} ({self.source_placement}) -> {self.target_model_type} "
                 f"({self.target_placement}) via {self.realisation}; exact: {str(self.exact).lower()}"]
        for number, each in enumerate(self.passes, 1):
            lines.append(f"  pass {number}: {each.name}; exact: {str(each.exact).lower()}")
            for move in each.moves:
                into = f" into {', '.join(move.into)}" if move.into else ""
                note = f"   # {move.note}" if move.note else ""
                lines.append(f"    {move.action} {move.norm}{into}{note}")
            lines += [f"    note: {note}" for note in each.notes]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"source_model_type": self.source_model_type, "target_model_type": self.target_model_type,
                "source_placement": self.source_placement, "target_placement": self.target_placement,
                "realisation": self.realisation, "exact": self.exact, "noop": False,
                "passes": [{"name": each.name, "exact": each.exact, "placement": each.placement,
                            "moves": [{"action": m.action, "norm": m.norm, "into": list(m.into), "note": m.note}
                                      for m in each.moves],
                            "notes": list(each.notes)} for each in self.passes],
                "notes": list(self.notes)}


@dataclass(frozen=True)
class ComposedReport:
    """The drift report of the whole conversion against the original, and each pass's own part."""

    drift: DriftReport
    passes: tuple[PassReport, ...]

    @property
    def exact(self) -> bool:
        return self.drift.exact

    def summary(self) -> str:
        return self.drift.summary()

    def to_dict(self) -> dict[str, Any]:
        return {**self.drift.to_dict(), "passes": [each.to_dict() for each in self.passes]}


def compose(model: nn.Module, source: Topology, passes: Sequence[Pass], conversion: str) -> ConversionSetup:
    """The setup that carries out ``passes`` on ``model`` (loaded or meta) in one generated module."""
    passes = tuple(passes)
    edits = [edit for each in passes for edit in each.edits]
    unique_edits = list(dict.fromkeys(edits))
    config_values: dict[str, Any] = {}
    for each in passes:
        config_values.update(each.config_values)
    helpers = {flag: True for each in passes for flag in each.helpers}
    generated, cls, config = generate_family_code(model, source, unique_edits, conversion, config_values, **helpers)
    from ..detect import inspect  # detection imports conversion helpers; import it where it is used

    target = inspect(meta_instance(cls, config))
    exact = all(each.exact for each in passes)
    plan = ComposedPlan(source.model_type, generated.model_type, source.placement, target.placement,
                        f"generated code: {generated.file_name}", exact, passes)
    source_keys = list(model.state_dict())
    target_shapes = shapes_of(meta_instance(cls, config).state_dict())
    sites = calibration_sites(passes)

    def with_scales(scales: Scales) -> ConversionSetup:
        steps = run_rewrites(passes, {key: copy_of(key) for key in source_keys}, scales)
        missing = sorted(set(target_shapes) - set(steps))
        if missing:
            raise AssertionError(f"the passes left no step for {', '.join(missing[:5])}")  # a pass bug, not input
        program = TensorProgram({key: steps[key] for key in target_shapes})
        reports = pass_reports(passes, scales)

        def verify(original: nn.Module, converted: nn.Module, probe: dict[str, torch.Tensor]) -> ComposedReport:
            require_topology(converted, target)
            return ComposedReport(measure_drift(original, converted, source, target, probe, exact=exact), reports)

        return ConversionSetup(plan, program, cls, config, generated, conversion, source, target, verify,
                               calibration=sites, scales=tuple(scales[site] for site in sites))

    if not sites:
        return with_scales({})
    return ConversionSetup(plan, None, cls, config, generated, conversion, source, target,
                           calibration=sites, calibrated=with_scales)
