"""Two exact RMSNorm -> LayerNorm misses that were normswap's, not the families' (docs/design.md §5).

LaraMini: ``rms_norm_eps`` also sets the eps of norms that are no stream norms (its gated delta net's output norm
over head_v_dim, q_norm/k_norm over head_dim); scaling the field by d/(d+1) scaled theirs, and the delta net's
output is ~1e-4, so its eps matters (6e-3 x max|reference| on the logits). UltraBERT: the LM head reads the final
norm through linear maps of its own, whose inner width is hidden_size; it is padded by a unit that nothing reads.
Tiny models with every parameter moved off its init.
"""

from __future__ import annotations

import pytest
import torch
from test_layer_norm_exact_families import Family, assert_same_logits_and_tokens, perturbed

import normswap
from normswap.conversion.extra_dimension import convert_to_layer_norm_exact
from normswap.conversion.stream_config import eps_sources, stream_config
from normswap.conversion.stream_roles import trace_stream_uses
from normswap.conversion.verify import probe_inputs

_DECODER = {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 128, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64, "pad_token_id": 0,
            "bos_token_id": 1, "eos_token_id": 2}
LARA_MINI = Family("lara_mini", "LaraMiniForCausalLM", "exact", {
    **_DECODER, "layer_types": ["linear_attention", "sliding_attention"], "linear_num_key_heads": 4,
    "linear_num_value_heads": 8, "linear_key_head_dim": 32, "linear_value_head_dim": 32, "num_experts": 4,
    "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}, untie=True)
ULTRABERT = Family("ultrabert", "UltrabertForMaskedLM", "exact", {
    **_DECODER, "intermediate_size": 128, "prediction_head_size": 96,
    "layer_types": ["sliding_attention", "sliding_attention"]})


def test_a_field_that_norms_beside_the_stream_read_keeps_its_eps() -> None:
    """The stream norms take eps * d/(d+1) in the code; the delta net's norm and q_norm keep the field's eps."""
    model = perturbed(LARA_MINI)
    topology = normswap.inspect(model)
    field, in_code = eps_sources(model, stream_config(model, topology), topology)
    assert field is None and {norm.path for norm in in_code} == {norm.path for norm in topology.stream_norms}

    converted, _, report, _ = convert_to_layer_norm_exact(model, untie=True)
    assert report.exact and report.relative <= 1e-4
    eps, d = model.config.rms_norm_eps, model.config.hidden_size
    assert converted.config.rms_norm_eps == eps
    for norm in topology.stream_norms:
        assert converted.get_submodule(norm.path).eps == pytest.approx(eps * d / (d + 1))
    assert converted.get_submodule("model.layers.0.linear_attn.norm").variance_epsilon == eps
    assert converted.get_submodule("model.layers.1.self_attn.q_norm").variance_epsilon == eps
    assert_same_logits_and_tokens(model, converted)


def test_what_comes_after_the_final_norms_readers_is_seen_in_the_run() -> None:
    model = perturbed(ULTRABERT)
    uses = trace_stream_uses(model, ("model.norm",), "ultrabert")
    assert uses.reads["head.linear1.weight"] == {"model.norm"} and "head.decoder.weight" not in uses.reads
    assert {"head.linear2.weight", "head.decoder.weight"} <= set(uses.coming_after("model.norm"))


@pytest.mark.parametrize("tied", [False, True], ids=["apart", "tied"])
def test_a_head_with_layers_of_its_own_converts_exactly(tied: bool) -> None:
    """linear1 reads the final norm through its weight; linear2's extra row and decoder's extra column are zero."""
    model = perturbed(Family(**{**ULTRABERT.__dict__, "config": {**ULTRABERT.config, "tie_word_embeddings": tied}}))
    assert (model.head.decoder.weight is model.model.embed_tokens.weight) == tied
    converted, plan, report, _ = convert_to_layer_norm_exact(model, untie=tied)
    assert report.exact and report.relative <= 1e-4
    assert not any(writer.startswith("head.") for writer in plan.writers)
    assert converted.config.normswap["exact"] and "head.linear2, head.decoder keep" in (
        converted.config.normswap["conversion"])
    assert not converted.head.linear2.weight[-1].any() and not converted.head.decoder.weight[:, -1].any()
    inputs = probe_inputs(model, None, None)
    with torch.no_grad():
        reference, actual = model(**inputs).logits, converted(**inputs).logits
    assert float((reference - actual).abs().max()) <= 1e-4 * float(reference.abs().max())
