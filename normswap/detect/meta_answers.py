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
      expert, which changes no module's place in the residual structure.

    Only such shortcuts depend on these answers, never the layer structure that we record.
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            if func is torch.ops.aten._local_scalar_dense.default:
                dtype = args[0].dtype
                return True if dtype is torch.bool else (1.0 if dtype.is_floating_point else 1)
            if func is torch.ops.aten.nonzero.default:
                return torch.empty((0, args[0].dim()), dtype=torch.long, device="meta")
        return func(*args, **(kwargs or {}))
