"""What a removed norm leaves in a generated checkpoint: a 0-d tensor under each of its parameters' names.

The generated ``NormswapRemovedNorm`` (codegen/package.py) keeps them so that loading the checkpoint into the stock
class fails with a size mismatch: transformers' loader compares shapes exactly, and the stock norm's parameters are
vectors (codegen refuses to remove a norm with a 0-d parameter, which would take one silently). They are 0-d rather
than empty so that every tensor of the state dict has a value, and a reduction over each one works. Checkpoints of
earlier normswap versions hold empty tensors there; a conversion writes the 0-d ones in their place.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .program import Step, TensorProgram, constant

REMOVED_NORM_CLASS = "NormswapRemovedNorm"


def removed_norm_tensor() -> torch.Tensor:
    """The value under each removed parameter's name: 1.0, the gain the removed norm now applies."""
    return torch.tensor(1.0)


def removed_norm_step() -> Step:
    return constant(removed_norm_tensor)


def removed_norm_keys(model: nn.Module) -> frozenset[str]:
    """The state-dict keys of the removed norms' tensors in ``model`` (a generated class, on any device)."""
    return frozenset(f"{path}.{name}" if path else name for path, module in model.named_modules()
                     if type(module).__name__ == REMOVED_NORM_CLASS
                     for name, _ in module.named_buffers(recurse=False))


def with_removed_norm_tensors(program: TensorProgram, target: nn.Module) -> TensorProgram:
    """``program`` writing the placeholder's 0-d tensors under ``target``'s removed-norm keys, whatever it made
    there: a copy of a source of an earlier normswap version is empty."""
    keys = removed_norm_keys(target) & set(program.outputs)
    if not keys:
        return program
    return replace(program, outputs={**program.outputs, **{key: removed_norm_step() for key in keys}})
