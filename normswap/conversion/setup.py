"""A planned conversion, and how it is carried out in memory.

Planning reads no weights: it works on a loaded model or on its meta-device twin built from
config.json alone. What it produces (``ConversionSetup``) is enough to carry the conversion out
either in memory (``convert_in_memory``, for models already loaded) or streamed tensor by tensor
from disk (``streaming.stream_conversion``); both run the same tensor program.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..codegen.package import GeneratedModule
from ..errors import ExactnessError
from ..io.source_identity import source_name
from ..topology import Topology
from ..version import __version__
from .calibration import CalibratedScale, CalibrationSite, calibrate
from .finite import require_finite_model
from .native import build_with_weights, meta_instance
from .program import TensorProgram, evaluate
from .removed_norm_tensors import with_removed_norm_tensors
from .verify import probe_inputs

logger = logging.getLogger("normswap")
Scales = Mapping[CalibrationSite, CalibratedScale]

Verifier = Callable[[nn.Module, nn.Module, dict[str, torch.Tensor]], Any]


@dataclass(frozen=True)
class ConversionSetup:
    """Everything one conversion needs before touching a weight.

    ``verify(original, converted, probe)`` returns the report (``DriftReport`` or ``ExactnessReport``)
    or raises; ``fallback(error)`` plans the variant to use when verification fails with ``error`` (a more
    conservative exact one, or the approximate conversion where the exact one is impossible), or None.
    """

    plan: Any  # ConversionPlan (placement) or NormKindPlan (norm kind)
    program: TensorProgram | None  # None for a no-op
    target_class: Any = None
    target_config: Any = None
    generated: GeneratedModule | None = None  # the modeling code to ship beside the weights, if any
    conversion: str = ""  # one line for the provenance block, e.g. "placement post -> pre"
    source: Topology | None = None
    target: Topology | None = None
    verify: Verifier | None = None
    fallback: Callable[[ExactnessError], ConversionSetup | None] | None = None
    # scales to measure on the source before the program exists (calibrated stand-ins, docs/design.md §9): then
    # ``program`` is None until ``calibrated(scales)`` returns the setup that has one, and ``scales`` holds them
    calibration: tuple[CalibrationSite, ...] = ()
    calibrated: Callable[[Scales], ConversionSetup] | None = None
    scales: tuple[CalibratedScale, ...] = ()
    # a composed conversion measures each pass's scales on the model before that pass (``chain.chain``)
    calibrator: Callable[[nn.Module, dict[str, torch.Tensor], bool], ConversionSetup] | None = None

    @property
    def noop(self) -> bool:
        return self.program is None and self.calibrated is None and self.calibrator is None

    def with_calibration(self, model: nn.Module, inputs: dict[str, torch.Tensor], unit: bool = False
                         ) -> ConversionSetup:
        """This setup with its program, measuring its calibration sites on ``model`` (the source) if it needs them;
        ``unit``: every scale 1 instead (a removed norm keeps its weight but drops its statistic, an added norm
        starts at weight 1), the naive start that the calibrated one is measured against."""
        if self.program is not None:
            return self
        if self.calibrator is not None:
            return self.calibrator(model, inputs, unit)
        if self.calibrated is None:
            return self
        if unit:
            return self.calibrated({site: CalibratedScale(site, 1.0, 0, 0.0) for site in self.calibration})
        return self.calibrated(calibrate(model, self.calibration, inputs))


def provenance(plan: Any, conversion: str, source: str | None, architectures: list[str] | None = None
               ) -> dict[str, Any]:
    """The ``normswap`` block written into the converted config; ``source`` named as ``source_name`` says
    (never an absolute path: the config travels). A composed conversion also names the source's architectures:
    its first pass may go to a stock family whose classes the config then names, and planning it again starts
    from the source's."""
    block = {"version": __version__, "source": source_name(source), "source_model_type": plan.source_model_type,
             "conversion": conversion, "realisation": plan.realisation, "exact": plan.exact}
    if architectures and "; then " in conversion:
        block["source_architectures"] = list(architectures)
    return block


def realise(model: nn.Module, setup: ConversionSetup, allow_nonfinite: bool = False) -> nn.Module:
    """The converted model, built in memory from ``model``'s weights: same dtype, device and mode.
    A model holding NaN or Inf is refused unless ``allow_nonfinite``."""
    if setup.noop:
        logger.warning(setup.plan.notes[0])
        return model
    if setup.program is None:
        raise ValueError("this conversion needs calibrated scales: call setup.with_calibration(model, inputs) first")
    if not allow_nonfinite:
        require_finite_model(model)
    parameter = next(model.parameters())
    program = setup.program if setup.generated is None else \
        with_removed_norm_tensors(setup.program, meta_instance(setup.target_class, copy.deepcopy(setup.target_config)))
    state, carried = evaluate(program, model.state_dict(), parameter.dtype)
    # a config of its own: the model keeps it, and realising the same setup again (a chain's per-pass reports) must
    # not rewrite the provenance of a model built before
    converted = build_with_weights(setup.target_class, copy.deepcopy(setup.target_config), state, parameter.dtype,
                                   parameter.device)
    converted.train(model.training)
    converted.config.normswap = provenance(setup.plan, setup.conversion,
                                           getattr(model.config, "_name_or_path", "") or None,
                                           getattr(model.config, "architectures", None) or [type(model).__name__])
    converted.normswap_plan = setup.plan
    converted.normswap_carried = carried
    return converted


def convert_in_memory(model: nn.Module, setup: ConversionSetup, inputs: dict[str, torch.Tensor] | None = None,
                      allow_nonfinite: bool = False, unit_scales: bool = False
                      ) -> tuple[nn.Module, ConversionSetup, Any]:
    """Realise and verify ``setup`` on a loaded model; (converted model, the setup used, report)."""
    needs_probe = setup.verify is not None or (setup.program is None and not setup.noop)
    probe = inputs or (probe_inputs(model, None, None) if needs_probe else {})
    setup = setup.with_calibration(model, probe, unit=unit_scales)
    converted = realise(model, setup, allow_nonfinite)
    if setup.verify is None:
        return converted, setup, None
    try:
        report = setup.verify(model, converted, probe)
    except ExactnessError as error:
        replacement = setup.fallback(error) if setup.fallback is not None else None
        if replacement is None:
            raise
        return convert_in_memory(model, replacement, probe, allow_nonfinite)
    converted.normswap_report = report
    return converted, setup, report
