"""RMSNorm -> LayerNorm, exact, by one extra hidden dimension (docs/design.md §5).

A trained RMSNorm model's stream does not have zero mean, so LayerNorm cannot replace RMSNorm in place.
Carry the stream into d+1 dimensions with ``U`` ((d+1) x d, orthonormal columns orthogonal to the
all-ones vector): ``h' = U h`` has zero mean and the same norm, so a LayerNorm over d+1 with
``eps' = eps * d/(d+1)`` equals ``sqrt((d+1)/d) * U * RMSNorm_1(h)``. Then

* writers (embedding rows, every branch's output projection): ``W -> U W``;
* readers of a norm with weight g (q/k/v, gate/up, lm_head): ``W -> W diag(g) U^T / sqrt((d+1)/d)``, with
  g = 1 + w for Gemma's offset norms;
* every norm becomes a LayerNorm over d+1 with weight 1, bias 0.

Any Pre-RMSNorm decoder with an LM head is tried; no list of families decides. The target is the family's own
code with ``hidden_size = d+1`` (and ``head_dim`` written into its config where the family derived it from
``hidden_size``), built on the meta device: a family whose code sizes something else from ``hidden_size``
builds tensors of other shapes than the map makes, and is refused with the tensor and both shapes. Code that
scales the embeddings by a function of ``hidden_size`` (Gemma: sqrt(d)) is measured on both widths and the
stems folded into the embedding rows (``measure_embedding_stem``). Tied embeddings become two tensors with ``untie``.
The numerical check (logits within 1e-4 x max|reference| in fp32) then decides exactness. Everything is
computed in float64.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..codegen.derive import layer_norm_edits
from ..codegen.package import GeneratedModule
from ..detect import inspect
from ..detect.source import build_meta_model
from ..errors import NormswapError, first_line
from ..topology import Topology
from .generated import generate_family_code
from .native import meta_instance
from .norm_kind import (
    ExactnessReport,
    NormKindPlan,
    branch_writers,
    check_exact,
    fused_experts,
    linear_calls,
    linear_layout,
)
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
    _require_pre_rms_norm_decoder(model, topology)
    d = int(model.config.hidden_size)
    input_path = _path_of(model, model.get_input_embeddings())
    output_path = _path_of(model, model.get_output_embeddings())
    tied = _tied(model)
    if tied and not untie:
        raise NormswapError(_tied_refusal(model, family, d))
    norms = tuple(n.path for n in topology.residual_norms)
    final = topology.stacks[0].final_norm.path  # type: ignore[union-attr]
    offsets = {n.path: 1.0 if n.kind == "rmsnorm-offset" else 0.0 for n in topology.stream_norms}
    order, readers = linear_calls(model, norms)
    for norm, found in readers.items():
        if not found:
            raise NormswapError(f"no linear map reads {norm}'s output in {family}; the extra-dimension map moves "
                                "each norm's weight into the linear maps that read it")
    readers[final] = [output_path]  # lm_head reads a slice of the final norm's output
    writers = branch_writers(order, topology)
    embeddings = [path for path, module in model.named_modules() if isinstance(module, nn.Embedding)
                  and not any(path.startswith(layer.path + ".") for layer in topology.layers)]

    lift = orthonormal_lift(d)
    scale = math.sqrt((d + 1) / d)
    source_shapes = shapes_of(model.state_dict())
    steps: dict[str, Step] = {key: copy_of(key) for key in source_shapes}
    made = {key: tuple(shape) for key, shape in source_shapes.items()}  # each output's shape, as the edits go
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        # lm_head gets its own copy of the original rows, transformed below as a reader
        steps[f"{output_path}.weight"] = copy_of(f"{input_path}.weight")
        made[f"{output_path}.weight"] = made[f"{input_path}.weight"]
    for path in writers:
        _lift_writer(model.get_submodule(path), path, steps, made, lift, family)
    for norm, found in readers.items():
        gamma = steps.pop(f"{norm}.weight")
        for reader in found:
            if linear_layout(model.get_submodule(reader)) != "out_in":
                raise NormswapError(f"{reader} in {family} is a {type(model.get_submodule(reader)).__name__}, not "
                                    "an nn.Linear; the extra-dimension map moves norm weights into nn.Linear readers")
            steps[f"{reader}.weight"] = combine(
                lambda weight, gamma, offset=offsets[norm]: _read_through(weight, gamma, offset, lift, scale),
                steps[f"{reader}.weight"], gamma)
            rows, _ = made[f"{reader}.weight"]
            made[f"{reader}.weight"] = (rows, d + 1)
        steps[f"{norm}.weight"] = combine(lambda gamma: torch.ones(d + 1, dtype=gamma.dtype), gamma)
        steps[f"{norm}.bias"] = combine(lambda gamma: torch.zeros(d + 1, dtype=gamma.dtype), gamma)
        made[f"{norm}.weight"] = made[f"{norm}.bias"] = (d + 1,)

    for path in embeddings:
        rows, _ = made[f"{path}.weight"]
        made[f"{path}.weight"] = (rows, d + 1)

    generated, cls, config = _generated_layer_norm_target(model, topology, d, untie=tied)
    target = _build_wider(cls, config, family)
    _require_same_tensors(family, made, shapes_of(target.state_dict()))
    _require_scaled_eps(family, topology, target, d)
    first_layer = topology.layers[0].path
    source_stem = measure_embedding_stem(build_meta_model(model).model, first_layer, family)
    wider_stem = measure_embedding_stem(target, first_layer, family)
    for path in embeddings:  # the measured stem is the token embedding's; other stem embeddings are only lifted
        stem = source_stem if path == input_path else EmbeddingStem(wider_stem.scale)
        steps[f"{path}.weight"] = combine(
            lambda weight, stem=stem: _wide(weight, lambda rows: stem.fold(rows, wider_stem, lift)),
            steps[f"{path}.weight"])

    plan = NormKindPlan(family, generated.model_type, f"generated code: {generated.file_name}",
                        (*norms, final), tuple(writers + embeddings), kind="layernorm", untied=tied)
    notes = source_stem.describe(wider_stem) + ("; lm_head untied" if tied else "")
    return ConversionSetup(plan, TensorProgram(steps), cls, config, generated,
                           f"norm rmsnorm -> layernorm (exact, hidden {d} -> {d + 1}{notes})",
                           verify=lambda original, converted, probe: check_exact(original, converted, probe,
                                                                                 logits_only=True))


def convert_to_layer_norm_exact(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None, *,
                                untie: bool = False
                                ) -> tuple[nn.Module, NormKindPlan, ExactnessReport, GeneratedModule]:
    """The exact LayerNorm twin of a Pre-RMSNorm model, one hidden dimension wider, verified."""
    converted, setup, report = convert_in_memory(model, plan_layer_norm_exact(model, untie=untie), inputs)
    return converted, setup.plan, report, setup.generated


@dataclass(frozen=True)
class EmbeddingStem:
    """What a family's code does between the token embedding and the first layer, measured.

    The stream entering the first layer is ``scale * e + mean_gain * sum(e) * 1`` for an embedding row e: a
    scale (Gemma: sqrt(hidden_size); most families: 1) and, for code that centres the stream (normswap's own
    LayerNorm -> RMSNorm output), a pull along the all-ones vector.
    """

    scale: float
    mean_gain: float = 0.0

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


def _read_through(weight: torch.Tensor, gamma: torch.Tensor, offset: float, lift: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """``W diag(offset + g) U^T / sqrt((d+1)/d)`` in float64: a reader of the norm's output, one dimension wider."""
    return (weight.double() * (offset + gamma.double()) @ lift.T / scale).to(weight.dtype)


def _wide(tensor: torch.Tensor, function: Any) -> torch.Tensor:
    """``function`` applied in float64, the result back in the tensor's dtype."""
    return function(tensor.double()).to(tensor.dtype)


def _require_pre_rms_norm_decoder(model: nn.Module, topology: Topology) -> None:
    """The structure the map needs: one stack of Pre-RMSNorm layers, with an LM head and no embedding norm."""
    family = topology.model_type
    if len(topology.stacks) != 1 or getattr(model.config, "is_encoder_decoder", False):
        raise NormswapError(f"{family} has {len(topology.stacks)} layer stacks (an encoder-decoder); exact RMSNorm -> "
                            "LayerNorm handles one decoder stack with its LM head")
    kinds = {n.kind for n in topology.stream_norms}
    if topology.placement != "pre" or not kinds or not kinds <= _NORM_KINDS:
        raise NormswapError(f"{family} is not a Pre-RMSNorm model ({topology.summary()}); exact RMSNorm -> "
                            "LayerNorm needs every norm before its branch (plain or 1 + w RMSNorms), where it reads "
                            "the stream and only linear maps read it")
    if topology.stacks[0].final_norm is None or model.get_output_embeddings() is None:
        raise NormswapError(f"exact RMSNorm -> LayerNorm needs {family} with its final norm and LM head (e.g. "
                            "...ForCausalLM): the final norm's weight moves into lm_head")
    if topology.stacks[0].embedding_norm is not None:
        raise NormswapError(f"{topology.stacks[0].embedding_norm.path} normalises {family}'s raw embeddings, which "
                            "the extra dimension changes; exact RMSNorm -> LayerNorm needs a stream that starts as "
                            "the embeddings")
    if not isinstance(model.get_input_embeddings(), nn.Embedding):
        raise NormswapError(f"{family}'s input embedding is a {type(model.get_input_embeddings()).__name__}, not an "
                            "nn.Embedding, whose rows the extra-dimension map lifts")
    for path, module in model.named_modules():
        if fused_experts(module):
            raise NormswapError(f"{path} in {family} holds its mixture-of-experts weights fused in 3-d tensors; the "
                                "extra-dimension map lifts and reads through nn.Linear maps only")
    eps_field(model.config, topology, family)


_EPS_FIELDS = ("rms_norm_eps", "norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rms_norm_epsilon", "eps",
               "norm_epsilon")


def eps_field(config: Any, topology: Topology, family: str) -> str:
    """The config field the norms take their eps from (Llama's ``rms_norm_eps``, CpmAnt's ``eps``): the wider
    LayerNorms need it set to eps * d/(d+1)."""
    values = {norm.eps for norm in topology.stream_norms if norm.eps is not None}
    for name in _EPS_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, float) and all(math.isclose(value, eps) for eps in values):
            return name
    raise NormswapError(f"no field of {family}'s config holds its norms' eps ({', '.join(map(str, sorted(values)))}), "
                        "which the wider LayerNorms must take as eps * d/(d+1)")


def _tied(model: nn.Module) -> bool:
    """Whether lm_head shares the token embedding's tensor, or the config asks for it to."""
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return output.weight is embedding.weight or bool(getattr(model.config, "tie_word_embeddings", False))


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


def _lift_writer(module: nn.Module, path: str, steps: dict[str, Step], made: dict[str, tuple[int, ...]],
                 lift: torch.Tensor, family: str) -> None:
    if linear_layout(module) != "out_in":
        raise NormswapError(f"{path} in {family} is a {type(module).__name__}, not an nn.Linear; the extra-dimension "
                            "map lifts nn.Linear writers only")
    for key in (f"{path}.weight", f"{path}.bias"):
        if key in steps:
            steps[key] = combine(lambda tensor: _wide(tensor, lambda t: lift @ t), steps[key])
            made[key] = (made[key][0] + 1, *made[key][1:])


def _path_of(model: nn.Module, target: nn.Module) -> str:
    return next(path for path, module in model.named_modules() if module is target)


def _generated_layer_norm_target(model: nn.Module, topology: Topology, d: int, untie: bool
                                 ) -> tuple[GeneratedModule, Any, Any]:
    """The family's code with LayerNorms, and its config one dimension wider.

    ``head_dim`` is written where the source config leaves it to be derived from ``hidden_size``, so that
    families reading ``getattr(config, "head_dim", hidden_size // heads)`` keep their head size.
    """
    config = model.config
    eps = eps_field(config, topology, topology.model_type)
    values: dict[str, Any] = {"hidden_size": d + 1, eps: getattr(config, eps) * d / (d + 1)}
    head_dim = getattr(config, "head_dim", None)
    heads = getattr(config, "num_attention_heads", None)
    if head_dim or heads:
        values["head_dim"] = head_dim or d // heads
    if untie:
        values["tie_word_embeddings"] = False
    try:
        return generate_family_code(model, topology, layer_norm_edits(model, topology),
                                    f"norm RMSNorm -> LayerNorm (exact: one extra hidden dimension, {d} -> {d + 1})",
                                    values, layer_norm=True)
    except NormswapError:
        raise
    except Exception as error:  # the family's config refuses the wider values
        raise NormswapError(f"{topology.model_type}'s config does not take hidden_size {d + 1} "
                            f"({type(error).__name__}: {first_line(error)})") from error


def _build_wider(cls: Any, config: Any, family: str) -> nn.Module:
    """The wider target on the meta device; its own code failing to build is a structural refusal."""
    try:
        return meta_instance(cls, copy.deepcopy(config))
    except Exception as error:  # the family's code cannot be built one dimension wider
        raise NormswapError(f"{family}'s code does not build with hidden_size {config.hidden_size} "
                            f"({type(error).__name__}: {first_line(error)}); exact RMSNorm -> LayerNorm needs code "
                            "whose only use of hidden_size is the stream's width") from error


def _require_same_tensors(family: str, made: dict[str, tuple[int, ...]], built: dict[str, torch.Size]) -> None:
    """The wider code must expect exactly the tensors the map makes, in the same shapes."""
    mismatched = [key for key in made if key in built and tuple(built[key]) != made[key]]
    if mismatched:
        key = mismatched[0]
        more = f" (and {len(mismatched) - 1} more like it)" if len(mismatched) > 1 else ""
        raise NormswapError(f"{family}'s code sizes {key} from hidden_size beyond the stream's width: one dimension "
                            f"wider it builds {tuple(built[key])}, the map makes {made[key]}{more}; exact RMSNorm -> "
                            "LayerNorm needs code that sizes attention by head_dim and uses hidden_size only as the "
                            "stream's width (leave out --exact for the approximate conversion)")
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
