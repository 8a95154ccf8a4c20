"""Token rows for the Trainer: the texts tokenised once, and augmented rows cut from them.

Rows are kept unpadded in spirit (each knows its length); batches are padded only to their longest row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


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



class AugmentedTexts(torch.utils.data.Dataset):
    """Training rows that are not always the same: distillation only needs inputs, so more varied inputs
    teach the student the teacher's function rather than a few hundred sentences.

    Row ``i`` is, with probability ``keep``, text ``i`` as it is; otherwise a window of the same length cut
    at a random place from all training texts run together (so it crosses sentence boundaries), with
    ``substitute`` of its tokens replaced by tokens drawn from the same texts. Special tokens (the
    tokenizer's own wrapping, e.g. [CLS] ... [SEP]) stay where they are. Only training texts are used.

    The draws are a function of (``seed``, epoch, row), not of the process's RNG: a run resumed from a
    checkpoint, and every process of a launch, build the same rows as one uninterrupted process (the RNG
    state a checkpoint keeps is one batch off, as the DataLoader reads a batch ahead). The sampler tells the
    epoch (``set_epoch``).
    """

    def __init__(self, rows: TokenisedTexts, tokenizer: Any, keep: float = 0.5, substitute: float = 0.1,
                 seed: int = 0) -> None:
        self.rows = rows
        self.seed = seed
        self.epoch = 0
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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        inner = len(row["input_ids"]) - self.wrap
        draws = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + index) % 2**63)
        if inner <= 0 or len(self.stream) <= inner or float(torch.rand((), generator=draws)) < self.keep:
            return row
        start = int(torch.randint(0, len(self.stream) - inner, (), generator=draws))
        window = self.stream[start:start + inner].clone()
        swap = torch.rand(inner, generator=draws) < self.substitute
        window[swap] = self.stream[torch.randint(0, len(self.stream), (int(swap.sum()),), generator=draws)]
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
