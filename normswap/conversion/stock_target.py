"""A stock family standing in for the generated code of composed passes (docs/native_pairs.md).

A recipe may name a stock family that computes what the branch-norm passes make (Gemma 2 without its out norms
is VaultGemma). Its norms are matched to the generated code's slot by slot, from the two detected topologies,
never by name: the same name may be another slot on the other side.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..detect import inspect
from ..recipe import NativeTarget
from ..topology import Topology
from .native import meta_instance, target_class, target_config
from .round_trip_carry import MEAN_PREFIX, SCALE_PREFIX


def carried_name(key: str, renames: Mapping[str, str]) -> str:
    """A carried tensor's name after the stock family's renames: a new norm's scale follows its norm, a folded
    tensor's carried mean its tensor."""
    if key.startswith(SCALE_PREFIX):
        renamed = renames.get(f"{key.removeprefix(SCALE_PREFIX)}.weight")
        return f"{SCALE_PREFIX}{renamed.removesuffix('.weight')}" if renamed else key
    if key.startswith(MEAN_PREFIX):
        return f"{MEAN_PREFIX}{renames.get(key.removeprefix(MEAN_PREFIX), key.removeprefix(MEAN_PREFIX))}"
    return renames.get(key, key)


def as_stock(model: nn.Module, native: NativeTarget, generated: Topology, removed: frozenset[str] = frozenset()
             ) -> tuple[Any, Any, Topology, dict[str, str]] | None:
    """(class, config, topology, tensor renames) of the stock family ``native`` standing in for the generated code
    whose topology is ``generated``, or None where it does not line up slot for slot (then the generated code
    stays). The recipe's pair was confirmed by behaviour (benchmarks/native_pairs.py); the renames come from the
    two detected topologies, never from names: the same name may be another slot on the other side. Where a stock
    norm takes the name of a norm the passes removed (Qwen3's MLP pre norm and Exaone 4's attention out norm are
    both ``post_attention_layernorm``), the carried vectors and scales of the two would share one name, so the
    generated code stays, whose new norms have names of their own."""
    if native.unmet(model.config):
        return None
    config = target_config(model.config, native)
    cls = target_class(model, native)
    stock = inspect(meta_instance(cls, config))
    if len(stock.layers) != len(generated.layers) or stock.placement != generated.placement:
        return None
    renames: dict[str, str] = {}
    for ours, theirs in zip(generated.layers, stock.layers, strict=True):
        if len(ours.sublayers) != len(theirs.sublayers):
            return None
        for our_sub, their_sub in zip(ours.sublayers, theirs.sublayers, strict=True):
            ours_by_slot = [(n.slot, n.path) for n in our_sub.norms]
            theirs_by_slot = [(n.slot, n.path) for n in their_sub.norms]
            if [slot for slot, _ in ours_by_slot] != [slot for slot, _ in theirs_by_slot]:
                return None
            renames.update({path: other for (_, path), (_, other) in zip(ours_by_slot, theirs_by_slot, strict=True)})
    if removed & set(renames.values()):
        return None
    keyed = {f"{path}.{leaf}": f"{other}.{leaf}" for path, other in renames.items() for leaf in ("weight", "bias")}
    return cls, config, stock, {key: value for key, value in keyed.items() if key != value}
