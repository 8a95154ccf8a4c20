"""Healing text sampled from a masked language model by iterative masked filling (``--data teacher`` on a model
with an MLM head, such as ``BertForMaskedLM``).

A masked LM has no left-to-right distribution to sample, but it says what each masked token could be given the
rest: start from a row of masks, fill a random share of them by sampling the teacher's prediction at each round
(the rows' remaining masks spread over the rounds left), then resample a random 15% of every row a few times
(Gibbs sweeps), so early choices are revised in the light of later ones. Row lengths follow the shipped corpus's
(its texts tokenised by the teacher's tokenizer), special tokens are never drawn. How it compares with the
shipped corpus, out of source, is in ``benchmarks/README.md`` (``heal_masked_lm.py``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..corpus import healing_corpus
from ..errors import NormswapError


@dataclass(frozen=True)
class MaskedSampling:
    """How a masked LM's texts are drawn."""

    count: int = 1024
    max_length: int = 64  # tokens per text, the two special tokens included (at most healing's --max-length)
    rounds: int = 8  # filling rounds from all masks to none
    sweeps: int = 4  # Gibbs sweeps after, each resampling ``resample`` of every row
    resample: float = 0.15
    temperature: float = 1.0
    batch_size: int = 64
    seed: int = 0


def can_fill(model: nn.Module) -> bool:
    """An encoder with a masked-LM head: logits over its vocabulary at every position, and no causal generation."""
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    return (not (callable(can_generate) and bool(can_generate()))
            and not getattr(config, "is_decoder", False) and not getattr(config, "is_encoder_decoder", False)
            and getattr(model, "get_output_embeddings", lambda: None)() is not None)


def require_mask_token(model: nn.Module, tokenizer: Any) -> None:
    """Masked filling needs the tokenizer's mask, start and end tokens: refuse in one line otherwise."""
    missing = [name for name in ("mask_token_id", "cls_token_id", "sep_token_id")
               if getattr(tokenizer, name, None) is None]
    if missing:
        raise NormswapError(f"--data teacher fills masks with {type(model).__name__}'s masked-LM head, and "
                            f"{'no tokenizer was given' if tokenizer is None else 'its tokenizer has no ' + missing[0]}"
                            "; pass --data FILE, or leave --data out for the shipped corpus")


@torch.no_grad()
def fill_texts(teacher: nn.Module, tokenizer: Any, sampling: MaskedSampling) -> list[str]:
    """``sampling.count`` texts drawn from ``teacher`` by iterative masked filling."""
    require_mask_token(teacher, tokenizer)
    device = next(teacher.parameters()).device
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    banned = torch.zeros(vocab, dtype=torch.bool, device=device)
    banned[[i for i in tokenizer.all_special_ids if 0 <= i < vocab]] = True
    lengths = sorted(_lengths(tokenizer, sampling))  # similar lengths share a batch
    was_training = teacher.training
    teacher.eval()
    texts: list[str] = []
    try:
        for first in range(0, len(lengths), sampling.batch_size):
            ids, open_ = _masked_rows(tokenizer, lengths[first:first + sampling.batch_size], device)
            attention = (ids != -1).long()
            ids = ids.masked_fill(ids == -1, getattr(tokenizer, "pad_token_id", None) or 0)
            _fill(teacher, ids, attention, open_.clone(), banned, sampling, generator)
            for _ in range(sampling.sweeps):  # resample a random share of each row, given the rest
                chosen = open_ & (torch.rand(open_.shape, generator=generator, device=device) < sampling.resample)
                ids[chosen] = tokenizer.mask_token_id
                _fill(teacher, ids, attention, chosen, banned, sampling, generator, rounds=1)
            texts += [" ".join(tokenizer.decode(row[keep].tolist(), skip_special_tokens=True).split())
                      for row, keep in zip(ids, attention.bool(), strict=True)]
    finally:
        teacher.train(was_training)
    return [text for text in texts if text.strip()]


def _lengths(tokenizer: Any, sampling: MaskedSampling) -> list[int]:
    """Each text's number of tokens, special ones included: a random shipped text's, tokenised, at most
    ``max_length`` (at least one token between the specials)."""
    chosen = random.Random(sampling.seed).choices(healing_corpus(), k=sampling.count)
    return [min(sampling.max_length, max(3, len(tokenizer(text)["input_ids"]))) for text in chosen]


def _masked_rows(tokenizer: Any, lengths: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[CLS] [MASK]... [SEP]`` padded with -1, and where their masks are."""
    ids = torch.full((len(lengths), max(lengths)), -1, dtype=torch.long, device=device)
    open_ = torch.zeros(ids.shape, dtype=torch.bool, device=device)
    for row, length in enumerate(lengths):
        ids[row, 0], ids[row, length - 1] = tokenizer.cls_token_id, tokenizer.sep_token_id
        ids[row, 1:length - 1] = tokenizer.mask_token_id
        open_[row, 1:length - 1] = True
    return ids, open_


def _fill(teacher: nn.Module, ids: torch.Tensor, attention: torch.Tensor, masked: torch.Tensor, banned: torch.Tensor,
          sampling: MaskedSampling, generator: torch.Generator, rounds: int | None = None) -> None:
    """Fill ``masked`` positions of ``ids`` in place over ``rounds`` rounds: each round samples every masked
    position and keeps a random share of each row's (its remaining masks over the rounds left)."""
    rounds = sampling.rounds if rounds is None else rounds
    for done in range(rounds):
        if not masked.any():
            return
        logits = teacher(input_ids=ids, attention_mask=attention).logits[masked].float() / sampling.temperature
        logits[:, banned] = float("-inf")
        drawn = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
        share = (masked.sum(1, keepdim=True) + (rounds - done) - 1) // (rounds - done)  # ceil(masks / rounds left)
        noise = torch.rand(masked.shape, generator=generator, device=ids.device).masked_fill(~masked, 2.0)
        keep = noise.argsort(1).argsort(1) < share  # each row's ``share`` masks of lowest noise
        ids[keep] = drawn[keep[masked]]
        masked &= ~keep
