"""Written tensors that transformers re-lays out under their own name when it loads the output.

Qwen3-VL-MoE's conversion mapping transposes ``mlp.experts.gate_up_proj`` and ``down_proj`` while loading,
under the same names. A tensor written under such a name has to be in the layout loading starts from: the
reverse operation applied to the converted model tensor, as transformers' own ``save_pretrained`` writes it,
so that loading applies the operation again and gives the converted tensor back. Every other output is
written under its model-side name, which loading takes as it is (a split's pieces, fused experts); a written
name that loading would gather into another tensor cannot be written one tensor at a time, and is refused.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import NormswapError
from .fused_tensors import FusedTensor, blocking_operation, loading_conversions

_REFUSAL_HINT = "load the model and use normswap.convert() in Python, whose save_pretrained writes it"


@dataclass(frozen=True)
class WrittenRelayout:
    """How the output tensor ``name`` is written so that loading re-lays it out into the converted tensor."""

    name: str
    loading: FusedTensor = field(repr=False)  # what loading the output does to the written tensor (target model)
    reverse: Any = field(repr=False)  # transformers' reversed WeightConverter, a template copied per use

    def written(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor to write for the converted model tensor ``tensor``, checked to load back as it, bit for bit
        (on the meta device, by shape)."""
        converter = copy.deepcopy(self.reverse)
        converter.add_tensor(self.name, self.name, converter.source_patterns[0], lambda: tensor)
        built = converter.convert(self.name, model=self.loading.model, config=self.loading.model.config)
        if self.name not in built:
            raise NormswapError(f"transformers' reverse of its loading operations on {self.name!r} gave "
                                f"{', '.join(sorted(built)[:3])}, not that name; {_REFUSAL_HINT}")
        value = built[self.name]
        value = value[0] if isinstance(value, list) else value
        loaded = self.loading.build(lambda _: value)
        if not _same_bits(loaded, tensor):
            raise NormswapError(f"{self.name!r} written through the reverse of transformers' "
                                f"{_operations(self.loading.converter)} would not load back as the converted tensor; "
                                f"{_REFUSAL_HINT}")
        return value.contiguous()

    def written_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The written tensor's shape for a converted tensor of ``shape``."""
        return tuple(self.written(torch.empty(shape, device="meta")).shape)


def written_relayouts(target: Any, names: Iterable[str]) -> dict[str, WrittenRelayout]:
    """The output ``names`` that loading into ``target`` (the target class on the meta device) re-lays out
    under their own name, each with how it is written; refuses names loading would build other tensors from."""
    relayouts = {}
    for name, loading in loading_conversions(target, names).items():
        if not isinstance(loading, FusedTensor):
            continue  # a renaming, not an operation on the values
        converter = loading.converter
        if loading.parts != (name,) or len(converter.source_patterns) != 1 or len(converter.target_patterns) != 1:
            raise NormswapError(f"transformers would build {name!r} from the written {loading.parts[0]!r} with "
                                f"{_operations(converter)} when loading the output, where normswap writes each "
                                f"tensor under its model-side name; {_REFUSAL_HINT}")
        blocking = blocking_operation(converter, target)
        if blocking is not None:
            raise NormswapError(f"transformers re-lays out {name!r} with {blocking} when loading the output, which "
                                f"normswap cannot apply one tensor at a time; {_REFUSAL_HINT}")
        try:
            reverse = converter.reverse_transform()
        except (NotImplementedError, ValueError):
            raise NormswapError(f"transformers re-lays out {name!r} with {_operations(converter)} when loading the "
                                f"output, and has no reverse operation to write it with; {_REFUSAL_HINT}") from None
        relayouts[name] = WrittenRelayout(name, loading, reverse)
    return relayouts


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and dtype, and (off the meta device) the same bytes: NaN equals itself, as a copy keeps it."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_meta or b.is_meta:
        return True
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _operations(converter: Any) -> str:
    return " + ".join(repr(operation) for operation in getattr(converter, "operations", ())) or "a conversion"
