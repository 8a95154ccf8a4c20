"""One conversion out of several passes: one generated module, one tensor program, one verification.

``compose`` is the only place passes meet (docs/design.md §8). Planning stays weightless: where a pass
needs calibrated scales, the setup it returns has no program yet, and ``ConversionSetup.calibrated``
builds it once the source model has run on the calibration inputs (in memory, or offloaded to disk).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..detect import inspect
from ..errors import NormswapError
from ..recipe import NativeTarget
from ..topology import Topology
from .calibration import CalibratedScale
from .generated import generate_family_code
from .native import meta_instance, target_class, target_config
from .passes import Pass, PassReport, Scales, calibration_sites, pass_reports, run_rewrites
from .program import Step, TensorProgram, combine, copy_of, shapes_of
from .round_trip_carry import SCALE_PREFIX
from .setup import ConversionSetup, realise
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
        scales = [scale for each in self.passes for scale in each.scales]
        if not scales:
            return self.drift.summary()
        spreads = [scale.spread for scale in scales]
        return (f"{self.drift.summary()}\ncalibrated {len(scales)} scales over {max(s.tokens for s in scales)} tokens; "
                f"a token's own scale strays from its site's by {min(spreads):.2f} to {max(spreads):.2f} (coefficient "
                "of variation: how far a norm on one token departs from the linear map it is at its site's scale)")

    def to_dict(self) -> dict[str, Any]:
        return {**self.drift.to_dict(), "passes": [each.to_dict() for each in self.passes]}


def compose(model: nn.Module, source: Topology, passes: Sequence[Pass], conversion: str,
            native: NativeTarget | None = None) -> ConversionSetup:
    """The setup that carries out ``passes`` on ``model`` (loaded or meta) in one generated module, or as the stock
    family ``native`` where its recipe names one (the generated code is still planned: its topology says which
    stock norm each new norm is, slot by slot, and a stock family that does not line up falls back to it)."""
    passes = tuple(passes)
    edits = [edit for each in passes for edit in each.edits]
    unique_edits = list(dict.fromkeys(edits))
    config_values: dict[str, Any] = {}
    for each in passes:
        config_values.update(each.config_values)
    helpers = {flag: True for each in passes for flag in each.helpers}
    generated, cls, config = generate_family_code(model, source, unique_edits, conversion, config_values, **helpers)
    target = inspect(meta_instance(cls, config))
    renames: dict[str, str] = {}
    realisation = f"generated code: {generated.file_name}"
    removed = frozenset(move.norm for each in passes for move in each.moves if move.action in ("fold", "drop"))
    stock = as_stock(model, native, target, removed) if native is not None else None
    if stock is not None:
        cls, config, target, renames = stock
        generated, realisation = None, f"native: {native.model_type}"
        paths = {key.removesuffix(".weight"): name.removesuffix(".weight") for key, name in renames.items()
                 if key.endswith(".weight")}
        passes = tuple(replace(each, moves=tuple(replace(move, norm=paths.get(move.norm, move.norm))
                                                 for move in each.moves)) for each in passes)
    exact = all(each.exact for each in passes)
    plan = ComposedPlan(source.model_type, config.model_type, source.placement, target.placement, realisation,
                        exact, passes)
    source_keys = list(model.state_dict())
    target_shapes = shapes_of(meta_instance(cls, config).state_dict())
    sites = calibration_sites(passes)

    def with_scales(scales: Scales) -> ConversionSetup:
        initial = {key: copy_of(key) for key in source_keys}
        carried = {_carried_name(key, renames): step for each in passes if each.carry is not None
                   for key, step in each.carry(initial, scales).items()}
        steps = run_rewrites(passes, initial, scales)
        steps = {**{key: step for key, step in steps.items() if key not in renames},
                 **{renames[key]: step for key, step in steps.items() if key in renames}}
        missing = sorted(set(target_shapes) - set(steps))
        if missing:
            raise AssertionError(f"the passes left no step for {', '.join(missing[:5])}")  # a pass bug, not input
        program = TensorProgram({key: steps[key] for key in target_shapes}, carried)
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


Planner = Callable[[nn.Module], ConversionSetup]


def _carried_name(key: str, renames: Mapping[str, str]) -> str:
    """A carried tensor's name after the stock family's renames: a new norm's scale follows its norm."""
    if key.startswith(SCALE_PREFIX):
        renamed = renames.get(f"{key.removeprefix(SCALE_PREFIX)}.weight")
        return f"{SCALE_PREFIX}{renamed.removesuffix('.weight')}" if renamed else key
    return renames.get(key, key)


def as_stock(model: nn.Module, native: NativeTarget, generated: Topology, removed: frozenset[str] = frozenset()
             ) -> tuple[Any, Any, Topology, dict[str, str]] | None:
    """(class, config, topology, tensor renames) of the stock family ``native`` standing in for the generated code
    whose topology is ``generated``, or None where it does not line up slot for slot (then the generated code
    stays). The recipe's pair was confirmed by behaviour (benchmarks/native_pairs.py); the renames come from the
    two detected topologies, never from names: the same name may be another slot on the other side. Where a stock
    norm takes the name of a norm the passes removed (Qwen3's MLP pre norm and Exaone 4's attention out norm are
    both ``post_attention_layernorm``), the carried vectors and scales of the two would share one name, so the
    generated code stays, whose new norms have names of their own."""
    if native.unmet(model.config):
        return None
    config = target_config(model.config, native)
    cls = target_class(model, native)
    stock = inspect(meta_instance(cls, config))
    if len(stock.layers) != len(generated.layers) or stock.placement != generated.placement:
        return None
    renames: dict[str, str] = {}
    for ours, theirs in zip(generated.layers, stock.layers, strict=True):
        if len(ours.sublayers) != len(theirs.sublayers):
            return None
        for our_sub, their_sub in zip(ours.sublayers, theirs.sublayers, strict=True):
            ours_by_slot = [(n.slot, n.path) for n in our_sub.norms]
            theirs_by_slot = [(n.slot, n.path) for n in their_sub.norms]
            if [slot for slot, _ in ours_by_slot] != [slot for slot, _ in theirs_by_slot]:
                return None
            renames.update({path: other for (_, path), (_, other) in zip(ours_by_slot, theirs_by_slot, strict=True)})
    if removed & set(renames.values()):
        return None
    keyed = {f"{path}.{leaf}": f"{other}.{leaf}" for path, other in renames.items() for leaf in ("weight", "bias")}
    return cls, config, stock, {key: value for key, value in keyed.items() if key != value}


@dataclass(frozen=True)
class ChainedPlan:
    """The plans of conversions run one after another on one model, as one conversion (docs/design.md §8)."""

    plans: tuple[Any, ...]

    noop = False

    @property
    def source_model_type(self) -> str:
        return self.plans[0].source_model_type

    @property
    def target_model_type(self) -> str:
        return self.plans[-1].target_model_type

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
                "realisation": self.realisation, "exact": self.exact, "noop": False,
                "passes": [plan.to_dict() for plan in self.plans]}


@dataclass(frozen=True)
class ChainedReport:
    """The whole conversion measured against the original, and each pass measured against the model before it."""

    whole: Any  # DriftReport, or an exactness report where every pass is exact
    passes: tuple[Any, ...]

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
    conversion = "; then ".join(setup.conversion for setup in setups)
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
            if any(later.program is None for later in setups[index + 1:]):
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
