"""Healing text sampled from the teacher itself (``--data teacher``; the default for causal language models; a
masked LM fills masks instead, ``masked_filling.py``).

A causal LM defines its own input distribution: texts sampled from it are what the student must reproduce,
in every domain the teacher knows, and healing needs no corpus at all. Each text starts from the tokenizer's
BOS token, or, without one, from the first token of a random text of the shipped corpus; it is sampled at
``temperature`` for ``length`` tokens, or until EOS. Temperature and length were chosen on the tiny decoders of
``benchmarks/heal_decoder.py``, judged on out-of-source text (``benchmarks/README.md``).

The texts are generated once per run; with a work folder they are kept there (``teacher_texts.json``) and a
resumed run, or any later run with the same sampling, reads them back instead of generating again.
"""

from __future__ import annotations

import inspect
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..corpus import healing_corpus
from ..errors import NormswapError
from .masked_filling import MaskedSampling, can_fill, fill_texts, require_mask_token
from .texts import load_texts

TEACHER = "teacher"  # the --data value that asks for it
CACHE_FILE = "teacher_texts.json"


@dataclass(frozen=True)
class Sampling:
    """How the teacher's texts are drawn."""

    count: int = 1024
    length: int = 64  # tokens per text, prompt included (at most healing's --max-length)
    temperature: float = 1.0
    batch_size: int = 64
    seed: int = 0


def can_sample(model: nn.Module) -> bool:
    """A decoder-only model with a language-model head that ``generate`` can sample from."""
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    return (callable(can_generate) and bool(can_generate())
            and not getattr(config, "is_encoder_decoder", False)
            and getattr(model, "get_output_embeddings", lambda: None)() is not None)


def healing_texts(data: str | Path | Sequence[str] | None, teacher: nn.Module, tokenizer: Any, max_length: int,
                  work_dir: str | Path | None = None, seed: int = 0) -> list[str]:
    """The texts healing trains on: ``data`` as ``load_texts`` reads it, the teacher's samples for ``"teacher"``,
    and with no ``data`` the teacher's samples for a causal LM, the shipped corpus for any other model."""
    if data is None:
        data = TEACHER if can_sample(teacher) else None
    if not (isinstance(data, str) and data == TEACHER):
        return load_texts(data)
    sampling: Sampling | MaskedSampling
    if can_sample(teacher):
        sampling = Sampling(length=max(2, max_length), seed=seed)
    elif can_fill(teacher):
        require_mask_token(teacher, tokenizer)  # before any cache is read
        sampling = MaskedSampling(max_length=max(3, max_length), seed=seed)
    else:
        raise NormswapError(f"--data teacher samples texts from the original model, but "
                            f"{type(teacher).__name__} has no language-model head to generate with (causal) or "
                            "to fill masks with (masked); pass --data FILE, or leave --data out for the shipped "
                            "corpus")
    cache = Path(work_dir) / CACHE_FILE if work_dir else None
    key = {"sampling": {"method": type(sampling).__name__, **asdict(sampling)}, "teacher": _fingerprint(teacher)}
    cached = _read_cache(cache, key)
    if cached is not None:
        return cached
    if isinstance(sampling, MaskedSampling):
        texts = fill_texts(teacher, tokenizer, sampling)
    else:
        texts = sample_texts(teacher, tokenizer, sampling)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(".partial")
        partial.write_text(json.dumps({**key, "texts": texts}), encoding="utf-8")
        partial.replace(cache)  # never a half-written cache
    return texts


@torch.no_grad()
def sample_texts(teacher: nn.Module, tokenizer: Any, sampling: Sampling) -> list[str]:
    """``sampling.count`` texts drawn from ``teacher`` (byte-level when ``tokenizer`` is None).

    A plain loop over the model's forward with its key-value cache: ``generate`` costs more per token than
    a small model's forward (3 minutes against seconds for a tiny decoder's 1024 texts)."""
    device = next(teacher.parameters()).device
    starts = _start_tokens(tokenizer, teacher.get_input_embeddings().num_embeddings, sampling)
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    # transformers renamed the forward's key-value cache argument (past_key_values -> cache) within 5.x
    cache_name = "cache" if "cache" in inspect.signature(teacher.forward).parameters else "past_key_values"
    was_training = teacher.training
    teacher.eval()
    texts: list[str] = []
    try:
        for first in range(0, sampling.count, sampling.batch_size):
            rows = torch.tensor(starts[first:first + sampling.batch_size], device=device).unsqueeze(1)
            past, step_input = None, rows
            for _ in range(sampling.length - 1):
                mask = torch.ones(rows.shape, dtype=torch.long, device=device)
                output = teacher(input_ids=step_input, attention_mask=mask, use_cache=True, **{cache_name: past})
                past = output.get(cache_name)
                logits = output.logits[:, -1].float() / sampling.temperature
                step_input = torch.multinomial(logits.softmax(-1), 1, generator=generator)
                rows = torch.cat([rows, step_input], 1)
            texts.extend(_decode(row.tolist(), tokenizer, eos) for row in rows)
    finally:
        teacher.train(was_training)
    return [text for text in texts if text.strip()]


def _start_tokens(tokenizer: Any, vocab: int, sampling: Sampling) -> list[int]:
    """One start token per text: BOS when the tokenizer has one, else the first token of a shipped text."""
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is not None:
        return [int(bos)] * sampling.count
    chosen = random.Random(sampling.seed).choices(healing_corpus(), k=sampling.count)
    if tokenizer is None:
        return [text.encode()[0] % vocab for text in chosen]
    return [tokenizer(text, add_special_tokens=False)["input_ids"][0] for text in chosen]


def _decode(ids: list[int], tokenizer: Any, eos: int | None) -> str:
    """A sampled row as text, cut at its first EOS after the start token."""
    if eos is not None and eos in ids[1:]:
        ids = ids[:ids.index(eos, 1)]
    if tokenizer is None:
        return bytes(ids).decode("utf-8", errors="ignore").strip()
    return " ".join(tokenizer.decode(ids, skip_special_tokens=True).split())


def _fingerprint(model: nn.Module) -> str:
    """Enough of a model to tell whether cached texts came from it: its class, size and a few weights."""
    table = model.get_input_embeddings().weight
    parameters = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__}:{parameters}:{float(table[:8].detach().double().sum()):.10e}"


def _read_cache(cache: Path | None, key: dict[str, Any]) -> list[str] | None:
    """The cached texts when the same teacher drew them the same way; None when there are none to reuse."""
    if cache is None or not cache.is_file():
        return None
    try:
        stored = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if any(stored.get(name) != value for name, value in key.items()) or not isinstance(stored.get("texts"), list):
        return None
    return [text for text in stored["texts"] if isinstance(text, str)]
