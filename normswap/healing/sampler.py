"""Which rows go together in a batch: similar lengths, a new order every epoch."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch


class LengthBucketSampler(torch.utils.data.Sampler[int]):
    """Random batches of similar length: each epoch shuffles, sorts pools of ``pool`` batches by length and
    shuffles the batches, so padding is small but no two epochs (or batches) repeat an order.

    Yields indices batch by batch, so the DataLoader's consecutive ``batch_size`` chunks are these batches.
    ``set_epoch`` (called by accelerate) makes the order a function of (seed, epoch): resumption and every
    process see the same batches. Under several processes, ``batch_size`` is a whole step's texts and each
    process takes its consecutive share of every batch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, pool: int = 8,
                 on_epoch: Callable[[int], None] | None = None) -> None:
        self.lengths = list(lengths)
        self.on_epoch = on_epoch  # told each epoch as it starts (the augmentation draws per epoch and row)
        self.batch_size = batch_size
        self.seed = seed
        self.pool = pool
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        if self.on_epoch is not None:
            self.on_epoch(self.epoch)
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
