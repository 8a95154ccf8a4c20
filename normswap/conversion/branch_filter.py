"""A per-channel filter on a branch's output, kept d wide with a fixed lift after it (docs/design.md §5).

Some branches pass their output through a depthwise convolution over time before the residual add (Inkling's
short convolutions, ``x + conv_c(x)`` with a kernel of its own per channel). One dimension wider the stream is
``U h``, and ``U (k_c * x_c)`` is no per-channel filter of ``U x`` unless every channel's kernel is the same, so
the filter cannot be lifted. It is kept d wide: in the generated code the module that holds it reads the branch's
output (lifted as any writer's) through a fixed ``U^T`` (``normswap_stream_unlift_<module>``) and hands its own on
through a fixed ``U`` (``normswap_stream_lift_<module>``) into the wider stream. Which modules filter is decided by
behaviour: a convolution inside a branch, with one group per channel, that the wider code grows with the stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from ..codegen.edits import STREAM_LIFT, STREAM_UNLIFT
from ..topology import Topology
from .stream_roles import StreamRole


@dataclass(frozen=True)
class BranchFilter:
    """The module that filters one branch's output (a child of its layer), and its tensors, kept d wide."""

    module: str
    kept: tuple[str, ...]

    @property
    def attribute(self) -> str:
        """The layer's attribute that holds the filter."""
        return self.module.rpartition(".")[2]

    @property
    def lift(self) -> str:
        """The fixed U after the filter, on the layer beside it."""
        return f"{self.module.rpartition('.')[0]}.{lift_attribute(self.attribute)}"

    @property
    def unlift(self) -> str:
        """The fixed U^T before the filter, on the layer beside it."""
        return f"{self.module.rpartition('.')[0]}.{unlift_attribute(self.attribute)}"


def lift_attribute(attribute: str) -> str:
    return f"{STREAM_LIFT}_{attribute}"


def unlift_attribute(attribute: str) -> str:
    return f"{STREAM_UNLIFT}_{attribute}"


def branch_filters(model: nn.Module, topology: Topology, roles: Mapping[str, StreamRole]) -> list[BranchFilter]:
    """Each branch whose output a depthwise convolution filters: the layer's child that holds the filter, and its
    tensors, which keep width d."""
    found: list[BranchFilter] = []
    for layer in topology.layers:
        for sub in layer.sublayers:
            for branch in sub.branches:
                writers = [key for key, role in roles.items() if role.reads is None and not role.internal
                           and any(key.startswith(module + ".") for module in branch.modules)]
                filters = [key for key in writers if _depthwise(model, key)]
                holders = {key[len(layer.path) + 1:].split(".", 1)[0] for key in filters}
                if len(holders) == 1:
                    holder = f"{layer.path}.{holders.pop()}"
                    found.append(BranchFilter(holder, tuple(key for key in roles if key.startswith(holder + "."))))
    return found


def _depthwise(model: nn.Module, key: str) -> bool:
    module = model.get_submodule(key.rpartition(".")[0])
    return (isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)
