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
after it. The moves to Post-Norm use it (``stream_scaled_moves.py``): sandwich -> post always, and a plain Pre ->
Post when asked (``--keep-stream-size``): by default that keeps the plain shift, which moves norm tensors only
(docs/design.md §3).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..topology import NormSite, Topology
from .drop_norms import PreFold, pre_norm_folds
from .norm_neighbours import pre_norm_readers
from .passes import Pass, PassMove, Scales
from .program import Step, combine
from .round_trip_carry import removed_norms_carried
from .stand_in import _along, fold_into_reader


def stream_scaled_pre_norms(model: nn.Module, topology: Topology, keep: frozenset[str] = frozenset()) -> Pass:
    """The pass: each weighted layer pre norm at weight ``s``, its ``g / s`` folded into its readers (exact); the
    norms in ``keep`` (ones the norm shift drops: OPT's first) stay as they are."""
    norms = [norm for layer in topology.layers for sub in layer.sublayers for norm in sub.norms_in("pre")
             if norm.path not in keep]
    weighted = [norm for norm in norms if _has_weight(model, norm)]
    # a norm whose output something other than linear maps reads (AXK1's MoE router picks experts by it) keeps its
    # weight: the rescale is exact only where g / s folds into every reader (the conversion is approximate anyway;
    # the rescale only keeps the moved norm's stream at the original's size)
    readers = pre_norm_readers(model, [norm.path for norm in weighted])
    unfoldable = {path: found.reason for path, found in readers.items() if found.reason}
    folds, moves = pre_norm_folds(model, [norm for norm in weighted if norm.path not in unfoldable],
                                  shift_to_readers=False, readers=readers)
    moves = tuple(PassMove("rescale", move.norm, move.into, move.site, "weight s; g/s folded into its readers")
                  if move.action == "fold" else move for move in moves)
    moves += tuple(PassMove("keep", norm.path, note="no weight to hold s: the stream after it stays at unit scale")
                   for norm in norms if norm not in weighted)
    moves += tuple(PassMove("keep", path, note=f"{reason}, so its readers cannot take g/s: the stream after it "
                            "stays at the scale of its weight") for path, reason in unfoldable.items())

    def rewrite(steps: dict[str, Step], scales: Scales) -> None:
        originals = {key: steps[key] for fold in folds for key in fold.stand_in.keys}  # before any is rescaled
        for fold in folds:
            scale = scales[fold.stand_in.site].scale
            if _shift_to_readers(fold):
                for reader in fold.readers:
                    fold_into_reader(fold.stand_in, scale, reader.weight, reader.in_dim, reader.bias, steps,
                                     centre=False, factor=reader.factor)  # a LayerNorm still centres what they read
                _set_to_scale(fold, scale, originals, steps)
            else:
                _rescale_keeping_shift(fold, scale, originals, steps)

    return Pass(f"{topology.placement}: pre norms at the stream's calibrated scale (exact)", exact=True,
                placement=topology.placement, rewrite=rewrite,
                calibration=tuple(dict.fromkeys(fold.stand_in.site for fold in folds)), moves=moves,
                carry=functools.partial(removed_norms_carried, tuple(fold.stand_in for fold in folds)))


def _has_weight(model: nn.Module, norm: NormSite) -> bool:
    return norm.kind != "identity" and getattr(model.get_submodule(norm.path), "weight", None) is not None


def _shift_to_readers(fold: PreFold) -> bool:
    """A norm's bias ``beta`` folds into its readers' biases where every reader has one; otherwise it stays."""
    return fold.stand_in.bias is None or all(reader.bias is not None for reader in fold.readers)


def _set_to_scale(fold: PreFold, scale: float, originals: dict[str, Step], steps: dict[str, Step]) -> None:
    """The norm's weight becomes ``s`` (stored ``s - 1`` for an offset norm) and its bias 0."""
    stand_in = fold.stand_in
    stored = scale - 1.0 if stand_in.offset else scale
    assert stand_in.weight is not None  # only weighted norms are folded
    steps[stand_in.weight] = combine(functools.partial(_filled, stored), originals[stand_in.weight])
    if stand_in.bias is not None:
        steps[stand_in.bias] = combine(functools.partial(_filled, 0.0), originals[stand_in.bias])


def _filled(value: float, tensor: torch.Tensor) -> torch.Tensor:
    return torch.full_like(tensor, value)


def _rescale_keeping_shift(fold: PreFold, scale: float, originals: dict[str, Step], steps: dict[str, Step]) -> None:
    """A norm with a bias whose readers have none (a LayerNorm made by an earlier pass, before Llama's bias-free
    projections): the readers take ``g / s`` and the norm keeps ``beta * s / g``, so they still read ``g n + beta``.
    A channel with ``g = 0`` keeps weight 0 and its ``beta``, and its readers' column stays as it was."""
    stand_in = fold.stand_in
    norm_steps = [originals[key] for key in stand_in.keys]

    def gain(norm_tensors: tuple[torch.Tensor, ...], width: int) -> torch.Tensor:
        return stand_in.gain(dict(zip(stand_in.keys, norm_tensors, strict=True)), width)

    for reader in fold.readers:
        def weight(matrix: torch.Tensor, *norm_tensors: torch.Tensor, in_dim: int = reader.in_dim) -> torch.Tensor:
            g = gain(norm_tensors, matrix.shape[in_dim])
            factor = torch.where(g != 0, g / scale, torch.ones_like(g))
            return (matrix.double() * _along(factor, matrix, in_dim)).to(matrix.dtype)

        steps[reader.weight] = combine(weight, steps[reader.weight], *norm_steps)

    def norm_weight(tensor: torch.Tensor, *norm_tensors: torch.Tensor) -> torch.Tensor:
        g = gain(norm_tensors, tensor.shape[-1])
        new = torch.where(g != 0, torch.full_like(g, scale), torch.zeros_like(g))
        return (new - 1.0 if stand_in.offset else new).to(tensor.dtype)

    def norm_bias(tensor: torch.Tensor, *norm_tensors: torch.Tensor) -> torch.Tensor:
        g, beta = gain(norm_tensors, tensor.shape[-1]), tensor.double()
        return torch.where(g != 0, beta * scale / torch.where(g != 0, g, torch.ones_like(g)), beta).to(tensor.dtype)

    assert stand_in.weight is not None and stand_in.bias is not None  # only a weighted norm with a bias comes here
    steps[stand_in.weight] = combine(norm_weight, originals[stand_in.weight], *norm_steps)
    steps[stand_in.bias] = combine(norm_bias, originals[stand_in.bias], *norm_steps)
