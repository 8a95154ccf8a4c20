"""The safetensors format, read and written one tensor at a time with plain file I/O.

No memory map: a streamed conversion reads each tensor into its own buffer and lets it go, so its
resident memory stays at a few tensors whatever the shard size. The header is validated against
the file before any tensor is read, so a truncated file or a header that lies about offsets fails
up front with the tensor's name, instead of as garbage weights.

Format: 8 bytes little-endian header length N, N bytes of JSON ``{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}``, then the data; offsets count from the end
of the header.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import SourceError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
_ALIGNMENT = 8


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file."""

    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file, checked against the file's size."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise SourceError(f"{path} is {size} bytes, too short for a safetensors file; re-download or re-save it")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(_MAX_HEADER, size - 8):
            raise SourceError(f"{path} declares a {length}-byte header in a {size}-byte file: not a safetensors "
                              "file, or truncated; re-download or re-save it")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SourceError(f"{path} has a header that is not JSON ({error}); the file is corrupt, re-save it") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path} has a header that is not a JSON object; the file is corrupt, re-save it")
    data_start = 8 + length
    entries = {name: _entry(path, name, info, data_start, size)
               for name, info in header.items() if name != "__metadata__"}
    _check_no_overlap(path, entries.values())
    return entries


def _entry(path: Path, name: str, info: object, data_start: int, size: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or info.get("dtype") not in DTYPES:
        raise SourceError(f"{where} has no known dtype ({info!r:.80}); the file is corrupt or from a newer format")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)):
        raise SourceError(f"{where} has a malformed shape or data_offsets; the file is corrupt, re-save it")
    dtype = DTYPES[info["dtype"]]
    expected = math.prod(shape) * dtype.itemsize
    begin, end = offsets
    if end - begin != expected or begin < 0:
        raise SourceError(f"{where}: the header lies about offsets ({begin}..{end} is {end - begin} bytes, but "
                          f"{info['dtype']} {tuple(shape)} needs {expected}); the file is corrupt, re-save it")
    if data_start + end > size:
        raise SourceError(f"{where} ends at byte {data_start + end} but the file has {size} bytes: the file is "
                          "truncated mid-tensor; re-download or re-copy it")
    return TensorEntry(path, name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_no_overlap(path: Path, entries: Iterable[TensorEntry]) -> None:
    previous: TensorEntry | None = None
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if previous is not None and entry.begin < previous.end and entry.nbytes and previous.nbytes:
            raise SourceError(f"{path}: the header lies about offsets (tensors {previous.name!r} and "
                              f"{entry.name!r} overlap); the file is corrupt, re-save it")
        previous = entry


def read_bytes(entry: TensorEntry, handle: BinaryIO | None = None) -> bytearray:
    """The raw bytes of one tensor."""
    buffer = bytearray(entry.nbytes)
    if not buffer:
        return buffer
    own = handle is None
    handle = handle or entry.file.open("rb")
    try:
        handle.seek(entry.begin)
        got = handle.readinto(buffer)
    finally:
        if own:
            handle.close()
    if got != entry.nbytes:
        raise SourceError(f"{entry.file}: tensor {entry.name!r} is cut short ({got} of {entry.nbytes} bytes); "
                          "the file is truncated, re-download or re-copy it")
    return buffer


def tensor_from_bytes(buffer: bytearray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not buffer:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def header_bytes(entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]
                 ) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The 8-byte length and JSON header for tensors written in ``entries`` order, and each one's offsets."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offsets: dict[str, tuple[int, int]] = {}
    position = 0
    for name, (dtype, shape) in entries.items():
        nbytes = math.prod(shape) * dtype.itemsize
        offsets[name] = (position, position + nbytes)
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [position, position + nbytes]}
        position += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % _ALIGNMENT)
    return struct.pack("<Q", len(raw)) + raw, offsets


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes in memory order, without copying when it is contiguous on the CPU."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
