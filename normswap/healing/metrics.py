"""How close the student is to the teacher on held-out text.

* ``output_cosine``: mean per-token cosine of the stacks' final hidden states (every model);
* ``pooled_cosine`` / ``spearman``: mean cosine of mean-pooled, normalised sentence embeddings, and the
  Spearman correlation of all pairwise similarities (what a sentence-embedding user sees);
* ``entry_cosines``: per-sublayer cosine of what each branch reads;
* for language models, ``next_token_kl`` (teacher || student) and ``perplexity_ratio`` (student / teacher).

Each text's share of every figure is kept (``TextFigures``), so the figures of any subset of texts can be
summed: when the time budget cuts the evaluation after training short, the one before training is
summarised over the same texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812


@dataclass(frozen=True)
class TextFigures:
    """One held-out text's share of every figure."""

    tokens: int
    entry_sums: tuple[float, ...]  # per entry: the sum over the text's tokens of the teacher-student cosine
    pooled_teacher: torch.Tensor  # normalised mean-pooled final hidden state (float64, CPU)
    pooled_student: torch.Tensor
    lm_tokens: int = 0  # next-token positions (language models)
    kl: float = 0.0  # summed over those positions
    nll_teacher: float = 0.0
    nll_student: float = 0.0


def summarise(texts: Sequence[TextFigures], output_entry: int) -> dict[str, Any]:
    """Every figure over ``texts``; ``output_entry`` is the entry of the (last) stack's output."""
    tokens = sum(text.tokens for text in texts)
    sums = [sum(column) for column in zip(*(text.entry_sums for text in texts), strict=True)]
    a = torch.stack([text.pooled_teacher for text in texts])
    b = torch.stack([text.pooled_student for text in texts])
    result: dict[str, Any] = {
        "output_cosine": sums[output_entry] / tokens,
        "pooled_cosine": float((a * b).sum(-1).mean()),
        "spearman": spearman_of_similarities(a, b),
        "entry_cosines": [value / tokens for value in sums],
    }
    lm_tokens = sum(text.lm_tokens for text in texts)
    if lm_tokens:
        result["next_token_kl"] = sum(text.kl for text in texts) / lm_tokens
        nll = sum(text.nll_student - text.nll_teacher for text in texts)
        result["perplexity_ratio"] = float(torch.exp(torch.tensor(nll / lm_tokens)))
    return result


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalised mean over each row's real tokens, in float64."""
    weights = mask.unsqueeze(-1).double()
    pooled = (hidden.double() * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return F.normalize(pooled, dim=-1)


def spearman_of_similarities(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation between the pairwise cosine similarities within ``a`` and within ``b``."""
    upper = torch.triu_indices(len(a), len(a), 1, device=a.device)
    x = (a @ a.T)[upper[0], upper[1]]
    y = (b @ b.T)[upper[0], upper[1]]
    rank_x = torch.empty_like(x).scatter_(0, x.argsort(), torch.arange(len(x), dtype=x.dtype, device=x.device))
    rank_y = torch.empty_like(y).scatter_(0, y.argsort(), torch.arange(len(y), dtype=y.dtype, device=y.device))
    return float(torch.corrcoef(torch.stack([rank_x, rank_y]))[0, 1])
