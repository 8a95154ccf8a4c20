"""Which tensors read or write the residual stream, and along which axis (docs/design.md §5).

The extra-dimension map (``extra_dimension.py``) lifts every tensor that writes the stream (``U W``) and reads
every norm's output through the norm's weight (``W diag(g) U^T / s``), each along the tensor's own stream axis;
no list of families or tensor names decides which is which. The axes the family's own code, built one dimension
wider, grows by one are the stream's axes; which tensors read a norm's output is seen by running the model on the
meta device and following what each op computes from (``trace_stream_uses``), so raw router weights and fused
3-d experts in either layout get their roles as nn.Linear maps do.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..detect.capture import synthetic_forward
from ..detect.real_run import on_meta_else_cpu
from ..errors import NormswapError, first_line
from ..topology import Topology
from .native import meta_twin
from .norm_kind import linear_layout


@dataclass(frozen=True)
class StreamUses:
    """How a model's tensors met its norms' outputs in one run.

    ``reads[key]``: the norms whose output (or a reshaped, indexed or cast view of it) the tensor was computed
    with directly, as a linear map's weight, a router's raw weight or a fused expert's matrix is; ``used``: every
    tensor the run computed with, so that a tensor that never ran is not taken for a writer; ``after[key]``: the
    norms whose output reached the tensor only through a reader (UltraBERT's head: ``linear1`` reads the final
    norm, ``linear2`` and ``decoder`` come after it). Everything in a later layer comes after an earlier layer's
    norms, so only the last final norm's ``after`` says something: what its readers' outputs run through.
    """

    reads: Mapping[str, frozenset[str]]
    used: frozenset[str]
    after: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=dict)

    def with_reader(self, key: str, norm: str) -> StreamUses:
        """These uses, with ``key`` reading ``norm`` only (lm_head reads a slice of the final norm's output)."""
        return StreamUses({**self.reads, key: frozenset({norm})}, self.used | {key}, self.after)

    def coming_after(self, norm: str) -> list[str]:
        """The tensors computed with what ``norm``'s readers made of its output, in the order the run met them."""
        return [key for key, found in self.after.items() if norm in found]


@dataclass(frozen=True)
class StreamRole:
    """What one tensor does with the stream, along which of its axes: read a norm's output, or write the stream."""

    axis: int
    reads: str | None  # the norm whose output it reads; None for a writer
    stem: bool = False  # a linear map outside the layers whose output enters the stream (a modality's projection)
    internal: bool = False  # ``axis`` is a width inside a projection (sized by hidden_size, not the stream): padded
    vector: bool = False  # a learned vector of the stream's width outside the layers (LLaVA-NeXT's image_newline)
    padded_input: int | None = None  # an input axis of that inner width, padded with a zero column
    head: bool = False  # a width inside the LM head, after the final norm's readers (``head_chain.py``): padded


def trace_stream_uses(model: nn.Module, norms: tuple[str, ...], family: str) -> StreamUses:
    """Which tensors read which norm's output, found by running the model's meta twin once and following, op by
    op, what each intermediate tensor is computed from (``_StreamTracer``); no weights are read.

    Decorated fused experts run as ``batched_mm``, which picks each token's experts by indexing, not by asking
    the routing's values, so that on the meta device their matrices run too (the eager loop asks which experts
    were hit, which meta tensors cannot answer).
    """
    def attempt(meta: nn.Module, device: str) -> StreamUses:
        tracer = _StreamTracer(meta.state_dict(keep_vars=True))
        marks = [(path, lambda module, args, output, path=path: tracer.mark_stream(output, path)) for path in norms]
        synthetic_forward(meta, device, marks, tracer)
        return StreamUses({key: frozenset(found) for key, found in tracer.reads.items()}, frozenset(tracer.used),
                          {key: frozenset(found) for key, found in tracer.after.items()})

    try:
        return on_meta_else_cpu(_meta_twin_running_experts(model), attempt)
    except Exception as error:  # the family's own code failed on synthetic inputs: say so, with its reason
        raise NormswapError(f"cannot run {family} on synthetic inputs to find what reads its norms' outputs "
                            f"({type(error).__name__}: {first_line(error)})") from error


def _meta_twin_running_experts(model: nn.Module) -> nn.Module:
    """A weightless copy of ``model`` whose fused experts run as ``batched_mm`` (see ``trace_stream_uses``)."""
    from ..detect.source import quiet_transformers

    try:
        with torch.device("meta"), quiet_transformers():
            twin = type(model)._from_config(copy.deepcopy(model.config), experts_implementation="batched_mm")
    except Exception:  # noqa: BLE001 - a class without the option is traced as the project's meta twin runs it
        return meta_twin(model)
    return twin.eval()


@dataclass(frozen=True)
class _Origin:
    """What a tensor was computed from: one norm's output alone (``stream``), weights alone (``weights``), or
    both or several streams (``mixed``), after which nothing it meets reads a norm's output; ``after``: the norms
    whose outputs a mixed tensor was computed from."""

    stream: str | None = None
    weights: frozenset[str] = frozenset()
    mixed: bool = False
    after: frozenset[str] = frozenset()


_CASTS = frozenset({"to", "type_as", "type"})  # x.to(w): w gives a dtype only, so x's origin is kept
_SHAPE_ONLY = ("_like",)  # torch.zeros_like(x) takes x's shape, none of its values
_SCALINGS = frozenset({"mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__",
                       "__itruediv__"})


class _StreamTracer(TorchFunctionMode):
    """Follows what every floating-point tensor of a run is computed from.

    A norm's output (marked by a hook) starts a stream; reshaping, indexing or casting keeps it. An op that
    combines a stream with tensors computed from weights alone records those weights as the norm's readers
    (``F.linear(x, W)``, ``x @ W[e]``, ``torch.bmm``), and its result is mixed. Integer tensors (routing
    indices) carry no values of the stream and are not followed. Every tensor is kept alive for the run, so
    that Python never reuses an id.
    """

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.origins: dict[int, tuple[_Origin, torch.Tensor]] = {}
        for key, tensor in state.items():
            known = self.origins.get(id(tensor), (_Origin(), tensor))[0].weights
            self.origins[id(tensor)] = (_Origin(weights=known | {key}), tensor)  # tied tensors answer to each key
        self.reads: dict[str, set[str]] = {}
        self.used: set[str] = set()
        self.after: dict[str, set[str]] = {}

    def mark_stream(self, output: Any, norm: str) -> None:
        if isinstance(output, torch.Tensor):
            self.origins[id(output)] = (_Origin(stream=norm), output)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        outputs = [t for t in tree_leaves(result) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not outputs:
            return result
        name = getattr(func, "__name__", "")
        operands = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if name in _CASTS:
            operands = operands[:1]
        if name.endswith(_SHAPE_ONLY):
            origin = None
        elif name in _SCALINGS:  # a per-token factor (the same for every channel) keeps the stream a stream
            origin = self._scaled(operands)
        else:
            origin = self._combined([self.origins[id(t)][0] for t in operands if id(t) in self.origins])
        for tensor in outputs:
            if origin is None:
                self.origins.pop(id(tensor), None)
            else:
                self.origins[id(tensor)] = (origin, tensor)
        return result

    def _scaled(self, operands: list[torch.Tensor]) -> _Origin | None:
        """``x * s`` or ``x / s`` with x a stream and s the same for every channel (a routing weight per token,
        Llama 4's ``routed_in``): a reader of the product reads the stream, as the map is linear per token."""
        origins = [self.origins[id(t)][0] if id(t) in self.origins else _Origin() for t in operands]
        streams = [origin for origin in origins if origin.stream]
        factors = [t for t, origin in zip(operands, origins, strict=True) if not origin.stream]
        if len(streams) == 1 and all(t.dim() == 0 or t.shape[-1] == 1 for t in factors):
            self._combined([origin for origin in origins if not origin.stream])  # the factor's weights are used
            return streams[0]
        return self._combined(origins)

    def _combined(self, origins: list[_Origin]) -> _Origin | None:
        """The origin of an op's result; records the reads and uses it shows."""
        streams = {origin.stream for origin in origins if origin.stream}
        weights = frozenset(key for origin in origins if not origin.mixed for key in origin.weights)
        after = frozenset(norm for origin in origins for norm in origin.after)
        self.used |= weights
        if len(streams) == 1 and weights:
            for key in weights:
                self.reads.setdefault(key, set()).update(streams)
        for key in weights if after else ():
            self.after.setdefault(key, set()).update(after)
        if any(origin.mixed for origin in origins) or len(streams) > 1 or (streams and weights):
            return _Origin(mixed=True, after=after | streams)
        if streams:
            return _Origin(stream=next(iter(streams)))
        return _Origin(weights=weights) if weights else None


def stream_roles(model: nn.Module, topology: Topology, shapes: Mapping[str, torch.Size],
                 wider: Mapping[str, torch.Size], uses: StreamUses, skip: set[str]) -> dict[str, StreamRole]:
    """Each tensor's role in the wider model, decided by behaviour and shape, not by names.

    The stream's axis is where the family's own code, built one dimension wider, grew the tensor by one (for a
    linear map's weight: its input axis when it reads, its output axis when it writes). A tensor that read a
    norm's output takes that norm's weight (``W diag(g) U^T / s``); one that grew but read none, inside a
    branch, writes the stream (``U W``). ``skip``: norms and embeddings, which have their own maps.
    """
    family = topology.model_type
    branches = tuple(module for layer in topology.layers for sub in layer.sublayers for branch in sub.branches
                     for module in branch.modules)
    roles: dict[str, StreamRole] = {}
    for key, shape in shapes.items():
        if key in skip:
            continue
        read = uses.reads.get(key, frozenset())
        if len(read) > 1:
            raise NormswapError(f"{key} in {family} reads the outputs of {' and '.join(sorted(read))}, whose weights "
                                "differ; the extra-dimension map moves one norm's weight into each reader")
        in_branch = any(key.startswith(module + ".") for module in branches)
        if in_branch and key not in uses.used and _grown_axes(tuple(shape), wider.get(key)):
            raise NormswapError(f"{key} in {family} has the stream's width but did not run when {family} ran on the "
                                "meta device (its module picks what runs by the values of its inputs), so whether "
                                "it reads a norm's output or writes the stream cannot be told; the extra-dimension "
                                "map needs to see each tensor's use")
        axis = _stream_axis(model, key, tuple(shape), wider.get(key), reading=bool(read))
        if axis is None:
            continue
        if read:
            roles[key] = StreamRole(axis, next(iter(read)))
        elif in_branch:
            roles[key] = StreamRole(axis, None)
        elif _projects_into_stream(model, key, axis, topology):
            roles[key] = StreamRole(axis, None, stem=True)
        elif _is_stream_vector(key, tuple(shape), topology):
            roles[key] = StreamRole(axis, None, vector=True)
        # anything else outside the branches is left to the shape check, which names it
    return _with_inner_widths(model, roles, shapes, wider)


def _with_inner_widths(model: nn.Module, roles: dict[str, StreamRole], shapes: Mapping[str, torch.Size],
                       wider: Mapping[str, torch.Size]) -> dict[str, StreamRole]:
    """A projection into the stream built of several linear maps (LLaVA's ``linear_1``, act, ``linear_2``) sizes
    its inner width by hidden_size too. Of the stem maps under one module, in the order they are built, the last
    writes the stream (lifted); the others write the inner width, which grows by a zero row, and a map whose input
    axis grew reads it through a zero column. The padded unit is never read, whatever the activation makes of it;
    whether the module is such a chain (no norm or mixing across that width) is checked by running it
    (``check_projections`` in ``extra_dimension.py``)."""
    groups: dict[str, list[str]] = {}
    for key, role in roles.items():
        if role.stem:
            groups.setdefault(_owner_path(key).rpartition(".")[0], []).append(key)
    updated = dict(roles)
    for keys in groups.values():
        owners = list(dict.fromkeys(_owner_path(key) for key in keys))
        for key in keys:
            owner, role = _owner_path(key), roles[key]
            inward = _inward_axis(model, key)
            padded = inward if inward is not None and _grown_axes(tuple(shapes[key]), wider.get(key)) == sorted(
                {role.axis, inward}) else None
            inner = owner != owners[-1] and any(_grows_input(model, other, shapes, wider)
                                                for other in keys if _owner_path(other) != owner)
            if inner or padded is not None:
                updated[key] = StreamRole(role.axis, None, stem=not inner, internal=inner, padded_input=padded)
    return updated


def _is_stream_vector(key: str, shape: tuple[int, ...], topology: Topology) -> bool:
    """A 1-d tensor of the stream's width held by a module outside the layers as a parameter of its own (not a
    linear map's or a norm's weight or bias): a learned feature the code places among the stream's tokens, as
    LLaVA-NeXT appends ``image_newline`` after each row of projected image features. It is lifted like them."""
    leaf = key.rpartition(".")[2]
    return len(shape) == 1 and leaf not in ("weight", "bias") and not any(inside(key, layer.path)
                                                                           for layer in topology.layers)


def projection_modules(roles: Mapping[str, StreamRole]) -> dict[str, tuple[str, ...]]:
    """The modules that hold projections into the stream, each with its linear maps in the order they are built
    (the tensors of a module come in that order): what ``check_projections`` runs."""
    found: dict[str, dict[str, None]] = {}
    for key, role in roles.items():
        if (role.stem or role.internal) and not role.head:
            owner = _owner_path(key)
            found.setdefault(owner.rpartition(".")[0], {})[owner] = None
    return {parent: tuple(owners) for parent, owners in found.items()}


def _owner_path(key: str) -> str:
    """The module a tensor belongs to."""
    return key.rpartition(".")[0]


def _inward_axis(model: nn.Module, key: str) -> int | None:
    """The input axis of a linear map's weight (None for a bias or anything else)."""
    path, _, leaf = key.rpartition(".")
    layout = linear_layout(model.get_submodule(path)) if leaf == "weight" else None
    return None if layout is None else (1 if layout == "out_in" else 0)


def _grows_input(model: nn.Module, key: str, shapes: Mapping[str, torch.Size],
                 wider: Mapping[str, torch.Size]) -> bool:
    inward = _inward_axis(model, key)
    return inward is not None and inward in _grown_axes(tuple(shapes[key]), wider.get(key))


def _projects_into_stream(model: nn.Module, key: str, axis: int, topology: Topology) -> bool:
    """A linear map outside the layers whose output axis is the stream's (``axis`` found so) and that reads no
    norm: all it can do is put its output into the stream, as a multimodal projector puts image or audio
    features in place of their tokens' embeddings."""
    path, _, leaf = key.rpartition(".")
    outward = {"out_in": 0, "in_out": 1}.get(linear_layout(model.get_submodule(path)) or "")
    if outward is None or any(inside(key, layer.path) for layer in topology.layers):
        return False
    return (leaf == "weight" and axis == outward) or leaf == "bias"


def _stream_axis(model: nn.Module, key: str, shape: tuple[int, ...], wider: torch.Size | None,
                 reading: bool) -> int | None:
    """The axis of ``key`` that carries the stream, or None where it carries none (or not one only)."""
    inward = _inward_axis(model, key)
    if inward is not None:  # (out, in) or Conv1D's (in, out): the side the stream is on follows from the role
        if reading:
            return inward
        outward = 1 - inward
        grew = wider is not None and len(wider) == 2 and wider[outward] == shape[outward] + 1
        return outward if grew else None
    grown = _grown_axes(shape, wider)
    if len(grown) != 1 or wider is None:
        return None
    others_kept = all(wide == size for axis, (size, wide) in enumerate(zip(shape, wider, strict=True))
                      if axis != grown[0])
    return grown[0] if others_kept else None


def _grown_axes(shape: tuple[int, ...], wider: torch.Size | None) -> list[int]:
    """The axes the wider code made one longer (none where it builds the tensor with another rank, or not)."""
    if wider is None or len(wider) != len(shape):
        return []
    return [axis for axis, (size, wide) in enumerate(zip(shape, wider, strict=True)) if wide == size + 1]


def inside(path: str, module: str) -> bool:
    """Whether ``path`` lies inside ``module`` ("" holds everything)."""
    return not module or path.startswith(module + ".")
