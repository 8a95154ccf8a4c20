"""``--max-time`` is a budget for the whole heal: the time (not a default step count) ends training, the
evaluations and the save fit inside it, a budget that cannot fit one step is refused, the report says
truthfully what ended training, and the evaluation runs the teacher once per held-out text.

Most tests run on a simulated machine (``Machine``): ``budget.now`` reads a clock that only forwards move,
each forward of the teacher or the student costing a fixed number of seconds, so budget decisions are
deterministic on a loaded test machine. One test runs the real CLI against the real clock.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from test_rms_norm import perturbed

import normswap
from normswap.cli import _build_parser, main
from normswap.healing import api as heal_api
from normswap.healing import budget
from normswap.healing.api import HealReport
from normswap.healing.budget import BudgetError, EvaluationCost, check_limits, plan_budget, step_limit
from normswap.healing.evaluation import HeldOutEvaluation
from normswap.healing.rows import TokenisedTexts
from normswap.healing.taps import capture, correspond
from normswap.healing.texts import load_texts, split_texts

# the shipped corpus, not the teacher's samples: these tests time and count what healing itself does
SMALL = {"data": load_texts(None), "max_length": 16, "batch_size": 8, "held_out": 32, "eval_steps": 10,
         "quiet": True}


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Tiny models gain nothing from a second thread, and on a loaded 2-core machine two threads made these
    tests ten times slower (each waits for the other's core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    return perturbed("llama", "LlamaForCausalLM"), normswap.convert(perturbed("llama", "LlamaForCausalLM"),
                                                                    placement="post")


class Machine:
    """A clock that only the models' forwards move: ``teacher`` / ``student`` seconds each (times ``slowdown``)."""

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module, teacher_cost: float,
                 student_cost: float) -> None:
        self.seconds = 1000.0
        self.slowdown = 1.0
        self.teacher_forwards = 0
        teacher.register_forward_hook(lambda *_: self._tick(teacher_cost, teacher=True))
        student.register_forward_hook(lambda *_: self._tick(student_cost))

    def _tick(self, cost: float, teacher: bool = False) -> None:
        self.seconds += cost * self.slowdown
        self.teacher_forwards += teacher

    def now(self) -> float:
        return self.seconds


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Any:
    def build(teacher: torch.nn.Module, student: torch.nn.Module, teacher_cost: float = 0.1,
              student_cost: float = 0.1) -> Machine:
        simulated = Machine(teacher, student, teacher_cost, student_cost)
        monkeypatch.setattr(budget, "now", simulated.now)
        return simulated
    return build


# --- the rules, as pure functions ---------------------------------------------------------------------------

def test_the_step_limit_is_the_default_only_without_a_time_budget() -> None:
    assert step_limit(None, None) == 300
    assert step_limit(None, 60.0) is None  # the time ends training
    assert step_limit(50, 60.0) == 50  # both: whichever comes first
    for steps, seconds in ((0, None), (None, 0.0), (None, -5.0), (None, float("nan"))):
        with pytest.raises(BudgetError):
            check_limits(steps, seconds)


def test_a_budget_that_cannot_fit_a_step_is_refused_naming_one_that_fits() -> None:
    cost = EvaluationCost(teacher=0.01, student=0.01)  # seconds per token
    lengths = [20] * 64
    arguments = {"elapsed": 5.0, "reserve": 1.0, "cost": cost, "lengths": lengths, "done": 8, "step": 2.0}
    with pytest.raises(BudgetError) as refused:
        plan_budget(10.0, **arguments)
    message = str(refused.value)
    assert "\n" not in message and "--max-time 10 s cannot fit healing" in message
    suggested = int(re.search(r"give --max-time (\d+) or more", message).group(1))
    plan = plan_budget(float(suggested), **arguments)  # the budget it names does fit
    assert plan.least == 16 and plan.step_seconds > 0


def test_the_evaluation_gets_at_most_a_quarter_of_what_loading_leaves() -> None:
    cost = EvaluationCost(teacher=0.01, student=0.01)
    plan = plan_budget(200.0, elapsed=20.0, reserve=2.0, cost=cost, lengths=[20] * 256, done=8, step=2.0)
    # before (teacher and student) and after (student only, the teacher cached): before takes ~2/3 of the share
    assert 0.6 * 0.25 * plan.available <= plan.before_seconds <= 2 / 3 * 0.25 * plan.available
    assert plan.available == pytest.approx(178.0)
    roomy = plan_budget(200.0, elapsed=20.0, reserve=2.0, cost=EvaluationCost(1e-6, 1e-6), lengths=[20] * 256,
                        done=8, step=2.0)
    assert roomy.note(256, cost, [20] * 256) == ""
    assert "evaluated on 100 of the 256 held-out texts to fit --max-time 200 s" in plan.note(100, cost, [20] * 256)


# --- on a simulated machine -----------------------------------------------------------------------------------

def test_a_time_budget_alone_ends_training_by_time(machine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher, student = pair()
    machine(teacher, student)
    limits: list[int] = []
    real = heal_api.training_arguments

    def spy(*args: Any, **kwargs: Any) -> Any:
        arguments = real(*args, **kwargs)
        limits.append(arguments.max_steps)
        return arguments

    monkeypatch.setattr(heal_api, "training_arguments", spy)
    _, report = heal_api.heal(teacher, student, max_time=10.0, **SMALL)
    assert limits == [budget.UNBOUNDED_STEPS]  # not the 300-step default
    assert report.stopped.startswith("the time budget (--max-time 10 s left")
    assert report.seconds <= 10.0 and report.steps > 10
    assert report.summary().startswith(f"healed {report.steps} steps in ")


def test_with_both_limits_the_step_limit_can_come_first(machine: Any) -> None:
    teacher, student = pair()
    machine(teacher, student)
    _, report = heal_api.heal(teacher, student, max_steps=3, max_time=3600.0, **SMALL)
    assert report.steps == 3 and report.stopped == "the step limit (3 steps)"


def test_the_whole_heal_fits_the_budget_when_evaluation_is_costly(machine: Any) -> None:
    """Each forward costs 1 s: all 32 held-out texts would take 8 s before and 4 s after training, more than
    a quarter of what 30 s leave; fewer are evaluated, the report says so, and nothing overruns."""
    teacher, student = pair()
    simulated = machine(teacher, student, 1.0, 1.0)
    started = simulated.now()
    _, report = heal_api.heal(teacher, student, max_time=30.0, reserve=2.0, **SMALL)
    assert simulated.now() - started == pytest.approx(report.seconds)
    assert report.seconds + 2.0 <= 30.0  # the caller's 2 s save fits too
    assert 16 <= report.evaluated_texts < 32 and report.held_out_texts == 32
    assert any(note.startswith(f"evaluated on {report.evaluated_texts} of the 32") for note in report.notes)
    assert report.stopped.startswith("the time budget") and report.steps >= 1
    assert list(report.timings) == ["loading", "planning", "evaluating before", "training", "evaluating after"]
    assert sum(report.timings.values()) == pytest.approx(report.seconds)


def test_a_budget_too_small_for_one_step_is_refused_before_training(machine: Any) -> None:
    teacher, student = pair()
    machine(teacher, student, 1.0, 1.0)
    weights = {name: value.clone() for name, value in student.state_dict().items()}
    with pytest.raises(BudgetError) as refused:
        heal_api.heal(teacher, student, max_time=6.0, **SMALL)
    assert "\n" not in str(refused.value) and re.search(r"give --max-time \d+ or more", str(refused.value))
    assert all(torch.equal(value, student.state_dict()[name]) for name, value in weights.items())


def test_a_machine_that_slows_down_cuts_the_final_evaluation_not_the_budget(machine: Any,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    teacher, student = pair()
    simulated = machine(teacher, student)
    real_train = heal_api.HealingTrainer.train

    def slower(self: Any, *args: Any, **kwargs: Any) -> Any:
        done = real_train(self, *args, **kwargs)
        simulated.slowdown = 6.0  # the final evaluation is six times slower than the one before training
        return done

    monkeypatch.setattr(heal_api.HealingTrainer, "train", slower)
    started = simulated.now()
    _, report = heal_api.heal(teacher, student, max_time=10.0, **SMALL)
    assert simulated.now() - started <= 10.0 + 1e-9
    assert report.evaluated_texts < 32
    assert any("cut to" in note and "both measured on those" in note for note in report.notes)


def test_the_teacher_runs_once_per_held_out_text(machine: Any) -> None:
    """The teacher's activations are kept from the first evaluation: the checks during training and the
    evaluation after it run only the student (the old evaluation ran the teacher every time)."""
    teacher, student = pair()
    simulated = machine(teacher, student)
    _, report = heal_api.heal(teacher, student, max_steps=10, **{**SMALL, "eval_steps": 5})
    assert len(report.history) == 2
    assert simulated.teacher_forwards == 10 + 32 // SMALL["batch_size"]  # training steps + the first evaluation


# --- the evaluation's figures -----------------------------------------------------------------------------------

def test_cached_and_subset_figures_match_a_direct_computation() -> None:
    teacher, student = pair()
    teacher.eval()
    student.eval()
    found = correspond(teacher, student)
    rows = TokenisedTexts(split_texts(load_texts(None), 24).held_out, None, 16, teacher.config.vocab_size)
    evaluation = HeldOutEvaluation(teacher, student, found, rows, batch_size=8)
    first = evaluation.measure(range(len(rows)))
    again = evaluation.measure(range(len(rows)))  # the teacher's side from the cache now
    assert evaluation.summary(first) == evaluation.summary(again)
    subset = [3, 7, 11, 19]
    assert evaluation.summary(first, subset) == evaluation.summary(evaluation.measure(subset))

    final = found.final_entries()[-1]
    cosines, tokens = 0.0, 0
    with torch.no_grad():
        for batch in rows.batches(8):
            mask = batch["attention_mask"].bool()
            with capture(teacher, {"x": final.teacher}) as seen_t:
                teacher(**batch)
            with capture(student, {"x": final.student}) as seen_s:
                student(**batch)
            cosines += float(F.cosine_similarity(seen_t["x"][mask].double(), seen_s["x"][mask].double(), -1).sum())
            tokens += int(mask.sum())
    assert evaluation.summary(first)["output_cosine"] == pytest.approx(cosines / tokens, abs=1e-6)


# --- what the user reads --------------------------------------------------------------------------------------

def _report(steps: int) -> HealReport:
    figures = {"output_cosine": 0.5, "entry_cosines": [0.5]}
    return HealReport(figures, figures, None, steps, 10.0, "the step limit (1 step)", 100, 32)


def test_the_summary_counts_steps_in_english() -> None:
    assert _report(1).summary().startswith("healed 1 step in ")
    assert _report(2).summary().startswith("healed 2 steps in ")


def test_every_heal_option_states_its_default() -> None:
    import argparse

    built = _build_parser()
    parser = built[0] if isinstance(built, tuple) else built
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    heal = commands.choices["heal"]
    missing = [action.option_strings[0] for action in heal._actions if action.option_strings
               and action.dest not in ("help", "debug") and "default" not in (action.help or "")]
    assert not missing, f"no default stated in --help for {missing}"


def test_cli_passes_no_step_limit_with_a_time_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from normswap.healing import checkpoint

    class Reached(BaseException):
        pass

    seen: list[dict[str, Any]] = []

    def record(*_args: object, **options: Any) -> None:
        seen.append(options)
        raise Reached

    monkeypatch.setattr(checkpoint, "heal_checkpoint", record)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for extra in (["--max-time", "600"], [], ["--max-time", "600", "--max-steps", "40"]):
        with pytest.raises(Reached):
            main(["heal", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"), *extra])
    assert [(options["max_steps"], options["max_time"]) for options in seen] == [(None, 600.0), (None, None),
                                                                                  (40, 600.0)]
    assert main(["heal", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"), "--max-time", "0"]) == 1


def test_cli_heal_ends_within_its_time_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real clock, the whole command: loading, evaluating, training and saving end within --max-time
    (plus a 2 s margin for a loaded machine), and the time budget, not a step count, ended training."""
    perturbed("llama", "LlamaForCausalLM").save_pretrained(tmp_path / "original")
    assert main(["convert", str(tmp_path / "original"), str(tmp_path / "post"), "--placement", "post",
                 "--quiet"]) == 0
    capsys.readouterr()
    budget_seconds = 12.0
    started = time.monotonic()
    assert main(["heal", str(tmp_path / "original"), str(tmp_path / "post"), str(tmp_path / "healed"),
                 "--max-time", f"{budget_seconds:g}", "--max-length", "16", "--held-out", "32", "--quiet",
                 "--trust-remote-code", "--json"]) == 0
    took = time.monotonic() - started
    report = json.loads(capsys.readouterr().out)
    assert took <= budget_seconds + 2.0, report["timings"]
    assert report["stopped"].startswith("the time budget") and report["steps"] >= 1
    assert report["command_seconds"] <= took and "saving" in report["timings"]
    assert (tmp_path / "healed" / "config.json").is_file()
