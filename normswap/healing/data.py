"""Healing text: the user's files or the built-in corpus, split once into training and held-out parts.

The held-out part is chosen by a hash of each text, so it is the same on every run and machine and
never depends on the order of the input; it is never trained on.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..corpus import default_corpus
from ..errors import NormswapError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


@dataclass(frozen=True)
class HealingTexts:
    train: tuple[str, ...]
    held_out: tuple[str, ...]


def load_texts(source: str | Path | Sequence[str] | None) -> list[str]:
    """Texts from a .txt (one document per line), a .jsonl (``text`` field), a ``datasets`` folder saved with
    ``save_to_disk``, a list of strings, or (None) the built-in corpus split into sentences."""
    if source is None:
        return [s for paragraph in default_corpus() for s in _SENTENCE_END.split(paragraph) if len(s) >= 40]
    if not isinstance(source, (str, Path)):
        texts = [t for t in source if isinstance(t, str) and t.strip()]
        if not texts:
            raise NormswapError("the healing data holds no text")
        return texts
    path = Path(source)
    if path.is_dir():
        return _dataset_folder(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise NormswapError(f"cannot read healing data {path}: {error}; pass a UTF-8 .txt or .jsonl file") from None
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise NormswapError(f"{path}:{number} is not JSON ({error.msg}); each line must be an object with "
                                    "a 'text' field") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise NormswapError(f"{path}:{number} has no string 'text' field")
            texts.append(record["text"])
    else:
        texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise NormswapError(f"{path} holds no text; pass one document per line")
    return texts


def _dataset_folder(path: Path) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise NormswapError(f"{path} is a folder; reading a datasets save_to_disk folder needs the 'datasets' "
                            "package (pip install datasets)") from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    if "text" not in loaded.column_names:
        raise NormswapError(f"{path} has no 'text' column (columns: {', '.join(loaded.column_names)})")
    return [t for t in loaded["text"] if isinstance(t, str) and t.strip()]


def split_texts(texts: Sequence[str], held_out: int = 256) -> HealingTexts:
    """Hold out ``held_out`` texts (at most a third), picked by hash; the rest are for training."""
    unique = list(dict.fromkeys(texts))
    if len(unique) < 8:
        raise NormswapError(f"healing needs at least 8 distinct texts, got {len(unique)}")
    count = min(held_out, len(unique) // 3)
    ranked = sorted(unique, key=lambda t: hashlib.sha256(t.encode()).hexdigest())
    chosen = set(ranked[:count])
    return HealingTexts(tuple(t for t in unique if t not in chosen), tuple(t for t in unique if t in chosen))


class TokenisedTexts(torch.utils.data.Dataset):
    """Token rows for the Trainer, each trimmed to its own length; ``pad_batch`` pads a batch to its longest.

    ``input_ids`` / ``attention_mask`` hold every row padded to ``max_length``; ``batches`` cuts them into
    batches trimmed to their longest row, so short texts do not pay for the longest possible one.
    """

    def __init__(self, texts: Sequence[str], tokenizer: Any, max_length: int, vocab_size: int) -> None:
        if tokenizer is not None:
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
            self.pad_id = int(tokenizer.pad_token_id or 0)
            batch = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                              padding_side="right", return_tensors="pt")
            self.input_ids, self.attention_mask = batch["input_ids"], batch["attention_mask"]
        else:  # no tokenizer: bytes as token ids, folded into the vocabulary
            self.pad_id = 0
            rows = [[b % vocab_size for b in t.encode()[:max_length]] for t in texts]
            self.input_ids = torch.zeros(len(rows), max_length, dtype=torch.long)
            self.attention_mask = torch.zeros(len(rows), max_length, dtype=torch.long)
            for i, row in enumerate(rows):
                self.input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
                self.attention_mask[i, :len(row)] = 1
        # right padding: a row's real tokens are its first ``length`` positions
        self.lengths: list[int] = self.attention_mask.sum(1).clamp_min(1).tolist()

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        length = self.lengths[index]
        return {"input_ids": self.input_ids[index, :length], "attention_mask": self.attention_mask[index, :length]}

    def pad_batch(self, rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The Trainer's collator: stack rows right-padded to the longest."""
        longest = max(len(row["input_ids"]) for row in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row["input_ids"])] = row["input_ids"]
            mask[i, :len(row["attention_mask"])] = row["attention_mask"]
        return {"input_ids": ids, "attention_mask": mask}

    def batches(self, batch_size: int, limit: int | None = None,
                by_length: bool = False) -> list[dict[str, torch.Tensor]]:
        """Batches of the first ``limit`` rows, each trimmed to its longest row; ``by_length`` groups rows
        of similar length (for measurements, where row order does not matter)."""
        rows = list(range(len(self) if limit is None else min(limit, len(self))))
        if by_length:
            rows.sort(key=self.lengths.__getitem__)
        return [self.pad_batch([self[i] for i in rows[start:start + batch_size]])
                for start in range(0, len(rows), batch_size)]


class LengthBucketSampler(torch.utils.data.Sampler[int]):
    """Random batches of similar length: each epoch shuffles, sorts pools of ``pool`` batches by length and
    shuffles the batches, so padding is small but no two epochs (or batches) repeat an order.

    Yields indices batch by batch, so the DataLoader's consecutive ``batch_size`` chunks are these batches.
    ``set_epoch`` (called by accelerate) makes the order a function of (seed, epoch): resumption and every
    process see the same batches.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, pool: int = 8) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.pool = pool
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.batch_size * self.pool
        batches: list[list[int]] = []
        for start in range(0, len(order), size):
            pool = sorted(order[start:start + size], key=self.lengths.__getitem__)
            batches += [pool[i:i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        # the one short batch (if any) goes last, or the DataLoader's chunks would straddle two batches
        shuffled += [b for b in batches if len(b) < self.batch_size]
        self.epoch += 1
        return iter([index for batch in shuffled for index in batch])


class AugmentedTexts(torch.utils.data.Dataset):
    """Training rows that are not always the same: distillation only needs inputs, so more varied inputs
    teach the student the teacher's function rather than a few hundred sentences.

    Row ``i`` is, with probability ``keep``, text ``i`` as it is; otherwise a window of the same length cut
    at a random place from all training texts run together (so it crosses sentence boundaries), with
    ``substitute`` of its tokens replaced by tokens drawn from the same texts. Special tokens (the
    tokenizer's own wrapping, e.g. [CLS] ... [SEP]) stay where they are. Only training texts are used.
    """

    def __init__(self, rows: TokenisedTexts, tokenizer: Any, keep: float = 0.5, substitute: float = 0.1) -> None:
        self.rows = rows
        self.lengths = rows.lengths
        self.keep = keep
        self.substitute = substitute
        self.prefix, self.suffix = _special_wrapping(tokenizer)
        self.wrap = len(self.prefix) + len(self.suffix)
        pieces = [rows.input_ids[i, len(self.prefix):max(len(self.prefix), length - len(self.suffix))]
                  for i, length in enumerate(rows.lengths)]
        self.stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        inner = len(row["input_ids"]) - self.wrap
        if inner <= 0 or len(self.stream) <= inner or float(torch.rand(())) < self.keep:
            return row
        start = int(torch.randint(0, len(self.stream) - inner, ()))
        window = self.stream[start:start + inner].clone()
        swap = torch.rand(inner) < self.substitute
        window[swap] = self.stream[torch.randint(0, len(self.stream), (int(swap.sum()),))]
        ids = torch.cat([torch.tensor(self.prefix, dtype=torch.long), window,
                         torch.tensor(self.suffix, dtype=torch.long)])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def pad_batch(self, rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return self.rows.pad_batch(rows)


def _special_wrapping(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The token ids the tokenizer puts before and after every text (e.g. [CLS] and [SEP]); none without one."""
    if tokenizer is None:
        return [], []
    marker = tokenizer("x", add_special_tokens=False)["input_ids"]
    wrapped = tokenizer("x")["input_ids"]
    for start in range(len(wrapped) - len(marker) + 1):
        if wrapped[start:start + len(marker)] == marker:
            return wrapped[:start], wrapped[start + len(marker):]
    return [], []
