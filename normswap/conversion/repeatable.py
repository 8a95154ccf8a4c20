"""The original and the converted model compared on the same random draws.

A forward pass that draws random numbers at inference (ViTMAE masks a random subset of patches on every call)
would be compared against a different draw in the other model: every check would fail, or every drift would be
measured on other inputs. Each compared forward starts from one seed, and the caller's generator state is
restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

COMPARISON_SEED = 0


@contextlib.contextmanager
def same_random_draws() -> Iterator[None]:
    """Run the body from ``COMPARISON_SEED`` on the CPU generator, leaving the caller's state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(COMPARISON_SEED)
        yield
