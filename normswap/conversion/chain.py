"""Conversions run one after another as one conversion (docs/design.md §9): ``chain``.

Each planner (a function from a model, loaded or on the meta device, to its ``ConversionSetup``) is planned on
the meta model the one before produced, so a later pass sees the earlier passes' layout; its code edits go into
the module the earlier passes generated (one module ships, ``generated._on_top``), its tensor program reads what
the earlier programs output (``then``), and verification runs once against the original, with each pass's own
figure beside it. Calibrated passes measure their scales on the model before them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..detect import inspect
from ..errors import NormswapError
from .calibration import CalibratedScale
from .native import meta_instance
from .program import Step, TensorProgram, combine
from .setup import ConversionSetup, realise
from .verify import measure_drift, require_topology

Planner = Callable[[nn.Module], ConversionSetup]


@dataclass(frozen=True)
class ChainedPlan:
    """The plans of conversions run one after another on one model, as one conversion (docs/design.md §9)."""

    plans: tuple[Any, ...]

    noop = False

    @property
    def source_model_type(self) -> str:
        return self.plans[0].source_model_type

    @property
    def target_model_type(self) -> str:
        return self.plans[-1].target_model_type

    @property
    def source_placement(self) -> str | None:
        return getattr(self.plans[0], "source_placement", None)

    @property
    def target_placement(self) -> str | None:
        return getattr(self.plans[-1], "target_placement", None)

    @property
    def realisation(self) -> str:
        return self.plans[-1].realisation

    @property
    def exact(self) -> bool:
        return all(plan.exact for plan in self.plans)

    @property
    def notes(self) -> tuple[str, ...]:
        return tuple(note for plan in self.plans for note in plan.notes)

    def describe(self) -> str:
        passes = "\n".join(f"  pass {number}: " + plan.describe().replace("\n", "\n  ")
                           for number, plan in enumerate(self.plans, 1))
        return (f"plan: {self.source_model_type} -> {self.target_model_type} in {len(self.plans)} passes via "
                f"{self.realisation}; exact: {str(self.exact).lower()}\n{passes}")

    def to_dict(self) -> dict[str, Any]:
        return {"source_model_type": self.source_model_type, "target_model_type": self.target_model_type,
                "source_placement": self.source_placement, "target_placement": self.target_placement,
                "realisation": self.realisation, "exact": self.exact, "noop": False,
                "passes": [plan.to_dict() for plan in self.plans]}


@dataclass(frozen=True)
class ChainedReport:
    """The whole conversion measured against the original, and each pass measured against the model before it."""

    whole: Any  # DriftReport, or an exactness report where every pass is exact
    passes: tuple[Any, ...]

    def __getattr__(self, name: str) -> Any:
        """The whole conversion's figures under their usual names (``sublayers``, ``output_cosine``, ...), as a
        one-pass conversion's report has them."""
        if name.startswith("__") or name in ("whole", "passes"):
            raise AttributeError(name)
        return getattr(self.whole, name)

    @property
    def exact(self) -> bool:
        return bool(getattr(self.whole, "exact", False))

    def summary(self) -> str:
        lines = [self.whole.summary()]
        lines += [f"  pass {number}: {report.summary()}" for number, report in enumerate(self.passes, 1)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {**self.whole.to_dict(), "passes": [report.to_dict() for report in self.passes]}


def chain(model: nn.Module, planners: Sequence[Planner]) -> ConversionSetup:
    """``planners`` run in order, each on the meta model the one before produced, as one conversion: one module
    of generated code (a later pass edits the code the earlier ones wrote), one tensor program (each pass's steps
    read what the earlier passes made of each tensor), one verification against the original. A pass that has
    nothing to do drops out; a single remaining pass is returned as it is."""
    setups: list[ConversionSetup] = []
    skipped: list[ConversionSetup] = []
    current = model
    for planner in planners:
        setup = planner(current)
        if setup.noop:
            skipped.append(setup)
            continue
        setups.append(setup)
        current = intermediate_model(setup, model)
    if not setups:
        return skipped[0]
    if len(setups) == 1:
        return setups[0]
    conversion = "; then ".join(setup.conversion for setup in setups if setup.conversion)  # "": writes no code
    source, target = setups[0].source or inspect(model), setups[-1].target
    plan = ChainedPlan(tuple(setup.plan for setup in setups))
    sites = tuple(dict.fromkeys(site for setup in setups for site in setup.calibration))

    def assemble(ready: Sequence[ConversionSetup], scales: Sequence[CalibratedScale]) -> ConversionSetup:
        program = ready[0].program
        for later in ready[1:]:
            program = then(program, later.program)

        def verify(original: nn.Module, converted: nn.Module, probe: dict[str, torch.Tensor]) -> ChainedReport:
            reached = require_topology(converted, target) if target is not None else inspect(converted)
            whole = measure_drift(original, converted, source, reached, probe, exact=plan.exact)
            return ChainedReport(whole, _pass_reports(original, ready, probe))

        return ConversionSetup(plan, program, ready[-1].target_class, ready[-1].target_config, ready[-1].generated,
                               conversion, source, target, verify, calibration=sites, scales=tuple(scales))

    def calibrate_each(original: nn.Module, inputs: dict[str, torch.Tensor], unit: bool) -> ConversionSetup:
        """Each pass's scales measured on the model before it (its module paths are that model's), the earlier
        passes realised in memory from the original to run the later passes' calibration."""
        ready: list[ConversionSetup] = []
        before = original
        for index, setup in enumerate(setups):
            setup = setup.with_calibration(before, inputs, unit)
            ready.append(setup)
            if not unit and any(later.program is None for later in setups[index + 1:]):  # unit: nothing to run
                if any(parameter.device.type == "meta" for parameter in before.parameters()):
                    raise NormswapError("a later pass of this conversion calibrates on the model an earlier pass "
                                        "makes, which needs the weights in memory: raise --verify-max-size above "
                                        "the checkpoint's size")
                before = realise(before, setup)
        return assemble(ready, [scale for setup in ready for scale in setup.scales])

    last = setups[-1]
    if not sites:
        return assemble(setups, ())
    return ConversionSetup(plan, None, last.target_class, last.target_config, last.generated, conversion, source,
                           target, calibration=sites, calibrator=calibrate_each)


def intermediate_model(setup: ConversionSetup, original: nn.Module) -> nn.Module:
    """The meta model a pass produces, as the next pass plans on it: it remembers the module it was generated as
    (so the next pass edits that code) and the original family (for auto_map)."""
    model = meta_instance(setup.target_class, copy.deepcopy(setup.target_config))
    model.normswap_source_model_type = getattr(original, "normswap_source_model_type",
                                               original.config.model_type)
    if setup.generated is not None:
        model.normswap_generated = setup.generated
    return model


def then(first: TensorProgram, second: TensorProgram) -> TensorProgram:
    """``second`` run on what ``first`` outputs, as one program over ``first``'s source tensors."""
    def through(step: Step) -> Step:
        missing = [key for key in step.reads if key not in first.outputs]
        if missing:
            raise KeyError(f"a later pass reads {missing[0]}, which the earlier pass does not output")
        if not step.touches and step.reads:  # a copy: the earlier pass's step as it is
            return first.outputs[step.reads[0]]
        return Step(*_combined_reads(step, first))

    return TensorProgram({key: through(step) for key, step in second.outputs.items()},
                         {**first.carried, **{key: through(step) for key, step in second.carried.items()}},
                         (*first.checks, *(through(check) for check in second.checks)))


def _combined_reads(step: Step, first: TensorProgram) -> tuple[tuple[str, ...], Callable[..., torch.Tensor]]:
    combined = combine(step.compute, *(first.outputs[key] for key in step.reads))
    return combined.reads, combined.compute


def _pass_reports(original: nn.Module, setups: Sequence[ConversionSetup], probe: dict[str, torch.Tensor]
                  ) -> tuple[Any, ...]:
    """Each pass's own figure: the pass's verification run on the model before it and the model it makes, both
    realised in memory from the original (a model verified offloaded gets the whole conversion's figure only)."""
    if any(parameter.device.type == "meta" for parameter in original.parameters()):
        return ()
    reports = []
    before = original
    with torch.no_grad():
        for setup in setups:
            after = realise(before, setup)
            reports.append(setup.verify(before, after, probe) if setup.verify is not None else None)
            before = after
    return tuple(report for report in reports if report is not None)
