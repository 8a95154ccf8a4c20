"""A conversion's weight arithmetic as a program: one step per output tensor.

Every conversion says, for each tensor of the converted checkpoint, which source tensors it reads
and how it computes from them. The same program runs in memory (over a loaded model's state dict)
and streamed (reading source tensors one at a time from disk), so the two give the same bits by
construction, and a streamed conversion never needs more than the few tensors one step reads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Step:
    """How one output tensor is made: ``compute(*(source[key] for key in reads))``.

    ``touches`` is False for a plain copy: a streamed copy passes the bytes through, and checks
    for NaN/Inf skip it. An output with no source tensor to take its dtype from (``reads`` empty)
    is cast to the checkpoint's dtype.
    """

    reads: tuple[str, ...]
    compute: Callable[..., Tensor]
    touches: bool = True


def copy_of(key: str) -> Step:
    return Step((key,), _identity, touches=False)


def constant(make: Callable[[], Tensor]) -> Step:
    """A tensor that depends on no source tensor (unit norms, carried round-trip norms, placeholders)."""
    return Step((), make)


def combine(function: Callable[..., Tensor], *steps: Step) -> Step:
    """``function(step_1(...), step_2(...), ...)``: builds on what earlier edits already made of each tensor."""
    reads = tuple(key for step in steps for key in step.reads)
    bounds = []
    start = 0
    for step in steps:
        bounds.append((step, start, start + len(step.reads)))
        start += len(step.reads)

    def compute(*tensors: Tensor) -> Tensor:
        return function(*(step.compute(*tensors[begin:end]) for step, begin, end in bounds))

    return Step(reads, compute)


def _identity(tensor: Tensor) -> Tensor:
    return tensor


@dataclass(frozen=True)
class TensorProgram:
    """The converted checkpoint's tensors (``outputs``), norms kept aside for round trips (``carried``),
    and checks that must pass on the source tensors before anything is written (each raises)."""

    outputs: Mapping[str, Step]
    carried: Mapping[str, Step] = field(default_factory=dict)
    checks: tuple[Step, ...] = ()

    def touched_reads(self) -> frozenset[str]:
        """Source tensors that some arithmetic reads (checked for NaN/Inf before a conversion uses them)."""
        steps = [*self.outputs.values(), *self.carried.values(), *self.checks]
        return frozenset(key for step in steps if step.touches for key in step.reads)


def run_step(step: Step, source: Mapping[str, Tensor] | Callable[[str], Tensor]) -> Tensor:
    get = source.__getitem__ if isinstance(source, Mapping) else source
    return step.compute(*(get(key) for key in step.reads))


def evaluate(program: TensorProgram, source: Mapping[str, Tensor], default_dtype: torch.dtype
             ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Run the whole program in memory: (outputs, carried)."""
    for check in program.checks:
        run_step(check, source)
    outputs = {key: settle(step, run_step(step, source), default_dtype) for key, step in program.outputs.items()}
    carried = {key: settle(step, run_step(step, source), default_dtype) for key, step in program.carried.items()}
    return outputs, carried


def settle(step: Step, tensor: Tensor, default_dtype: torch.dtype) -> Tensor:
    """Constants take the checkpoint's dtype, except 0-d ones (scales carried for a round trip keep their float64,
    the exact value a fold used); a copied tensor is cloned, so the result never aliases the source."""
    if not step.reads and tensor.is_floating_point() and tensor.dim() > 0:
        return tensor.to(default_dtype)
    return tensor.clone() if not step.touches else tensor


def shapes_of(state: Mapping[str, Any]) -> dict[str, torch.Size]:
    return {key: value.shape for key, value in state.items()}


def one_plus(weight: torch.Tensor) -> torch.Tensor:
    """``1 + w``, computed in fp64: the plain weight of an offset norm, ``(1 + w) * n``."""
    return (weight.double() + 1.0).to(weight.dtype)


def minus_one(weight: torch.Tensor) -> torch.Tensor:
    """``g - 1``, computed in fp64: the offset norm's weight ``w`` for a plain weight ``g``, the inverse of
    ``one_plus``."""
    return (weight.double() - 1.0).to(weight.dtype)
