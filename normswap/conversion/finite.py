"""NaN and Inf: refused by every conversion unless the user allows them, and never written into a report.

A NaN in a norm weight makes every token NaN after that norm; converting such a checkpoint gives a broken
model and a report full of NaN. The streamed conversion checks every vector it reads (norm weights and
biases) and every tensor its arithmetic reads; verification checks the whole loaded model. With
``--allow-nonfinite`` the conversion goes on, and the figures it cannot measure are reported as null.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SourceError

ALLOW_FLAG = "--allow-nonfinite"


class NonFiniteError(SourceError):
    """A tensor of the source holds NaN or Inf."""


def count_nonfinite(tensor: torch.Tensor) -> int:
    if not tensor.is_floating_point() or tensor.device.type == "meta":
        return 0
    finite = torch.isfinite(tensor)
    return 0 if bool(finite.all()) else int((~finite).sum())


def nonfinite_error(where: str, bad: int, allow: str = ALLOW_FLAG) -> NonFiniteError:
    """``<where> has N NaN/Inf value(s)`` and the two ways out."""
    return NonFiniteError(f"{where} has {bad} NaN/Inf value(s), so the converted model would compute NaN; fix the "
                          f"checkpoint (re-download it or restore an earlier save), or pass {allow} to convert anyway")


def require_finite(tensor: torch.Tensor, name: str, file: Path | None = None) -> None:
    bad = count_nonfinite(tensor)
    if bad:
        raise nonfinite_error(f"{file.name}: tensor {name!r}" if file is not None else f"tensor {name!r}", bad)


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, int] | None:
    """The first tensor holding NaN or Inf and how many it holds, or None."""
    for name, tensor in named:
        bad = count_nonfinite(tensor)
        if bad:
            return name, bad
    return None


def require_finite_model(model: nn.Module) -> None:
    """Every parameter and buffer of a loaded model is finite, or ``NonFiniteError`` names the first that is not."""
    found = first_nonfinite(model.state_dict().items())
    if found is not None:
        raise nonfinite_error(f"tensor {found[0]!r} of the model", found[1], "allow_nonfinite=True")


def finite_for_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has no NaN; a report never holds one)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_for_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_for_json(item) for item in value]
    return value
