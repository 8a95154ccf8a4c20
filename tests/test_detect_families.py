"""Detected topology of 30+ families against expectations written by hand from the modeling code.

Each expectation lists, per layer stack, the embedding and final norm and the sublayers of
every layer: (branch kind, placement, [(norm path in the layer, slot, kind)]). Every layer of
every stack is compared, all norms' eps too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from tiny_configs import TINY_CONFIGS

import normswap

LN, LN_NOBIAS, LN_NOAFFINE, LN_OFFSET = "layernorm", "layernorm-nobias", "layernorm-noaffine", "layernorm-offset"
RMS, RMS_OFFSET = "rmsnorm", "rmsnorm-offset"

SublayerSpec = tuple[str, str, list[tuple[str, str, str]]]


def pre(kind: str, *norms: tuple[str, str]) -> SublayerSpec:
    return (kind, "pre", [(path, "pre", norm) for path, norm in norms])


def post(kind: str, path: str, norm: str = LN) -> SublayerSpec:
    return (kind, "post", [(path, "post", norm)])


def parallel(*norms: tuple[str, str]) -> SublayerSpec:
    return ("parallel", "parallel", [(path, "pre", norm) for path, norm in norms])


@dataclass(frozen=True)
class StackSpec:
    path: str
    embedding_norm: str | None
    final_norm: str | None
    sublayers: list[SublayerSpec]
    first_layer: list[SublayerSpec] | None = None  # where layer 0 differs (ModernBERT)
    inner_norms: tuple[tuple[str, int], ...] = ()  # (path in the layer, dim)
    first_inner_norms: tuple[tuple[str, int], ...] | None = None  # where layer 0's differ (OLMo-Hybrid)


@dataclass(frozen=True)
class Expected:
    placement: str
    norm: str
    eps: float
    stacks: list[StackSpec]
    num_layers: int = 2
    branches: tuple[str, ...] = field(default=())  # branch kinds of a parallel group


BERT_LAYER = [post("attention", "attention.output.LayerNorm"), post("mlp", "output.LayerNorm")]
GPT2_LAYER = [pre("attention", ("ln_1", LN)), pre("mlp", ("ln_2", LN))]
HF_DECODER_LN = [pre("attention", ("input_layernorm", LN)), pre("mlp", ("post_attention_layernorm", LN))]
HF_DECODER_RMS = [pre("attention", ("input_layernorm", RMS)), pre("mlp", ("post_attention_layernorm", RMS))]
INDEXED_POST = [post("attention", "layer_norm1.*"), post("mlp", "layer_norm2.*")]
FAIRSEQ_POST = [post("attention", "self_attn_layer_norm"), post("mlp", "final_layer_norm")]
FAIRSEQ_PRE = [pre("attention", ("self_attn_layer_norm", LN)), pre("mlp", ("final_layer_norm", LN))]
FAIRSEQ_POST_DECODER = [post("attention", "self_attn_layer_norm"),
                        post("cross-attention", "encoder_attn_layer_norm"), post("mlp", "final_layer_norm")]
FAIRSEQ_PRE_DECODER = [pre("attention", ("self_attn_layer_norm", LN)),
                       pre("cross-attention", ("encoder_attn_layer_norm", LN)), pre("mlp", ("final_layer_norm", LN))]

EXPECTED: dict[str, Expected] = {
    # BERT family: residual add and LayerNorm inside SelfOutput/Output (modeling_bert.py BertSelfOutput.forward)
    "bert": Expected("post", LN, 1e-12, [StackSpec("encoder.layer", "embeddings.LayerNorm", None, BERT_LAYER)]),
    "roberta": Expected("post", LN, 1e-12, [StackSpec("encoder.layer", "embeddings.LayerNorm", None, BERT_LAYER)]),
    "electra": Expected("post", LN, 1e-12, [StackSpec("encoder.layer", "embeddings.LayerNorm", None, BERT_LAYER)]),
    "distilbert": Expected("post", LN, 1e-12, [StackSpec(
        "transformer.layer", "embeddings.LayerNorm", None,
        [post("attention", "sa_layer_norm"), post("mlp", "output_layer_norm")])]),
    # MegatronBERT: no embedding LN (commented out), pre norms attention.ln / ln, final encoder.ln
    "megatron_bert": Expected("pre", LN, 1e-12, [StackSpec(
        "encoder.layer", None, "encoder.ln", [pre("attention", ("attention.ln", LN)), pre("mlp", ("ln", LN))])]),
    "xlm_roberta_xl": Expected("pre", LN, 1e-5, [StackSpec(
        "encoder.layer", None, "encoder.LayerNorm",
        [pre("attention", ("attention.self_attn_layer_norm", LN)), pre("mlp", ("LayerNorm", LN))])]),
    # no layer modules: layer i is attentions[i], layer_norm1[i], ffns[i], layer_norm2[i] of the model's own loop
    "xlm": Expected("post", LN, 1e-12, [StackSpec("attentions", "layer_norm_emb", None, INDEXED_POST)]),
    "flaubert": Expected("post", LN, 1e-12, [StackSpec("attentions", "layer_norm_emb", None, INDEXED_POST)]),
    "roberta_prelayernorm": Expected("pre", LN, 1e-12, [StackSpec(
        "encoder.layer", "embeddings.LayerNorm", "LayerNorm",
        [pre("attention", ("attention.LayerNorm", LN)), pre("mlp", ("intermediate.LayerNorm", LN))])]),
    # ModernBERT: bias-free LN; layer 0 attn_norm is nn.Identity
    "modernbert": Expected("pre", LN_NOBIAS, 1e-5, [StackSpec(
        "layers", "embeddings.norm", "final_norm",
        [pre("attention", ("attn_norm", LN_NOBIAS)), pre("mlp", ("mlp_norm", LN_NOBIAS))],
        first_layer=[pre("attention", ("attn_norm", "identity")), pre("mlp", ("mlp_norm", LN_NOBIAS))])]),
    "gpt2": Expected("pre", LN, 1e-5, [StackSpec("h", None, "ln_f", GPT2_LAYER)]),
    "gpt_neo": Expected("pre", LN, 1e-5, [StackSpec("h", None, "ln_f", GPT2_LAYER)]),
    # GPT-NeoX parallel: mlp(post_attention_layernorm(x)) + attn(input_layernorm(x)) + x
    "gpt_neox_parallel": Expected("parallel", LN, 1e-5, [StackSpec(
        "layers", None, "final_layer_norm",
        [parallel(("input_layernorm", LN), ("post_attention_layernorm", LN))])], branches=("attention", "mlp")),
    "gpt_neox_sequential": Expected("pre", LN, 1e-5, [
        StackSpec("layers", None, "final_layer_norm", HF_DECODER_LN)]),
    # GPT-J: attn(ln_1(x)) + mlp(ln_1(x)) + x, one shared norm
    "gptj": Expected("parallel", LN, 1e-5, [StackSpec("h", None, "ln_f", [parallel(("ln_1", LN))])],
                     branches=("attention", "mlp")),
    "opt_pre": Expected("pre", LN, 1e-5, [StackSpec(
        "decoder.layers", None, "decoder.final_layer_norm",
        [pre("attention", ("self_attn_layer_norm", LN)), pre("mlp", ("final_layer_norm", LN))])]),
    # OPT with do_layer_norm_before=False: same names, applied after the add; no final norm
    "opt_post": Expected("post", LN, 1e-5, [StackSpec(
        "decoder.layers", None, None, [post("attention", "self_attn_layer_norm"), post("mlp", "final_layer_norm")])]),
    "bloom": Expected("pre", LN, 1e-5, [StackSpec("h", "word_embeddings_layernorm", "ln_f", HF_DECODER_LN)]),
    "falcon": Expected("parallel", LN, 1e-5, [StackSpec("h", None, "ln_f", [parallel(("input_layernorm", LN))])],
                       branches=("attention", "mlp")),
    "falcon_sequential": Expected("pre", LN, 1e-5, [StackSpec("h", None, "ln_f", HF_DECODER_LN)]),
    "falcon_rw": Expected("pre", LN, 1e-5, [StackSpec("h", None, "ln_f", HF_DECODER_LN)]),
    # new_decoder_architecture: attention reads ln_attn, the MLP ln_mlp (Falcon-40B), or both one norm (Falcon2)
    "falcon_new": Expected("parallel", LN, 1e-5, [StackSpec("h", None, "ln_f", [parallel(("ln_attn", LN),
                                                                                         ("ln_mlp", LN))])],
                           branches=("attention", "mlp")),
    "falcon_new_one_norm": Expected("parallel", LN, 1e-5, [StackSpec("h", None, "ln_f",
                                                                     [parallel(("input_layernorm", LN))])],
                                    branches=("attention", "mlp")),
    "phi": Expected("parallel", LN, 1e-5, [StackSpec(
        "layers", None, "final_layernorm", [parallel(("input_layernorm", LN))])], branches=("attention", "mlp")),
    "phi_qk_layernorm": Expected("parallel", LN, 1e-5, [StackSpec(
        "layers", None, "final_layernorm", [parallel(("input_layernorm", LN))],
        inner_norms=(("self_attn.k_layernorm", 16), ("self_attn.q_layernorm", 16)))], branches=("attention", "mlp")),
    "stablelm": Expected("pre", LN, 1e-5, [StackSpec("layers", None, "norm", HF_DECODER_LN)]),
    "stablelm_parallel": Expected("parallel", LN, 1e-5, [StackSpec(
        "layers", None, "norm", [parallel(("input_layernorm", LN))])], branches=("attention", "mlp")),
    "llama": Expected("pre", RMS, 1e-6, [StackSpec("layers", None, "norm", HF_DECODER_RMS)]),
    "mistral": Expected("pre", RMS, 1e-6, [StackSpec("layers", None, "norm", HF_DECODER_RMS)]),
    "qwen2": Expected("pre", RMS, 1e-6, [StackSpec("layers", None, "norm", HF_DECODER_RMS)]),
    # Mixtral: sparse MoE MLP (experts routed by data; the meta run routes no token)
    "mixtral": Expected("pre", RMS, 1e-5, [StackSpec("layers", None, "norm", HF_DECODER_RMS)]),
    # Qwen3: q_norm / k_norm over head_dim inside attention are not residual norms
    "qwen3": Expected("pre", RMS, 1e-6, [StackSpec(
        "layers", None, "norm", HF_DECODER_RMS, inner_norms=(("self_attn.k_norm", 16), ("self_attn.q_norm", 16)))]),
    "gemma": Expected("pre", RMS_OFFSET, 1e-6, [StackSpec(
        "layers", None, "norm",
        [pre("attention", ("input_layernorm", RMS_OFFSET)), pre("mlp", ("post_attention_layernorm", RMS_OFFSET))])]),
    # Gemma 2: input_layernorm -> attn -> post_attention_layernorm -> add; pre_/post_feedforward_layernorm
    "gemma2": Expected("sandwich", RMS_OFFSET, 1e-6, [StackSpec("layers", None, "norm", [
        ("attention", "sandwich", [("input_layernorm", "pre", RMS_OFFSET),
                                   ("post_attention_layernorm", "out", RMS_OFFSET)]),
        ("mlp", "sandwich", [("pre_feedforward_layernorm", "pre", RMS_OFFSET),
                             ("post_feedforward_layernorm", "out", RMS_OFFSET)]),
    ])]),
    # GLM-4: its post_attention_layernorm is the MLP's *pre* norm; the out norms are post_self_attn/post_mlp_layernorm
    "glm4": Expected("sandwich", RMS, 1.5625e-07, [StackSpec("layers", None, "norm", [
        ("attention", "sandwich", [("input_layernorm", "pre", RMS), ("post_self_attn_layernorm", "out", RMS)]),
        ("mlp", "sandwich", [("post_attention_layernorm", "pre", RMS), ("post_mlp_layernorm", "out", RMS)]),
    ])]),
    "olmo": Expected("pre", LN_NOAFFINE, 1e-5, [StackSpec("layers", None, "norm", [
        pre("attention", ("input_layernorm", LN_NOAFFINE)), pre("mlp", ("post_attention_layernorm", LN_NOAFFINE))])]),
    # OLMo 2: x + N(F(x)); q_norm over all heads (64), k_norm over kv heads (2 x 16)
    "olmo2": Expected("post-sublayer", RMS, 1e-5, [StackSpec("layers", None, "norm", [
        ("attention", "post-sublayer", [("post_attention_layernorm", "out", RMS)]),
        ("mlp", "post-sublayer", [("post_feedforward_layernorm", "out", RMS)]),
    ], inner_norms=(("self_attn.k_norm", 32), ("self_attn.q_norm", 64)))]),
    # a Pre-Norm linear-attention layer, then an OLMo 2 attention layer: mixed
    "olmo_hybrid": Expected("mixed", RMS, 1e-6, [StackSpec("layers", None, "norm", [
        ("attention", "post-sublayer", [("post_attention_layernorm", "out", RMS)]),
        ("mlp", "post-sublayer", [("post_feedforward_layernorm", "out", RMS)]),
    ], first_layer=[pre("attention", ("input_layernorm", RMS)), pre("mlp", ("post_attention_layernorm", RMS))],
        inner_norms=(("self_attn.k_norm", 32), ("self_attn.q_norm", 64)), first_inner_norms=())]),
    "t5": Expected("pre", RMS, 1e-6, [
        StackSpec("encoder.block", None, "encoder.final_layer_norm",
                  [pre("attention", ("layer.0.layer_norm", RMS)), pre("mlp", ("layer.1.layer_norm", RMS))]),
        StackSpec("decoder.block", None, "decoder.final_layer_norm",
                  [pre("attention", ("layer.0.layer_norm", RMS)), pre("cross-attention", ("layer.1.layer_norm", RMS)),
                   pre("mlp", ("layer.2.layer_norm", RMS))]),
    ]),
    "bart": Expected("post", LN, 1e-5, [
        StackSpec("encoder.layers", "encoder.layernorm_embedding", None, FAIRSEQ_POST),
        StackSpec("decoder.layers", "decoder.layernorm_embedding", None, FAIRSEQ_POST_DECODER),
    ]),
    "mbart": Expected("pre", LN, 1e-5, [
        StackSpec("encoder.layers", "encoder.layernorm_embedding", "encoder.layer_norm", FAIRSEQ_PRE),
        StackSpec("decoder.layers", "decoder.layernorm_embedding", "decoder.layer_norm", FAIRSEQ_PRE_DECODER),
    ]),
    "whisper": Expected("pre", LN, 1e-5, [
        StackSpec("encoder.layers", None, "encoder.layer_norm", FAIRSEQ_PRE),
        StackSpec("decoder.layers", None, "decoder.layer_norm", FAIRSEQ_PRE_DECODER),
    ]),
    "vit": Expected("pre", LN, 1e-12, [StackSpec(
        "layers", None, "layernorm",
        [pre("attention", ("layernorm_before", LN)), pre("mlp", ("layernorm_after", LN))])]),
    # MPT: nn.LayerNorm with its bias removed; 2nd residual add inside MptMLP
    "mpt": Expected("pre", LN_NOBIAS, 1e-5, [StackSpec(
        "blocks", None, "norm_f", [pre("attention", ("norm_1", LN_NOBIAS)), pre("mlp", ("norm_2", LN_NOBIAS))])]),
    # Cohere: mean-centred LayerNorm without bias, shared by parallel attention and MLP
    "cohere": Expected("parallel", LN_NOBIAS, 1e-5, [StackSpec(
        "layers", None, "norm", [parallel(("input_layernorm", LN_NOBIAS))])], branches=("attention", "mlp")),
    "biogpt": Expected("pre", LN, 1e-5, [StackSpec("layers", None, "layer_norm", FAIRSEQ_PRE)]),
    "starcoder2": Expected("pre", LN, 1e-5, [StackSpec("layers", None, "norm", HF_DECODER_LN)]),
    # PhiMoE: LayerNorm, fused mixture-of-experts MLP
    "phimoe": Expected("pre", LN, 1e-5, [StackSpec("layers", None, "norm", HF_DECODER_LN)]),
    # LFM2: a short convolution (read as an mlp branch: no attention in it) in layer 0, attention with QK norms in
    # layer 1, one class; its final norm is called embedding_norm
    "lfm2": Expected("pre", RMS, 1e-5, [StackSpec(
        "layers", None, "embedding_norm",
        [pre("attention", ("operator_norm", RMS)), pre("mlp", ("ffn_norm", RMS))],
        first_layer=[pre("mlp", ("operator_norm", RMS)), pre("mlp", ("ffn_norm", RMS))],
        inner_norms=(("self_attn.k_layernorm", 16), ("self_attn.q_layernorm", 16)), first_inner_norms=())]),
    # Nemotron: LayerNorm1P, (1 + w) * n + b
    "nemotron": Expected("pre", LN_OFFSET, 1e-5, [StackSpec("layers", None, "norm", [
        pre("attention", ("input_layernorm", LN_OFFSET)), pre("mlp", ("post_attention_layernorm", LN_OFFSET))])]),
}


def test_every_tiny_config_has_an_expectation() -> None:
    assert set(EXPECTED) == set(TINY_CONFIGS)
    assert len({TINY_CONFIGS[name]["model_type"] for name in EXPECTED}) >= 30


def _sublayer_spec(sub: normswap.Sublayer, layer: normswap.Layer) -> SublayerSpec:
    return (sub.kind, sub.placement, [(layer.relative(n.path), n.slot, n.kind) for n in sub.norms])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_detected_topology_matches_modeling_code(name: str, write_config: Any) -> None:
    expected = EXPECTED[name]
    topology = normswap.inspect(write_config(TINY_CONFIGS[name]))

    assert topology.model_type == TINY_CONFIGS[name]["model_type"]
    assert topology.placement == expected.placement
    assert topology.norm == expected.norm
    assert [stack.path for stack in topology.stacks] == [spec.path for spec in expected.stacks]
    for stack, spec in zip(topology.stacks, expected.stacks, strict=True):
        assert stack.num_layers == expected.num_layers
        assert (stack.embedding_norm.path if stack.embedding_norm else None) == spec.embedding_norm
        assert (stack.final_norm.path if stack.final_norm else None) == spec.final_norm
        layers = [layer for layer in topology.layers if layer.stack == spec.path]
        assert [layer.index for layer in layers] == list(range(expected.num_layers))
        for layer in layers:
            want = spec.first_layer if (layer.index == 0 and spec.first_layer) else spec.sublayers
            assert [_sublayer_spec(sub, layer) for sub in layer.sublayers] == want, layer.path
            inner = tuple((layer.relative(n.path), n.dim) for n in layer.inner_norms)
            first = layer.index == 0 and spec.first_inner_norms is not None
            assert inner == (spec.first_inner_norms if first else spec.inner_norms), layer.path
            for sub in layer.sublayers:
                if sub.kind == "parallel":
                    assert tuple(b.kind for b in sub.branches) == expected.branches
                else:
                    assert len(sub.branches) == 1 and sub.branches[0].kind == sub.kind
                assert sub.residual_add and sub.residual_add.startswith("modeling_")

    norms = [n for n in topology.all_norms if n.kind != "identity"]
    assert norms and all(n.eps == pytest.approx(expected.eps) for n in norms)
    assert topology.eps == pytest.approx(expected.eps)
    family_file = f"modeling_{TINY_CONFIGS[name]['model_type'].replace('-', '_')}.py:"
    assert all(n.source and n.source.startswith(family_file) for layer in topology.layers
               for sub in layer.sublayers for n in sub.norms)
