"""Healing trains the student without dropout and gives the model its dropout rates back afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from tiny_configs import TINY_CONFIGS
from transformers import CONFIG_MAPPING

import normswap
from normswap.healing import api as heal_api
from normswap.healing.dropout import without_dropout

RATES = {"bert": {"hidden_dropout_prob": 0.3, "attention_probs_dropout_prob": 0.3},
         "llama": {"attention_dropout": 0.3},
         "bart": {"dropout": 0.3, "attention_dropout": 0.3, "activation_dropout": 0.3, "encoder_layerdrop": 0.3}}


def tiny(name: str, class_name: str) -> torch.nn.Module:
    fields = {**TINY_CONFIGS[name], **RATES[name]}
    config = CONFIG_MAPPING[fields.pop("model_type")](**fields)
    torch.manual_seed(0)
    return getattr(transformers, class_name)(config)


def rates(model: torch.nn.Module) -> list[tuple[str, str, float]]:
    found = []
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            found.append((path, "p", module.p))
        found += [(path, name, value) for name, value in vars(module).items()
                  if isinstance(value, float) and ("dropout" in name or "layerdrop" in name)]
    return found


def forward(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(1, 17).reshape(2, 8) % 100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids
    torch.manual_seed(1)
    first = model(**inputs).last_hidden_state
    torch.manual_seed(2)
    return first - model(**inputs).last_hidden_state


@pytest.mark.parametrize(("name", "class_name"), [("bert", "BertModel"), ("llama", "LlamaModel"),
                                                   ("bart", "BartModel")])
def test_training_forward_is_deterministic_inside_and_rates_come_back(name: str, class_name: str) -> None:
    model = tiny(name, class_name).train()
    before = rates(model)
    with torch.no_grad():
        assert forward(model).abs().max() > 0  # dropout is really on in training mode
        with without_dropout(model) as switched_off:
            assert switched_off > 0
            assert all(value == 0.0 for _, _, value in rates(model))
            assert forward(model).abs().max() == 0
    assert rates(model) == before


def test_rates_come_back_after_an_error() -> None:
    model = tiny("bert", "BertModel")
    before = rates(model)
    with pytest.raises(RuntimeError), without_dropout(model):
        raise RuntimeError("interrupted")
    assert rates(model) == before


@pytest.mark.parametrize("keep", [False, True], ids=["default", "keep-dropout"])
def test_heal_switches_dropout_off_only_while_training(keep: bool, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = tiny("bert", "BertModel").eval()
    student = normswap.convert(tiny("bert", "BertModel").eval(), placement="pre")
    before = rates(student)
    seen: list[float] = []
    original_forward = type(student).forward

    def spy(self: torch.nn.Module, *args: object, **kwargs: object) -> object:
        if self.training:
            seen.extend(value for _, _, value in rates(self))
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(student), "forward", spy)
    _, report = heal_api.heal(teacher, student, max_steps=3, work_dir=tmp_path, keep_dropout=keep,
                              max_length=16, batch_size=4, held_out=8, eval_steps=10, quiet=True)
    assert seen, "the student never ran in training mode"
    assert (max(seen) > 0) == keep
    assert (report.dropout_rates_off > 0) != keep
    assert rates(student) == before
