"""Norm-free models (--norm none) and DyT (--norm dyt), docs/design.md §7, on perturbed tiny models of four layouts:
Llama (RMSNorm, pre), GPT-2 (LayerNorm, pre, tied embeddings), BERT (LayerNorm, post, embedding norm) and Gemma 2
((1 + w) RMSNorm, sandwich). Every residual norm must be gone from the residual path, its stand-in's scale must be
the one measured here independently, and on a token whose own scale is s the stand-in must be the norm."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_heal import QUICK
from test_rms_norm import perturbed
from transformers import AutoModelForCausalLM

import normswap
from normswap.cli import main
from normswap.detect.norms import classify_norm
from normswap.healing import api as heal_api
from normswap.healing.taps import correspond
from normswap.topology import NormSite

FAMILIES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertModel",
            "gemma2": "Gemma2ForCausalLM"}
DECODERS = ("llama", "gpt2", "gemma2")
KINDS = ("none", "dyt")
MODULE = {"none": "NormswapStandIn", "dyt": "NormswapDyT"}
CASES = [(family, kind) for family in FAMILIES for kind in KINDS]
_CONVERTED: dict[tuple[str, str], tuple[torch.nn.Module, torch.nn.Module]] = {}


def source(family: str) -> torch.nn.Module:
    return perturbed(family, FAMILIES[family])


def inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padding must not count in the scales
    return {"input_ids": ids, "attention_mask": mask}


def converted(family: str, kind: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(source, converted), converted once per case for the whole file."""
    if (family, kind) not in _CONVERTED:
        model = source(family)
        _CONVERTED[family, kind] = model, normswap.convert(model, norm=kind, inputs=inputs())
    return _CONVERTED[family, kind]


def residual_norms(model: torch.nn.Module) -> list[NormSite]:
    topology = normswap.inspect(model)
    edges = [stack.embedding_norm for stack in topology.stacks if stack.embedding_norm is not None]
    return [*edges, *topology.stream_norms]


def gain(norm: NormSite, module: torch.nn.Module) -> torch.Tensor:
    weight = module.weight.detach().double()
    return weight + 1.0 if norm.kind == "rmsnorm-offset" else weight


def measured_scales(model: torch.nn.Module, norms: list[NormSite], given: dict[str, torch.Tensor]
                    ) -> dict[str, float]:
    """Each norm's mean per-token RMS (LayerNorm: standard deviation) of its input, eps included, padding left out."""
    seen: dict[str, list[torch.Tensor]] = {norm.path: [] for norm in norms}
    handles = [model.get_submodule(norm.path).register_forward_pre_hook(
        lambda _m, args, path=norm.path: seen[path].append(args[0].detach().double())) for norm in norms]
    with torch.no_grad():
        model(**given)
    for handle in handles:
        handle.remove()
    mask = given["attention_mask"].bool()
    scales = {}
    for norm in norms:
        x = torch.cat([value[mask] for value in seen[norm.path]])
        if norm.kind.startswith("layernorm"):
            x = x - x.mean(-1, keepdim=True)
        scales[norm.path] = float((x.pow(2).mean(-1) + norm.eps).sqrt().mean())
    return scales


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_no_norm_is_left_on_the_residual_path(family: str, kind: str) -> None:
    model, result = converted(family, kind)
    norms = residual_norms(model)
    target = normswap.inspect(result)
    assert target.placement == "none" and not target.all_norms
    assert f"{len(norms)} residual norms are" in " ".join(target.notes)  # inspect says what stands there
    assert {type(result.get_submodule(norm.path)).__name__ for norm in norms} == {MODULE[kind]}
    assert not [path for path, module in result.named_modules() if classify_norm(module, 64) is not None]
    for norm in norms:  # plain tensors of the checkpoint, trained by healing
        names = {name for name, _ in result.get_submodule(norm.path).named_parameters()}
        assert {"weight", *(("alpha",) if kind == "dyt" else ())} <= names
        assert f"{norm.path}.weight" in result.state_dict()
    if family == "gpt2":  # the final norm's stand-in stays a module: the tied lm_head keeps its tie
        assert result.lm_head.weight is result.transformer.wte.weight


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_scales_are_the_mean_token_scale_of_each_norm_input(family: str, kind: str) -> None:
    model, result = converted(family, kind)
    norms = residual_norms(model)
    scales = measured_scales(model, norms, inputs())
    for norm in norms:
        original, replacement = model.get_submodule(norm.path), result.get_submodule(norm.path)
        g = gain(norm, original)
        if kind == "none":
            torch.testing.assert_close(replacement.weight.detach().double(), g / scales[norm.path], rtol=1e-6, atol=0)
        else:
            torch.testing.assert_close(replacement.weight.detach().double(), g, rtol=1e-7, atol=0)
            assert float(replacement.alpha.detach()) == pytest.approx(1.0 / scales[norm.path], rel=1e-6)
        if getattr(original, "bias", None) is not None:
            assert torch.equal(replacement.bias, original.bias)


def crafted(norm: NormSite, scale: float, centred: bool) -> torch.Tensor:
    """Tokens whose own scale is ``scale`` as the norm measures it (RMS, or standard deviation, with its eps); with
    a mean of their own unless ``centred`` (the centred stream of a Pre-LN model)."""
    z = torch.randn(5, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    layer_norm = norm.kind.startswith("layernorm")
    if layer_norm or centred:
        z = z - z.mean(-1, keepdim=True)
    z = z / z.pow(2).mean(-1, keepdim=True).sqrt() * (scale**2 - norm.eps) ** 0.5
    return z if centred or not layer_norm else z + torch.linspace(-2.0, 3.0, 5, dtype=torch.float64)[:, None]


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_on_a_token_of_scale_s_the_stand_in_is_the_norm(family: str, kind: str) -> None:
    """Stand-in: exactly the norm's output. DyT: in tanh's linear regime (inputs times 1e-4), the same map, on
    centred tokens (it drops a LayerNorm's mean subtraction where the stream is not centred: BERT's)."""
    model, result = converted(family, kind)
    # a Pre-LN stream is centred first; BERT's post norms read an uncentred one, which the stand-in centres itself
    centred = family == "gpt2" or kind == "dyt"
    for norm in residual_norms(model):
        original = model.get_submodule(norm.path).double()
        replacement = result.get_submodule(norm.path).double()
        scale = 1.0 / float(replacement.alpha.detach()) if kind == "dyt" else None
        if scale is None:
            scale = float((gain(norm, original) / replacement.weight.detach().double()).mean())
        x = crafted(norm, scale, centred)
        with torch.no_grad():
            expected = original(x)
            bias = original.bias if getattr(original, "bias", None) is not None else 0.0
            if kind == "none":
                torch.testing.assert_close(replacement(x), expected, rtol=1e-6, atol=1e-6)  # g / s stored in fp32
            else:
                small = 1e-4
                torch.testing.assert_close((replacement(small * x) - bias) / small, expected - bias, rtol=1e-6,
                                           atol=1e-6)
        model.get_submodule(norm.path).float()
        result.get_submodule(norm.path).float()


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_the_drift_is_reported(family: str, kind: str) -> None:
    _, result = converted(family, kind)
    report = result.normswap_report
    assert not report.exact and not result.normswap_plan.exact
    assert 0.0 < report.drift.output_cosine <= 1.0
    if family in DECODERS:
        assert report.drift.next_token_kl >= 0.0
    passes = [each.name for each in result.normswap_plan.passes]
    assert passes[0].startswith("centre the residual stream") == (family == "gpt2")  # Pre-LN only
    scales = report.to_dict()["passes"][-1]["scales"]
    assert len(scales) == len(residual_norms(converted(family, kind)[0])) and all(s["scale"] > 0 for s in scales)


def test_post_ln_dyt_says_it_drops_the_mean_subtraction() -> None:
    model, result = converted("bert", "dyt")
    notes = " ".join(note for each in result.normswap_plan.passes for note in each.notes)
    assert "drops the mean subtraction" in notes and "Post-LN" in notes
    norm = residual_norms(model)[1]
    replacement = result.get_submodule(norm.path)
    x = crafted(norm, 1.0 / float(replacement.alpha.detach()), centred=False).float() * 1e-4
    with torch.no_grad():  # a token with a mean of its own: the LayerNorm removes it, the DyT does not
        assert not torch.allclose(replacement(x) - replacement(x - x.mean(-1, keepdim=True)), torch.zeros_like(x))


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("kind", KINDS)
def test_saved_folder_loads_and_generates_alike_with_and_without_the_cache(tmp_path: Path, family: str,
                                                                         kind: str) -> None:
    source(family).save_pretrained(tmp_path / "source")
    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "out"), "--norm", kind, "--quiet"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert normswap.inspect(loaded).placement == "none"
    prompt = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        cached = loaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = loaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("kind", KINDS)
def test_exact_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    source("llama").save_pretrained(tmp_path / "source")
    capsys.readouterr()  # saving's progress bars
    code = main(["convert", str(tmp_path / "source"), str(tmp_path / "out"), "--norm", kind, "--exact"])
    error = capsys.readouterr().err.strip()
    assert code == 1 and len(error.splitlines()) == 1
    assert f"--norm {kind} cannot be exact" in error
    assert ("saturates" if kind == "dyt" else "fixed 1/s") in error
    assert not (tmp_path / "out").exists()
    with pytest.raises(normswap.NormswapError, match="cannot be exact"):
        normswap.convert(source("llama"), norm=kind, exact=True)


@pytest.mark.parametrize(("family", "kind"), [("gpt2", "dyt"), ("bert", "none")])
def test_healing_matches_the_stream_where_the_norms_were(tmp_path: Path, family: str, kind: str) -> None:
    teacher = source(family)
    student = normswap.convert(source(family), norm=kind, inputs=inputs())  # trained here: a copy of its own
    found = correspond(teacher, student)
    assert [entry.student for entry in found.entries] == [norm.path for norm in residual_norms(teacher)]
    assert found.final_entries()[0].student == residual_norms(teacher)[-1].path  # the stack's output
    _, report = heal_api.heal(teacher, student, max_steps=20, learning_rate=1e-3, work_dir=tmp_path, **QUICK)
    assert report.losses[-1] < report.losses[0]
    figure = "next_token_kl" if family in DECODERS else "output_cosine"
    better = report.after[figure] < report.before[figure] if family in DECODERS else \
        report.after[figure] > report.before[figure]
    assert better, (report.before, report.after)


def test_a_parallel_block_without_norms_is_norm_free() -> None:
    """GPT-NeoX's parallel blocks read one stream through two norms; with both gone the layer has no placement."""
    model = perturbed("gpt_neox_parallel", "GPTNeoXForCausalLM")
    assert normswap.inspect(model).placement == "parallel"
    result = normswap.convert(model, norm="none", inputs=inputs())
    target = normswap.inspect(result)
    assert target.placement == "none" and not target.all_norms
    assert {sub.kind for layer in target.layers for sub in layer.sublayers} == {"parallel"}


def test_a_norm_free_model_has_nothing_to_change(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Its stand-ins are no norm: converting it again writes nothing, and says why."""
    source("llama").save_pretrained(tmp_path / "source")
    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "free"), "--norm", "none", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "free"), str(tmp_path / "again"), "--norm", "rmsnorm"]) == 0
    out = capsys.readouterr().out
    assert "no LayerNorm or RMSNorm anywhere" in out and "NormswapStandIn" in out
    assert not (tmp_path / "again").exists()

