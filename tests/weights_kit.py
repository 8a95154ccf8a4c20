"""Checks on written checkpoints that several test files share."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def assert_same_weights(first: Path, second: Path) -> None:
    """The two checkpoint folders' ``model.safetensors`` hold the same tensor names and, bit for bit, the same
    values (a placement round trip: norm weights moved there and back, carried ones restored)."""
    one, other = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert one.keys() == other.keys()
    assert all(torch.equal(one[key], other[key]) for key in one)
