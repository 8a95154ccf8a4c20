"""Healing runs on transformers' ``Trainer``: checkpoints, resumption, devices and ``accelerate launch`` /
``torchrun`` (DDP, FSDP, DeepSpeed) come from it, not from normswap.

normswap adds an evaluation on held-out text (``evaluation``), a progress bar that shows it, and a training
clock that survives resumption; when training stops is ``stopping``'s business.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from . import budget, distributed
from .sampler import LengthBucketSampler


class HealingTrainer(Trainer):
    """``evaluate`` measures the student against the teacher on the held-out texts; training batches group
    texts of similar length; the learning rate decays over the step budget or the time budget, whichever
    runs out first (a time-limited run still ends at a low rate, where it converges best)."""

    def __init__(self, *args: Any, measure: Callable[[], dict[str, Any]], max_seconds: float | None = None,
                 clock: TrainingClock | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.measure = measure
        self.max_seconds = max_seconds
        self.clock = clock or TrainingClock()
        self.history: list[dict[str, Any]] = []

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = getattr(dataset, "lengths", None)
        if lengths is None:
            return super()._get_train_sampler(train_dataset)
        # batches of a whole step's texts (all processes'): accelerate deals each process its equal share
        return LengthBucketSampler(lengths, self.args.per_device_train_batch_size * self.args.world_size,
                                   self.args.seed, on_epoch=getattr(dataset, "set_epoch", None))

    def create_scheduler(self, num_training_steps: int, optimizer: Optimizer | None = None) -> LRScheduler:
        if self.lr_scheduler is None:
            warmup = self.args.get_warmup_steps(num_training_steps)
            self.clock.start()

            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / (warmup + 1)
                progress = (step - warmup) / max(1, num_training_steps - warmup)
                if self.max_seconds:  # rank 0's clock, or the processes' rates would differ
                    progress = max(progress, distributed.broadcast(self.clock.seconds() / self.max_seconds))
                return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

            self.lr_scheduler = LambdaLR(optimizer if optimizer is not None else self.optimizer, factor)
        return self.lr_scheduler

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        found = self.measure()
        metrics = {f"{metric_key_prefix}_{key}": value for key, value in found.items()
                   if isinstance(value, float)}
        seconds = self.clock.seconds()
        metrics[CLOCK_LOG_KEY] = seconds  # kept in the checkpoint's trainer_state.json for resuming
        self.history.append({"step": self.state.global_step, "training_seconds": seconds, **found})
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class TrainingClock:
    """Seconds spent training, across resumptions: what earlier runs spent (read from the checkpoint they
    left) plus this run's time since it started, so a resumed run continues the time budget and the learning
    rate's decay where they were, as ``max_steps`` does for steps."""

    def __init__(self, spent: float = 0.0) -> None:
        self.spent = spent
        self._started: float | None = None

    def start(self) -> None:
        if self._started is None:
            self._started = budget.now()

    def seconds(self) -> float:
        return self.at(budget.now())

    def at(self, moment: float) -> float:
        """The clock's reading at ``moment`` (a ``budget.now()`` reading), once started."""
        return self.spent + (0.0 if self._started is None else moment - self._started)


CLOCK_LOG_KEY = "eval_training_seconds"


def spent_seconds(checkpoint: str | None) -> float:
    """The training clock as the checkpoint's last evaluation logged it (0 for none, or an older checkpoint)."""
    if checkpoint is None:
        return 0.0
    try:
        history = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0
    logged = [entry[CLOCK_LOG_KEY] for entry in history if isinstance(entry, dict) and CLOCK_LOG_KEY in entry]
    return float(logged[-1]) if logged else 0.0


class MetricProgressBar(ProgressCallback):
    """Trainer's progress bar, with the latest held-out cosine and loss in its postfix."""

    def __init__(self) -> None:
        super().__init__()
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        if state.max_steps < budget.UNBOUNDED_STEPS:
            super().on_train_begin(args, state, control, **kwargs)
        else:  # the time budget ends training: a count of steps, not a bar toward a billion
            if state.is_world_process_zero:
                self.training_bar = tqdm(total=None, dynamic_ncols=True, unit="step")
            self.current_step = 0

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "eval_output_cosine" in logs:
            self.postfix["cos"] = f"{logs['eval_output_cosine']:.4f}"
        if "loss" in logs:
            self.postfix["loss"] = f"{logs['loss']:.4g}"
        if self.training_bar is not None:
            self.training_bar.set_postfix(self.postfix, refresh=False)


def training_arguments(output_dir: str, *, batch_size: int, learning_rate: float, max_steps: int | None,
                       eval_steps: int, save_steps: int | None, seed: int, quiet: bool,
                       adam_beta2: float, precision: str = "fp32") -> TrainingArguments:
    """Defaults sized for a CPU and a small model; a GPU is used when there is one. ``max_steps=None``: no step
    limit (the time budget ends training); ``save_steps=None``: no Trainer checkpoints (nothing would resume
    from them).

    ``accelerate launch --cpu`` says "CPU" through ``ACCELERATE_USE_CPU``: transformers' accelerator honours it
    but ``args.device`` does not (inputs went to cuda:0, the model stayed on the CPU), so it is passed on here,
    as is a launch on a machine without a GPU (``distributed.use_cpu``).

    ``precision="bf16"`` is the Trainer's own mixed precision (``bf16=True``: accelerate autocasts the objective's
    forward, both models', on the CPU as on a GPU); the weights and the optimiser stay float32. transformers
    allows it on a machine without a GPU only with ``use_cpu``, which is where the Trainer trains there anyway.
    """
    bf16 = precision == "bf16"
    steps = budget.UNBOUNDED_STEPS if max_steps is None else max_steps
    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size, learning_rate=learning_rate,
        max_steps=steps, warmup_steps=min(20, steps // 10), adam_beta2=adam_beta2,
        weight_decay=0.0, eval_strategy="steps", eval_steps=eval_steps,
        save_strategy="no" if save_steps is None else "steps", save_steps=save_steps or eval_steps,
        save_total_limit=2, logging_steps=max(1, eval_steps // 2), report_to=[],
        seed=seed, disable_tqdm=quiet, remove_unused_columns=False, dataloader_num_workers=0,
        max_grad_norm=1.0, bf16=bf16,
        use_cpu=distributed.use_cpu() or (bf16 and not torch.cuda.is_available()),
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning warns and does nothing without a GPU
    )

