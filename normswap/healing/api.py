"""``normswap.healing``: distil a converted model (the student) back toward its original (the teacher).

1. Pair the two models' norm sequences (``taps``): what each branch reads, and each stack's output.
2. Optionally (``warm_start``), refit each branch's output projection in closed form, sublayer by sublayer.
   Off by default: on MiniLM it raised the intermediate cosines but cost 40 s and ended lower (docs/heal.md).
3. Train end to end on per-sublayer targets (``objective``) with transformers' ``Trainer``, on length-grouped,
   augmented batches, the learning rate decaying over the step or time budget, and the student's dropout
   switched off (``dropout``).
4. Measure on held-out text before and after (``metrics``).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from ..errors import NormswapError
from .dropout import without_dropout
from .metrics import compare
from .objective import HealingObjective
from .rows import AugmentedTexts, TokenisedTexts
from .taps import correspond
from .texts import load_texts, split_texts
from .training import HealingTrainer, MetricProgressBar, StopRules, TrainingClock, spent_seconds, training_arguments
from .warm_start import fit_writers


@dataclass(frozen=True)
class HealReport:
    """Before and after figures on held-out text, and what the run did."""

    before: dict[str, Any]
    after: dict[str, Any]
    warm_start: dict[str, Any] | None
    steps: int
    seconds: float
    stopped: str
    train_texts: int
    held_out_texts: int
    frozen: tuple[str, ...] = field(default=())
    history: tuple[dict[str, Any], ...] = field(default=())  # held-out checks during training
    losses: tuple[float, ...] = field(default=())  # training loss at each logging step
    entries: tuple[str, ...] = field(default=())  # student module of each entry_cosines position
    dropout_rates_off: int = 0  # dropout rates set to 0 for training (restored afterwards)

    def summary(self) -> str:
        lines = [f"healed {self.steps} steps in {self.seconds:.0f} s ({self.stopped}); "
                 f"{self.train_texts} training texts, {self.held_out_texts} held out"]
        for name in ("output_cosine", "pooled_cosine", "spearman", "next_token_kl", "perplexity_ratio"):
            if name in self.before:
                lines.append(f"  {name:17} {self.before[name]:.4f} -> {self.after[name]:.4f}")
        if self.warm_start:
            lines.append(f"  after the closed-form warm start: output cosine {self.warm_start['output_cosine']:.4f}")
        worst_before, worst_after = min(self.before["entry_cosines"]), min(self.after["entry_cosines"])
        lines.append(f"  lowest per-sublayer cosine {worst_before:.4f} -> {worst_after:.4f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def heal(teacher: nn.Module, student: nn.Module, data: str | Path | Sequence[str] | None = None, *,
         tokenizer: Any = None, max_steps: int = 300, max_time: float | None = None,
         target_cosine: float | None = None, batch_size: int = 8, max_length: int = 64,
         learning_rate: float = 3e-4, warm_start: bool = False, freeze_embeddings: bool = True,
         held_out: int = 256, eval_steps: int = 50, work_dir: str | Path | None = None,
         resume: bool = False, quiet: bool = False, seed: int = 0, match: str = "sublayers",
         output_weight: float = 4.0, augment: bool = True,
         keep_dropout: bool = False) -> tuple[nn.Module, HealReport]:
    """Train ``student`` (in place) to behave like ``teacher``; returns it and the report.

    ``data``: texts, a .txt/.jsonl file, a ``datasets`` folder, or None for the built-in corpus; ``held_out``
    texts are never trained on. ``work_dir`` keeps Trainer checkpoints; ``resume`` continues from its
    latest one (the warm start is then skipped: the checkpoint already holds its result), and, like
    ``max_steps``, ``max_time`` then counts the training time of the runs it resumes (checkpoints keep the
    clock). ``match="output"`` trains on the stacks' outputs only (the plain distillation baseline);
    ``match="branches"`` adds what each branch writes to what each branch reads. The student trains without
    dropout unless ``keep_dropout``; its rates are restored before it is returned.
    """
    if match not in ("sublayers", "branches", "output"):
        raise NormswapError(f"match={match!r}: choose 'sublayers', 'branches' or 'output'")
    started = time.monotonic()
    require_same_vocabulary(teacher, student)
    correspondence = correspond(teacher, student)
    texts = split_texts(load_texts(data), held_out)
    vocab = student.get_input_embeddings().num_embeddings
    train = TokenisedTexts(texts.train, tokenizer, max_length, vocab)
    evaluation = TokenisedTexts(texts.held_out, tokenizer, max_length, vocab)
    teacher.eval()
    student.eval()

    def measure(full: bool = True) -> dict[str, Any]:
        """All held-out texts, or (while training) a quick check on the first 64."""
        return compare(teacher, student, correspondence, evaluation, batch_size, limit=None if full else 64)

    measured_at = time.monotonic()
    before = measure()
    evaluation_seconds = time.monotonic() - measured_at  # the final evaluation costs as much: keep it in budget
    own_work = not work_dir  # a temporary folder of Trainer checkpoints (hundreds of MB), removed at the end
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="normswap-heal-"))
    checkpoint = get_last_checkpoint(str(work)) if resume and work.is_dir() else None
    warm: dict[str, Any] | None = None
    if warm_start and checkpoint is None:
        device = next(student.parameters()).device
        calibration = [{name: value.to(device) for name, value in rows.items()}
                       for rows in train.batches(batch_size, limit=4 * batch_size)]
        fits = fit_writers(teacher, student, correspondence, calibration)
        warm = {**measure(), "writers": [asdict(f) for f in fits]}
    frozen = _freeze_embeddings(student) if freeze_embeddings else ()

    objective = HealingObjective(teacher, student, correspondence, output_weight, only_outputs=match == "output",
                                 branch_weight=1.0 if match == "branches" else 0.0)
    remaining = None if max_time is None else max(1.0, max_time - (time.monotonic() - started) - evaluation_seconds)
    clock = TrainingClock(spent_seconds(checkpoint))  # a resumed run continues the earlier runs' clock
    stop = StopRules(target_cosine, remaining, clock)
    arguments = training_arguments(str(work), batch_size=batch_size, learning_rate=learning_rate,
                                   max_steps=max_steps, eval_steps=eval_steps, save_steps=eval_steps, seed=seed,
                                   quiet=quiet)
    training_rows = AugmentedTexts(train, tokenizer) if augment else train
    trainer = HealingTrainer(model=objective, args=arguments, train_dataset=training_rows, eval_dataset=evaluation,
                             data_collator=training_rows.pad_batch, measure=lambda: measure(full=False),
                             max_seconds=remaining, clock=clock, callbacks=[stop])
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)  # logs belong in the report, not on stdout
    if not quiet:
        trainer.add_callback(MetricProgressBar())
    student.train()
    try:
        with contextlib.nullcontext(0) if keep_dropout else without_dropout(student) as dropout_rates_off:
            trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        objective.close()
        for parameter in frozen:
            student.get_parameter(parameter).requires_grad_(True)
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    student.eval()
    after = measure()
    stopped = stop.reason or f"{trainer.state.global_step} steps done"
    report = HealReport(before, after, warm, trainer.state.global_step, time.monotonic() - started, stopped,
                        len(texts.train), len(texts.held_out), frozen, tuple(trainer.history),
                        tuple(entry["loss"] for entry in trainer.state.log_history if "loss" in entry),
                        tuple(entry.student for entry in correspondence.entries), dropout_rates_off)
    return student, report


def _freeze_embeddings(student: nn.Module) -> tuple[str, ...]:
    """Embedding tables (token, position, type) keep their weights; they are the same in both models."""
    frozen = []
    for path, module in student.named_modules():
        if isinstance(module, nn.Embedding):
            for name, parameter in module.named_parameters(recurse=False):
                if parameter.requires_grad:
                    parameter.requires_grad_(False)
                    frozen.append(f"{path}.{name}")
    return tuple(frozen)


def require_same_vocabulary(teacher: nn.Module, student: nn.Module) -> None:
    if teacher.get_input_embeddings().num_embeddings != student.get_input_embeddings().num_embeddings:
        raise NormswapError("the teacher and the student have different vocabularies; heal a converted model "
                            "with the checkpoint it was converted from")

