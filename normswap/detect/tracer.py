"""A torch.fx tracer that carries meta-device values alongside every proxy.

transformers 5 removed its HFTracer. Plain ``torch.fx`` tracing of a decoder layer
fails on ordinary Python that inspects tensors: ``if x.dtype == torch.float16``,
``q, k = self.attn(x)``, ``x.shape[-1]``. We run every traced operation on the
meta device as well, so such questions get concrete answers (shapes, dtypes,
tuple lengths) while the graph records the operations. Nothing is allocated.

Item assignment (``h[mask] = v``, ``h[mask] += v``) is recorded as an ``operator.setitem`` node that stands for
the tensor after the assignment, as torch.fx prints such nodes (``h[mask] = v; setitem = h``): the proxy that
was assigned into moves to that node, so every later read of ``h`` depends on the assignment.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

_CONCRETE_TENSOR_ATTRIBUTES = frozenset({"dtype", "device", "shape", "ndim", "is_cuda", "is_meta"})


class MetaProxy(fx.Proxy):
    """A proxy that knows the meta value of the node it stands for."""

    def __init__(self, node: fx.Node, tracer: fx.Tracer | None = None, meta: Any = None) -> None:
        super().__init__(node, tracer)
        object.__setattr__(self, "meta_value", meta)

    def __getattr__(self, name: str) -> Any:
        meta = object.__getattribute__(self, "meta_value")
        if isinstance(meta, torch.Tensor) and name in _CONCRETE_TENSOR_ATTRIBUTES:
            return getattr(meta, name)
        return super().__getattr__(name)

    def size(self, dim: int | None = None) -> Any:
        """Shapes are answered concretely: tracing is for one input shape only."""
        meta = self.meta_value
        if isinstance(meta, torch.Tensor):
            return meta.size() if dim is None else meta.size(dim)
        return self.tracer.create_proxy("call_method", "size", (self,) if dim is None else (self, dim), {})

    def dim(self) -> Any:
        meta = self.meta_value
        if isinstance(meta, torch.Tensor):
            return meta.dim()
        return self.tracer.create_proxy("call_method", "dim", (self,), {})

    def __setitem__(self, index: Any, value: Any) -> None:
        """``self[index] = value``; Python turns ``self[index] += value`` into a read, an add and this call."""
        assigned = self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})
        meta = object.__getattribute__(self, "meta_value")  # assigned in place: same tensor, same shape
        object.__setattr__(assigned, "meta_value", meta)
        assigned.node.meta["meta_value"] = meta
        self.node = assigned.node

    def __len__(self) -> int:
        meta = self.meta_value
        if meta is None:
            raise fx.proxy.TraceError(f"len() of {self.node.name}, whose value is unknown while tracing")
        return len(meta)


def to_meta_value(value: Any) -> Any:
    """Replace proxies by their meta values, leaving everything else as it is."""
    return tree_map(lambda item: item.meta_value if isinstance(item, MetaProxy) else item, value)


class LayerTracer(fx.Tracer):
    """Traces one layer; modules for which ``is_leaf`` is true become single graph nodes.

    Every node keeps the modeling-code lines that produced it (``create_node``), which is what a source rewrite
    of the modeling code needs.
    """

    def __init__(self, is_leaf: Callable[[torch.nn.Module, str], bool], placeholder_values: dict[str, Any],
                 unrecorded_objects: bool = False) -> None:
        super().__init__(autowrap_modules=(), autowrap_functions=())
        self._unrecorded_objects = unrecorded_objects
        self.record_stack_traces = False  # written by ``create_node``, the modeling-code frames alone
        self._is_leaf = is_leaf
        self._placeholder_values = placeholder_values
        self._computing_meta = False
        self.module_stack_paths: list[str] = []
        self.failed_inside: list[str] | None = None  # the module stack when tracing first failed

    def create_node(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                    type_expr: Any = None) -> fx.Node:
        """torch's node, with the stack trace written here: only the modeling-code frames from the first
        ``forward`` on, which is all ``source_of`` reads. torch's own recording looks up the source line of every
        frame of the stack; on a large layer (Mistral Large 4's 20,000 nodes) that was most of inspect's time."""
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if not node.stack_trace:
            node.stack_trace = _modeling_frames(sys._getframe(1))
        return node

    def create_arg(self, a: Any) -> Any:
        """With ``unrecorded_objects``, an argument fx cannot record (the cache a model's forward builds for
        itself and hands each branch) is recorded as None: such a graph is read, never run."""
        try:
            return super().create_arg(a)
        except NotImplementedError:
            if not self._unrecorded_objects:
                raise
            return None

    # -- leaves and module calls ------------------------------------------------
    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:
        return self._is_leaf(module, qualified_name)

    def call_module(self, module: torch.nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if self._computing_meta:
            return forward(*args, **kwargs)
        path = self.path_of_module(module)
        self.module_stack_paths.append(path)
        try:
            return super().call_module(module, forward, args, kwargs)
        except Exception:
            if self.failed_inside is None:
                self.failed_inside = list(self.module_stack_paths)
            raise
        finally:
            self.module_stack_paths.pop()

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._computing_meta:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    # -- meta propagation -------------------------------------------------------
    def proxy(self, node: fx.Node) -> MetaProxy:
        return MetaProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                     type_expr: Any = None, proxy_factory_fn: Callable[[fx.Node], fx.Proxy] | None = None) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if isinstance(proxy, MetaProxy):
            meta = self._meta_value(kind, target, args, kwargs, proxy.node)
            object.__setattr__(proxy, "meta_value", meta)
            proxy.node.meta["meta_value"] = meta
        return proxy

    def _meta_value(self, kind: str, target: Any, args: tuple, kwargs: dict, node: fx.Node) -> Any:
        if kind == "placeholder":
            return self._placeholder_values.get(node.name, self._placeholder_values.get(target))
        if kind == "output":
            return None
        meta_args, meta_kwargs = to_meta_value(args), to_meta_value(kwargs)
        self._computing_meta = True
        try:
            with torch.no_grad():
                if kind == "call_function":
                    return target(*meta_args, **meta_kwargs)
                if kind == "call_method":
                    return getattr(meta_args[0], target)(*meta_args[1:], **meta_kwargs)
                if kind == "call_module":
                    return self.root.get_submodule(target)(*meta_args, **meta_kwargs)
                if kind == "get_attr":
                    return _resolve_attribute(self.root, target)
        except Exception:  # noqa: BLE001 - an unknown value only means fewer concrete answers
            return None
        finally:
            self._computing_meta = False
        return None

    # -- Python protocol questions answered from meta values -----------------------
    def iter(self, obj: fx.Proxy) -> Iterator[fx.Proxy]:
        meta = getattr(obj, "meta_value", None)
        if isinstance(meta, (tuple, list)) or (isinstance(meta, torch.Tensor) and meta.dim() > 0):
            return iter([self.create_proxy("call_function", operator.getitem, (obj, index), {})
                         for index in range(len(meta))])
        return super().iter(obj)

    def to_bool(self, obj: fx.Proxy) -> bool:
        meta = getattr(obj, "meta_value", None)
        if meta is not None and not isinstance(meta, torch.Tensor):
            return bool(meta)
        raise fx.proxy.TraceError(
            f"branching on the value of tensor '{obj.node.name}' (data-dependent control flow)"
        )

    def keys(self, obj: fx.Proxy) -> Any:
        meta = getattr(obj, "meta_value", None)
        if isinstance(meta, dict):
            return meta.keys()
        return super().keys(obj)


def _resolve_attribute(root: torch.nn.Module, dotted: str) -> Any:
    value: Any = root
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _modeling_frames(frame: FrameType | None) -> str:
    """``File "...", line N, in f`` for each frame of a ``modeling_*.py`` file from the first ``forward`` on,
    outermost first, as a traceback prints them (``analysis.source_of`` reads these lines)."""
    frames: list[FrameType] = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    frames.reverse()
    first = next((index for index, item in enumerate(frames) if item.f_code.co_name == "forward"), len(frames))
    return "\n".join(f'  File "{item.f_code.co_filename}", line {item.f_lineno}, in {item.f_code.co_name}'
                     for item in frames[first:]
                     if item.f_code.co_filename.rsplit("/", 1)[-1].startswith("modeling_"))
