"""A plan's norm moves as a tensor program. Every other tensor keeps its name and its bits.

Norm weights move between slots unchanged (a move is a rename), so a round trip through the
inverse plan returns bit-identical tensors; a ``(1 + w)`` weight moved into a plain norm becomes ``1 + w``, its
original carried so that the way back restores it. A norm the target has no slot for is *carried*:
kept aside under its source name, so that converting back can restore it bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import NormswapError
from ..topology import OFFSET_NORM_KINDS
from .plan import ConversionPlan, NormMove
from .program import Step, TensorProgram, combine, constant, copy_of, minus_one, one_plus
from .removed_norm_tensors import removed_norm_step


class WeightMappingError(NormswapError):
    """The converted tensors do not fit the target model."""


def norm_tensors(state: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The parameters of the norm module at ``path``: ``{"weight": ..., "bias": ...}``."""
    prefix = f"{path}."
    return {key[len(prefix):]: value for key, value in state.items()
            if key.startswith(prefix) and "." not in key[len(prefix):]}


def placement_program(source_shapes: Mapping[str, torch.Size], plan: ConversionPlan,
                      target_shapes: Mapping[str, torch.Size], carried: Mapping[str, torch.Tensor] | None = None,
                      removed: frozenset[str] = frozenset()) -> TensorProgram:
    """The target's tensors, and the tensors of dropped norms (carried for round trips), as a program.

    ``target_shapes`` lists every tensor the target model expects; the program must fill exactly
    those, or the mapping is wrong and we say which tensors do not fit. ``removed``: the keys of the target's
    removed-norm placeholders (``removed_norm_keys``), written anew whatever the source holds there.
    """
    carried = dict(carried or {})
    moved_sources = {move.source for stack in plan.stacks for move in stack.moves if move.source}
    outputs = {key: copy_of(key) for key in source_shapes
               if not any(key.startswith(f"{path}.") and "." not in key[len(path) + 1:] for path in moved_sources)}
    shapes = dict(source_shapes)
    dropped: dict[str, Step] = {}
    checks: list[Step] = []

    for stack in plan.stacks:
        for move in stack.moves:
            if move.target is None:
                dropped.update({f"{move.source}.{name}": copy_of(f"{move.source}.{name}")
                                for name in norm_tensors(source_shapes, move.source)})  # type: ignore[arg-type]
                continue
            wanted = norm_tensors(target_shapes, move.target)  # type: ignore[arg-type]
            restored = norm_tensors(carried, move.target) if move.source is None or move.copy else {}
            if restored:  # this slot's own norm, dropped by an earlier conversion: restore it bit for bit
                source = {name: _carried(tensor) for name, tensor in restored.items()}
                shapes.update({f"{move.target}.{name}": t.shape for name, t in restored.items()})
                source_path = move.target
            elif move.source is None:
                source, source_path = None, None
            else:
                source = {name: copy_of(f"{move.source}.{name}")
                          for name in norm_tensors(source_shapes, move.source)}  # type: ignore[arg-type]
                source_path = move.source
            if source and "weight" in source and source_path == move.source and _offset_changes(move):
                dropped[f"{move.source}.weight"] = source["weight"]  # the way back restores it bit for bit
                source = {**source, "weight": _reoffset(source["weight"], move, norm_tensors(carried, move.target))}
            for name, shape in wanted.items():
                outputs[f"{move.target}.{name}"] = _fill(source, shapes, source_path, name, shape, move.target,
                                                         move.target_kind)
            if source:
                checks += _nothing_lost(source, wanted, move.source or move.target)
        for path, kind in stack.unit_norms:
            restored = norm_tensors(carried, path)
            source = {name: _carried(tensor) for name, tensor in restored.items()} or None
            shapes.update({f"{path}.{name}": t.shape for name, t in restored.items()})
            for name, shape in norm_tensors(target_shapes, path).items():  # type: ignore[arg-type]
                outputs[f"{path}.{name}"] = _fill(source, shapes, path, name, shape, path, kind)

    for key in removed & set(target_shapes):  # a source of an earlier normswap may hold empty tensors there
        outputs[key] = removed_norm_step()
    _check_fits({key: _shape_of(step, shapes, target_shapes, key) for key, step in outputs.items()}, target_shapes)
    return TensorProgram(outputs, dropped, tuple(checks))


def _offset_changes(move: NormMove) -> bool:
    """A move between a ``(1 + w)`` norm and a plain one, whose weight must change to compute the same function."""
    return bool(move.source_kind and move.target_kind) and (
        (move.source_kind in OFFSET_NORM_KINDS) != (move.target_kind in OFFSET_NORM_KINDS))


def _reoffset(weight: Step, move: NormMove, own: Mapping[str, torch.Tensor]) -> Step:
    """The moved weight in the target's form: ``1 + w`` into a plain norm, ``g - 1`` into a ``(1 + w)`` one, in
    float64 and cast back. Where the target slot's own weight is carried (it left by the opposite move) and gives
    the incoming weight exactly, that weight comes back bit for bit instead of the rounded difference."""
    to_target, to_source = ((one_plus, minus_one) if move.source_kind in OFFSET_NORM_KINDS
                            else (minus_one, one_plus))
    original = own.get("weight")

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        if original is not None and original.shape == tensor.shape and torch.equal(
                to_source(original).to(tensor.dtype), tensor):
            return original.to(tensor.dtype).clone()
        return to_target(tensor)

    return combine(convert, weight)


def _carried(tensor: torch.Tensor) -> Step:
    return Step((), lambda: tensor.clone(), touches=False)


def _shape_of(step: Step, shapes: Mapping[str, torch.Size], target_shapes: Mapping[str, torch.Size],
              key: str) -> torch.Size:
    """The shape a step produces: a copy keeps its source's; everything else is made to the target's."""
    return shapes[step.reads[0]] if not step.touches and step.reads else target_shapes.get(key, torch.Size([-1]))


def _fill(source: dict[str, Step] | None, shapes: Mapping[str, torch.Size], source_path: str | None,
          name: str, shape: torch.Size, path: str, kind: str) -> Step:
    """The source's tensor of that name, or a unit-norm value: weight 1 (0 for ``(1 + w)`` norms), bias 0."""
    if source and name in source:
        found = shapes[f"{source_path}.{name}"]
        if tuple(found) != tuple(shape):
            raise WeightMappingError(f"{path}.{name}: the source norm has shape {tuple(found)} but the "
                                     f"target expects {tuple(shape)}")
        return source[name]
    unit_weight = name == "weight" and kind not in OFFSET_NORM_KINDS
    sibling = next(iter(source.values()), None) if source else None
    make = torch.ones if unit_weight else torch.zeros
    if sibling is None:
        return constant(lambda: make(shape))
    return combine(lambda other: make(shape, dtype=other.dtype), sibling)  # the norm's other tensor's dtype


def _nothing_lost(source: dict[str, Step], wanted: Mapping[str, object], path: str) -> list[Step]:
    """A source bias the target norm cannot hold would be silently lost unless it is zero."""
    return [combine(lambda tensor, name=name: _require_zero(tensor, f"{path}.{name}", name), step)
            for name, step in source.items() if name not in wanted]


def _require_zero(tensor: torch.Tensor, key: str, name: str) -> torch.Tensor:
    if bool(tensor.ne(0).any()):
        raise WeightMappingError(f"{key} is non-zero but the target norm has no {name}; "
                                 "this target cannot hold the model exactly")
    return tensor


def _check_fits(result: Mapping[str, torch.Size], target_shapes: Mapping[str, torch.Size]) -> None:
    missing = sorted(set(target_shapes) - set(result))
    unexpected = sorted(set(result) - set(target_shapes))
    if missing or unexpected:
        raise WeightMappingError(
            f"the converted tensors do not fit the target: missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}; the recipe's native target does "
            "not match this model"
        )
    for key, shape in target_shapes.items():
        if tuple(result[key]) != tuple(shape):
            raise WeightMappingError(f"{key} has shape {tuple(result[key])} but the target expects "
                                     f"{tuple(shape)}")
