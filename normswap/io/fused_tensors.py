"""Model tensors that transformers builds from several checkpoint tensors while loading, built one at a time.

transformers 5 fuses a mixture-of-experts layer's experts into one 3-D parameter per projection
(``experts.gate_up_proj``, ``experts.down_proj``), while checkpoints, its own ``save_pretrained`` output
included, keep one tensor per expert (``experts.N.w1``/``w3``/``w2`` or ``experts.N.gate_proj``/...).
Its conversion mapping (``WeightConverter`` with ``MergeModulelist``, ``Concatenate``) says how to fuse
them. Streaming applies that same mapping, through transformers' own objects, only when a conversion step
reads the fused tensor: memory then holds one fused tensor and its parts, never the model. Operations that
read the model's parameter shapes (``Split``, ``Transpose(check_dims=True)``) or its config
(``PermuteForRope``) are given the weightless meta-device model of the config, as ``from_pretrained`` gives
them the model it loads into.
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
_LAZY_NAMES = ("MergeModulelist", "Concatenate", "Transpose", "Interleave", "Chunk", "Split",
               "PermuteForRope")  # see blocking_operation


@dataclass(frozen=True)
class FusedTensor:
    """One model tensor that transformers' ``converter`` builds from checkpoint tensors, by source pattern."""

    name: str  # the model-side name, after transformers' renamings
    sources: tuple[tuple[str, tuple[str, ...]], ...]  # (source pattern, its checkpoint tensors in loading order)
    converter: Any = field(repr=False)  # transformers' WeightConverter, used as a template (copied per build)
    model: Any = field(default=None, repr=False, compare=False)  # the meta model Split and PermuteForRope read
    layer_name: str = ""  # the name transformers converts under: a split's first piece's (default: ``name``)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(name for _, names in self.sources for name in names)

    def build(self, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The fused tensor, from its parts as ``read`` gives them, by transformers' own operations."""
        converter = copy.deepcopy(self.converter)
        for pattern, names in self.sources:
            for name in names:  # transformers' synchronous loading: a callable per tensor, called when converting
                converter.add_tensor(self.name, name, pattern, functools.partial(read, name))
        config = getattr(self.model, "config", None)
        built = converter.convert(self.layer_name or self.name, model=self.model, config=config)
        if self.name in built:  # a split (Chunk, Split) builds every piece: this tensor is the one under its name
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
        blocking = blocking_operation(self.converter, self.model)
        if blocking is not None:
            more = f" and {len(self.parts) - 1} more" if len(self.parts) > 1 else ""
            raise SourceError(f"transformers builds {self.name!r} from the checkpoint's {self.parts[0]!r}{more} with "
                              f"{blocking} while loading, which normswap cannot apply one tensor at a time (it "
                              f"streams {', '.join(_LAZY_NAMES)}); {_REFUSAL_HINT}")
        try:
            meta = self.build(lambda name: torch.empty(parts[name][1], dtype=parts[name][0], device="meta"))
        except (RuntimeError, ValueError, IndexError, AttributeError) as error:
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


def blocking_operation(converter: Any, model: Any = None) -> str | None:
    """The first of the converter's operations streaming cannot apply, as ``Name(args)``, or None.

    Streamed are operations that are a function of the gathered tensors alone (stacking experts,
    concatenating, transposing, interleaving, splitting one checkpoint tensor into several model tensors:
    ``Chunk``, each piece built from the whole and the others dropped), and, given the meta ``model``, those
    that read its parameter shapes (``Split``, ``Transpose(check_dims=True)``) or its config
    (``PermuteForRope``). Dequantizing, and splits whose pieces' names come from the config, are not.
    """
    from transformers import core_model_loading as ops

    for operation in converter.operations:
        if type(operation) in (ops.Split, ops.PermuteForRope):
            if model is None:
                return repr(operation)
            continue
        if type(operation) not in (ops.MergeModulelist, ops.Concatenate, ops.Transpose, ops.Interleave, ops.Chunk):
            return repr(operation)
        if isinstance(operation, ops.Transpose) and operation.check_dims and model is None:
            return "Transpose(check_dims=True)"
        if isinstance(operation, ops.Chunk) and getattr(operation, "num_shards_attribute", None):
            return repr(operation)  # the pieces' number and names come from the config
    splits = any(type(operation) in (ops.Chunk, ops.Split) for operation in converter.operations)
    if len(converter.target_patterns) != 1 and not splits:
        return " + ".join(repr(operation) for operation in converter.operations)
    return None


def loading_conversions(model: Any, names: Iterable[str]) -> dict[str, str | FusedTensor]:
    """For each model-side name transformers gives checkpoint tensors while loading ``model``, the checkpoint
    tensor it renames (``embed_out`` -> ``lm_head``) or the ``FusedTensor`` it builds from several.

    The renaming and grouping are transformers' own (``rename_source_key``, tensors in ``dot_natural_key``
    order, as ``from_pretrained`` gathers them), so experts fuse in the order transformers fuses them. A
    fused tensor's name takes the model's base-model prefix where the checkpoint's lacks it (or has one the
    model lacks), as ``from_pretrained`` renames it, so that operations reading the model find its parameters.
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
    keys = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") or ""
    for new, sources in gathered.items():
        converter = by_pattern[next(iter(sources))]
        parts = tuple((pattern, tuple(found)) for pattern, found in sources.items())
        layer_name = _model_spelling(new, keys, prefix)
        for target in converter.target_patterns:  # a split names each of its pieces
            name = layer_name.replace(converter.target_patterns[0], target)
            result[name] = FusedTensor(name, parts, converter, model, layer_name)
    return result


def _model_spelling(name: str, keys: set[str], prefix: str) -> str:
    """``name`` with the base-model prefix added or dropped where only that spelling is a key of the model
    (transformers' own fix-up in ``rename_source_key``)."""
    if not prefix or name in keys:
        return name
    if name.startswith(f"{prefix}.") and name.removeprefix(f"{prefix}.") in keys:
        return name.removeprefix(f"{prefix}.")
    if f"{prefix}.{name}" in keys:
        return f"{prefix}.{name}"
    return name
