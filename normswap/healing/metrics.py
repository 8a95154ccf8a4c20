"""How close the student is to the teacher on held-out text.

* ``output_cosine``: mean per-token cosine of the stacks' final hidden states (every model);
* ``pooled_cosine`` / ``spearman``: mean cosine of mean-pooled, normalised sentence embeddings, and the
  Spearman correlation of all pairwise similarities (what a sentence-embedding user sees);
* ``entry_cosines``: per-sublayer cosine of what each branch reads;
* for language models, ``next_token_kl`` (teacher || student) and ``perplexity_ratio`` (student / teacher).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .taps import Correspondence, capture


@torch.no_grad()
def compare(teacher: nn.Module, student: nn.Module, correspondence: Correspondence, dataset: Any,
            batch_size: int = 32, limit: int | None = None) -> dict[str, Any]:
    """Every figure above on the first ``limit`` rows of ``dataset`` (all by default)."""
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    keys = [entry.student for entry in correspondence.entries]
    teacher_map = {entry.student: entry.teacher for entry in correspondence.entries}
    finals = [entry.student for entry in correspondence.final_entries()]
    sums = {key: 0.0 for key in keys}
    tokens = 0
    pooled_t, pooled_s = [], []
    kl_sum = nll_t = nll_s = 0.0
    lm_tokens = 0
    for rows in dataset.batches(batch_size, limit=limit, by_length=True):
        batch = {name: value.to(device) for name, value in rows.items()}
        mask = batch["attention_mask"].bool()
        with capture(teacher, teacher_map) as found_t:
            out_t = teacher(**batch)
        with capture(student, {key: key for key in keys}) as found_s:
            out_s = student(**batch)
        for key in keys:
            if key in found_t and key in found_s:
                a, b = found_t[key][mask].double(), found_s[key][mask].double()
                sums[key] += float(F.cosine_similarity(a, b, dim=-1).sum())
        tokens += int(mask.sum())
        final = finals[-1]
        pooled_t.append(_mean_pool(found_t[final], mask).cpu())  # the pairwise figures are computed on CPU
        pooled_s.append(_mean_pool(found_s[final], mask).cpu())
        logits_t, logits_s = getattr(out_t, "logits", None), getattr(out_s, "logits", None)
        if logits_t is not None and logits_s is not None and logits_t.dim() == 3:
            keep = mask[:, 1:]
            log_p = F.log_softmax(logits_t[:, :-1][keep].double(), -1)
            log_q = F.log_softmax(logits_s[:, :-1][keep].double(), -1)
            labels = batch["input_ids"][:, 1:][keep]
            kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
            nll_t -= float(log_p.gather(-1, labels[:, None]).sum())
            nll_s -= float(log_q.gather(-1, labels[:, None]).sum())
            lm_tokens += int(keep.sum())
    student.train(was_training)
    a, b = torch.cat(pooled_t), torch.cat(pooled_s)
    result: dict[str, Any] = {
        "output_cosine": sums[finals[-1]] / tokens,
        "pooled_cosine": float((a * b).sum(-1).mean()),
        "spearman": spearman_of_similarities(a, b),
        "entry_cosines": [sums[key] / tokens for key in keys],
    }
    if lm_tokens:
        result["next_token_kl"] = kl_sum / lm_tokens
        result["perplexity_ratio"] = float(torch.exp(torch.tensor((nll_s - nll_t) / lm_tokens)))
    return result


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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
