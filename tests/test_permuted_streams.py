"""Residual streams that change layout inside their layers or keep their channels first (issue 17).

VitDet's layer permutes its ``(batch, width, h, w)`` input to channels last, adds there and permutes back;
SqueezeBERT keeps ``(batch, width, length)`` between layers and normalises axis 1 in a LayerNorm subclass that
transposes inside; FocalNet's stages run their own layer lists and then merge patches. Each was refused by
``inspect``; each now inspects as what it is and converts both ways, through the command line, into code that
loads with its auto class, runs, and re-inspects as the target.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from test_convert_native import main_output
from test_streaming_relayouts import perturbed
from weights_kit import assert_same_weights

import normswap
from normswap.cli import main
from normswap.conversion.verify import probe_inputs

HIDDEN = 32


def _vitdet() -> torch.nn.Module:
    """Two layers, the second attending in 2 x 2 windows (a partition and unpartition inside its branch)."""
    config = transformers.VitDetConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                       image_size=32, patch_size=8, pretrain_image_size=32, window_block_indices=[1],
                                       window_size=2)
    return perturbed(transformers.VitDetModel(config))


def _squeezebert() -> torch.nn.Module:
    config = transformers.SqueezeBertConfig(hidden_size=HIDDEN, embedding_size=HIDDEN, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=64, vocab_size=128,
                                            max_position_embeddings=64)
    return perturbed(transformers.SqueezeBertForMaskedLM(config))


def _focalnet() -> torch.nn.Module:
    config = transformers.FocalNetConfig(embed_dim=16, depths=[1, 2], focal_levels=[2, 2], focal_windows=[3, 3],
                                         image_size=32, patch_size=4, hidden_sizes=[16, 32])
    return perturbed(transformers.FocalNetModel(config))


def test_vitdet_is_pre_norm_seen_through_its_permutes() -> None:
    topology = normswap.inspect(_vitdet())
    assert topology.placement == "pre" and topology.norm == "layernorm"
    (stack,) = topology.stacks
    assert (stack.width, stack.axis) == (HIDDEN, 1)  # channels first between layers, not the image's width
    for layer in topology.layers:
        assert [sub.norms_in("pre")[0].path.rsplit(".", 1)[-1] for sub in layer.sublayers] == ["norm1", "norm2"]


def test_squeezebert_is_post_norm_over_its_channel_axis() -> None:
    topology = normswap.inspect(_squeezebert())
    assert topology.placement == "post" and topology.norm == "layernorm"
    (stack,) = topology.stacks
    assert (stack.width, stack.axis) == (HIDDEN, 1)
    assert stack.embedding_norm is not None and stack.embedding_norm.path.endswith("embeddings.LayerNorm")
    assert stack.embedding_norm.axis == -1  # it runs before the encoder permutes the embeddings channels first
    posts = [sub.norms_in("post")[0] for layer in topology.layers for sub in layer.sublayers]
    assert [norm.path.split("layers.")[1] for norm in posts] == [
        "0.post_attention.layernorm", "0.output.layernorm", "1.post_attention.layernorm", "1.output.layernorm"]
    assert {norm.axis for norm in posts} == {1}


def test_focalnet_stages_are_replaced_by_the_layer_lists_they_run() -> None:
    topology = normswap.inspect(_focalnet())
    assert topology.placement == "pre"
    assert [(stack.path, stack.num_layers, stack.width) for stack in topology.stacks] == [
        ("encoder.stages.0.layers", 1, 16), ("encoder.stages.1.layers", 2, 32)]
    first, last = topology.stacks
    assert first.embedding_norm is not None and first.embedding_norm.path == "embeddings.norm"
    assert first.final_norm is None  # the patch merging reads the stream, not a norm of it
    assert last.embedding_norm is not None and last.embedding_norm.path == "encoder.stages.0.downsample.norm"
    assert last.final_norm is not None and last.final_norm.path == "layernorm"


_CELLS = [
    ("vitdet", _vitdet, "AutoModel", ["--placement", "post"], {"placement": "post"}),
    ("vitdet", _vitdet, "AutoModel", ["--norm", "rmsnorm"], {"norm": "rmsnorm"}),
    ("squeezebert", _squeezebert, "AutoModelForMaskedLM", ["--placement", "pre"], {"placement": "pre"}),
    ("squeezebert", _squeezebert, "AutoModelForMaskedLM", ["--norm", "rmsnorm"], {"norm": "rmsnorm"}),
    ("focalnet", _focalnet, "AutoModel", ["--placement", "post"], {"placement": "post"}),
    ("focalnet", _focalnet, "AutoModel", ["--norm", "rmsnorm"], {"norm": "rmsnorm"}),
]


@pytest.mark.parametrize(("family", "build", "auto", "flags", "in_memory"), _CELLS,
                         ids=[f"{cell[0]}-{cell[3][1]}" for cell in _CELLS])
def test_conversion_loads_runs_and_reinspects_as_its_target(
        family: str, build: Callable[[], torch.nn.Module], auto: str, flags: list[str],
        in_memory: dict[str, str], tmp_path: Path) -> None:
    model = build()
    model.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), *flags, "--quiet"]) == 0
    loaded = getattr(transformers, auto).from_pretrained(tmp_path / "dst", trust_remote_code=True).eval()
    inputs = probe_inputs(model, None, None)
    with torch.no_grad():
        output = main_output(loaded(**inputs))
        assert torch.isfinite(output).all()
        assert torch.allclose(output, main_output(normswap.convert(model, **in_memory)(**inputs)), atol=1e-5)
    target = normswap.inspect(loaded)
    if "placement" in in_memory:
        assert target.placement == in_memory["placement"]
        assert target.stacks[0].axis == normswap.inspect(model).stacks[0].axis
    else:
        assert target.norm == "rmsnorm"


@pytest.mark.parametrize(("build", "placement"), [(_squeezebert, "pre"), (_vitdet, "post")],
                         ids=["squeezebert", "vitdet"])
def test_placement_keeps_branch_zero_and_round_trips_bit_for_bit(
        build: Callable[[], torch.nn.Module], placement: str, tmp_path: Path) -> None:
    """The norm-shift map keeps what the first branch reads (the new stack norm normalises the channel axis of a
    channels-first stream), and converting back gives the source's weights bit for bit."""
    model = build()
    model.save_pretrained(tmp_path / "src")
    back = "post" if placement == "pre" else "pre"
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "mid"), "--placement", placement, "--quiet"]) == 0
    report = json.loads((tmp_path / "mid" / "normswap_report.json").read_text())
    first = report["sublayers"][0]
    assert first["max_abs_diff"] <= 1e-5 * report["output_max_abs_reference"], first
    assert main(["convert", str(tmp_path / "mid"), str(tmp_path / "back"), "--placement", back, "--quiet"]) == 0
    assert_same_weights(tmp_path / "src", tmp_path / "back")


def test_rms_norm_replaces_a_channels_first_layer_norm_on_its_channel_axis() -> None:
    """SqueezeBERT's LayerNorm normalises axis 1; the RMSNorm standing in for it must too."""
    converted = normswap.convert(_squeezebert(), norm="rmsnorm")
    norm = converted.transformer.encoder.layers[0].output.layernorm
    assert type(norm).__name__ == "NormswapRMSNorm"
    x = torch.randn(2, HIDDEN, 5, generator=torch.Generator().manual_seed(0))
    rms = x.pow(2).mean(1, keepdim=True).add(norm.eps).sqrt()
    expected = norm.weight[:, None] * x / rms + norm.bias[:, None]
    with torch.no_grad():
        assert torch.allclose(norm(x), expected, atol=1e-5)


@pytest.mark.parametrize(("build", "reason"), [
    (_vitdet, "encoder.layer hands its stream on with no final norm"),
    (_focalnet, "encoder.stages.0.layers hands its stream on with no final norm"),
], ids=["vitdet", "focalnet"])
def test_pre_norm_rms_norm_says_why_it_is_not_exact(build: Callable[[], torch.nn.Module], reason: str,
                                                    tmp_path: Path) -> None:
    """Centring the stream is exact only where norms read it all: VitDet's model returns the stream itself, and
    FocalNet's patch merging reads the first stage's stream; both conversions are approximate, and say why."""
    build().save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--norm", "rmsnorm", "--quiet"]) == 0
    plan = json.loads((tmp_path / "dst" / "normswap_report.json").read_text())["plan"]
    assert plan["exact"] is False and plan["exact_impossible"].startswith(reason)
