"""A staged removal of the norms: ``convert --norm none --only GROUPS`` replaces some norms and keeps the rest, and
``heal --stages`` removes a ``--norm none`` conversion's norms group by group, healing in between (docs/heal.md).
On perturbed tiny models: GPT-2 (LayerNorm, Pre-LN, centred stream), Llama (RMSNorm) and BERT (Post-LN)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_heal import QUICK
from test_norm_free import inputs, residual_norms, source
from transformers import AutoModelForCausalLM

import normswap
from normswap.cli import main
from normswap.conversion.norm_free import norm_groups
from normswap.detect.norms import is_norm_stand_in
from normswap.healing import stages as staged
from normswap.healing.stages import heal_in_stages


def stand_in_paths(model: torch.nn.Module) -> list[str]:
    return [path for path, module in model.named_modules() if is_norm_stand_in(module)]


def test_only_replaces_the_named_groups_and_keeps_the_other_norms() -> None:
    model = source("gpt2")
    converted = normswap.convert(model, norm="none", only=("mlp",), inputs=inputs())
    mlp = [norm.path for norm in residual_norms(model) if norm.path.endswith("ln_2")]
    assert sorted(stand_in_paths(converted)) == sorted(mlp) and len(mlp) == 2
    kept = {norm.path for norm in residual_norms(converted)}
    assert kept == {norm.path for norm in residual_norms(model)} - set(mlp)  # ln_1 and ln_f are still norms
    with torch.no_grad():
        reference, found = model(**inputs()).logits, converted(**inputs()).logits
    assert not torch.allclose(reference, found, atol=1e-4)  # two norms are stand-ins now: inexact, but close
    assert torch.nn.functional.cosine_similarity(reference, found, dim=-1).mean() > 0.9


def test_groups_name_sublayer_kinds_slots_and_the_ends() -> None:
    topology = normswap.inspect(source("bert"))
    groups = norm_groups(topology)
    assert groups[topology.stacks[0].embedding_norm.path] == ("embedding",)
    first = topology.layers[0].sublayers[0]
    assert groups[first.norms[0].path] == (first.kind, "post", f"{first.kind}:post")


def test_only_naming_no_norm_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source("gpt2").save_pretrained(tmp_path / "source")
    capsys.readouterr()
    code = main(["convert", str(tmp_path / "source"), str(tmp_path / "out"), "--norm", "none", "--only", "mlp,bogus"])
    error = capsys.readouterr().err.strip()
    assert code == 1 and len(error.splitlines()) == 1 and not (tmp_path / "out").exists()
    assert "--only bogus: no residual norm of gpt2 left to replace is called that" in error


@pytest.mark.parametrize("conversion", [["--norm", "rmsnorm"], ["--placement", "post"]])
def test_only_without_a_norm_removing_kind_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            conversion: list[str]) -> None:
    with pytest.raises(SystemExit) as usage:
        main(["convert", str(tmp_path / "source"), str(tmp_path / "out"), *conversion, "--only", "mlp"])
    assert usage.value.code == 2
    assert "--only picks which norms --norm none|dyt replaces" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_restored_norms_make_the_converted_model_the_original(family: str) -> None:
    """Stage 0: every stand-in computes its norm again, so the student is the teacher to float rounding (GPT-2's
    stream is centred, BERT's stand-ins subtract the mean, Llama's are RMSNorms)."""
    teacher = source(family)
    student = normswap.convert(source(family), norm="none", inputs=inputs())
    found = staged._stand_ins(teacher, student)
    assert list(found) == [norm.path for norm in residual_norms(teacher)]
    with torch.no_grad():
        before = student(**inputs())[0]
    staged._restore_norms(teacher, student, found)
    try:
        with torch.no_grad():
            expected, restored = teacher(**inputs())[0], student(**inputs())[0]
        scale = expected.abs().max()
        assert (restored - expected).abs().max() <= 1e-4 * scale
        assert (before - expected).abs().max() > 1e-2 * scale  # the stand-ins alone were not the norms
    finally:
        staged._release(student, found)


def test_a_stage_fixes_its_norms_at_the_scale_of_the_model_so_far() -> None:
    teacher = source("llama")
    student = normswap.convert(source("llama"), norm="none", inputs=inputs())
    found = staged._stand_ins(teacher, student)
    staged._restore_norms(teacher, student, found)
    mlp = [each for each in found.values() if "mlp" in each.groups]
    gains = {each.path: student.get_submodule(each.path).weight.detach().clone() for each in mlp}
    seen: dict[str, torch.Tensor] = {}  # each input as the model runs before the stage: what the scale is of
    handles = [student.get_submodule(each.path).register_forward_pre_hook(
        lambda _m, args, path=each.path: seen.setdefault(path, args[0].detach())) for each in mlp]
    with torch.no_grad():
        student(**inputs())
    for handle in handles:
        handle.remove()
    staged._fix(student, mlp, inputs())
    for each in mlp:
        module = student.get_submodule(each.path)
        assert "forward" not in vars(module)  # fixed: the plain stand-in's forward again
        tokens = seen[each.path][inputs()["attention_mask"].bool()].double()
        scale = float(tokens.pow(2).mean(-1).add(each.norm.eps or 0).sqrt().mean())
        torch.testing.assert_close(module.weight.detach().double(), gains[each.path].double() / scale,
                                   rtol=1e-5, atol=0)
    staged._release(student, found)
    assert not any("forward" in vars(module) for module in student.modules())


def test_healing_in_stages_ends_norm_free_and_closer(tmp_path: Path) -> None:
    teacher = source("gpt2")
    student = normswap.convert(source("gpt2"), norm="none", inputs=inputs())
    healed, report = heal_in_stages(teacher, student, [("mlp",), ("attention", "final")], max_steps=30,
                                    learning_rate=1e-3, **QUICK)
    assert [stage["groups"] for stage in report.stages] == [["mlp"], ["attention", "final"]]
    assert [len(stage["norms"]) for stage in report.stages] == [2, 3]
    assert sum(stage["steps"] for stage in report.stages) == report.steps == 30
    assert report.after["next_token_kl"] < report.before["next_token_kl"]  # before: the conversion as given
    assert not any("forward" in vars(module) for module in healed.modules())
    assert not normswap.inspect(healed).stream_norms  # norm-free, as the conversion was
    healed.save_pretrained(tmp_path / "healed")


@pytest.mark.parametrize(("stages", "message"), [
    ([("mlp",)], "leaves 3 norms"),
    ([("mlp",), ("bogus",)], "no norm is in the group 'bogus'"),
    ([("pre",), ("mlp",), ("final",)], "stage 2 (mlp) has no norm left"),
])
def test_stages_must_name_every_norm_once(stages: list[tuple[str, ...]], message: str) -> None:
    teacher = source("gpt2")
    student = normswap.convert(source("gpt2"), norm="none", inputs=inputs())
    with pytest.raises(normswap.NormswapError, match=message.replace("(", r"\(").replace(")", r"\)")):
        heal_in_stages(teacher, student, stages, max_steps=2, **QUICK)


def test_heal_stages_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source("gpt2").save_pretrained(tmp_path / "source")
    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "free"), "--norm", "none", "--quiet"]) == 0
    capsys.readouterr()
    heal = ["heal", str(tmp_path / "source"), str(tmp_path / "free"), str(tmp_path / "healed"), "--max-steps", "6",
            "--max-length", "24", "--held-out", "32", "--quiet"]
    assert main([*heal, "--stages", "mlp,attention+final"]) == 0
    out = capsys.readouterr().out
    assert "stage 1 (mlp, 2 norms)" in out and "stage 2 (attention+final, 3 norms)" in out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "healed", trust_remote_code=False)  # normswap's own code
    assert len(stand_in_paths(model)) == 5
    # a healed model is not the conversion any more: its restored norms do not give the original back
    assert main(["heal", str(tmp_path / "source"), str(tmp_path / "healed"), str(tmp_path / "again"),
                 "--max-steps", "2", "--quiet", "--stages", "mlp,attention,final"]) == 1
    assert "not a healed one" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main([*heal, "--stages", "mlp,,final"])
    assert usage.value.code == 2


def test_a_partial_conversion_loads_without_trusting_remote_code(tmp_path: Path) -> None:
    """Its modeling code is normswap's own: planned again from its provenance, ``--only`` included."""
    source("gpt2").save_pretrained(tmp_path / "source")
    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "part"), "--norm", "none", "--only",
                 "mlp,final", "--quiet"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "part", trust_remote_code=False)
    assert len(stand_in_paths(model)) == 3
    assert main(["inspect", str(tmp_path / "part")]) == 0
