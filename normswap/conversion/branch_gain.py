"""A per-channel gain on a branch's output (layer scale), folded into the branch's writers (docs/design.md §5).

A branch that multiplies its output by a learned vector before the residual add (``h + lambda * F(x)``: DINOv2's
and Sapiens2's layer scale) writes ``lambda * (W a + b)``. One dimension wider the stream is ``U h``, and ``U
(lambda * x)`` is no per-channel gain of ``U x`` unless lambda is constant; but the gain folds into what it
scales: ``W -> U diag(lambda) W``, ``b -> U (lambda * b)``, and the gain becomes 1 over d + 1. Which vectors are
gains is decided by behaviour: a 1-d tensor of the stream's width inside a branch, no linear map's weight and no
bias (JetMoE adds one to its mixture of attention heads' output, a writer of its own), that the wider code grows
and that reads no norm. The numerical check confirms that it scales the branch's output.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..topology import Topology
from .norm_kind import linear_layout
from .stream_roles import StreamRole


def branch_gains(model: nn.Module, topology: Topology, roles: Mapping[str, StreamRole],
                 shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[str, ...]]:
    """Each branch gain, with the writers of its branch whose outputs it scales (the tensors its fold changes)."""
    gains: dict[str, tuple[str, ...]] = {}
    for layer in topology.layers:
        for sub in layer.sublayers:
            for branch in sub.branches:
                keys = [key for key, role in roles.items() if role.reads is None and not role.internal
                        and any(key.startswith(module + ".") for module in branch.modules)]
                found = [key for key in keys if len(shapes[key]) == 1 and key.rpartition(".")[2] != "bias"
                         and not _of_linear_map(model, key)]
                writers = tuple(key for key in keys if key not in found)
                if len(found) == 1 and writers:
                    gains[found[0]] = writers
    return gains


def _of_linear_map(model: nn.Module, key: str) -> bool:
    path, _, leaf = key.rpartition(".")
    return leaf in ("weight", "bias") and linear_layout(model.get_submodule(path)) is not None
