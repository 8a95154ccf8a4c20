"""``read_header`` refuses exactly what the real safetensors loader refuses, up front and in one line.

The cases are crafted files; each is run through both ``read_header`` and the installed loader
(``safe_open``, and ``load_file`` as transformers uses it): parity is the point. A file we pass and the
loader refuses fails late, at verification, with the loader's message; a file we refuse and the loader
passes is a valid checkpoint normswap cannot convert.
"""

from __future__ import annotations

import copy
import json
import math
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from normswap.errors import SourceError
from normswap.io.safetensors_file import DTYPES, header_bytes, read_header, read_safetensors_file
from normswap.io.shard_writer import save_state_dict, write_small

A16 = '{"dtype":"F32","shape":[4],"data_offsets":[0,16]}'  # 16 bytes at 0


def with_a16(text: str) -> str:
    """``text`` with each ``A16`` replaced by a valid 16-byte tensor entry: JSON braces make format strings noisy."""
    return text.replace("A16", A16)


def tensor(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def blob(header: str | bytes | dict, data: int | bytes = 0, length: int | None = None) -> bytes:
    """A safetensors file: a dict header is written compactly and space-padded to 8 bytes, as save_file does;
    a str or bytes header is written as it is. ``data`` is the data region, or its size in zero bytes."""
    if isinstance(header, dict):
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
    else:
        raw = header.encode() if isinstance(header, str) else header
    payload = bytes(data) if isinstance(data, int) else data
    return struct.pack("<Q", len(raw) if length is None else length) + raw + payload


def with_extra(value: str) -> bytes:
    """A valid one-tensor file whose tensor has an extra field: the loader ignores it, but parses it as JSON."""
    return blob('{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16],"x":' + value + "}}", 16)


def loader_accepts(path: Path) -> bool:
    """Whether ``safe_open`` opens the file: it validates the whole header and the file size, reading no tensor."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except SafetensorError:
        return False
    return True


def write(tmp_path: Path, data: bytes, name: str = "model.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refused_by_us(path: Path) -> str:
    with pytest.raises(SourceError) as caught:
        read_header(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message, message
    return message


# (file, a fragment of our message). The loader refuses every one of them.
REFUSED = [
    pytest.param(b"\0" * 5, "too short", id="file-under-8-bytes"),
    pytest.param(b"", "too short", id="empty-file"),
    pytest.param(blob({"a": tensor("F32", [4], 0, 16)}, 16, length=1000), "1000-byte header", id="length-past-eof"),
    pytest.param(blob({"a": tensor("F32", [4], 0, 16)}, 16, length=100_000_001), "limit", id="length-over-100MB"),
    pytest.param(blob(b"", 16), "not JSON", id="header-length-0"),
    pytest.param(blob(b"        "), "not JSON", id="header-only-spaces"),
    pytest.param(blob(b'{"\xff":1}'), "not UTF-8", id="not-utf8"),
    pytest.param(blob(with_a16('{"a":A16}').encode("utf-16"), 16), "not UTF-8", id="utf16"),
    pytest.param(blob(b"\xef\xbb\xbf{\"a\":" + A16.encode() + b"}", 16), "not JSON", id="utf8-bom"),
    pytest.param(blob(with_a16('{"a":A16,}'), 16), "not JSON", id="trailing-comma"),
    pytest.param(blob(with_a16('{"a":A16}\0'), 16), "not JSON", id="nul-after-json"),
    pytest.param(blob(with_a16('{"a":A16}//'), 16), "not JSON", id="comment-after-json"),
    pytest.param(blob(with_a16('{"a":\fA16}'), 16), "not JSON", id="formfeed-whitespace"),
    pytest.param(with_extra("NaN"), "not JSON", id="nan"),
    pytest.param(with_extra("-Infinity"), "not JSON", id="infinity"),
    pytest.param(with_extra("1e999"), "out of range", id="float-out-of-range"),
    pytest.param(with_extra("1" * 310), "out of range", id="int-out-of-f64-range"),
    pytest.param(with_extra("1" * 5000), "out of range", id="int-over-python-digit-limit"),
    pytest.param(with_extra("01"), "not JSON", id="leading-zero"),
    pytest.param(with_extra('"\\ud800"'), "surrogate", id="lone-high-surrogate"),
    pytest.param(with_extra('"\\udc00"'), "surrogate", id="lone-low-surrogate"),
    pytest.param(with_extra('"\\ude00\\ud83d"'), "surrogate", id="reversed-surrogate-pair"),
    pytest.param(blob(with_a16('{"\\ud800":A16}'), 16), "surrogate", id="surrogate-in-tensor-name"),
    pytest.param(with_extra('"a\tb"'), "not JSON", id="raw-control-character"),
    pytest.param(with_extra("[" * 126 + "]" * 126), "127 levels", id="nested-128-deep"),
    pytest.param(with_extra('{"k":' * 126 + "1" + "}" * 126), "127 levels", id="objects-nested-128-deep"),
    pytest.param(blob('{"a":' + "[" * 100_000), "not JSON", id="nesting-bomb-unclosed"),
    pytest.param(blob('{"a":' + "[" * 100_000 + "]" * 100_000 + "}"), "127 levels", id="nesting-bomb-closed"),
    pytest.param(blob('[1,2]'), "not a JSON object", id="array-header"),
    pytest.param(blob('null'), "not a JSON object", id="null-header"),
    pytest.param(blob('"abc"'), "not a JSON object", id="string-header"),
    pytest.param(blob('{"a":null}', 16), "not a {dtype", id="tensor-null"),
    pytest.param(blob('{"a":"F32"}', 16), "not a {dtype", id="tensor-string"),
    pytest.param(blob('{"a":["F32",[4]]}', 16), "not a {dtype", id="tensor-2-list"),
    pytest.param(blob('{"a":["F32",[4],[0,16],1]}', 16), "not a {dtype", id="tensor-4-list"),
    pytest.param(blob('{"a":{"shape":[4],"data_offsets":[0,16]}}', 16), "has no dtype", id="missing-dtype"),
    pytest.param(blob('{"a":{"dtype":"F32","shape":[4]}}', 16), "has no data_offsets", id="missing-offsets"),
    pytest.param(blob('{"a":{"dtype":"F32","dtype":"F32","shape":[4],"data_offsets":[0,16]}}', 16),
                 "two 'dtype' fields", id="duplicate-dtype-field"),
    pytest.param(blob('{"a":{"dtype":"F32","shape":[4],"shape":[4],"data_offsets":[0,16]}}', 16),
                 "two 'shape' fields", id="duplicate-shape-field"),
    pytest.param(blob(with_a16('{"__metadata__":{},"__metadata__":{},"a":A16}'), 16), "two __metadata__",
                 id="duplicate-metadata"),
    pytest.param(blob(with_a16('{"__metadata__":{"x":1},"a":A16}'), 16), "map of strings", id="metadata-int-value"),
    pytest.param(blob(with_a16('{"__metadata__":{"x":null},"a":A16}'), 16), "map of strings", id="metadata-null-value"),
    pytest.param(blob(with_a16('{"__metadata__":{"x":{"y":"z"}},"a":A16}'), 16), "map of strings",
                 id="metadata-nested"),
    pytest.param(blob(with_a16('{"__metadata__":["x"],"a":A16}'), 16), "map of strings", id="metadata-list"),
    pytest.param(blob(with_a16('{"__metadata__":"x","a":A16}'), 16), "map of strings", id="metadata-string"),
    pytest.param(blob(with_a16('{"__metadata__":{"x":1,"x":"2"},"a":A16}'), 16), "map of strings",
                 id="metadata-duplicate-key-first-invalid"),
    pytest.param(blob({"a": tensor("F33", [4], 0, 16)}, 16), "no known dtype", id="unknown-dtype"),
    pytest.param(blob({"a": tensor("f32", [4], 0, 16)}, 16), "no known dtype", id="lowercase-dtype"),
    pytest.param(blob({"a": tensor("I4", [4], 0, 2)}, 2), "no known dtype", id="dtype-I4"),
    pytest.param(blob('{"a":{"dtype":1,"shape":[4],"data_offsets":[0,16]}}', 16), "no known dtype", id="dtype-int"),
    pytest.param(blob('{"a":{"dtype":["F32"],"shape":[4],"data_offsets":[0,16]}}', 16), "no known dtype",
                 id="dtype-list"),
    pytest.param(blob('{"a":{"dtype":{"F32":null,"F16":null},"shape":[4],"data_offsets":[0,16]}}', 16),
                 "no known dtype", id="dtype-map-2-keys"),
    pytest.param(blob('{"a":{"dtype":{"F32":1},"shape":[4],"data_offsets":[0,16]}}', 16), "no known dtype",
                 id="dtype-map-non-null"),
    pytest.param(blob('{"a":{"dtype":"F32","shape":[4.0],"data_offsets":[0,16]}}', 16), "malformed",
                 id="shape-float"),
    pytest.param(blob('{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', 4), "malformed",
                 id="shape-bool"),
    pytest.param(blob('{"a":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}}', 16), "malformed",
                 id="shape-negative"),
    pytest.param(blob('{"a":{"dtype":"F32","shape":[-0,4],"data_offsets":[0,0]}}'), "malformed",
                 id="shape-minus-zero"),
    pytest.param(blob('{"a":{"dtype":"F32","shape":4,"data_offsets":[0,16]}}', 16), "malformed", id="shape-int"),
    pytest.param(blob('{"a":{"dtype":"F32","shape":{"0":4},"data_offsets":[0,16]}}', 16), "malformed",
                 id="shape-object"),
    pytest.param(blob('{"a":{"dtype":"F32","shape":null,"data_offsets":[0,16]}}', 16), "malformed",
                 id="shape-null"),
    pytest.param(blob('{"a":{"dtype":"F32","shape":[18446744073709551616,0],"data_offsets":[0,0]}}'), "malformed",
                 id="dimension-2**64"),
    pytest.param(blob('{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16.0]}}', 16), "malformed",
                 id="offset-float"),
    pytest.param(blob('{"a":{"dtype":"F32","shape":[4],"data_offsets":[-0,16]}}', 16), "malformed",
                 id="offset-minus-zero"),
    pytest.param(blob('{"a":{"dtype":"F32","shape":[1],"data_offsets":[false,true]}}', 4), "malformed",
                 id="offset-bool"),
    pytest.param(blob('{"a":{"dtype":"F32","shape":[4],"data_offsets":["0",16]}}', 16), "malformed",
                 id="offset-string"),
    pytest.param(blob('{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16,16]}}', 16), "malformed",
                 id="offsets-3"),
    pytest.param(blob('{"a":{"dtype":"F32","shape":[4],"data_offsets":{"0":0,"1":16}}}', 16), "malformed",
                 id="offsets-object"),
    pytest.param(blob('{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,18446744073709551616]}}', 16),
                 "malformed", id="offset-2**64"),
    pytest.param(blob({"a": tensor("F32", [2**32, 2**32, 0], 0, 0)}), "overflows", id="shape-overflow-before-0"),
    pytest.param(blob({"a": tensor("U8", [2**61], 0, 2**61)}), "overflows", id="size-in-bits-overflow"),
    pytest.param(blob({"a": tensor("F32", [2**59], 0, 2**61)}), "overflows", id="size-overflow-f32"),
    pytest.param(blob({"a": tensor("F32", [4], 0, 20)}, 20), "lies about offsets", id="size-mismatch"),
    pytest.param(blob({"a": tensor("F32", [4], 16, 0)}, 16), "lies about offsets", id="end-before-begin"),
    pytest.param(blob({"a": tensor("F32", [4], 0, 16), "b": tensor("F32", [4], 32, 48)}, 48),
                 "'b' starts at data byte 32, but 'a' before it ends at 16, leaving a gap", id="gap-between-tensors"),
    pytest.param(blob({"a": tensor("F32", [4], 0, 16), "b": tensor("F32", [4], 8, 24)}, 24), "overlapping",
                 id="overlap"),
    pytest.param(blob({"a": tensor("F32", [4], 0, 16), "b": tensor("F32", [4], 0, 16)}, 16), "overlapping",
                 id="same-offsets"),
    pytest.param(blob({"a": tensor("F32", [4], 8, 24)}, 24), "must start at 0", id="first-not-at-0"),
    pytest.param(blob({"a": tensor("F32", [4], 0, 16), "z": tensor("F32", [0], 32, 32)}, 16), "leaving a gap",
                 id="zero-size-past-the-end"),
    pytest.param(blob({"a": tensor("F32", [4], 0, 16), "z": tensor("F32", [0], 8, 8)}, 16), "overlapping",
                 id="zero-size-inside-a-tensor"),
    pytest.param(blob(with_a16('{"a":null,"a":A16}'), 16), "not a {dtype", id="duplicate-name-first-null"),
    pytest.param(blob(with_a16('{"a":{"dtype":"F99","shape":[4],"data_offsets":[0,16]},"a":A16}'), 16),
                 "no known dtype", id="duplicate-name-first-bad-dtype"),
    pytest.param(blob(with_a16('{"a":A16,"a":{"dtype":"F32","shape":[4],"data_offsets":[0,99]}}'), 16),
                 "lies about offsets", id="duplicate-name-last-bad-size"),
    pytest.param(blob({"a": tensor("F32", [4], 0, 16)}, 17), "1 byte after", id="one-trailing-byte"),
    pytest.param(blob({"a": tensor("F32", [4], 0, 16)}, 24), "8 bytes after", id="eight-trailing-bytes"),
    pytest.param(blob({}, 8), "lists no tensors", id="no-tensors-trailing-bytes"),
    pytest.param(blob({"a": tensor("F32", [4], 0, 16)}, 15), "truncated mid-tensor", id="truncated-mid-tensor"),
    pytest.param(blob({"a": tensor("F32", [4], 0, 16), "b": tensor("F32", [4], 16, 32)}, 20),
                 "'b' ends at byte", id="truncated-second-tensor"),
]

# Valid files both accept: none is refused by us, none by the loader.
ACCEPTED = [
    pytest.param(blob({"a": tensor("F32", [4], 0, 16)}, 16), id="plain"),
    pytest.param(blob({}), id="no-tensors"),
    pytest.param(blob("{}"), id="no-tensors-unpadded"),
    pytest.param(blob(with_a16('{"a":A16}'), 16), id="header-length-not-a-multiple-of-8"),
    pytest.param(blob(with_a16('{"a":A16}       '), 16), id="header-padded-with-spaces"),
    pytest.param(blob(with_a16(' \n\t\r{"a":A16}\r\n\t '), 16), id="json-whitespace-around"),
    pytest.param(blob({"a": tensor("F32", [], 0, 4)}, 4), id="scalar"),
    pytest.param(blob({"a": tensor("I8", [3], 0, 3), "b": tensor("F64", [2], 3, 19)}, 19), id="misaligned-offsets"),
    pytest.param(blob({"z": tensor("F32", [0], 0, 0), "a": tensor("F32", [4], 0, 16)}, 16), id="zero-size-first"),
    pytest.param(blob({"a": tensor("F32", [4], 0, 16), "z": tensor("BF16", [3, 0], 16, 16),
                       "b": tensor("I8", [2], 16, 18)}, 18), id="zero-size-between"),
    pytest.param(blob({"a": tensor("F32", [4], 0, 16), "z": tensor("F32", [0], 16, 16),
                       "y": tensor("I64", [0, 5], 16, 16)}, 16), id="zero-size-last-twice"),
    pytest.param(blob({"z": tensor("F32", [0, 2**40, 2**20], 0, 0)}), id="zero-size-with-big-dims"),
    pytest.param(blob({"z": tensor("F32", [0], 0, 0)}), id="only-zero-size"),
    pytest.param(blob({"b": tensor("F32", [4], 16, 32), "a": tensor("F32", [4], 0, 16)}, 32),
                 id="header-order-not-offset-order"),
    pytest.param(blob({"__metadata__": None, "a": tensor("F32", [4], 0, 16)}, 16), id="metadata-null"),
    pytest.param(blob({"__metadata__": {}, "a": tensor("F32", [4], 0, 16)}, 16), id="metadata-empty"),
    pytest.param(blob(with_a16('{"__metadata__":{"x":"1","x":"2"},"a":A16}'), 16), id="metadata-duplicate-keys"),
    pytest.param(blob(with_a16('{"\\u005f_metadata__":{"x":"y"},"\\u00e9":A16}'), 16), id="escaped-keys"),
    pytest.param(blob('{"a":{"\\u0064type":"\\u0046\\u0033\\u0032","shape":[ 4 ],"data_offsets":[ 0 , 16 ]}}', 16),
                 id="escaped-field-and-dtype"),
    pytest.param(blob(with_a16('{"":A16}'), 16), id="empty-tensor-name"),
    pytest.param(blob(with_a16('{"a\\nb\\u0000":A16}'), 16), id="escaped-control-characters-in-name"),
    pytest.param(blob({"format": tensor("F32", [4], 0, 16)}, 16), id="tensor-named-format"),
    pytest.param(with_extra('[1,{"q":null,"q":true},"s",-0,-5,0.5]'), id="extra-field"),
    pytest.param(with_extra("18446744073709551616"), id="extra-int-beyond-u64"),
    pytest.param(with_extra("-9223372036854775809"), id="extra-int-beyond-i64"),
    pytest.param(with_extra("1" * 309), id="extra-int-309-digits"),
    pytest.param(with_extra("1.7976931348623157e308"), id="extra-largest-float"),
    pytest.param(with_extra("1e-999"), id="extra-underflowing-float"),
    pytest.param(with_extra('"\\ud83d\\ude00 \\\\ud800"'), id="extra-surrogate-pair-and-escaped-backslash"),
    pytest.param(with_extra('"\x7f\u2028"'), id="extra-del-and-line-separator"),
    pytest.param(with_extra("[" * 125 + "]" * 125), id="nested-127-deep"),
    pytest.param(with_extra('{"k":' * 125 + "1" + "}" * 125), id="objects-nested-127-deep"),
    pytest.param(with_extra('"[[[[{{{{"'), id="brackets-in-strings"),
    pytest.param(blob(with_a16('{"a":A16,"a":A16}'), 16), id="duplicate-name"),
    pytest.param(blob(with_a16('{"a":{"dtype":"F32","shape":[5],"data_offsets":[0,99]},"a":A16}'), 16),
                 id="duplicate-name-last-wins"),
    pytest.param(blob('{"a":["F32",[4],[0,16]]}', 16), id="tensor-as-3-list"),
    pytest.param(blob('{"a":[{"F32":null},[4],[0,16]]}', 16), id="tensor-as-3-list-dtype-as-map"),
    pytest.param(blob('{"a":{"dtype":{"F32":null},"shape":[4],"data_offsets":[0,16]}}', 16), id="dtype-as-map"),
    *(pytest.param(blob({name: tensor(name, [2], 0, 2 * dtype.itemsize)}, 2 * dtype.itemsize), id=f"dtype-{name}")
      for name, dtype in DTYPES.items()),
]

# Files the loader opens that normswap refuses on purpose: dtypes it does not convert, and shapes torch
# cannot hold (load_file fails on those too, later).
NORMSWAP_REFUSES = [
    pytest.param(blob({"a": tensor("U16", [4], 0, 8)}, 8), "normswap does not handle", id="U16"),
    pytest.param(blob({"a": tensor("U32", [4], 0, 16)}, 16), "normswap does not handle", id="U32"),
    pytest.param(blob({"a": tensor("U64", [2], 0, 16)}, 16), "normswap does not handle", id="U64"),
    pytest.param(blob({"a": tensor("C64", [2], 0, 16)}, 16), "normswap does not handle", id="C64"),
    pytest.param(blob({"a": tensor("F8_E8M0", [4], 0, 4)}, 4), "normswap does not handle", id="F8_E8M0"),
    pytest.param(blob({"a": tensor("F8_E4M3FNUZ", [4], 0, 4)}, 4), "normswap does not handle", id="F8_E4M3FNUZ"),
    pytest.param(blob({"a": tensor("F4", [4], 0, 2)}, 2), "normswap does not handle", id="F4"),
    pytest.param(blob({"a": tensor("F32", [2**63, 0], 0, 0)}), "torch cannot hold", id="dimension-2**63"),
    pytest.param(blob({"a": tensor("F32", [0, 2**32, 2**32], 0, 0)}), "torch cannot hold", id="stride-2**64"),
]


@pytest.mark.parametrize(("data", "fragment"), REFUSED)
def test_refused_like_the_loader(tmp_path: Path, data: bytes, fragment: str) -> None:
    path = write(tmp_path, data)
    assert fragment in refused_by_us(path)
    assert not loader_accepts(path)
    with pytest.raises(Exception):  # noqa: B017 - the loader's own error types vary with the case
        load_file(str(path))


@pytest.mark.parametrize("data", ACCEPTED)
def test_accepted_like_the_loader(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path, data)
    assert loader_accepts(path)
    read_header(path)
    same_tensors(read_safetensors_file(path), load_file(str(path)))


@pytest.mark.parametrize(("data", "fragment"), NORMSWAP_REFUSES)
def test_refused_by_normswap_only(tmp_path: Path, data: bytes, fragment: str) -> None:
    path = write(tmp_path, data)
    assert fragment in refused_by_us(path)
    assert loader_accepts(path)


def test_nesting_bomb_is_one_line_not_recursion_error(tmp_path: Path) -> None:
    for header in ['{"a":' + "[" * 100_000, '{"a":' + "[" * 100_000 + "]" * 100_000 + "}",
                   '{"a":' + '{"k":' * 100_000 + "1" + "}" * 100_001]:
        refused_by_us(write(tmp_path, blob(header)))


def same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)  # the order of zero-size tensors at one offset is arbitrary
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape, name
        assert torch.equal(as_bytes(ours[name]), as_bytes(tensor)), name


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 5, generator=generator),
        "h": torch.randn(7, generator=generator).half(),
        "b": torch.randn(2, 3, generator=generator).bfloat16(),
        "d": torch.randn(2, generator=generator).double(),
        "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "q": torch.arange(-3, 2, dtype=torch.int8),
        "m": torch.tensor([True, False, True]),
        "e": torch.zeros(0, 4),
        "s": torch.tensor(2.5),
        "f8": torch.linspace(-1, 1, 4).to(torch.float8_e4m3fn),
    }


def test_files_written_by_save_file_and_normswap_pass(tmp_path: Path) -> None:
    tensors = sample_tensors()
    save_file(tensors, str(tmp_path / "saved.safetensors"), {"format": "pt", "note": "x" * 1000})
    write_small(tmp_path / "small.safetensors", tensors, {"normswap": "1"})
    (tmp_path / "shards").mkdir()
    save_state_dict(tmp_path / "shards", tensors, max_bytes=40)
    files = [tmp_path / "saved.safetensors", tmp_path / "small.safetensors",
             *sorted((tmp_path / "shards").glob("*.safetensors"))]
    assert len(files) > 3
    for file in files:
        assert loader_accepts(file)
        entries = read_header(file)
        same_tensors(read_safetensors_file(file), load_file(str(file)))
        assert set(entries) <= set(tensors)
    for name, tensor in read_safetensors_file(tmp_path / "small.safetensors").items():
        assert torch.equal(as_bytes(tensor), as_bytes(tensors[name]))


def test_header_bytes_layout_passes(tmp_path: Path) -> None:
    entries = {f"t{i}": (dtype, (i % 3, 2)) for i, dtype in enumerate(DTYPES.values())}
    header, offsets = header_bytes(entries, {"format": "pt"})
    size = max(end for _, end in offsets.values())
    path = write(tmp_path, header + bytes(size))
    assert loader_accepts(path)
    assert {name: (entry.begin - len(header), entry.end - len(header))
            for name, entry in read_header(path).items()} == offsets


def test_read_safetensors_file_on_a_valid_file(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "normswap_carried.safetensors"
    write_small(path, tensors, {})
    loaded = read_safetensors_file(path)
    assert list(loaded) == list(tensors)  # write_small writes in order, offsets follow it
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(as_bytes(loaded[name]), as_bytes(tensor))


@pytest.mark.parametrize("damage", ["truncate", "gap", "garbage-header", "append", "missing"])
def test_read_safetensors_file_on_a_corrupt_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "normswap_carried.safetensors"
    write_small(path, {"a.weight": torch.ones(4), "b.weight": torch.zeros(2, 2)}, {})
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    if damage == "truncate":
        path.write_bytes(data[:-3])
    elif damage == "gap":
        header["b.weight"]["data_offsets"] = [32, 48]
        path.write_bytes(blob(header, data[8 + length:] + bytes(16)))
    elif damage == "garbage-header":
        path.write_bytes(data[:8] + b"\x00" * length + data[8 + length:])
    elif damage == "append":
        path.write_bytes(data + b"\n")
    else:
        path.unlink()
    with pytest.raises(SourceError) as caught:
        read_safetensors_file(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    if damage != "missing":
        assert not loader_accepts(path)


def mutate(header: dict, rng: random.Random) -> tuple[dict, int]:
    """One or two random edits of a valid header (offsets shifted, shapes and dtypes changed, entries dropped,
    duplicated or swapped; some edits keep it valid), and a change of the data size (mostly none)."""
    header = copy.deepcopy(header)
    names = [name for name in header if name != "__metadata__"]
    boundaries = sorted({n for name in names for n in header[name]["data_offsets"]})
    for _ in range(rng.choice((1, 1, 2))):
        name = rng.choice(names)
        entry = header.get(name)
        if entry is None or not (isinstance(entry["shape"], list) and isinstance(entry["data_offsets"], list)
                                 and len(entry["data_offsets"]) == 2):
            continue  # dropped, or already broken by the first edit
        kind = rng.randrange(12)
        if kind == 0:  # shift one offset, or both
            which = rng.choice(([0], [1], [0, 1]))
            delta = rng.choice((-8, -4, -2, -1, 1, 2, 4, 8, 16))
            for index in which:
                entry["data_offsets"][index] = max(0, entry["data_offsets"][index] + delta)
        elif kind == 1 and entry["shape"]:  # change one dimension
            index = rng.randrange(len(entry["shape"]))
            entry["shape"][index] = rng.choice((0, 1, entry["shape"][index] + 1, max(0, entry["shape"][index] - 1)))
        elif kind == 2:  # add or drop a dimension
            if entry["shape"] and rng.random() < 0.5:
                entry["shape"].pop()
            else:
                entry["shape"].append(rng.choice((0, 1, 2)))
        elif kind == 3:  # another dtype: one normswap handles, or a name nobody knows
            entry["dtype"] = rng.choice([*DTYPES, "F33", "f32", "INT4"])
        elif kind == 4:
            del header[name]
        elif kind == 5:  # swap the offsets of two tensors
            other = header.get(rng.choice(names))
            if other is not None:
                entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
        elif kind == 6:  # a zero-size tensor at a tensor boundary (valid) or elsewhere
            at = rng.choice([*boundaries, 4, 10_000])
            header[f"{name}.empty"] = tensor(rng.choice(list(DTYPES)), rng.choice(([0], [3, 0], [0, 0, 7])), at, at)
        elif kind == 7:  # a copy at the same or another place
            at = rng.choice((0, 16, entry["data_offsets"][1]))
            size = entry["data_offsets"][1] - entry["data_offsets"][0]
            header[f"{name}.copy"] = {**copy.deepcopy(entry), "data_offsets": [at, at + size]}
        elif kind == 8:  # offsets or shape of a wrong type
            entry[rng.choice(("shape", "data_offsets"))] = rng.choice(([1.0], [True], [-1], None, [0, 0, 0], "4"))
        elif kind == 9:  # the same elements in another shape (valid)
            entry["shape"] = rng.choice(([math.prod(entry["shape"])], entry["shape"][::-1], [*entry["shape"], 1]))
        elif kind == 10:  # another dtype of the same size (valid)
            size = DTYPES[entry["dtype"]].itemsize if entry["dtype"] in DTYPES else 0
            entry["dtype"] = rng.choice([n for n, d in DTYPES.items() if d.itemsize == size] or [entry["dtype"]])
        else:  # fields the loader ignores, other metadata, another key order (valid)
            entry[rng.choice(("x", "__metadata__", "offsets"))] = rng.choice((1, "s", [1, {"k": None}], -0.5))
            header["__metadata__"] = rng.choice(({"format": "pt", "k": "v"}, {}, None))
            items = list(header.items())
            rng.shuffle(items)
            header = dict(items)
    return header, rng.choice((0,) * 8 + (-1, 1, 4, -16))


def test_fuzzed_headers_accepted_exactly_when_the_loader_accepts(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    save_file(sample_tensors(), str(tmp_path / "base.safetensors"), {"format": "pt"})
    data = (tmp_path / "base.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    base, payload = json.loads(data[8:8 + length]), data[8 + length:]
    outcomes = {True: 0, False: 0}
    for case in range(400):
        header, resize = mutate(base, rng)
        body = payload + bytes(max(resize, 0)) if resize >= 0 else payload[:resize]
        path = write(tmp_path, blob(header, body), f"case{case}.safetensors")
        theirs = loader_accepts(path)
        try:
            read_header(path)
            ours = True
        except SourceError as error:
            assert str(path) in str(error) and "\n" not in str(error)
            ours = False
        assert ours == theirs, (case, json.dumps(header), len(body), ours)
        if ours:
            same_tensors(read_safetensors_file(path), load_file(str(path)))
        outcomes[ours] += 1
        path.unlink()
    assert min(outcomes.values()) >= 40, outcomes  # both sides of the line are exercised


def test_fuzzed_header_bytes_accepted_exactly_when_the_loader_accepts(tmp_path: Path) -> None:
    """Edits of the header text itself, for the JSON parser's corners: numbers, escapes, nesting, whitespace."""
    rng = random.Random(7)
    text = with_a16('{"__metadata__":{"format":"pt"},"a":A16,"b":{"dtype":"I8","shape":[3],"data_offsets":[16,19]},'
                    '"z":{"dtype":"F16","shape":[0],"data_offsets":[19,19]}}')
    pieces = [*'{}[]",:0123456789-+.eE \\tnu/', "true", "false", "null", "\\ud800", "\\ude00", "NaN", "1e999",
              "-0", "F32", "dtype", "shape", "data_offsets", "__metadata__", "\t", "\n", "\x00", "\u00e9", "\ufeff"]
    accepted = 0
    for case in range(400):
        edited = text
        for _ in range(rng.choice((1, 1, 2, 3))):
            at = rng.randrange(len(edited) + 1)
            edited = rng.choice((edited[:at] + rng.choice(pieces) + edited[at:], edited[:at] + edited[at + 2:],
                                 edited[:at] + rng.choice(pieces) + edited[at + 1:]))
        path = write(tmp_path, blob(edited, rng.choice((19, 19, 19, 18, 20, 24))), f"case{case}.safetensors")
        try:
            read_header(path)
            ours = True
        except SourceError as error:
            assert str(path) in str(error) and "\n" not in str(error)
            ours = False
        assert ours == loader_accepts(path), (case, edited)
        accepted += ours
        path.unlink()
    assert accepted >= 3
