"""Tiny configs (hidden 64, 2 layers) for every family the tests cover, with config-flag variants.

Adding a family to the tests means adding an entry here and its hand-written expected
topology in ``test_detect_families.py``.
"""

from __future__ import annotations

from typing import Any

_HEADS = {"num_attention_heads": 4}
_DECODER = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 128, **_HEADS}
_GQA = {**_DECODER, "num_key_value_heads": 2}
_SEQ2SEQ = {
    "d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "vocab_size": 128,
    "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2,
    "max_position_embeddings": 64,
}
_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "bert": {"model_type": "bert", **_DECODER},
    "roberta": {"model_type": "roberta", **_DECODER, "pad_token_id": 1},
    "distilbert": {"model_type": "distilbert", "dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 128,
                   "vocab_size": 128},
    "electra": {"model_type": "electra", **_DECODER, "embedding_size": 64},
    "megatron_bert": {"model_type": "megatron-bert", **_DECODER},
    "xlm_roberta_xl": {"model_type": "xlm-roberta-xl", **_DECODER, "pad_token_id": 1},
    # no layer modules: the model's forward runs its layers by index over lists of branches and norms
    "xlm": {"model_type": "xlm", "emb_dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 128},
    "flaubert": {"model_type": "flaubert", "emb_dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 128},
    "roberta_prelayernorm": {"model_type": "roberta-prelayernorm", **_DECODER, "pad_token_id": 1},
    "modernbert": {"model_type": "modernbert", **_DECODER, **_TOKENS, "cls_token_id": 1, "sep_token_id": 2,
                   "global_attn_every_n_layers": 2},
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128},
    "gpt_neo": {"model_type": "gpt_neo", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 128,
                "attention_types": [[["global", "local"], 1]], "intermediate_size": 128},
    "gpt_neox_parallel": {"model_type": "gpt_neox", **_DECODER, "use_parallel_residual": True},
    "gpt_neox_sequential": {"model_type": "gpt_neox", **_DECODER, "use_parallel_residual": False},
    "gptj": {"model_type": "gptj", "n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "vocab_size": 128},
    "opt_pre": {"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "ffn_dim": 128, "vocab_size": 128, "word_embed_proj_dim": 64, "do_layer_norm_before": True},
    "opt_post": {"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "ffn_dim": 128, "vocab_size": 128, "word_embed_proj_dim": 64, "do_layer_norm_before": False},
    "bloom": {"model_type": "bloom", "hidden_size": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128},
    "falcon": {"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "vocab_size": 128},
    "falcon_sequential": {"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "vocab_size": 128, "parallel_attn": False},
    # Falcon-RW's layout: sequential, biased, ALiBi
    "falcon_rw": {"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "vocab_size": 128, "parallel_attn": False, "bias": True, "alibi": True,
                  "eos_token_id": None},  # generation runs its full length (the default 11 ends it early)
    # Falcon-40B's layout: new_decoder_architecture, grouped KV heads, two norms per parallel block
    "falcon_new": {"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_kv_heads": 2, "vocab_size": 128, "new_decoder_architecture": True},
    # Falcon2-11B's: new_decoder_architecture with one norm shared by both branches
    "falcon_new_one_norm": {"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_kv_heads": 2, "vocab_size": 128,
                            "new_decoder_architecture": True, "num_ln_in_parallel_attn": 1},
    "phi": {"model_type": "phi", **_DECODER},
    "phi_qk_layernorm": {"model_type": "phi", **_DECODER, "qk_layernorm": True},
    "stablelm": {"model_type": "stablelm", **_GQA},
    "nemotron": {"model_type": "nemotron", **_GQA},
    "phimoe": {"model_type": "phimoe", **_GQA, "num_local_experts": 4, "num_experts_per_tok": 2},
    "stablelm_parallel": {"model_type": "stablelm", **_GQA, "use_parallel_residual": True},
    # a convolution layer, then an attention layer: one class, its branch module chosen by a per-layer flag
    "lfm2": {"model_type": "lfm2", **_GQA, "layer_types": ["conv", "full_attention"]},
    "llama": {"model_type": "llama", **_GQA},
    "mistral": {"model_type": "mistral", **_GQA},
    "qwen2": {"model_type": "qwen2", **_GQA},
    "mixtral": {"model_type": "mixtral", **_GQA, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3": {"model_type": "qwen3", **_GQA, "head_dim": 16},
    "gemma": {"model_type": "gemma", **_GQA, "head_dim": 16},
    "gemma2": {"model_type": "gemma2", **_GQA, "head_dim": 16},
    "olmo": {"model_type": "olmo", **_GQA, **_TOKENS},
    "olmo2": {"model_type": "olmo2", **_GQA, **_TOKENS},
    # mixed: a Pre-Norm linear-attention layer, then a Post-sublayer-Norm attention layer (OLMo 2's)
    "olmo_hybrid": {"model_type": "olmo_hybrid", **_GQA, **_TOKENS, "layer_types": ["linear_attention",
                                                                                "full_attention"],
                    "linear_num_key_heads": 4, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
                    "linear_value_head_dim": 16},
    "glm4": {"model_type": "glm4", **_GQA, **_TOKENS, "head_dim": 16},
    "t5": {"model_type": "t5", "d_model": 64, "d_kv": 16, "num_layers": 2, "num_heads": 4, "d_ff": 128,
           "vocab_size": 128},
    "bart": {"model_type": "bart", **_SEQ2SEQ},
    "mbart": {"model_type": "mbart", **_SEQ2SEQ},
    "whisper": {"model_type": "whisper", **_SEQ2SEQ, "num_mel_bins": 8, "max_source_positions": 16,
                "max_target_positions": 32},
    "vit": {"model_type": "vit", **_DECODER, "image_size": 32, "patch_size": 8},
    "mpt": {"model_type": "mpt", "d_model": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 128},
    "cohere": {"model_type": "cohere", **_GQA},
    "biogpt": {"model_type": "biogpt", **_DECODER},
    "starcoder2": {"model_type": "starcoder2", **_GQA},
}
