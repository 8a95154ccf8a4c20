"""What a heal did, in figures (``to_dict``, for normswap_report.json) and in words (``summary``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


def plural(count: int, word: str) -> str:
    """``1 step``, ``2 steps``."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


@dataclass(frozen=True)
class HealReport:
    """Before and after figures on held-out text, and what the run did."""

    before: dict[str, Any]
    after: dict[str, Any]
    warm_start: dict[str, Any] | None
    steps: int
    seconds: float  # from the start of the command (heal_checkpoint) or of the heal call, to the end of healing
    stopped: str  # what ended training, in words
    train_texts: int
    held_out_texts: int
    frozen: tuple[str, ...] = field(default=())
    history: tuple[dict[str, Any], ...] = field(default=())  # held-out checks during training
    losses: tuple[float, ...] = field(default=())  # training loss at each logging step
    entries: tuple[str, ...] = field(default=())  # student module of each entry_cosines position
    dropout_rates_off: int = 0  # dropout rates set to 0 for training (restored afterwards)
    evaluated_texts: int = 0  # held-out texts that before and after are measured on
    training_seconds: float = 0.0  # this run's training (the Trainer, with its checks and checkpoints)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase, in order (loading, ...)
    max_time: float | None = None  # the time budget (--max-time)
    notes: tuple[str, ...] = field(default=())  # what the time budget changed, in words
    command_seconds: float | None = None  # the whole command, the save included (set once it is written)
    lora: dict[str, Any] | None = None  # with lora_rank: the rank, the wrapped projections, what trained
    # a staged removal (``stages.py``): per stage its groups, the norms it fixed, its steps, before and after
    stages: tuple[dict[str, Any], ...] = field(default=())

    def summary(self) -> str:
        evaluated = ("" if self.evaluated_texts in (0, self.held_out_texts)
                     else f" ({self.evaluated_texts} of them evaluated)")
        lines = [f"healed {plural(self.steps, 'step')} in {self.training_seconds:.0f} s of training, stopped by "
                 f"{self.stopped}; {self.train_texts} training texts, {self.held_out_texts} held out{evaluated}"]
        if self.timings:
            total = self.seconds if self.command_seconds is None else self.command_seconds
            budget = "" if self.max_time is None else f" of the {self.max_time:g} s budget"
            phases = ", ".join(f"{seconds:.0f} s {name}" for name, seconds in self.timings.items())
            lines.append(f"  took {total:.0f} s{budget}: {phases}")
        lines += [f"  note: {note}" for note in self.notes]
        if self.lora:
            lines.append(f"  LoRA rank {self.lora['rank']} on {plural(len(self.lora['projections']), 'projection')}, "
                         f"merged: {self.lora['trainable_parameters']:,} of {self.lora['parameters']:,} parameters "
                         "trained (adapters, norms, projection biases)")
        for name in ("output_cosine", "pooled_cosine", "spearman", "next_token_kl", "perplexity_ratio"):
            if name in self.before:
                lines.append(f"  {name:17} {self.before[name]:.4f} -> {self.after[name]:.4f}")
        if self.warm_start and self.warm_start.get("kept", True):
            lines.append(f"  after the closed-form warm start: output cosine {self.warm_start['output_cosine']:.4f}")
        elif self.warm_start:
            lines.append(f"  the closed-form warm start (output cosine {self.warm_start['output_cosine']:.4f}) was "
                         "further from the teacher than the converted model, so it was undone")
        for number, stage in enumerate(self.stages, 1):
            figure = next((name for name in ("next_token_kl", "output_cosine") if name in stage["before"]), None)
            change = f": {figure} {stage['before'][figure]:.4f} -> {stage['after'][figure]:.4f}" if figure else ""
            lines.append(f"  stage {number} ({'+'.join(stage['groups'])}, {plural(len(stage['norms']), 'norm')}), "
                         f"{plural(stage['steps'], 'step')}{change}")
        worst_before, worst_after = min(self.before["entry_cosines"]), min(self.after["entry_cosines"])
        lines.append(f"  lowest per-sublayer cosine {worst_before:.4f} -> {worst_after:.4f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
