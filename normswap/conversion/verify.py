"""Verification that is part of every conversion.

1. Re-detect the realised model and require the target topology (a mismatch is an error).
2. Run probe inputs through the original and the converted model and measure what the
   norm-shift mapping keeps equal: what each branch reads. Branch 0 must read exactly what it
   read before; later branches drift, and the report says by how much.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ..detect import inspect
from ..errors import NormswapError
from ..topology import Topology
from .model_outputs import output_parts
from .plan import serialises
from .read_maps import branch_read_maps
from .repeatable import same_random_draws

_PROBE_TOKENS = 64
_PROBE_BATCH = 8


class VerificationError(NormswapError):
    """The realised model is not what the plan promised."""


@dataclass(frozen=True)
class SublayerDrift:
    """How far what one branch reads moved: cosine and max abs difference over probe tokens."""

    stack: str
    index: int
    kind: str
    source_entry: str
    target_entry: str
    cosine: float
    max_abs_diff: float


@dataclass(frozen=True)
class DriftReport:
    """What ``normswap_report.json`` holds about a conversion's effect on probe inputs."""

    exact: bool
    probe_tokens: int
    sublayers: tuple[SublayerDrift, ...]
    output_cosine: float
    output_max_abs_diff: float
    output_max_abs_reference: float
    next_token_kl: float | None

    def summary(self) -> str:
        first = self.sublayers[0] if self.sublayers else None
        lines = [f"probe: {self.probe_tokens} tokens; output cosine {self.output_cosine:.4f}, max abs diff "
                 f"{self.output_max_abs_diff:.3g} (reference max {self.output_max_abs_reference:.3g})"]
        if first:
            lines.append(f"branch 0 input: max abs diff {first.max_abs_diff:.3g} from the original")
            worst = min(self.sublayers, key=lambda s: s.cosine)
            lines.append(f"branch inputs: cosine {first.cosine:.4f} at sublayer 0 -> {self.sublayers[-1].cosine:.4f} "
                         f"at sublayer {self.sublayers[-1].index} (lowest {worst.cosine:.4f})")
        if self.next_token_kl is not None:
            lines.append(f"next-token KL(original || converted): {self.next_token_kl:.4g} nats")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SkippedVerification:
    """The report of a conversion too large to verify in memory: says so, and why."""

    reason: str
    exact: bool | None = None

    def summary(self) -> str:
        return self.reason

    def to_dict(self) -> dict[str, Any]:
        return {"verified": False, "reason": self.reason}


def require_topology(converted: nn.Module, expected: Topology | None) -> Topology:
    """Re-trace the realised model; its layers must show exactly the expected sublayers and norms."""
    found = inspect(converted)
    if expected is None or _shape(found) != _shape(expected):
        raise VerificationError(
            f"the converted {found.model_type} model detects as '{found.summary()}', not the planned "
            f"'{expected.summary() if expected else '?'}'; this is a normswap bug, please report it"
        )
    return found


def _shape(topology: Topology) -> Any:
    """What must agree: placements, norm slots and kinds of every sublayer, edge norms of every stack."""
    return (
        topology.placement,
        [(s.num_layers, s.embedding_norm.kind if s.embedding_norm else None,
          s.final_norm.kind if s.final_norm else None) for s in topology.stacks],
        [[(sub.kind, sub.placement, [(n.slot, n.kind) for n in sub.norms]) for sub in layer.sublayers]
         for layer in topology.layers],
    )


def probe_inputs(model: nn.Module, texts: Sequence[str] | None, tokenizer: Any | None) -> dict[str, torch.Tensor]:
    """Token ids for the probe: the tokenizer on ``texts`` where there is one, else fixed random ids."""
    device = next(model.parameters()).device
    if device.type == "meta":  # weights offloaded to disk: the hooks bring each module's to the CPU
        device = torch.device("cpu")
    main_input = getattr(model, "main_input_name", "input_ids")
    generator = torch.Generator().manual_seed(0)
    if main_input == "pixel_values":  # fixed random images of the configured size
        size = getattr(model.config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        channels = getattr(model.config, "num_channels", 3)
        return {"pixel_values": torch.randn(4, channels, size, size, generator=generator).to(device)}
    if main_input == "input_features":  # fixed random audio features, e.g. Whisper's log-mel frames
        frames = 2 * getattr(model.config, "max_source_positions", 1500)
        features = torch.randn(2, model.config.num_mel_bins, frames, generator=generator)
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=generator)
        return {"input_features": features.to(device), "decoder_input_ids": ids.to(device)}
    if main_input != "input_ids":
        raise VerificationError(f"{type(model).__name__} takes '{main_input}'; verifying a conversion runs both "
                                "models on probe inputs, and normswap makes only token ids, pixel values and audio "
                                "features")
    if tokenizer is not None and texts:
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        batch = tokenizer(list(texts[:_PROBE_BATCH]), return_tensors="pt", padding=True, truncation=True,
                          max_length=_PROBE_TOKENS)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if inputs["input_ids"].shape[-1] < 2:
            raise VerificationError("the checkpoint's tokenizer turned the probe text into no tokens; "
                                    "pass --calib with text it can encode")
        vocab = model.get_input_embeddings().num_embeddings
        if int(inputs["input_ids"].max()) >= vocab:
            raise VerificationError(f"the checkpoint's tokenizer gives token id {int(inputs['input_ids'].max())}, "
                                    f"but the model's embedding has {vocab} rows: the tokenizer files do not belong "
                                    "to this model; replace them with the model's own tokenizer")
    else:
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (4, 32), generator=generator)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(model.config, "is_encoder_decoder", False):
        # the decoder may have a vocabulary of its own (FSMT: source and target languages)
        inputs["decoder_input_ids"] = inputs["input_ids"] % _decoder_vocab(model, vocab)
        inputs["decoder_attention_mask"] = inputs["attention_mask"]
    return {name: value.to(device) for name, value in inputs.items()}


BRANCH_ZERO_COSINE = 0.999  # far below the float noise of the same norm on the same input, far above a moved one


def require_branch_zero(plan: Any, report: DriftReport) -> None:
    """The norm-shift mapping keeps what each stack's branch 0 reads wherever the plan moves a norm into a norm
    at entry 0 (docs/design.md §3); if it moved, detection took a norm for the stack's embedding norm that
    does not feed its first layer (Funnel's embedding norm feeds an encoder of nested blocks), and the output
    would be wrong without saying so. A later stage of a stage list (CvT's ``stages.1``) reads the stage before
    it, whose output a placement change moves, so what its branch 0 reads moves with it."""
    for stack in plan.stacks:
        if _later_stage(stack.source_stack, [other.source_stack for other in plan.stacks]):
            continue
        entry = [move for move in stack.moves if move.index == 0]
        dropped_before = any(move.index < 0 for move in stack.moves)  # mBART's embedding norm, going to post
        kept = (entry and all(move.source and move.target and not move.copy for move in entry)
                and not stack.unit_norms and not dropped_before)
        first = next((drift for drift in report.sublayers if drift.stack == stack.target_stack and drift.index == 0),
                     None)
        if kept and first is not None and first.cosine < BRANCH_ZERO_COSINE:
            raise VerificationError(
                f"branch 0 of {stack.source_stack} should read exactly what it read before ({entry[0].source} "
                f"moves to {entry[0].target}), but its input moved (cosine {first.cosine:.4f}): "
                f"{entry[0].source} does not feed {stack.source_stack}'s first layer directly, so this model's "
                "norms do not form the one sequence per stack that the norm-shift mapping needs")


def _later_stage(path: str, stack_paths: list[str]) -> bool:
    """Whether the stack at ``path`` is an item after the first of a module list whose items hold stacks
    (``encoder.stages.1.layers`` beside ``encoder.stages.0.layers``)."""
    parts = path.split(".")
    for depth, part in enumerate(parts):
        if part.isdigit() and int(part) > 0:
            earlier = ".".join([*parts[:depth], str(int(part) - 1), *parts[depth + 1:]])
            if earlier in stack_paths:
                return True
    return False


def _decoder_vocab(model: nn.Module, vocab: int) -> int:
    """The rows of the decoder's token embedding (``vocab``, the encoder's, where it has none of its own)."""
    try:
        embeddings = model.get_decoder().get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embeddings = getattr(getattr(model, "get_decoder", lambda: None)(), "embed_tokens", None)
    return embeddings.num_embeddings if isinstance(embeddings, nn.Embedding) else vocab


@torch.no_grad()
def measure_drift(original: nn.Module, converted: nn.Module, source: Topology, target: Topology,
                  inputs: dict[str, torch.Tensor], exact: bool) -> DriftReport:
    """Branch inputs and outputs of both models on the same probe inputs."""
    target_entries = _entries(target)
    # each branch of a parallel block became a sublayer (--placement pre, or a placement reached through it)
    serial = serialises(source.placement, target.placement) or (
        source.placement == "parallel" and len(_entries(source)) < len(target_entries))
    source_entries = _entries(source, serial)
    source_reads, source_out = _run(original, source_entries, inputs)
    target_reads, target_out = _run(converted, target_entries, inputs)
    folded = branch_read_maps(original, source, converted)  # a pre norm's g / s in the readers: compare through it
    reference = _last_hidden(source_out)
    mask = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones(
        reference.shape[:2], dtype=torch.bool, device=reference.device)
    sublayers = []
    for (stack, index, kind, source_entry), (_, _, _, target_entry) in zip(source_entries, target_entries,
                                                                             strict=True):
        a, b = source_reads.get(source_entry), target_reads.get(target_entry)
        if a is None or b is None:
            continue
        if a.shape != b.shape:  # a pass widened the stream (exact LayerNorm by one extra dimension): not comparable
            continue
        if source_entry in folded:
            b = folded[source_entry](b)
        a, b = a.double(), b.double()
        keep = mask if a.shape[:2] == mask.shape else torch.ones(a.shape[:2], dtype=torch.bool)
        sublayers.append(SublayerDrift(stack, index, kind, source_entry, target_entry,
                                       _cosine(a[keep], b[keep]), float((a[keep] - b[keep]).abs().max())))
    hidden_a, hidden_b = _last_hidden(source_out), _last_hidden(target_out)
    if hidden_a.shape != hidden_b.shape and getattr(source_out, "logits", None) is not None:
        hidden_a, hidden_b = source_out.logits, target_out.logits  # a widened stream: compare what it predicts
    keep = mask if hidden_a.shape[:2] == mask.shape else torch.ones(hidden_a.shape[:2], dtype=torch.bool)
    if torch.isfinite(hidden_a[keep]).all() and not torch.isfinite(hidden_b[keep]).all():
        raise VerificationError(_non_finite(converted, target_entries, target_reads, type(original).__name__))
    kl = None
    if getattr(source_out, "logits", None) is not None and getattr(target_out, "logits", None) is not None:
        log_p = F.log_softmax(source_out.logits[keep].double(), -1)
        log_q = F.log_softmax(target_out.logits[keep].double(), -1)
        kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    return DriftReport(
        exact=exact,
        probe_tokens=int(mask.sum()),
        sublayers=tuple(sublayers),
        output_cosine=_cosine(hidden_a[keep], hidden_b[keep]),
        output_max_abs_diff=float((hidden_a[keep] - hidden_b[keep]).abs().max()),
        output_max_abs_reference=float(hidden_a[keep].abs().max()),
        next_token_kl=kl,
    )


def _non_finite(converted: nn.Module, entries: list[tuple[str, int, str, str]], reads: dict[str, torch.Tensor],
                family: str) -> str:
    """Why a converted model whose output holds NaN or Inf (on inputs where the original's is finite) is not
    written, naming the first branch that reads a non-finite input, if one does."""
    first = next((entry for _, _, _, entry in entries if entry in reads and not torch.isfinite(reads[entry]).all()),
                 None)
    where = f"; the first branch to read one is {first}" if first else ""
    return (f"the converted {type(converted).__name__} outputs NaN or Inf on the probe inputs, where the original "
            f"{family} does not{where}: nothing is written; this is a normswap bug (a buffer the loaded code did not "
            "initialise, or an overflow the conversion caused): rerun with --debug for the traceback, and please "
            "report it with the model_type")


def _entries(topology: Topology, serial: bool = False) -> list[tuple[str, int, str, str]]:
    """(stack, sublayer index in the stack, kind, entry module) for the first branch of every sublayer;
    ``serial``: every branch of a parallel block, as the sublayers it becomes in a sequential model."""
    entries = []
    for stack in topology.stacks:
        subs = [sub for layer in topology.layers if layer.stack == stack.path for sub in layer.sublayers]
        branches = [(sub.kind if len(sub.branches) == 1 or not serial else branch.kind, branch)
                    for sub in subs for branch in (sub.branches if serial else sub.branches[:1])]
        for index, (kind, branch) in enumerate(branches):
            if branch.entry:
                entries.append((stack.path, index, kind, branch.entry))
    return entries


def _run(model: nn.Module, entries: list[tuple[str, int, str, str]],
         inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for _, _, _, path in entries:
        module = model.get_submodule(path)

        def hook(_module: nn.Module, args: tuple, kwargs: dict, path: str = path) -> None:
            value = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            if isinstance(value, torch.Tensor) and path not in captured:
                # kept in its own dtype (bf16: a quarter of fp64) and widened, losslessly, when compared
                captured[path] = value.detach().clone()

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        was_training = model.training
        model.eval()
        with same_random_draws():
            output = model(**inputs, output_hidden_states=True)
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return captured, output


def _last_hidden(output: Any) -> torch.Tensor:
    for _, part in output_parts(output):
        for name in ("last_hidden_state", "decoder_hidden_states", "hidden_states"):
            value = getattr(part, name, None)
            if isinstance(value, torch.Tensor):
                return value.double()
            if isinstance(value, (tuple, list)) and value:
                return value[-1].double()
    raise VerificationError(f"{type(output).__name__} has no hidden states to compare")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over the vectors that are not zero in both: a zero vector has no direction, and one that
    both models read is padding a layer adds after its norm (SAM's window partition pads its grid of 64 to 70),
    not a token; counted as cosine 0 it made identical inputs measure 0.84 and refused the conversion."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    kept = (a != 0).any(-1) | (b != 0).any(-1)
    if not kept.any():
        return 1.0  # all zero in both: nothing moved
    return float(F.cosine_similarity(a[kept], b[kept], dim=-1).mean())
