"""Healing trains without the student's dropout, and gives the model its dropout back afterwards.

Dropout is a regulariser for learning a task from labels. Healing has a different aim: the student must
compute the teacher's function itself, and with dropout on, every training step matches a randomly
thinned student to the deterministic teacher. On all-MiniLM-L6-v2 after Post -> Pre (dropout 0.1 in the
embeddings, every attention map and every branch), that noise held healing near cosine 0.93 at 4 minutes,
where the same run without it reached 0.966 (benchmarks/README.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

# float attributes that transformers' modeling code passes to ``F.dropout`` / attention as a probability
_RATE_NAMES = ("dropout", "layerdrop")
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@contextmanager
def without_dropout(model: nn.Module) -> Iterator[int]:
    """Set every dropout rate in ``model`` to 0 while the block runs; yields how many were switched off.

    Covers torch's dropout modules and float attributes such as Llama's
    ``attention_dropout`` or BART's ``dropout`` / ``layerdrop``, which modeling code reads at each forward.
    The config is not touched, so a checkpoint saved afterwards keeps the model's dropout for fine-tuning.
    """
    changed: list[tuple[object, str, float]] = []
    for module in model.modules():
        if isinstance(module, _DROPOUT_MODULES):
            if module.p:
                changed.append((module, "p", module.p))
            continue
        for name, value in vars(module).items():
            if isinstance(value, float) and value and any(rate in name.lower() for rate in _RATE_NAMES):
                changed.append((module, name, value))
    for owner, name, _ in changed:
        setattr(owner, name, 0.0)
    try:
        yield len(changed)
    finally:
        for owner, name, value in changed:
            setattr(owner, name, value)
