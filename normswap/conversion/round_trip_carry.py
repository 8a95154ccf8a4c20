"""What a branch-norm pass keeps aside so that converting back to the original family is exact (docs/design.md §9).

A dropped norm is carried as its own vectors (weight, bias: the source tensors, bit for bit) and the scale ``s`` its
stand-in was folded with; an added norm as the scale it was started at. Scales are 0-d float64 tensors under
``normswap.scale.<norm path>``, a name no norm tensor has; nothing else is carried, never a matrix: the conversion
back (``return_home.py``) finds the folded tensors again from the family's structure and unfolds them with these.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch

from .calibration import CalibrationSite
from .passes import Scales
from .program import Step, constant
from .stand_in import StandIn

SCALE_PREFIX = "normswap.scale."


def scale_key(norm: str) -> str:
    """The carried key of the scale of the norm at module path ``norm``."""
    return f"{SCALE_PREFIX}{norm}"


def carried_scales(carried: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """norm path -> the scale carried for it, exactly as it was folded (the float64 value)."""
    return {key.removeprefix(SCALE_PREFIX): float(value.double()) for key, value in carried.items()
            if key.startswith(SCALE_PREFIX) and value.dim() == 0}


def _scale_step(scale: float) -> Step:
    return constant(functools.partial(torch.tensor, scale, dtype=torch.float64))


def removed_norms_carried(stand_ins: Sequence[StandIn], initial: Mapping[str, Step], scales: Scales
                          ) -> dict[str, Step]:
    """Each dropped norm's vectors (copies of the source's) and the scale its stand-in was folded with."""
    carried: dict[str, Step] = {}
    for stand_in in stand_ins:
        carried.update({key: initial[key] for key in stand_in.keys})
        carried[scale_key(stand_in.norm)] = _scale_step(scales[stand_in.site].scale)
    return carried


def added_norms_carried(norms: Sequence[tuple[str, CalibrationSite]], _initial: Mapping[str, Step], scales: Scales
                        ) -> dict[str, Step]:
    """Each new norm's starting scale: dropping it again with this ``s`` instead of a new calibration folds
    ``g / s = 1`` while ``g`` is still its start."""
    return {scale_key(norm): _scale_step(scales[site].scale) for norm, site in norms}
