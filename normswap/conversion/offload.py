"""Verification of models too large for memory: weights stay on disk and are read one module at a time.

transformers loads a checkpoint with ``device_map={"": "disk"}`` on the meta device, and accelerate's hooks
read each module's tensors from the safetensors files just before it runs and drop them after it. Peak memory
is then about the largest module plus the probe's activations, and every weight is read once per forward pass.
Whatever accelerate must write out to offload (weights it cannot read in place) goes to a scratch folder
beside DST, removed afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import NormswapError
from ..io.scratch import make_scratch, remove_scratch


def require_accelerate() -> None:
    """Offloaded loading is accelerate's; refuse up front, before anything is written, when it is missing."""
    if importlib.util.find_spec("accelerate") is None:
        raise NormswapError("--verify-offloaded needs the accelerate package; install it with "
                            "`pip install accelerate`, or drop --verify-offloaded to skip verification")


@contextlib.contextmanager
def offloaded(destination: Path) -> Iterator[Path]:
    """A scratch folder beside ``destination`` for offloaded weights, removed on the way out. accelerate's
    warning that parameters are on the meta device (by request, here) is silenced meanwhile."""
    folder = make_scratch(destination, "offload")
    accelerate_logger = logging.getLogger("accelerate.big_modeling")
    level = accelerate_logger.level
    accelerate_logger.setLevel(logging.ERROR)
    try:
        yield folder
    finally:
        accelerate_logger.setLevel(level)
        remove_scratch(folder)


def offload_options(folder: Path | None) -> dict[str, Any]:
    """``from_pretrained`` keywords: every module on disk, under ``folder``; none when not offloading."""
    if folder is None:
        return {}
    return {"device_map": {"": "disk"}, "offload_folder": str(folder)}
