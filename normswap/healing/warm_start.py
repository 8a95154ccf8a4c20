"""Closed-form warm start: refit each branch's output projection by least squares, layer by layer.

After a placement change every branch still reads (nearly) what it read before, but the residual stream
it adds to is different. For sublayer k the student's stream after the add, ``skip + W z + b``, should be
the teacher's stream at the same point, up to what the next norm ignores: a per-token scale for RMSNorm,
scale and shift for LayerNorm. So per token we pick the target ``alpha * u + beta`` closest to ``skip``
(the smallest correction), and solve for the writer ``W, b`` in float64 over calibration tokens, with a
ridge pull toward the current weights. Sublayers are fitted in order, each on the stream that the already
refitted earlier sublayers produce (the sequential calibration of GPTQ and SliceGPT).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..conversion.norm_kind import linear_layout
from .taps import Correspondence, WriterSite, capture

_LAYER_NORM_KINDS = frozenset({"layernorm", "layernorm-nobias", "layernorm-noaffine", "layernorm-offset"})


@dataclass(frozen=True)
class WriterFit:
    """How much of the target one refitted writer explains: relative residual before and after."""

    path: str
    tokens: int
    residual_before: float
    residual_after: float


@torch.no_grad()
def fit_writers(teacher: nn.Module, student: nn.Module, correspondence: Correspondence,
                batches: Sequence[dict[str, torch.Tensor]], ridge: float = 1e-3) -> list[WriterFit]:
    """Refit every student writer in order, then the affine part of the norm that reads its result.

    The norm refit is per channel: ``gamma, beta`` by least squares so that what the next branch reads
    (``gamma * n + beta``, ``n`` the normalised student stream) matches what it reads in the teacher.
    """
    teacher_streams = _teacher_values(teacher, correspondence, batches)
    fits = []
    for site in correspondence.writers:
        fits.append(_fit_one(student, site, teacher_streams[f"{site.next_entry.teacher}:in"], batches, ridge))
        if site.next_entry.student not in correspondence.read_maps:  # else its readers hold g / s: it stays at s
            _fit_norm(student, site.next_entry.student, teacher_streams[site.next_entry.teacher], batches)
    return fits


def _teacher_values(teacher: nn.Module, correspondence: Correspondence,
                    batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """The teacher's stream (norm input, ``path:in``) and branch input (norm output, ``path``) per batch."""
    wanted = {site.next_entry.teacher: site.next_entry.teacher for site in correspondence.writers}
    values: dict[str, list[torch.Tensor]] = {}
    with capture(teacher, wanted, keep_inputs=True) as found:
        for batch in batches:
            teacher(**batch)
            mask = batch["attention_mask"].bool()
            for path in wanted:
                for key in (path, f"{path}:in"):
                    values.setdefault(key, []).append(found[key][mask].float())
    return values


def _fit_norm(student: nn.Module, path: str, targets: list[torch.Tensor],
              batches: Sequence[dict[str, torch.Tensor]]) -> None:
    """Per-channel least squares for the norm's weight (and bias, if it has one)."""
    norm = student.get_submodule(path)
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if weight is None or weight.dim() != 1 or bool((weight == 0).any()):
        return
    sums = torch.zeros(5, weight.numel(), dtype=torch.float64)  # n, t, n*n, n*t, count
    with capture(student, {"norm": path}) as found:
        for batch, target in zip(batches, targets, strict=True):
            student(**batch)
            output = found["norm"][batch["attention_mask"].bool()].double()
            normalised = (output - (bias.double() if bias is not None else 0.0)) / weight.double()
            t = target.double()
            sums += torch.stack([normalised.sum(0), t.sum(0), (normalised * normalised).sum(0),
                                 (normalised * t).sum(0), torch.full_like(t[0], len(t))])
    n, t, nn_, nt, count = sums
    if bias is not None:
        variance = nn_ / count - (n / count) ** 2
        new_weight = (nt / count - (n / count) * (t / count)) / variance.clamp_min(1e-12)
        bias.copy_((t / count - new_weight * n / count).to(bias.dtype))
    else:
        new_weight = nt / nn_.clamp_min(1e-12)
    weight.copy_(new_weight.to(weight.dtype))


def _fit_one(student: nn.Module, site: WriterSite, targets: list[torch.Tensor],
             batches: Sequence[dict[str, torch.Tensor]], ridge: float) -> WriterFit:
    writer = student.get_submodule(site.path)
    layout = linear_layout(writer)
    has_bias = getattr(writer, "bias", None) is not None
    shift = site.next_entry.student_kind in _LAYER_NORM_KINDS
    gram = rhs = None
    tokens, before, total = 0, 0.0, 0.0
    with capture(student, {"next": site.next_entry.student}, (site.path,), keep_inputs=True) as found:
        for batch, teacher_stream in zip(batches, targets, strict=True):
            student(**batch)
            mask = batch["attention_mask"].bool()
            z = found[f"{site.path}:in"][mask].float()
            g = found[f"{site.path}:out"][mask].double()
            skip = found["next:in"][mask].double() - g
            wanted = _closest_target(teacher_stream.double(), skip, shift) - skip
            features = torch.cat([z, torch.ones(len(z), 1)], 1) if has_bias else z
            # products in float32 (4x faster on a CPU), summed per batch in float64
            gram_part = (features.T @ features).double()
            rhs_part = (features.T @ wanted.float()).double()
            gram = gram_part if gram is None else gram + gram_part
            rhs = rhs_part if rhs is None else rhs + rhs_part
            before += float(((g - wanted) ** 2).sum())
            total += float((wanted ** 2).sum())
            tokens += len(z)
    assert gram is not None and rhs is not None
    current = _current(writer, layout, has_bias)
    strength = ridge * float(gram.diagonal().mean())
    solution = torch.linalg.solve(gram + strength * torch.eye(len(gram), dtype=torch.float64),
                                  rhs + strength * current)
    after = float(((rhs.T @ solution).trace() * -2 + (solution.T @ gram @ solution).trace()) + total)
    _assign(writer, layout, has_bias, solution)
    return WriterFit(site.path, tokens, before / total if total else 0.0, max(after, 0.0) / total if total else 0.0)


def _closest_target(stream: torch.Tensor, skip: torch.Tensor, shift: bool) -> torch.Tensor:
    """Per token, ``alpha * stream (+ beta)`` closest to ``skip``, with alpha kept positive."""
    if shift:
        stream_mean, skip_mean = stream.mean(-1, keepdim=True), skip.mean(-1, keepdim=True)
        centred, skip_centred = stream - stream_mean, skip - skip_mean
    else:
        centred, skip_centred = stream, skip
    scale = (centred * skip_centred).sum(-1, keepdim=True) / (centred * centred).sum(-1, keepdim=True).clamp_min(1e-12)
    floor = 0.1 * skip_centred.norm(dim=-1, keepdim=True) / centred.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scale = torch.maximum(scale, floor)
    if shift:
        return scale * centred + skip_mean
    return scale * centred


def _current(writer: nn.Module, layout: str | None, has_bias: bool) -> torch.Tensor:
    weight = writer.weight.double()
    weight = weight.T if layout == "out_in" else weight  # (in, out)
    return torch.cat([weight, writer.bias.double()[None]], 0) if has_bias else weight


def _assign(writer: nn.Module, layout: str | None, has_bias: bool, solution: torch.Tensor) -> None:
    weight = solution[:-1] if has_bias else solution
    writer.weight.copy_((weight.T if layout == "out_in" else weight).to(writer.weight.dtype))
    if has_bias:
        writer.bias.copy_(solution[-1].to(writer.bias.dtype))


def refitted_tensors(student: nn.Module, correspondence: Correspondence) -> dict[torch.Tensor, torch.Tensor]:
    """Copies of the tensors ``fit_writers`` may change (each writer's and each next norm's weight and bias), so
    a warm start that lands further from the teacher than where it started can be undone."""
    modules = [student.get_submodule(path) for site in correspondence.writers
               for path in (site.path, site.next_entry.student)]
    return {tensor: tensor.detach().clone() for module in modules for name in ("weight", "bias")
            if isinstance(tensor := getattr(module, name, None), torch.Tensor)}


@torch.no_grad()
def restore(kept: dict[torch.Tensor, torch.Tensor]) -> None:
    for tensor, copy in kept.items():
        tensor.copy_(copy)
