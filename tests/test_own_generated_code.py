"""A checkpoint normswap generated is inspected and converted without --trust-remote-code when its modeling file is
byte for byte what this normswap generates for it; normswap then runs its own copy, never the checkpoint's file.

Anything else (one byte off, a config that names another file or a path, a provenance normswap cannot plan
again) is refused in one line naming --trust-remote-code, and works with the flag (issue 17).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_rms_norm import perturbed

import normswap
from normswap.cli import main
from normswap.conversion.checkpoint import convert_checkpoint, model_class
from normswap.detect.source import load_config
from normswap.errors import SourceError

MODELING = "modeling_normswap_llama.py"


@pytest.fixture(scope="module")
def llama_post(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source, DST): a perturbed tiny Llama and its Post-Norm conversion, which ships generated code."""
    folder = tmp_path_factory.mktemp("llama")
    perturbed("llama", "LlamaForCausalLM").save_pretrained(folder / "source")
    assert main(["convert", str(folder / "source"), str(folder / "post"), "--placement", "post", "--quiet"]) == 0
    assert (folder / "post" / MODELING).is_file()
    return folder / "source", folder / "post"


def copy_of(dst: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(dst, tmp_path / "copy"))


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: ") and "--trust-remote-code" in lines[0]
    return lines[0]


def same_weights(a: Path, b: Path) -> bool:
    first, second = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return first.keys() == second.keys() and all(
        first[k].dtype == second[k].dtype and torch.equal(first[k], second[k]) for k in first)


def rewrite_config(folder: Path, change: dict) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}, indent=2))


def test_generated_checkpoint_inspects_and_converts_back_without_the_flag(
        llama_post: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, post = llama_post
    assert main(["inspect", str(post)]) == 0
    assert "normswap-llama" in capsys.readouterr().out
    assert normswap.inspect(str(post)).placement == "post"
    assert main(["convert", str(post), str(tmp_path / "back"), "--placement", "pre", "--quiet"]) == 0
    assert not (tmp_path / "back" / MODELING).exists()
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "llama"
    assert same_weights(source, tmp_path / "back")  # the round trip returns the original bit for bit


def test_one_byte_changed_needs_the_flag(llama_post: tuple[Path, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    edited = copy_of(llama_post[1], tmp_path)
    text = (edited / MODELING).read_bytes()
    middle = text.index(b"# ", len(text) // 2)
    (edited / MODELING).write_bytes(text[:middle] + b"#!" + text[middle + 2:])  # one byte of a comment
    line_number = text[:middle].count(b"\n") + 1
    assert main(["inspect", str(edited)]) == 1
    line = one_line_error(capsys)
    assert f"{MODELING} is not byte for byte the code this normswap generates for it" in line
    assert f"differs first on line {line_number}" in line
    assert main(["convert", str(edited), str(tmp_path / "back"), "--placement", "pre", "--quiet"]) == 1
    one_line_error(capsys)
    assert not (tmp_path / "back").exists()
    with pytest.raises(SourceError, match="not byte for byte"):
        normswap.inspect(str(edited))
    for command in (["inspect", str(edited)], ["convert", str(edited), str(tmp_path / "back"), "--placement", "pre",
                                               "--quiet"]):  # a fresh process: this one imported normswap's copy
        done = subprocess.run([sys.executable, "-m", "normswap", *command, "--trust-remote-code"],
                              capture_output=True, text=True, check=False, timeout=300)
        assert done.returncode == 0, done.stderr
    assert same_weights(llama_post[0], tmp_path / "back")


def test_a_differing_file_never_runs_without_the_flag(llama_post: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    edited = copy_of(llama_post[1], tmp_path)
    marker = tmp_path / "ran"
    with (edited / MODELING).open("a", encoding="utf-8") as file:
        file.write(f"\nopen({str(marker)!r}, 'w').close()\n")
    assert main(["inspect", str(edited)]) == 1
    assert "differs first on line" in one_line_error(capsys)
    assert not marker.exists()
    # this process imported normswap's own copy when it converted, which registered the model_type that the
    # edited file still claims: transformers would run that copy, so the flag is refused, loudly
    assert main(["inspect", str(edited), "--trust-remote-code"]) == 1
    refusal = capsys.readouterr().err.strip().splitlines()
    assert len(refusal) == 1 and "is not that code (edited after normswap wrote it?)" in refusal[0]
    assert not marker.exists()
    done = subprocess.run([sys.executable, "-m", "normswap", "inspect", str(edited), "--trust-remote-code"],
                          capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    assert marker.exists()  # in a fresh process, the same file runs when the user asks


def test_a_file_from_another_version_says_so(llama_post: tuple[Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    edited = copy_of(llama_post[1], tmp_path)
    text = (edited / MODELING).read_text(encoding="utf-8")
    (edited / MODELING).write_text(text.replace("# Generated by normswap ", "# Generated by normswap 0.0.1+", 1),
                                   encoding="utf-8")
    assert main(["inspect", str(edited)]) == 1
    line = one_line_error(capsys)
    assert "was generated by normswap 0.0.1+" in line and f"not by this normswap {normswap.__version__}" in line


@pytest.mark.parametrize(("name", "entry", "why"), [
    ("another file", "other_modeling.{cls}", "its auto_map names other_modeling.py, where this normswap generates "
                                             f"{MODELING}"),
    ("a path", f"sub/{MODELING[:-3]}.{{cls}}", "does not name a module file in the checkpoint folder"),
    ("a parent", f"../post/{MODELING[:-3]}.{{cls}}", "does not name a module file in the checkpoint folder"),
    ("another repository", f"someone/repo--{MODELING[:-3]}.{{cls}}", "does not name a module file"),
])
def test_a_config_that_names_another_file_is_refused(llama_post: tuple[Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str], name: str, entry: str,
                                                     why: str) -> None:
    edited = copy_of(llama_post[1], tmp_path)
    (edited / "sub").mkdir()
    for copy in (edited / "other_modeling.py", edited / "sub" / MODELING):  # the matching code, under other names
        shutil.copy(edited / MODELING, copy)
    auto_map = json.loads((edited / "config.json").read_text())["auto_map"]
    rewrite_config(edited, {"auto_map": {auto: entry.format(cls=target.rsplit(".", 1)[1])
                                         for auto, target in auto_map.items()}})
    assert main(["inspect", str(edited)]) == 1
    assert why in one_line_error(capsys)


def test_an_auto_map_entry_normswap_does_not_write_is_refused(llama_post: tuple[Path, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    edited = copy_of(llama_post[1], tmp_path)
    auto_map = json.loads((edited / "config.json").read_text())["auto_map"]
    rewrite_config(edited, {"auto_map": {**auto_map, "AutoModel": auto_map["AutoModelForCausalLM"]}})
    assert main(["inspect", str(edited)]) == 1
    assert "its auto_map or model_type is not what this normswap writes" in one_line_error(capsys)


@pytest.mark.parametrize(("provenance", "why"), [
    ({"conversion": "placement pre -> sideways"}, "which this normswap does not plan"),
    ({"source_model_type": "gpt99"}, "model_type 'gpt99'"),
    ({"source_model_type": None}, "does not name the source model type and the conversion"),
])
def test_a_provenance_normswap_cannot_plan_again_needs_the_flag(
        llama_post: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], provenance: dict,
        why: str) -> None:
    edited = copy_of(llama_post[1], tmp_path)
    block = json.loads((edited / "config.json").read_text())["normswap"]
    rewrite_config(edited, {"normswap": {**block, **provenance}})
    assert main(["inspect", str(edited)]) == 1
    line = one_line_error(capsys)
    assert "normswap cannot generate its code again to compare" in line and why in line
    assert main(["inspect", str(edited), "--trust-remote-code"]) == 0


def test_the_code_that_runs_is_normswaps_own_copy(llama_post: tuple[Path, Path]) -> None:
    post = llama_post[1].resolve()
    before = set(sys.modules)
    config = load_config(post)
    cls = model_class(config)
    assert cls.__name__ == "LlamaForCausalLM" and type(config).__name__ == "NormswapLlamaConfig"
    for module in (sys.modules[type(config).__module__], sys.modules[cls.__module__]):
        assert module.__name__.startswith("normswap_generated_")
        assert post not in Path(module.__file__).resolve().parents
    assert not [name for name in set(sys.modules) - before  # nothing was imported from DST
                if post in Path(getattr(sys.modules[name], "__file__", None) or "/").resolve().parents]


def test_converting_back_verifies_offloaded_without_the_flag(llama_post: tuple[Path, Path], tmp_path: Path) -> None:
    """The source is loaded a module at a time from disk, through normswap's own class too."""
    source, post = llama_post
    result = convert_checkpoint(post, tmp_path / "back", placement="pre", verify_max_size="0", verify_offloaded=True)
    assert result.report.to_dict()["output_cosine"] < 1.0  # measured, not skipped
    assert same_weights(source, tmp_path / "back")


def test_gpt2_round_trip_without_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    perturbed("gpt2", "GPT2LMHeadModel").save_pretrained(tmp_path / "source")
    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "post"), "--placement", "post", "--quiet"]) == 0
    assert (tmp_path / "post" / "modeling_normswap_gpt2.py").is_file()
    assert normswap.inspect(str(tmp_path / "post")).placement == "post"
    assert main(["convert", str(tmp_path / "post"), str(tmp_path / "back"), "--placement", "pre", "--quiet"]) == 0
    assert same_weights(tmp_path / "source", tmp_path / "back")


@pytest.mark.parametrize(("family", "class_name", "options", "kind"), [
    ("gpt2", "GPT2LMHeadModel", ["--norm", "rmsnorm"], "rmsnorm"),
    ("llama", "LlamaForCausalLM", ["--norm", "layernorm", "--exact"], "layernorm"),  # one dimension wider
    # its q_norm/k_norm read rms_norm_eps too: the field keeps its value, the stream norms' eps is in the code
    ("qwen3", "Qwen3ForCausalLM", ["--norm", "layernorm", "--exact", "--untie"], "layernorm"),
], ids=["gpt2-rmsnorm", "llama-layernorm-exact", "qwen3-layernorm-exact"])
def test_norm_kind_outputs_inspect_without_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    family: str, class_name: str, options: list[str],
                                                    kind: str) -> None:
    perturbed(family, class_name).save_pretrained(tmp_path / "source")
    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "dst"), *options, "--quiet"]) == 0
    capsys.readouterr()
    topology = normswap.inspect(str(tmp_path / "dst"))
    assert {norm.kind for norm in topology.stream_norms} == {kind}
    assert main(["inspect", str(tmp_path / "dst")]) == 0
