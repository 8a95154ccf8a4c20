"""Running each projection into the stream on its own, source beside wider (docs/design.md §5).

Token probes never run a multimodal projector: its input is image or audio features. The extra-dimension map
lifts the projector's last linear map (``U W``) and pads its inner width with a unit that nothing reads, which
is exact only if nothing in between mixes across that width (a norm over it would). So the projector module is
run alone, on random features of its input width, in the original and the converted model: the converted output
must be ``U`` times the original's. A module whose forward needs more than one features tensor cannot be run so,
and the report says it was checked by shape only.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ExactnessError, first_line

_FEATURE_ROWS = (2, 5)  # batch and positions of the random features


@dataclass(frozen=True)
class ProjectionCheck:
    """One projection module run alone: its relative difference from ``U`` times the original's output, or why it
    could not run by itself (``relative`` None)."""

    module: str
    relative: float | None
    why_not_run: str = ""

    def describe(self) -> str:
        if self.relative is None:
            return f"{self.module}: checked by shape only ({self.why_not_run})"
        return f"{self.module}: run alone on random features, {self.relative:.2e} x max|reference|"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_projections(original: nn.Module, converted: nn.Module, modules: Mapping[str, tuple[str, ...]],
                      lift: torch.Tensor, tolerance: float) -> tuple[ProjectionCheck, ...]:
    """Each projection module of ``modules`` (parent -> its linear maps in build order) run alone in both models;
    a converted output further than ``tolerance`` x max|reference| from ``U`` times the original's is an
    ``ExactnessError``."""
    checks = []
    for parent, linears in modules.items():
        check = _check_one(original, converted, parent, linears[0], lift)
        dtype = converted.get_submodule(linears[-1]).weight.dtype  # its weights were rounded to it once
        bound = max(tolerance, 3 * torch.finfo(dtype).eps)
        if check.relative is not None and check.relative > bound:
            raise ExactnessError(f"{parent}, a projection into the stream, run alone on random features gives "
                                 f"{check.relative:.2e} x max|reference| from U times the original's output "
                                 f"(tolerance {bound:.1e}): something inside it mixes across the width it "
                                 "sizes by hidden_size (a norm over it), which the extra dimension changes; leave "
                                 "out --exact for the approximate conversion")
        checks.append(check)
    return tuple(checks)


def _check_one(original: nn.Module, converted: nn.Module, parent: str, first_linear: str,
               lift: torch.Tensor) -> ProjectionCheck:
    source, target = original.get_submodule(parent), converted.get_submodule(parent)
    if any(tensor.is_meta for tensor in (*source.parameters(), *target.parameters())):
        return ProjectionCheck(parent, None, "its weights are offloaded, read as each module runs")
    if next(source.parameters()).dtype not in (torch.float32, torch.float64):  # compare the map, not the rounding
        source, target = copy.deepcopy(source).float(), copy.deepcopy(target).float()
    weight = next(source.parameters())
    generator = torch.Generator().manual_seed(0)
    why = ""
    for shape in _feature_shapes(original.get_submodule(first_linear)):
        features = torch.randn(*shape, generator=generator).to(weight.dtype).to(weight.device)
        try:
            with torch.no_grad():
                reference, output = _first_tensor(_run(source, features)), _first_tensor(_run(target, features))
        except Exception as error:  # noqa: BLE001 - a forward that takes other features: said in the report
            why = why or (f"its forward does not take one features tensor: {type(error).__name__}: "
                          f"{first_line(error)}")
            continue
        if reference is None or output is None or output.shape[-1] != reference.shape[-1] + 1:
            why = why or "its output is not one features tensor of the stream's width"
            continue
        expected = reference.double() @ lift.T.to(reference.device)
        scale = float(expected.abs().max()) or 1.0
        return ProjectionCheck(parent, float((output.double() - expected).abs().max()) / scale)
    return ProjectionCheck(parent, None, why)


def _feature_shapes(first: nn.Module) -> list[tuple[int, ...]]:
    """Shapes of random features to try, in order, for a projector whose first weighted module is ``first``: an
    nn.Linear's (or Conv1D's) input width over (batch, positions), over positions alone (a projector that merges
    rows itself), and, where that width is a square number of times smaller, the width before a pixel shuffle
    that packs k x k positions into one; a convolution's channels over a 16 x 16 grid."""
    if isinstance(first, nn.modules.conv._ConvNd):
        return [(2, first.in_channels, *(16,) * len(first.kernel_size))]
    width = getattr(first, "in_features", None) or first.weight.shape[0]  # nn.Linear, or Conv1D's (in, out)
    widths = [width, *(width // k ** 2 for k in (2, 3, 4) if width % k ** 2 == 0)]
    return [shape for each in widths for shape in ((*_FEATURE_ROWS, each), (2, 16, each), (16, each))]


def _run(module: nn.Module, features: torch.Tensor) -> Any:
    """``module(features)``, with None for any other argument its forward requires (an optional mask), or, where
    it needs one, a mask of ones over the features' positions (every position attended)."""
    parameters = list(inspect.signature(module.forward).parameters.values())[1:]
    required = [p for p in parameters if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                                              p.POSITIONAL_OR_KEYWORD)]
    try:
        return module(features, *(None for _ in required))
    except Exception:
        if not required:
            raise
        mask = torch.ones(features.shape[:-1], dtype=torch.long, device=features.device)
        return module(features, *(mask for _ in required))


def _first_tensor(output: Any) -> torch.Tensor | None:
    """The features a projector returns: the tensor itself, or the first of a tuple or model output."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.to_tuple() if hasattr(output, "to_tuple") else output if isinstance(output, tuple) else ()
    return next((value for value in values if isinstance(value, torch.Tensor)), None)
