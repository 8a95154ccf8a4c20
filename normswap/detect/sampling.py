"""Inspect a deep config from a sample of its layers, then expand the topology to every layer.

Detection traces each distinct layer once, but the meta model and its meta forward still cost time
and memory per layer: a 100000-layer config took minutes and gigabytes. ``inspect`` of a path or a
config therefore builds a stack of more than ``FULL_BUILD_LAYERS`` (64) layers with only
``prefix + SLACK_LAYERS + max(2 * period, MIN_TAIL_LAYERS)`` of them (at most ``MAX_SAMPLE_LAYERS``),
and copies the layers of the sample's last full period to the real indices. Loaded models and the
meta models that conversions build are never sampled: a conversion needs every layer.

What may differ from layer to layer is found in the config, over the FULL layer count:

* per-layer lists (any list whose length is the layer count, e.g. ``layer_types``): each gets its
  smallest period after a prefix, and the sample covers the largest prefix plus two periods of their lcm;
* index patterns named by ints: ``*_every_n_*``, ``*_step``, ``*_period``, ``*_freq``, ``*_pattern``,
  ``*_interval`` add their value to the period, other layer-ish ints (``first_k_dense_replace``,
  ``max_window_layers``, ``*_offset``) and lists of layer indices (``mlp_only_layers``) to the prefix.

The sample is then checked before it is trusted: past the prefix and ``SLACK_LAYERS`` leading layers
(T5's first block holds the position bias; no config key says so), every layer must have the same
signature as the layer one period later (module tree, plain attributes, norms, input shapes), each
sampled layer count must be found as the length of a built stack, and no layer may keep the sampled
layer count as an attribute (it could branch on it). The sample size avoids every int in the config,
so that a stack length or attribute equal to it can only come from the sampled count. Anything
unexpected (a list that does not repeat within the bound, a failed check, any error while building or
tracing the sample) means a full build: correctness over speed.

What no sample can show is an index pattern that first appears beyond the sample and that no config
key names (a hard-coded ``layer_idx == 70``); modeling code like that is not seen in transformers.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import groupby
from typing import Any

from torch import nn

from ..topology import Branch, Layer, NormSite, ResidualScale, Sublayer, Topology
from .signature import module_signature

FULL_BUILD_LAYERS = 64
"""Stacks of up to this many layers are always built in full."""
MAX_SAMPLE_LAYERS = 64
"""A stack whose repeating pattern needs a larger sample is built in full."""
MIN_TAIL_LAYERS = 16
"""Layers after the prefix: an index pattern no config key names, with a period up to this, shows in them."""
SLACK_LAYERS = 4
"""Leading layers allowed to differ without a config key saying so (T5's first block holds the position bias)."""

_COUNT_NAME = re.compile(r"^(?:num_|n_)?(?:hidden_|encoder_|decoder_|text_|vision_|audio_|speech_)?layers?$")
_HINT_NAME = re.compile(r"layer|every|step|period|interval|pattern|freq|offset|dense|sparse|replace")
_PERIOD_HINT_NAME = re.compile(r"every|step|period|interval|pattern|freq")
_NOT_HINT_NAME = re.compile(r"size|dim|token|eps|vocab|position|seed|bucket|distance|drop")
_NO_INDEX: Any = object()  # module_signature abstracts ints equal to the index it is given; this equals none


@dataclass(frozen=True)
class StackSample:
    """How one layer count was sampled: ``built`` of ``real`` layers, repeating with ``period`` from ``start``."""

    real: int
    built: int
    start: int  # prefix + SLACK_LAYERS: from here on every layer equals the layer one period later
    period: int


@dataclass(frozen=True)
class SamplePlan:
    """A config with fewer layers, and how to map its stacks back to the real ones."""

    config: Any
    samples: tuple[StackSample, ...]
    unsampled_counts: frozenset[int]  # layer counts left as they are: stacks of these lengths are real

    def sample_of(self, built: int) -> StackSample | None:
        return next((sample for sample in self.samples if sample.built == built), None)


@dataclass(frozen=True)
class _Attribute:
    owner: tuple[str, ...]  # attribute names from the root config to the (sub-)config that holds it
    name: str
    value: Any


def plan_sample(config: Any) -> SamplePlan | None:
    """A sampled copy of ``config``, or None where every stack is small or its layers do not repeat in a sample."""
    attributes = list(_attributes(config))
    count_names = {owner: _count_names(config, owner) for owner in {a.owner for a in attributes}}
    counts = [a for a in attributes if a.name in count_names[a.owner] and _is_int(a.value) and a.value > 0]
    deep = sorted({a.value for a in counts if a.value > FULL_BUILD_LAYERS})
    if not deep:
        return None
    avoid = {a.value for a in attributes if _is_int(a.value)}
    samples: list[StackSample] = []
    count_keys = {(a.owner, a.name) for a in counts}
    others = [a for a in attributes if (a.owner, a.name) not in count_keys]
    count_values = {a.value for a in counts}
    for real in deep:
        sample = _sample_for(real, others, count_values, avoid)
        if sample is not None:
            samples.append(sample)
            avoid.add(sample.built)
    if not samples:
        return None
    sampled = copy.deepcopy(config)
    for sample in samples:
        for attribute in attributes:
            target = _resolve(sampled, attribute.owner)
            if (attribute.owner, attribute.name) in count_keys:
                if attribute.value == sample.real:
                    setattr(target, attribute.name, sample.built)
            elif _is_per_layer(attribute, sample.real):
                setattr(target, attribute.name, attribute.value[:sample.built])
    unsampled = frozenset(a.value for a in counts) - {sample.real for sample in samples}
    return SamplePlan(sampled, tuple(samples), unsampled)


def smallest_period(values: list[Any] | tuple[Any, ...], max_period: int) -> tuple[int, int] | None:
    """``(prefix, period)`` with ``values[i] == values[i + period]`` for every ``i >= prefix``, over the whole list.

    Of the periods up to ``max_period``, the one that needs the shortest sample (``prefix + 2 * period``) wins.
    """
    best: tuple[int, int] | None = None
    for period in range(1, min(max_period, len(values)) + 1):
        if best is not None and 2 * period >= best[0] + 2 * best[1]:
            break
        index = len(values) - period - 1
        while index >= 0 and values[index] == values[index + period]:
            index -= 1
        if best is None or index + 1 + 2 * period < best[0] + 2 * best[1]:
            best = (index + 1, period)
    return best


def sample_mismatch(plan: SamplePlan, stacks: list[tuple[str, list[tuple[str, nn.Module]]]],
                    keys: dict[str, Any]) -> str | None:
    """Why the built sample does not stand for the full model, or None when it does.

    ``keys`` holds each layer's detection signature by path (None for a layer the forward skipped); its
    module part abstracts any int equal to the layer's index, which a ``head_dim`` of 16 is at layer 16,
    so modules are compared here with only the attributes that equal their own layer's index abstracted.
    """
    found = set()
    for stack_path, layers in stacks:
        sample = plan.sample_of(len(layers))
        if sample is None:
            if len(layers) not in plan.unsampled_counts:
                return f"{stack_path} has {len(layers)} layers, a count the config does not name"
            continue
        found.add(sample.built)
        for index in range(sample.start, sample.built - sample.period):
            (path, layer), (later_path, later) = layers[index], layers[index + sample.period]
            key, later_key = keys.get(path), keys.get(later_path)
            if ((key is None) != (later_key is None) or (key is not None and key[1:] != later_key[1:])
                    or not _same_modules(layer, index, later, index + sample.period)):
                return f"{path} differs from the layer {sample.period} later"
        for index, (path, layer) in enumerate(layers):
            for _, _, plain in module_signature(layer, index)[1]:
                if any(_is_int(value) and value == sample.built for _, value in plain):
                    return f"{path} keeps the layer count {sample.built} as an attribute"
    missing = {sample.built for sample in plan.samples} - found
    return f"no stack has the sampled length {min(missing)}" if missing else None


def expand_sample(topology: Topology, plan: SamplePlan) -> Topology:
    """The topology of the full model: sampled stacks get their real length, the missing layers copies."""
    stacks, notes, layers = [], list(topology.notes), []
    sampled: dict[str, StackSample] = {}
    for stack in topology.stacks:
        sample = plan.sample_of(stack.num_layers)
        if sample is not None:
            sampled[stack.path] = sample
            stack = replace(stack, num_layers=sample.real)
            first = sample.built - sample.period
            source = f"layer {first}" if sample.period == 1 else f"layers {first}-{sample.built - 1}"
            notes.append(f"built {sample.built} of {sample.real} layers of {stack.path or 'the top-level list'} "
                         f"on the meta device; layers {sample.built}-{sample.real - 1} repeat {source} "
                         f"(period {sample.period})")
        stacks.append(stack)
    with _no_cycle_collection():
        for stack_path, group in groupby(topology.layers, key=lambda layer: layer.stack):
            built = list(group)
            layers.extend(built)
            sample = sampled.get(stack_path)
            if sample is not None:
                by_index = {layer.index: layer for layer in built}
                prefix = f"{stack_path}." if stack_path else ""
                for index in range(sample.built, sample.real):
                    origin = by_index.get(sample.built - sample.period + (index - sample.built) % sample.period)
                    if origin is not None:  # a layer the forward skipped is skipped at every repeat
                        layers.append(_moved(origin, index, f"{prefix}{index}"))
    return replace(topology, stacks=tuple(stacks), layers=tuple(layers), notes=tuple(notes))


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """The copies hold no reference cycles, but their millions of allocations would trigger the cycle
    collector over and over, each pass walking everything made so far: 11 s instead of 4 for 100000 layers."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _sample_for(real: int, attributes: list[_Attribute], counts: set[int], avoid: set[int]) -> StackSample | None:
    """The sample of a ``real``-layer stack, or None where its layers do not repeat within ``MAX_SAMPLE_LAYERS``.

    ``attributes`` are the config's attributes other than the layer counts, whose values are ``counts``.
    """
    prefix, period = 0, 1
    for attribute in attributes:
        if _is_per_layer(attribute, real):
            found = smallest_period(attribute.value, MAX_SAMPLE_LAYERS // 2)
            if found is None:
                return None
            prefix, period = max(prefix, found[0]), math.lcm(period, found[1])
        elif _HINT_NAME.search(attribute.name) and not _NOT_HINT_NAME.search(attribute.name):
            if _is_int(attribute.value) and _PERIOD_HINT_NAME.search(attribute.name):
                period = math.lcm(period, attribute.value) if 1 < attribute.value < real else period
            elif _is_int(attribute.value):
                prefix = max(prefix, attribute.value) if 0 < attribute.value < real else prefix
            elif (isinstance(attribute.value, (list, tuple)) and len(attribute.value) not in counts
                  and all(_is_int(v) for v in attribute.value)):
                indices = [v for v in attribute.value if 0 <= v < real]
                prefix = max(prefix, max(indices) + 1) if indices else prefix
    start = prefix + SLACK_LAYERS
    built = start + max(2 * period, MIN_TAIL_LAYERS)
    while built in avoid:
        built += 1
    if built > MAX_SAMPLE_LAYERS or built >= real:
        return None
    return StackSample(real=real, built=built, start=start, period=period)


def _attributes(config: Any) -> Iterator[_Attribute]:
    """The public attributes of ``config`` and of its sub-configs (``text_config``, ``encoder``, ...)."""
    seen: set[int] = set()
    pending: list[tuple[tuple[str, ...], Any]] = [((), config)]
    while pending:
        owner, current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        for name, value in vars(current).items():
            if name.startswith("_"):
                continue
            if _is_config(value):
                pending.append(((*owner, name), value))
            else:
                yield _Attribute(owner, name, value)


def _count_names(config: Any, owner: tuple[str, ...]) -> set[str]:
    """The stored names of a config's layer counts; ``attribute_map`` aliases point a standard name at them."""
    target = _resolve(config, owner)
    names = {name for name in vars(target) if _COUNT_NAME.match(name)}
    aliases = getattr(type(target), "attribute_map", {}) or {}
    names.update(stored for alias, stored in aliases.items() if _COUNT_NAME.match(alias))
    return names


def _is_per_layer(attribute: _Attribute, real: int) -> bool:
    return isinstance(attribute.value, (list, tuple)) and len(attribute.value) == real


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_config(value: Any) -> bool:
    from transformers import PretrainedConfig

    return isinstance(value, PretrainedConfig)


def _resolve(config: Any, owner: tuple[str, ...]) -> Any:
    for name in owner:
        config = getattr(config, name)
    return config


def _same_modules(layer: nn.Module, index: int, other: nn.Module, other_index: int) -> bool:
    """Same module tree and plain attributes, where an attribute may hold each layer's own index."""
    tree, other_tree = module_signature(layer, _NO_INDEX)[1], module_signature(other, _NO_INDEX)[1]
    if type(layer) is not type(other) or len(tree) != len(other_tree):
        return False
    for (path, kind, plain), (other_path, other_kind, other_plain) in zip(tree, other_tree, strict=True):
        if (path, kind) != (other_path, other_kind) or [n for n, _ in plain] != [n for n, _ in other_plain]:
            return False
        for (_, value), (_, other_value) in zip(plain, other_plain, strict=True):
            if value != other_value and not (_is_int(value) and value == index and other_value == other_index):
                return False
    return True


def _moved(layer: Layer, index: int, path: str) -> Layer:
    """``layer`` as the layer at ``index``: its path and every module path inside it rewritten."""
    old, new = layer.path + ".", path + "."

    def move(module_path: str) -> str:
        return new + module_path[len(old):] if module_path.startswith(old) else module_path

    def move_norm(norm: NormSite) -> NormSite:
        return _changed(norm, path=move(norm.path))

    def move_branch(branch: Branch) -> Branch:
        return _changed(branch, modules=tuple(move(m) for m in branch.modules),
                        reads=tuple(move(r) for r in branch.reads),
                        entry=move(branch.entry) if branch.entry else None)

    def move_scale(scale: ResidualScale | None) -> ResidualScale | None:
        return _changed(scale, tensors=tuple(move(t) for t in scale.tensors)) if scale and scale.tensors else scale

    def move_sublayer(sub: Sublayer) -> Sublayer:
        return _changed(sub, norms=tuple(move_norm(n) for n in sub.norms),
                        branches=tuple(move_branch(b) for b in sub.branches),
                        residual_scale=move_scale(sub.residual_scale))

    return _changed(layer, index=index, path=path, sublayers=tuple(move_sublayer(s) for s in layer.sublayers),
                    inner_norms=tuple(move_norm(n) for n in layer.inner_norms),
                    output_scale=move_scale(layer.output_scale))


def _changed(record: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` without its per-call field introspection (5 s of 100000 layers' expansion).

    The topology records are frozen dataclasses without ``__post_init__``: a copy of the instance
    dictionary with the named fields changed is what ``replace`` would build.
    """
    if set(changes) - record.__dict__.keys():
        raise AttributeError(f"{type(record).__name__} has no field {sorted(set(changes) - record.__dict__.keys())}")
    clone = object.__new__(type(record))
    clone.__dict__.update(record.__dict__)
    clone.__dict__.update(changes)
    return clone
