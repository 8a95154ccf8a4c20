"""Before the norm shift to Post-Norm, each layer pre norm takes the stream's calibrated scale as its weight
(docs/design.md §3).

The norm shift moves pre norm i+1 behind the residual add of sublayer i, where it normalises the stream itself.
Moved as they are, the norms leave the stream the size of their weight ``g`` (about 1) on every token, while each
branch still writes what it wrote into a stream of the original's size ``s``, which grows with depth: every
branch's share of the stream changes by ``s / |g|``. Sandwich -> post went through that (next-token KL 2.94
against 1.36 for the unit start on a tiny pretrained Gemma 2).

This pass runs first, on the model before the shift, where it is exact: each layer pre norm's weight becomes ``s``
(the calibrated scale of its input, bias 0), and ``g / s`` (and ``beta``) folds into the linear maps that read it,
so every branch reads what it read (a LayerNorm keeps centring, so no ``C`` is folded and the way back is exact).
Shifted, the norm then keeps the stream at the original's typical size, and each branch's share of it is what it
was on a typical token (Gemma 2 -> post: KL 0.33). The final norm stays as it is: only the head reads the stream
after it. The route uses it for sandwich -> post (``route.py``); a plain Pre -> Post keeps the plain shift
(docs/design.md §3 says why).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..topology import NormSite, Topology
from .drop_norms import PreFold, pre_norm_folds
from .passes import Pass, PassMove, Scales
from .program import Step, combine
from .round_trip_carry import removed_norms_carried
from .stand_in import fold_into_reader


def stream_scaled_pre_norms(model: nn.Module, topology: Topology) -> Pass:
    """The pass: each weighted layer pre norm at weight ``s``, its ``g / s`` folded into its readers (exact)."""
    norms = [norm for layer in topology.layers for sub in layer.sublayers for norm in sub.norms_in("pre")]
    weighted = [norm for norm in norms if _has_weight(model, norm)]
    folds, moves = pre_norm_folds(model, weighted)
    moves = tuple(PassMove("rescale", move.norm, move.into, move.site, "weight s; g/s folded into its readers")
                  if move.action == "fold" else move for move in moves)
    moves += tuple(PassMove("keep", norm.path, note="no weight to hold s: the stream after it stays at unit scale")
                   for norm in norms if norm not in weighted)

    def rewrite(steps: dict[str, Step], scales: Scales) -> None:
        for fold in folds:
            scale = scales[fold.stand_in.site].scale
            for reader in fold.readers:  # first: the folds read the norm's own vectors
                fold_into_reader(fold.stand_in, scale, reader.weight, reader.in_dim, reader.bias, steps,
                                 centre=False)  # a LayerNorm still centres what they read
            _set_to_scale(fold, scale, steps)

    return Pass(f"{topology.placement}: pre norms at the stream's calibrated scale (exact)", exact=True,
                placement=topology.placement, rewrite=rewrite,
                calibration=tuple(dict.fromkeys(fold.stand_in.site for fold in folds)), moves=moves,
                carry=functools.partial(removed_norms_carried, tuple(fold.stand_in for fold in folds)))


def _has_weight(model: nn.Module, norm: NormSite) -> bool:
    return norm.kind != "identity" and getattr(model.get_submodule(norm.path), "weight", None) is not None


def _set_to_scale(fold: PreFold, scale: float, steps: dict[str, Step]) -> None:
    """The norm's weight becomes ``s`` (stored ``s - 1`` for an offset norm) and its bias 0."""
    stand_in = fold.stand_in
    stored = scale - 1.0 if stand_in.offset else scale
    assert stand_in.weight is not None  # only weighted norms are folded
    steps[stand_in.weight] = combine(functools.partial(_filled, stored), steps[stand_in.weight])
    if stand_in.bias is not None:
        steps[stand_in.bias] = combine(functools.partial(_filled, 0.0), steps[stand_in.bias])


def _filled(value: float, tensor: torch.Tensor) -> torch.Tensor:
    return torch.full_like(tensor, value)
