"""The shard writer puts every tensor at its planned place, whatever order the writes come in, copies
unchanged bytes from source files exactly, and leaves no thread or open file behind on an error."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from normswap.errors import NormswapError
from normswap.io import file_copy
from normswap.io.shard_writer import FileRange, PlannedTensor, ShardWriter
from normswap.io.source_weights import CheckpointWeights


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {f"layer.{i}.weight": torch.randn(40 + i, 24, generator=generator).to(torch.bfloat16 if i % 2 else
                                                                                   torch.float32)
            for i in range(7)}


def _planned(tensors: dict[str, torch.Tensor]) -> list[PlannedTensor]:
    return [PlannedTensor(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]


def test_any_write_order_gives_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_copy, "PIECE", 1000)  # several pieces per tensor, shared between threads
    tensors = _tensors()
    outputs = []
    for name, order in (("forward", list(tensors)), ("backward", list(reversed(tensors)))):
        folder = tmp_path / name
        folder.mkdir()
        with ShardWriter(folder, _planned(tensors), max_bytes=8_000) as writer:
            for key in order:
                writer.write(key, tensors[key])
            files = writer.close()
        assert len(files) > 2
        outputs.append([(folder / f).read_bytes() for f in files] + [(folder / "model.safetensors.index.json")
                                                                     .read_text()])
        loaded = {k: v for f in files for k, v in load_file(str(folder / f)).items()}
        assert loaded.keys() == tensors.keys()
        assert all(torch.equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype for k in tensors)
    assert outputs[0] == outputs[1]


def test_kernel_copies_reproduce_the_source_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_copy, "PIECE", 512)
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    source = CheckpointWeights(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with ShardWriter(out, _planned(tensors), max_bytes=10**9) as writer:
        for key in reversed(tensors):
            entry = source.tensors[key]
            assert entry.entry is not None
            writer.write(key, FileRange(entry.file, entry.entry.begin, entry.entry.nbytes))
        writer.close()
    loaded = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_a_failed_copy_surfaces_and_stops_the_threads(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    short = tmp_path / "short.bin"
    short.write_bytes(b"\0" * 10)
    out = tmp_path / "out"
    out.mkdir()
    before = threading.active_count()
    with pytest.raises(NormswapError, match="truncated"), \
            ShardWriter(out, _planned(tensors), max_bytes=10**9) as writer:
        for key, tensor in tensors.items():
            writer.write(key, FileRange(short, 0, tensor.nbytes))
        writer.close()
    assert threading.active_count() == before


def test_unplanned_or_repeated_tensors_are_refused(tmp_path: Path) -> None:
    tensors = _tensors()
    with ShardWriter(tmp_path, _planned(tensors), max_bytes=10**9) as writer:
        first = next(iter(tensors))
        writer.write(first, tensors[first])
        with pytest.raises(NormswapError, match="written twice"):
            writer.write(first, tensors[first])
        with pytest.raises(NormswapError, match="never written"):
            writer.close()
