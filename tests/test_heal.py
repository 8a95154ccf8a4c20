"""Healing on tiny models: the loss falls, every sublayer gets closer, runs resume, held-out text is never
trained on, the CLI writes a loadable checkpoint atomically, and ``accelerate launch`` runs it unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from test_rms_norm import perturbed

import normswap
from normswap.cli import main
from normswap.healing import api as heal_api
from normswap.healing.taps import correspond
from normswap.healing.texts import load_texts, split_texts
from normswap.healing.training import TrainingClock, spent_seconds

QUICK = {"max_length": 24, "batch_size": 8, "held_out": 32, "eval_steps": 10, "quiet": True}


def pair(config: str = "llama", model_class: str = "LlamaForCausalLM", placement: str = "post"
         ) -> tuple[torch.nn.Module, torch.nn.Module]:
    teacher = perturbed(config, model_class)
    return teacher, normswap.convert(perturbed(config, model_class), placement=placement)


def test_correspondence_pairs_entries_and_writers() -> None:
    teacher, student = pair()
    found = correspond(teacher, student)
    layers = teacher.config.num_hidden_layers
    assert len(found.entries) == 2 * layers + 1  # N_0..N_{S-1}, Z  <->  E?, P_0..P_{S-1}
    assert [w.path.rsplit(".", 1)[-1] for w in found.writers] == ["o_proj", "down_proj"] * layers
    assert [w.teacher_path for w in found.writers] == [w.path for w in found.writers]  # same layer names here
    assert found.final_entries()[0].teacher == "model.norm"


def test_branch_output_matching_adds_one_target_per_writer_and_heals(tmp_path: Path) -> None:
    from normswap.healing.objective import HealingObjective

    teacher, student = pair("bert", "BertModel", "pre")
    found = correspond(teacher, student)
    plain = HealingObjective(teacher, student, found)
    with_branches = HealingObjective(teacher, student, found, branch_weight=1.0)
    try:
        assert len(with_branches._weights) - len(plain._weights) == len(found.writers) > 0
    finally:
        plain.close()
        with_branches.close()
    _, report = heal_api.heal(teacher, student, max_steps=30, learning_rate=1e-3, work_dir=tmp_path,
                              match="branches", **QUICK)
    assert report.losses[-1] < report.losses[0]
    assert report.after["output_cosine"] > report.before["output_cosine"]


def test_input_perturbation_is_the_same_for_both_models_and_only_while_training(tmp_path: Path) -> None:
    from normswap.healing.objective import HealingObjective

    teacher = perturbed("llama", "LlamaForCausalLM")
    twin = perturbed("llama", "LlamaForCausalLM")  # the same weights: any loss comes from unequal inputs
    found = correspond(teacher, twin)
    ids = torch.randint(3, 128, (4, 9), generator=torch.Generator().manual_seed(1))
    seen: list[torch.Tensor] = []
    watch = twin.model.layers[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    plain = HealingObjective(teacher, twin, found).train()
    plain(ids)
    plain.close()
    perturbed_objective = HealingObjective(teacher, twin, found, input_noise=0.3, input_mix=0.5).train()
    try:
        assert perturbed_objective(ids)["loss"].item() < 1e-10  # the same perturbation reached both models
        assert not torch.allclose(seen[0], seen[1], atol=1e-3)  # and it changed what the layers read
        perturbed_objective.eval()
        perturbed_objective(ids)
        assert torch.equal(seen[2], seen[0])  # evaluation reads the plain embeddings
        perturbed_objective.train()
        twin(ids[:, :5])  # a call outside the objective's own (an evaluation during training), another length
        assert torch.equal(seen[3], seen[0][:, :5])
    finally:
        watch.remove()
        perturbed_objective.close()
    with pytest.raises(normswap.NormswapError, match="input_mix=2"):
        heal_api.heal(teacher, twin, max_steps=1, input_mix=2, work_dir=tmp_path, **QUICK)


def test_logit_matching_adds_the_next_token_kl_as_one_more_entry() -> None:
    from normswap.healing.objective import HealingObjective

    teacher, student = pair()
    found = correspond(teacher, student)
    ids = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # padding is left out
    plain = HealingObjective(teacher, student, found)
    entries = sum(plain._weights.values())
    with torch.no_grad():
        plain_loss = plain(ids, mask)["loss"]
        plain.close()
        with_logits = HealingObjective(teacher, student, found, logit_weight=2.0)
        loss = with_logits(ids, mask)["loss"]
        with_logits.close()
        real = mask.bool()
        kl = torch.nn.functional.kl_div(torch.log_softmax(student(ids, attention_mask=mask).logits[real], -1),
                                        torch.log_softmax(teacher(ids, attention_mask=mask).logits[real], -1),
                                        reduction="batchmean", log_target=True)
    assert kl > 1e-3  # the conversion moved the distributions: the term can be told apart
    assert loss.item() == pytest.approx((plain_loss.item() * entries + 2.0 * kl.item()) / (entries + 2.0), rel=1e-5)
    bert, bert_student = pair("bert", "BertModel", "pre")
    without_head = HealingObjective(bert, bert_student, correspond(bert, bert_student), logit_weight=1.0)
    with pytest.raises(normswap.NormswapError, match="LM head"):
        without_head(ids)
    without_head.close()


def test_cli_logit_weight_needs_an_lm_head_and_a_number(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    perturbed("bert", "BertModel").save_pretrained(tmp_path / "original")
    assert main(["convert", str(tmp_path / "original"), str(tmp_path / "pre"), "--placement", "pre",
                 "--quiet"]) == 0
    capsys.readouterr()
    args = ["heal", str(tmp_path / "original"), str(tmp_path / "pre"), str(tmp_path / "healed"), "--max-steps", "2",
            "--quiet"]
    assert main([*args, "--logit-weight", "4"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no LM head" in error[0] and not (tmp_path / "healed").exists()
    with pytest.raises(SystemExit) as usage:
        main([*args, "--logit-weight", "-1"])
    assert usage.value.code == 2 and "give a number >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main([*args, "--output-weight", "-1"])
    assert usage.value.code == 2 and "give a number >= 0" in capsys.readouterr().err


def test_output_weight_weighs_each_stack_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``--output-weight W`` (default 1) is the stack outputs' weight among the loss entries, each branch input
    weighing 1: from the command line to the objective."""
    from normswap.healing.objective import HealingObjective

    teacher, student = pair()
    found = correspond(teacher, student)
    finals = {entry.student for entry in found.final_entries()}
    default = HealingObjective(teacher, student, found)
    assert finals and {default._weights[key] for key in finals} == {1.0} == set(default._weights.values())
    default.close()
    weighed: list[dict[str, float]] = []
    original_init = HealingObjective.__init__

    def recording(self: HealingObjective, *args: object, **kwargs: object) -> None:
        original_init(self, *args, **kwargs)
        weighed.append(dict(self._weights))

    monkeypatch.setattr(HealingObjective, "__init__", recording)
    perturbed("bert", "BertModel").save_pretrained(tmp_path / "original")
    assert main(["convert", str(tmp_path / "original"), str(tmp_path / "pre"), "--placement", "pre",
                 "--quiet"]) == 0
    assert main(["heal", str(tmp_path / "original"), str(tmp_path / "pre"), str(tmp_path / "healed"),
                 "--max-steps", "1", "--eval-steps", "1", "--held-out", "8", "--quiet", "--output-weight",
                 "3"]) == 0
    capsys.readouterr()
    weights = weighed[-1]
    outputs = [weight for key, weight in weights.items() if weight != 1.0]
    assert outputs and set(outputs) == {3.0} and len(outputs) < len(weights)


def test_adam_beta2_reaches_the_optimiser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """``--adam-beta2`` is the beta2 of the AdamW the Trainer builds; the default is ``api.FULL_ADAM_BETA2``, and
    the help says it; a value outside [0, 1) is a usage error, and one from the API one line."""
    built: list[tuple[float, float]] = []
    original_init = torch.optim.AdamW.__init__

    def recording(self: torch.optim.AdamW, params: object, *args: object, **kwargs: object) -> None:
        original_init(self, params, *args, **kwargs)
        built.append(self.defaults["betas"])

    monkeypatch.setattr(torch.optim.AdamW, "__init__", recording)
    teacher, student = pair()
    heal_api.heal(teacher, student, max_steps=2, adam_beta2=0.9, **QUICK)
    heal_api.heal(teacher, student, max_steps=2, **QUICK)
    heal_api.heal(teacher, student, max_steps=2, lora_rank=2, **QUICK)
    assert [betas[1] for betas in built] == [0.9, heal_api.FULL_ADAM_BETA2, heal_api.LORA_ADAM_BETA2]
    with pytest.raises(normswap.NormswapError, match=r"adam_beta2=1\.0: AdamW's second-moment decay is from 0 to 1"):
        heal_api.heal(teacher, student, max_steps=2, adam_beta2=1.0, **QUICK)
    with pytest.raises(SystemExit) as usage:
        main(["heal", str(tmp_path), str(tmp_path), str(tmp_path / "out"), "--adam-beta2", "1"])
    assert usage.value.code == 2 and "give a number from 0 to 1, 1 excluded" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["heal", "--help"])
    assert (f"(default {heal_api.FULL_ADAM_BETA2:g}, or {heal_api.LORA_ADAM_BETA2:g} with --lora-rank;"
            in " ".join(capsys.readouterr().out.split()))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_sets_the_training_steps_arithmetic_and_nothing_else(precision: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``bf16``: every training step (the objective's forward, both models) runs under bfloat16 autocast, the
    timed planning step too; the weights stay float32, the loss still falls, and the CLI's DST is float32.
    ``fp32``: no step autocasts."""
    autocasting: list[bool] = []
    forward = heal_api.HealingObjective.forward

    def recording(self: heal_api.HealingObjective, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        autocasting.append(torch.is_autocast_enabled("cpu"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(heal_api.HealingObjective, "forward", recording)
    teacher, student = pair()
    _, report = heal_api.heal(teacher, student, load_texts(None), max_steps=12, max_time=600, learning_rate=1e-3,
                              precision=precision, **QUICK)
    assert len(autocasting) == 13  # the step timed to plan the budget, then 12 training steps
    assert set(autocasting) == {precision == "bf16"}
    assert all(parameter.dtype == torch.float32 for parameter in student.parameters())
    assert report.losses[-1] < report.losses[0]
    assert report.after["output_cosine"] > report.before["output_cosine"]


def test_cli_heals_in_bf16_to_a_float32_checkpoint_and_refuses_what_cannot(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors import safe_open

    from normswap.healing.precision import check_precision

    teacher, student = pair()
    teacher.save_pretrained(tmp_path / "original")
    student.save_pretrained(tmp_path / "converted")
    assert main(["heal", str(tmp_path / "original"), str(tmp_path / "converted"), str(tmp_path / "healed"),
                 "--precision", "bf16", "--max-steps", "2", "--eval-steps", "1", "--held-out", "8", "--quiet"]) == 0
    capsys.readouterr()
    with safe_open(str(tmp_path / "healed" / "model.safetensors"), "pt") as weights:
        assert {weights.get_slice(key).get_dtype() for key in weights.keys()} == {"F32"}  # noqa: SIM118 (safe_open has no __iter__)
    with pytest.raises(SystemExit) as usage:
        main(["heal", str(tmp_path), str(tmp_path), str(tmp_path / "out"), "--precision", "fp16"])
    assert usage.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err
    with pytest.raises(normswap.NormswapError, match=r"precision='half': choose 'fp32' or 'bf16'"):
        heal_api.heal(teacher, student, max_steps=1, precision="half", **QUICK)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    with pytest.raises(normswap.NormswapError, match=r"Tesla V100-SXM2-16GB has no bfloat16 arithmetic .* "
                                                     r"heal with --precision fp32"):
        check_precision("bf16", torch.device("cuda", 0))


@pytest.mark.parametrize(("config", "model_class", "placement"),
                         [("llama", "LlamaForCausalLM", "post"), ("bert", "BertModel", "pre")],
                         ids=["llama-pre-to-post", "bert-post-to-pre"])
def test_loss_falls_and_every_sublayer_gets_closer(config: str, model_class: str, placement: str,
                                                   tmp_path: Path) -> None:
    teacher, student = pair(config, model_class, placement)
    # the shipped corpus for both: a random tiny decoder's own samples are near-uniform bytes
    _, report = heal_api.heal(teacher, student, load_texts(None), max_steps=30, learning_rate=1e-3,
                              work_dir=tmp_path, warm_start=True, **QUICK)
    assert report.losses[-1] < report.losses[0]
    before, after = report.before["entry_cosines"], report.after["entry_cosines"]
    assert sum(after) / len(after) > sum(before) / len(before)
    assert min(after) > min(before)
    assert report.after["output_cosine"] > report.before["output_cosine"]
    assert report.warm_start is not None and report.warm_start["kept"]
    assert report.warm_start["output_cosine"] > report.before["output_cosine"]
    if config == "llama":
        assert report.after["next_token_kl"] < report.before["next_token_kl"]
    assert not teacher.training and all(p.requires_grad for p in student.parameters())


def test_a_warm_start_further_from_the_teacher_is_undone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refit that lands further from the teacher than the converted model (here: writers zeroed) is undone: the
    report says so and training starts from the converted weights."""
    from normswap.healing import warm_start

    teacher, student = pair()
    before = {key: value.clone() for key, value in student.state_dict().items()}

    def ruinous(_teacher: torch.nn.Module, model: torch.nn.Module, found, _batches) -> list:
        with torch.no_grad():
            for site in found.writers:
                model.get_submodule(site.path).weight.zero_()
        return []

    monkeypatch.setattr(heal_api, "fit_writers", ruinous)
    kept = warm_start.refitted_tensors(student, correspond(teacher, student))
    assert kept  # the writers' and next norms' tensors are copied before the refit
    _, report = heal_api.heal(teacher, student, max_steps=1, learning_rate=1e-12, work_dir=tmp_path,
                              warm_start=True, **QUICK)
    assert report.warm_start is not None and not report.warm_start["kept"]
    assert report.warm_start["output_cosine"] < report.before["output_cosine"]
    assert "undone" in report.summary()
    after = student.state_dict()
    assert all(torch.allclose(after[key], value, atol=1e-9) for key, value in before.items())


def test_resume_continues_from_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher, student = pair()
    _, first = heal_api.heal(teacher, student, max_steps=10, work_dir=tmp_path, warm_start=True, **QUICK)
    assert first.steps == 10 and (tmp_path / "checkpoint-10").is_dir() and first.warm_start is not None
    spent = spent_seconds(str(tmp_path / "checkpoint-10"))
    assert spent == first.history[-1]["training_seconds"] > 0

    clocks: list[TrainingClock] = []

    class RecordedClock(TrainingClock):
        def __init__(self, spent: float = 0.0) -> None:
            super().__init__(spent)
            clocks.append(self)

    monkeypatch.setattr(heal_api, "TrainingClock", RecordedClock)
    _, resumed = heal_api.heal(teacher, student, max_steps=20, work_dir=tmp_path, resume=True, warm_start=True,
                               max_time=3600, **QUICK)
    assert resumed.steps == 20
    assert resumed.warm_start is None  # the checkpoint already holds the warm start's result
    assert [entry["step"] for entry in resumed.history] == [20]  # only steps 11..20 ran
    assert [clock.spent for clock in clocks] == [spent]  # the time budget and the decay go on from there
    assert resumed.history[-1]["training_seconds"] > spent


def test_without_a_work_dir_no_checkpoint_folder_is_left(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    created = []
    real = tempfile.mkdtemp

    def spy(*args: object, **kwargs: object) -> str:
        created.append(real(*args, **kwargs))  # type: ignore[arg-type]
        return created[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    teacher, student = pair()
    heal_api.heal(teacher, student, max_steps=4, **{**QUICK, "eval_steps": 2})  # Trainer checkpoints every 2 steps
    assert created and all(Path(folder).parent == tmp_path for folder in created)
    assert not list(tmp_path.iterdir())


def test_held_out_texts_are_never_trained_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    texts = split_texts(load_texts(None), 32)
    assert not set(texts.train) & set(texts.held_out) and len(texts.held_out) == 32
    assert set(split_texts(list(reversed(load_texts(None))), 32).held_out) == set(texts.held_out)  # order-free

    seen: list[tuple[int, ...]] = []
    real = heal_api.HealingTrainer.compute_loss

    def spy(self: object, model: object, inputs: dict, *args: object, **kwargs: object) -> object:
        seen.extend(tuple(row[mask.bool()].tolist()) for row, mask in zip(inputs["input_ids"],
                                                                          inputs["attention_mask"], strict=True))
        return real(self, model, inputs, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(heal_api.HealingTrainer, "compute_loss", spy)
    teacher, student = pair()
    heal_api.heal(teacher, student, load_texts(None), max_steps=5, work_dir=tmp_path, **QUICK)  # not the teacher's
    held_out = heal_api.TokenisedTexts(texts.held_out, None, 24, teacher.config.vocab_size)
    held_out_rows = {tuple(row["input_ids"].tolist()) for row in (held_out[i] for i in range(len(held_out)))}
    assert len(seen) == 5 * QUICK["batch_size"]
    assert not set(seen) & held_out_rows


def test_cli_heals_a_converted_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    perturbed("llama", "LlamaForCausalLM").save_pretrained(tmp_path / "original")
    assert main(["convert", str(tmp_path / "original"), str(tmp_path / "post"), "--placement", "post",
                 "--quiet"]) == 0
    args = ["heal", str(tmp_path / "original"), str(tmp_path / "post"), str(tmp_path / "healed"), "--max-steps",
            "12", "--eval-steps", "6", "--batch-size", "8", "--max-length", "24", "--held-out", "32", "--quiet"]
    with (tmp_path / "post" / "modeling_normswap_llama.py").open("a") as code:
        code.write("# edited\n")  # no longer normswap's own code: running it needs --trust-remote-code
    assert main(args) == 1
    assert "--trust-remote-code" in capsys.readouterr().err and not (tmp_path / "healed").exists()
    # in a fresh process: this one imported normswap's own copy under the model_type the edited file still has,
    # which transformers would run instead of the edited file (normswap refuses that in one line)
    done = subprocess.run([sys.executable, "-m", "normswap", *args, "--trust-remote-code", "--plot"],
                          capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "healed" / "normswap_report.json").read_text())
    plot = (tmp_path / "healed" / "normswap_drift.png").read_bytes()
    assert plot.startswith(b"\x89PNG\r\n\x1a\n") and len(plot) > 10_000
    assert len(report["heal"]["entries"]) == len(report["heal"]["after"]["entry_cosines"]) > 2
    assert report["heal"]["steps"] == 12 and report["plan"]["target_placement"] == "post"
    assert report["heal"]["after"]["output_cosine"] > report["heal"]["before"]["output_cosine"]
    assert list((tmp_path / "healed").glob("modeling_normswap_*.py"))
    healed = __import__("transformers").AutoModelForCausalLM.from_pretrained(tmp_path / "healed",
                                                                              trust_remote_code=True)
    assert normswap.inspect(healed).placement == "post"
    assert json.loads((tmp_path / "healed" / "config.json").read_text())["normswap"]["healed"]["steps"] == 12
    assert not list(tmp_path.glob(".healed*"))


def test_accelerate_single_process_launcher(tmp_path: Path) -> None:
    script = tmp_path / "heal_script.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import normswap, torch\n"
        "from test_rms_norm import perturbed\n"
        "from normswap.healing.api import heal\n"
        "teacher = perturbed('llama', 'LlamaForCausalLM')\n"
        "student = normswap.convert(perturbed('llama', 'LlamaForCausalLM'), placement='post')\n"
        f"_, report = heal(teacher, student, max_steps=6, work_dir={str(tmp_path / 'work')!r}, max_length=24, "
        "batch_size=8, held_out=32, eval_steps=3, quiet=True)\n"
        "print('STEPS', report.steps, report.after['output_cosine'] > report.before['output_cosine'])\n"
    )
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "STEPS 6 True" in done.stdout


@pytest.mark.parametrize(("flag", "expected"), [("true", True), ("1", True), ("false", False), (None, False)])
def test_accelerate_cpu_flag_reaches_the_training_device(flag: str | None, expected: bool, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``accelerate launch --cpu`` on a GPU machine sent inputs to cuda:0 and left the model on the CPU (seen on
    an H100): the flag must reach ``TrainingArguments.use_cpu`` as well as the accelerator."""
    from normswap.healing.training import training_arguments

    if flag is None:
        monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_USE_CPU", flag)
    arguments = training_arguments(str(tmp_path), batch_size=2, learning_rate=1e-3, max_steps=1, eval_steps=1,
                                   save_steps=1, seed=0, quiet=True, adam_beta2=0.95)
    assert arguments.use_cpu is expected


def test_plot_without_matplotlib_is_refused_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    perturbed("llama", "LlamaForCausalLM").save_pretrained(tmp_path / "original")
    perturbed("llama", "LlamaForCausalLM").save_pretrained(tmp_path / "other")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    capsys.readouterr()  # the saves' progress bars
    monkeypatch.setattr(heal_api, "heal", lambda *a, **k: pytest.fail("trained although the plot cannot be made"))
    assert main(["heal", str(tmp_path / "original"), str(tmp_path / "other"), str(tmp_path / "healed"),
                 "--plot", "--quiet"]) == 1
    error = capsys.readouterr().err.strip()
    assert "pip install 'normswap[plot]'" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "healed").exists()


def test_cli_match_option_reaches_heal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from normswap.healing import checkpoint

    class Reached(BaseException):  # not an Exception: the CLI's error handling must not swallow it
        pass

    seen: dict[str, object] = {}

    def record(*_args: object, **options: object) -> None:
        seen.update(options)
        raise Reached

    monkeypatch.setattr(checkpoint, "heal_checkpoint", record)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(Reached):
        main(["heal", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"), "--match", "branches"])
    assert seen["match"] == "branches"
    with pytest.raises(SystemExit) as exited:
        main(["heal", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"), "--match", "everything"])
    assert exited.value.code == 2
