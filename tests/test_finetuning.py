"""Converted models in a fine-tuning pipeline: transformers Trainer, and PEFT LoRA on generated code."""

from __future__ import annotations

from pathlib import Path

import torch
from test_convert_native import tiny_model

import normswap


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, vocab: int = 128, count: int = 8, length: int = 16) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, vocab, (count, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def test_trainer_trains_a_converted_model(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    model = normswap.convert(tiny_model("llama", "LlamaForCausalLM"), "post")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                             gradient_checkpointing=True)
    result = Trainer(model=model, args=args, train_dataset=_Tokens()).train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
    assert type(model).__module__.startswith("normswap_generated_")  # still the generated Post-Norm classes


def test_peft_lora_on_generated_code() -> None:
    from peft import LoraConfig, get_peft_model

    model = normswap.convert(tiny_model("qwen2", "Qwen2ForCausalLM"), "post")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = _Tokens().ids[:2]
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)
    # LoRA starts as a no-op: the adapted model still computes the converted model's function
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, model(input_ids=ids).logits)
