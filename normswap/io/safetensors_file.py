"""The safetensors format, read and written one tensor at a time with plain file I/O.

No memory map: a streamed conversion reads each tensor into its own buffer and lets it go, so its
resident memory stays at a few tensors whatever the shard size. The header is validated against
the file before any tensor is read, so a truncated file or a header that lies about offsets fails
up front with the tensor's name, instead of as garbage weights.

The validation refuses exactly what the ``safetensors`` loader (``safe_open``, ``load_file``) refuses,
found by testing it (see tests/test_safetensors_header.py): a file that passes here and fails there
would fail late, when transformers loads the converted model, with the loader's message instead of ours.
normswap refuses a little more: dtypes it does not handle, and zero-size shapes torch cannot hold.

Format: 8 bytes little-endian header length N, N bytes of JSON ``{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}``, then the data; offsets count from the end
of the header.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch

from ..errors import SourceError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
# Every dtype name the loader (safetensors 0.8) parses; normswap handles those in DTYPES. Telling the two apart
# lets a file that is valid, only beyond normswap, say so instead of being called corrupt.
_LOADER_DTYPES = frozenset({
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"})
_MAX_HEADER = 100_000_000  # the loader's MAX_HEADER_SIZE
_MAX_DEPTH = 127  # serde_json, the loader's parser, refuses JSON nested 128 deep
_U64 = 2**64  # the loader's offsets, dimensions and sizes are u64; it refuses what overflows one
_TORCH_MAX = 2**63 - 1  # torch sizes and strides are int64
_ALIGNMENT = 8
_FIELDS = ("dtype", "shape", "data_offsets")
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_INNERMOST = re.compile(r"\[\]|\{\}")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]", re.ASCII)
_SURROGATE = re.compile(r"[\ud800-\udfff]")


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


class _Object(list):
    """A JSON object as its (key, value) pairs, duplicates kept: the loader refuses some duplicate keys
    (``__metadata__``, a tensor's ``dtype``) and lets the last of others win (tensor names)."""


class _Declared(NamedTuple):
    """One tensor as the header declares it, before it is checked against the others and the file (a tuple: big
    headers declare tens of thousands)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # relative to the data region, as in the header
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file, checked against the file's size as strictly as the loader checks."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise SourceError(f"{path} is {size} bytes, too short for a safetensors file; re-download or "
                                  "re-save it")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER:
                raise SourceError(f"{path} declares a {length}-byte header, over the {_MAX_HEADER}-byte limit of "
                                  "safetensors: not a safetensors file, or corrupt; re-download or re-save it")
            if length > size - 8:
                raise SourceError(f"{path} declares a {length}-byte header in a {size}-byte file: not a "
                                  "safetensors file, or truncated; re-download or re-save it")
            raw = handle.read(length)
            if len(raw) != length:
                raise SourceError(f"{path} changed while its header was read (got {len(raw)} of {length} bytes); "
                                  "let whatever is writing it finish, then retry")
    except OSError as error:
        raise SourceError(f"cannot read {path} ({error.strerror or error}); check that it exists and is "
                          "readable") from None
    declared = _declarations(path, _parse(path, raw))
    ordered = sorted(declared.values(), key=lambda d: (d.begin, d.end))  # the loader's order
    for tensor in ordered:
        _check_size(path, tensor)
    data_start = 8 + length
    _check_layout(path, ordered, data_start, size)
    return {tensor.name: TensorEntry(path, tensor.name, DTYPES[tensor.dtype], tensor.shape, data_start + tensor.begin,
                                     data_start + tensor.end) for tensor in declared.values()}


def _parse(path: Path, raw: bytes) -> _Object:
    """The header's JSON, refused wherever serde_json (the loader's parser) refuses it, and without recursing:
    Python's own parser would raise RecursionError on a nesting bomb."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SourceError(f"{path} has a header that is not UTF-8 ({error.reason} at header byte {error.start}); "
                          "the file is corrupt, re-save it") from None
    problem = _nesting_problem(text)
    if problem is None:
        try:
            header = json.loads(text, object_pairs_hook=_Object, parse_int=_json_int, parse_float=_json_float,
                                parse_constant=_json_constant)
        except (ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
            problem = str(error)
        else:
            if _SURROGATE_ESCAPE.search(text) and (lone := _lone_surrogate(header)) is not None:
                problem = f"the string {lone!r:.80} holds a lone UTF-16 surrogate escape"
    if problem is not None:
        raise SourceError(f"{path} has a header that is not JSON ({problem}); the file is corrupt, re-save it")
    if not isinstance(header, _Object):
        raise SourceError(f"{path} has a header that is not a JSON object; the file is corrupt, re-save it")
    return header


def _nesting_problem(text: str) -> str | None:
    """Why the JSON's brackets are refused (nested deeper than the loader allows, or unpaired), or None.
    Each round of removing the innermost pairs takes one level off, all in C: no recursion, no Python loop."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    for _ in range(_MAX_DEPTH):
        brackets, removed = _INNERMOST.subn("", brackets)
        if not brackets:
            return None
        if not removed:
            return "its brackets do not pair up"
    return f"it nests deeper than {_MAX_DEPTH} levels, the safetensors loader's limit"


def _json_int(text: str) -> int | float:
    """Integers as serde_json reads them: -0 and those beyond 64 bits are floats, and must be finite."""
    if text != "-0" and len(text) <= 20:
        value = int(text)
        if -(2**63) <= value < _U64:
            return value
    return _json_float(text)


def _json_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text:.40} is out of range")
    return value


def _json_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON value")


def _lone_surrogate(node: object) -> str | None:
    """A string holding an unpaired surrogate (which serde_json refuses and Python keeps), or None."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return item
        elif isinstance(item, _Object):
            stack.extend(part for pair in item for part in pair)
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _declarations(path: Path, header: _Object) -> dict[str, _Declared]:
    """The tensors the header declares, each entry checked as the loader's types check it. A repeated tensor
    name is checked each time and the last one counts, as in the loader."""
    declared: dict[str, _Declared] = {}
    metadata_seen = False
    for name, value in header:
        if name != "__metadata__":
            declared[name] = _declared(path, name, value)
            continue
        if metadata_seen:
            raise SourceError(f"{path} has two __metadata__ entries in its header; the file is corrupt, re-save it")
        metadata_seen = True
        if value is not None and not (isinstance(value, _Object) and all(isinstance(v, str) for _, v in value)):
            raise SourceError(f"{path} has a __metadata__ that is not a map of strings to strings ({value!r:.80}); "
                              "re-save it with string metadata")
    return declared


def _declared(path: Path, name: str, value: object) -> _Declared:
    if isinstance(value, _Object):
        fields: dict[str, object] = {}
        for key, item in value:  # other keys are ignored, as by the loader
            if key in fields and key in _FIELDS:
                raise SourceError(f"{_where(path, name)} has two {key!r} fields; the file is corrupt, re-save it")
            fields[key] = item
        try:
            dtype, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
        except KeyError:
            missing = ", ".join(key for key in _FIELDS if key not in fields)
            raise SourceError(f"{_where(path, name)} has no {missing}; the file is corrupt, re-save it") from None
    elif isinstance(value, list) and len(value) == 3:  # the loader also reads [dtype, shape, data_offsets]
        dtype, shape, offsets = value
    else:
        raise SourceError(f"{_where(path, name)} is not a {{dtype, shape, data_offsets}} object ({value!r:.80}); "
                          "the file is corrupt, re-save it")
    if isinstance(dtype, _Object) and len(dtype) == 1 and dtype[0][1] is None:
        dtype = dtype[0][0]  # {"F32": null}: serde's form of a unit enum variant, which the loader reads too
    if not (isinstance(dtype, str) and dtype in _LOADER_DTYPES):
        raise SourceError(f"{_where(path, name)} has no known dtype ({dtype!r:.80}); the file is corrupt or from a "
                          "newer format")
    if not (_are_u64(shape) and _are_u64(offsets) and len(offsets) == 2):
        raise SourceError(f"{_where(path, name)} has a malformed shape or data_offsets (they must be lists of "
                          "non-negative integers); the file is corrupt, re-save it")
    return _Declared(name, dtype, tuple(shape), offsets[0], offsets[1])


def _where(path: Path, name: str) -> str:
    return f"{path}: tensor {name!r:.200}"


def _are_u64(values: object) -> bool:
    """A JSON array of integers the loader reads as u64: not bool, not float (-0 is one), not an object."""
    return (type(values) is list and set(map(type, values)) <= {int}
            and min(values, default=0) >= 0 and max(values, default=0) < _U64)


def _check_size(path: Path, tensor: _Declared) -> None:
    """The tensor's dtype is one normswap handles and its offsets span exactly its shape's bytes."""
    if tensor.dtype not in DTYPES:
        raise SourceError(f"{_where(path, tensor.name)} has dtype {tensor.dtype}, which normswap does not handle "
                          f"(it handles {', '.join(DTYPES)}); cast that tensor to one of them and re-save the file")
    elements = 1
    for n in tensor.shape:  # in the loader's order: [2**32, 2**32, 0] overflows, [0, 2**32, 2**32] does not
        elements *= n
        if elements >= _U64:
            break
    bits = elements * 8 * DTYPES[tensor.dtype].itemsize
    if bits >= _U64:
        raise SourceError(f"{_where(path, tensor.name)} has a shape {tensor.shape} too large to address (its size "
                          "overflows 64 bits); the file is corrupt, re-save it")
    expected = bits // 8
    if tensor.end - tensor.begin != expected:
        raise SourceError(f"{_where(path, tensor.name)}: the header lies about offsets ({tensor.begin}..{tensor.end} "
                          f"is {tensor.end - tensor.begin} bytes, but {tensor.dtype} {tensor.shape} needs {expected}); "
                          "the file is corrupt, re-save it")
    if not elements and math.prod(max(n, 1) for n in tensor.shape) > _TORCH_MAX:  # only zero-size ones get here
        raise SourceError(f"{_where(path, tensor.name)} has a shape {tensor.shape} that torch cannot hold (a "
                          "dimension or stride over 2**63 - 1); the file is corrupt, re-save it")


def _check_layout(path: Path, ordered: list[_Declared], data_start: int, size: int) -> None:
    """The tensors tile the data region: in offset order each starts where the previous ends, the first at 0,
    and the last ends at the end of the file. The loader refuses gaps, overlaps and trailing bytes alike."""
    position, previous = 0, None
    for tensor in ordered:
        if tensor.begin != position:
            where = f"{_where(path, tensor.name)} starts at data byte {tensor.begin}"
            if previous is None:
                detail = "but the first tensor must start at 0"
            else:
                gap = "leaving a gap" if tensor.begin > position else "overlapping it"
                detail = f"but {previous.name!r:.200} before it ends at {position}, {gap}"
            raise SourceError(f"{where}, {detail}: the header lies about offsets; the file is corrupt, re-save it")
        position, previous = tensor.end, tensor
    if data_start + position > size:
        cut = next(tensor for tensor in ordered if data_start + tensor.end > size)
        raise SourceError(f"{_where(path, cut.name)} ends at byte {data_start + cut.end} but the file has "
                          f"{size} bytes: the file is truncated mid-tensor; re-download or re-copy it")
    if data_start + position < size:
        last = f"its last tensor, {previous.name!r:.200}," if previous else "its header, which lists no tensors,"
        extra = size - data_start - position
        raise SourceError(f"{path} has {extra} byte{'s' * (extra != 1)} after {last} which the safetensors "
                          "loader refuses: the file is corrupt or was appended to; re-download or re-save it")


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


def read_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a small safetensors file, in file order. Validated by ``read_header``, so a corrupt file
    is one SourceError line where ``safetensors.torch.load_file`` would end in a traceback."""
    entries = sorted(read_header(path).values(), key=lambda entry: (entry.begin, entry.end))
    try:
        with path.open("rb") as handle:
            return {entry.name: tensor_from_bytes(read_bytes(entry, handle), entry.dtype, entry.shape)
                    for entry in entries}
    except OSError as error:
        raise SourceError(f"cannot read {path} ({error.strerror or error}); check that it exists and is "
                          "readable") from None


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
