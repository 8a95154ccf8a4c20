"""Model tensors that transformers builds from several checkpoint tensors while loading, built one at a time.

transformers 5 fuses a mixture-of-experts layer's experts into one 3-D parameter per projection
(``experts.gate_up_proj``, ``experts.down_proj``), while checkpoints, its own ``save_pretrained`` output
included, keep one tensor per expert (``experts.N.w1``/``w3``/``w2`` or ``experts.N.gate_proj``/...).
Its conversion mapping (``WeightConverter`` with ``MergeModulelist``, ``Concatenate``) says how to fuse
them. Streaming applies that same mapping, through transformers' own objects, only when a conversion step
reads the fused tensor: memory then holds one fused tensor and its parts, never the model.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import SourceError

_REFUSAL_HINT = "load the model and use normswap.convert() in Python"
_LAZY_NAMES = ("MergeModulelist", "Concatenate", "Transpose", "Interleave", "Chunk")  # see _blocking_operation


@dataclass(frozen=True)
class FusedTensor:
    """One model tensor that transformers' ``converter`` builds from checkpoint tensors, by source pattern."""

    name: str  # the model-side name, after transformers' renamings
    sources: tuple[tuple[str, tuple[str, ...]], ...]  # (source pattern, its checkpoint tensors in loading order)
    converter: Any = field(repr=False)  # transformers' WeightConverter, used as a template (copied per build)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(name for _, names in self.sources for name in names)

    def build(self, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The fused tensor, from its parts as ``read`` gives them, by transformers' own operations."""
        converter = copy.deepcopy(self.converter)
        for pattern, names in self.sources:
            for name in names:  # transformers' synchronous loading: a callable per tensor, called when converting
                converter.add_tensor(self.name, name, pattern, functools.partial(read, name))
        built = converter.convert(self.name)
        if self.name in built:  # a split (Chunk) builds every piece: this tensor is the one under its name
            value = built[self.name]
        elif len(built) == 1:
            value = next(iter(built.values()))
        else:
            raise SourceError(f"transformers built {len(built)} tensors ({', '.join(sorted(built)[:3])}) for "
                              f"{self.name!r}, none under that name; {_REFUSAL_HINT}")
        return value[0] if isinstance(value, list) else value

    def describe(self, parts: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> tuple[torch.dtype,
                                                                                          tuple[int, ...]]:
        """The fused tensor's dtype and shape from its parts' (``parts[name]``), by the same operations run on
        the meta device; refuses operations that cannot be applied one fused tensor at a time."""
        blocking = _blocking_operation(self.converter)
        if blocking is not None:
            more = f" and {len(self.parts) - 1} more" if len(self.parts) > 1 else ""
            raise SourceError(f"transformers builds {self.name!r} from the checkpoint's {self.parts[0]!r}{more} with "
                              f"{blocking} while loading, which normswap cannot apply one tensor at a time (it "
                              f"streams {', '.join(_LAZY_NAMES)}); {_REFUSAL_HINT}")
        try:
            meta = self.build(lambda name: torch.empty(parts[name][1], dtype=parts[name][0], device="meta"))
        except (RuntimeError, ValueError, IndexError) as error:
            why = self._odd_part(parts) or str(error).strip().splitlines()[0][:160]
            raise SourceError(f"the checkpoint tensors transformers fuses into {self.name!r} do not fit together "
                              f"({why}); the checkpoint is damaged or does not belong to this config.json") from None
        return meta.dtype, tuple(meta.shape)

    def _odd_part(self, parts: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> str | None:
        """The part whose shape differs from its siblings' (one per expert), said as such, or None."""
        for _, names in self.sources:
            shapes = [tuple(parts[name][1]) for name in names]
            common = max(set(shapes), key=shapes.count)
            odd = next((name for name, shape in zip(names, shapes, strict=True) if shape != common), None)
            if odd is not None:
                return (f"{odd!r} has shape {tuple(parts[odd][1])} where the other {shapes.count(common)} have "
                        f"{common}")
        return None


def _blocking_operation(converter: Any) -> str | None:
    """The first of the converter's operations streaming cannot apply, as ``Name(args)``, or None.

    Streamed are operations that are a function of the gathered tensors alone: stacking experts,
    concatenating, transposing, interleaving, and splitting one checkpoint tensor into several model tensors
    (``Chunk``: each piece is built from the whole and the others dropped, so a split tensor is read once per
    piece). Those that read the model or the config, or dequantize, are not.
    """
    from transformers.core_model_loading import Chunk, Concatenate, Interleave, MergeModulelist, Transpose

    for operation in converter.operations:
        if type(operation) not in (MergeModulelist, Concatenate, Transpose, Interleave, Chunk):
            return repr(operation)
        if isinstance(operation, Transpose) and operation.check_dims:
            return "Transpose(check_dims=True)"
        if isinstance(operation, Chunk) and getattr(operation, "num_shards_attribute", None):
            return repr(operation)  # the number of pieces comes from the config
    splits = any(isinstance(operation, Chunk) for operation in converter.operations)
    if len(converter.target_patterns) != 1 and not splits:
        return " + ".join(repr(operation) for operation in converter.operations)
    return None


def loading_conversions(model: Any, names: Iterable[str]) -> dict[str, str | FusedTensor]:
    """For each model-side name transformers gives checkpoint tensors while loading ``model``, the checkpoint
    tensor it renames (``embed_out`` -> ``lm_head``) or the ``FusedTensor`` it builds from several.

    The renaming and grouping are transformers' own (``rename_source_key``, tensors in ``dot_natural_key``
    order, as ``from_pretrained`` gathers them), so experts fuse in the order transformers fuses them.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    result: dict[str, str | FusedTensor] = {}
    gathered: dict[str, dict[str, list[str]]] = {}
    for name in sorted(names, key=dot_natural_key):
        new, pattern = rename_source_key(name, renamings, converters)
        if pattern is not None:
            gathered.setdefault(new, {}).setdefault(pattern, []).append(name)
        elif new != name:
            result[new] = name
    for new, sources in gathered.items():
        converter = by_pattern[next(iter(sources))]
        parts = tuple((pattern, tuple(found)) for pattern, found in sources.items())
        for target in converter.target_patterns:  # a split names each of its pieces
            name = new.replace(converter.target_patterns[0], target)
            result[name] = FusedTensor(name, parts, converter)
    return result
