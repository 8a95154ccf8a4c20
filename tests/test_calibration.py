"""Calibrated scales (docs/design.md §6): each site's mean per-token scale, padding excluded."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from normswap.conversion.calibration import CalibrationError, CalibrationSite, calibrate


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM(config).eval()


def _inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_scale_is_the_mean_token_rms_over_real_tokens_only():
    model, inputs = _llama(), _inputs()
    site = CalibrationSite("model.layers.0.input_layernorm", "input", "rms")
    found = calibrate(model, [site], inputs)[site]
    tokens = model.model.embed_tokens(inputs["input_ids"]).detach().double()[inputs["attention_mask"].bool()]
    assert found.tokens == 13
    assert found.scale == pytest.approx(float(tokens.pow(2).mean(-1).sqrt().mean()), rel=1e-12)
    every = model.model.embed_tokens(inputs["input_ids"]).detach().double().reshape(-1, 64)
    assert found.scale != pytest.approx(float(every.pow(2).mean(-1).sqrt().mean()), rel=1e-6)  # padding counted


def test_output_sites_and_standard_deviation():
    model, inputs = _llama(), _inputs()
    captured = {}

    def keep(_module, _args, output):
        captured.setdefault("out", output.detach().double())

    handle = model.model.layers[1].mlp.down_proj.register_forward_hook(keep)
    site = CalibrationSite("model.layers.1.mlp.down_proj", "output", "std", eps=1e-6)
    found = calibrate(model, [site], inputs)[site]
    handle.remove()
    out = captured["out"][inputs["attention_mask"].bool()]
    centred = out - out.mean(-1, keepdim=True)
    expected = (centred.pow(2).mean(-1) + 1e-6).sqrt()
    assert found.scale == pytest.approx(float(expected.mean()), rel=1e-12)
    assert found.spread == pytest.approx(float(expected.std() / expected.mean()), rel=1e-9)


def test_a_site_that_never_runs_is_named():
    model = _llama()
    model.unused_module = torch.nn.Linear(2, 2)
    with pytest.raises(CalibrationError, match="unused_module did not run"):
        calibrate(model, [CalibrationSite("unused_module", "input")], _inputs())


class _FlatReader(torch.nn.Module):
    """Reads the tokens flattened to (batch * positions, d), as OPT's MLP does."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, 8)
        self.reader = torch.nn.Linear(8, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.reader(self.embed(input_ids).flatten(0, 1))


def test_padding_is_excluded_where_a_module_reads_the_tokens_flattened():
    torch.manual_seed(0)
    model, inputs = _FlatReader(), _inputs()
    site = CalibrationSite("reader", "input", "rms")
    found = calibrate(model, [site], inputs)[site]
    tokens = model.embed(inputs["input_ids"]).detach().double()[inputs["attention_mask"].bool()]
    assert found.tokens == 13
    assert found.scale == pytest.approx(float(tokens.pow(2).mean(-1).sqrt().mean()), rel=1e-12)
