"""LayerNorm -> RMSNorm, exact, for Pre-LN models (docs/design.md §4, Jiang et al. 2023).

Every reader of a Pre-LN residual stream is a LayerNorm, which ignores the stream's component along
the all-ones vector. Remove that component everywhere and the LayerNorms see zero-mean inputs, where
``LN(h) = w * h / sqrt(mean(h^2) + eps) + b``: an RMSNorm with the same weight, bias and eps.

* each branch's output projection (the last linear map of the branch) is centred over the hidden
  dimension, in float64, then cast back to the checkpoint dtype. Per-channel parameters the branch applies
  between that map and the residual add are found by behaviour (``branch_scale``): a LayerScale is folded
  into the map first and set to 1 (``diag(l) C W != C diag(l) W``), a bias added there is centred with it;
* the stream is centred once in code before the layer loop, which covers token, position and
  token-type embeddings and an embedding LayerNorm's output without touching any weight, so a tied
  ``lm_head`` stays tied;
* the residual norms become ``NormswapRMSNorm`` (``torch.nn.functional.rms_norm`` plus the LN bias).

The result must match the original on probe inputs to ``1e-4 x max|reference|`` (fp32), or the
conversion fails with the measured figure. A model that returns its raw stream (no norm after the last
residual add, as CLIP's vision tower does for ``last_hidden_state``) has no exact twin: the stream's mean is
gone, and the refusal says so.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..codegen.derive import CodegenError, embedding_layer_norms, loop_owners, rms_norm_edits
from ..codegen.package import GeneratedModule
from ..detect import inspect
from ..detect.capture import synthetic_forward
from ..detect.real_run import on_meta_else_cpu
from ..errors import ExactImpossibleError, ExactnessError, NormswapError, StreamOutputError, StructuralMissError
from ..topology import Topology
from .branch_scale import branch_tails, fold_tail, unfoldable_writers
from .centring_diagnosis import structural_miss
from .generated import generate_family_code
from .model_outputs import output_parts
from .native import meta_twin
from .program import Step, TensorProgram, combine, copy_of, one_plus
from .projection_check import ProjectionCheck
from .repeatable import same_random_draws
from .setup import ConversionSetup, convert_in_memory

_LAYER_NORMS = frozenset({"layernorm", "layernorm-nobias", "layernorm-noaffine", "layernorm-offset"})
_PRE_PLACEMENTS = frozenset({"pre", "parallel"})
TOLERANCE = 1e-4  # of max|reference|, fp32 (docs/design.md §8)
_NOISE_FACTOR = 3.0  # bf16/fp16 bound, in units of the checkpoint's own rounding noise (see check_exact)


@dataclass(frozen=True)
class NormKindPlan:
    """What an exact LayerNorm -> RMSNorm conversion changes. Frozen, printable, JSON-serialisable."""

    source_model_type: str
    target_model_type: str
    realisation: str
    norms: tuple[str, ...]  # LayerNorms that become RMSNorms (weight, bias and eps kept)
    writers: tuple[str, ...]  # linear maps whose outputs are centred
    folded: tuple[str, ...] = ()  # pre norms whose bias moved into the biases of the linear maps reading them
    exact: bool = True
    kind: str = "rmsnorm"  # the target norm kind
    untied: bool = False  # embeddings centred as weights (and lm_head untied) instead of in code
    centred_inputs: tuple[str, ...] = ()  # embedding norms whose input is centred in code
    offset: tuple[str, ...] = ()  # (1 + w) LayerNorms (Nemotron), whose RMSNorm takes the weight 1 + w
    scales: tuple[str, ...] = ()  # per-channel scales after a writer (LayerScale): folded into it, then set to 1
    shifts: tuple[str, ...] = ()  # per-channel biases added after a writer outside it: centred with it
    exact_impossible: str = ""  # why a Pre-LN model converts approximately: the exact map cannot keep its outputs
    notes: tuple[str, ...] = ()  # a no-op's reason (realisation "none")
    scaled_stream: bool = False  # exact LayerNorm from weightless RMSNorms: stream c U h, writers c U W, eps kept

    def describe(self) -> str:
        if self.realisation == "none":
            return "\n".join([f"plan: {self.source_model_type} -> {self.kind} via none; exact: true",
                              *(f"  nothing to do: {note}" for note in self.notes)])
        if self.kind == "layernorm" and not self.exact:
            lines = [f"plan: {self.source_model_type} RMSNorm -> LayerNorm via {self.realisation}; exact: false "
                     "(LayerNorm also removes the stream's mean; heal the result)"]
            lines += [f"  {norm}: RMSNorm -> LayerNorm (weight kept, 1 + w for offset norms; bias 0)"
                      for norm in self.norms]
            return "\n".join(lines)
        if self.kind == "layernorm":
            lines = [f"plan: {self.source_model_type} RMSNorm -> LayerNorm via {self.realisation}; exact: true, "
                     "one extra hidden dimension (writers W -> U W, readers W -> W diag(g) U^T / sqrt((d+1)/d))"]
            if self.scaled_stream:
                lines += [f"  lift {writer} (times sqrt((d+1)/d): the stream is c U h)" for writer in self.writers]
                lines += [f"  {norm}: weightless RMSNorm -> weightless LayerNorm (eps kept)" for norm in self.norms]
            else:
                lines += [f"  lift {writer}" for writer in self.writers]
                lines += [f"  {norm}: RMSNorm -> LayerNorm (weight 1, bias 0, eps * d/(d+1))" for norm in self.norms]
            return "\n".join(lines)
        if not self.exact:
            why = (f"{self.exact_impossible}: the exact map is impossible" if self.exact_impossible else
                   "a Post-LN model's norms read a stream no weight change can centre, where RMSNorm and LayerNorm "
                   "differ")
            lines = [f"plan: {self.source_model_type} LayerNorm -> RMSNorm via {self.realisation}; exact: false "
                     f"({why}; heal the result)"]
            lines += [f"  {norm}: LayerNorm -> RMSNorm (same weight, bias and eps)" for norm in self.norms]
            return "\n".join(lines)
        centring = ("  centre the embedding weights; lm_head keeps an uncentred copy (untied)" if self.untied else
                    "  centre the stream before the layer loop (in code: embedding weights and ties unchanged)")
        lines = [f"plan: {self.source_model_type} LayerNorm -> RMSNorm via {self.realisation}; exact: true", centring]
        lines += [f"  fold {scale} into the writer before it, then set it to 1" for scale in self.scales]
        lines += [f"  centre the output of {writer}" for writer in self.writers]
        lines += [f"  centre {shift}, added to a branch output after its writer" for shift in self.shifts]
        lines += [f"  {norm}: LayerNorm -> RMSNorm "
                  f"({'weight 1 + w' if norm in self.offset else 'same weight'} and eps; "
                  f"{'bias folded into its readers' if norm in self.folded else 'bias kept'}"
                  f"{'; its input, the raw embeddings, centred in code' if norm in self.centred_inputs else ''})"
                  for norm in self.norms]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ExactnessReport:
    """The achieved agreement with the original on probe inputs."""

    exact: bool
    probe_tokens: int
    max_abs_diff: float
    max_abs_reference: float
    relative: float  # max_abs_diff / max_abs_reference, over final hidden states and logits
    tolerance: float
    projections: tuple[ProjectionCheck, ...] = ()  # projections into the stream that token probes do not run

    def summary(self) -> str:
        return "\n".join([f"exact: max abs diff {self.max_abs_diff:.3g} over {self.probe_tokens} probe tokens = "
                          f"{self.relative:.2e} x max|reference| (tolerance {self.tolerance:.1e})",
                          *(f"projection {check.describe()}" for check in self.projections)])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_rms_norm(model: nn.Module, *, fold_bias: bool = True, untie: bool = False) -> ConversionSetup:
    """Plan the exact RMSNorm twin of a Pre-LN ``model`` (loaded or on the meta device).

    With ``fold_bias``, a pre norm's bias moves into the biases of the linear maps that read it
    (``b += W @ beta``) where all of them have one; otherwise it stays an RMSNorm bias. Both are exact;
    if folding ever fails the exactness check, the conversion is redone without it (``fallback``).

    By default the stream is centred in code, which keeps tied embeddings tied. With ``untie`` the
    embedding weights are centred instead and a tied ``lm_head`` gets its own, uncentred copy; that works
    where the stream starts as a sum of embedding lookups.
    """
    topology = inspect(model)
    require_centrable(model, topology, in_code=not untie)
    embedding_norms = embedding_layer_norms(topology)
    if untie and embedding_norms:
        raise NormswapError(f"--untie centres the embedding weights, but {embedding_norms[0].path} (a LayerNorm) "
                            "follows them and its weight and bias make its output uncentred, which no weight "
                            "change can undo: leave out --untie, so that the stream is centred in code")
    meta = meta_twin(model)
    readers, writers, tails = stream_writers(meta, topology)
    folds = {norm: found for norm, found in readers.items() if fold_bias and _can_fold(model, norm, found)}
    embeddings = _embedding_writers(model, topology) if untie else []
    generated, cls, config = _generated_rms_target(model, topology, centre_in_code=not untie)
    plan = NormKindPlan(topology.model_type, generated.model_type, f"generated code: {generated.file_name}",
                        tuple(n.path for n in (*topology.stream_norms, *embedding_norms)),
                        tuple(writers + embeddings), tuple(sorted(folds)), untied=untie,
                        centred_inputs=tuple(n.path for n in embedding_norms),
                        offset=tuple(n.path for n in (*topology.stream_norms, *embedding_norms)
                                     if n.kind == "layernorm-offset"),
                        scales=tuple(key for tail in tails.values() for key in tail.scales),
                        shifts=tuple(key for tail in tails.values() for key in tail.shifts))

    steps = {key: copy_of(key) for key in model.state_dict()}
    centre_writers(model, writers, tails, steps)
    if untie:
        _untie_and_centre_embeddings(model, embeddings, steps, config)
    for norm in (*topology.stream_norms, *embedding_norms):  # Nemotron's (1 + w) LayerNorms: plain weights
        if norm.kind == "layernorm-offset":
            steps[f"{norm.path}.weight"] = combine(one_plus, steps[f"{norm.path}.weight"])
    for norm, found in folds.items():
        _fold_bias(model, norm, found, steps)

    def verify(original: nn.Module, converted: nn.Module, probe: dict[str, torch.Tensor]) -> ExactnessReport:
        try:
            return check_exact(original, converted, probe)
        except StructuralMissError:
            raise
        except ExactnessError as error:
            reason = structural_miss(converted, topology, probe) or _gate_reason(meta, writers)
            if reason is not None:
                raise StructuralMissError(f"{error}; {reason}", reason) from error
            if untie and not folds:
                raise ExactnessError(f"{error}. With --untie only embedding weights are centred, and "
                                     f"{topology.model_type} adds to its stream outside embedding lookups: use the "
                                     "default, which centres the stream in code") from error
            raise

    def fallback(error: ExactnessError) -> ConversionSetup | None:
        if isinstance(error, StructuralMissError):  # no exact variant can keep what the structure changes
            from .approximate_kind import plan_rms_norm_approximate  # it builds on this module's plan

            return plan_rms_norm_approximate(model, exact_impossible=error.reason)
        return plan_rms_norm(model, fold_bias=False, untie=untie) if folds else None

    return ConversionSetup(plan, TensorProgram(steps), cls, config, generated, "norm layernorm -> rmsnorm",
                           verify=verify, fallback=fallback)


def require_centrable(model: nn.Module, topology: Topology, in_code: bool = True) -> None:
    """Raise unless the exact centring of the stream applies: a Pre-LN ``topology`` every reader of whose stream is
    a LayerNorm, and (``in_code``) a class that runs each stack's layer loop, where the stream is centred."""
    _require_pre_layer_norm(topology)
    if in_code:
        _require_loop_owners(model, topology)


def stream_writers(meta: nn.Module, topology: Topology) -> tuple[dict[str, list[str]], list[str], dict[str, Any]]:
    """(each residual norm's linear readers, each branch's writer to the stream, the per-channel tails after
    writers), found on ``meta`` (the model's meta twin) without reading a weight."""
    order, readers = linear_calls(meta, tuple(n.path for n in topology.residual_norms))
    writers = branch_writers(order, topology)
    return readers, writers, branch_tails(meta, writers)


def centre_writers(model: nn.Module, writers: Iterable[str], tails: dict[str, Any], steps: dict[str, Step]) -> None:
    """Centre each writer's output over the hidden features in ``steps`` (float64, cast back): a LayerScale after
    it folded in first, a bias added after it centred with it; then the stream has zero mean wherever the embedding
    side is centred too (in code: ``stream_centring_edits``)."""
    for path in writers:
        module = model.get_submodule(path)
        tail = tails.get(path)
        if tail is not None:  # LayerScale first, then centre: diag(l) C W != C diag(l) W
            fold_tail(tail, _output_dims(module, path, steps), steps)
        _centre_output(module, path, steps)
        for shift in tail.shifts if tail is not None else ():  # a bias added outside the linear map
            steps[shift] = combine(lambda bias: _centred(bias, -1), steps[shift])


def convert_to_rms_norm(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None, *, fold_bias: bool = True,
                        untie: bool = False) -> tuple[nn.Module, NormKindPlan, ExactnessReport, GeneratedModule]:
    """The exact RMSNorm twin of a Pre-LN ``model``, its plan, the exactness report and the generated code."""
    converted, setup, report = convert_in_memory(model, plan_rms_norm(model, fold_bias=fold_bias, untie=untie),
                                                 inputs)
    return converted, setup.plan, report, setup.generated


def head_output(output: Any) -> dict[str, torch.Tensor]:
    """The logits; a model without a head, its last hidden state (the final norm's output, projected back)."""
    logits = getattr(output, "logits", None)
    return {"logits": logits} if logits is not None else {"last_hidden_state": output.last_hidden_state}


def check_exact(original: nn.Module, converted: nn.Module, inputs: dict[str, torch.Tensor],
                logits_only: bool = False) -> ExactnessReport:
    """The converted model must reproduce the original's final hidden states and logits.

    fp32: within ``TOLERANCE x max|reference|``. bf16/fp16: the two models round independently at every
    operation, so no fixed figure is fair. The bound is three times the low-precision model's own distance
    from its fp32 twin: its rounding, the converted model's rounding (the same size), and the rounding of the
    centred weights back to the checkpoint dtype (smaller).
    """
    pick = head_output if logits_only else _named_final_outputs
    original_output, converted_output = _run(original, inputs), _run(converted, inputs)
    outputs, converted_outputs = pick(original_output), pick(converted_output)
    diff = max(_max_diff(outputs[name], converted_outputs[name]) for name in outputs)
    reference = max(float(x.double().abs().max()) for x in outputs.values())
    if next(original.parameters()).dtype == torch.float32:
        tolerance = TOLERANCE
    else:
        in_fp32 = getattr(original, "normswap_in_fp32", None)  # a checkpoint's source, read again in fp32
        fp32_outputs = pick(_run(in_fp32() if in_fp32 else copy.deepcopy(original).float(), inputs))
        noise = max(_max_diff(outputs[name], fp32_outputs[name]) for name in outputs)
        tolerance = _NOISE_FACTOR * noise / reference if reference else _NOISE_FACTOR * noise
    relative = diff / reference if reference else diff
    first = next(iter(outputs.values()))
    tokens = int(first.shape[0] * first.shape[1]) if first.dim() >= 2 else first.numel()
    report = ExactnessReport(relative <= tolerance, tokens, diff, reference, relative, tolerance)
    if not report.exact:
        measured = (f"the converted model differs from the original by {diff:.3g} = {relative:.2e} x "
                    f"max|reference| (tolerance {tolerance:.1e})")
        raw = _raw_stream_outputs(outputs, converted_outputs, tolerance)
        if raw:
            kept = _other_exact_outputs(original_output, converted_output, set(outputs), tolerance)
            raise StreamOutputError(
                f"{measured}: {type(original).__name__} returns its un-normalised residual stream "
                f"as {' and '.join(raw)}, and the converted one is the original minus its per-token "
                "mean: the exact map removes that mean and no weight change can restore it, so a "
                f"Pre-LN model whose stream is an output has no exact RMSNorm twin{kept}, but "
                f"whatever reads {' or '.join(raw)} would change: keep this model LayerNorm",
                f"{type(original).__name__} returns its un-normalised residual stream as {' and '.join(raw)}, which "
                "the exact map would centre")
        raise ExactnessError(f"{measured}, so it is not exact for {type(original).__name__}: the map keeps what every "
                             "norm reads, and an output that reads the stream without a norm (a hidden state taken "
                             "before the final norm), or a branch whose last linear layer's output goes through "
                             "anything but per-channel scales and biases before the residual add, does not keep")
    return report


def _max_diff(expected: torch.Tensor, actual: torch.Tensor) -> float:
    return float((expected.double() - actual.double()).abs().max())


def _raw_stream_outputs(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor],
                        tolerance: float) -> list[str]:
    """The outputs that miss, when every one that misses is the raw stream: the original minus its mean agrees.

    Centring the stream changes exactly its mean over the hidden features, so an output that is the stream
    itself (no norm between it and the last residual add) comes back as ``h - mean(h)``.
    """
    missed, raw = [], []
    for name, reference in expected.items():
        scale = float(reference.double().abs().max()) or 1.0
        if _max_diff(reference, actual[name]) <= tolerance * scale:
            continue
        missed.append(name)
        wide = reference.double()
        if _max_diff(wide - wide.mean(-1, keepdim=True), actual[name]) <= tolerance * scale:
            raw.append(name)
    return raw if raw == missed else []


def _other_exact_outputs(original_output: Any, converted_output: Any, compared: set[str], tolerance: float) -> str:
    """``; pooler_output stays exact (3e-07)``: the model's other tensor outputs that the map keeps."""
    kept = []
    for name, value in getattr(original_output, "items", dict)():
        other = getattr(converted_output, name, None)
        if name in compared or not isinstance(value, torch.Tensor) or not isinstance(other, torch.Tensor):
            continue
        scale = float(value.double().abs().max()) or 1.0
        relative = _max_diff(value, other) / scale
        if value.is_floating_point() and relative <= tolerance:
            kept.append(f"{name} ({relative:.0e})")
    return f"; {', '.join(kept)} {'stays' if len(kept) == 1 else 'stay'} exact" if kept else ""


def _run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    was_training = model.training
    model.eval()
    with torch.no_grad(), same_random_draws():
        output = model(**inputs, output_hidden_states=True)
    model.train(was_training)
    return output


def _require_pre_layer_norm(topology: Topology) -> None:
    if topology.placement not in _PRE_PLACEMENTS:
        raise NormswapError(f"{topology.model_type} is {topology.placement}; LayerNorm -> RMSNorm is exact only where "
                            "every norm reads the residual stream, which can be centred once (Pre-LN); "
                            "normswap.convert(model, norm='rmsnorm') converts other layouts approximately")
    per_channel = [scale for scale in topology.residual_scales if scale.per_channel]
    if per_channel:
        reason = f"{topology.model_type} scales its residual stream per channel ({per_channel[0].describe()})"
        raise ExactImpossibleError(f"{reason}; LayerNorm -> RMSNorm is exact by centring every write to the stream "
                                   "(docs/design.md §4), and g * h of a centred h is not centred", reason)
    raw = [n.path for n in topology.stream_norms if n.kind == "identity"]
    if raw:
        reason = (f"{topology.model_type} has a branch that reads the residual stream with no norm ({raw[0]} is an "
                  "identity placeholder)")
        raise ExactImpossibleError(f"{reason}: the exact LayerNorm -> RMSNorm map centres the stream, which would "
                                   "change what that branch reads", reason)
    kinds = {n.kind for n in topology.stream_norms}
    if kinds & _LAYER_NORMS and kinds - _LAYER_NORMS and all(kind.startswith("rmsnorm") for kind in
                                                            kinds - _LAYER_NORMS):
        reason = (f"{topology.model_type}'s residual norms are LayerNorms beside RMSNorms "
                  f"({', '.join(sorted(kinds))})")
        raise ExactImpossibleError(f"{reason}: the exact LayerNorm -> RMSNorm map centres the stream, which the "
                                   "RMSNorms read uncentred", reason)
    if not kinds <= _LAYER_NORMS:
        raise NormswapError(f"{topology.model_type} residual norms are {', '.join(sorted(kinds))}, not LayerNorm; "
                            "nothing to convert to RMSNorm")


def _require_loop_owners(model: nn.Module, topology: Topology) -> None:
    """The exact map centres each stack's stream in code before its layer loop, which needs the class that runs the
    loop (``loop_owners``: PVT runs every stage's layer list in one loop of its encoder, and its first stages hand
    their streams on with no final norm)."""
    try:
        loop_owners(model, topology)
    except CodegenError as error:
        reason = f"{topology.model_type}'s code cannot centre each stack's stream before its layers ({error})"
        raise ExactImpossibleError(f"{reason}: the exact LayerNorm -> RMSNorm map centres the stream there", reason
                                   ) from error


def linear_layout(module: nn.Module) -> str | None:
    """``"out_in"`` for nn.Linear weights (out, in), ``"in_out"`` for GPT-2's Conv1D (in, out)."""
    if isinstance(module, nn.Linear):
        return "out_in"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "in_out"
    return None


def linear_calls(model: nn.Module, norms: tuple[str, ...]) -> tuple[list[str], dict[str, list[str]]]:
    """The linear maps in call order, and for each norm the linear maps that read its output.

    Found by one forward pass of the model's meta twin on synthetic inputs, so planning reads no
    weights and a loaded model and its checkpoint on disk get the same plan.
    """
    return on_meta_else_cpu(meta_twin(model), lambda twin, device: _linear_calls_of(twin, device, norms))


def _linear_calls_of(meta: nn.Module, device: str, norms: tuple[str, ...]) -> tuple[list[str], dict[str, list[str]]]:
    order: list[str] = []
    readers: dict[str, list[str]] = {norm: [] for norm in norms}
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # holding the tensor keeps its id from being reused
    hooks: list[tuple[str, Any]] = [(path, lambda m, a, output, path=path: produced.__setitem__(id(output),
                                                                                             (path, output)))
                                    for path in norms]
    for path, module in meta.named_modules():
        if fused_experts(module):  # a writer like a linear map, but never a reader whose bias takes a fold
            hooks.append((path, lambda m, a, o, path=path: order.append(path)))
        elif linear_layout(module):
            def hook(m: nn.Module, args: tuple, output: Any, path: str = path) -> None:
                order.append(path)
                source, tensor = produced.get(id(args[0]), (None, None)) if args else (None, None)
                if source is not None and tensor is args[0] and path not in readers[source]:
                    readers[source].append(path)
            hooks.append((path, hook))
    synthetic_forward(meta, device, hooks)
    return order, readers


def branch_writers(calls: list[str], topology: Topology) -> list[str]:
    """The last linear map each branch runs: its output is what the branch adds to the stream."""
    writers = []
    for layer in topology.layers:
        for sub in layer.sublayers:
            for branch in sub.branches:
                inside = [p for p in calls if any(p == m or p.startswith(m + ".") for m in branch.modules)]
                if not inside:
                    raise NormswapError(f"cannot find the output projection of a branch of {layer.path}; "
                                        "this family's branches end in no linear layer normswap knows")
                if inside[-1] not in writers:
                    writers.append(inside[-1])
    return writers


def _gate_reason(meta: nn.Module, writers: Iterable[str]) -> str | None:
    """The structural reason the centred writers did not centre what their branches add, where a branch acts on
    its last linear map's output with more than per-channel scales and biases (docs/design.md §4), else None."""
    found = unfoldable_writers(meta, writers)
    if not found:
        return None
    writer, what = next(iter(found.items()))
    return (f"the output of {writer}, the last linear map its branch calls, {what} on its way to the residual "
            "add, so no centring of linear maps centres what the branch adds to the stream")


def _can_fold(model: nn.Module, norm: str, readers: list[str]) -> bool:
    """Fold only where the norm has a bias and every linear map reading it has a bias to take it."""
    if getattr(model.get_submodule(norm), "bias", None) is None or not readers:
        return False
    return all(getattr(model.get_submodule(r), "bias", None) is not None for r in readers)


def _fold_bias(model: nn.Module, norm: str, readers: list[str], steps: dict[str, Step]) -> None:
    """``W (g*n + beta) + b = W (g*n) + (W beta + b)``, computed in float64."""
    beta = steps[f"{norm}.bias"]
    for reader in readers:
        out_in = linear_layout(model.get_submodule(reader)) == "out_in"
        bias_key = f"{reader}.bias"
        steps[bias_key] = combine(lambda bias, weight, beta, out_in=out_in: _folded(bias, weight, beta, out_in),
                                  steps[bias_key], steps[f"{reader}.weight"], beta)
    steps[f"{norm}.bias"] = combine(torch.zeros_like, beta)


def _folded(bias: torch.Tensor, weight: torch.Tensor, beta: torch.Tensor, out_in: bool) -> torch.Tensor:
    shift = weight.double() @ beta.double() if out_in else beta.double() @ weight.double()
    return (bias.double() + shift).to(bias.dtype)


def fused_experts(module: nn.Module) -> bool:
    """transformers' fused mixture-of-experts weights: ``down_proj`` of shape (experts, hidden, intermediate).

    Their module returns the routed sum of every expert's ``down_proj[e] @ y``: centring each expert's
    ``down_proj`` (and ``down_proj_bias``) centres that sum, whatever the routing weights are.
    """
    down = getattr(module, "down_proj", None)
    return isinstance(down, nn.Parameter) and down.dim() == 3


def _centre_output(module: nn.Module, path: str, steps: dict[str, Step]) -> None:
    """Remove the mean over output features from a linear map's weight and bias, in float64."""
    for key, dim in _output_dims(module, path, steps).items():
        steps[key] = combine(lambda tensor, dim=dim: _centred(tensor, dim), steps[key])


def _output_dims(module: nn.Module, path: str, steps: dict[str, Step]) -> dict[str, int]:
    """A writer's tensors, each with the dimension that runs over the hidden features it writes."""
    if fused_experts(module):
        keys = {f"{path}.down_proj": 1, f"{path}.down_proj_bias": -1}
    else:
        keys = {f"{path}.weight": 0 if linear_layout(module) == "out_in" else 1, f"{path}.bias": 0}
    return {key: dim for key, dim in keys.items() if key in steps}


def _centred(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    wide = tensor.double()
    return (wide - wide.mean(dim, keepdim=True)).to(tensor.dtype)


def _embedding_writers(model: nn.Module, topology: Topology) -> list[str]:
    """Embedding tables outside the layers: their rows are what the stream starts from."""
    return [path for path, module in model.named_modules() if isinstance(module, nn.Embedding)
            and not any(path.startswith(layer.path + ".") for layer in topology.layers)]


def _untie_and_centre_embeddings(model: nn.Module, embeddings: list[str], steps: dict[str, Step],
                                 config: Any) -> None:
    """Centre embedding rows in float64; a tied output embedding keeps the original rows as its own copy."""
    output = model.get_output_embeddings()
    tied_to = None
    for path in embeddings:
        module = model.get_submodule(path)
        if output is not None and output.weight is module.weight:
            tied_to = path
        steps[f"{path}.weight"] = combine(lambda weight: _centred(weight, -1), steps[f"{path}.weight"])
    if tied_to is not None:
        output_path = next(p for p, m in model.named_modules() if m is output)
        steps[f"{output_path}.weight"] = copy_of(f"{tied_to}.weight")
        config.tie_word_embeddings = False


def _generated_rms_target(model: nn.Module, topology: Topology, centre_in_code: bool = True
                          ) -> tuple[GeneratedModule, Any, Any]:
    return generate_family_code(model, topology, rms_norm_edits(model, topology, centre_in_code),
                                "norm LayerNorm -> RMSNorm (exact: centred writers, zero-mean stream)",
                                rms_norm=True)

def _final_outputs(output: Any) -> list[torch.Tensor]:
    """What the model hands on: final (normalised) hidden states of every stack, and logits."""
    return list(_named_final_outputs(output).values())


def _named_final_outputs(output: Any) -> dict[str, torch.Tensor]:
    """``_final_outputs`` by name (``hidden_states[-1]`` where there is no ``last_hidden_state``).

    The raw stream itself changes under centring; only what the norms read is kept.
    """
    found = {}
    for prefix, part in output_parts(output):
        for name in ("last_hidden_state", "encoder_last_hidden_state", "logits"):
            value = getattr(part, name, None)
            if isinstance(value, torch.Tensor):
                found[prefix + name] = value
        for name in ("hidden_states", "decoder_hidden_states"):  # causal LMs append the final norm's output last
            value = getattr(part, name, None)
            if isinstance(value, (tuple, list)) and value and getattr(part, "last_hidden_state", None) is None:
                found[f"{prefix}{name}[-1]"] = value[-1]
    if not found:
        raise ExactnessError(f"{type(output).__name__} has no hidden states to compare")
    return found
