"""RMSNorm -> LayerNorm, exact, by one extra hidden dimension (docs/design.md §5).

A trained RMSNorm model's stream does not have zero mean, so LayerNorm cannot replace RMSNorm in place.
Carry the stream into d+1 dimensions with ``U`` ((d+1) x d, orthonormal columns orthogonal to the
all-ones vector): ``h' = U h`` has zero mean and the same norm, so a LayerNorm over d+1 with
``eps' = eps * d/(d+1)`` equals ``sqrt((d+1)/d) * U * RMSNorm_1(h)``. Then, along each tensor's stream axis,

* writers (embedding rows, every branch's output projections, fused experts' ``down_proj`` and its bias, a
  multimodal projection into the stream): ``W -> U W``;
* readers of a norm with weight g (q/k/v, gate/up, routers, fused experts' ``gate_up_proj``, lm_head):
  ``W -> W diag(g) U^T / sqrt((d+1)/d)``, with g = 1 + w for Gemma's offset norms;
* every norm becomes a LayerNorm over d+1 with weight 1, bias 0.

Any Pre-RMSNorm decoder with an LM head is tried; no list of families or tensor names decides. The target is
the family's own code with ``hidden_size = d+1`` (and ``head_dim`` written into its config where the family
derived it from ``hidden_size``; a composite's values go into the sub-config its language model is built from),
built on the meta device. The axes that code grows by one are the stream's axes; which tensors read a norm's
output is seen by running the model on the meta device and following what each op computes from
(``trace_stream_uses``), so raw router weights and fused 3-d experts in either layout get their roles as
nn.Linear maps do. A family whose code sizes something else from ``hidden_size`` builds tensors of other
shapes than the map makes, and is refused with the tensor and both shapes. Code that scales the embeddings by
a function of ``hidden_size`` (Gemma: sqrt(d)) is measured on both widths and the stems folded into the
embedding rows (``measure_embedding_stem``). Tied embeddings become two tensors with ``untie``. The numerical
check (logits within 1e-4 x max|reference| in fp32) then decides exactness. Everything is computed in float64.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..codegen.derive import layer_norm_edits
from ..codegen.package import GeneratedModule
from ..detect import inspect
from ..detect.capture import synthetic_inputs
from ..detect.meta_answers import AnswerDataQuestions
from ..detect.source import build_meta_model
from ..errors import NormswapError, first_line
from ..topology import Topology
from .generated import generate_family_code
from .native import meta_instance, meta_twin
from .norm_kind import ExactnessReport, NormKindPlan, check_exact, linear_layout
from .program import Step, TensorProgram, combine, copy_of, shapes_of
from .setup import ConversionSetup, convert_in_memory

_NORM_KINDS = frozenset({"rmsnorm", "rmsnorm-offset"})  # plain RMSNorm, and Gemma's (1 + w) RMSNorm
_PROBE_TOKENS = 6  # rows of the probe's token table: zero-mean, all-ones, four random


def orthonormal_lift(d: int) -> torch.Tensor:
    """U, (d+1) x d in float64: orthonormal columns orthogonal to the all-ones vector (a Householder reflection)."""
    ones = torch.full((d + 1,), 1.0 / math.sqrt(d + 1), dtype=torch.float64)
    last = torch.zeros(d + 1, dtype=torch.float64)
    last[-1] = 1.0
    v = last - ones
    reflection = torch.eye(d + 1, dtype=torch.float64) - 2.0 * torch.outer(v, v) / v.dot(v)
    return reflection[:, :d]  # the reflection maps e_{d+1} to ones/sqrt(d+1); the other columns are orthogonal to it


def plan_layer_norm_exact(model: nn.Module, *, untie: bool = False) -> ConversionSetup:
    """Plan the exact LayerNorm twin of a Pre-RMSNorm model, one hidden dimension wider.

    With ``untie``, tied input and output embeddings become two tensors (the map changes them differently);
    without it a tied model is refused with the memory that untying costs.
    """
    topology = inspect(model)
    family = topology.model_type
    stream = _require_pre_rms_norm_decoder(model, topology)
    d = int(stream.config.hidden_size)
    input_path = _path_of(model, model.get_input_embeddings())
    output_path = _path_of(model, model.get_output_embeddings())
    tied = _tied(model, stream)
    norms = tuple(n.path for n in topology.residual_norms)
    final = topology.stacks[0].final_norm.path  # type: ignore[union-attr]
    offsets = {n.path: 1.0 if n.kind == "rmsnorm-offset" else 0.0 for n in topology.stream_norms}
    embeddings = [path for path, module in model.named_modules() if isinstance(module, nn.Embedding)
                  and _inside(path, stream.path) and not any(_inside(path, layer.path) for layer in topology.layers)]

    generated, cls, config = _generated_layer_norm_target(model, topology, stream, d, untie=tied)
    target = _build_wider(cls, config, family, d)
    built = shapes_of(target.state_dict())
    uses = trace_stream_uses(model, (*norms, final), family).with_reader(f"{output_path}.weight", final)
    read = {norm for found in uses.reads.values() for norm in found}
    for norm in norms:
        if norm not in read:
            raise NormswapError(f"no linear map reads {norm}'s output in {family}; the extra-dimension map moves "
                                "each norm's weight into the linear maps that read it")

    lift = orthonormal_lift(d)
    scale = math.sqrt((d + 1) / d)
    source_shapes = shapes_of(model.state_dict())
    steps: dict[str, Step] = {key: copy_of(key) for key in source_shapes}
    made = {key: tuple(shape) for key, shape in source_shapes.items()}  # each output's shape, as the edits go
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        # lm_head gets its own copy of the original rows, transformed below as a reader
        steps[f"{output_path}.weight"] = copy_of(f"{input_path}.weight")
        made[f"{output_path}.weight"] = made[f"{input_path}.weight"]
    norm_keys = {f"{norm}.{leaf}" for norm in (*norms, final) for leaf in ("weight", "bias")}
    skip = norm_keys | {f"{path}.weight" for path in embeddings}
    roles = stream_roles(model, topology, source_shapes, built, uses, skip)
    for key, role in roles.items():
        steps[key] = _mapped(steps[key], role, offsets, lift, scale)
        made[key] = tuple(size + 1 if axis == role.axis else size for axis, size in enumerate(made[key]))
    fused = any(len(source_shapes[key]) > 2 for key in roles)
    if fused:
        _run_experts_eagerly(config)
    for norm in (*norms, final):
        gamma = copy_of(f"{norm}.weight")
        steps[f"{norm}.weight"] = combine(lambda gamma: torch.ones(d + 1, dtype=gamma.dtype), gamma)
        steps[f"{norm}.bias"] = combine(lambda gamma: torch.zeros(d + 1, dtype=gamma.dtype), gamma)
        made[f"{norm}.weight"] = made[f"{norm}.bias"] = (d + 1,)

    for path in embeddings:
        rows, _ = made[f"{path}.weight"]
        made[f"{path}.weight"] = (rows, d + 1)

    _require_same_tensors(family, made, built, stream.path)
    _require_scaled_eps(family, topology, target, d)
    first_layer = topology.layers[0].path
    source_stem = measure_embedding_stem(build_meta_model(model).model, first_layer, family)
    wider_stem = measure_embedding_stem(target, first_layer, family)
    projections = list(dict.fromkeys(_owner(model, key) for key, role in roles.items() if role.stem))
    if projections:
        _require_unscaled_stem(family, projections[0], source_stem, wider_stem)
    if tied and not untie:  # asked last, so that a model refused for its structure is never sent to untie first
        raise NormswapError(_tied_refusal(model, family, d))
    for path in embeddings:  # the measured stem is the token embedding's; other stem embeddings are only lifted
        stem = source_stem if path == input_path else EmbeddingStem(wider_stem.scale)
        steps[f"{path}.weight"] = combine(
            lambda weight, stem=stem: _wide(weight, lambda rows: stem.fold(rows, wider_stem, lift)),
            steps[f"{path}.weight"])

    writers = dict.fromkeys(_owner(model, key) for key, role in roles.items() if role.reads is None)
    plan = NormKindPlan(family, generated.model_type, f"generated code: {generated.file_name}",
                        (*norms, final), (*writers, *embeddings), kind="layernorm", untied=tied)
    notes = source_stem.describe(wider_stem) + ("; lm_head untied" if tied else "") + (
        f"; {', '.join(projections)} lifted as projections into the stream, which token probes do not run"
        if projections else "") + ("; fused experts run eagerly (grouped_mm needs rows of 16 bytes)" if fused else "")
    return ConversionSetup(plan, TensorProgram(steps), cls, config, generated,
                           f"norm rmsnorm -> layernorm (exact, hidden {d} -> {d + 1}{notes})",
                           verify=lambda original, converted, probe: check_exact(original, converted, probe,
                                                                                 logits_only=True))


def _mapped(step: Step, role: StreamRole, offsets: Mapping[str, float], lift: torch.Tensor, scale: float) -> Step:
    """One tensor's step made one dimension wider along its stream axis: lifted (a writer) or read through its
    norm's weight (a reader)."""
    norm, axis = role.reads, role.axis
    if norm is None:
        return combine(lambda tensor: _wide(tensor, lambda wide: _along(wide, axis, lift.T)), step)
    return combine(lambda weight, gamma: _read_through(weight, gamma, offsets[norm], lift, scale, axis),
                   step, copy_of(f"{norm}.weight"))


def _require_unscaled_stem(family: str, projection: str, source: EmbeddingStem, wider: EmbeddingStem) -> None:
    """A projection into the stream is lifted as it is only where nothing scales what enters the first layer."""
    if not (source.unscaled and wider.unscaled):
        raise NormswapError(f"{projection} puts its output into {family}'s stream from outside the language model, "
                            f"whose code scales the token embeddings by {source.scale:.6g} ({wider.scale:.6g} one "
                            "dimension wider); whether that scale applies to the projection's output too cannot be "
                            "measured from token inputs, so its lift would be a guess")


def convert_to_layer_norm_exact(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None, *,
                                untie: bool = False
                                ) -> tuple[nn.Module, NormKindPlan, ExactnessReport, GeneratedModule]:
    """The exact LayerNorm twin of a Pre-RMSNorm model, one hidden dimension wider, verified."""
    converted, setup, report = convert_in_memory(model, plan_layer_norm_exact(model, untie=untie), inputs)
    return converted, setup.plan, report, setup.generated


@dataclass(frozen=True)
class StreamUses:
    """How a model's tensors met its norms' outputs in one run.

    ``reads[key]``: the norms whose output (or a reshaped, indexed or cast view of it) the tensor was computed
    with directly, as a linear map's weight, a router's raw weight or a fused expert's matrix is; ``used``: every
    tensor the run computed with, so that a tensor that never ran is not taken for a writer.
    """

    reads: Mapping[str, frozenset[str]]
    used: frozenset[str]

    def with_reader(self, key: str, norm: str) -> StreamUses:
        """These uses, with ``key`` reading ``norm`` only (lm_head reads a slice of the final norm's output)."""
        return StreamUses({**self.reads, key: frozenset({norm})}, self.used | {key})


@dataclass(frozen=True)
class StreamRole:
    """What one tensor does with the stream, along which of its axes: read a norm's output, or write the stream."""

    axis: int
    reads: str | None  # the norm whose output it reads; None for a writer
    stem: bool = False  # a linear map outside the layers whose output enters the stream (a modality's projection)


def trace_stream_uses(model: nn.Module, norms: tuple[str, ...], family: str) -> StreamUses:
    """Which tensors read which norm's output, found by running the model's meta twin once and following, op by
    op, what each intermediate tensor is computed from (``_StreamTracer``); no weights are read.

    Decorated fused experts run as ``batched_mm``, which picks each token's experts by indexing, not by asking
    the routing's values, so that on the meta device their matrices run too (the eager loop asks which experts
    were hit, which meta tensors cannot answer).
    """
    meta = _meta_twin_running_experts(model)
    tracer = _StreamTracer(meta.state_dict(keep_vars=True))
    handles = [meta.get_submodule(path).register_forward_hook(
        lambda module, args, output, path=path: tracer.mark_stream(output, path)) for path in norms]
    try:
        with torch.no_grad(), AnswerDataQuestions(), tracer:
            meta(**synthetic_inputs(meta, meta.config))
    except Exception as error:  # the family's own code failed on meta inputs: say so, with its reason
        raise NormswapError(f"cannot run {family} on the meta device to find what reads its norms' outputs "
                            f"({type(error).__name__}: {first_line(error)})") from error
    finally:
        for handle in handles:
            handle.remove()
    return StreamUses({key: frozenset(found) for key, found in tracer.reads.items()}, frozenset(tracer.used))


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
    both or several streams (``mixed``), after which nothing it meets reads a norm's output."""

    stream: str | None = None
    weights: frozenset[str] = frozenset()
    mixed: bool = False


_MIXED = _Origin(mixed=True)
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
        self.used |= weights
        if len(streams) == 1 and weights:
            for key in weights:
                self.reads.setdefault(key, set()).update(streams)
        if any(origin.mixed for origin in origins) or len(streams) > 1 or (streams and weights):
            return _MIXED
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
        # anything else outside the branches is left to the shape check, which names it
    return roles


def _projects_into_stream(model: nn.Module, key: str, axis: int, topology: Topology) -> bool:
    """A linear map outside the layers whose output axis is the stream's (``axis`` found so) and that reads no
    norm: all it can do is put its output into the stream, as a multimodal projector puts image or audio
    features in place of their tokens' embeddings."""
    path, _, leaf = key.rpartition(".")
    outward = {"out_in": 0, "in_out": 1}.get(linear_layout(model.get_submodule(path)) or "")
    if outward is None or any(_inside(key, layer.path) for layer in topology.layers):
        return False
    return (leaf == "weight" and axis == outward) or leaf == "bias"


def _stream_axis(model: nn.Module, key: str, shape: tuple[int, ...], wider: torch.Size | None,
                 reading: bool) -> int | None:
    """The axis of ``key`` that carries the stream, or None where it carries none (or not one only)."""
    path, _, leaf = key.rpartition(".")
    layout = linear_layout(model.get_submodule(path)) if leaf == "weight" else None
    if layout is not None:  # (out, in) or Conv1D's (in, out): the side the stream is on follows from the role
        inward = 1 if layout == "out_in" else 0
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


@dataclass(frozen=True)
class EmbeddingStem:
    """What a family's code does between the token embedding and the first layer, measured.

    The stream entering the first layer is ``scale * e + mean_gain * sum(e) * 1`` for an embedding row e: a
    scale (Gemma: sqrt(hidden_size); most families: 1) and, for code that centres the stream (normswap's own
    LayerNorm -> RMSNorm output), a pull along the all-ones vector.
    """

    scale: float
    mean_gain: float = 0.0

    @property
    def unscaled(self) -> bool:
        """The stream starts as the embedding rows themselves (most families)."""
        return math.isclose(self.scale, 1.0, rel_tol=1e-6) and self.mean_gain == 0.0

    def fold(self, rows: torch.Tensor, wider: EmbeddingStem, lift: torch.Tensor) -> torch.Tensor:
        """Embedding rows (float64) for the wider code, whose stream must be U times this code's stream.

        The lifted rows have zero mean, where the wider code's stem is its scale alone, so
        ``e' = U (scale e + mean_gain sum(e) 1) / wider.scale``.
        """
        stream = self.scale * rows
        if self.mean_gain:
            stream = stream + self.mean_gain * rows.sum(-1, keepdim=True)
        return stream @ lift.T / wider.scale

    def describe(self, wider: EmbeddingStem) -> str:
        """The plan's note, empty where the rows are only lifted."""
        if self.scale == wider.scale and not self.mean_gain:
            return ""
        centred = " and its centring" if self.mean_gain else ""
        return f"; the code's embedding scale {self.scale:.6g} -> {wider.scale:.6g}{centred} folded into the rows"


class _FirstLayerReachedError(Exception):
    """Stops a probe at the first layer: everything after it has no weights and is not needed."""


def measure_embedding_stem(meta: nn.Module, first_layer: str, family: str) -> EmbeddingStem:
    """How the stream entering ``first_layer`` follows from the token embedding rows, measured on ``meta``.

    Why measure: a family may scale its embeddings in code by a function of ``hidden_size`` (Gemma multiplies
    by sqrt(hidden_size), as a buffer), which one more dimension changes; measured on both widths, the stems
    fold into the embedding rows (``EmbeddingStem.fold``), so the wider stream is exactly U times the original
    one. No family is named.

    How: ``meta`` (weightless, consumed: pass a model of its own) gets its computed buffers back as transformers
    gives them when it loads a checkpoint (NaN first, then ``initialize_weights``, so an unset one shows), and a
    token table of a few rows of signed powers of two, which any scale multiplies exactly: a zero-mean row gives
    the scale, an all-ones row the pull along the all-ones vector, and random rows check that the stem is that
    map. The first layer's input is captured and the run stopped there. Measured in float32 whatever the
    checkpoint's dtype: bf16 rounds sqrt(2048) and sqrt(2049) alike, which would hide the scale from the fold.
    """
    embedding = meta.get_input_embeddings()
    width = int(embedding.weight.shape[-1])
    table = _probe_rows(width)
    captured: dict[str, Any] = {}

    def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["stream"] = args[0] if args else kwargs.get("hidden_states")
        raise _FirstLayerReachedError

    ids = torch.arange(table.shape[0]).unsqueeze(0)
    handle = meta.get_submodule(first_layer).register_forward_pre_hook(stop, with_kwargs=True)
    try:
        _restore_computed_buffers(meta.float())  # the code's own scale, not its rounding in a bf16 checkpoint
        embedding.weight = nn.Parameter(table, requires_grad=False)
        embedding.padding_idx = None  # only gradients read it; the probe table has fewer rows than the vocabulary
        with torch.no_grad():
            meta.eval()(input_ids=ids, attention_mask=torch.ones_like(ids))
    except _FirstLayerReachedError:
        pass
    except Exception as error:  # the family's own code failed on the probe: say which, and why
        if "stream" not in captured:
            raise NormswapError(f"cannot measure how {family} scales its token embeddings before {first_layer} "
                                f"({type(error).__name__}: {first_line(error)})") from error
    finally:
        handle.remove()
    stream = captured.get("stream")
    if not isinstance(stream, torch.Tensor) or stream.is_meta or stream.shape[-1] != width:
        raise NormswapError(f"cannot measure how {family} scales its token embeddings: the stream entering "
                            f"{first_layer} depends on weights other than the token embedding")
    stream = stream.detach().double().reshape(table.shape)
    rows = table.double()
    zero_mean, nonzero = rows[0], rows[0] != 0
    scale = float((stream[0][nonzero] / zero_mean[nonzero]).mean())
    stem = EmbeddingStem(scale, float(stream[1].mean() - scale) / width)  # row 1 is all ones: scale + width * gain
    expected = stem.scale * rows + stem.mean_gain * rows.sum(-1, keepdim=True)
    if not (math.isfinite(scale) and math.isfinite(stem.mean_gain) and scale != 0.0) or not torch.allclose(
            stream, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max())):
        raise NormswapError(f"{family}'s stream entering {first_layer} is not its token embedding rows times a "
                            "scale (less their mean), so one extra dimension cannot carry it exactly")
    return stem


def _probe_rows(width: int) -> torch.Tensor:
    """A zero-mean row, an all-ones row and random rows, all of signed powers of two (any scale is exact)."""
    generator = torch.Generator().manual_seed(0)
    magnitudes = torch.pow(2.0, torch.randint(-2, 3, (_PROBE_TOKENS, width), generator=generator).float())
    signs = torch.randint(0, 2, (_PROBE_TOKENS, width), generator=generator) * 2 - 1
    rows = signs * magnitudes
    pairs = width // 2
    rows[0] = 0.0
    rows[0, :pairs], rows[0, pairs:2 * pairs] = magnitudes[0, :pairs], -magnitudes[0, :pairs]
    rows[1] = 1.0
    return rows


def _restore_computed_buffers(meta: nn.Module) -> None:
    """Non-persistent buffers (embedding scales, rotary frequencies) onto the CPU with their computed values."""
    persistent = set(meta.state_dict())
    for name, buffer in list(meta.named_buffers()):
        if name in persistent or not buffer.is_meta:
            continue
        owner, _, leaf = name.rpartition(".")
        fill = float("nan") if buffer.is_floating_point() else 0
        setattr(meta.get_submodule(owner), leaf, torch.full_like(buffer, fill, device="cpu"))
    initialize = getattr(meta, "initialize_weights", None)
    if callable(initialize):
        initialize()  # parameters stay on the meta device, where initialisation does nothing


def _read_through(weight: torch.Tensor, gamma: torch.Tensor, offset: float, lift: torch.Tensor, scale: float,
                  axis: int) -> torch.Tensor:
    """``W diag(offset + g) U^T / sqrt((d+1)/d)`` along the stream ``axis``, in float64: a reader of the norm's
    output, one dimension wider (axis 1 of an nn.Linear weight, or the hidden axis of fused experts)."""
    return _wide(weight, lambda wide: _along(wide * _on_axis(offset + gamma.double(), axis, wide.dim()), axis,
                                             lift.T / scale))


def _along(tensor: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """``tensor`` with its ``axis`` multiplied by ``matrix`` (d x d+1): ``U^T`` lifts a writer, ``U^T / s`` reads."""
    return (tensor.movedim(axis, -1) @ matrix).movedim(-1, axis)


def _on_axis(vector: torch.Tensor, axis: int, dims: int) -> torch.Tensor:
    """``vector`` shaped to broadcast along ``axis`` of a ``dims``-dimensional tensor."""
    shape = [1] * dims
    shape[axis] = -1
    return vector.reshape(shape)


def _wide(tensor: torch.Tensor, function: Any) -> torch.Tensor:
    """``function`` applied in float64, the result back in the tensor's dtype."""
    return function(tensor.double()).to(tensor.dtype)


def _require_pre_rms_norm_decoder(model: nn.Module, topology: Topology) -> StreamConfig:
    """The structure the map needs: one stack of Pre-RMSNorm layers, with an LM head and no embedding norm, and a
    config that sizes its stream (returned)."""
    family = topology.model_type
    if len(topology.stacks) != 1 or getattr(model.config, "is_encoder_decoder", False):
        raise NormswapError(f"{family} has {len(topology.stacks)} layer stacks (an encoder-decoder); exact RMSNorm -> "
                            "LayerNorm handles one decoder stack with its LM head")
    kinds = {n.kind for n in topology.stream_norms}
    if topology.placement != "pre" or not kinds or not kinds <= _NORM_KINDS:
        raise NormswapError(f"{family} is not a Pre-RMSNorm model ({topology.summary()}); exact RMSNorm -> "
                            "LayerNorm needs every norm before its branch (plain or 1 + w RMSNorms), where it reads "
                            "the stream and only linear maps read it")
    per_channel = [scale for scale in topology.residual_scales if scale.per_channel]
    if per_channel:
        raise NormswapError(f"{family} scales its residual stream per channel ({per_channel[0].describe()}); the "
                            "extra-dimension map lifts the stream by U (docs/design.md §5), and U(g * h) is no "
                            "per-channel gain of U h unless g is constant, so no exact map exists (leave out --exact "
                            "for the approximate conversion)")
    final = topology.stacks[0].final_norm
    if final is None:
        raise NormswapError(f"{family}'s last layer hands the stream on with no final norm; exact RMSNorm -> "
                            "LayerNorm needs a final norm, which the wider stream U h reaches as a LayerNorm whose "
                            "weight moves into the LM head")
    stream = stream_config(model, topology)
    if model.get_output_embeddings() is None:
        raise NormswapError(_headless_refusal(model, family, final.path, int(stream.config.hidden_size)))
    if topology.stacks[0].embedding_norm is not None:
        raise NormswapError(f"{topology.stacks[0].embedding_norm.path} normalises {family}'s raw embeddings, which "
                            "the extra dimension changes; exact RMSNorm -> LayerNorm needs a stream that starts as "
                            "the embeddings")
    if not isinstance(model.get_input_embeddings(), nn.Embedding):
        raise NormswapError(f"{family}'s input embedding is a {type(model.get_input_embeddings()).__name__}, not an "
                            "nn.Embedding, whose rows the extra-dimension map lifts")
    eps_field(stream.config, topology, family)
    return stream


def _headless_refusal(model: nn.Module, family: str, final: str, d: int) -> str:
    """Why a model without an LM head cannot convert exactly, and the class of its family that can."""
    own, wrapping = _classes_with_a_head(model)
    if own:
        instead = f"load the checkpoint as {' or '.join(own)}, whose LM head takes the final norm's weight"
    elif wrapping:
        instead = (f"{family} has no class of its own with an LM head; {' and '.join(wrapping)} "
                   f"{'wraps' if len(wrapping) == 1 else 'wrap'} it with one, so convert the checkpoint of the model "
                   "that wraps it")
    else:
        instead = f"{family}'s code has no class with a head that reads the final norm, to take its weight"
    return (f"{type(model).__name__} has no LM head: its output is the final norm's ({final}) output itself, which "
            f"one extra dimension makes {d + 1} wide (U times the original), so no weight change keeps it; {instead}")


def _classes_with_a_head(model: nn.Module) -> tuple[list[str], list[str]]:
    """Classes of the model's own modeling module that end in an LM head (``...ForCausalLM`` first): those that
    load the same config, and those that wrap it in a larger one (a vision-language model around its text model)."""
    module = sys.modules.get(type(model).__module__)
    found = [value for value in (vars(module).values() if module else ()) if isinstance(value, type)
             and issubclass(value, nn.Module) and value.__module__ == module.__name__
             and value.__name__.endswith(_HEAD_SUFFIXES)]
    found.sort(key=lambda cls: (not cls.__name__.endswith(_HEAD_SUFFIXES[0]), cls.__name__))
    own = [cls.__name__ for cls in found if getattr(cls, "config_class", None) is type(model.config)]
    return own, [cls.__name__ for cls in found if cls.__name__ not in own]


_HEAD_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration")
_EPS_FIELDS = ("rms_norm_eps", "norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rms_norm_epsilon", "eps",
               "norm_epsilon")


@dataclass(frozen=True)
class StreamConfig:
    """The config that sizes the residual stream: the model's own, or the sub-config its language model is built
    from (a composite's ``text_config``), where ``hidden_size`` and the norms' eps live and the wider values go."""

    field: str | None  # the sub-config's name in the model's config; None for the model's config itself
    config: Any
    path: str  # the module built from it (``model``, a composite's ``model.language_model``); "" for the model


def stream_config(model: nn.Module, topology: Topology) -> StreamConfig:
    """The config of the module that holds the layer stack (the nearest one that has a config), named as the
    model's config names it."""
    path = topology.stacks[0].path
    owner = model
    while path:
        candidate = model.get_submodule(path)
        if getattr(candidate, "config", None) is not None:
            owner = candidate
            break
        path = path.rpartition(".")[0]
    config = owner.config
    if config is model.config:
        return StreamConfig(None, config, path)
    for name in getattr(model.config, "sub_configs", {}) or {}:
        if getattr(model.config, name, None) is config:
            return StreamConfig(name, config, path)
    raise NormswapError(f"{topology.model_type}'s language model is built from a config that is none of "
                        f"{type(model.config).__name__}'s sub-configs, so its wider hidden_size has nowhere to go")


def eps_field(config: Any, topology: Topology, family: str) -> str:
    """The config field the norms take their eps from (Llama's ``rms_norm_eps``, CpmAnt's ``eps``): the wider
    LayerNorms need it set to eps * d/(d+1). ``config`` is the stream's (``stream_config``)."""
    values = {norm.eps for norm in topology.stream_norms if norm.eps is not None}
    for name in _EPS_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, float) and all(math.isclose(value, eps) for eps in values):
            return name
    raise NormswapError(f"no field of {family}'s config holds its norms' eps ({', '.join(map(str, sorted(values)))}), "
                        "which the wider LayerNorms must take as eps * d/(d+1)")


def _tied(model: nn.Module, stream: StreamConfig) -> bool:
    """Whether lm_head shares the token embedding's tensor, or the config asks for it to."""
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return output.weight is embedding.weight or bool(getattr(model.config, "tie_word_embeddings", False)) or bool(
        stream.field and getattr(stream.config, "tie_word_embeddings", False))


def _tied_refusal(model: nn.Module, family: str, d: int) -> str:
    """A tied model's refusal, with what ``--untie`` costs for this model: one more vocab x (d+1) table."""
    vocab = int(model.get_input_embeddings().weight.shape[0])
    dtype = model.get_input_embeddings().weight.dtype
    extra = vocab * (d + 1) * dtype.itemsize
    return (f"{family} ties its input and output embeddings, which the extra-dimension map changes differently "
            f"(rows U e in, E diag(g) U^T out); pass --untie (untie=True) to write lm_head as its own tensor: it adds "
            f"{_size(extra)} ({vocab} x {d + 1} x {dtype.itemsize} bytes)")


def _size(nbytes: int) -> str:
    """A byte count as a one-line message reads best: kB, MB or GB."""
    if nbytes >= 1e9:
        return f"{nbytes / 1e9:.2f} GB"
    return f"{nbytes / 1e6:.0f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:.0f} kB"


def _path_of(model: nn.Module, target: nn.Module) -> str:
    return next(path for path, module in model.named_modules() if module is target)


def _run_experts_eagerly(config: Any) -> None:
    """Ask for transformers' eager expert loop, in memory and in config.json (which hands it back to the config's
    constructor on loading): its default ``grouped_mm`` kernel needs rows of a multiple of 16 bytes, which a
    hidden_size of d + 1 never gives, so fused experts one dimension wider would fail there on every device."""
    config.experts_implementation = "eager"
    config._experts_implementation = "eager"


def _inside(path: str, module: str) -> bool:
    """Whether ``path`` lies inside ``module`` ("" holds everything)."""
    return not module or path.startswith(module + ".")


def _owner(model: nn.Module, key: str) -> str:
    """A writer as the plan names it: the linear map for its weight or bias, else the tensor itself."""
    path, _, leaf = key.rpartition(".")
    return path if leaf in ("weight", "bias") and linear_layout(model.get_submodule(path)) else key


def _generated_layer_norm_target(model: nn.Module, topology: Topology, stream: StreamConfig, d: int, untie: bool
                                 ) -> tuple[GeneratedModule, Any, Any]:
    """The family's code with LayerNorms, and its config one dimension wider.

    ``head_dim`` is written where the source config leaves it to be derived from ``hidden_size``, so that
    families reading ``getattr(config, "head_dim", hidden_size // heads)`` keep their head size. A composite's
    values go into the sub-config its language model is built from.
    """
    config = stream.config
    eps = eps_field(config, topology, topology.model_type)
    values: dict[str, Any] = {"hidden_size": d + 1, eps: getattr(config, eps) * d / (d + 1)}
    head_dim = getattr(config, "head_dim", None)
    heads = getattr(config, "num_attention_heads", None)
    if head_dim or heads:
        values["head_dim"] = head_dim or d // heads
    top: dict[str, Any] = {}
    if untie:
        top["tie_word_embeddings"] = False
        if stream.field and hasattr(config, "tie_word_embeddings"):
            values["tie_word_embeddings"] = False
    if stream.field:
        top[stream.field] = {**config.to_dict(), **values}
    else:
        top.update(values)
    try:
        return generate_family_code(model, topology, layer_norm_edits(model, topology),
                                    f"norm RMSNorm -> LayerNorm (exact: one extra hidden dimension, {d} -> {d + 1})",
                                    top, layer_norm=True)
    except NormswapError:
        raise
    except Exception as error:  # the family's config refuses the wider values
        where = (f"'s {stream.field}, a stock {type(config).__name__} (normswap's generated config class lifts "
                 "the check that hidden_size is a multiple of the heads for a model's own config only)"
                 if stream.field else "'s config")
        raise NormswapError(f"{topology.model_type}{where}, does not take hidden_size {d + 1} "
                            f"({type(error).__name__}: {first_line(error)})") from error


def _build_wider(cls: Any, config: Any, family: str, d: int) -> nn.Module:
    """The wider target on the meta device; its own code failing to build is a structural refusal."""
    try:
        return meta_instance(cls, copy.deepcopy(config))
    except Exception as error:  # the family's code cannot be built one dimension wider
        raise NormswapError(f"{family}'s code does not build with hidden_size {d + 1} "
                            f"({type(error).__name__}: {first_line(error)}); exact RMSNorm -> LayerNorm needs code "
                            "whose only use of hidden_size is the stream's width") from error


def _require_same_tensors(family: str, made: dict[str, tuple[int, ...]], built: dict[str, torch.Size],
                          language_model: str) -> None:
    """The wider code must expect exactly the tensors the map makes, in the same shapes."""
    mismatched = [key for key in made if key in built and tuple(built[key]) != made[key]]
    if mismatched:
        key = mismatched[0]
        more = f" (and {len(mismatched) - 1} more like it)" if len(mismatched) > 1 else ""
        shapes = f"one dimension wider it builds {tuple(built[key])}, the map makes {made[key]}{more}"
        if not _inside(key, language_model):
            raise NormswapError(f"{family}'s code sizes {key}, outside its language model, by the language model's "
                                f"hidden_size: {shapes}; exact RMSNorm -> LayerNorm lifts a projection whose output "
                                "enters the stream, not a width inside another module (leave out --exact for the "
                                "approximate conversion)")
        raise NormswapError(f"{family}'s code sizes {key} from hidden_size beyond the stream's width: {shapes}; "
                            "exact RMSNorm -> LayerNorm needs code that sizes attention by head_dim and uses "
                            "hidden_size only as the stream's width (leave out --exact for the approximate "
                            "conversion)")
    missing, extra = sorted(set(built) - set(made)), sorted(set(made) - set(built))
    if missing or extra:
        raise NormswapError(f"{family}'s code one dimension wider expects other tensors than the map makes: the map "
                            f"makes {extra[:3]} that it lacks, and it expects {missing[:3]} that the map does not make")


def _require_scaled_eps(family: str, topology: Topology, target: nn.Module, d: int) -> None:
    """Every wider LayerNorm must take eps * d/(d+1): the map is exact only with it."""
    for norm in topology.stream_norms:
        found = getattr(target.get_submodule(norm.path), "eps", None)
        if norm.eps is not None and found is not None and not math.isclose(found, norm.eps * d / (d + 1)):
            raise NormswapError(f"{family}'s {norm.path} takes eps {found:g} one dimension wider, not "
                                f"{norm.eps * d / (d + 1):g}: its code does not read eps from the config field "
                                "that holds it")
