"""Write safetensors shards as tensors arrive, in the HF layout (``model-0000i-of-0000n.safetensors`` + index).

Every output tensor's name, dtype and shape is known before the first byte is computed, so the
shards are planned up front, each header is written first and the tensor bytes follow as they are
produced: at no time does more than one tensor sit in memory.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import NormswapError
from .safetensors_file import header_bytes, tensor_bytes

INDEX_FILE = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class FileRange:
    """Bytes ``[offset, offset + length)`` of a file: an unchanged tensor to copy as it is."""

    file: Path
    offset: int
    length: int

    def copy_to(self, handle: BinaryIO) -> None:
        with self.file.open("rb", buffering=0) as source:
            offset, left = self.offset, self.length
            while left:
                try:
                    done = os.copy_file_range(source.fileno(), handle.fileno(), left, offset)
                except OSError:  # file systems or kernels without it: plain reads and writes
                    done = 0
                if done == 0:
                    _copy_plainly(source, handle, offset, left)
                    return
                offset += done
                left -= done


def _copy_plainly(source: BinaryIO, handle: BinaryIO, offset: int, length: int) -> None:
    source.seek(offset)
    while length:
        chunk = source.read(min(length, 64 * 2**20))
        if not chunk:
            raise NormswapError(f"{source.name} ended before its tensor did; the file is truncated")
        handle.write(chunk)
        length -= len(chunk)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5 * 10**9; ``"2GiB"`` -> 2 * 2**30."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _UNITS:
        raise NormswapError(f"cannot read the size {text!r}; write it like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[unit])


def plan_shards(tensors: Sequence[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive groups of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


class ShardWriter:
    """Writes the planned tensors, in order, into ``folder``; ``close`` adds the index for several shards."""

    def __init__(self, folder: Path, tensors: Sequence[PlannedTensor], max_bytes: int, stem: str = "model") -> None:
        self.folder = folder
        self.shards = plan_shards(tensors, max_bytes)
        count = len(self.shards)
        self.file_names = ([f"{stem}.safetensors"] if count == 1 else
                           [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self._order = [(shard_index, tensor) for shard_index, shard in enumerate(self.shards) for tensor in shard]
        self._next = 0
        self._handle: BinaryIO | None = None
        self._open_shard = -1

    def write(self, name: str, data: torch.Tensor | bytes | bytearray | FileRange) -> int:
        """Write the next tensor; it must be the one planned next, with the planned dtype and shape.

        A ``FileRange`` (an unchanged tensor's bytes in a source file) is copied by the kernel
        (``copy_file_range``), without passing through this process's memory.
        """
        shard_index, planned = self._order[self._next]
        if name != planned.name:
            raise NormswapError(f"internal: wrote {name!r} where {planned.name!r} was planned; please report it")
        if isinstance(data, FileRange):
            if data.length != planned.nbytes:
                raise NormswapError(f"internal: {name} has {data.length} bytes, planned {planned.nbytes}")
            if shard_index != self._open_shard:
                self._start(shard_index)
            assert self._handle is not None
            data.copy_to(self._handle)
            self._next += 1
            return planned.nbytes
        if isinstance(data, torch.Tensor):
            if data.dtype != planned.dtype or tuple(data.shape) != planned.shape:
                raise NormswapError(f"internal: {name} came out {data.dtype} {tuple(data.shape)}, planned "
                                    f"{planned.dtype} {planned.shape}; please report it")
            payload: memoryview | bytes | bytearray = tensor_bytes(data)
        else:
            payload = data
        if len(payload) != planned.nbytes:
            raise NormswapError(f"internal: {name} has {len(payload)} bytes, planned {planned.nbytes}")
        if shard_index != self._open_shard:
            self._start(shard_index)
        assert self._handle is not None
        self._handle.write(payload)
        self._next += 1
        return planned.nbytes

    def close(self) -> list[str]:
        """Finish the last shard and write the index; returns the shard file names."""
        if self._next != len(self._order):
            raise NormswapError(f"internal: {len(self._order) - self._next} planned tensors were never written")
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        for index in range(self._open_shard + 1, len(self.shards)):  # shards of only empty tensors
            self._start(index)
            assert self._handle is not None
            self._handle.close()
            self._handle = None
        if len(self.shards) > 1:
            weight_map = {t.name: self.file_names[i] for i, shard in enumerate(self.shards) for t in shard}
            total = sum(t.nbytes for shard in self.shards for t in shard)
            (self.folder / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8")
        return self.file_names

    def _start(self, shard_index: int) -> None:
        if self._handle is not None:
            self._handle.close()
        header, _ = header_bytes({t.name: (t.dtype, t.shape) for t in self.shards[shard_index]}, {"format": "pt"})
        self._handle = (self.folder / self.file_names[shard_index]).open("wb", buffering=0)
        self._handle.write(header)
        self._open_shard = shard_index


def write_small(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A whole small safetensors file at once (carried norms)."""
    header, _ = header_bytes({name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()},
                             {"format": "pt", **metadata})
    with path.open("wb") as handle:
        handle.write(header)
        for tensor in tensors.values():
            handle.write(tensor_bytes(tensor))


def save_state_dict(folder: Path, state: dict[str, torch.Tensor], max_bytes: int) -> list[str]:
    """A loaded model's tensors as HF shards, through the same writer; tied tensors are saved once."""
    seen: set[tuple[int, int]] = set()
    kept = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else (id(tensor), 0)
        if key in seen:
            continue
        seen.add(key)
        kept[name] = tensor.detach().cpu().contiguous()
    writer = ShardWriter(folder, [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in kept.items()], max_bytes)
    for name, tensor in kept.items():
        writer.write(name, tensor)
    return writer.close()
