"""Evaluating the student against the teacher on held-out texts, cheaply and within a deadline.

The teacher does not change while the student trains, so its activations on each held-out text are kept
from the first evaluation (up to ``CACHE_BYTES``; texts beyond that run the teacher again), and later
evaluations (the checks during training, the one after it) run only the student: on MiniLM that halves
them. Forwards are timed per padded token, so the budget can estimate the evaluation of any texts; with a
deadline, an evaluation stops before a batch that would end after it and returns the texts it got through
(at least one batch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from . import budget
from .budget import EvaluationCost
from .metrics import TextFigures, mean_pool, summarise
from .rows import TokenisedTexts
from .taps import Correspondence, capture

CACHE_BYTES = 512 * 2**20  # teacher activations kept in memory (MiniLM's 256 held-out texts take 160 MB)
LOG_P = ":log_p"  # cache key of a language model's next-token log-probabilities
POOL = 8  # batches sorted by length together: little padding, and a cut evaluation is still a fair sample


class HeldOutEvaluation:
    """The held-out texts ``rows``, measured on the student as it is now against the (cached) teacher."""

    def __init__(self, teacher: nn.Module, student: nn.Module, correspondence: Correspondence,
                 rows: TokenisedTexts, batch_size: int, cache_bytes: int = CACHE_BYTES) -> None:
        self.teacher = teacher
        self.student = student
        self.rows = rows
        self.batch_size = batch_size
        self.keys = tuple(entry.student for entry in correspondence.entries)
        self.teacher_paths = {entry.student: entry.teacher for entry in correspondence.entries}
        self.read_maps = correspondence.read_maps  # a folded pre norm: the student's read in the teacher's terms
        self.output_entry = self.keys.index(correspondence.final_entries()[-1].student)
        self.cache_bytes = cache_bytes
        self._cache: dict[int, dict[str, torch.Tensor]] = {}
        self._cached_bytes = 0
        self._cached_tokens = 0
        self._seconds = {"teacher": 0.0, "student": 0.0}
        self._tokens = {"teacher": 0, "student": 0}

    def cost(self) -> EvaluationCost:
        """Seconds per padded token measured so far."""
        return EvaluationCost(*(self._seconds[side] / max(1, self._tokens[side]) for side in ("teacher", "student")))

    def cacheable(self, lengths: Sequence[int]) -> int:
        """How many leading texts of these lengths the cache will hold, at the bytes per token seen so far."""
        if not self._cached_tokens:
            return 0
        per_token = self._cached_bytes / self._cached_tokens
        count, used = 0, 0.0
        for length in lengths:
            used += length * per_token
            if used > self.cache_bytes:
                break
            count += 1
        return count

    def estimate(self, indices: Sequence[int]) -> float:
        """Seconds to evaluate these texts now (the student alone where the teacher is cached)."""
        cost = self.cost()
        return sum(cost.seconds(len(batch) * max(self.rows.lengths[i] for i in batch),
                                teacher_too=not all(i in self._cache for i in batch))
                   for batch in self._batches(indices))

    def summary(self, figures: dict[int, TextFigures], indices: Sequence[int] | None = None) -> dict[str, Any]:
        """Every figure over ``indices`` (all measured texts by default)."""
        chosen = figures if indices is None else indices
        return summarise([figures[i] for i in chosen], self.output_entry)

    @torch.no_grad()
    def measure(self, indices: Sequence[int], deadline: float | None = None,
                at_least: int = 1) -> dict[int, TextFigures]:
        """Each text's figures; with ``deadline`` (on ``budget.now``), only the batches that fit before it,
        once ``at_least`` texts are measured."""
        device = next(self.student.parameters()).device
        was_training = self.student.training
        self.student.eval()
        found: dict[int, TextFigures] = {}
        try:
            for batch in self._batches(indices):
                if (deadline is not None and len(found) >= at_least
                        and budget.now() + self.estimate(batch) > deadline):
                    break
                found.update(self._measure_batch(batch, device))
        finally:
            self.student.train(was_training)
        return found

    def _batches(self, indices: Sequence[int]) -> Iterator[list[int]]:
        """Batches in the given order, each pool of ``POOL`` batches sorted by length."""
        size = self.batch_size * POOL
        for start in range(0, len(indices), size):
            pool = sorted(indices[start:start + size], key=self.rows.lengths.__getitem__)
            yield from (pool[i:i + self.batch_size] for i in range(0, len(pool), self.batch_size))

    def _measure_batch(self, indices: list[int], device: torch.device) -> dict[int, TextFigures]:
        batch = {name: value.to(device) for name, value in self.rows.pad_batch([self.rows[i] for i in indices]).items()}
        mask = batch["attention_mask"].bool()
        started = budget.now()
        if all(i in self._cache for i in indices):
            teacher = self._cached(indices, mask.shape[1], device)
        else:
            teacher = self._run_teacher(batch, indices)
            self._count("teacher", started, mask.numel())
        started = budget.now()
        with capture(self.student, {key: key for key in self.keys}) as found:
            output = self.student(**batch)
        student = {key: (self.read_maps[key](found[key]) if key in self.read_maps else found[key]).float()
                   for key in self.keys if key in found}
        figures = self._figures(indices, batch, mask, teacher, student, getattr(output, "logits", None))
        self._count("student", started, mask.numel())
        return figures

    def _count(self, side: str, started: float, tokens: int) -> None:
        self._seconds[side] += budget.now() - started
        self._tokens[side] += tokens

    def _run_teacher(self, batch: dict[str, torch.Tensor], indices: list[int]) -> dict[str, torch.Tensor]:
        with capture(self.teacher, self.teacher_paths) as found:
            output = self.teacher(**batch)
        taps = {key: found[key].float() for key in self.keys if key in found}
        logits = getattr(output, "logits", None)
        if logits is not None and logits.dim() == 3:  # float32, whether cached or not: before and after agree
            taps[LOG_P] = F.log_softmax(logits[:, :-1].double(), -1).float()
        for row, index in enumerate(indices):
            length = self.rows.lengths[index]
            if index in self._cache:
                continue
            kept = {key: value[row, :length - 1 if key == LOG_P else length].clone() for key, value in taps.items()}
            size = sum(value.nbytes for value in kept.values())
            if self._cached_bytes + size <= self.cache_bytes:
                self._cache[index] = {key: value.cpu() for key, value in kept.items()}
                self._cached_bytes += size
                self._cached_tokens += length
        return taps

    def _cached(self, indices: list[int], width: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The cached teacher activations of these texts, right-padded like the batch."""
        taps = {}
        for key in self._cache[indices[0]]:
            values = [self._cache[i][key] for i in indices]
            padded = values[0].new_zeros((len(values), width - 1 if key == LOG_P else width, *values[0].shape[1:]))
            for row, value in enumerate(values):
                padded[row, :len(value)] = value
            taps[key] = padded.to(device)
        return taps

    def _figures(self, indices: list[int], batch: dict[str, torch.Tensor], mask: torch.Tensor,
                 teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor],
                 logits: torch.Tensor | None) -> dict[int, TextFigures]:
        weights = mask.double()
        sums = [(F.cosine_similarity(teacher[key], student[key], dim=-1).double() * weights).sum(1).tolist()
                if key in teacher and key in student else [0.0] * len(indices) for key in self.keys]
        final = self.keys[self.output_entry]
        pooled_t, pooled_s = mean_pool(teacher[final], mask).cpu(), mean_pool(student[final], mask).cpu()
        tokens = mask.sum(1).tolist()
        lm: list[tuple[int, float, float, float]] = [(0, 0.0, 0.0, 0.0)] * len(indices)
        if LOG_P in teacher and logits is not None and logits.dim() == 3:
            keep = weights[:, 1:]
            log_p, log_q = teacher[LOG_P].double(), F.log_softmax(logits[:, :-1].double(), -1)
            labels = batch["input_ids"][:, 1:, None]
            kl = ((log_p.exp() * (log_p - log_q)).sum(-1) * keep).sum(1)
            nll_t = -(log_p.gather(-1, labels).squeeze(-1) * keep).sum(1)
            nll_s = -(log_q.gather(-1, labels).squeeze(-1) * keep).sum(1)
            lm = list(zip(keep.sum(1).long().tolist(), kl.tolist(), nll_t.tolist(), nll_s.tolist(), strict=True))
        return {index: TextFigures(int(tokens[row]), tuple(column[row] for column in sums), pooled_t[row],
                                   pooled_s[row], *lm[row]) for row, index in enumerate(indices)}
