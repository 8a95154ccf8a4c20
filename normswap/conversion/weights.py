"""Apply a plan's norm moves to a state dict. Every other tensor keeps its name and its bits.

Norm weights move between slots unchanged (a move is a rename), so a round trip through the
inverse plan returns bit-identical tensors. A norm the target has no slot for is *carried*:
kept aside under its source name, so that converting back can restore it bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import NormswapError
from .plan import ConversionPlan


class WeightMappingError(NormswapError):
    """The converted tensors do not fit the target model."""


def norm_tensors(state: Mapping[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """The parameters of the norm module at ``path``: ``{"weight": ..., "bias": ...}``."""
    prefix = f"{path}."
    return {key[len(prefix):]: value for key, value in state.items()
            if key.startswith(prefix) and "." not in key[len(prefix):]}


def apply_plan(state: Mapping[str, torch.Tensor], plan: ConversionPlan,
               target_shapes: Mapping[str, torch.Size], carried: Mapping[str, torch.Tensor] | None = None,
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The target state dict, and the tensors of dropped norms (carried for round trips).

    ``target_shapes`` lists every tensor the target model expects; the result must fill exactly
    those, or the mapping is wrong and we say which tensors do not fit.
    """
    carried = dict(carried or {})
    moved_sources = {move.source for stack in plan.stacks for move in stack.moves if move.source}
    result = {key: value for key, value in state.items()
              if not any(key.startswith(f"{path}.") and "." not in key[len(path) + 1:] for path in moved_sources)}
    dropped: dict[str, torch.Tensor] = {}

    for stack in plan.stacks:
        for move in stack.moves:
            if move.target is None:
                dropped.update({f"{move.source}.{name}": t for name, t in norm_tensors(state, move.source).items()})
                continue
            wanted = norm_tensors(target_shapes, move.target)  # type: ignore[arg-type]
            restored = norm_tensors(carried, move.target) if move.source is None or move.copy else {}
            if restored:  # this slot's own norm, dropped by an earlier conversion: restore it bit for bit
                source = restored
            elif move.source is None:
                source = None
            else:
                source = norm_tensors(state, move.source)
            for name, shape in wanted.items():
                result[f"{move.target}.{name}"] = _fill(source, name, shape, move.target, move.target_kind)
            if source:
                _check_nothing_lost(source, wanted, move.source or move.target)
        for path, kind in stack.unit_norms:
            restored = norm_tensors(carried, path)
            for name, shape in norm_tensors(target_shapes, path).items():  # type: ignore[arg-type]
                result[f"{path}.{name}"] = _fill(restored or None, name, shape, path, kind)

    reference = next(iter(state.values()))
    for key, shape in target_shapes.items():  # removed-norm placeholders hold empty tensors
        if key not in result and 0 in tuple(shape):
            result[key] = torch.empty(shape, dtype=reference.dtype)
    for key, value in result.items():
        if key in target_shapes and value.device != reference.device:
            result[key] = value.to(reference.device)
    _check_fits(result, target_shapes)
    return result, dropped


def _fill(source: dict[str, torch.Tensor] | None, name: str, shape: torch.Size, path: str,
          kind: str) -> torch.Tensor:
    """The source's tensor of that name, or a unit-norm value: weight 1 (0 for ``(1 + w)`` norms), bias 0."""
    if source and name in source:
        tensor = source[name]
        if tensor.shape != shape:
            raise WeightMappingError(f"{path}.{name}: the source norm has shape {tuple(tensor.shape)} but the "
                                     f"target expects {tuple(shape)}")
        return tensor.clone()
    dtype = next(iter(source.values())).dtype if source else torch.float32
    unit_weight = name == "weight" and kind != "rmsnorm-offset"
    return torch.ones(shape, dtype=dtype) if unit_weight else torch.zeros(shape, dtype=dtype)


def _check_nothing_lost(source: dict[str, torch.Tensor], wanted: Mapping[str, object], path: str) -> None:
    """A source bias the target norm cannot hold would be silently lost unless it is zero."""
    for name, tensor in source.items():
        if name not in wanted and bool(tensor.ne(0).any()):
            raise WeightMappingError(f"{path}.{name} is non-zero but the target norm has no {name}; "
                                     "this target cannot hold the model exactly")


def _check_fits(result: Mapping[str, torch.Tensor], target_shapes: Mapping[str, torch.Size]) -> None:
    missing = sorted(set(target_shapes) - set(result))
    unexpected = sorted(set(result) - set(target_shapes))
    if missing or unexpected:
        raise WeightMappingError(
            f"the converted tensors do not fit the target: missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}; the recipe's native target does "
            "not match this model"
        )
    for key, shape in target_shapes.items():
        if tuple(result[key].shape) != tuple(shape):
            raise WeightMappingError(f"{key} has shape {tuple(result[key].shape)} but the target expects "
                                     f"{tuple(shape)}")
