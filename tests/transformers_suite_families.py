"""The families and conversions run under transformers' own model tests, and each family's tiny tester config.

Each family names the stock classes its tester covers (the same names are taken from the generated module), the
tiny source normswap converts, and the conversions (variants) whose output is generated code. The tester config
is small, as transformers' own testers' are (a width of 32, two layers); a variant that widens the stream
(``--norm layernorm --exact`` adds one hidden dimension) widens it here too, keeping the head width.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

InputKind = Literal["decoder", "encoder", "seq2seq"]

_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


@dataclass(frozen=True)
class Variant:
    """One normswap conversion, named as its flags are."""

    name: str
    flags: tuple[str, ...]


@dataclass(frozen=True)
class Family:
    """A stock family, its tester config, and the conversions of it that write generated code."""

    name: str
    test_class_name: str  # as transformers names the family's test class (test_num_layers_is_small reads it)
    config_class: str
    model_classes: tuple[str, ...]
    config_kwargs: MappingProxyType[str, Any]
    inputs: InputKind
    width_key: str
    heads_key: str
    layers_key: str
    source_config: str  # key of tests/tiny_configs.TINY_CONFIGS: the tiny model normswap converts
    source_class: str
    variants: tuple[Variant, ...]

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)


POST = Variant("post", ("--placement", "post"))
LAYERNORM_EXACT = Variant("layernorm-exact", ("--norm", "layernorm", "--exact"))
RMSNORM = Variant("rmsnorm", ("--norm", "rmsnorm"))
PRE = Variant("pre", ("--placement", "pre", "--no-native"))  # the native target (MegatronBERT, mBART) is stock code


def _decoder(name: str, test_class: str, prefix: str, config: dict[str, Any], source_config: str,
             variants: tuple[Variant, ...], heads: str = "num_attention_heads", width: str = "hidden_size",
             layers: str = "num_hidden_layers", lm_head: str = "ForCausalLM", base: str = "Model") -> Family:
    classes = (f"{prefix}{base}", f"{prefix}{lm_head}", f"{prefix}ForSequenceClassification",
               f"{prefix}ForTokenClassification", f"{prefix}ForQuestionAnswering")
    return Family(name, test_class, f"{prefix}Config", classes, MappingProxyType(config), "decoder", width, heads,
                  layers, source_config, f"{prefix}{lm_head}", variants)


_LLAMA_LIKE = {"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 37, "max_position_embeddings": 512, **_TOKENS}

FAMILIES: tuple[Family, ...] = (
    _decoder("llama", "LlamaModelTest", "Llama", _LLAMA_LIKE, "llama", (POST, LAYERNORM_EXACT)),
    _decoder("qwen2", "Qwen2ModelTest", "Qwen2", _LLAMA_LIKE, "qwen2", (POST, LAYERNORM_EXACT)),
    _decoder("gpt2", "GPT2ModelTest", "GPT2",
             {"vocab_size": 99, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 37, "n_positions": 512,
              "pad_token_id": 98, "bos_token_id": 98, "eos_token_id": 98},
             "gpt2", (POST, RMSNORM), heads="n_head", width="n_embd", layers="n_layer", lm_head="LMHeadModel"),
    # two heads: a quarter of a head of 8 would rotate 2 dimensions, where dynamic RoPE scaling divides by zero
    _decoder("gpt_neox", "GPTNeoXModelTest", "GPTNeoX",
             {"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 37, "max_position_embeddings": 512, **_TOKENS},
             "gpt_neox_parallel", (POST, RMSNORM)),
    Family("bert", "BertModelTest", "BertConfig",
           ("BertModel", "BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification",
            "BertForQuestionAnswering", "BertForMultipleChoice"),
           MappingProxyType({"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                             "intermediate_size": 37, "max_position_embeddings": 512, "type_vocab_size": 16,
                             "pad_token_id": 0}),
           "encoder", "hidden_size", "num_attention_heads", "num_hidden_layers", "bert", "BertForMaskedLM",
           (PRE, RMSNORM)),
    Family("bart", "BartModelTest", "BartConfig",
           ("BartModel", "BartForConditionalGeneration", "BartForSequenceClassification", "BartForQuestionAnswering"),
           MappingProxyType({"vocab_size": 99, "d_model": 16, "encoder_layers": 2, "decoder_layers": 2,
                             "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 4,
                             "decoder_ffn_dim": 4, "max_position_embeddings": 20, "pad_token_id": 1,
                             "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2}),
           "seq2seq", "d_model", "encoder_attention_heads", "encoder_layers", "bart",
           "BartForConditionalGeneration", (PRE, RMSNORM)),
)


def family(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)
