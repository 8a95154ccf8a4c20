"""A branch output times a layer scale on its way to the add (BEiT's ``self.lambda_1 * attention_output``, issue 18).

The new out norm wraps the product, so its starting scale is measured on the product: the calibration site names
the layer scale (``channel_scale``), which multiplies the module's output channel by channel before the statistic.
On the way home the added norm folds into the writers without a LayerNorm's centring, which commutes with the
per-channel scale. Checked on perturbed tiny vision encoders.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from test_round_trips import assert_home

import normswap
from normswap.conversion.add_norms import add_out_norms
from normswap.conversion.compose import compose
from normswap.conversion.setup import convert_in_memory
from normswap.conversion.verify import probe_inputs

_VISION = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
           "image_size": 32, "patch_size": 8, "layer_scale_init_value": 0.1}


def perturbed(config_class: str, model_class: str) -> torch.nn.Module:
    """Every parameter, the layer scales and the norms' weights and biases too, moved off its init."""
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**_VISION)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def _pixels() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


def test_a_new_out_norm_starts_at_the_scale_of_the_branch_output_times_its_layer_scale() -> None:
    """Each new norm's weight is the mean per-token standard deviation of ``lambda * output`` over the probe,
    measured here by a hook of this test; without the layer scale (about 0.1) it would be about 10 times that."""
    model = perturbed("BeitConfig", "BeitModel")
    pass_ = add_out_norms(model, normswap.inspect(model))
    sites = {site.module: site for site in pass_.calibration}
    assert sites["layers.0.attention"].channel_scale == "layers.0.lambda_1"
    assert sites["layers.0.mlp"].channel_scale == "layers.0.lambda_2"
    assert all(site.side == "output" and site.statistic == "std" for site in sites.values())

    converted, _, _ = convert_in_memory(model, compose(model, normswap.inspect(model), [pass_], "add out norms"),
                                            probe_inputs(model, None, None))
    assert normswap.inspect(converted).placement == "sandwich"
    captured: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(path).register_forward_hook(
        lambda _m, _a, out, path=path: captured.__setitem__(path, out[0] if isinstance(out, tuple) else out))
        for path in sites]
    with torch.no_grad():
        model(**probe_inputs(model, None, None))
    for hook in hooks:
        hook.remove()
    for move in pass_.moves:
        assert move.site is not None
        read = captured[move.site.module].double()
        for scaled, expected_more in ((read * model.get_parameter(move.site.channel_scale).double(), False),
                                      (read, True)):
            centred = scaled - scaled.mean(-1, keepdim=True)
            scale = float((centred.pow(2).mean(-1) + move.site.eps).sqrt().mean())
            weight = converted.get_submodule(move.norm).weight.double()
            if expected_more:  # the unscaled output is several times larger: the layer scale was taken in
                assert scale > 3 * float(weight.mean()), move.norm
            else:
                assert torch.allclose(weight, torch.full_like(weight, scale), rtol=1e-5), move.norm


@pytest.mark.parametrize(("config_class", "model_class"), [("BeitConfig", "BeitModel"),
                                                           ("Data2VecVisionConfig", "Data2VecVisionModel")])
@pytest.mark.parametrize("via", ["sandwich", "post-sublayer"])
def test_layer_scaled_encoders_convert_and_come_home(config_class: str, model_class: str, via: str) -> None:
    """Both placements convert; post-sublayer drops the pre LayerNorms, whose beta goes into the query and value
    biases and into a bias the generated code gives the key (Data2Vec-vision's SDPA attention inherits the
    ``__init__`` that builds it, so that class is the one edited). Back to Pre-Norm is the stock class again."""
    model = perturbed(config_class, model_class)
    there = normswap.convert(model, via)
    assert normswap.inspect(there).placement == via and type(there) is not type(model)
    with torch.no_grad():
        near = torch.nn.functional.cosine_similarity(there(**_pixels()).last_hidden_state.flatten(),
                                                     model(**_pixels()).last_hidden_state.flatten(), dim=0)
    assert 0.5 < float(near) < 0.99999
    back = normswap.convert(there, "pre")
    assert_home(model, back)
