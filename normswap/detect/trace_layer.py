"""Trace one layer module into a ``torch.fx`` graph, with the arguments it was really called with.

transformers wraps layer ``forward`` methods for gradient checkpointing, so a layer
cannot be the tracing root; a small generated wrapper module whose ``forward`` names
each tensor input is traced instead. Modules that hold no residual-path norm become
leaves. If tracing fails inside a module we descended into, that module becomes a
leaf and we try again; a failure at the layer itself names the construct that failed.
"""

from __future__ import annotations

import inspect as pyinspect
import keyword
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import TracingError, first_line
from .capture import LayerCall
from .meta_answers import AnswerDataQuestions
from .norms import is_norm_stand_in
from .tracer import LayerTracer

WRAPPED_LAYER = "layer"
_RESIDUAL_ARGUMENT_NAMES = frozenset({"residual", "input_tensor", "residual_states", "shortcut", "skip"})
_MAX_RETRIES = 8


@dataclass(frozen=True)
class TracedLayer:
    """A layer's graph; ``call_module`` targets are ``layer.<path in the layer>``."""

    graph: fx.Graph
    stream_input: str  # the argument that carries the residual stream in: the layer's first one
    opaque: tuple[str, ...] = ()  # modules traced as one node because tracing inside them failed


def trace_layer(layer: nn.Module, call: LayerCall, norm_modules: set[int], unrecorded_objects: bool = False
                ) -> TracedLayer:
    """Trace ``layer`` as it was called in ``call``; ``norm_modules`` holds ``id()``s of norm modules.

    ``unrecorded_objects``: record arguments fx cannot hold as None (``LayerTracer``), for a whole model's forward."""
    named_inputs = _bind_arguments(layer, call)
    placeholder_values: dict[str, Any] = {}
    specs: list[tuple[str, Any, list[Any], list[str]]] = []
    for name, value in named_inputs.items():
        leaves, spec = tree_flatten(value)
        placeholder_names: list[str] = []
        for index, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                placeholder = name if len(leaves) == 1 else f"{name}_{index}"
                placeholder_names.append(placeholder)
                placeholder_values[placeholder] = leaf
            else:
                placeholder_names.append("")
        specs.append((name, spec, leaves, placeholder_names))
    ordered_placeholders = [p for _, _, _, names in specs for p in names if p]
    if not ordered_placeholders:
        raise TracingError(f"{type(layer).__name__} was called without tensor inputs; nothing to trace")

    forced_leaves: set[int] = set()
    for _attempt in range(_MAX_RETRIES):
        wrapper = _make_wrapper(layer, specs, ordered_placeholders)
        tracer = LayerTracer(_leaf_policy(wrapper, norm_modules, forced_leaves), placeholder_values,
                             unrecorded_objects)
        try:
            with AnswerDataQuestions():
                graph = tracer.trace(wrapper)
        except Exception as error:
            failing = _innermost_descended(tracer, wrapper)
            if failing is None or id(failing) in forced_leaves:
                raise TracingError(_describe_failure(layer, error)) from error
            forced_leaves.add(id(failing))
            continue
        opaque = tuple(sorted(path.removeprefix(f"{WRAPPED_LAYER}.") for path, module in wrapper.named_modules()
                              if id(module) in forced_leaves))
        return TracedLayer(graph, ordered_placeholders[0], opaque)
    raise TracingError(f"{type(layer).__name__}: tracing kept failing after {_MAX_RETRIES} retries")


def _bind_arguments(layer: nn.Module, call: LayerCall) -> dict[str, Any]:
    """Name every argument of the call; caches are dropped so tracing has no side effects."""
    forward = pyinspect.unwrap(type(layer).forward)
    signature = pyinspect.signature(forward)
    bound = signature.bind_partial(layer, *call.args, **call.kwargs)
    named: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:
        if signature.parameters[name].kind is pyinspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif signature.parameters[name].kind is pyinspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TracingError(f"{type(layer).__name__} takes *{name}, which normswap cannot trace")
        else:
            named[name] = value
    for name, value in named.items():
        if type(value).__name__.endswith("Cache") or name in {"past_key_value", "past_key_values", "layer_past"}:
            named[name] = None
        if name == "use_cache":
            named[name] = False
    return named


def _make_wrapper(layer: nn.Module, specs: list, placeholders: list[str]) -> nn.Module:
    """A module whose ``forward(self, <one argument per tensor input>)`` calls the layer."""
    for name in placeholders:
        if not name.isidentifier() or keyword.iskeyword(name):
            raise TracingError(f"{type(layer).__name__} has an input named {name!r} that is not a Python identifier")

    class LayerWrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.add_module(WRAPPED_LAYER, layer)

        def call_layer(self, tensors: tuple[Any, ...]) -> Any:
            by_name = dict(zip(placeholders, tensors, strict=True))
            kwargs = {}
            for name, spec, leaves, names in specs:
                values = [by_name[p] if p else leaf for leaf, p in zip(leaves, names, strict=True)]
                kwargs[name] = tree_unflatten(values, spec)
            return getattr(self, WRAPPED_LAYER)(**kwargs)

    arguments = ", ".join(placeholders)
    source = f"def forward(self, {arguments}):\n    return self.call_layer(({arguments},))\n"
    namespace: dict[str, Any] = {}
    exec(compile(source, "<normswap layer wrapper>", "exec"), namespace)
    LayerWrapper.forward = namespace["forward"]  # type: ignore[method-assign]
    return LayerWrapper()


def _leaf_policy(wrapper: nn.Module, norm_modules: set[int], forced: set[int]) -> Callable[[nn.Module, str], bool]:
    contains_norm: dict[int, bool] = {}

    def holds_norm(module: nn.Module) -> bool:
        key = id(module)
        if key not in contains_norm:
            contains_norm[key] = any(id(m) in norm_modules or is_norm_stand_in(m) for m in module.modules())
        return contains_norm[key]

    def is_leaf(module: nn.Module, qualified_name: str) -> bool:
        if module is wrapper or qualified_name == WRAPPED_LAYER:
            return False
        if id(module) in norm_modules or id(module) in forced or is_norm_stand_in(module):
            return True
        if isinstance(module, (nn.Identity, nn.Dropout)):
            return True
        if not any(True for _ in module.children()):  # a gate that adds the residual (MuseSpark's) is traced into
            return not _takes_residual(module)
        return not (holds_norm(module) or _takes_residual(module))

    return is_leaf


def _takes_residual(module: nn.Module) -> bool:
    try:
        parameters = pyinspect.signature(pyinspect.unwrap(type(module).forward)).parameters
    except (TypeError, ValueError):
        return False
    return any(name in _RESIDUAL_ARGUMENT_NAMES or "residual" in name for name in parameters)


def _innermost_descended(tracer: LayerTracer, wrapper: nn.Module) -> nn.Module | None:
    """The innermost module (below the layer itself) that tracing was inside when it failed."""
    for path in reversed(tracer.failed_inside or []):
        if path and path != WRAPPED_LAYER:
            return wrapper.get_submodule(path)
    return None


_SKIPPED_PACKAGES = tuple(os.path.dirname(os.path.abspath(module.__file__ or "")) + os.sep
                          for module in (torch, sys.modules[__name__.split(".")[0]]))


def _describe_failure(layer: nn.Module, error: Exception) -> str:
    """The message names the model's own source line: frames of torch and of normswap itself are skipped, told
    apart by the packages' real folders (a checkout named ``normswap`` holds the venv and transformers too)."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith("<") and not os.path.abspath(f.filename).startswith(_SKIPPED_PACKAGES)]
    where = f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} `{frames[-1].line}`" if frames else ""
    return (f"cannot trace {type(layer).__name__}{where}: {type(error).__name__}: {first_line(error)}. The "
            "statement is in the layer's own forward, which normswap follows operation by operation to see where "
            "its norms sit and where the residual adds are (a submodule it cannot follow is taken as one node "
            "instead), so the layer's norm placement cannot be read from this code")
