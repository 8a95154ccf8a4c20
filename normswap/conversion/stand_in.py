"""A removed norm's calibrated stand-in, and how it folds into the linear maps beside it (docs/design.md §9).

On a typical token a norm is a linear map: RMSNorm ``y = g * x / s``, LayerNorm ``y = g * C x / s + beta``
(``C = I - 11^T/d`` removes the mean), with ``s`` the mean per-token RMS (LayerNorm: standard deviation) of
its input over the calibration tokens, measured with the norm's own eps, and ``g = 1 + w`` for an offset
norm (an RMSNorm with a bias, as ``NormswapRMSNorm`` after an exact LayerNorm -> RMSNorm, adds it too).
Being linear, the stand-in folds exactly into its neighbours:

* an ``out`` norm (``h + N(F(h))``) into every tensor that writes its input:
  ``W <- diag(g/s) [C] W`` and ``b <- (g/s) * [C] b``, plus ``beta`` on exactly one bias;
* a ``pre`` norm (``h + F(N(h))``) into every linear map that reads its output:
  ``W <- W diag(g) [C] / s`` and ``b <- b + W beta``.

All arithmetic is in float64, cast back to each tensor's dtype. ``stand_ins`` runs the *source* model with
chosen norms replaced by their stand-ins: the reference a model with folded stand-ins must equal to float
rounding, which is what makes a fold testable apart from the stand-in's own inexactness.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..topology import OFFSET_NORM_KINDS, NormSite, Topology
from .calibration import CalibratedScale, CalibrationSite
from .passes import Pass
from .program import Step, combine

Tensor = torch.Tensor


@dataclass(frozen=True)
class StandIn:
    """The linear map a norm is on a typical token: which of its tensors it uses and where ``s`` is measured."""

    norm: str  # the norm's module path
    site: CalibrationSite  # its input: rms (RMSNorm) or std (LayerNorm), with the norm's eps
    offset: bool  # (1 + w) * n
    weight: str | None  # the state-dict key of g (None: a weightless norm, g = 1)
    bias: str | None  # the state-dict key of beta (None: no bias)

    @property
    def centred(self) -> bool:
        """A LayerNorm's stand-in removes the mean first."""
        return self.site.statistic == "std"

    @property
    def keys(self) -> tuple[str, ...]:
        """The norm's own tensors, in the order ``combine`` hands them to the folds."""
        return tuple(key for key in (self.weight, self.bias) if key is not None)

    def gain(self, tensors: Mapping[str, Tensor], width: int) -> Tensor:
        """``g`` in float64: the weight, ``1 + w`` for an offset norm, ones for a weightless one."""
        if self.weight is None:
            return torch.ones(width, dtype=torch.float64)
        wide = tensors[self.weight].double()
        return wide + 1.0 if self.offset else wide

    def shift(self, tensors: Mapping[str, Tensor]) -> Tensor | None:
        return tensors[self.bias].double() if self.bias is not None else None

    def apply(self, x: Tensor, tensors: Mapping[str, Tensor], scale: float) -> Tensor:
        """The stand-in on ``x`` (its channels on ``site.axis``), in float64, cast back to ``x``'s dtype."""
        wide = x.double().movedim(self.site.axis, -1)
        if self.centred:
            wide = wide - wide.mean(-1, keepdim=True)
        out = wide * (self.gain(tensors, wide.shape[-1]) / scale).to(wide.device)
        beta = self.shift(tensors)
        if beta is not None:
            out = out + beta.to(out.device)
        return out.movedim(-1, self.site.axis).to(x.dtype)


def stand_in_of(model: nn.Module, norm: NormSite) -> StandIn:
    """The stand-in of the norm at ``norm`` (a detected site), measured at its input with its own eps."""
    statistic = "std" if norm.kind.startswith("layernorm") else "rms"
    site = CalibrationSite(norm.path, "input", statistic, norm.axis, float(norm.eps or 0.0))
    own = dict(model.get_submodule(norm.path).named_parameters(recurse=False))
    weight = f"{norm.path}.weight" if own.get("weight") is not None else None
    bias = f"{norm.path}.bias" if own.get("bias") is not None else None  # an RMSNorm may carry one too (a moved LN's)
    return StandIn(norm.path, site, norm.kind in OFFSET_NORM_KINDS, weight, bias)


def _along(vector: Tensor, tensor: Tensor, dim: int) -> Tensor:
    """``vector`` shaped to broadcast along ``dim`` of ``tensor``."""
    shape = [1] * tensor.dim()
    shape[dim] = -1
    return vector.reshape(shape)


def fold_into_writer(stand_in: StandIn, scale: float, key: str, dim: int, steps: dict[str, Step],
                     carries_shift: bool = False, centre: bool = True) -> None:
    """``steps[key]``, a tensor whose ``dim`` runs over the norm's input channels (a writer's weight or bias, a
    bias added outside a linear map), becomes ``(g/s) * [C] tensor`` (``+ beta`` where it ``carries_shift``);
    ``centre=False`` leaves ``C`` out (a LayerNorm dropped on the way home, which the original never had)."""
    def fold(tensor: Tensor, *norm_tensors: Tensor) -> Tensor:
        named = dict(zip(stand_in.keys, norm_tensors, strict=True))
        wide = tensor.double()
        if stand_in.centred and centre:
            wide = wide - wide.mean(dim, keepdim=True)
        out = wide * _along(stand_in.gain(named, wide.shape[dim]) / scale, wide, dim)
        beta = stand_in.shift(named)
        if carries_shift and beta is not None:
            out = out + _along(beta, wide, dim)
        return out.to(tensor.dtype)

    steps[key] = combine(fold, steps[key], *(steps[k] for k in stand_in.keys))


def fold_into_reader(stand_in: StandIn, scale: float, weight: str, in_dim: int, bias: str | None,
                     steps: dict[str, Step], centre: bool = True, factor: float = 1.0) -> None:
    """A linear map reading the norm's output: ``W <- W diag(g) [C] / s`` (``in_dim``: the dimension of ``W``
    over its inputs) and, for a norm with a bias, ``b <- b + c W beta`` with the original ``W``, where ``c`` is
    ``factor``, the constant the map's input is the norm's output times (1 mostly). ``centre=False`` leaves ``C``
    out, for a LayerNorm that stays in place and keeps centring what the map reads."""
    def folded_weight(tensor: Tensor, *norm_tensors: Tensor) -> Tensor:
        named = dict(zip(stand_in.keys, norm_tensors, strict=True))
        wide = tensor.double() * _along(stand_in.gain(named, tensor.shape[in_dim]), tensor, in_dim)
        if stand_in.centred and centre:
            wide = wide - wide.mean(in_dim, keepdim=True)
        return (wide / scale).to(tensor.dtype)

    def folded_bias(tensor: Tensor, matrix: Tensor, *norm_tensors: Tensor) -> Tensor:
        beta = stand_in.shift(dict(zip(stand_in.keys, norm_tensors, strict=True)))
        assert beta is not None  # only called for a norm with a bias
        shift = (matrix.double().movedim(in_dim, -1) @ beta).reshape(tensor.shape)
        return (tensor.double() + factor * shift).to(tensor.dtype)

    original = steps[weight]
    norm_steps = [steps[k] for k in stand_in.keys]
    if stand_in.bias is not None:
        assert bias is not None  # the pass refuses a reader with no bias to take beta
        steps[bias] = combine(folded_bias, steps[bias], original, *norm_steps)
    steps[weight] = combine(folded_weight, original, *norm_steps)


@contextlib.contextmanager
def stand_ins(model: nn.Module, replacements: Mapping[StandIn, float]) -> Iterator[nn.Module]:
    """``model`` with each norm of ``replacements`` (stand-in -> its scale ``s``) computing its stand-in instead:
    a forward hook replaces the norm's output by the stand-in of its input. The hooks are removed on exit."""
    handles = []
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for stand_in, scale in replacements.items():
        module = model.get_submodule(stand_in.norm)
        own = {key: tensors[key].detach() for key in stand_in.keys}

        def replace(_module: nn.Module, args: tuple, _output: Tensor, stand_in: StandIn = stand_in,
                    scale: float = scale, own: dict[str, Tensor] = own) -> Tensor:
            return stand_in.apply(args[0], own, scale)

        handles.append(module.register_forward_hook(replace))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def pass_stand_ins(model: nn.Module, pass_: Pass, scales: Mapping[CalibrationSite, CalibratedScale],
                   topology: Topology | None = None) -> dict[StandIn, float]:
    """The stand-ins ``pass_`` folds (its ``fold`` moves), each with its calibrated scale, on the source ``model``."""
    if topology is None:
        from ..detect import inspect  # detection imports conversion helpers; import it where it is used

        topology = inspect(model)
    sites = {norm.path: norm for norm in topology.all_norms}
    return {stand_in_of(model, sites[move.norm]): scales[move.site].scale
            for move in pass_.moves if move.action == "fold" and move.site is not None}


def stand_in_reference(model: nn.Module, pass_: Pass, scales: Mapping[CalibrationSite, CalibratedScale],
                       topology: Topology | None = None) -> contextlib.AbstractContextManager[nn.Module]:
    """The source ``model`` with every norm ``pass_`` folds computing its stand-in: what the converted model must
    equal to float rounding (``with stand_in_reference(model, pass_, scales): reference = model(**probe)``)."""
    return stand_ins(model, pass_stand_ins(model, pass_, scales, topology))
