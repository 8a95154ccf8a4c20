"""When training stops: at the step limit, at the target output cosine, or before the time budget would be
overrun.

With a deadline (seconds on the training clock), each step's end looks ahead: a held-out check or a
checkpoint due now is done only if it fits before the deadline, and training goes on only if the next step
fits after them. Steps, checks and saves are timed as they happen (the last few steps' longest is the next
step's estimate), so a machine that slows down is noticed within a step.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from . import distributed
from .training import CLOCK_LOG_KEY, TrainingClock

RECENT_STEPS = 3  # the next step is estimated as the longest of the last few


class StopRules(TrainerCallback):
    """Decides, after every step, whether training goes on; ``reason`` says what ended it (``"steps"``,
    ``"time"`` or ``"target"``, with ``detail`` for the target)."""

    def __init__(self, target_cosine: float | None, deadline: float | None, clock: TrainingClock | None = None, *,
                 step_seconds: float = 0.0, check_seconds: float = 0.0, save_seconds: float = 0.0) -> None:
        self.target_cosine = target_cosine
        self.deadline = deadline
        self.clock = clock or TrainingClock()
        self.check_seconds = check_seconds  # estimates until measured
        self.save_seconds = save_seconds
        self._first_step = step_seconds
        self._steps: list[float] = []
        self._mark = 0.0  # when the work before the current step (the last step, check or save) ended
        self.reason = ""
        self.detail = ""

    def next_step_seconds(self) -> float:
        return max(self._steps[-RECENT_STEPS:]) if self._steps else self._first_step

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self.clock.start()
        self._mark = self.clock.seconds()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        now = self.clock.seconds()
        self._steps.append(now - self._mark)
        self._mark = now
        if control.should_training_stop and not self.reason:
            self.reason = "steps"  # the Trainer's step limit
        if control.should_training_stop and control.should_evaluate and state.global_step % args.eval_steps:
            control.should_evaluate = False  # the Trainer's extra check at the end: the full evaluation follows
        if self.deadline is not None:
            self._keep_to_the_deadline(now, control)
        self._follow_rank_zero(control)
        if control.should_save and not control.should_evaluate:  # the checkpoint must carry the clock for --resume
            state.log_history.append({CLOCK_LOG_KEY: now, "step": state.global_step})

    def _keep_to_the_deadline(self, now: float, control: TrainerControl) -> None:
        """Drop a check or a save due now that would end past the deadline; stop if the next step would."""
        due = 0.0
        if control.should_evaluate:
            if now + self.check_seconds > self.deadline:
                control.should_evaluate = False  # the evaluation after training measures it anyway
            else:
                due += self.check_seconds
        if control.should_save:
            if now + due + self.save_seconds > self.deadline:
                control.should_save = False
            else:
                due += self.save_seconds
        if not control.should_training_stop and now + due + self.next_step_seconds() > self.deadline:
            self.reason = "time"
            control.should_training_stop = True

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, float] | None = None, **kwargs: Any) -> None:
        now = self.clock.seconds()
        self.check_seconds, self._mark = now - self._mark, now
        cosine = (metrics or {}).get("eval_output_cosine")
        if self.target_cosine is not None and cosine is not None and cosine >= self.target_cosine:
            self.reason, self.detail = "target", f"{cosine:.4f}"
            control.should_training_stop = True
        if self.target_cosine is not None:
            self._follow_rank_zero(control)

    def _follow_rank_zero(self, control: TrainerControl) -> None:
        """Under several processes, each one's clock and measurements differ a little: rank 0 decides, or one
        process would stop (or check, or save) while the others wait for it in a collective."""
        if distributed.launched():
            (control.should_training_stop, control.should_evaluate, control.should_save, self.reason,
             self.detail) = distributed.broadcast((control.should_training_stop, control.should_evaluate,
                                                   control.should_save, self.reason, self.detail))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        now = self.clock.seconds()
        self.save_seconds, self._mark = now - self._mark, now
