"""The fault and attack suite (issue 15): what an attacker or an unlucky user does to normswap.

Every refused case asserts the exit code, one ``Error:`` line naming the file or tensor (never a
traceback), nothing left beside DST, and SRC unchanged by checksum (names, link targets, modes, bytes).
Cases that need a process of their own (permissions without root's override, kills, signals, a file-size
limit, a terminal) are in ``test_faults_process.py``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from checksums import checksum
from fault_kit import edit_json, leftovers, opened_files, write_tiny_gpt2
from safetensors.torch import load_file, save_file

from normswap.cli import main
from normswap.io.scratch import MARKER, ScratchOwner, make_scratch

NORM_WEIGHT = "transformer.h.0.ln_1.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gpt2(tmp_path_factory.mktemp("pristine") / "gpt2")


@pytest.fixture
def src(pristine: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "p" / "src"
    shutil.copytree(pristine, folder)
    return folder


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--quiet"] if argv[0] != "inspect" else list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(capsys: pytest.CaptureFixture[str], source: Path, *argv: str, dst: Path | None = None) -> str:
    """Run, require exit 1 with one error line and no traceback, SRC unchanged, nothing left; the line."""
    before = checksum(source)
    code, _, err = run(capsys, *argv)
    assert code == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, err
    assert checksum(source) == before
    if dst is not None:
        assert leftovers(dst.parent) == []
    return lines[0]


def converted(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[str, str]:
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "Traceback" not in err
    return out, err


# --- data loss: --overwrite never removes a folder holding the source -----------------------------------------


@pytest.mark.parametrize("spelling", ["parent", "parent/", "parent/.", "src/..", "dot"])
def test_overwrite_never_deletes_a_folder_that_contains_src(src: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch, spelling: str) -> None:
    parent = src.parent
    (parent / "keep.txt").write_text("mine")
    if spelling == "dot":
        monkeypatch.chdir(parent)
        source, dst = "src", "."
    else:
        source = str(src)
        dst = {"parent": str(parent), "parent/": f"{parent}/", "parent/.": f"{parent}/.", "src/..": f"{src}/.."}[
            spelling]
    line = refused(capsys, src, "convert", source, dst, "--placement", "post", "--overwrite")
    assert f"{parent} contains the source checkpoint {src}" in line
    assert (parent / "keep.txt").read_text() == "mine" and (src / "config.json").is_file()


def test_overwrite_never_replaces_src_itself(src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for dst in (str(src), f"{src}/", f"{src}/."):
        line = refused(capsys, src, "convert", str(src), dst, "--norm", "rmsnorm", "--overwrite")
        assert f"{src} is the source checkpoint" in line


def test_a_link_to_the_parent_of_src_is_seen_through(src: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    link = tmp_path / "elsewhere"
    link.symlink_to(src.parent)
    line = refused(capsys, src, "convert", str(src), str(link), "--placement", "post", "--overwrite")
    assert "contains the source checkpoint" in line and src.parent.is_dir()


def test_overwrite_never_deletes_the_files_src_links_to(src: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A Hub-cache-like SRC whose weights are links into the very folder named as DST."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "config.json").write_text("{}")  # looks like a checkpoint folder, so --overwrite would take it
    shutil.move(src / "model.safetensors", blobs / "weights")
    (src / "model.safetensors").symlink_to(blobs / "weights")
    line = refused(capsys, src, "convert", str(src), str(blobs), "--placement", "post", "--overwrite")
    assert "links to" in line and "would delete the source's data" in line
    assert (blobs / "weights").is_file()


def test_overwrite_replaces_only_a_checkpoint_folder(src: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    line = refused(capsys, src, "convert", str(src), str(home), "--placement", "post", "--overwrite", dst=home)
    assert f"{home} is not a checkpoint folder (it holds thesis.tex)" in line
    assert (home / "thesis.tex").read_text() == "years of work"


def test_heal_never_deletes_either_source(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "q" / "converted"
    shutil.copytree(src, other)
    for original, student, dst in ((src, other, src.parent), (src, other, other.parent), (src, other, other),
                                   (src, other, src)):
        before = checksum(other)
        line = refused(capsys, src, "heal", str(original), str(student), str(dst), "--overwrite")
        assert "the source checkpoint" in line and str(dst) in line
        assert checksum(other) == before


# --- reading outside SRC ---------------------------------------------------------------------------------------


def _shard_in_two(source: Path, index_name: str = "model.safetensors.index.json") -> dict:
    tensors = load_file(str(source / "model.safetensors"))
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:5]}, str(source / "model-00001-of-00002.safetensors"), {"format": "pt"})
    save_file({k: tensors[k] for k in names[5:]}, str(source / "model-00002-of-00002.safetensors"), {"format": "pt"})
    (source / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors" if i < 5 else
                                            "model-00002-of-00002.safetensors" for i, k in enumerate(names)}}
    (source / index_name).write_text(json.dumps(index))
    return index


@pytest.mark.parametrize("shard", ["../OUTSIDE.safetensors", "ABSOLUTE", "/etc/passwd", "sub/../x.safetensors",
                                   "..\\x.safetensors", ".hidden.safetensors", "x.bin"])
def test_index_naming_a_file_outside_src_is_refused_before_any_shard_is_opened(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], shard: str) -> None:
    index = _shard_in_two(src)
    outside = src.parent / "OUTSIDE.safetensors"
    shutil.copy(src / "model-00002-of-00002.safetensors", outside)
    named = str(outside) if shard == "ABSOLUTE" else shard
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = named
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    before = checksum(src)
    with opened_files() as opened:
        code = main(["convert", str(src), str(tmp_path / "out"), "--placement", "post", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("Error:") == 1 and "Traceback" not in err
    assert checksum(src) == before and leftovers(tmp_path) == []
    assert f"names the shard {named!r} for {first!r}" in err and "fix the index" in err
    assert not [path for path in opened if path.endswith(("OUTSIDE.safetensors", "passwd"))]
    assert not [path for path in opened if path.endswith(".safetensors") and "model-0000" in path]


def test_bin_index_naming_a_file_outside_src_is_refused(src: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    tensors = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    torch.save(tensors, src / "pytorch_model.bin")
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {name: "../pytorch_model.bin" for name in tensors}}))
    shutil.copy(src / "pytorch_model.bin", src.parent / "pytorch_model.bin")
    line = refused(capsys, src, "convert", str(src), str(tmp_path / "out"), "--placement", "post")
    assert "'../pytorch_model.bin'" in line and "pytorch_model.bin.index.json" in line


def test_a_support_file_linking_outside_src_is_not_copied(src: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN PRIVATE KEY----- do not leak")
    (src / "tokenizer.json").rename(src / "real-tokenizer.json")
    (src / "tokenizer.json").symlink_to(secret)
    (src / "special_tokens_map.json").unlink(missing_ok=True)
    (src / "special_tokens_map.json").symlink_to("/etc/shadow")
    (src / "notes.txt").write_text("not a checkpoint file")
    out = tmp_path / "out"
    _, err = converted(capsys, "convert", str(src), str(out), "--placement", "post")
    assert f"not copying tokenizer.json: a link to {secret}, outside the checkpoint" in err
    assert not (out / "tokenizer.json").exists() and not (out / "special_tokens_map.json").exists()
    assert not (out / "notes.txt").exists()
    for file in out.rglob("*"):
        assert not file.is_file() or b"PRIVATE KEY" not in file.read_bytes()
    support = json.loads((out / "normswap_report.json").read_text())["support_files"]
    assert "tokenizer_config.json" in support["copied"]
    assert support["skipped"]["notes.txt"] == "not a checkpoint support file"
    assert support["skipped"]["tokenizer.json"].startswith("a link to")


def test_hub_cache_links_are_followed(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """models--x/snapshots/<rev>/file -> ../../blobs/<hash>, as huggingface_hub lays out its cache."""
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in src.iterdir():
        blob = repo / "blobs" / f"blob-{file.name}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    out = tmp_path / "out"
    converted(capsys, "convert", str(snapshot), str(out), "--placement", "post")
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert not (out / "tokenizer.json").is_symlink()


def test_a_symlink_loop_in_src_is_not_followed(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (src / "loop").symlink_to(src / "loop2")
    (src / "loop2").symlink_to(src / "loop")
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text("{}")
    (src / "1_Pooling" / "up").symlink_to(src)  # a folder link back to SRC: copying through it never ends
    (src / "modules.json").write_text(json.dumps([{"idx": 0, "name": "1", "path": "1_Pooling",
                                                   "type": "sentence_transformers.models.Pooling"}]))
    before = checksum(src)
    out = tmp_path / "out"
    converted(capsys, "convert", str(src), str(out), "--placement", "post")
    assert (out / "1_Pooling" / "config.json").is_file() and not (out / "1_Pooling" / "up").exists()
    assert not (out / "loop").exists() and checksum(src) == before


# --- NaN and Inf -----------------------------------------------------------------------------------------------


def _poison(source: Path, name: str, value: float) -> None:
    tensors = load_file(str(source / "model.safetensors"))
    tensors[name].view(-1)[3] = value
    save_file(tensors, str(source / "model.safetensors"), {"format": "pt"})


@pytest.mark.parametrize(("flags", "tensor"), [
    (("--placement", "post"), NORM_WEIGHT),
    (("--placement", "post"), "transformer.ln_f.bias"),
    (("--norm", "rmsnorm"), NORM_WEIGHT),
    (("--norm", "rmsnorm"), "transformer.ln_f.weight"),
    (("--placement", "post"), "transformer.h.1.mlp.c_fc.weight"),  # moved by no pass: found by verification
    (("--norm", "rmsnorm"), "transformer.wpe.weight"),
])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_values_are_refused_naming_the_tensor(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        flags: tuple[str, ...], tensor: str, value: float) -> None:
    _poison(src, tensor, value)
    out = tmp_path / "out"
    line = refused(capsys, src, "convert", str(src), str(out), *flags, dst=out)
    assert f"{tensor!r}" in line and "NaN/Inf" in line and "--allow-nonfinite" in line
    assert "please report" not in line and not out.exists()


def test_allowed_nonfinite_values_never_reach_a_report(src: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    _poison(src, NORM_WEIGHT, float("nan"))
    out = tmp_path / "out"
    printed, _ = converted(capsys, "convert", str(src), str(out), "--placement", "post", "--allow-nonfinite", "--json")

    def no_nan(constant: str) -> None:
        raise AssertionError(f"{constant} in a report")

    report = json.loads(printed, parse_constant=no_nan)["report"]
    assert report["verified"] is False and NORM_WEIGHT in report["reason"]
    written = json.loads((out / "normswap_report.json").read_text(), parse_constant=no_nan)
    assert written["verified"] is False
    assert "nan" not in (out / "README.md").read_text().lower().replace("nan/inf", "")


def test_the_python_api_refuses_nonfinite_weights(pristine: Path) -> None:
    from transformers import GPT2LMHeadModel

    import normswap

    model = GPT2LMHeadModel.from_pretrained(pristine)
    with torch.no_grad():
        model.transformer.h[1].ln_2.weight[0] = float("nan")
    with pytest.raises(normswap.SourceError, match=r"'transformer\.h\.1\.ln_2\.weight'.*NaN/Inf"):
        normswap.convert(model, "post")
    with pytest.raises(normswap.SourceError, match="NaN/Inf"):
        normswap.convert(model, norm="rmsnorm")
    assert normswap.convert(model, "post", allow_nonfinite=True) is not None


# --- leftovers of killed runs ----------------------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _leftover(destination: Path, kind: str, owner: ScratchOwner | None) -> Path:
    folder = destination.parent / f".{destination.name}.normswap-{kind}-{owner.pid if owner else 4242}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    if owner is not None:
        (folder / MARKER).write_text(owner.to_json())
    return folder


def test_leftovers_of_dead_processes_are_swept_and_reported(src: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    live = make_scratch(out, "probe")  # this process's own: alive
    mine = json.loads((live / MARKER).read_text())
    live.rename(tmp_path / ".out.normswap-tmp-live")
    dead = ScratchOwner(_dead_pid(), mine["host"], mine["boot_id"], None, str(out.resolve()))
    rebooted = ScratchOwner(1, mine["host"], "another-boot", None, str(out.resolve()))
    other_host = ScratchOwner(_dead_pid(), "some-other-host", None, None, str(out.resolve()))
    other_dst = ScratchOwner(_dead_pid(), mine["host"], mine["boot_id"], None, str(tmp_path / "elsewhere"))
    swept = [_leftover(out, kind, dead) for kind in ("tmp", "mirror", "old", "offload", "converted", "heal")]
    swept.append(_leftover(out, "heal", rebooted))
    nested = tmp_path / f"..out.normswap-converted-{dead.pid}.normswap-tmp-{dead.pid}"
    nested.mkdir()
    (nested / MARKER).write_text(ScratchOwner(dead.pid, dead.host, dead.boot_id, None,
                                              str(tmp_path / f".out.normswap-converted-{dead.pid}")).to_json())
    swept.append(nested)
    kept = [_leftover(out, "tmp", None), tmp_path / ".out.normswap-tmp-live"]
    kept.append(tmp_path / f".out.normswap-mirror-{other_host.pid}")
    kept[-1].mkdir()
    (kept[-1] / MARKER).write_text(other_host.to_json())
    kept.append(tmp_path / f".out.normswap-old-{other_dst.pid}")
    kept[-1].mkdir()
    (kept[-1] / MARKER).write_text(other_dst.to_json())
    _, err = converted(capsys, "convert", str(src), str(out), "--placement", "post")
    for folder in swept:
        assert not folder.exists(), folder
        assert f"removed {folder}" in err and "no longer running" in err
    for folder in kept:
        assert folder.exists(), folder
    assert (out / "config.json").is_file() and not (out / MARKER).exists()


# --- one line, never a traceback -------------------------------------------------------------------------------


def test_a_nesting_bomb_in_a_safetensors_header(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    header += b" " * (-len(header) % 8)
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    line = refused(capsys, src, "convert", str(src), str(tmp_path / "out"), "--placement", "post",
                   dst=tmp_path / "out")
    assert "model.safetensors" in line


def test_a_nesting_bomb_in_config_json(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (src / "config.json").write_text('{"model_type": "gpt2", "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    for argv in (("inspect", str(src)), ("convert", str(src), str(tmp_path / "out"), "--placement", "post")):
        assert "config.json" in refused(capsys, src, *argv)


def test_a_gap_between_tensors_is_caught_by_the_header_check(src: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    raw = (src / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    last = max((name for name in header if name != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
    header[last]["data_offsets"] = [offset + 8 for offset in header[last]["data_offsets"]]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length:] + b"\0" * 8)
    line = refused(capsys, src, "convert", str(src), str(tmp_path / "out"), "--placement", "post",
                   dst=tmp_path / "out")
    assert "model.safetensors" in line and repr(last) in line


def test_a_corrupt_carried_file(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (src / "normswap_carried.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not a header}  ")
    line = refused(capsys, src, "convert", str(src), str(tmp_path / "out"), "--placement", "post",
                   dst=tmp_path / "out")
    assert "normswap_carried.safetensors" in line


@pytest.mark.parametrize(("key", "value"), [("model_type", ["gpt2"]), ("architectures", [123]),
                                            ("architectures", "GPT2LMHeadModel"), ("model_type", 7)])
def test_config_values_of_the_wrong_json_type(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              key: str, value: object) -> None:
    edit_json(src / "config.json", **{key: value})
    for argv in (("inspect", str(src)), ("convert", str(src), str(tmp_path / "out"), "--placement", "post")):
        line = refused(capsys, src, *argv)
        assert "config.json" in line and key in line


def test_an_oversized_config_is_refused_before_it_is_read(src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with (src / "config.json").open("r+b") as handle:
        handle.seek(64 * 2**20)
        handle.write(b" ")
    with opened_files():
        line = refused(capsys, src, "inspect", str(src))
    assert "config.json" in line and "MiB" in line


@pytest.mark.parametrize("where", ["src", "dst"])
def test_names_that_are_not_utf8(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    if where == "src":
        shutil.copytree(src, odd)
        source, dst = odd, tmp_path / "out"
    else:
        source, dst = src, odd
    line = refused(capsys, source, "convert", str(source), str(dst), "--placement", "post")
    assert "not UTF-8" in line and "caf\\xe9" in line
    assert not leftovers(tmp_path) and (where == "src" or not dst.exists())


def test_disk_full_while_writing(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC from the kernel, injected at the shard writer's write (a real full tmpfs is in the process suite)."""
    import normswap.io.shard_writer as shard_writer

    def full(descriptor: int, data: object, *rest: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shard_writer.os, "pwrite", full)
    monkeypatch.setattr(shard_writer.os, "write", full)
    out = tmp_path / "out"
    line = refused(capsys, src, "convert", str(src), str(out), "--norm", "rmsnorm", dst=out)
    assert "no space left on device" in line.lower() and "free some space" in line
    assert not out.exists()


def test_an_unexpected_failure_is_one_line_and_debug_shows_the_traceback(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import normswap.conversion.checkpoint as checkpoint

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(checkpoint, "_plan", broken)
    out = tmp_path / "out"
    line = refused(capsys, src, "convert", str(src), str(out), "--placement", "post", dst=out)
    assert "internal error (ZeroDivisionError: a bug)" in line and "--debug" in line
    code = main(["convert", str(src), str(out), "--placement", "post", "--quiet", "--debug"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1] == line
    assert main(["--debug", "convert", str(src), str(out), "--placement", "post", "--quiet"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_missing_package_is_named_with_its_install_not_called_a_bug(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A model's code (or normswap's) that imports a package this environment lacks is the environment's fault;
    a missing module of normswap's own is still a bug."""
    import normswap.conversion.checkpoint as checkpoint

    def needs(name: str) -> object:
        def plan(*args: object, **kwargs: object) -> None:
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return plan

    out = tmp_path / "out"
    monkeypatch.setattr(checkpoint, "_plan", needs("causal_conv1d.cpp_functions"))
    line = refused(capsys, src, "convert", str(src), str(out), "--placement", "post", dst=out)
    assert "'causal_conv1d' is not installed" in line and "pip install causal_conv1d" in line
    assert "internal error" not in line and not out.exists()
    monkeypatch.setattr(checkpoint, "_plan", needs("normswap.gone"))
    line = refused(capsys, src, "convert", str(src), str(out), "--placement", "post", dst=out)
    assert "internal error (ModuleNotFoundError" in line


def test_an_interrupt_wrapped_by_python_is_an_interrupt(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.11 wraps a Ctrl-C that lands in a class body during an import: RuntimeError(__set_name__)."""
    import normswap.conversion.checkpoint as checkpoint

    def interrupted(*args: object, **kwargs: object) -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as error:
            raise RuntimeError("Error calling __set_name__ on '_Field' instance 'x' in 'Y'") from error

    monkeypatch.setattr(checkpoint, "_plan", interrupted)
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--placement", "post", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("Stopped by interrupt") and "Traceback" not in err
    assert leftovers(tmp_path) == [] and not out.exists()


def test_every_transformers_loading_call_passes_trust_remote_code() -> None:
    """Left unset, transformers prompts on a terminal (and runs the code on "y"): every call says what it wants."""
    import ast

    package = Path(__file__).parent.parent / "normswap"
    unset = []
    for file in package.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("from_pretrained", "from_config")
                    and not any(keyword.arg == "trust_remote_code" for keyword in node.keywords)):
                unset.append(f"{file.relative_to(package)}:{node.lineno}")
    assert unset == []


def test_heal_refuses_nonfinite_weights(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conversion = tmp_path / "converted"
    converted(capsys, "convert", str(src), str(conversion), "--norm", "rmsnorm")
    _poison(src, NORM_WEIGHT, float("nan"))
    healed = tmp_path / "healed"
    line = refused(capsys, src, "heal", str(src), str(conversion), str(healed), "--trust-remote-code", dst=healed)
    assert f"{src}: tensor {NORM_WEIGHT!r} has 1 NaN/Inf" in line and "healing would train on NaN" in line
    assert not healed.exists()


def test_a_scratch_folder_appears_only_with_its_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill between mkdir and the marker must not leave an unmarked folder under the scratch name (no run would
    remove it): the folder is made under a staging name and renamed once marked; an empty staging folder is swept."""
    import normswap.io.scratch as scratch

    destination = tmp_path / "out"

    def killed(folder: Path, destination: Path) -> None:
        raise KeyboardInterrupt  # stands for a SIGKILL right after mkdir

    monkeypatch.setattr(scratch, "mark", killed)
    with pytest.raises(KeyboardInterrupt):
        make_scratch(destination, "tmp")
    assert not scratch.scratch_path(destination, "tmp").exists()
    assert [path.name for path in tmp_path.iterdir()] == [f".out.normswap-staging-tmp-{os.getpid()}"]
    monkeypatch.undo()
    scratch.sweep_leftovers(destination)
    assert list(tmp_path.iterdir()) == []
    folder = make_scratch(destination, "tmp")
    assert (folder / MARKER).is_file() and folder == scratch.scratch_path(destination, "tmp")
