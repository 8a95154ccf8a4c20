"""The bad-input catalogue: each case is one line on stderr naming the file, tensor or key and the fix,
exit code 1, and nothing left behind (no DST, no temporary folder, SRC unchanged)."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from checksums import checksum
from safetensors.torch import load_file, save_file
from test_rms_norm import perturbed

from normswap.cli import main


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pristine") / "gpt2"
    perturbed("gpt2", "GPT2LMHeadModel").save_pretrained(folder)
    return folder


@pytest.fixture
def source(pristine: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    shutil.copytree(pristine, folder)
    return folder


def refused(source: Path, capsys: pytest.CaptureFixture[str], *flags: str, dst: Path | None = None) -> str:
    """Run convert, require exit 1, one error line, no DST and no temporary folder; return the line."""
    before = checksum(source)
    out = dst or source.parent / "out"
    code = main(["convert", str(source), str(out), "--quiet", *(flags or ("--norm", "rmsnorm"))])
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, err
    assert not out.exists() or out.is_file()
    assert not list(out.parent.glob(f".{out.name}.normswap-tmp-*"))
    assert checksum(source) == before
    return lines[0]


def shard(source: Path) -> Path:
    return source / "model.safetensors"


def rewrite_header(file: Path, edit: Callable[[dict], None]) -> None:
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length:])


def shard_into_two(source: Path) -> tuple[list[str], list[str]]:
    tensors = load_file(str(shard(source)))
    names = list(tensors)
    first, second = names[: len(names) // 2], names[len(names) // 2:]
    save_file({k: tensors[k] for k in first}, str(source / "model-00001-of-00002.safetensors"), {"format": "pt"})
    save_file({k: tensors[k] for k in second}, str(source / "model-00002-of-00002.safetensors"), {"format": "pt"})
    shard(source).unlink()
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in first},
                  **{k: "model-00002-of-00002.safetensors" for k in second}}
    (source / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return first, second


def test_missing_config(source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (source / "config.json").unlink()
    line = refused(source, capsys)
    assert "has no config.json" in line and str(source) in line


def test_config_that_is_not_json(source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (source / "config.json").write_text("{ not json")
    assert "config.json is not valid JSON (line 1" in refused(source, capsys)


def test_unknown_model_type(source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "gpt99"}))
    line = refused(source, capsys)
    assert "model_type 'gpt99'" in line and "--trust-remote-code" in line


def test_safetensors_truncated_mid_tensor(source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = shard(source).read_bytes()
    shard(source).write_bytes(data[: len(data) - 1000])
    line = refused(source, capsys)
    assert "model.safetensors: tensor" in line and "truncated mid-tensor" in line and "re-download" in line


def test_safetensors_header_lies_about_offsets(source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def lie(header: dict) -> None:
        header["transformer.h.0.attn.c_attn.weight"]["data_offsets"][1] += 4
    rewrite_header(shard(source), lie)
    line = refused(source, capsys)
    assert "'transformer.h.0.attn.c_attn.weight'" in line and "lies about offsets" in line


def test_index_names_a_missing_shard(source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shard_into_two(source)
    (source / "model-00002-of-00002.safetensors").unlink()
    line = refused(source, capsys)
    assert "model-00002-of-00002.safetensors" in line and "is missing" in line and "copy the missing shard" in line


def test_index_missing_a_needed_tensor(source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, second = shard_into_two(source)
    tensors = load_file(str(source / "model-00002-of-00002.safetensors"))
    dropped = second[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(source / "model-00002-of-00002.safetensors"),
              {"format": "pt"})
    index = json.loads((source / "model.safetensors.index.json").read_text())
    del index["weight_map"][dropped]
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    line = refused(source, capsys)
    assert f"has no tensor {dropped!r}" in line


def test_index_entry_whose_shard_lacks_the_tensor(source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shard_into_two(source)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    index["weight_map"]["transformer.h.9.mlp.c_fc.weight"] = "model-00001-of-00002.safetensors"
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    line = refused(source, capsys)
    assert "'transformer.h.9.mlp.c_fc.weight'" in line and "regenerate the index" in line


def test_extra_tensors_are_a_warning(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = load_file(str(shard(source)))
    save_file({**tensors, "stray.weight": torch.ones(3)}, str(shard(source)), {"format": "pt"})
    assert main(["convert", str(source), str(tmp_path / "out"), "--norm", "rmsnorm", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "ignoring 1 checkpoint tensor(s) the model does not use: stray.weight" in err
    assert "stray.weight" not in load_file(str(tmp_path / "out" / "model.safetensors"))


def test_tensor_shape_disagrees_with_config(source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "n_inner": 4 * config["n_embd"] + 8}))
    line = refused(source, capsys)
    assert "tensor 'transformer.h.0.mlp.c_fc" in line and "config.json implies" in line


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_in_a_computed_tensor(source: Path, tmp_path: Path, value: float,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    tensors = load_file(str(shard(source)))
    tensors["transformer.h.0.attn.c_proj.weight"][0, 0] = value  # an output projection: centred by --norm rmsnorm
    save_file(tensors, str(shard(source)), {"format": "pt"})
    line = refused(source, capsys)
    assert "'transformer.h.0.attn.c_proj.weight' has 1 NaN/Inf" in line and "--allow-nonfinite" in line
    assert main(["convert", str(source), str(tmp_path / "out"), "--norm", "rmsnorm", "--quiet",
                 "--allow-nonfinite", "--verify-max-size", "0"]) == 0


def test_destination_inside_source(source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = refused(source, capsys, dst=source / "converted")
    assert "is inside the source checkpoint" in line


def test_destination_is_a_file(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "taken"
    target.write_text("keep me")
    assert "is an existing file" in refused(source, capsys, dst=target)
    assert target.read_text() == "keep me"


def test_bin_that_is_not_a_pickle(source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shard(source).unlink()
    (source / "pytorch_model.bin").write_bytes(b"this is not a pickle at all" * 10)
    line = refused(source, capsys)
    assert "pytorch_model.bin is not a PyTorch zip/pickle file" in line


def test_bin_with_code_is_refused_by_weights_only(source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pickle

    shard(source).unlink()
    with (source / "pytorch_model.bin").open("wb") as handle:
        pickle.dump({"weight": Path("/")}, handle)  # an object weights_only=True must not rebuild
    line = refused(source, capsys)
    assert "pytorch_model.bin is not a PyTorch state dict normswap can read safely" in line


def test_low_disk_space_is_refused_with_the_numbers(source: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import normswap.io.destination as destination

    real = shutil.disk_usage
    monkeypatch.setattr(destination.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=1_000_000))
    line = refused(source, capsys)
    assert "the output needs" in line and "has only 1.0 MB free" in line
