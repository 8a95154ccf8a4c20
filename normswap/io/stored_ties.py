"""Tied tensors that a checkpoint stores apart, with other values: untied, as transformers' loader unties them.

T5 v1.1, Flan-T5, mT5 and UMT5 checkpoints store ``lm_head.weight`` beside ``shared.weight`` with values of its
own, under a config class that ties the two whatever it is given; transformers then loads them untied (it warns,
and ties only tensors whose stored values agree). A weightless model built from config.json ties them, so a
conversion planned on it would read the head from the embedding. ``untie_stored_copies`` makes the weightless
model the one loading gives.
"""

from __future__ import annotations

from dataclasses import replace
from typing import BinaryIO

import torch
from torch import nn

from .safetensors_file import read_bytes, tensor_from_bytes
from .source_weights import CheckpointWeights, SourceTensor, spellings

_CHUNK_BYTES = 64 * 1024**2  # compared a slice at a time: two vocabulary tables need not fit in memory at once


def untie_stored_copies(model: nn.Module, weights: CheckpointWeights) -> tuple[str, ...]:
    """Give each tied tensor of the weightless ``model`` that ``weights`` stores apart, with other values than the
    tensor it is tied to, a tensor of its own; returns their keys."""
    expanded = getattr(model, "get_expanded_tied_weights_keys", None)
    tied = expanded(all_submodels=True) if callable(expanded) else {}
    prefix = getattr(model, "base_model_prefix", "")
    untied = []
    for target, source in tied.items():
        stored = [_stored(weights, key, prefix) for key in (target, source)]
        if None in stored or stored[0] == stored[1] or _equal(weights, *stored):  # type: ignore[arg-type]
            continue
        owner, _, leaf = target.rpartition(".")
        module = model.get_submodule(owner)
        shared = getattr(module, leaf)
        setattr(module, leaf, nn.Parameter(torch.empty_like(shared, device="meta"), requires_grad=False))
        untied.append(target)
    if untied and isinstance(getattr(model, "all_tied_weights_keys", None), dict):
        model.all_tied_weights_keys = {k: v for k, v in model.all_tied_weights_keys.items() if k not in untied}
    return tuple(untied)


def _stored(weights: CheckpointWeights, key: str, prefix: str) -> str | None:
    """The checkpoint's name for the model's ``key``, None where it does not store it."""
    return next((name for name in spellings(key, prefix) if name in weights.tensors and name not in weights.fused),
                None)


def _equal(weights: CheckpointWeights, first: str, second: str) -> bool:
    """``torch.equal`` of two stored tensors, as transformers compares tied ones, a slice of rows at a time."""
    a, b = weights.tensors[first], weights.tensors[second]
    if a.shape != b.shape:
        return False
    if a.entry is None or b.entry is None or not a.shape:  # a .bin pickle is in memory already
        return torch.equal(*_common(weights.read(first), weights.read(second)))
    rows = max(1, _CHUNK_BYTES // max(1, a.nbytes // a.shape[0]))
    with a.entry.file.open("rb") as one, b.entry.file.open("rb") as other:
        for start in range(0, a.shape[0], rows):
            count = min(rows, a.shape[0] - start)
            if not torch.equal(*_common(_rows(a, one, start, count), _rows(b, other, start, count))):
                return False
    return True


def _rows(tensor: SourceTensor, handle: BinaryIO, start: int, count: int) -> torch.Tensor:
    """Rows ``start`` to ``start + count`` of a stored tensor, read from its open file."""
    entry = tensor.entry
    assert entry is not None
    row_bytes = entry.nbytes // tensor.shape[0]
    begin = entry.begin + start * row_bytes
    shape = (count, *tensor.shape[1:])
    part = replace(entry, shape=shape, begin=begin, end=begin + count * row_bytes)
    return tensor_from_bytes(read_bytes(part, handle), tensor.dtype, shape)


def _common(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both in one dtype (transformers compares them in the model's)."""
    dtype = torch.promote_types(first.dtype, second.dtype)
    return first.to(dtype), second.to(dtype)
