"""Sandwich -> Post keeps the stream's size: each pre norm takes its input's calibrated scale before the norm shift
moves it (stream_scale.py, docs/design.md §3).

The rescale alone is exact on the model it runs on (every branch reads what it read), on Pre-Norm and sandwich
models alike; after the shift, every moved norm holds the stream at its site's calibrated scale, and the converted
model is closer to the original than the unit start (``calibrate=False``). Models are perturbed off their init,
biases included.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_convert_native import tiny_model
from test_drop_norms import logits, measured_scales, perturbed, relative

import normswap
from normswap.conversion.branch_norm_passes import branch_norm_setup
from normswap.conversion.route import plan_layout
from normswap.conversion.setup import convert_in_memory
from normswap.conversion.verify import probe_inputs
from normswap.topology import OFFSET_NORM_KINDS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import coverage_checks  # the coverage run's tiny, perturbed models of every family

FAMILIES = ["llama", "gpt2", "gemma2"]  # RMSNorm; LayerNorm with biases and Conv1D readers; offset (1 + w) RMSNorm
SANDWICH = ["gemma2", "glm4"]  # offset RMSNorm; plain RMSNorm, whose post_attention_layernorm is a pre norm


def _pre_norms(model: torch.nn.Module) -> list:
    return [norm for layer in normswap.inspect(model).layers for sub in layer.sublayers for norm in sub.norms_in("pre")]


def _gain(model: torch.nn.Module, norm) -> torch.Tensor:
    weight = model.get_submodule(norm.path).weight.detach().double()
    return weight + 1 if norm.kind in OFFSET_NORM_KINDS else weight


@pytest.mark.parametrize("family", FAMILIES)
def test_rescaling_the_pre_norms_is_exact(family: str) -> None:
    model = perturbed(family)
    probe = probe_inputs(model, None, None)
    setup = branch_norm_setup(model, ("scale pre",), "pre norms at the stream's scale", "pre", native=False)
    assert setup.plan.exact
    rescaled, _, _ = convert_in_memory(model, setup, probe)
    assert type(rescaled) is type(model)
    assert relative(logits(rescaled, probe), logits(model, probe)) <= 1e-5
    norms = _pre_norms(model)
    expected = measured_scales(model, _sites(model, norms), probe)
    for norm in norms:  # each pre norm's gain is its input's scale, its bias gone
        gain = _gain(rescaled, norm)
        assert torch.allclose(gain, torch.full_like(gain, expected[norm.path]), rtol=1e-5), norm.path
        bias = getattr(rescaled.get_submodule(norm.path), "bias", None)
        assert bias is None or not bias.any(), norm.path


def _sites(model: torch.nn.Module, norms: list) -> list:
    from normswap.conversion.stand_in import stand_in_of

    return [stand_in_of(model, norm).site for norm in norms]


@pytest.mark.parametrize("family", SANDWICH)
def test_post_norms_hold_the_stream_at_its_scale(family: str) -> None:
    model = perturbed(family)
    probe = probe_inputs(model, None, None)
    calibrated = normswap.convert(model, "post", inputs=probe)
    plain = normswap.convert(model, "post", inputs=probe, calibrate=False)
    assert normswap.inspect(calibrated).placement == "post"
    norms = _pre_norms(model)
    scales = sorted(measured_scales(model, _sites(model, norms), probe).values())
    moved = [norm for norm in normswap.inspect(calibrated).all_norms if norm.path != _final_post(calibrated)]
    gains = [_gain(calibrated, norm) for norm in moved]
    assert all(torch.allclose(gain, gain[:1].expand_as(gain)) for gain in gains)  # each a constant vector, s
    assert sorted(float(gain[0]) for gain in gains) == pytest.approx(scales, rel=1e-5)  # one per pre norm moved
    held_out = {"input_ids": torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(5))}
    held_out["attention_mask"] = torch.ones_like(held_out["input_ids"])
    reference = logits(model, held_out)
    cosine = {name: float(torch.nn.functional.cosine_similarity(logits(each, held_out), reference, -1).mean())
              for name, each in (("calibrated", calibrated), ("plain", plain))}
    assert cosine["calibrated"] > cosine["plain"], cosine


def _final_post(model: torch.nn.Module) -> str:
    """The last sublayer's post norm: it takes the final norm's weight, which only the head reads."""
    return normswap.inspect(model).layers[-1].sublayers[-1].norms[-1].path


@pytest.mark.parametrize("family", SANDWICH)
def test_what_branches_read_is_compared_through_the_fold(family: str) -> None:
    """The first branch reads exactly what it read, through the readers' ``g / s``: the drift report and healing's
    per-branch targets compare the converted read mapped back by the carried stand-in, not the raw tensor."""
    from normswap.healing.taps import correspond, tap

    model = perturbed(family)
    probe = probe_inputs(model, None, None)
    post = normswap.convert(model, "post", inputs=probe)
    first = post.normswap_report.whole.sublayers[0]
    assert first.cosine == pytest.approx(1.0, abs=1e-9) and first.max_abs_diff < 1e-5
    pairs = correspond(model, post)
    entry = pairs.entries[0]
    assert entry.student in pairs.read_maps
    found: dict[str, torch.Tensor] = {}
    handles = [tap(model, entry.teacher, found, "teacher"), tap(post, entry.student, found, "student")]
    with torch.no_grad():
        model(**probe)
        post(**probe)
    for handle in handles:
        handle.remove()
    mapped = pairs.read_maps[entry.student](found["student"])
    assert relative(mapped.double(), found["teacher"].double()) < 1e-5
    assert relative(found["student"].double(), found["teacher"].double()) > 1e-2  # the raw reads differ


KEEP = ["llama", "gpt2", "gptj"]  # RMSNorm; LayerNorm with Conv1D readers; parallel Pre-Norm (serialised on the way)


@pytest.mark.parametrize("family", KEEP)
def test_pre_to_post_keeping_the_stream_size_is_closer_and_goes_home(family: str) -> None:
    """``keep_stream_size``: the moved norms hold the stream at the calibrated scale of the pre norms they were, the
    converted model is closer to the original than the plain norm shift's, and converting back restores the
    original: norm vectors bit for bit, readers within float rounding (``test_round_trips.BOUND``)."""
    from test_round_trips import assert_same_weights

    model = perturbed(family)
    probe = probe_inputs(model, None, None)
    kept = normswap.convert(model, "post", inputs=probe, keep_stream_size=True)
    plain = normswap.convert(model, "post")
    assert normswap.inspect(kept).placement == "post" and type(kept) is type(plain)
    # the rescale writes no code: the provenance, from which the code is regenerated, is the plain shift's
    assert kept.config.normswap["conversion"] == plain.config.normswap["conversion"]
    final = _final_post(kept)
    gains = [_gain(kept, norm) for norm in normswap.inspect(kept).all_norms if norm.path != final]
    assert all(torch.allclose(gain, gain[:1].expand_as(gain)) for gain in gains)  # each a constant vector, s
    held_out = {"input_ids": torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(5))}
    held_out["attention_mask"] = torch.ones_like(held_out["input_ids"])
    reference = logits(model, held_out)
    kl = {name: float(torch.nn.functional.kl_div(logits(each, held_out).log_softmax(-1), reference.log_softmax(-1),
                                                 log_target=True, reduction="batchmean"))
          for name, each in (("kept", kept), ("plain", plain))}
    assert kl["kept"] < kl["plain"], kl
    back = normswap.convert(kept, "pre")
    assert type(back) is type(model)
    assert_same_weights(model, back)


def test_keeping_the_stream_size_is_for_pre_to_post_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A usage error without ``--placement post``; a refusal in one line from a source that is not Pre-Norm; and a
    Post-Norm model normswap moved to Pre-Norm goes home by the plain shift, bit for bit, even when asked."""
    from normswap.cli import main

    perturbed("llama").save_pretrained(tmp_path / "llama")
    with pytest.raises(SystemExit) as usage:
        main(["convert", str(tmp_path / "llama"), str(tmp_path / "out"), "--placement", "sandwich",
              "--keep-stream-size"])
    assert usage.value.code == 2 and "--keep-stream-size" in capsys.readouterr().err
    with pytest.raises(normswap.NormswapError, match="applies to pre -> post and parallel -> post; this is "
                                                     "sandwich -> post"):
        normswap.convert(perturbed("gemma2"), "post", keep_stream_size=True)
    bert = tiny_model("bert", "BertForMaskedLM")
    back = normswap.convert(normswap.convert(bert, "pre"), "post", keep_stream_size=True)
    assert type(back) is type(bert)
    assert bert.state_dict().keys() == back.state_dict().keys()
    assert all(torch.equal(tensor, back.state_dict()[key]) for key, tensor in bert.state_dict().items())
    assert not (tmp_path / "out").exists()


def test_a_pre_norm_read_by_no_linear_map_keeps_its_weight_and_the_rest_are_rescaled() -> None:
    """Llama 4's MoE reads its pre norm's output through ``repeat`` (one copy per expert): no weight after it can
    take ``g / s``, so that norm keeps its weight (the stream after it stays at its weight's scale) while the
    attention's pre norms are rescaled, and the conversion still runs and moves the model only a little."""
    model = coverage_checks.build(coverage_checks.candidate("llama4_text")).model.eval()
    plan = plan_layout(model, "post", keep_stream_size=True).plan.describe()
    for layer in (0, 1):
        assert (f"keep model.layers.{layer}.post_attention_layernorm   # the output of model.layers.{layer}."
                "post_attention_layernorm is read by repeat") in plan
        assert f"rescale model.layers.{layer}.input_layernorm into model.layers.{layer}.self_attn.q_proj.weight" in plan
    converted = normswap.convert(model, "post", keep_stream_size=True)
    assert normswap.inspect(converted).placement == "post"
    assert converted.normswap_report.output_cosine > 0.5
