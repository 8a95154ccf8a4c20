"""Write safetensors shards as tensors arrive, in the HF layout (``model-0000i-of-0000n.safetensors`` + index).

Every output tensor's name, dtype and shape is known before the first byte is computed, so the
shards are planned up front (``sequential_layout``, or the source's own shards, already copied, from
``mirror_layout``): each file's header is written first and every tensor has a fixed place in its file.
Tensors are then written *at* their place, by a small pool of threads, while the caller computes the next
one, so arithmetic and disk overlap. Unchanged tensors are copied by the kernel
(``copy_file_range``) in 64 MiB pieces. Computed tensors wait in memory only until written (at most
``_IN_FLIGHT`` of them).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import NormswapError
from ..interrupts import PendingInterrupts, deferred_interrupts
from . import file_copy
from .safetensors_file import header_bytes, tensor_bytes

INDEX_FILE = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}
_IN_FLIGHT = 4  # computed tensors allowed to wait for their write
_WRITERS = 2


@dataclass(frozen=True)
class _Place:
    shard: int
    offset: int  # from the start of the shard file
    planned: PlannedTensor


@dataclass(frozen=True)
class FileRange:
    """Bytes ``[offset, offset + length)`` of a file: an unchanged tensor to copy as it is."""

    file: Path
    offset: int
    length: int


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


@dataclass(frozen=True)
class ShardFile:
    """One output file: its header (the 8-byte length and the JSON, padded) and its final size.
    ``fresh`` files are created empty; the others already hold mirrored source bytes (``mirror``)."""

    name: str
    header: bytes
    size: int
    fresh: bool = True


@dataclass(frozen=True)
class ShardLayout:
    """Where every output tensor goes: ``places[name] = (file index, absolute offset)``. Tensors in
    ``in_place`` are already there (mirrored source bytes) and are not written again."""

    files: tuple[ShardFile, ...]
    places: Mapping[str, tuple[int, int]]
    in_place: frozenset[str] = frozenset()

    def weight_map(self) -> dict[str, str]:
        return {name: self.files[index].name for name, (index, _) in self.places.items()}


def sequential_layout(tensors: Sequence[PlannedTensor], max_bytes: int, stem: str = "model") -> ShardLayout:
    """The tensors in order, in shards of at most ``max_bytes``, named as transformers names them."""
    shards = plan_shards(tensors, max_bytes)
    count = len(shards)
    names = ([f"{stem}.safetensors"] if count == 1 else
             [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
    files, places = [], {}
    for index, shard in enumerate(shards):
        header, offsets = header_bytes({t.name: (t.dtype, t.shape) for t in shard}, {"format": "pt"})
        files.append(ShardFile(names[index], header, len(header) + sum(t.nbytes for t in shard)))
        places.update({t.name: (index, len(header) + offsets[t.name][0]) for t in shard})
    return ShardLayout(tuple(files), places)


class ShardWriter:
    """Writes the planned tensors, in any order, into ``folder``; ``close`` waits for them and adds the index
    for several shards. Use it as a context manager: leaving on an error stops the writes still queued.
    Within it, Ctrl-C and SIGTERM are deferred (``deferred_interrupts``) to the start of the next ``write``
    or to the exit: raised while the caller held a future's lock, they would hang ``abort`` on its writers.

    The layout is ``sequential_layout`` unless given (``mirror_layout``). ``on_written(nbytes)`` is called
    (from a writer thread) as bytes reach their file, for progress bars.
    """

    def __init__(self, folder: Path, tensors: Sequence[PlannedTensor], max_bytes: int, stem: str = "model",
                 on_written: Callable[[int], Any] | None = None, workers: int = _WRITERS,
                 layout: ShardLayout | None = None) -> None:
        self.folder = folder
        self.layout = layout or sequential_layout(tensors, max_bytes, stem)
        self.file_names = [file.name for file in self.layout.files]
        planned = {tensor.name: tensor for tensor in tensors}
        if set(planned) != set(self.layout.places):
            raise NormswapError("internal: the shard layout does not hold the planned tensors; please report it")
        self._places = {name: _Place(index, offset, planned[name])
                        for name, (index, offset) in self.layout.places.items()}
        self._descriptors: list[int] = []
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="normswap-writer")
        self._futures: list[Future[None]] = []
        self._room = threading.BoundedSemaphore(_IN_FLIGHT)
        self._written: set[str] = set(self.layout.in_place)
        self._on_written = on_written
        self._deferral = contextlib.ExitStack()
        self._interrupts = PendingInterrupts({})  # none deferred until __enter__
        try:
            for file in self.layout.files:
                flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if file.fresh else 0)
                descriptor = os.open(folder / file.name, flags, 0o644)
                self._descriptors.append(descriptor)
                _naming_the_file(folder / file.name, file_copy.write_at, descriptor, memoryview(file.header), 0)
                _naming_the_file(folder / file.name, os.ftruncate, descriptor, file.size)
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> ShardWriter:
        self._interrupts = self._deferral.enter_context(deferred_interrupts())
        return self

    def __exit__(self, kind: type[BaseException] | None, *details: Any) -> None:
        try:
            if kind is not None:
                self.abort()
        finally:
            self._deferral.__exit__(kind, *details)  # a signal noted and not yet handled is handled here

    def write(self, name: str, data: torch.Tensor | bytes | bytearray | FileRange) -> int:
        """Queue one planned tensor's bytes for writing at its place; returns its size.

        A ``FileRange`` (an unchanged tensor's bytes in a source file) is copied by the kernel
        (``copy_file_range``), without passing through this process's memory.
        """
        self._interrupts.check()  # a deferred Ctrl-C / SIGTERM is raised here, holding no lock
        self._raise_failures()
        place = self._places.get(name)
        if place is None or name in self._written:
            raise NormswapError(f"internal: {name!r} was not planned or is written twice; please report it")
        planned = place.planned
        descriptor = self._descriptors[place.shard]
        if isinstance(data, FileRange):
            if data.length != planned.nbytes:
                raise NormswapError(f"internal: {name} has {data.length} bytes, planned {planned.nbytes}")
            for start in range(0, data.length, file_copy.PIECE):
                length = min(file_copy.PIECE, data.length - start)
                self._submit(length, place.shard, file_copy.copy_range, data.file, data.offset + start,
                             descriptor, place.offset + start, length)
        else:
            if isinstance(data, torch.Tensor):
                if data.dtype != planned.dtype or tuple(data.shape) != planned.shape:
                    raise NormswapError(f"internal: {name} came out {data.dtype} {tuple(data.shape)}, planned "
                                        f"{planned.dtype} {planned.shape}; please report it")
                payload: memoryview = tensor_bytes(data)
            else:
                payload = memoryview(data)
            if payload.nbytes != planned.nbytes:
                raise NormswapError(f"internal: {name} has {payload.nbytes} bytes, planned {planned.nbytes}")
            self._room.acquire()  # bounded memory: wait while _IN_FLIGHT computed tensors are queued
            try:
                future = self._submit(payload.nbytes, place.shard, file_copy.write_at, descriptor, payload,
                                      place.offset)
            except BaseException:
                self._room.release()
                raise
            future.add_done_callback(lambda _: self._room.release())
        self._written.add(name)
        return planned.nbytes

    def close(self) -> list[str]:
        """Wait for every write, close the files and write the index; returns the shard file names."""
        missing = len(self._places) - len(self._written)
        if missing:
            self.abort()
            raise NormswapError(f"internal: {missing} planned tensors were never written")
        try:
            for future in self._futures:
                future.result()
        except BaseException:
            self.abort()
            raise
        self._pool.shutdown()
        self._close_files()
        if len(self.layout.files) > 1:
            total = sum(place.planned.nbytes for place in self._places.values())
            (self.folder / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": self.layout.weight_map()}, indent=2),
                encoding="utf-8")
        return self.file_names

    def abort(self) -> None:
        """Drop queued writes, wait for the ones under way (one piece each), close the files."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._close_files()

    def _submit(self, size: int, shard: int, function: Callable[..., None], *arguments: Any) -> Future[None]:
        """Run ``function(*arguments)``, which writes ``size`` bytes into file ``shard``, on a writer thread."""
        future = self._pool.submit(_naming_the_file, self.folder / self.file_names[shard], function, *arguments)
        if self._on_written is not None:
            report = self._on_written
            future.add_done_callback(lambda done: None if done.cancelled() or done.exception() else report(size))
        self._futures.append(future)
        return future

    def _raise_failures(self) -> None:
        for future in self._futures:
            if future.done() and not future.cancelled() and future.exception() is not None:
                raise future.exception()  # type: ignore[misc]
        self._futures = [future for future in self._futures if not future.done()]

    def _close_files(self) -> None:
        while self._descriptors:
            os.close(self._descriptors.pop())


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
    with ShardWriter(folder, [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in kept.items()],
                     max_bytes) as writer:
        for name, tensor in kept.items():
            writer.write(name, tensor)
        return writer.close()


def _naming_the_file(target: Path, function: Callable[..., Any], *arguments: Any) -> None:
    """``function(*arguments)``; a write error on a descriptor (a full disk, the file-size limit) names no
    file, so it is raised again naming ``target``."""
    try:
        function(*arguments)
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror or str(error), str(target)) from error
