"""An LM head that reads the final norm through linear maps of its own (docs/design.md §5).

UltraBERT's head runs ``linear1`` (hidden_size -> prediction_head_size), an activation, ``linear2`` (back to
hidden_size), an activation and ``decoder`` (hidden_size -> vocab): only ``linear1`` reads the final norm's output.
One extra dimension makes hidden_size d+1 wherever the code uses it, so ``linear2``'s output and ``decoder``'s
input grow by one too, though they carry no stream. The map reads the norm's output into ``linear1`` as into any
reader (``W diag(g) U^T / s``) and pads the head's inner width with a unit that nothing reads: a zero row in
``linear2`` (and its bias), and, whatever the activation makes of that unit, a zero column in ``decoder``. That is
exact wherever nothing between mixes across the width; a tensor of it that is no linear map's (a norm's weight
over it) is refused here, and anything weightless that mixes is caught by the logits check. Which tensors come
after the readers is seen in the run ``trace_stream_uses`` makes, not by names.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import NormswapError
from .norm_kind import linear_layout
from .stream_roles import StreamRole, StreamUses, _grown_axes


@dataclass(frozen=True)
class HeadChain:
    """The LM head's own layers: the tensors that read the final norm's output, and the roles of those after them
    (and of the readers' own outputs) that have hidden_size's width, each padded by a unit nothing reads."""

    readers: tuple[str, ...]
    padded: Mapping[str, StreamRole]

    def describe(self) -> str:
        readers = ", ".join(dict.fromkeys(key.rpartition(".")[0] for key in self.readers))
        modules = ", ".join(dict.fromkeys(key.rpartition(".")[0] for key in self.padded))
        return (f"; the LM head reads the final norm through {readers}, and {modules} keep the "
                "head's inner width, sized by hidden_size, padded by a unit that nothing reads")


def head_chain(model: nn.Module, uses: StreamUses, final: str, head_key: str, shapes: Mapping[str, torch.Size],
               wider: Mapping[str, torch.Size], skip: Collection[str], family: str) -> HeadChain | None:
    """The head's own layers between ``final`` and ``head_key``, or None where the head reads ``final`` itself."""
    if head_key in uses.reads or head_key not in uses.coming_after(final):
        return None
    readers = tuple(key for key, found in uses.reads.items() if final in found)
    padded: dict[str, StreamRole] = {}
    for key in uses.coming_after(final):
        grown = _grown_axes(tuple(shapes[key]), wider.get(key))
        if key not in skip and key not in uses.reads and grown:
            padded[key] = _padded_role(model, key, grown, None, final, family)
    for key in readers:  # a reader whose own output is hidden_size wide (d -> d): a zero row on that side
        grown = _grown_axes(tuple(shapes[key]), wider.get(key))
        if len(grown) > 1 or (grown and key.endswith(".bias")):
            padded[key] = _padded_role(model, key, grown, final, final, family)
    return HeadChain(readers, {key: padded[key] for key in shapes if key in padded})  # in build order


def _padded_role(model: nn.Module, key: str, grown: list[int], reads: str | None, final: str,
                 family: str) -> StreamRole:
    """A linear map's tensor in the head, padded along the axes the wider code grew: its output side by a zero
    row (or zero bias), its input side by a zero column; a reader keeps its input side, read through the norm."""
    path, _, leaf = key.rpartition(".")
    layout = linear_layout(model.get_submodule(path))
    if layout is None or leaf not in ("weight", "bias"):
        raise NormswapError(f"{key} in {family}'s LM head comes after {final}'s readers and has hidden_size's "
                            f"width, but is no linear map's weight or bias ({type(model.get_submodule(path)).__name__}"
                            "): one extra dimension pads that width, which is exact only where nothing in the head "
                            "mixes across it, as a norm over it would (leave out --exact for the approximate "
                            "conversion)")
    if leaf == "bias":
        return StreamRole(grown[0], None, internal=True, head=True)
    inward = 1 if layout == "out_in" else 0
    outward = 1 - inward
    if reads is not None:  # read through the norm along its input, a zero row on its output
        return StreamRole(inward, reads, head=True, padded_input=outward)
    if outward in grown:
        return StreamRole(outward, None, internal=True, head=True, padded_input=inward if inward in grown else None)
    return StreamRole(inward, None, internal=True, head=True)

