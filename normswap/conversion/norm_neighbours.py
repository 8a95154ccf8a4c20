"""What a removed norm's stand-in folds into, found by behaviour (docs/design.md §9): no family names.

* An ``out`` norm (``h + N(F(h))``) reads the branch's output. Its input must be a sum of terms, each a
  linear map's output (an ``nn.Linear``, a GPT-2 ``Conv1D``, fused MoE experts) or a ``(d,)`` parameter
  added outside one, possibly multiplied on the way by ``(d,)`` parameters (LayerScale) or by a per-token
  scalar (a shared expert's gate): then ``diag(g/s) [C]`` distributes over the sum, and scaling every term
  is exact. ``norm_inputs`` follows every linear map's output through such operations, merging sums (routed
  experts plus a shared expert), and records the terms that reach each norm's input.
* A ``pre`` norm (``h + F(N(h))``) must be read by weights alone: ``pre_norm_readers`` follows its output
  through re-layouts (a view before a router) and products with a Python number (Falcon-H1's
  ``attention_in_multiplier``: ``W (c y) = c (W y)``, so ``W`` takes the fold and its bias ``c W beta``) to the
  linear modules and fused experts called on it and to ``F.linear`` of a raw parameter (Mixtral's router), and
  reports any other operation on it (the residual taken after the norm, as BLOOM can), which a fold into weights
  could not reach.

Both run one forward pass of the model's meta twin on synthetic inputs under a ``TorchFunctionMode``.
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
from .branch_scale import _ADD, _DTYPE_TEMPLATES, _MULTIPLY, _PARAMETER_VIEWS, _PASS_THROUGH
from .native import meta_twin
from .norm_kind import fused_experts, linear_layout

Tensor = torch.Tensor


@dataclass(frozen=True)
class Term:
    """One additive part of an out norm's input: a writer's output (``source`` its module path) or a ``(d,)``
    parameter added outside a linear map (``source`` its state-dict key)."""

    source: str
    writer: bool
    scales: tuple[str, ...] = ()  # (d,) parameters it is multiplied by on the way
    token_scaled: bool = False  # multiplied by a per-token scalar (a routing weight, a shared expert's gate)


@dataclass(frozen=True)
class NormInput:
    """What one out norm reads: its terms, or why its input is not a sum of terms the stand-in can fold into."""

    norm: str
    terms: tuple[Term, ...] = ()
    reason: str = ""


@dataclass(frozen=True)
class _Chain:
    terms: tuple[Term, ...]
    tensor: Tensor  # held so that its id is not reused while tracked


class _FollowTerms(TorchFunctionMode):
    """Follows every writer's output through sums, per-channel parameters and per-token scalars."""

    def __init__(self, parameters: dict[int, tuple[str, Tensor]]) -> None:
        super().__init__()
        self.parameters = parameters
        self.shapes = {name: tensor.shape for name, tensor in parameters.values()}
        self.chains: dict[int, _Chain] = {}
        self.views: dict[int, tuple[str, Tensor]] = {}
        self.uses: dict[str, int] = {}  # how often each (d,) parameter is read
        self.calls: dict[str, int] = {}  # how often each writer module runs
        self.escaped: dict[str, str] = {}  # writer -> an operation that reads its output other than its way on
        self.in_norm = 0  # depth of watched norms running: their own arithmetic reads the chain
        # tensors computed from writers' outputs other than along a chain (a norm's ``rsqrt(mean(x^2))``, a gate's
        # ``sigmoid(W x)``), with those writers: a chain times one computed from itself is not linear in it
        self.derived: dict[int, tuple[frozenset[str], Tensor]] = {}

    def start(self, writer: str, output: Any) -> None:
        self.calls[writer] = self.calls.get(writer, 0) + 1
        if isinstance(output, Tensor):
            self.chains[id(output)] = _Chain((Term(writer, True),), output)

    def chain_of(self, tensor: Any) -> _Chain | None:
        found = self.chains.get(id(tensor)) if isinstance(tensor, Tensor) else None
        return found if found is not None and found.tensor is tensor else None

    def parameter_of(self, tensor: Tensor) -> str | None:
        for table in (self.parameters, self.views):
            found = table.get(id(tensor))
            if found is not None and found[1] is tensor:
                return found[0]
        return None

    def derived_from(self, tensor: Tensor) -> frozenset[str]:
        found = self.derived.get(id(tensor))
        return found[0] if found is not None and found[1] is tensor else frozenset()

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        operands = [value for value in (*args, *kwargs.values()) if isinstance(value, Tensor)]
        chained = [chain for chain in map(self.chain_of, operands) if chain is not None]
        sources = frozenset().union(*map(self.derived_from, operands))
        if sources and isinstance(result, Tensor):
            self.derived[id(result)] = (sources, result)
        if not chained:
            if func in _PARAMETER_VIEWS and operands and isinstance(result, Tensor):
                name = self.parameter_of(operands[0])
                if name is not None:
                    self.views[id(result)] = (name, result)
                    return result
            for operand in operands:
                name = self.parameter_of(operand)
                if name is not None:
                    self.uses[name] = self.uses.get(name, 0) + 1
            return result
        if not isinstance(result, Tensor) or not result.is_floating_point():
            return result
        others = [t for t in operands if self.chain_of(t) is None]
        width = chained[0].tensor.shape[-1] if chained[0].tensor.dim() else 0
        terms: tuple[Term, ...] | None = None
        if func in _ADD and len(chained) >= 2 and not others:  # two branch parts summed: routed + shared experts
            terms = tuple(term for chain in chained for term in chain.terms)
        elif (func in _PASS_THROUGH and len(chained) == 1 and self.chain_of(args[0] if args else None) is chained[0]
              and result.shape[-1:] == chained[0].tensor.shape[-1:]):  # ``y.type_as(chain)`` hands on ``y``
            terms = chained[0].terms
        elif len(chained) == 1 and len(others) == 1 and func in _ADD | _MULTIPLY:
            name = self.parameter_of(others[0])
            if name is not None:
                self.uses[name] = self.uses.get(name, 0) + 1
            channel = name is not None and self.shapes[name] == (width,) and others[0].shape[-1:] == (width,)
            if channel and func in _ADD:
                terms = (*chained[0].terms, Term(name, False))
            elif channel:
                terms = tuple(Term(t.source, t.writer, (*t.scales, name), t.token_scaled) for t in chained[0].terms)
            elif (func in _MULTIPLY and name is None and others[0].dim() and others[0].shape[-1] == 1
                  and not self.derived_from(others[0]) & {t.source for t in chained[0].terms}):
                terms = tuple(Term(t.source, t.writer, t.scales, True) for t in chained[0].terms)
        if terms is not None:
            self.chains[id(result)] = _Chain(terms, result)
            return result
        read = frozenset(term.source for chain in chained for term in chain.terms)
        self.derived[id(result)] = (sources | read, result)
        if not self.in_norm:
            for source in read:
                self.escaped.setdefault(source, getattr(func, "__name__", str(func)))
        return result


def _writers(meta: nn.Module) -> list[str]:
    """Every module whose output is a linear map of its input by its own weights."""
    return [path for path, module in meta.named_modules() if fused_experts(module) or linear_layout(module)]


def norm_inputs(model: nn.Module, norms: Iterable[str]) -> dict[str, NormInput]:
    """For each norm, the terms its input is the sum of (see the module docstring), or why it is not one."""
    norms = list(norms)
    return on_meta_else_cpu(meta_twin(model), lambda meta, device: _norm_inputs(meta, device, norms))


def _norm_inputs(meta: nn.Module, device: str, norms: list[str]) -> dict[str, NormInput]:
    parameters = {id(p): (name, p) for name, p in meta.named_parameters(remove_duplicate=False) if p.dim() == 1}
    follower = _FollowTerms(parameters)
    seen: dict[str, list[tuple[Term, ...] | None]] = {norm: [] for norm in norms}

    def at_norm(norm: str, args: tuple) -> None:
        chain = follower.chain_of(args[0]) if args else None
        seen[norm].append(chain.terms if chain is not None else None)

    def enter_norm(*_: Any) -> None:
        follower.in_norm += 1

    def leave_norm(norm: str, args: tuple) -> None:
        follower.in_norm -= 1
        at_norm(norm, args)

    hooks = [(path, lambda m, a, o, path=path: follower.start(path, o)) for path in _writers(meta)]
    hooks += [(norm, lambda m, args, o, norm=norm: leave_norm(norm, args)) for norm in norms]
    entries = [meta.get_submodule(norm).register_forward_pre_hook(enter_norm) for norm in norms]
    try:
        synthetic_forward(meta, device, hooks, follower)
    finally:
        for handle in entries:
            handle.remove()
    return {norm: _judged(norm, found, follower) for norm, found in seen.items()}


def _judged(norm: str, found: list[tuple[Term, ...] | None], follower: _FollowTerms) -> NormInput:
    if not found:
        return NormInput(norm, reason=f"{norm} does not run on the synthetic inputs")
    if len(found) > 1:
        return NormInput(norm, reason=f"{norm} runs {len(found)} times in one forward pass, on different inputs, and "
                                      "one weight change cannot fold one stand-in into each")
    (terms,) = found
    if terms is None:
        return NormInput(norm, reason=f"the input of {norm} is not a sum of linear maps' outputs (scaled per channel "
                                      "or per token at most), so no weight change before it is its stand-in")
    sources = [term.source for term in terms]
    repeated = sorted({source for source in sources if sources.count(source) > 1})
    if repeated:
        return NormInput(norm, reason=f"{repeated[0]} reaches the input of {norm} along two paths")
    for term in terms:
        if term.source in follower.escaped:
            return NormInput(norm, reason=f"{term.source}'s part of the input of {norm} is also read by "
                                          f"{follower.escaped[term.source]}, which folding the stand-in into it "
                                          "would change too")
        if term.writer and follower.calls.get(term.source, 0) > 1:
            return NormInput(norm, reason=f"{term.source} runs {follower.calls[term.source]} times in one forward "
                                          f"pass, so folding the stand-in of {norm} into its weights would change "
                                          "its other outputs too")
        if not term.writer and follower.uses.get(term.source, 0) > 1:
            return NormInput(norm, reason=f"{term.source}, added to the input of {norm}, is read elsewhere too, so "
                                          "folding the stand-in into it would change that other use")
    return NormInput(norm, terms)


@dataclass(frozen=True)
class ReaderTensor:
    """A weight that reads a pre norm's output linearly: ``in_dim`` runs over the norm's channels; ``bias`` is the
    bias added with it (where a LayerNorm's ``beta`` folds: ``b <- b + W beta``)."""

    weight: str
    in_dim: int
    bias: str | None = None
    factor: float = 1.0  # the constant the norm's output is multiplied by on the way: the bias takes ``factor W beta``


@dataclass(frozen=True)
class NormReaders:
    """The weights that read one pre norm's output, or why its output reaches something else."""

    norm: str
    readers: tuple[ReaderTensor, ...] = ()
    reason: str = ""


class _WatchReaders(TorchFunctionMode):
    """Follows each pre norm's output through re-layouts (views, reshapes, transposes that keep the channels last) and
    products with Python numbers to the weights that read it: linear modules and fused experts called on it (their
    own forward is not looked into), and ``F.linear`` of a raw parameter (a router's weight); any other operation on
    it is recorded as foreign."""

    def __init__(self, names: dict[int, tuple[str, Tensor]]) -> None:
        super().__init__()
        self.names = names  # id(parameter) -> (state-dict key, parameter)
        self.watched: dict[int, tuple[str, Tensor, float]] = {}  # id -> (norm, tensor, constant factor so far)
        self.stack: list[bool] = []  # per running candidate module: whether it reads a watched tensor
        self.readers: dict[str, dict[ReaderTensor, None]] = {}
        self.foreign: dict[str, str] = {}

    def norm_of(self, value: Any) -> str | None:
        found = self.watched.get(id(value)) if isinstance(value, Tensor) else None
        return found[0] if found is not None and found[1] is value else None

    def factor_of(self, value: Tensor) -> float:
        return self.watched[id(value)][2]

    def watch(self, norm: str, output: Any, factor: float = 1.0) -> None:
        if isinstance(output, Tensor):
            self.watched[id(output)] = (norm, output, factor)
            self.readers.setdefault(norm, {})

    def read(self, norm: str, reader: ReaderTensor) -> None:
        """One weight reads the norm's output; one that reads it at two constant factors takes no single fold."""
        found = self.readers[norm]
        other = next((known for known in found if known.weight == reader.weight and known != reader), None)
        if other is not None:
            self.foreign.setdefault(norm, f"{reader.weight} at two scales ({other.factor:g} and {reader.factor:g})")
        found[reader] = None

    def enter(self, path: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        first = next((value for value in (*args, *kwargs.values()) if isinstance(value, Tensor)), None)
        norm = None if any(self.stack) else self.norm_of(first)
        self.stack.append(norm is not None)
        if norm is None:
            return
        width = first.shape[-1]
        factor = self.factor_of(first)
        if linear_layout(module):
            bias = f"{path}.bias" if getattr(module, "bias", None) is not None else None
            self.read(norm, ReaderTensor(f"{path}.weight", 1 if linear_layout(module) == "out_in" else 0, bias, factor))
            return
        # fused experts: the layout of down_proj, (experts, out, in) or (experts, in, out), tells the others'
        down = module.down_proj.shape
        in_dim = 2 if down[1] == width != down[2] else 1 if down[2] == width != down[1] else None
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.dim() != 3 or name.startswith("down_proj"):
                continue
            if in_dim is None or parameter.shape[in_dim] != width:
                self.foreign.setdefault(norm, f"{path}.{name} (of shape {tuple(parameter.shape)}, whose input "
                                              "dimension neither its shape nor down_proj's tells)")
                continue
            bias = f"{path}.{name}_bias" if getattr(module, f"{name}_bias", None) is not None else None
            self.read(norm, ReaderTensor(f"{path}.{name}", in_dim, bias, factor))

    def leave(self) -> None:
        self.stack.pop()

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if any(self.stack) or not isinstance(result, Tensor):  # metadata (``.shape``, ``.dtype``) carries no value
            return result
        for position, value in enumerate((*args, *kwargs.values())):
            norm = self.norm_of(value)
            if norm is None or (func in _DTYPE_TEMPLATES and position > 0):  # a router's ``w.type_as(h)``: h's dtype
                continue
            number = _constant_factor(func, args, position)
            if ((func in _PASS_THROUGH and position == 0 and result.shape[-1:] == value.shape[-1:])
                    or (func is Tensor.__getitem__ and position == 0 and _picks_tokens(value, args[1]))
                    or (func in _AXIS_MOVES and position == 0 and _keeps_channels_last(func, args, value.dim()))):
                self.watch(norm, result, self.factor_of(value))
            elif number is not None and result.shape == value.shape:
                self.watch(norm, result, self.factor_of(value) * number)
            elif func is torch.nn.functional.linear and position == 0 and self._parameter(args[1]) is not None:
                bias = self._parameter(args[2]) if len(args) > 2 else self._parameter(kwargs.get("bias"))
                self.read(norm, ReaderTensor(self._parameter(args[1]) or "", 1, bias, self.factor_of(value)))
            else:
                self.foreign.setdefault(norm, getattr(func, "__name__", str(func)))
        return result

    def _parameter(self, value: Any) -> str | None:
        found = self.names.get(id(value)) if isinstance(value, Tensor) else None
        return found[0] if found is not None and found[1] is value else None


_DIVIDE = frozenset({torch.div, Tensor.div, Tensor.__truediv__})


_AXIS_MOVES = frozenset({Tensor.transpose, torch.transpose, Tensor.swapaxes, torch.swapaxes, Tensor.permute,
                         torch.permute})


def _keeps_channels_last(func: Callable, args: tuple, dims: int) -> bool:
    """A transpose or permute that leaves the last axis, the channels, where it is (Longformer's and LED's
    ``h.transpose(0, 1)``, sequence first): the readers after it read every token's channels unchanged. One that
    moves the channels (PVT's ``permute`` before a convolution) stays foreign."""
    if func in (Tensor.permute, torch.permute):
        order = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        return (len(order) == dims and all(isinstance(axis, int) for axis in order)
                and order[-1] % dims == dims - 1)
    axes = args[1:3]
    return len(axes) == 2 and all(isinstance(axis, int) and axis % dims != dims - 1 for axis in axes)


def _picks_tokens(value: Tensor, index: Any) -> bool:
    """``value[index]`` keeps every picked token's channels whole (an MoE's ``h[token_indices]``): the index
    addresses leading axes only, so a fold of the channels reaches the picked rows unchanged."""
    items = index if isinstance(index, tuple) else (index,)
    reach = sum(item.dim() if isinstance(item, Tensor) and item.dtype is torch.bool else 1 for item in items
                if item is not None)
    return (value.dim() >= 2 and reach < value.dim() and not any(item is Ellipsis for item in items)
            and all(isinstance(item, (Tensor, int, slice)) or item is None for item in items))


def _constant_factor(func: Callable, args: tuple, position: int) -> float | None:
    """The number a product (or a division, the watched tensor first) multiplies the watched tensor at
    ``position`` by, where the other operand is a Python number; else None."""
    if len(args) != 2:
        return None
    other = args[1 - position]
    if isinstance(other, bool) or not isinstance(other, (int, float)):
        return None
    if func in _MULTIPLY:
        return float(other)
    if func in _DIVIDE and position == 0 and other != 0:
        return 1.0 / float(other)
    return None


def pre_norm_readers(model: nn.Module, norms: Iterable[str]) -> dict[str, NormReaders]:
    """For each pre norm, the weights that read its output, or why something else reads it too."""
    norms = list(norms)
    return on_meta_else_cpu(meta_twin(model), lambda meta, device: _pre_norm_readers(meta, device, norms))


def _pre_norm_readers(meta: nn.Module, device: str, norms: list[str]) -> dict[str, NormReaders]:
    watcher = _WatchReaders({id(p): (name, p) for name, p in meta.named_parameters(remove_duplicate=False)})
    handles = []
    for path in _writers(meta):  # the modules whose weights read their input linearly
        module = meta.get_submodule(path)
        handles += [module.register_forward_pre_hook(
                        lambda m, args, kwargs, path=path: watcher.enter(path, m, args, kwargs), with_kwargs=True),
                    module.register_forward_hook(lambda *_: watcher.leave())]
    try:
        synthetic_forward(meta, device, [(norm, lambda m, a, o, norm=norm: watcher.watch(norm, o)) for norm in norms],
                          watcher)
    finally:
        for handle in handles:
            handle.remove()
    return {norm: _readers_judged(norm, watcher) for norm in norms}


def _readers_judged(norm: str, watcher: _WatchReaders) -> NormReaders:
    if norm in watcher.foreign:
        return NormReaders(norm, reason=f"the output of {norm} is read by {watcher.foreign[norm]}, not only by "
                                        "linear maps, so no weight change after it is its stand-in")
    found = tuple(watcher.readers.get(norm, {}))
    if not found:
        return NormReaders(norm, reason=f"no linear map reads the output of {norm}")
    return NormReaders(norm, found)
