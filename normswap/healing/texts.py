"""Healing text: the user's files or the shipped corpus, split once into training and held-out parts.

The held-out part is chosen by a hash of each text, so it is the same on every run and machine and
never depends on the order of the input; it is never trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..corpus import healing_corpus
from ..errors import NormswapError


@dataclass(frozen=True)
class HealingTexts:
    train: tuple[str, ...]
    held_out: tuple[str, ...]


def load_texts(source: str | Path | Sequence[str] | None) -> list[str]:
    """Texts from a .txt (one document per line), a .jsonl (``text`` field), a ``datasets`` folder saved with
    ``save_to_disk``, a list of strings, or (None) the shipped healing corpus (``normswap/data``)."""
    if source is None:
        return healing_corpus()
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
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise NormswapError(f"{path} is a folder but not a datasets save_to_disk folder ({error}); pass a .txt or "
                            ".jsonl file, or a folder written by Dataset.save_to_disk") from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    if "text" not in loaded.column_names:
        raise NormswapError(f"{path} has no 'text' column (columns: {', '.join(loaded.column_names)})")
    return [t for t in loaded["text"] if isinstance(t, str) and t.strip()]


def split_texts(texts: Sequence[str], held_out: int = 256) -> HealingTexts:
    """Hold out ``held_out`` texts (at most a third), picked by hash and kept in hash order (so the first n of
    them are a fair sample, when a time budget evaluates fewer); the rest, in their order, are for training."""
    unique = list(dict.fromkeys(texts))
    if len(unique) < 8:
        raise NormswapError(f"healing needs at least 8 distinct texts, got {len(unique)}")
    count = min(held_out, len(unique) // 3)
    ranked = sorted(unique, key=lambda t: hashlib.sha256(t.encode()).hexdigest())
    chosen = set(ranked[:count])
    return HealingTexts(tuple(t for t in unique if t not in chosen), tuple(ranked[:count]))

