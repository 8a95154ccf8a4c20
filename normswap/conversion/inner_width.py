"""Code that sizes an inner width by ``hidden_size`` (exact RMSNorm -> LayerNorm, docs/design.md §5).

The map writes ``hidden_size = d + 1`` for the stream. Some families read ``hidden_size`` where they mean the
attention's inner width ``heads * head_dim``, equal to ``d`` in their configs: Helium's ``o_proj`` input, OLMoE's
``q_norm``, BitNet's ``attn_sub_norm``. One dimension wider, those tensors would grow with the stream though
nothing of the stream passes through them. Which reads of ``hidden_size`` in the module's constructor are the
inner width is decided by building, not by names: each choice is generated and built, and the one whose tensor has
the shape the map makes is kept (``<config>.normswap_inner_width``, which the converted config sets to ``d``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from itertools import combinations

from torch import nn

from ..codegen.derive import owner_and_attribute
from ..codegen.edits import SizeByInnerWidth
from ..codegen.rewrite import config_width_reads


def inner_width_edits(model: nn.Module, source: str, mismatched: Mapping[str, tuple[int, ...]],
                      built_shapes: Callable[[Sequence[SizeByInnerWidth]], Mapping[str, tuple[int, ...]]]
                      ) -> tuple[SizeByInnerWidth, ...] | None:
    """The edits that give every ``mismatched`` tensor (key -> the shape the map makes) that shape, or None where
    some module's constructor has no such choice of its ``hidden_size`` reads.

    ``built_shapes(edits)`` builds the wider model with ``edits`` and returns its tensors' shapes."""
    chosen: list[SizeByInnerWidth] = []
    for key, wanted in mismatched.items():
        if chosen and _shape_after(built_shapes, chosen, key) == wanted:
            continue  # an earlier choice (the same class's, in another layer) sizes it already
        class_name, attribute = _constructed_by(model, source, key)
        reads = config_width_reads(source, class_name, attribute)
        choices = [subset for size in range(1, reads + 1) for subset in combinations(range(reads), size)]
        found = next((SizeByInnerWidth(class_name, attribute, subset) for subset in choices
                      if _shape_after(built_shapes, [*chosen, SizeByInnerWidth(class_name, attribute, subset)],
                                      key) == wanted), None)
        if found is None:
            return None
        chosen.append(found)
    return tuple(chosen)


def _shape_after(built_shapes: Callable[[Sequence[SizeByInnerWidth]], Mapping[str, tuple[int, ...]]],
                 edits: Sequence[SizeByInnerWidth], key: str) -> tuple[int, ...] | None:
    try:
        return tuple(built_shapes(edits).get(key, ()))
    except Exception:  # noqa: BLE001 - a choice the family's code cannot build with is no choice
        return None


def _constructed_by(model: nn.Module, source: str, key: str) -> tuple[str, str]:
    """The class and ``self.<attribute> = ...`` that size ``key`` from the config: its module's assignment in the
    owner's ``__init__`` (``self.q_proj = nn.Linear(...)``); for a parameter a module holds itself (a class token,
    ``self.cls_token = nn.Parameter(torch.randn(1, 1, config.hidden_size))``) that module's own assignment; where
    neither reads the config, the nearest enclosing module's that does (a module built from a width its parent
    reads: ``self.attn_sconv = ShortConvolution(config.hidden_size, ...)`` builds ``attn_sconv.conv1d``)."""
    path, _, leaf = key.rpartition(".")
    module = model.get_submodule(path)
    candidates = [(type(module).__name__, leaf)] if leaf in dict(module.named_parameters(recurse=False)) else []
    parts = path.split(".")
    candidates += [owner_and_attribute(model, ".".join(parts[:end])) for end in range(len(parts), 0, -1)]
    return next((found for found in candidates if config_width_reads(source, *found)),
                owner_and_attribute(model, path))
