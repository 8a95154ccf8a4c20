"""How ``--max-time`` is spent: the whole heal (loading, the evaluations before and after, training, and the
caller's save) fits in it.

The first batch of held-out texts is timed through the teacher and the student, and one training batch
forward and backward, before anything else runs; from them the plan estimates what the evaluations and a
training step cost. The evaluations may take at most
a quarter of what is left after loading: when all held-out texts would take more, fewer are evaluated and
the report says so. Training gets the rest, less the final evaluation and the save. A budget that cannot
fit one training step and an evaluation of a few texts is refused before training, naming a budget that
would fit. Estimates are measurements times ``SAFETY``: a loaded machine is slower one minute than the next.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import NormswapError

DEFAULT_STEPS = 300  # the step limit when neither --max-steps nor --max-time is given
UNBOUNDED_STEPS = 1_000_000_000  # the Trainer's step limit when the time budget alone ends training
EVALUATION_SHARE = 0.25  # of the time left after loading, at most this much goes to the two evaluations
MIN_EVALUATED = 16  # held-out texts evaluated at the least (all of them when there are fewer)
SAFETY = 1.25  # estimates are measured costs times this
STEP_EXTRA = 1.2  # a Trainer step over the timed forward and backward: the optimiser, clipping, the data
SETUP_SECONDS = 1.0  # the Trainer's own start (optimiser, data loader), before its first step


def now() -> float:
    """The clock every budget decision reads (tests replace it with a deterministic one)."""
    return time.monotonic()


class BudgetError(NormswapError):
    """``--max-time`` cannot fit the heal that was asked for."""


def check_limits(max_steps: int | None, max_time: float | None) -> None:
    """Refuse limits that cannot be met at all, before anything is loaded."""
    if max_steps is not None and max_steps < 1:
        raise BudgetError(f"--max-steps {max_steps}: give at least 1 step, or leave it out to train until --max-time")
    if max_time is not None and not max_time > 0:  # also refuses NaN
        raise BudgetError(f"--max-time {max_time:g}: give a positive number of seconds")


def step_limit(max_steps: int | None, max_time: float | None) -> int | None:
    """The step limit: as given; none when only a time budget is given (the time ends training); else 300."""
    if max_steps is not None:
        return max_steps
    return None if max_time is not None else DEFAULT_STEPS


def save_seconds(weight_bytes: int) -> float:
    """A generous estimate of writing a checkpoint of ``weight_bytes`` (shards, config, report, support files):
    MiniLM's 90 MB measured about 0.5 s on 2 CPU cores."""
    return 1.0 + weight_bytes / 100e6


@dataclass(frozen=True)
class EvaluationCost:
    """Seconds per padded token of the teacher's and the student's evaluation forwards, as measured so far."""

    teacher: float
    student: float

    def seconds(self, tokens: int, teacher_too: bool = True) -> float:
        return SAFETY * tokens * (self.student + (self.teacher if teacher_too else 0.0))


@dataclass(frozen=True)
class BudgetPlan:
    """What the budget allows, decided after the first batch of the evaluation before training."""

    max_time: float
    elapsed: float  # seconds this command had spent when the plan was made (loading, the first batch)
    earlier_training: float  # training seconds of the runs that --resume continues (they count too)
    reserve: float  # seconds kept for the caller's save after healing
    least: int  # held-out texts evaluated whatever their cost
    before_seconds: float  # what the rest of the evaluation before training may take
    step_seconds: float  # estimated: the first training step, with the Trainer's start

    @property
    def available(self) -> float:
        """Seconds left for the evaluations and training when the plan was made."""
        return self.max_time - self.earlier_training - self.elapsed - self.reserve

    def note(self, evaluated: int, cost: EvaluationCost, lengths: Sequence[int]) -> str:
        """Why only ``evaluated`` of the held-out texts (of these ``lengths``) were evaluated, or ''."""
        if evaluated >= len(lengths):
            return ""
        tokens = sum(lengths)
        every = cost.seconds(tokens) + cost.seconds(tokens, teacher_too=False)
        return (f"evaluated on {evaluated} of the {len(lengths)} held-out texts to fit --max-time {self.max_time:g} "
                f"s: the evaluations may take a quarter of the {self.available:.0f} s left after loading, and all "
                f"texts would take about {every:.0f} s (a larger --max-time or a smaller --held-out evaluates all)")


def plan_budget(max_time: float, elapsed: float, reserve: float, cost: EvaluationCost, lengths: Sequence[int],
                done: int, step: float, earlier_training: float = 0.0, cached: int | None = None) -> BudgetPlan:
    """Give the evaluation before training its share of the budget, or refuse the budget.

    ``lengths``: the held-out texts' token counts in evaluation order; the first ``done`` are evaluated
    already (the timed batch). ``step``: the seconds one forward and backward of a training batch took, timed
    cold, as the Trainer's first step will be. ``cached``: how many texts' teacher activations are kept after the first
    evaluation (all by default), so evaluating them after training needs only the student. The evaluation
    before training stops once it has used its share (``before_seconds``), so a machine slower or faster than
    the first batch showed is measured, not guessed; the one after training covers the same texts.
    """
    cached = len(lengths) if cached is None else cached
    upto = [0, *itertools.accumulate(lengths)]  # upto[n]: tokens of the first n texts

    def before(count: int) -> float:
        return cost.seconds(upto[count] - upto[min(done, count)])

    def after(count: int) -> float:
        kept = min(count, cached)
        return cost.seconds(upto[kept], teacher_too=False) + cost.seconds(upto[count] - upto[kept])

    step = SAFETY * STEP_EXTRA * step + SETUP_SECONDS
    least = min(len(lengths), max(MIN_EVALUATED, done))
    available = max_time - earlier_training - elapsed - reserve
    needed = before(least) + after(least) + step
    if available < needed:
        spent = f"loading took {elapsed:.1f} s" + (
            f", the runs it resumes trained {earlier_training:.0f} s" if earlier_training else "")
        raise BudgetError(f"--max-time {max_time:g} s cannot fit healing: {spent}, and evaluating {least} held-out "
                          f"texts before and after training, one training step and saving need about "
                          f"{needed + reserve:.1f} s more; give --max-time "
                          f"{math.ceil(max_time + needed - available)} or more")
    allowance = max(before(least) + after(least), min(EVALUATION_SHARE * available, available - step))
    share = before(len(lengths)) / max(1e-12, before(len(lengths)) + after(len(lengths)))
    return BudgetPlan(max_time, elapsed, earlier_training, reserve, least, max(before(least), share * allowance),
                      step)
