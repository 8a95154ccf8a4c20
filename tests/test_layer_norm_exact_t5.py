"""Exact RMSNorm -> LayerNorm for the T5 family and SwitchTransformers, through the command line.

Their config classes tie lm_head, ``shared`` and both stacks' ``embed_tokens`` by one flag (T5's, mT5's, UMT5's and
LongT5's whatever they are given), and T5 multiplies what lm_head reads by ``d_model ** -0.5``, a width the map
makes d+1. The head leaves the generated class's tied weights (the embeddings stay one tensor) and the two
measured scales fold into it. Each tiny model has every weight, norm weights included, moved off its init; the
written checkpoint loads through its generated code and gives the original's logits and greedy tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CONFIG_MAPPING

import normswap
from normswap.cli import main
from normswap.codegen.package import family_model_type
from normswap.conversion import extra_dimension
from normswap.conversion.extra_dimension import convert_to_layer_norm_exact
from normswap.conversion.head_scale import measure_head_scale
from normswap.conversion.verify import probe_inputs
from normswap.errors import ExactnessError

_SIZES = {"d_model": 64, "d_kv": 16, "num_layers": 2, "num_heads": 4, "d_ff": 128, "vocab_size": 128}
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {  # name: (model type, class, config)
    "t5": ("t5", "T5ForConditionalGeneration", _SIZES),  # scales what lm_head reads by d_model ** -0.5
    # T5 v1.1: tie_word_embeddings=False turns the scale off (and the config class ties all the same)
    "t5-v1.1": ("t5", "T5ForConditionalGeneration", {**_SIZES, "tie_word_embeddings": False,
                                                      "feed_forward_proj": "gated-gelu"}),
    "mt5": ("mt5", "MT5ForConditionalGeneration", _SIZES),  # no scale at all
    "umt5": ("umt5", "UMT5ForConditionalGeneration", _SIZES),  # relative attention bias in every layer
    "longt5": ("longt5", "LongT5ForConditionalGeneration", _SIZES),  # local attention
    # its config honours tie_word_embeddings=False, which untied the stacks' embeddings too; dense layers only:
    # its sparse layers pick experts by value (test_switch_experts_picked_by_value_are_refused_with_the_reason)
    "switch_transformers": ("switch_transformers", "SwitchTransformersForConditionalGeneration",
                            {**_SIZES, "encoder_sparse_step": 0, "decoder_sparse_step": 0}),
}


def tiny(name: str) -> torch.nn.Module:
    model_type, model_class, values = CASES[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(CONFIG_MAPPING[model_type](**values))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    for norm in normswap.inspect(model).stream_norms:  # a unit norm weight would hide a missed fold
        assert (model.get_submodule(norm.path).weight - 1).abs().min() > 0, norm.path
    return model.eval()


def _generate(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    # stock SwitchTransformers fails generate() with its cache in transformers 5.24 (an IndexError in
    # cache_utils, the source model as much as the converted one): it generates without
    cache = family_model_type(model.config.model_type) != "switch_transformers"
    return model.generate(input_ids=inputs["input_ids"][:2], attention_mask=inputs["attention_mask"][:2],
                          max_new_tokens=8, min_new_tokens=8, do_sample=False, decoder_start_token_id=0,
                          pad_token_id=0, use_cache=cache)


@pytest.mark.parametrize("name", list(CASES))
def test_converts_exactly_loads_through_its_code_and_generates(name: str, tmp_path: Path) -> None:
    model = tiny(name)
    model.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--norm", "layernorm", "--exact",
                 "--untie", "--quiet"]) == 0
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert re.fullmatch(rf"normswap-{model.config.model_type}-[0-9a-f]{{12}}", config["model_type"])
    assert config["d_model"] == 65
    assert config["normswap"]["exact"] is True
    loaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "dst", trust_remote_code=True).eval()
    assert "modeling_normswap_" in type(loaded).__module__  # the generated code, never the stock class
    assert {n.kind for n in normswap.inspect(loaded).stream_norms} == {"layernorm"}
    # lm_head is its own tensor; shared and the stacks' embed_tokens stay one, saved once
    assert loaded.lm_head.weight is not loaded.shared.weight
    assert loaded.encoder.embed_tokens.weight is loaded.shared.weight is loaded.decoder.embed_tokens.weight
    with safe_open(tmp_path / "dst" / "model.safetensors", "pt") as written:
        names = written.keys()
    tables = sorted(key for key in names if key.endswith(("shared.weight", "embed_tokens.weight", "lm_head.weight")))
    assert tables == ["lm_head.weight", "shared.weight"]

    inputs = probe_inputs(model, None, None)
    with torch.no_grad():
        reference, actual = model(**inputs).logits, loaded(**inputs).logits
    relative = float((reference - actual).abs().max()) / float(reference.abs().max())
    print(f"{name}: {relative:.3g} x max|reference|")
    # float32 rounding alone (1e-6 to 1.2e-5 here); with every norm in float64 the twin matches to 1e-14, and a
    # missed fold of the head's scale is 1e-2 off (test_t5_fails_its_check_without_folding_the_head_scale)
    assert relative <= 2e-5
    tokens = _generate(model, inputs)
    assert torch.equal(tokens, _generate(loaded, inputs)) and tokens.shape[-1] == 9


def test_the_scale_before_the_head_is_measured_on_each_width() -> None:
    """T5 scales what lm_head reads by d_model ** -0.5, T5 v1.1 and mT5 not; the measure follows the width."""
    expected = {"t5": lambda d: d ** -0.5, "t5-v1.1": lambda d: 1.0, "mt5": lambda d: 1.0,
                "switch_transformers": lambda d: d ** -0.5}
    for name, scale in expected.items():
        model_type, model_class, values = CASES[name]
        for width in (64, 100):
            with torch.device("meta"):
                meta = getattr(transformers, model_class)(CONFIG_MAPPING[model_type](**{**values, "d_model": width}))
            found = measure_head_scale(meta, "decoder.final_layer_norm", "lm_head", name)
            assert found == pytest.approx(scale(width), rel=1e-12), name


def test_t5_fails_its_check_without_folding_the_head_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fold is what makes T5 exact: measured as 1 on both widths, the check refuses with its figure."""
    monkeypatch.setattr(extra_dimension, "measure_head_scale", lambda *args: 1.0)
    with pytest.raises(ExactnessError, match="differs from the original"):
        convert_to_layer_norm_exact(tiny("t5"), untie=True)


def test_the_generated_config_keeps_the_tie_flag_and_the_scale_path() -> None:
    """The converted config ties as the family's does (the stacks' embeddings) and keeps scale_decoder_outputs;
    only the generated class leaves lm_head out of its tied weights."""
    converted, plan, report, generated = convert_to_layer_norm_exact(tiny("t5"), untie=True)
    assert plan.untied and report.exact and report.relative <= 1e-5
    assert converted.config.tie_word_embeddings is True and converted.config.scale_decoder_outputs is True
    assert "lm_head.weight" not in converted.get_expanded_tied_weights_keys(all_submodels=True)
    assert "lm_head.weight" in transformers.T5ForConditionalGeneration._tied_weights_keys  # the stock class's own
    assert "if target != 'lm_head.weight'" in generated.source


def test_switch_experts_picked_by_value_are_refused_with_the_reason() -> None:
    """A sparse SwitchTransformers layer runs only the experts its router picks, by value, which a run on the meta
    device cannot show; the map needs each tensor's use seen, so it refuses before any weight is computed."""
    model_type, model_class, values = CASES["switch_transformers"]
    config = CONFIG_MAPPING[model_type](**{**values, "num_experts": 4, "encoder_sparse_step": 2,
                                           "decoder_sparse_step": 2})
    with pytest.raises(normswap.NormswapError, match=r"experts\.expert_0\.wi\.weight .* did not run"):
        convert_to_layer_norm_exact(getattr(transformers, model_class)(config).eval(), untie=True)


def test_converts_back_to_rms_norm_exactly() -> None:
    """The LayerNorm twin goes back by centring (docs/design.md §4), one dimension wider still: T5's two stacks
    are one class, whose forward takes the centring once."""
    model = tiny("t5")
    back = normswap.convert(normswap.convert(model, norm="layernorm", exact=True, untie=True), norm="rmsnorm")
    assert back.normswap_report.exact and back.config.d_model == 65
    assert {n.kind for n in normswap.inspect(back).stream_norms} == {"rmsnorm"}
    assert back.lm_head.weight is not back.shared.weight and back.encoder.embed_tokens.weight is back.shared.weight
    inputs = probe_inputs(model, None, None)
    with torch.no_grad():
        reference, actual = model(**inputs).logits, back(**inputs).logits
    assert float((reference - actual).abs().max()) <= 2e-5 * float(reference.abs().max())


def _mt5_with_a_head_of_its_own(folder: Path) -> torch.nn.Module:
    """An mT5 checkpoint in ``folder`` whose lm_head holds values other than ``shared``, as published mT5, UMT5,
    T5 v1.1 and Flan-T5 checkpoints do, loaded as transformers loads it (untied)."""
    tiny("mt5").save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    state["lm_head.weight"] = torch.randn(state["shared.weight"].shape, generator=torch.Generator().manual_seed(1))
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return transformers.MT5ForConditionalGeneration.from_pretrained(folder, trust_remote_code=False).eval()


def test_a_checkpoint_that_stores_lm_head_apart_converts_from_its_own_head(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """mT5, UMT5, T5 v1.1 and Flan-T5 checkpoints store lm_head beside shared with values of its own, which
    transformers loads untied whatever the config says; the plan starts from that model (it read the head from
    shared, twice the logits off), and --untie adds no table there."""
    original = _mt5_with_a_head_of_its_own(tmp_path / "src")
    assert original.lm_head.weight is not original.shared.weight

    command = ["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--norm", "layernorm", "--exact", "--quiet"]
    capsys.readouterr()
    assert main(command) == 1
    assert "stores lm_head apart already, so it adds no table" in capsys.readouterr().err
    assert main([*command, "--untie"]) == 0
    loaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "dst", trust_remote_code=True).eval()
    inputs = probe_inputs(original, None, None)
    with torch.no_grad():
        reference, actual = original(**inputs).logits, loaded(**inputs).logits
    assert float((reference - actual).abs().max()) <= 2e-5 * float(reference.abs().max())
    assert torch.equal(_generate(original, inputs), _generate(loaded, inputs))


@pytest.mark.parametrize("flags", [["--placement", "post"], ["--norm", "layernorm"]])
def test_a_head_stored_apart_stays_apart_through_every_conversion(tmp_path: Path, flags: list[str]) -> None:
    """The same mT5 checkpoint, converted to post or approximately to LayerNorm: the generated code tied the head
    to ``shared`` as the config says, so the head stored apart was dropped from the output and the converted model
    loaded the embedding in its place (a silently different model, exit 0). The head now stays apart."""
    original = _mt5_with_a_head_of_its_own(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), *flags, "--quiet"]) == 0
    loaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "dst", trust_remote_code=True).eval()
    assert loaded.lm_head.weight is not loaded.shared.weight
    assert torch.equal(loaded.lm_head.weight, original.lm_head.weight)
    assert torch.equal(loaded.shared.weight, original.shared.weight)
