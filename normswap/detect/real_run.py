"""A CPU twin of a meta model, for the forwards that meta tensors cannot run.

Some forwards ask their data questions in ways no dispatch answer keeps consistent: JetMoE sizes
``torch.split`` by ``expert_size.tolist()``, Longformer's sliding-window attention checks shapes that
follow from an ``.item()`` count, ImageGPT mixes a CPU constant into a meta op. A real run answers them
all as the model itself would. Its weights are drawn, not read: detection needs the call structure,
which no value changes, and a twin of the same class and config has that structure.

A twin costs its full size in memory, so only models up to ``REAL_RUN_BYTES`` get one; larger ones are
refused with the step that needed data and the size a real run would take.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils._pytree import tree_map

Result = TypeVar("Result")

REAL_RUN_BYTES = 2 * 1024**3  # fp32 parameters and buffers of the CPU twin at most


def real_run_bytes(model: nn.Module) -> int:
    """What the twin's parameters and buffers take in fp32."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() for t in tensors) * 4


def cpu_twin(model: nn.Module, config: Any) -> nn.Module:
    """A CPU model of ``model``'s class and config with seeded weights (the caller checks the size first)."""
    options = {"experts_implementation": "eager"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with torch.device("cpu"):
            twin = type(model)._from_config(copy.deepcopy(config), dtype=torch.float32, **options)
    return twin.eval()


def to_meta(value: Any) -> Any:
    """``value`` with every tensor replaced by a meta tensor of its shape and dtype (what tracing runs on)."""
    return tree_map(lambda leaf: leaf.to("meta") if isinstance(leaf, torch.Tensor) else leaf, value)


def on_meta_else_cpu(meta: nn.Module, attempt: Callable[[nn.Module, str], Result]) -> Result:
    """``attempt(model, device)`` on the meta model; where the family's forward cannot run on meta tensors, once
    more on a CPU twin (when one fits ``REAL_RUN_BYTES``), and the twin's failure is the one reported."""
    try:
        return attempt(meta, "meta")
    except Exception:
        if real_run_bytes(meta) > REAL_RUN_BYTES:
            raise
    return attempt(cpu_twin(meta, meta.config), "cpu")
