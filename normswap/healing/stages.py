"""A staged removal of the norms (``heal --stages``): one group of norms at a time, healing in between.

A ``--norm none`` conversion replaces every residual norm by its calibrated stand-in at once. Removing them a
group at a time (the MLP norms, then the attention norms, then the final norm), with healing after each, lets
every stage start closer to the teacher. The stages run on the converted model itself: first every stand-in
computes its norm again (its weight the teacher's gain, its input divided by the token's own scale, so the
student is the teacher up to float rounding); each stage then fixes its group's stand-ins at the scale their
input has in the model healed so far, and heals. After the last stage the model is the converted one's
architecture with every stand-in fixed, so it is saved, loaded and regenerated like the conversion itself.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..conversion.calibration import calibrate
from ..conversion.norm_free import calibration_site, norm_groups, residual_norm_sites
from ..conversion.norm_kind import head_output
from ..detect import inspect
from ..errors import NormswapError
from ..topology import OFFSET_NORM_KINDS, NormSite
from . import budget, distributed
from .api import heal
from .evaluation import HeldOutEvaluation
from .report import HealReport
from .rows import TokenisedTexts
from .taps import correspond
from .teacher_texts import healing_texts
from .texts import split_texts

_CALIBRATION_ROWS = 32
_SAME_AS_TEACHER = 1e-3  # of max|teacher output|: the restored student must be the teacher up to float rounding


@dataclass(frozen=True)
class StandIn:
    """A stand-in of the student and the teacher's norm it replaced (same path: ``--norm none`` moves no norm)."""

    path: str
    norm: NormSite
    groups: tuple[str, ...]


def heal_in_stages(teacher: nn.Module, student: nn.Module, stages: Sequence[Sequence[str]],
                   data: Any = None, *, tokenizer: Any = None, max_steps: int | None = None,
                   max_time: float | None = None, started: float | None = None, reserve: float = 0.0,
                   max_length: int = 64, batch_size: int = 8, held_out: int = 256, seed: int = 0,
                   work_dir: Any = None, resume: bool = False, **options: Any) -> tuple[nn.Module, HealReport]:
    """Heal ``student``, a ``--norm none`` conversion of ``teacher``, removing its norms stage by stage.

    ``stages``: per stage, the groups of norms it removes (``norm_groups``: ``mlp``, ``attention``, ``final``,
    ``mlp:pre``, ...); together they must name every stand-in. ``max_steps`` and ``max_time`` are the whole run's,
    shared out evenly over the stages (the time as it remains: a stage that ends early leaves its time to the
    next); ``options`` go to every stage's ``heal``. Returns the student and the last stage's report, with the
    steps and time of all of them and each stage's figures (``HealReport.stages``).
    """
    if resume:
        raise NormswapError("--stages cannot --resume: a resumed stage would start from norms the checkpoint does not "
                            "say were fixed; heal in stages from the converted model again")
    begun = budget.now() if started is None else started
    stand_ins = _stand_ins(teacher, student)
    plan = _stage_paths(stand_ins, stages)
    distributed.start()
    # once, by rank 0 (teacher samples are slow), for every stage and process
    texts = distributed.broadcast(healing_texts(data, teacher, tokenizer, max_length, work_dir, seed)
                                  if distributed.is_main() else None)
    split, vocab = split_texts(texts, held_out), student.get_input_embeddings().num_embeddings
    train = TokenisedTexts(split.train[:_CALIBRATION_ROWS], tokenizer, max_length, vocab)
    rows = {"input_ids": train.input_ids, "attention_mask": train.attention_mask}
    # the conversion as given, every norm removed at once: what the stages are measured against
    evaluator = HeldOutEvaluation(teacher, student, correspond(teacher, student),
                                  TokenisedTexts(split.held_out, tokenizer, max_length, vocab), batch_size)
    before = evaluator.summary(evaluator.measure(range(len(split.held_out))))
    _restore_norms(teacher, student, stand_ins)
    _require_teacher(teacher, student, rows)
    reports: list[HealReport] = []
    try:
        for number, (_groups, paths) in enumerate(plan):
            _fix(student, [stand_ins[path] for path in paths], rows)
            left = len(plan) - number
            time_share = None
            if max_time is not None:
                time_share = (max_time - (budget.now() - begun) - reserve) / left
                if time_share <= 0:
                    raise budget.BudgetError(f"--max-time {max_time:g} s ran out before stage {number + 1} of "
                                             f"{len(plan)}; give a larger --max-time")
            steps = None if max_steps is None else max(1, (max_steps - sum(r.steps for r in reports)) // left)
            stage_dir = None if work_dir is None else f"{work_dir}/stage-{number + 1}"
            student, report = heal(teacher, student, list(texts), tokenizer=tokenizer, max_steps=steps,
                                   max_time=time_share, reserve=reserve if left == 1 else 0.0,
                                   max_length=max_length, batch_size=batch_size, held_out=held_out, seed=seed,
                                   work_dir=stage_dir, **options)
            reports.append(report)
    finally:
        _release(student, stand_ins)
    return student, _combined(before, reports, plan, budget.now() - begun)


def _stand_ins(teacher: nn.Module, student: nn.Module) -> dict[str, StandIn]:
    """Every stand-in of ``student`` with the teacher's norm in its place, in model order."""
    topology = inspect(teacher)
    norms = {norm.path: norm for norm in residual_norm_sites(topology)}
    groups = norm_groups(topology)
    found: dict[str, StandIn] = {}
    for path, module in student.named_modules():
        if type(module).__name__ != "NormswapStandIn":  # not DyT, the other stand-in class: it cannot normalise
            continue
        if path not in norms:
            raise NormswapError(f"the student's stand-in {path} has no residual norm at that path in the teacher: "
                                "--stages heals a --norm none conversion of the teacher, which keeps every norm's path")
        found[path] = StandIn(path, norms[path], groups.get(path, ()))
    if not found:
        raise NormswapError("--stages removes the norms of a --norm none conversion in stages, and the converted "
                            "model has no calibrated stand-in (NormswapStandIn); convert the original with --norm "
                            "none first")
    return found


def _stage_paths(stand_ins: dict[str, StandIn], stages: Sequence[Sequence[str]]
                 ) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Per stage, its groups and the stand-ins it fixes (each once, at its first stage); every stand-in must be
    named by some stage, and every stage must fix some."""
    known = sorted({name for each in stand_ins.values() for name in each.groups})
    left = list(stand_ins)
    plan = []
    for number, stage in enumerate(stages, 1):
        unknown = [name for name in stage if name not in known]
        if unknown:
            raise NormswapError(f"--stages: no norm is in the group {unknown[0]!r}; the groups are {', '.join(known)}")
        paths = tuple(path for path in left if set(stand_ins[path].groups) & set(stage))
        if not paths:
            raise NormswapError(f"--stages: stage {number} ({'+'.join(stage)}) has no norm left to remove: an "
                                "earlier stage removed them; leave it out")
        left = [path for path in left if path not in paths]
        plan.append((tuple(stage), paths))
    if left:
        missing = sorted({name for path in left for name in stand_ins[path].groups[:1]})
        raise NormswapError(f"--stages leaves {len(left)} norms ({left[0]}, ...) in place, and the result must have "
                            f"none: add a stage with {'+'.join(missing)}")
    return plan


@torch.no_grad()
def _restore_norms(teacher: nn.Module, student: nn.Module, stand_ins: dict[str, StandIn]) -> None:
    """Every stand-in computes its norm again: its weight and bias the teacher's gain and bias, its input divided
    by the token's own scale (``_normalising``)."""
    for path, stand_in in stand_ins.items():
        module, original = student.get_submodule(path), teacher.get_submodule(path)
        weight, bias = getattr(original, "weight", None), getattr(original, "bias", None)
        gain = torch.ones_like(module.weight) if weight is None else weight.detach().to(module.weight.dtype)
        if stand_in.norm.kind in OFFSET_NORM_KINDS:
            gain = 1 + gain
        module.weight.copy_(gain)
        if module.bias is not None:
            module.bias.copy_(torch.zeros_like(module.bias) if bias is None else bias.detach())
        module.forward = types.MethodType(_normalising(type(module).forward, calibration_site(stand_in.norm)), module)


def _normalising(forward: Any, site: Any) -> Any:
    """``forward`` of a stand-in on its input divided by each token's own scale (the norm's statistic and eps)."""
    def normalised(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        channels_last = hidden_states.movedim(site.axis, -1)
        centred = channels_last - channels_last.mean(-1, keepdim=True) if site.statistic == "std" else channels_last
        scale = (centred.float().pow(2).mean(-1, keepdim=True) + site.eps).sqrt().to(hidden_states.dtype)
        return forward(self, (channels_last / scale).movedim(-1, site.axis))

    return normalised


@torch.no_grad()
def _fix(student: nn.Module, stand_ins: list[StandIn], rows: dict[str, torch.Tensor]) -> None:
    """Fix the stand-ins at the mean scale ``s`` of their input in ``student`` as it is now: weight ``g / s``."""
    device = next(student.parameters()).device
    scales = calibrate(student, [calibration_site(each.norm) for each in stand_ins],
                       {key: value.to(device) for key, value in rows.items()})
    for each in stand_ins:
        module = student.get_submodule(each.path)
        module.weight.div_(scales[calibration_site(each.norm)].scale)
        del module.forward


def _release(student: nn.Module, stand_ins: dict[str, StandIn]) -> None:
    """No stand-in keeps a normalising forward, whatever stopped the stages."""
    for path in stand_ins:
        module = student.get_submodule(path)
        if "forward" in vars(module):
            del module.forward


@torch.no_grad()
def _require_teacher(teacher: nn.Module, student: nn.Module, rows: dict[str, torch.Tensor]) -> None:
    """With its norms restored the student must be the teacher: else its other weights are not the conversion's
    (a model healed already), and the stages would start from somewhere else than they say."""
    device = next(student.parameters()).device
    inputs = {key: value[:4].to(device) for key, value in rows.items()}
    teacher.eval()
    student.eval()
    expected, found = (next(iter(head_output(model(**inputs)).values())) for model in (teacher, student))
    off = float((expected.float() - found.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12))
    if not off <= _SAME_AS_TEACHER:
        raise NormswapError(f"with its norms restored, the converted model differs from the original by {off:.2g} of "
                            "its output's size: --stages starts from a fresh --norm none conversion of the original "
                            "(not a healed one); convert it again and heal that")


def _combined(before: dict[str, Any], reports: list[HealReport],
              plan: list[tuple[tuple[str, ...], tuple[str, ...]]], seconds: float) -> HealReport:
    """The last stage's report, before it the conversion as given (every norm removed at once), and every stage's
    steps, training time, losses and figures."""
    last = reports[-1]
    stages = tuple({"groups": list(groups), "norms": list(paths), "steps": report.steps,
                    "before": report.before, "after": report.after}
                   for (groups, paths), report in zip(plan, reports, strict=True))
    return replace(last, before=before, steps=sum(r.steps for r in reports), seconds=seconds,
                   training_seconds=sum(r.training_seconds for r in reports),
                   losses=tuple(loss for r in reports for loss in r.losses),
                   notes=tuple(note for r in reports for note in r.notes), stages=stages)
