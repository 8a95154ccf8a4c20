"""Per-channel parameters a branch applies after its last linear map, found by behaviour and folded.

Centring a branch's writer ``W`` centres what the branch adds to the stream only if nothing acts on the
writer's output on the way to the residual add. Some families do act on it, with a ``(d,)`` parameter:

* LayerScale (BEiT, DINOv2, ...): ``l * (W x + b)``. ``diag(l) C W != C diag(l) W``, so centring ``W``
  leaves ``l * (C W x)`` uncentred. Folding first (``W <- diag(l) W``, ``b <- l * b``, ``l <- 1``) makes
  the branch output a plain linear map again, which centring then centres exactly.
* a bias added outside the linear map (GPT-NeoX-Japanese's ``dense_bias``): ``W x + c``. ``c`` is part of
  the branch output and must be centred with ``W``.

The parameters are found on the model's meta twin: one forward pass under a ``TorchFunctionMode`` follows
each writer's output through elementwise operations until it meets the residual stream, recording every
multiply or add by a ``(d,)``-shaped parameter on the way. No family names, no weights read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..detect.capture import synthetic_forward
from ..detect.real_run import on_meta_else_cpu
from .program import Step, combine

Tensor = torch.Tensor

_MULTIPLY = frozenset({torch.mul, Tensor.mul, Tensor.mul_, Tensor.__mul__, Tensor.__rmul__, Tensor.__imul__})
_ADD = frozenset({torch.add, Tensor.add, Tensor.add_, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__})
# operations that hand their first argument on unchanged in value at inference (or only re-laid out)
_PASS_THROUGH = frozenset({
    torch.nn.functional.dropout, torch.dropout, Tensor.contiguous, Tensor.clone, Tensor.to, Tensor.type_as,
    Tensor.type, Tensor.float, Tensor.view, Tensor.reshape, torch.reshape,
})
# casts that read only the dtype (and device) of a tensor passed after the first: ``x.type_as(y)``, ``x.to(y)``
_DTYPE_TEMPLATES = frozenset({Tensor.type_as, Tensor.to})
# elementwise functions that are not linear: a writer's output that goes through one is no branch output
_NONLINEAR = frozenset({
    torch.sigmoid, Tensor.sigmoid, torch.tanh, Tensor.tanh, torch.relu, Tensor.relu, torch.nn.functional.relu,
    torch.nn.functional.silu, torch.nn.functional.gelu, torch.nn.functional.softplus, torch.exp, Tensor.exp,
    torch.square, Tensor.square,
})
# operations that re-shape a (d,) parameter without changing which channel each value belongs to
_PARAMETER_VIEWS = frozenset({
    Tensor.expand, Tensor.expand_as, Tensor.view, Tensor.reshape, Tensor.unsqueeze, torch.unsqueeze,
    Tensor.__getitem__, Tensor.to, Tensor.type_as, Tensor.contiguous,
})


@dataclass(frozen=True)
class ChannelOp:
    """``output = output * parameter`` (``scale``) or ``output = output + parameter`` (``shift``)."""

    kind: str  # "scale" | "shift"
    parameter: str  # state-dict key of the (d,) parameter


@dataclass(frozen=True)
class BranchTail:
    """What a branch does to its writer's output before adding it to the stream, in call order."""

    writer: str
    ops: tuple[ChannelOp, ...]

    @property
    def scales(self) -> tuple[str, ...]:
        return tuple(op.parameter for op in self.ops if op.kind == "scale")

    @property
    def shifts(self) -> tuple[str, ...]:
        return tuple(op.parameter for op in self.ops if op.kind == "shift")


@dataclass(frozen=True)
class _Chain:
    """A tensor that is the writer's output up to the channel operations recorded so far."""

    writer: str
    ops: tuple[ChannelOp, ...]
    tensor: Tensor  # held so that its id is not reused while we track it


@dataclass(frozen=True)
class _ParameterView:
    parameter: str
    tensor: Tensor


class _FollowWriterOutputs(TorchFunctionMode):
    """Follows each writer output through elementwise ops until an add with a non-parameter tensor (the stream)."""

    def __init__(self, parameters: dict[int, tuple[str, Tensor]]) -> None:
        super().__init__()
        self.parameters = parameters
        self.shapes = {name: tensor.shape for name, tensor in parameters.values()}
        self.chains: dict[int, _Chain] = {}
        self.views: dict[int, _ParameterView] = {}
        self.tails: dict[str, set[tuple[ChannelOp, ...]]] = {}
        self.broken: set[str] = set()  # writers whose output met an operation we cannot see through
        # why a writer's output cannot be centred by a weight change, where it is structural: multiplied by a
        # computed tensor that varies over the channels, or put through a function that is not linear (RWKV's
        # ``sigmoid(R x) * (V k)``, whose last linear map is R)
        self.unfoldable: dict[str, str] = {}
        self.uses: dict[str, int] = {}  # how often each (d,) parameter was read by any operation

    def start(self, writer: str, output: Any) -> None:
        if isinstance(output, Tensor):
            self.chains[id(output)] = _Chain(writer, (), output)

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        operands = [value for value in (*args, *kwargs.values()) if isinstance(value, Tensor)]
        chained = [self.chains[id(t)] for t in operands if id(t) in self.chains and self.chains[id(t)].tensor is t]
        if not chained and self._follow_parameter(func, operands, result):
            return result  # a view of a parameter: counted as a use where the view is read
        for operand in operands:
            view = self._parameter_view(operand)
            if view is not None:
                self.uses[view.parameter] = self.uses.get(view.parameter, 0) + 1
        if not chained:
            return result
        chain = chained[0]
        others = [t for t in operands if t is not chain.tensor]
        if not isinstance(result, Tensor):  # .shape, .dim(), ...: no value flows on
            return result
        if len(chained) > 1 or len(others) > 1:  # two branches summed before the residual add, or more
            for each in chained:
                self._close(each, residual=func in _ADD)
            return result
        other = self._parameter_view(others[0]) if others else None
        width = chain.tensor.shape[-1] if chain.tensor.dim() else 0
        if other is not None and self._is_channel_vector(other, width) and func in _MULTIPLY | _ADD:
            kind = "scale" if func in _MULTIPLY else "shift"
            self.chains[id(result)] = _Chain(chain.writer, (*chain.ops, ChannelOp(kind, other.parameter)), result)
        elif not others and func in _PASS_THROUGH and result.shape[-1:] == chain.tensor.shape[-1:]:
            self.chains[id(result)] = _Chain(chain.writer, chain.ops, result)
        else:
            if func in _MULTIPLY and others and other is None and width > 1 and others[0].shape[-1:] == (width,):
                self.unfoldable.setdefault(chain.writer, "is multiplied by a gate computed from the input (one "
                                                         "that varies over the channels)")
            elif func in _NONLINEAR:
                self.unfoldable.setdefault(chain.writer, f"goes through {getattr(func, '__name__', func)} (not "
                                                         "linear)")
            self._close(chain, residual=func in _ADD and other is None)
        return result

    def _close(self, chain: _Chain, residual: bool) -> None:
        """The chain ends: at the residual add (or a sum with another branch), or at something we cannot fold."""
        if residual:
            self.tails.setdefault(chain.writer, set()).add(chain.ops)
        else:
            self.broken.add(chain.writer)

    def _parameter_view(self, tensor: Tensor) -> _ParameterView | None:
        found = self.parameters.get(id(tensor))
        if found is not None and found[1] is tensor:
            return _ParameterView(found[0], tensor)
        view = self.views.get(id(tensor))
        return view if view is not None and view.tensor is tensor else None

    def _follow_parameter(self, func: Callable, operands: list[Tensor], result: Any) -> bool:
        """Record ``result`` as a view of a parameter if it is one; say whether it was."""
        if func not in _PARAMETER_VIEWS or not operands or not isinstance(result, Tensor):
            return False
        view = self._parameter_view(operands[0])
        if view is None or view.tensor.dim() < 1:
            return False
        self.views[id(result)] = _ParameterView(view.parameter, result)
        return True

    def _is_channel_vector(self, view: _ParameterView, width: int) -> bool:
        """A (d,) parameter, possibly viewed or expanded so that its last dimension runs over the d channels."""
        shape = self.shapes[view.parameter]
        return len(shape) == 1 and shape[0] == width and view.tensor.shape[-1:] == (width,)


def branch_tails(meta: nn.Module, writers: Iterable[str]) -> dict[str, BranchTail]:
    """For each writer whose output reaches the stream through per-channel parameters only, those parameters.

    A writer is left out when its output goes through anything else (the exactness check then decides), when
    its calls disagree, or when one of its parameters is read more than once in the forward pass (setting it
    to 1, or centring it, would change the other reader).
    """
    writers = list(writers)
    follower = on_meta_else_cpu(meta, lambda model, device: _follow_writers(model, device, writers))
    tails: dict[str, BranchTail] = {}
    for writer in writers:
        found = follower.tails.get(writer, set())
        if writer in follower.broken or len(found) != 1:
            continue
        (ops,) = found
        if ops:
            tails[writer] = BranchTail(writer, ops)
    shared = {key for key, count in follower.uses.items() if count > 1}  # read again elsewhere, or by another call
    return {writer: tail for writer, tail in tails.items() if not shared & {op.parameter for op in tail.ops}}


def unfoldable_writers(meta: nn.Module, writers: Iterable[str]) -> dict[str, str]:
    """The writers whose output a branch gates (``g(x) * (W y)``) or puts through a function that is not linear
    before adding it to the stream, with what happens to it: centring ``W`` does not centre what is added."""
    writers = list(writers)
    follower = on_meta_else_cpu(meta, lambda model, device: _follow_writers(model, device, writers))
    return {writer: follower.unfoldable[writer] for writer in writers if writer in follower.unfoldable}


def _follow_writers(meta: nn.Module, device: str, writers: list[str]) -> _FollowWriterOutputs:
    parameters = {id(p): (name, p) for name, p in meta.named_parameters(remove_duplicate=False) if p.dim() == 1}
    follower = _FollowWriterOutputs(parameters)
    synthetic_forward(meta, device, [(path, lambda module, args, output, path=path: follower.start(path, output))
                                     for path in writers], follower)
    return follower


def fold_tail(tail: BranchTail, writer_dims: dict[str, int], steps: dict[str, Step]) -> None:
    """Fold the tail's scales into what precedes them (writer tensors, earlier shifts) and set them to 1.

    ``writer_dims`` maps each of the writer's tensors (weight, bias) to the dimension that runs over its
    outputs. Afterwards the branch adds ``W' x + b' + sum(shifts')`` to the stream, which centring each
    term centres.
    """
    terms = dict(writer_dims)  # the additive parts of the branch output so far, with their output dimension
    for op in tail.ops:
        if op.kind == "shift":
            terms[op.parameter] = -1
            continue
        scale = steps[op.parameter]
        for key, dim in terms.items():
            steps[key] = combine(lambda tensor, factor, dim=dim: _scaled(tensor, factor, dim), steps[key], scale)
        steps[op.parameter] = combine(torch.ones_like, scale)


def _scaled(tensor: Tensor, factor: Tensor, dim: int) -> Tensor:
    """``tensor * factor`` along ``dim``, in float64."""
    shape = [1] * tensor.dim()
    shape[dim] = -1
    return (tensor.double() * factor.double().reshape(shape)).to(tensor.dtype)
