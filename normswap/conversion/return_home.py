"""A normswap-generated model converted back to the placement of its stock family goes home (docs/design.md §9).

The branch-norm passes carry what undoing them needs (``round_trip_carry.py``): each dropped norm's vectors and
the scale ``s`` its stand-in was folded with, each added norm's starting scale. Converting such a model to the
placement its original family has is then not a new calibrated conversion but the way back, to the stock class:

* a dropped norm comes back under its own name with its carried vectors, bit for bit, and the tensors its stand-in
  was folded into (found again from the family's structure, as the drop found them) are unfolded in float64 with
  the carried ``g`` and ``s``: ``W = diag(s/g) (W' - beta) + m`` for an ``out`` norm's writers (``beta`` on its one
  carrier bias), ``W = (s W' + m) diag(1/g)`` and ``b = b' - W beta`` for a ``pre`` norm's readers, where ``m`` is
  the carried mean a LayerNorm's centring ``C`` removed (0 for an RMSNorm);
* a norm the first conversion added is dropped again as its stand-in at its carried scale, without a LayerNorm's
  centring (the original had none there), so while its weight is still its start ``g = s`` the fold is the identity
  up to rounding.

A model converted by a normswap that carried no means takes the ordinary conversion instead, and the reason is
logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..codegen.package import GeneratedModule, family_model_type
from ..detect import inspect
from ..errors import NormswapError
from ..recipe import NativeTarget, recipe_for
from ..topology import NormSite, Topology
from .chain import chain
from .compose import ComposedPlan
from .drop_norms import OutFold, PreFold, StandInError, out_norm_folds, pre_norm_folds
from .native import meta_instance, target_class, target_config
from .passes import Pass, PassMove
from .plan import PlanError, build_placement_plan
from .program import Step, TensorProgram, combine, copy_of, shapes_of
from .round_trip_carry import carried_scales, mean_key
from .setup import ConversionSetup
from .stand_in import StandIn, _along, fold_into_reader, fold_into_writer, stand_in_of
from .verify import DriftReport, measure_drift, require_topology

logger = logging.getLogger("normswap")
Tensor = torch.Tensor


class NoWayHomeError(NormswapError):
    """The model cannot return to its stock family exactly: the message says why (it takes the ordinary route)."""


@dataclass(frozen=True)
class _Home:
    """The stock family a generated model came from, at the placement asked for (or, on the way to a Post-Norm
    family, the Pre-Norm twin of it the way out went through: ``generated`` is then its code)."""

    model_type: str
    cls: type[nn.Module]
    config: object
    topology: Topology
    meta: nn.Module
    generated: GeneratedModule | None = None

    @property
    def realisation(self) -> str:
        return f"generated code: {self.generated.file_name}" if self.generated else f"native: {self.model_type}"


def home_setup(model: nn.Module, placement: str) -> ConversionSetup | None:
    """The conversion of ``model`` back to its stock family, or None where it did not come from one by the
    branch-norm passes, or where the way back is not exact (logged with the reason). A Post-Norm model goes
    through Pre-Norm: the norm shift back (which restores its own carried norms), then the way home."""
    carried = getattr(model, "normswap_carried", None) or {}
    scales = carried_scales(carried)
    if not scales:
        return None
    try:
        if placement == "pre" and inspect(model).placement == "post":
            return _back_to_pre(model, carried, scales)
    except (NoWayHomeError, PlanError, StandInError) as reason:
        logger.warning("not restoring the rescaled pre norms: %s; converting as a new model", reason)
        return None
    home = _home_family(model, placement)
    if home is None:
        return None
    try:
        if inspect(model).placement == "post":
            return _through_pre(model, placement, home, carried, scales)
        if placement == "post":
            return _to_post_through_pre(model, home, carried, scales)
        return _home_setup(model, placement, home, carried, scales)
    except (NoWayHomeError, PlanError, StandInError) as reason:
        logger.warning("not returning to the stock %s classes: %s; converting as a new model", home.model_type, reason)
        return None


def _through_pre(model: nn.Module, placement: str, home: _Home, carried: Mapping[str, Tensor],
                 scales: Mapping[str, float]) -> ConversionSetup:
    """The norm shift from ``model`` (Post-Norm) to the Pre-Norm model the branch-norm passes made of the home
    family on the way out (its code generated again, weightless), then the way home from there, as one chain."""
    from .api import _placement_setup
    from .branch_norm_passes import branch_norm_setup, branch_norm_steps

    twin = branch_norm_setup(home.meta, branch_norm_steps(placement, "pre"), f"placement {placement} -> pre", "pre")
    twin_topology = inspect(meta_instance(twin.target_class, twin.target_config))
    if twin_topology.placement != "pre":
        raise NoWayHomeError(f"the branch-norm passes make {twin_topology.placement}, not pre, of {home.model_type}")
    shift_plan = build_placement_plan(inspect(model), twin_topology, f"generated code: {twin.generated.file_name}"
                                      if twin.generated is not None else "native")
    shift = _placement_setup(model, shift_plan, inspect(model), twin_topology, twin.target_class, twin.target_config,
                             twin.generated)
    return chain(model, [lambda _: shift, lambda meta: _home_setup(meta, placement, home, carried, scales)])


def _to_post_through_pre(model: nn.Module, home: _Home, carried: Mapping[str, Tensor],
                         scales: Mapping[str, float]) -> ConversionSetup:
    """A branch-norm model made from a Post-Norm family (post -> pre -> sandwich), going back to post: its carried
    norms undone into the Pre-Norm twin the way out went through (the family's own code after the norm shift, no
    stock class in between, as ``route.py`` goes out), then the norm shift home, which moves norm tensors only."""
    from .api import plan_conversion

    twin_setup = plan_conversion(home.meta, "pre", native=False)
    if twin_setup.target_class is None or twin_setup.target_config is None:
        raise NoWayHomeError(f"the norm shift makes no Pre-Norm twin of {home.model_type}")
    twin_meta = meta_instance(twin_setup.target_class, twin_setup.target_config)
    # its provenance, so that the norm shift after it lands in the stock family again
    twin_meta.config.normswap = {"source_model_type": home.model_type}
    twin = _Home(home.model_type, type(twin_meta), twin_meta.config, inspect(twin_meta), twin_meta,
                 twin_setup.generated)
    return chain(model, [lambda _: _home_setup(model, "pre", twin, carried, scales),
                         lambda meta: plan_conversion(meta, "post")])


def _back_to_pre(model: nn.Module, carried: Mapping[str, Tensor], scales: Mapping[str, float]) -> ConversionSetup:
    """A Post-Norm model whose pre norms were set to the stream's scale before the norm shift (stream_scale.py): the
    norm shift back (to the stock family where there is one), then each rescaled norm's vectors restored and its
    readers unfolded, in the classes the shift lands in."""
    from .api import plan_conversion

    def restore(meta: nn.Module) -> ConversionSetup:
        here = _Home(meta.config.model_type, type(meta), meta.config, inspect(meta), meta)
        return _home_setup(meta, "pre", here, carried, scales)

    return chain(model, [lambda _: plan_conversion(model, "pre"), restore])


def _home_family(model: nn.Module, placement: str) -> _Home | None:
    """The stock family of a normswap-generated ``model``, where it has ``placement`` (as ``api._original_family``)."""
    provenance = getattr(model.config, "normswap", None)
    original = provenance.get("source_model_type") if isinstance(provenance, dict) else None
    if not original or original == model.config.model_type:
        return None
    target = NativeTarget(placement, original, class_prefix=_back_from_stock(original, model.config.model_type))
    try:
        cls, config = target_class(model, target), target_config(model.config, target)
        meta = meta_instance(cls, config)
        topology = inspect(meta)
    except (NormswapError, KeyError, ValueError):
        return None
    return _Home(original, cls, config, topology, meta) if topology.placement == placement else None


def _back_from_stock(original: str, model_type: str) -> tuple[str, str] | None:
    """The class-name rule back to ``original`` from the stock family its recipe sent the model to (VaultGemma's
    classes are Gemma 2's again; so are those of VaultGemma's generated code, after a norm shift), or None where the
    model is ``original``'s own generated code (same names)."""
    model_type = family_model_type(model_type)
    recipe = recipe_for(original)
    forward = next((target for target in recipe.native if target.model_type == model_type), None) if recipe else None
    if forward is None or forward.class_prefix is None:
        return None
    source_prefix, stock_prefix = forward.class_prefix
    return stock_prefix, source_prefix


def _home_setup(model: nn.Module, placement: str, home: _Home, carried: Mapping[str, Tensor],
                scales: Mapping[str, float]) -> ConversionSetup:
    """The program from ``model`` (placement sandwich, pre or post-sublayer) to ``home``: the norms a carried scale
    names as dropped restored and unfolded, those it names as added folded away; every other tensor copied."""
    source = inspect(model)
    mine = {norm.path: norm for norm in source.all_norms if norm.kind != "identity"}
    theirs = {norm.path: norm for norm in home.topology.all_norms if norm.kind != "identity"}
    removed = [theirs[path] for path in scales if path in theirs and path not in mine]
    added = [mine[path] for path in scales if path in mine and path not in theirs]
    # in both, with a scale: a pre norm the stream-scale pass set to weight s before a norm shift (stream_scale.py)
    rescaled = [theirs[path] for path in scales if path in theirs and path in mine and theirs[path].slot == "pre"]
    for path in sorted(set(mine) ^ set(theirs)):
        if path not in {norm.path for norm in (*removed, *added)}:
            raise NoWayHomeError(f"{path} is in only one of the two models and no carried scale says it was moved")
    for path in sorted(set(mine) & set(theirs)):
        if mine[path].kind != theirs[path].kind:
            raise NoWayHomeError(f"{path} is a {mine[path].kind} norm here and a {theirs[path].kind} norm in "
                                 f"{home.model_type}")

    steps = {key: copy_of(key) for key in model.state_dict()}
    checks: list[Step] = []
    moves = _drop_added(model, added, scales, steps, checks)
    moves += _restore_removed(home.meta, removed, carried, scales, steps)
    moves += _restore_removed(home.meta, rescaled, carried, scales, steps, folded_centring=False)
    source_shapes, target_shapes = shapes_of(model.state_dict()), shapes_of(home.meta.state_dict())
    restored = {key for norm in (*removed, *rescaled) for key in stand_in_of(home.meta, norm).keys}
    for key, shape in target_shapes.items():
        if key not in steps:
            raise NoWayHomeError(f"{key} of {home.model_type} is neither in this model nor carried")
        if key not in restored and tuple(source_shapes.get(key, ())) != tuple(shape):
            raise NoWayHomeError(f"{key} has shape {tuple(source_shapes.get(key, ()))} here, {tuple(shape)} in "
                                 f"{home.model_type}")
    program = TensorProgram({key: steps[key] for key in target_shapes}, checks=tuple(checks))
    target = home.topology
    where = f"the {home.model_type} code of the way out" if home.generated else f"the stock {home.model_type} classes"
    name = f"{source.placement} -> {placement}: back to {where}"
    plan = ComposedPlan(source.model_type, home.model_type, source.placement, placement, home.realisation,
                        False, (Pass(name, exact=False, placement=placement, moves=tuple(moves)),),
                        ("dropped norms restored bit for bit from the carried tensors and the tensors their stand-ins "
                         "were folded into unfolded in float64; added norms dropped at their carried scale",))

    def verify(original: nn.Module, converted: nn.Module, probe: dict[str, Tensor]) -> DriftReport:
        require_topology(converted, target)
        return measure_drift(original, converted, source, target, probe, exact=False)

    return ConversionSetup(plan, program, home.cls, home.config, home.generated,
                           f"placement {source.placement} -> {placement} (back to {home.model_type})", source, target,
                           verify)


def _drop_added(model: nn.Module, added: Sequence[NormSite], scales: Mapping[str, float], steps: dict[str, Step],
                checks: list[Step]) -> list[PassMove]:
    """Fold each added norm's stand-in, at the scale it was started at, into its neighbours (as the drop passes do),
    without a LayerNorm's centring ``C``: the original had no norm there, and while ``g`` is still its start ``s``
    (and ``beta`` 0) the fold is then the identity, so the neighbours come home as they were. An out LayerNorm
    whose writers have no bias (StableLM's ``o_proj``) goes home only while its ``beta`` is 0 (``checks``)."""
    out_folds, out_moves = out_norm_folds(model, [norm for norm in added if norm.slot == "out"], give_biases=False,
                                          centred=False)
    for fold in out_folds:
        if fold.carrier is None and fold.stand_in.bias is not None:
            checks.append(_zero_beta(model, fold.stand_in.bias))
    pre_folds, pre_moves = pre_norm_folds(model, [norm for norm in added if norm.slot == "pre"])
    for pre in pre_folds:
        if pre.new_biases:
            raise NoWayHomeError(f"{pre.new_biases[0]} would be needed for the beta of {pre.stand_in.norm}, a norm the "
                                 "way out added, and the stock class has no such bias")
    for fold in out_folds:
        for key, dim in fold.tensors.items():
            fold_into_writer(fold.stand_in, scales[fold.stand_in.norm], key, dim, steps,
                             carries_shift=key == fold.carrier, centre=False)
    for pre in pre_folds:
        for reader in pre.readers:
            fold_into_reader(pre.stand_in, scales[pre.stand_in.norm], reader.weight, reader.in_dim, reader.bias, steps,
                             centre=False, factor=reader.factor)
    return [PassMove("fold", move.norm, move.into, note="at its carried starting scale")
            for move in (*out_moves, *pre_moves)]


def _zero_beta(model: nn.Module, key: str) -> Step:
    """The check that ``key``, an added out LayerNorm's ``beta`` with no writer bias to go into at home, is 0: at
    plan time from the model's tensors or SRC's (``normswap_source_tensor``, on the meta device), and again as the
    conversion reads it."""
    untrained = f"{key} is not 0 (it was trained after the way out), and no bias of the stock class holds it"
    tensor: Tensor | None = model.get_parameter(key)
    if tensor is not None and tensor.device.type == "meta":  # planned on the meta device: read it from SRC
        read = getattr(model, "normswap_source_tensor", None)
        tensor = read(key) if read is not None else None
    if tensor is not None and bool(tensor.ne(0).any()):
        raise NoWayHomeError(untrained)

    def check(beta: Tensor) -> Tensor:
        if bool(beta.ne(0).any()):
            raise NoWayHomeError(untrained)
        return beta

    return Step((key,), check)


def _restore_removed(home: nn.Module, removed: Sequence[NormSite], carried: Mapping[str, Tensor],
                     scales: Mapping[str, float], steps: dict[str, Step], folded_centring: bool = True
                     ) -> list[PassMove]:
    """Each dropped norm's carried vectors under its own name, and its stand-in unfolded from its neighbours
    (``folded_centring=False``: a rescaled norm, whose fold left ``C`` out, so a LayerNorm comes back too)."""
    if not removed:
        return []
    out_folds, out_moves = out_norm_folds(home, [norm for norm in removed if norm.slot == "out"])
    # a rescaled norm whose readers had no bias for its beta kept it (stream_scale.py): not refused here
    pre_folds, pre_moves = pre_norm_folds(home, [norm for norm in removed if norm.slot == "pre"],
                                          shift_to_readers=folded_centring)
    for stand_in in (*(fold.stand_in for fold in out_folds), *(fold.stand_in for fold in pre_folds)):
        for key in stand_in.keys:
            if key not in carried:
                raise NoWayHomeError(f"{key} is not among the carried tensors")
            steps[key] = _carried(carried[key])
        if stand_in.weight is not None and not bool(stand_in.gain(carried, 0).ne(0).all()):
            raise NoWayHomeError(f"{stand_in.weight} has a channel where g = 0, which its fold erased")
    for fold in out_folds:
        _unfold_writers(fold, scales[fold.stand_in.norm], steps,
                        _means(fold.stand_in, [key for key in fold.tensors if key != fold.new_bias], carried)
                        if folded_centring else {})
    for pre in pre_folds:
        _unfold_readers(pre, scales[pre.stand_in.norm], steps,
                        _means(pre.stand_in, [reader.weight for reader in pre.readers], carried)
                        if folded_centring else {})
    return [PassMove("restore", move.norm, move.into, note="carried vectors; its neighbours unfolded")
            for move in (*out_moves, *pre_moves)]


def _means(stand_in: StandIn, keys: Iterable[str], carried: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The carried mean of each tensor a LayerNorm's stand-in centred (none for an RMSNorm's): the centring ``C``
    removed it, and the unfold adds it back."""
    if not stand_in.centred:
        return {}
    means = {key: carried.get(mean_key(key)) for key in keys}
    missing = sorted(key for key, mean in means.items() if mean is None)
    if missing:
        raise NoWayHomeError(f"{stand_in.norm} is a LayerNorm whose stand-in removed the mean of {missing[0]} (C), and "
                             "no carried mean restores it (converted by a normswap that carried none)")
    return {key: mean for key, mean in means.items() if mean is not None}


def _carried(tensor: Tensor) -> Step:
    return Step((), lambda: tensor.clone(), touches=False)


def _unfold_writers(fold: OutFold, scale: float, steps: dict[str, Step], means: Mapping[str, Tensor]) -> None:
    """``W = diag(s/g) (W' - beta) + m``: the inverse of ``stand_in.fold_into_writer`` (``beta`` on its carrier only;
    ``m``, a LayerNorm's, the carried mean its centring removed)."""
    stand_in = fold.stand_in
    for key, dim in fold.tensors.items():
        mean = means.get(key)

        def unfold(tensor: Tensor, *norm_tensors: Tensor, dim: int = dim, shifted: bool = key == fold.carrier,
                   mean: Tensor | None = mean) -> Tensor:
            named = dict(zip(stand_in.keys, norm_tensors, strict=True))
            wide = tensor.double()
            beta = stand_in.shift(named)
            if shifted and beta is not None:
                wide = wide - _along(beta, wide, dim)
            wide = wide * _along(scale / stand_in.gain(named, wide.shape[dim]), wide, dim)
            if mean is not None:
                wide = wide + mean.double().unsqueeze(dim)
            return wide.to(tensor.dtype)

        steps[key] = combine(unfold, steps[key], *(steps[k] for k in stand_in.keys))


def _unfold_readers(fold: PreFold, scale: float, steps: dict[str, Step], means: Mapping[str, Tensor]) -> None:
    """``W = (s W' + m) diag(1/g)`` and ``b = b' - c W beta``: the inverse of ``stand_in.fold_into_reader`` (``m``, a
    LayerNorm's, the carried mean its centring removed)."""
    stand_in = fold.stand_in
    # beta went into the readers' biases only where every reader had one (else the norm kept it: stream_scale.py)
    shifted = stand_in.bias is not None and all(reader.bias is not None for reader in fold.readers)
    for reader in fold.readers:
        mean = means.get(reader.weight)

        def weight(tensor: Tensor, *norm_tensors: Tensor, in_dim: int = reader.in_dim, mean: Tensor | None = mean
                   ) -> Tensor:
            return _unscaled(stand_in, scale, tensor, norm_tensors, in_dim, mean).to(tensor.dtype)

        def bias(tensor: Tensor, matrix: Tensor, *norm_tensors: Tensor, in_dim: int = reader.in_dim,
                 mean: Tensor | None = mean, factor: float = reader.factor) -> Tensor:
            beta = stand_in.shift(dict(zip(stand_in.keys, norm_tensors, strict=True)))
            assert beta is not None  # only unfolded for a norm with a bias
            unfolded = _unscaled(stand_in, scale, matrix, norm_tensors, in_dim, mean)
            shift = (unfolded.movedim(in_dim, -1) @ beta).reshape(tensor.shape)
            return (tensor.double() - factor * shift).to(tensor.dtype)

        folded, norm_steps = steps[reader.weight], [steps[k] for k in stand_in.keys]
        if shifted and reader.bias is not None:
            steps[reader.bias] = combine(bias, steps[reader.bias], folded, *norm_steps)
        steps[reader.weight] = combine(weight, folded, *norm_steps)


def _unscaled(stand_in: StandIn, scale: float, matrix: Tensor, norm_tensors: Sequence[Tensor], in_dim: int,
              mean: Tensor | None = None) -> Tensor:
    """``(s W' + m) diag(1/g)`` in float64 (``m`` 0 where no centring was folded)."""
    named = dict(zip(stand_in.keys, norm_tensors, strict=True))
    gain = _along(stand_in.gain(named, matrix.shape[in_dim]), matrix, in_dim)
    if mean is None:
        return matrix.double() * (scale / gain)
    return (matrix.double() * scale + mean.double().unsqueeze(in_dim)) / gain
