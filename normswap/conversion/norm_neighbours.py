"""What a removed norm's stand-in folds into, found by behaviour (docs/design.md §6): no family names.

* An ``out`` norm (``h + N(F(h))``) reads the branch's output. Its input must be a sum of terms, each a
  linear map's output (an ``nn.Linear``, a GPT-2 ``Conv1D``, fused MoE experts) or a ``(d,)`` parameter
  added outside one, possibly multiplied on the way by ``(d,)`` parameters (LayerScale) or by a per-token
  scalar (a shared expert's gate): then ``diag(g/s) [C]`` distributes over the sum, and scaling every term
  is exact. ``norm_inputs`` follows every linear map's output through such operations, merging sums (routed
  experts plus a shared expert), and records the terms that reach each norm's input.
* A ``pre`` norm (``h + F(N(h))``) must be read by linear maps only: ``pre_norm_consumers`` reports any
  other operation on its output (a view before a router, the residual taken after the norm), which a fold
  into the readers' weights could not reach.

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
from .branch_scale import _ADD, _MULTIPLY, _PARAMETER_VIEWS, _PASS_THROUGH
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

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        operands = [value for value in (*args, *kwargs.values()) if isinstance(value, Tensor)]
        chained = [chain for chain in map(self.chain_of, operands) if chain is not None]
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
        elif func in _PASS_THROUGH and len(chained) == 1 and result.shape[-1:] == chained[0].tensor.shape[-1:]:
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
            elif func in _MULTIPLY and name is None and others[0].dim() and others[0].shape[-1] == 1:
                terms = tuple(Term(t.source, t.writer, t.scales, True) for t in chained[0].terms)
        elif func is Tensor.type_as and len(chained) == 1:
            terms = chained[0].terms
        if terms is not None:
            self.chains[id(result)] = _Chain(terms, result)
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

    hooks = [(path, lambda m, a, o, path=path: follower.start(path, o)) for path in _writers(meta)]
    hooks += [(norm, lambda m, args, o, norm=norm: at_norm(norm, args)) for norm in norms]
    synthetic_forward(meta, device, hooks, follower)
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
        if term.writer and follower.calls.get(term.source, 0) > 1:
            return NormInput(norm, reason=f"{term.source} runs {follower.calls[term.source]} times in one forward "
                                          f"pass, so folding the stand-in of {norm} into its weights would change "
                                          "its other outputs too")
        if not term.writer and follower.uses.get(term.source, 0) > 1:
            return NormInput(norm, reason=f"{term.source}, added to the input of {norm}, is read elsewhere too, so "
                                          "folding the stand-in into it would change that other use")
    return NormInput(norm, terms)


class _WatchConsumers(TorchFunctionMode):
    """Records each operation on a watched norm output that does not happen inside one of its linear readers."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, tuple[str, Tensor]] = {}
        self.reading = 0  # depth of reader forwards running
        self.foreign: dict[str, str] = {}

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.reading or not isinstance(result, Tensor):  # metadata (``.shape``, ``.dtype``) carries no value
            return result
        for value in (*args, *kwargs.values()):
            found = self.watched.get(id(value)) if isinstance(value, Tensor) else None
            if found is not None and found[1] is value:
                self.foreign.setdefault(found[0], getattr(func, "__name__", str(func)))
        return result


def pre_norm_consumers(model: nn.Module, readers: dict[str, list[str]]) -> dict[str, str]:
    """For each norm whose output some operation reads outside its linear ``readers``, that operation's name."""
    return on_meta_else_cpu(meta_twin(model), lambda meta, device: _consumers(meta, device, readers))


def _consumers(meta: nn.Module, device: str, readers: dict[str, list[str]]) -> dict[str, str]:
    watcher = _WatchConsumers()
    handles = []
    for path in {reader for found in readers.values() for reader in found}:
        module = meta.get_submodule(path)

        def enter(*_: Any) -> None:
            watcher.reading += 1

        def leave(*_: Any) -> None:
            watcher.reading -= 1

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def watch(norm: str, output: Any) -> None:
        if isinstance(output, Tensor):
            watcher.watched[id(output)] = (norm, output)

    try:
        synthetic_forward(meta, device, [(norm, lambda m, a, o, norm=norm: watch(norm, o)) for norm in readers],
                          watcher)
    finally:
        for handle in handles:
            handle.remove()
    return watcher.foreign
