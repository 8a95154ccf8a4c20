"""The command line: output on the real MiniLM checkpoint, exit codes, and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from normswap.cli import main

TESTS = Path(__file__).parent


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_real_minilm_table(capsys: pytest.CaptureFixture[str], minilm_path: Path) -> None:
    code, out, err = run_cli(capsys, "inspect", str(minilm_path))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "bert (BertModel): Post-Norm, LayerNorm (eps 1e-12), embedding norm, no final norm, 6 layers"
    rows = [line for line in lines if (line.split() and line.split()[0] in {"attention", "mlp"})
            or line.startswith("encoder.layer.")]
    assert len(rows) == 12  # 6 layers x 2 sublayers
    assert sum("attention.output.LayerNorm (layernorm)" in row for row in rows) == 6
    assert sum(" output.LayerNorm (layernorm)" in row for row in rows) == 6


def test_real_minilm_json(capsys: pytest.CaptureFixture[str], minilm_path: Path) -> None:
    code, out, _ = run_cli(capsys, "inspect", str(minilm_path), "--json")
    assert code == 0
    payload = json.loads(out)
    assert payload["model_type"] == "bert"
    assert payload["placement"] == "post" and payload["norm"] == "layernorm" and payload["eps"] == 1e-12
    assert payload["embedding_norm"] == "embeddings.LayerNorm" and payload["final_norm"] is None
    assert [layer["index"] for layer in payload["layers"]] == list(range(6))
    for layer in payload["layers"]:
        assert [(s["kind"], s["placement"]) for s in layer["sublayers"]] == [("attention", "post"), ("mlp", "post")]
        for sublayer in layer["sublayers"]:
            (norm,) = sublayer["norms"]
            assert norm["slot"] == "post" and norm["kind"] == "layernorm" and norm["eps"] == 1e-12
            assert norm["dim"] == 384


def test_config_json_path_works_like_the_folder(capsys: pytest.CaptureFixture[str], minilm_path: Path) -> None:
    _, from_folder, _ = run_cli(capsys, "inspect", str(minilm_path), "--json")
    _, from_file, _ = run_cli(capsys, "inspect", str(minilm_path / "config.json"), "--json")
    assert json.loads(from_folder) == json.loads(from_file)


def test_console_script_runs(minilm_path: Path) -> None:
    script = shutil.which("normswap", path=str(Path(sys.executable).parent))
    assert script, "the normswap console script is not installed"
    result = subprocess.run([script, "inspect", str(minilm_path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "Post-Norm, LayerNorm (eps 1e-12), embedding norm, no final norm, 6 layers" in result.stdout


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: ")
    return lines[0]


def test_folder_without_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    code, out, err = run_cli(capsys, "inspect", str(tmp_path))
    assert code == 1 and out == ""
    line = _one_line_error(err)
    assert f"{tmp_path} has no config.json (found: model.safetensors)" in line
    assert "point normswap at a Hugging Face checkpoint folder or at its config.json" in line


def test_config_that_is_not_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert",\n  hidden_size: 64}')
    code, _, err = run_cli(capsys, "inspect", str(tmp_path))
    assert code == 1
    line = _one_line_error(err)
    assert "config.json is not valid JSON (line 2, column 3" in line and "fix or regenerate" in line


def test_unknown_model_type(capsys: pytest.CaptureFixture[str], write_config: Any) -> None:
    code, _, err = run_cli(capsys, "inspect", str(write_config({"model_type": "llamaa", "hidden_size": 64})))
    assert code == 1
    line = _one_line_error(err)
    assert "model_type 'llamaa', which this transformers version does not know" in line
    assert "--trust-remote-code" in line


def test_missing_model_type(capsys: pytest.CaptureFixture[str], write_config: Any) -> None:
    code, _, err = run_cli(capsys, "inspect", str(write_config({"hidden_size": 64})))
    assert code == 1
    assert "has no 'model_type' key" in _one_line_error(err)


def test_missing_source(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "nope"))
    assert code == 1
    assert "does not exist" in _one_line_error(err)


def _remote_code_checkpoint(folder: Path, layouts: list[str]) -> Path:
    shutil.copy(TESTS / "custom_modeling.py", folder / "custom_modeling.py")
    config = {
        "model_type": "normswap-toy",
        "hidden_size": 16,
        "layouts": layouts,
        "auto_map": {"AutoConfig": "custom_modeling.ToyConfig", "AutoModel": "custom_modeling.ToyModel"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_custom_code_needs_trust_remote_code(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    source = _remote_code_checkpoint(tmp_path, ["pre", "pre"])
    code, _, err = run_cli(capsys, "inspect", str(source))
    assert code == 1
    assert "asks for custom modeling code (auto_map); normswap runs it only with --trust-remote-code" in (
        _one_line_error(err))
    code, out, err = run_cli(capsys, "inspect", str(source), "--trust-remote-code")
    assert code == 0, err
    assert "Pre-Norm, LayerNorm (eps 1e-05), no embedding norm, no final norm, 2 layers" in out


def test_no_residual_add(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    source = _remote_code_checkpoint(tmp_path, ["no-residual", "no-residual"])
    code, _, err = run_cli(capsys, "inspect", str(source), "--trust-remote-code")
    assert code == 1
    line = _one_line_error(err)
    assert "ToyLayer (layers.0) shows no residual add" in line and "residual transformers only" in line


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["inspect"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit) as exited:
        main(["convertx", "a"])
    assert exited.value.code == 2
