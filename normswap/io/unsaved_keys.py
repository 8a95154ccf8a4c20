"""State-dict keys a family computes when it loads and never saves (Marian's sinusoidal position tables).

transformers lists them in the model class's ``_keys_to_ignore_on_save`` and rebuilds them on load, so a
checkpoint rightly lacks them. A streamed conversion neither reads nor writes them: the target, built from the
same family's code, rebuilds them too.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable

from torch import nn


def unsaved_keys(model: nn.Module, keys: Iterable[str], stored: Container[str]) -> frozenset[str]:
    """The ``keys`` that ``model``'s class does not save and the checkpoint (``stored`` names) does not hold."""
    patterns = tuple(getattr(model, "_keys_to_ignore_on_save", None) or ())
    prefix = getattr(model, "base_model_prefix", "")
    return frozenset(key for key in keys
                     if any(re.search(pattern, key) for pattern in patterns)
                     and key not in stored and key.removeprefix(f"{prefix}.") not in stored)
