"""Healing rows and batches: every training text once per epoch in batches of similar length, a new order each
epoch, augmented rows built from training text only, and a learning rate that decays over a time budget."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from normswap.healing.rows import AugmentedTexts, TokenisedTexts
from normswap.healing.sampler import LengthBucketSampler
from normswap.healing.training import HealingTrainer, TrainingClock


def _lengths(count: int = 203) -> list[int]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, 64, (count,), generator=generator).tolist()


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


def test_every_text_once_per_epoch_in_batches_of_similar_length() -> None:
    lengths = _lengths()
    sampler = LengthBucketSampler(lengths, batch_size=8, seed=0)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == list(range(len(lengths))) == sorted(second)
    assert first != second  # the order changes from epoch to epoch
    padded = sum(max(lengths[i] for i in b) * len(b) for b in _batches(first, 8))
    random_order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    padded_randomly = sum(max(lengths[i] for i in b) * len(b) for b in _batches(random_order, 8))
    assert padded < 0.8 * padded_randomly
    assert len(_batches(first, 8)[-1]) == len(lengths) % 8  # only the last batch is short


def test_the_order_is_a_function_of_seed_and_epoch() -> None:
    lengths = _lengths()
    a, b = LengthBucketSampler(lengths, 8, seed=3), LengthBucketSampler(lengths, 8, seed=3)
    a.set_epoch(5)
    b.set_epoch(5)
    assert list(a) == list(b)
    b.set_epoch(6)
    assert list(a) == list(b)  # a moved on to epoch 6 by itself


def test_augmented_rows_come_from_training_text_with_the_specials_kept() -> None:
    class Tokenizer:  # [CLS]=1 ... [SEP]=2 around the characters' codes
        pad_token, pad_token_id, eos_token = "[PAD]", 0, None

        def __call__(self, texts, add_special_tokens=True, **options):
            if isinstance(texts, str):
                ids = [ord(c) for c in texts]
                return {"input_ids": [1, *ids, 2] if add_special_tokens else ids}
            width = options["max_length"]
            rows = [[1, *[ord(c) for c in t][:width - 2], 2] for t in texts]
            return {"input_ids": torch.tensor([r + [0] * (width - len(r)) for r in rows]),
                    "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])}

    texts = ["abcdefgh", "ijklmnopqrst", "uvw"]
    rows = TokenisedTexts(texts, Tokenizer(), 16, 200)
    augmented = AugmentedTexts(rows, Tokenizer(), keep=0.0, substitute=0.3)
    allowed = {ord(c) for t in texts for c in t}
    torch.manual_seed(0)
    changed = 0
    for _ in range(20):
        for index in range(len(texts)):
            row = augmented[index]["input_ids"].tolist()
            assert len(row) == rows.lengths[index]
            assert row[0] == 1 and row[-1] == 2 and set(row[1:-1]) <= allowed
            changed += row != rows[index]["input_ids"].tolist()
    assert changed > 30


def test_learning_rate_decays_over_the_time_budget() -> None:
    trainer = HealingTrainer.__new__(HealingTrainer)
    trainer.lr_scheduler = None
    trainer.max_seconds = 0.3
    trainer.clock = TrainingClock()
    trainer.args = SimpleNamespace(get_warmup_steps=lambda steps: 2)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = trainer.create_scheduler(num_training_steps=100_000, optimizer=optimizer)
    rates = []
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[1] > 0.9  # warmed up, early in a budget of 100000 steps and 0.3 s
    time.sleep(0.35)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] < 1e-6  # the time budget is spent: decayed to zero


def test_a_resumed_clock_continues_the_decay() -> None:
    """Half the time budget spent before the checkpoint: the resumed run starts at half the peak rate."""
    trainer = HealingTrainer.__new__(HealingTrainer)
    trainer.lr_scheduler = None
    trainer.max_seconds = 100.0
    trainer.clock = TrainingClock(spent=50.0)
    trainer.args = SimpleNamespace(get_warmup_steps=lambda steps: 0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    trainer.create_scheduler(num_training_steps=100_000, optimizer=optimizer)
    assert 0.45 < optimizer.param_groups[0]["lr"] <= 0.5


def test_spent_seconds_reads_the_last_logged_clock(tmp_path: Path) -> None:
    from normswap.healing.training import CLOCK_LOG_KEY, spent_seconds

    assert spent_seconds(None) == 0.0
    assert spent_seconds(str(tmp_path / "missing")) == 0.0
    (tmp_path / "trainer_state.json").write_text("{not json")
    assert spent_seconds(str(tmp_path)) == 0.0  # an unreadable state starts the clock again rather than failing
    history = [{"loss": 1.0}, {CLOCK_LOG_KEY: 12.5}, {"loss": 0.5}, {CLOCK_LOG_KEY: 30.25}]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert spent_seconds(str(tmp_path)) == 30.25
