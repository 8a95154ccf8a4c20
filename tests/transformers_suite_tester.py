"""The model tester transformers' ``ModelTesterMixin`` reads: a tiny config of a given config class, and inputs.

The mixin asks its ``model_tester`` for ``prepare_config_and_inputs_for_common()`` (a config and the inputs every
model class takes), ``get_config()``, and the sizes it checks outputs against (``batch_size``, ``seq_length``,
``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``is_training``, ``num_choices``). Inputs come
from a seeded generator, so that the stock and the generated classes see the same ones.
"""

from __future__ import annotations

import unittest
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedConfig
from transformers_suite_families import InputKind


@dataclass(frozen=True)
class ModelTester:
    parent: unittest.TestCase
    config_class: type[PreTrainedConfig]
    config_kwargs: Mapping[str, Any]
    inputs: InputKind
    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    batch_size: int = 13
    seq_length: int = 7
    is_training: bool = True
    num_choices: int = 4

    @property
    def vocab_size(self) -> int:
        return self.config_kwargs["vocab_size"]

    @property
    def pad_token_id(self) -> int | None:
        return self.config_kwargs.get("pad_token_id")

    def get_config(self) -> PreTrainedConfig:
        return self.config_class(**self.config_kwargs)

    def prepare_config_and_inputs_for_common(self) -> tuple[PreTrainedConfig, dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(0)
        shape = (self.batch_size, self.seq_length)
        input_ids = torch.randint(0, self.vocab_size, shape, generator=generator)
        if self.inputs == "decoder":
            return self.get_config(), {"input_ids": input_ids, "attention_mask": torch.tril(torch.ones_like(input_ids))}
        if self.inputs == "encoder":
            mask = torch.randint(0, 2, shape, generator=generator)
            mask[:, 0] = 1
            return self.get_config(), {"input_ids": input_ids, "attention_mask": mask,
                                       "token_type_ids": torch.randint(0, 2, shape, generator=generator)}
        eos = self.config_kwargs["eos_token_id"]
        special = 3  # below this id: bos, pad, eos; one eos ends each row, as sequence classification requires
        input_ids = input_ids.clamp(min=special)
        input_ids[:, -1] = eos
        decoder_input_ids = torch.randint(special, self.vocab_size, shape, generator=generator)
        return self.get_config(), {"input_ids": input_ids, "attention_mask": input_ids.ne(self.pad_token_id),
                                   "decoder_input_ids": decoder_input_ids,
                                   "decoder_attention_mask": decoder_input_ids.ne(self.pad_token_id)}
