"""Passes that remove a slot's norms by folding their calibrated stand-ins into their neighbours (§6).

* ``drop_out_norms``: every ``out`` norm (``h + N(F(h))``: Gemma 2/3's and GLM-4's post-branch norms, OLMo 2's)
  folds into every tensor that writes its input. Sandwich becomes pre, post-sublayer becomes none.
* ``drop_pre_norms``: every ``pre`` norm of the layers (the final norm stays) folds into the linear maps that
  read its output. Sandwich becomes post-sublayer, pre becomes none (then an added ``out`` norm makes it
  post-sublayer).

Both are ``exact: false``: a token whose own scale differs from the calibrated ``s`` sees a different map.
The folds themselves are exact: the converted model equals the source with those norms replaced by their
stand-ins (``stand_in.stand_in_reference``) to float rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from ..codegen.removed_norms import removed_norm_edits
from ..errors import NormswapError
from ..topology import NormSite, NormSlot, Topology, combine_placements, placement_of_slots
from .norm_kind import _output_dims, linear_layout
from .norm_neighbours import NormInput, NormReaders, ReaderTensor, norm_inputs, pre_norm_readers
from .passes import Pass, PassMove, Scales
from .program import Step
from .reader_bias import ReaderBiasError, given_biases, new_bias_key, zero_bias
from .removed_norm_tensors import removed_norm_step
from .round_trip_carry import reader_means_carried, removed_norms_carried, writer_means_carried
from .stand_in import StandIn, fold_into_reader, fold_into_writer, stand_in_of


class StandInError(NormswapError):
    """A norm's stand-in has nowhere exact to go: the structure around the norm is not linear maps alone."""


@dataclass(frozen=True)
class OutFold:
    """An ``out`` norm's stand-in and the tensors that write its input (key -> the dimension over its channels);
    ``carrier``: the one bias that takes a norm's ``beta``."""

    stand_in: StandIn
    tensors: Mapping[str, int]
    carrier: str | None
    new_bias: str | None = None  # the carrier, where it is a writer's bias the generated code adds (reader_bias.py)


@dataclass(frozen=True)
class PreFold:
    """A ``pre`` norm's stand-in and the linear maps that read its output; ``new_biases``: the biases of those
    readers that had none, given one for the norm's ``beta`` (``reader_bias.py``)."""

    stand_in: StandIn
    readers: tuple[ReaderTensor, ...]
    new_biases: tuple[str, ...] = ()


def drop_out_norms(model: nn.Module, topology: Topology) -> Pass:
    """Fold every ``out`` norm's stand-in ``g * [C] x / s (+ beta)`` into the tensors that write its input."""
    norms = _slot_norms(topology, "out")
    folds, moves = out_norm_folds(model, norms)

    def fold_one(fold: OutFold, scale: float, steps: dict[str, Step]) -> None:
        for key, dim in fold.tensors.items():
            fold_into_writer(fold.stand_in, scale, key, dim, steps, carries_shift=key == fold.carrier)

    return _drop_pass(model, topology, "out", norms, folds, moves, fold_one)


def out_norm_folds(model: nn.Module, norms: Sequence[NormSite], give_biases: bool = True, centred: bool = True
                   ) -> tuple[tuple[OutFold, ...], tuple[PassMove, ...]]:
    """Where each ``out`` norm's stand-in folds (identity placeholders have nothing to fold), and the plan's lines;
    ``give_biases=False``: a LayerNorm whose writers have no bias for its ``beta`` folds with no carrier (its
    ``beta`` must be 0: the caller checks) instead of giving one a bias. ``centred=False``: the fold leaves a
    LayerNorm's centring out (a norm dropped on the way home), so a per-channel scale on the way (a layer scale)
    commutes with it."""
    found = norm_inputs(model, [norm.path for norm in norms if norm.kind != "identity"])
    keys = dict.fromkeys(model.state_dict())
    owners: dict[str, str] = {}
    folds: list[OutFold] = []
    moves = []
    for norm in norms:
        if norm.kind == "identity":
            moves.append(PassMove("drop", norm.path, note="an identity placeholder: nothing to fold"))
            continue
        stand_in, read = stand_in_of(model, norm), found[norm.path]
        if read.reason:
            raise StandInError(f"{read.reason}: cannot drop {norm.path} by its stand-in")
        tensors = _term_tensors(model, stand_in, read, keys, centred)
        for key in tensors:
            other = owners.setdefault(key, norm.path)
            if other != norm.path:
                raise StandInError(f"{key} writes the inputs of both {other} and {norm.path}, so it cannot take "
                                   "both stand-ins")
        carrier = _shift_carrier(model, stand_in, read, tensors)
        new_bias = None
        if carrier is None and stand_in.bias is not None and give_biases:
            carrier = new_bias = _new_carrier(model, stand_in, read, tensors)
            tensors = {**tensors, new_bias: 0}
        folds.append(OutFold(stand_in, tensors, carrier, new_bias))
        moves.append(PassMove("fold", norm.path, tuple(tensors), stand_in.site,
                              f"1/s of its input's {stand_in.site.statistic}"))
    return tuple(folds), tuple(moves)


def drop_pre_norms(model: nn.Module, topology: Topology) -> Pass:
    """Fold every layer ``pre`` norm's stand-in into the weights that read its output:
    ``W <- W diag(g) [C] / s``, ``b <- b + W beta``."""
    norms = _slot_norms(topology, "pre")
    folds, moves = pre_norm_folds(model, norms)

    def fold_one(fold: PreFold, scale: float, steps: dict[str, Step]) -> None:
        for reader in fold.readers:
            fold_into_reader(fold.stand_in, scale, reader.weight, reader.in_dim, reader.bias, steps,
                             factor=reader.factor)

    return _drop_pass(model, topology, "pre", norms, folds, moves, fold_one)


def _drop_pass(model: nn.Module, topology: Topology, slot: str, norms: Sequence[NormSite],
               folds: Sequence[OutFold | PreFold], moves: tuple[PassMove, ...],
               fold_one: Callable[[Any, float, dict[str, Step]], None]) -> Pass:
    """The pass that removes ``slot``'s norms: each fold at its site's calibrated scale, the norms' tensors gone,
    their calls unwrapped in the code, their vectors and scales carried for the way back."""
    given, biases = given_biases(model, [bias for fold in folds for bias in (
        fold.new_biases if isinstance(fold, PreFold) else (fold.new_bias,) if fold.new_bias else ())])

    def rewrite(steps: dict[str, Step], scales: Scales) -> None:
        for bias in biases:  # every bias the generated code gives starts at 0; the folds fill those they reach
            steps[bias] = zero_bias(steps, bias)
        for fold in folds:
            fold_one(fold, scales[fold.stand_in.site].scale, steps)
        _remove_norm_tensors(model, norms, steps)

    return Pass(_name(topology, slot), exact=False, placement=_placement_without(topology, slot),
                edits=(*removed_norm_edits(model, topology, slot), *given), rewrite=rewrite,
                calibration=tuple(dict.fromkeys(fold.stand_in.site for fold in folds)), moves=moves,
                carry=functools.partial(_carried, tuple(folds)))


def _carried(folds: Sequence[OutFold | PreFold], initial: Mapping[str, Step], scales: Scales) -> dict[str, Step]:
    """What the way back needs: each dropped norm's vectors and scale, and the means a LayerNorm's centring took from
    the tensors it folded into (computed from the source's tensors: no other pass of a conversion changes them)."""
    carried = removed_norms_carried(tuple(fold.stand_in for fold in folds), initial, scales)
    for fold in folds:
        if isinstance(fold, OutFold):  # a new bias has no source tensor: its mean is 0, and it is not kept home
            carried.update(writer_means_carried(fold.stand_in, {key: dim for key, dim in fold.tensors.items()
                                                                if key != fold.new_bias}, initial))
        else:
            carried.update(reader_means_carried(fold.stand_in, [(reader.weight, reader.in_dim)
                                                                for reader in fold.readers], initial))
    return carried


def pre_norm_folds(model: nn.Module, norms: Sequence[NormSite], shift_to_readers: bool = True,
                   readers: Mapping[str, NormReaders] | None = None
                   ) -> tuple[tuple[PreFold, ...], tuple[PassMove, ...]]:
    """The linear maps that read each ``pre`` norm's output (identity placeholders have none), and the plan's lines;
    ``shift_to_readers=False``: a norm that stays may keep its bias, so readers without one are not given one
    (with it, they are: ``new_biases``).
    ``readers``: ``pre_norm_readers``'s answer for these norms where the caller has it already (it runs the model)."""
    found = readers if readers is not None else pre_norm_readers(
        model, [norm.path for norm in norms if norm.kind != "identity"])
    owners: dict[str, str] = {}
    folds: list[PreFold] = []
    moves = []
    for norm in norms:
        if norm.kind == "identity":
            moves.append(PassMove("drop", norm.path, note="an identity placeholder: nothing to fold"))
            continue
        read = found[norm.path]
        if read.reason:
            raise StandInError(f"{read.reason}: cannot drop it")
        stand_in = stand_in_of(model, norm)
        for reader in read.readers:
            other = owners.setdefault(reader.weight, norm.path)
            if other != norm.path:
                raise StandInError(f"{reader.weight} reads both {other} and {norm.path} (one weight called twice), "
                                   "so it cannot take both stand-ins")
        biased, new_biases = _with_biases(model, norm, read.readers) if shift_to_readers and stand_in.bias else (
            read.readers, ())
        folds.append(PreFold(stand_in, biased, new_biases))
        into = tuple(key for reader in biased
                     for key in (reader.weight, reader.bias if stand_in.bias is not None else None) if key)
        moves.append(PassMove("fold", norm.path, into, stand_in.site, f"1/s of its input's {stand_in.site.statistic}"))
    return tuple(folds), tuple(moves)


def _with_biases(model: nn.Module, norm: NormSite, readers: Sequence[ReaderTensor]
                 ) -> tuple[tuple[ReaderTensor, ...], tuple[str, ...]]:
    """``readers``, each with a bias for the norm's ``beta``: a linear map built without one is given one (its key
    among the new ones); one that cannot take one is refused with the reason."""
    biased, new = [], []
    for reader in readers:
        if reader.bias is None:
            try:
                key = new_bias_key(model, reader.weight, norm.path)
            except ReaderBiasError as error:
                raise StandInError(f"{error}: the stand-in's shift has nowhere to go, so the norm cannot be "
                                   "dropped") from error
            reader = replace(reader, bias=key)
            new.append(key)
        biased.append(reader)
    return tuple(biased), tuple(new)


def _slot_norms(topology: Topology, slot: NormSlot) -> list[NormSite]:
    norms = [norm for layer in topology.layers for sub in layer.sublayers for norm in sub.norms_in(slot)]
    if not norms:
        raise StandInError(f"{topology.model_type} ({topology.placement}) has no {slot} norms to drop")
    return norms


def _name(topology: Topology, slot: str) -> str:
    after = _placement_without(topology, slot)
    return f"{topology.placement} -> {after}: {slot} norms folded as their calibrated stand-ins"


def _placement_without(topology: Topology, slot: str) -> str:
    """The placement once every layer's ``slot`` norms are gone."""
    placements = []
    for layer in topology.layers:
        for sub in layer.sublayers:
            left = {norm.slot for norm in sub.norms if norm.slot != slot}
            placements.append(placement_of_slots(left, sub.kind == "parallel" and bool(left)))
    return combine_placements(placements)


def _term_tensors(model: nn.Module, stand_in: StandIn, read: NormInput, keys: dict[str, None], centred: bool = True
                  ) -> dict[str, int]:
    """Every tensor of the terms of the norm's input (among ``keys``, the state dict's), with the dimension that
    runs over the norm's channels."""
    tensors: dict[str, int] = {}
    for term in read.terms:
        if stand_in.centred and centred and term.scales:
            raise StandInError(f"{term.scales[0]} scales {term.source}'s part of the input of {stand_in.norm} per "
                               "channel before the LayerNorm's centring, which does not commute with it")
        if term.writer:
            tensors.update(_output_dims(model.get_submodule(term.source), term.source, keys))
        else:
            tensors[term.source] = -1
    return tensors


def _shift_carrier(model: nn.Module, stand_in: StandIn, read: NormInput, tensors: dict[str, int]) -> str | None:
    """The one bias that takes a LayerNorm's ``beta``: one added once per token, unscaled on the way."""
    if stand_in.bias is None:
        return None
    for term in read.terms:
        if term.token_scaled or term.scales:
            continue
        if not term.writer:
            return term.source
        module = model.get_submodule(term.source)
        key = f"{term.source}.bias"
        if linear_layout(module) and key in tensors:
            return key
    return None


def _new_carrier(model: nn.Module, stand_in: StandIn, read: NormInput, tensors: Mapping[str, int]) -> str:
    """The bias the generated code gives the first linear writer of the norm's input (added once per token,
    unscaled) to carry its ``beta``, where no writer has one."""
    reasons = []
    for term in read.terms:
        if term.token_scaled or term.scales or not term.writer or tensors.get(f"{term.source}.weight") != 0:
            continue
        try:
            return new_bias_key(model, f"{term.source}.weight", stand_in.norm, reads=False)
        except ReaderBiasError as error:
            reasons.append(str(error))
    raise StandInError(f"{stand_in.norm} has a bias, and no bias among what writes its input is added once per "
                       "token unscaled" + (f" ({reasons[0]})" if reasons else "") + ", so the stand-in's shift has "
                       "nowhere to go")


def _remove_norm_tensors(model: nn.Module, norms: list[NormSite], steps: dict[str, Step]) -> None:
    """A removed norm's tensors become the placeholder's 0-d tensors (where the placeholder keeps any)."""
    for norm in norms:
        for name, _ in model.get_submodule(norm.path).named_parameters(recurse=False):
            steps[f"{norm.path}.{name}"] = removed_norm_step()
