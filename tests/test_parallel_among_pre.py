"""Parallel blocks among Pre-Norm sublayers (Falcon-H1: attention and Mamba read one norm and add together, then a
Pre-Norm MLP) are ``parallel`` placement, not ``mixed``: every norm is before its branches, so the norm-shift goes
to post (branch 0 exact, the way back bit for bit) and the extra-dimension map to LayerNorm is exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from test_placements import assert_saved_loads_and_generates_alike
from test_streaming_relayouts import perturbed
from weights_kit import assert_same_weights

import normswap
from normswap.cli import main
from normswap.conversion.verify import measure_drift, probe_inputs

pytestmark = pytest.mark.filterwarnings("ignore")


def falcon_h1_model(**multipliers: float) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.FalconH1Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, mamba_d_ssm=128, mamba_n_heads=16, mamba_d_head=8, mamba_d_state=16,
        mamba_chunk_size=16, tie_word_embeddings=False, **multipliers)
    return perturbed(transformers.FalconH1ForCausalLM(config))  # norm weights at 1, biases at 0 hide folding bugs


@pytest.fixture(scope="module")
def falcon_h1() -> torch.nn.Module:
    return falcon_h1_model()


def test_parallel_and_pre_sublayers_make_a_parallel_model(falcon_h1: torch.nn.Module) -> None:
    topology = normswap.inspect(falcon_h1)
    assert [sub.placement for sub in topology.layers[0].sublayers] == ["parallel", "pre"]
    assert topology.placement == "parallel"


def test_falcon_h1_goes_to_post_and_back(falcon_h1: torch.nn.Module, tmp_path: Path) -> None:
    post = normswap.convert(falcon_h1, placement="post")
    topology = normswap.inspect(post)
    assert topology.placement == "post"
    drift = measure_drift(falcon_h1, post, normswap.inspect(falcon_h1), topology,
                          probe_inputs(falcon_h1, None, None), exact=False)
    assert drift.sublayers[0].max_abs_diff == 0  # branch 0 reads exactly what it read before

    falcon_h1.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "post"), "--placement", "post", "--quiet"]) == 0
    assert normswap.inspect(str(tmp_path / "post")).placement == "post"  # normswap's own code: no flag needed
    assert main(["convert", str(tmp_path / "post"), str(tmp_path / "back"), "--placement", "pre", "--quiet"]) == 0
    assert_same_weights(tmp_path / "src", tmp_path / "back")


def test_falcon_h1_converts_exactly_to_layer_norm(falcon_h1: torch.nn.Module) -> None:
    converted = normswap.convert(falcon_h1, norm="layernorm", exact=True)
    assert converted.config.hidden_size == 65 and normswap.inspect(converted).norm == "layernorm"
    inputs = probe_inputs(falcon_h1, None, None)
    with torch.no_grad():
        reference, actual = falcon_h1(**inputs).logits, converted(**inputs).logits
    assert float((reference - actual).abs().max()) <= 1e-4 * float(reference.abs().max())


def test_falcon_h1_goes_to_sequential_pre(falcon_h1: torch.nn.Module, tmp_path: Path) -> None:
    """Falcon-H1 sums its branches under one name (``hidden_states = mamba_hidden_states + attention_hidden_states``)
    before the residual add, and its attention reads the norm's output times a multiplier: the serial form splits
    that sum, and the attention reads its new norm's output times the same multiplier. Mamba, the earlier branch,
    still reads exactly what it read; the saved model loads and generates alike with and without the cache."""
    converted = normswap.convert(falcon_h1, placement="pre")
    topology = normswap.inspect(converted)
    assert topology.placement == "pre" and len(topology.layers[0].sublayers) == 3
    source = Path(transformers.utils.import_utils.sys.modules[type(converted).__module__].__file__).read_text()
    assert "self.normswap_self_attn_norm(normswap_after_mamba) * self.attention_in_multiplier" in source
    assert "hidden_states = normswap_after_mamba + attention_hidden_states" in source
    drift = measure_drift(falcon_h1, converted, normswap.inspect(falcon_h1), topology,
                          probe_inputs(falcon_h1, None, None), exact=False)
    assert drift.sublayers[0].max_abs_diff == 0 and 0.3 < drift.output_cosine < 0.99999
    assert_saved_loads_and_generates_alike(converted, tmp_path)


# Falcon-H1's own multipliers (released checkpoints set them far from 1): the attention reads its norm's output
# times attention_in_multiplier, and each branch's output is multiplied before the add
MULTIPLIERS = {"attention_in_multiplier": 1.7, "attn_out_multiplier": 0.6, "ssm_out_multiplier": 0.3}


@pytest.mark.parametrize("target", ["sandwich", "post-sublayer"])
def test_falcon_h1_reaches_the_branch_norm_placements(target: str, tmp_path: Path) -> None:
    """Serialised first (each branch its own sublayer), then out norms added (and, for post-sublayer, the pre norms
    dropped through the attention's product with its multiplier); the result loads and generates alike."""
    model = falcon_h1_model(**MULTIPLIERS)
    converted = normswap.convert(model, target)
    assert normswap.inspect(converted).placement == target
    assert 0.3 < converted.normswap_report.whole.output_cosine < 0.99999
    assert_saved_loads_and_generates_alike(converted, tmp_path)


def test_a_new_out_norm_starts_at_the_scale_of_the_multiplied_branch_output() -> None:
    """``mamba_hidden_states * self.ssm_out_multiplier`` is what the new out norm reads: its start is the
    multiplier times the mamba output's scale. The first layer's mamba reads the same input whatever the
    multiplier, so its new norm's weight scales with the multiplier alone."""
    weights = []
    for multiplier in (1.0, 0.25):
        converted = normswap.convert(falcon_h1_model(ssm_out_multiplier=multiplier), "sandwich")
        weights.append(converted.get_submodule("model.layers.0.normswap_mamba_out_norm").weight.detach().double())
        assert any(f"times {multiplier:g} (its self.ssm_out_multiplier on the way)" in move.note
                   for each in converted.normswap_plan.plans[-1].passes for move in each.moves)
    assert torch.allclose(weights[1], 0.25 * weights[0], rtol=1e-6)
