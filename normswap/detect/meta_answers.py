"""Answers to the data-dependent questions that meta tensors cannot answer themselves."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class AnswerDataQuestions(TorchDispatchMode):
    """Answer the data-dependent questions that meta tensors cannot.

    * ``.item()`` / ``bool()`` answer "true" (1): mask helpers take shortcuts on checks such
      as ``padding_mask.all()``, and we answer as for an unpadded batch of one sequence.
    * ``nonzero()`` answers "none": mixture-of-experts routing then sends no token to any
      expert, which changes no module's place in the residual structure. Indexing by a boolean mask
      (``h[mask]``, ``h[mask] += v``) reads the mask through ``nonzero()`` and so selects no position.

    Only such shortcuts depend on these answers, never the layer structure that we record.
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            if func is torch.ops.aten._local_scalar_dense.default:
                dtype = args[0].dtype
                return True if dtype is torch.bool else (1.0 if dtype.is_floating_point else 1)
            if func is torch.ops.aten.nonzero.default:
                return torch.empty((0, args[0].dim()), dtype=torch.long, device="meta")
            if func in _MASK_INDEXING and any(_is_mask(index) for index in args[1]):
                indices = [part for index in args[1] for part in _positions(index)]
                return func(args[0], indices, *args[2:], **(kwargs or {}))
        return func(*args, **(kwargs or {}))


_MASK_INDEXING = frozenset({torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
                            torch.ops.aten.index_put_.default, torch.ops.aten._index_put_impl_.default})


def _is_mask(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _positions(index: Any) -> list[Any]:
    """A mask index as the integer indices its ``nonzero()`` gives (none selected); other indices as they are."""
    if not _is_mask(index):
        return [index]
    return [torch.empty(0, dtype=torch.long, device=index.device) for _ in range(index.dim())]
