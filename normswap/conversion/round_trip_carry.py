"""What a branch-norm pass keeps aside so that converting back to the original family is exact (docs/design.md §9).

A dropped norm is carried as its own vectors (weight, bias: the source tensors, bit for bit) and the scale ``s`` its
stand-in was folded with; an added norm as the scale it was started at. Scales are 0-d float64 tensors under
``normswap.scale.<norm path>``, a name no norm tensor has. A dropped LayerNorm's stand-in also removed the mean
``C`` takes from each tensor it folded into (a writer's mean over the stream's channels, a reader's mean over its
inputs of ``W diag(g)``): that is a vector per tensor (a 0-d value for a bias), carried in float64 under
``normswap.mean.<tensor key>``. Never a matrix: the conversion back (``return_home.py``) finds the folded tensors
again from the family's structure and unfolds them with these.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch

from .calibration import CalibrationSite
from .passes import Scales
from .program import Step, combine, constant
from .stand_in import StandIn, _along

SCALE_PREFIX = "normswap.scale."
MEAN_PREFIX = "normswap.mean."


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


def mean_key(tensor_key: str) -> str:
    """The carried key of the mean a LayerNorm stand-in's centring removed from the tensor ``tensor_key``."""
    return f"{MEAN_PREFIX}{tensor_key}"


def writer_means_carried(stand_in: StandIn, tensors: Mapping[str, int], initial: Mapping[str, Step]
                         ) -> dict[str, Step]:
    """The mean over the stream's channels (``dim``) of each tensor writing a dropped LayerNorm's input, before the
    fold: ``T = T' s / g + m`` (after taking ``beta`` off its carrier) gives the source tensor back."""
    if not stand_in.centred:
        return {}
    return {mean_key(key): combine(lambda tensor, dim=dim: tensor.double().mean(dim), initial[key])
            for key, dim in tensors.items()}


def reader_means_carried(stand_in: StandIn, readers: Sequence[tuple[str, int]], initial: Mapping[str, Step]
                         ) -> dict[str, Step]:
    """For each ``(weight key, input dim)`` reading a dropped LayerNorm's output, the mean over its inputs of
    ``W diag(g)`` before the fold: ``W = (s W' + m) / g`` gives the source weight back."""
    if not stand_in.centred:
        return {}
    norm_steps = [initial[key] for key in stand_in.keys]

    def mean(matrix: torch.Tensor, *norm_tensors: torch.Tensor, in_dim: int) -> torch.Tensor:
        gain = stand_in.gain(dict(zip(stand_in.keys, norm_tensors, strict=True)), matrix.shape[in_dim])
        return (matrix.double() * _along(gain, matrix, in_dim)).mean(in_dim)

    return {mean_key(weight): combine(functools.partial(mean, in_dim=in_dim), initial[weight], *norm_steps)
            for weight, in_dim in readers}
