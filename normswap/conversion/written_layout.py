"""A streamed conversion's outputs in the layout the target's loading starts from (``io.written_relayout``).

Outputs that transformers re-lays out under their own name when it loads the target are computed as
planned and then passed through the reverse operation, so that ``from_pretrained(DST)`` gives the converted
tensors; their planned shape is the written one. Such an output is never a byte copy of its source: the source
was read through the forward operation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from ..io.written_relayout import WrittenRelayout, written_relayouts
from .program import Step, TensorProgram


def as_written(program: TensorProgram, target: Any, order: list[str], shapes: Mapping[str, torch.Size]
               ) -> tuple[TensorProgram, dict[str, tuple[int, ...]]]:
    """``program`` with each output that loading ``target`` re-lays out written through the reverse operation,
    and every output's written shape."""
    relayouts = written_relayouts(target, order)
    written = {key: tuple(shape) for key, shape in shapes.items()}
    if not relayouts:
        return program, written
    outputs = dict(program.outputs)
    for key, relayout in relayouts.items():
        outputs[key] = _written_through(outputs[key], relayout)
        written[key] = relayout.written_shape(written[key])
    return replace(program, outputs=outputs), written


def _written_through(step: Step, relayout: WrittenRelayout) -> Step:
    def compute(*tensors: torch.Tensor) -> torch.Tensor:
        return relayout.written(step.compute(*tensors))

    return Step(step.reads, compute, touches=True)
