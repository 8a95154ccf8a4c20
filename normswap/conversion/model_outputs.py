"""The outputs a model returns, including those a dual-encoder nests inside its own.

CLIP-style models (TIPSv2, CLIP, SigLIP) return a ``ModelOutput`` whose hidden states sit in nested outputs
(``text_model_output``, ``vision_model_output``); comparing a converted model against its original has to look
there too, or such a model has nothing to compare.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from transformers.utils import ModelOutput


def output_parts(output: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(name prefix, output)`` for ``output`` and, depth first, every ``ModelOutput`` among its fields."""
    yield prefix, output
    if not isinstance(output, ModelOutput):
        return
    for name, value in output.items():
        if isinstance(value, ModelOutput):
            yield from output_parts(value, f"{prefix}{name}.")
