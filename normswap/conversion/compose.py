"""Passes planned on one model, made into one conversion: ``compose``.

A ``Pass`` (passes.py) says the code edits it makes to the family's source, its calibration sites and how it
rewrites the tensor program. ``compose`` applies every pass's edits to one copy of the source (one generated
module, or the stock family a recipe names, ``stock_target.py``), runs the rewrites in order, and verifies once
against the original. Planning stays weightless: where a pass needs calibrated scales, the setup has no program
until ``ConversionSetup.with_calibration`` has run the source on the calibration inputs. Passes planned on the
model an earlier conversion produced are sequenced by ``chain.py`` instead.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..detect import inspect
from ..errors import NormswapError
from ..recipe import NativeTarget
from ..topology import Topology
from .generated import generate_family_code
from .native import meta_instance
from .passes import Pass, PassReport, Scales, calibration_sites, pass_reports, run_rewrites
from .program import TensorProgram, copy_of, shapes_of
from .setup import ConversionSetup
from .stock_target import as_stock, carried_name
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


class UnreachedPlacementError(NormswapError):
    """The generated code does not detect as the placement the conversion was asked for."""


def _require_reached(target: Topology, wanted: str) -> None:
    """Refuse a model whose code detects as another placement than the one asked for: the norms were added or
    removed where the code has them, but a branch reads the stream some other way too (NeoMME's attention reads a
    learned mix of the stream and the first layer's input, and only its norm's output is wrapped)."""
    if target.placement == wanted:
        return
    where = next(((layer.path, index, sub) for layer in target.layers for index, sub in enumerate(layer.sublayers)
                  if sub.placement not in (wanted, "parallel")), None)
    detail = (f"; sublayer {where[1]} of {where[0]} ({where[2].kind}) detects as {where[2].placement}, its branch "
              "not reading the stream through the norms the conversion placed" if where else "")
    raise UnreachedPlacementError(f"the converted {target.model_type} code detects as {target.placement}, not "
                                  f"{wanted}{detail}: normswap writes no model whose layout is not the one asked for")


def compose(model: nn.Module, source: Topology, passes: Sequence[Pass], conversion: str,
            native: NativeTarget | None = None, wanted: str | None = None) -> ConversionSetup:
    """The setup that carries out ``passes`` on ``model`` (loaded or meta) in one generated module, or as the stock
    family ``native`` where its recipe names one (the generated code is still planned: its topology says which
    stock norm each new norm is, slot by slot, and a stock family that does not line up falls back to it).
    ``wanted``: the placement the generated code must detect as, else the conversion is refused."""
    passes = tuple(passes)
    edits = [edit for each in passes for edit in each.edits]
    unique_edits = list(dict.fromkeys(edits))
    config_values: dict[str, Any] = {}
    for each in passes:
        config_values.update(each.config_values)
    helpers = {flag: True for each in passes for flag in each.helpers}
    renames: dict[str, str] = {}
    if unique_edits or config_values or helpers:
        generated, cls, config = generate_family_code(model, source, unique_edits, conversion, config_values,
                                                      **helpers)
        target = inspect(meta_instance(cls, config))
        if wanted is not None:
            _require_reached(target, wanted)
    else:  # the passes only rewrite tensors (stream_scale.py): the model keeps its own classes and code
        generated, cls, config = getattr(model, "normswap_generated", None), type(model), copy.deepcopy(model.config)
        target = source
    realisation = (f"generated code: {generated.file_name}" if generated is not None
                   else f"native: {source.model_type}")
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
        carried = {carried_name(key, renames): step for each in passes if each.carry is not None
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
