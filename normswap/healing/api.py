"""``normswap.healing``: distil a converted model (the student) back toward its original (the teacher).

1. Pair the two models' norm sequences (``taps``): what each branch reads, and each stack's output.
2. Optionally (``warm_start``), refit each branch's output projection in closed form, sublayer by sublayer.
   Off by default: on MiniLM it raised the intermediate cosines but cost 40 s and ended lower (docs/heal.md).
3. Train end to end on per-sublayer targets (``objective``) with transformers' ``Trainer``, on length-grouped,
   augmented batches, the learning rate decaying over the step or time budget, and the student's dropout
   switched off (``dropout``).
4. Measure on held-out text before and after (``evaluation``, ``metrics``), the teacher's side once.
5. With a time budget (``budget``), the whole call fits in it: the first batch of the evaluation is timed,
   the evaluations get at most a quarter of the budget (fewer held-out texts when all would take more),
   training stops before a step, check or save would overrun (``stopping``), and the final evaluation stops
   at the deadline.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..errors import NormswapError
from . import budget, distributed
from .budget import BudgetError, check_limits, plan_budget, step_limit
from .dropout import without_dropout
from .evaluation import HeldOutEvaluation
from .lora import LEARNING_RATE as LORA_LEARNING_RATE
from .lora import attach, check_rank, require_matching_checkpoint, require_peft
from .objective import HealingObjective
from .precision import autocast, check_precision, training_device
from .report import HealReport, plural
from .resume import last_complete_checkpoint
from .rows import AugmentedTexts, TokenisedTexts
from .stopping import StopRules
from .taps import correspond
from .teacher_texts import healing_texts
from .texts import split_texts
from .training import HealingTrainer, MetricProgressBar, TrainingClock, spent_seconds, training_arguments
from .warm_start import fit_writers, refitted_tensors, restore

__all__ = ["HealReport", "heal"]

FULL_LEARNING_RATE = 3e-4  # AdamW's peak rate when every weight trains: best of 3e-4, 5e-4, 1e-3 on MiniLM
# AdamW's second-moment decay when every weight trains: 0.95 beat 0.999 on MiniLM and both decoders at equal steps
# (benchmarks/README.md); LoRA keeps 0.999, the value its rate was chosen with
FULL_ADAM_BETA2 = 0.95
LORA_ADAM_BETA2 = 0.999


def heal(teacher: nn.Module, student: nn.Module, data: str | Path | Sequence[str] | None = None, *,
         tokenizer: Any = None, max_steps: int | None = None, max_time: float | None = None,
         target_cosine: float | None = None, batch_size: int = 8, max_length: int = 64,
         learning_rate: float | None = None, warm_start: bool = False, freeze_embeddings: bool = True,
         held_out: int = 256, eval_steps: int = 50, work_dir: str | Path | None = None,
         resume: bool = False, quiet: bool = False, seed: int = 0, match: str = "sublayers",
         output_weight: float = 1.0, augment: bool = True, keep_dropout: bool = False,
         started: float | None = None, reserve: float = 0.0,
         checkpoints: bool | None = None, lora_rank: int | None = None, input_noise: float = 0.0,
         input_mix: float = 0.0, logit_weight: float = 0.0, adam_beta2: float | None = None,
         precision: str = "fp32") -> tuple[nn.Module, HealReport]:
    """Train ``student`` (in place) to behave like ``teacher``; returns it and the report.

    ``data``: texts, a file or folder, ``"teacher"`` or None (``teacher_texts.healing_texts``); ``held_out``
    texts are never trained on. ``max_steps`` and ``max_time`` (seconds) limit training, whichever ends
    first; with ``max_time`` alone the time ends it, with neither 300 steps do. ``max_time`` bounds the whole
    call, the evaluations included, counted from ``started`` (a ``budget.now()`` reading, e.g. before the
    models were loaded; default: now) and keeping ``reserve`` seconds for what the caller does afterwards
    (``budget``). ``work_dir`` keeps Trainer checkpoints (``checkpoints``, default: when ``work_dir`` is
    given); ``resume`` continues from its latest one (the warm start is then skipped: the checkpoint already
    holds its result), and the runs it resumes count against ``max_steps`` and ``max_time`` (checkpoints keep
    the training clock). ``match="output"`` trains on the stacks' outputs only (the plain distillation
    baseline); ``match="branches"`` adds what each branch writes to what each branch reads. The student
    trains without dropout unless ``keep_dropout``; its rates are restored before it is returned.
    ``learning_rate``: AdamW's peak rate, by default 3e-4, or 3e-3 with ``lora_rank`` (``lora.LEARNING_RATE``).
    ``lora_rank``: train rank-``lora_rank`` LoRA adapters on the branch projections (and the norms, and the
    projections' biases) instead of every weight, merged into the weights before the evaluation after training
    (``lora``; needs peft). A checkpoint resumes only with the same ``lora_rank`` it was trained with.
    ``input_noise``, ``input_mix``: perturb what both models read while training (``objective``); off by default.
    ``output_weight``: how many times a sublayer entry each stack's output weighs in the loss (1 by default: on
    MiniLM 4 ended lower out of source, ``benchmarks/README.md``).
    ``logit_weight``: also match the next-token distributions (KL), for models with an LM head; off by default.
    ``adam_beta2``: AdamW's second-moment decay, by default 0.95, or 0.999 with ``lora_rank``.
    ``precision``: ``"fp32"``, or ``"bf16"``: both models' forward passes, and the backward, autocast to bfloat16
    while the weights and AdamW's state stay float32 (``precision``); the evaluations run in float32 either way.

    Under ``torchrun`` or ``accelerate launch`` (``distributed``), ``batch_size`` is a step's texts, all processes
    together, and each process trains on its share with DDP; ``resume`` takes the newest complete checkpoint
    (``resume``).
    """
    if match not in ("sublayers", "branches", "output"):
        raise NormswapError(f"match={match!r}: choose 'sublayers', 'branches' or 'output'")
    check_limits(max_steps, max_time)
    check_rank(lora_rank)
    if adam_beta2 is None:
        adam_beta2 = FULL_ADAM_BETA2 if lora_rank is None else LORA_ADAM_BETA2
    if not 0 <= adam_beta2 < 1:
        raise NormswapError(f"adam_beta2={adam_beta2}: AdamW's second-moment decay is from 0 to 1, 1 excluded")
    if not logit_weight >= 0:
        raise NormswapError(f"logit_weight={logit_weight}: a weight is >= 0")
    if logit_weight > 0 and any(model.get_output_embeddings() is None for model in (teacher, student)):
        raise NormswapError("--logit-weight matches the next-token distributions, and these models have no LM head "
                            "(get_output_embeddings() is None); heal without it")
    if not input_noise >= 0 or not 0 <= input_mix <= 1:
        raise NormswapError(f"input_noise={input_noise}, input_mix={input_mix}: the noise is a relative size >= 0 "
                            "and the mix a weight from 0 to 1")
    if lora_rank is not None:
        require_peft()
    check_precision(precision, training_device(distributed.use_cpu()))
    if learning_rate is None:
        learning_rate = FULL_LEARNING_RATE if lora_rank is None else LORA_LEARNING_RATE
    begun = budget.now() if started is None else started
    require_same_vocabulary(teacher, student)
    correspondence = correspond(teacher, student)
    distributed.start()  # several processes: join the group now (the Trainer would, later)
    # rank 0 reads or samples the texts (and alone writes the teacher's samples to the cache); the others take its
    texts = distributed.broadcast(healing_texts(data, teacher, tokenizer, max_length, work_dir, seed)
                                  if distributed.is_main() else None)
    texts = split_texts(texts, held_out)
    vocab = student.get_input_embeddings().num_embeddings
    train = TokenisedTexts(texts.train, tokenizer, max_length, vocab)
    evaluation = TokenisedTexts(texts.held_out, tokenizer, max_length, vocab)
    teacher.eval()
    student.eval()
    share = distributed.per_process_batch(batch_size)  # texts per step, all processes together
    # every process resumes from the checkpoint rank 0 found (the newest complete one)
    checkpoint = distributed.broadcast(last_complete_checkpoint(work_dir) if resume and work_dir else None)
    require_matching_checkpoint(checkpoint, lora_rank)
    earlier = spent_seconds(checkpoint)  # a resumed run continues the earlier runs' training clock
    marks = {"loading": budget.now()}

    # the held-out texts are in hash order, so the first n are a fair sample; the first batch plans the budget
    evaluator = HeldOutEvaluation(teacher, student, correspondence, evaluation, batch_size)
    order = list(range(len(evaluation)))
    first = order[:batch_size]
    measured = evaluator.measure(first)
    plan = None
    lengths = [evaluation.lengths[i] for i in order]
    if max_time is None:
        measured.update(evaluator.measure(order[len(first):]))
    else:
        step = _timed_step(HealingObjective(teacher, student, correspondence, output_weight,
                                            only_outputs=match == "output",
                                            branch_weight=1.0 if match == "branches" else 0.0,
                                            input_noise=input_noise, input_mix=input_mix,
                                            logit_weight=logit_weight),
                           train.batches(batch_size, limit=batch_size)[0], keep_dropout, precision)
        marks["planning"] = budget.now()  # a batch through each model, and a training step, timed
        plan = plan_budget(max_time, budget.now() - begun, reserve, evaluator.cost(), lengths, len(first), step,
                           earlier_training=earlier, cached=evaluator.cacheable(lengths))
        measured.update(evaluator.measure(order[len(first):], deadline=budget.now() + plan.before_seconds,
                                          at_least=plan.least - len(first)))
        order = [i for i in order if i in measured]
    marks["evaluating before"] = budget.now()
    quick = order[:64]  # the checks during training

    warm: dict[str, Any] | None = None
    if warm_start and checkpoint is None:
        device = next(student.parameters()).device
        calibration = [{name: value.to(device) for name, value in rows.items()}
                       for rows in train.batches(batch_size, limit=4 * batch_size)]
        kept = refitted_tensors(student, correspondence)
        fits = fit_writers(teacher, student, correspondence, calibration)
        warm = {**evaluator.summary(evaluator.measure(order)), "writers": [asdict(f) for f in fits], "kept": True}
        if warm["output_cosine"] < evaluator.summary(measured)["output_cosine"]:  # a calibrated start can be closer
            restore(kept)
            warm["kept"] = False
        marks["warm start"] = budget.now()

    finish = training_end = None  # when healing must end, and training (budget.now readings)
    if plan is not None:
        finish = begun + max_time - earlier - reserve
        training_end = finish - evaluator.estimate(order)
        short = plan.step_seconds - (training_end - budget.now())
        if short > 0:
            raise BudgetError(f"--max-time {max_time:g} s leaves no time to train: loading and evaluating took "
                              f"{budget.now() - begun:.0f} s, and one training step, the evaluation after it and "
                              f"saving need about {plan.step_seconds + evaluator.estimate(order) + reserve:.0f} s "
                              f"more; give --max-time {math.ceil(max_time + short)} or more")
    frozen = _freeze_embeddings(student) if freeze_embeddings else ()
    adapters = None if lora_rank is None else attach(student, correspondence, lora_rank,
                                                      train_embeddings=not freeze_embeddings)
    objective = HealingObjective(teacher, student, correspondence, output_weight, only_outputs=match == "output",
                                 branch_weight=1.0 if match == "branches" else 0.0, input_noise=input_noise,
                                 input_mix=input_mix, logit_weight=logit_weight)
    limit = step_limit(max_steps, max_time)
    saving = work_dir is not None if checkpoints is None else checkpoints
    trainable = sum(p.numel() * p.element_size() for p in student.parameters() if p.requires_grad)
    clock = TrainingClock(earlier)
    stop = StopRules(target_cosine, None, clock, step_seconds=plan.step_seconds if plan else 0.0,
                     check_seconds=evaluator.estimate(quick), save_seconds=budget.save_seconds(3 * trainable))
    own_work = not work_dir  # a temporary folder for the Trainer, removed at the end
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="normswap-heal-"))
    arguments = training_arguments(str(work), batch_size=share, learning_rate=learning_rate,
                                   max_steps=limit, eval_steps=eval_steps,
                                   save_steps=eval_steps if saving else None, seed=seed, quiet=quiet,
                                   adam_beta2=adam_beta2, precision=precision)
    training_rows = AugmentedTexts(train, tokenizer, seed=seed) if augment else train
    trainer = HealingTrainer(model=objective, args=arguments, train_dataset=training_rows, eval_dataset=evaluation,
                             data_collator=training_rows.pad_batch,
                             measure=lambda: evaluator.summary(evaluator.measure(quick)),
                             clock=clock, callbacks=[stop])
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)  # logs belong in the report, not on stdout
    if not quiet:
        trainer.add_callback(MetricProgressBar())
    student.train()
    training_started = budget.now()
    clock.start()  # the Trainer's own start counts against the budget too
    deadline = None if training_end is None else clock.at(training_end)  # on the training clock
    stop.deadline = trainer.max_seconds = deadline
    try:
        with contextlib.nullcontext(0) if keep_dropout else without_dropout(student) as dropout_rates_off:
            trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        objective.close()
        if adapters is not None:
            adapters.merge()  # before the evaluation after training: the figures are the saved weights'
        for parameter in frozen:
            student.get_parameter(parameter).requires_grad_(True)
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    student.eval()
    marks["training"] = budget.now()
    after_figures = evaluator.measure(order, deadline=finish)
    marks["evaluating after"] = budget.now()
    done = [i for i in order if i in after_figures]
    notes = [note for note in (plan.note(len(order), evaluator.cost(), lengths) if plan else "",) if note]
    if len(done) < len(order):
        notes.append(f"the evaluation after training was cut to {len(done)} of {len(order)} held-out texts to "
                     "end within --max-time; before and after are both measured on those")
    report = HealReport(evaluator.summary(measured, done), evaluator.summary(after_figures, done), warm,
                        trainer.state.global_step, budget.now() - begun,
                        _stopped(stop, limit, trainer.state.global_step, max_time,
                                 None if deadline is None else deadline - earlier),
                        len(texts.train), len(texts.held_out), frozen, tuple(trainer.history),
                        tuple(entry["loss"] for entry in trainer.state.log_history if "loss" in entry),
                        tuple(entry.student for entry in correspondence.entries), dropout_rates_off,
                        evaluated_texts=len(done), training_seconds=marks["training"] - training_started,
                        timings=_phases(begun, marks), max_time=max_time, notes=tuple(notes),
                        lora=None if adapters is None else adapters.describe())
    return student, report


def _timed_step(objective: HealingObjective, batch: dict[str, Any], keep_dropout: bool, precision: str) -> float:
    """Seconds of one forward and backward of ``batch``, cold as the Trainer's first step will be (the first
    backward is the slowest) and in its precision; nothing is updated, and the objective's hooks are removed."""
    student = objective.student
    device = next(student.parameters()).device
    batch = {name: value.to(device) for name, value in batch.items()}
    student.train()
    try:
        with contextlib.nullcontext() if keep_dropout else without_dropout(student):
            started = budget.now()
            with autocast(precision, device):
                loss = objective(**batch)["loss"]
            loss.backward()
            return budget.now() - started
    finally:
        objective.close()
        student.zero_grad(set_to_none=True)
        student.eval()


def _stopped(stop: StopRules, limit: int | None, steps: int, max_time: float | None,
             training_budget: float | None) -> str:
    """What ended training, in words."""
    if stop.reason == "target":
        return f"the target output cosine ({stop.target_cosine:g} reached: {stop.detail})"
    if stop.reason == "time":
        return (f"the time budget (--max-time {max_time:g} s left {training_budget:.0f} s for training, after "
                "loading and evaluating, and before the final evaluation and saving)")
    if limit is not None and (stop.reason == "steps" or steps >= limit):  # a resumed run may start at its limit
        return f"the step limit ({plural(limit, 'step')})"
    return "the Trainer"


def _phases(begun: float, marks: dict[str, float]) -> dict[str, float]:
    """Seconds per phase, from the times each one ended."""
    phases, previous = {}, begun
    for name, ended in marks.items():
        phases[name], previous = ended - previous, ended
    return phases


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

