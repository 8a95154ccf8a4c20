"""When two layers are the same: the key that lets 80 identical layers be run and traced once.

Two layers with equal signatures have the same module tree, the same module classes and the
same plain attributes (flags such as ``is_sliding`` can switch code paths). An int attribute
equal to the layer's own index (``layer_idx``) is abstracted, or no two layers would match.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

_PLAIN = (bool, int, float, str, type(None))


def module_signature(layer: nn.Module, index: int) -> tuple[Any, ...]:
    """The layer's class, module tree and plain attributes, with its own index abstracted."""
    return (type(layer), tuple((path, type(module).__name__, _plain_attributes(module, index))
                               for path, module in layer.named_modules()))


def input_signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Shapes and dtypes of the tensors a layer is called with, and the types of everything else."""
    def describe(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return (tuple(value.shape), value.dtype)
        return type(value).__name__

    return (tuple(describe(leaf) for leaf in tree_leaves(args)),
            tuple((key, tuple(describe(leaf) for leaf in tree_leaves(value))) for key, value in sorted(kwargs.items())))


def _plain_attributes(module: nn.Module, index: int) -> tuple[tuple[str, Any], ...]:
    items = []
    for name, value in vars(module).items():
        if name.startswith("_") or not isinstance(value, _PLAIN):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value == index:
            value = "<layer index>"
        items.append((name, value))
    return tuple(sorted(items, key=lambda item: item[0]))
