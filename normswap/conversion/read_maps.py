"""What a converted branch reads, put back in the original's terms, where a pre norm's ``g / s`` went into its readers.

Dropping a pre norm (``drop_norms.drop_pre_norms``) or rescaling one before the norm shift (``stream_scale.py``)
folds its stand-in ``g [C] / s`` (and ``beta``) into the linear maps that read it. The branch then reads a tensor
that differs from the original's by that map, and computes the same thing from it. Comparing the raw tensors
(the drift report's "what each branch reads", healing's per-branch targets) would count the fold as drift, and
healing would pull the model away from the fold. Both apply the stand-in, from the vectors and the scale the
conversion carried (``round_trip_carry.py``), to the converted model's read before comparing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..topology import Topology
from .round_trip_carry import carried_scales
from .stand_in import StandIn, stand_in_of

Tensor = torch.Tensor


@dataclass(frozen=True)
class ReadMap:
    """The stand-in of one folded pre norm, applied to what the converted branch reads."""

    stand_in: StandIn
    tensors: Mapping[str, Tensor]  # the norm's carried vectors
    scale: float

    def __call__(self, read: Tensor) -> Tensor:
        tensors = {key: value.to(read.device) for key, value in self.tensors.items()}
        return self.stand_in.apply(read, tensors, self.scale)


def branch_read_maps(original: nn.Module, source: Topology, converted: nn.Module) -> dict[str, ReadMap]:
    """Branch entry path in ``original`` -> the map onto what that branch read there, for every pre norm whose
    stand-in ``converted`` carries (its vectors and its scale); none for a model that carries no scale."""
    carried = getattr(converted, "normswap_carried", None) or {}
    scales = carried_scales(carried)
    maps: dict[str, ReadMap] = {}
    if not scales:
        return maps
    for layer in source.layers:
        for sub in layer.sublayers:
            pre = sub.norms_in("pre")
            if not pre or pre[0].path not in scales:
                continue
            stand_in = stand_in_of(original, pre[0])
            if not all(key in carried for key in stand_in.keys):
                continue
            read_map = ReadMap(stand_in, {key: carried[key] for key in stand_in.keys}, scales[pre[0].path])
            for branch in sub.branches:
                if branch.entry:
                    maps[branch.entry] = read_map
            maps[pre[0].path] = read_map  # where a pairing names the norm itself (Pre <-> Post)
    return maps
