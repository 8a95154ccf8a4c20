"""Linear maps given a bias for a dropped LayerNorm's beta (``conversion/reader_bias.py``, issue 18).

A pre LayerNorm's stand-in ``g * C x / s + beta`` folds into its readers as ``b <- b + W beta``; a reader built without
a bias is given one in the generated code. An out LayerNorm's ``beta`` goes on one bias among its input's writers;
where none has one, the first linear writer is given one. Each fold is checked numerically against the source run
with the norms replaced by their stand-ins, on models whose norm weights and biases are moved off 1 and 0.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_convert_native import tiny_model
from test_drop_norms import TOLERANCE, converted_by, logits, relative
from torch import nn

import normswap
from normswap.cli import main
from normswap.conversion.drop_norms import StandInError, drop_out_norms, drop_pre_norms
from normswap.conversion.stand_in import stand_in_reference


def _new_biases(source: nn.Module, converted: nn.Module) -> dict[str, torch.Tensor]:
    """The biases ``converted``'s linear maps have where ``source``'s same maps have none."""
    return {name: module.bias.detach() for name, module in converted.named_modules()
            if isinstance(module, nn.Linear) and module.bias is not None
            and getattr(source.get_submodule(name), "bias", 1) is None}


@pytest.mark.parametrize(("family", "model_class"), [
    ("falcon_sequential", "FalconForCausalLM"),  # query_key_value and dense_h_to_4h: FalconLinear adds a set bias
    ("stablelm", "StableLmForCausalLM"),  # q_proj, k_proj, v_proj and the MLP's gate_proj and up_proj
])
def test_readers_without_a_bias_take_the_dropped_layer_norms_beta(family: str, model_class: str) -> None:
    model = tiny_model(family, model_class)
    pass_ = drop_pre_norms(model, normswap.inspect(model))
    converted, setup, probe = converted_by(model, pass_)
    assert "normswap_give_bias(self." in setup.generated.source
    given = _new_biases(model, converted)
    assert given and all(bias.abs().max() > 0 for bias in given.values())  # W beta, beta moved off 0
    scales = {scale.site: scale for scale in setup.scales}
    with stand_in_reference(model, pass_, scales):
        reference = logits(model, probe)
    assert relative(logits(converted, probe), reference) <= TOLERANCE
    # without the new biases the converted model misses the reference: they carry the shift
    with torch.no_grad():
        for name in given:
            converted.get_submodule(name).bias.zero_()
    assert relative(logits(converted, probe), reference) > 1e-3


def test_every_instance_of_a_given_class_gets_the_bias_and_only_the_readers_a_non_zero_one() -> None:
    """Whisper's ``WhisperAttention`` builds ``k_proj`` without a bias in every attention: the generated class gives
    each one, so the decoder's cross-attention ``k_proj`` (which reads the encoder's output, not a dropped norm)
    has one too, at 0."""
    model = tiny_model("whisper", "WhisperForConditionalGeneration")
    pass_ = drop_pre_norms(model, normswap.inspect(model))
    converted, setup, probe = converted_by(model, pass_)
    given = _new_biases(model, converted)
    cross = {name for name in given if ".encoder_attn." in name}
    assert cross and all(not given[name].any() for name in cross)
    assert all(given[name].abs().max() > 0 for name in set(given) - cross)
    scales = {scale.site: scale for scale in setup.scales}
    with stand_in_reference(model, pass_, scales):
        reference = logits(model, probe)
    assert relative(logits(converted, probe), reference) <= TOLERANCE


def test_an_out_layer_norm_whose_writers_have_no_bias_gives_one_its_beta(caplog: pytest.LogCaptureFixture) -> None:
    """StableLM converted to post-sublayer has out LayerNorms after ``o_proj`` and ``down_proj``, which have no bias.
    Once their ``beta`` has moved off 0 (as healing moves it), the way home to the stock class cannot hold it and is
    not taken; the ordinary drop gives ``o_proj`` and ``down_proj`` a bias that carries ``beta``."""
    model = tiny_model("stablelm", "StableLmForCausalLM")
    post_sublayer = normswap.convert(model, "post-sublayer")
    out_norms = [norm for norm in normswap.inspect(post_sublayer).residual_norms if norm.slot == "out"]
    with torch.no_grad():
        for norm in out_norms:
            post_sublayer.get_submodule(norm.path).bias.add_(0.1)

    pass_ = drop_out_norms(post_sublayer, normswap.inspect(post_sublayer))
    converted, setup, probe = converted_by(post_sublayer, pass_)
    given = _new_biases(post_sublayer, converted)
    assert given and all(bias.abs().max() > 0 for bias in given.values())
    scales = {scale.site: scale for scale in setup.scales}
    with stand_in_reference(post_sublayer, pass_, scales):
        reference = logits(post_sublayer, probe)
    assert relative(logits(converted, probe), reference) <= TOLERANCE

    with caplog.at_level(logging.WARNING, logger="normswap"):
        back = normswap.convert(post_sublayer, "pre")
    assert "is not 0 (it was trained after the way out)" in caplog.text
    assert type(back) is not type(model) and normswap.inspect(back).placement == "pre"


def test_a_reader_whose_forward_ignores_a_bias_is_refused_with_that_reason() -> None:
    """PhiMoE's router reads the pre norm through ``F.linear`` of its own weight, with no bias: none can be given."""
    model = tiny_model("phimoe", "PhimoeForCausalLM")
    with pytest.raises(StandInError, match=r"router\.weight reads .* its forward \(PhimoeTopKRouter\) ignores a bias"):
        drop_pre_norms(model, normswap.inspect(model))


def test_the_command_line_reads_a_trained_beta_from_src_before_it_chooses_the_way_home(tmp_path: Path) -> None:
    """``normswap convert`` plans on the meta device, where no tensor holds a value: the way home reads the added out
    norms' ``beta`` from SRC. At 0 the model goes home to stock StableLM; moved off 0, it takes the ordinary way
    (generated code whose ``o_proj`` carries ``beta``) instead of failing while it writes."""
    tiny_model("stablelm", "StableLmForCausalLM").save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "post_sublayer"), "--placement", "post-sublayer",
                 "--quiet"]) == 0
    assert main(["convert", str(tmp_path / "post_sublayer"), str(tmp_path / "home"), "--placement", "pre",
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "home" / "config.json").read_text())["model_type"] == "stablelm"

    weights = tmp_path / "post_sublayer" / "model.safetensors"
    state = load_file(weights)
    trained = {key: tensor + 0.1 if key.endswith("out_norm.bias") else tensor for key, tensor in state.items()}
    assert trained.keys() == state.keys() and any(key.endswith("out_norm.bias") for key in state)
    save_file(trained, weights, metadata={"format": "pt"})
    assert main(["convert", str(tmp_path / "post_sublayer"), str(tmp_path / "back"), "--placement", "pre",
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"].startswith("normswap-stablelm")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert back["model.layers.0.self_attn.o_proj.bias"].abs().max() > 0
