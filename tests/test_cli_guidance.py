"""Errors that lead somewhere: each message names the right thing to pass for the command that was given,
usage errors show the command's own usage and the closest flag, ``--help`` describes every option with its
default, and a normswap bug is one line that says what the command was doing."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from normswap.cli import _build_parser, main


def _usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    assert exited.value.code == 2
    return capsys.readouterr().err


def _failure(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("file_name", ["model.safetensors", "config.json"])
def test_convert_given_a_file_names_the_folder_to_pass(file_name: str, minilm_path: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    line = _failure(capsys, "convert", str(minilm_path / file_name), str(tmp_path / "out"), "--norm", "rmsnorm")
    assert line.endswith(f"pass {minilm_path}"), line
    # following the hint works: the folder it names converts
    assert main(["convert", str(minilm_path), str(tmp_path / "out"), "--norm", "rmsnorm", "--quiet"]) == 0


def test_inspect_given_a_weights_file_names_its_folder(minilm_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _failure(capsys, "inspect", str(minilm_path / "model.safetensors"))
    assert "weights file" in line and str(minilm_path) in line and "8 MiB" not in line
    assert main(["inspect", str(minilm_path)]) == 0


def test_a_mistyped_flag_shows_the_command_usage_and_the_closest_flag(capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(capsys, "convert", "src", "dst", "--placment", "pre")
    assert err.startswith("usage: normswap convert ")
    assert "did you mean --placement?" in err.splitlines()[-1]
    err = _usage_error(capsys, "inspect", "src", "--jsn")
    assert err.startswith("usage: normswap inspect ") and "did you mean --json?" in err
    err = _usage_error(capsys, "heal", "a", "b", "c", "--max-tme", "5")
    assert err.startswith("usage: normswap heal ") and "did you mean --max-time?" in err
    err = _usage_error(capsys, "conver", "src", "dst")
    assert "did you mean convert?" in err


def test_convert_without_a_conversion_names_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(capsys, "convert", "src", "dst")
    assert err.startswith("usage: normswap convert ")
    last = err.splitlines()[-1]
    assert "--placement pre|post" in last and "--norm rmsnorm|layernorm" in last


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions if action.option_strings and action.dest not in ("help", "debug")]


@pytest.mark.parametrize("command", ["inspect", "convert", "heal"])
def test_every_option_is_described_with_its_default(command: str) -> None:
    parser = _build_parser()[1][command]
    for action in _options(parser):
        assert action.help and action.help is not argparse.SUPPRESS, f"{command} {action.option_strings[0]}"
        if action.default not in (None, False, True, argparse.SUPPRESS):
            assert "default" in action.help, f"{command} {action.option_strings[0]}: {action.help!r}"


def test_help_describes_the_conversions_correctly(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    top = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    convert_entry = top[top.index(" convert "):top.index(" heal ")]
    assert "--norm" in convert_entry and "--placement" in convert_entry
    norm = next(action for action in _options(_build_parser()[1]["convert"]) if action.dest == "norm")
    assert "exact with --exact" in norm.help and "layernorm (with --exact)" not in norm.help


def test_a_normswap_bug_is_one_line_that_says_what_was_being_done(
        minilm_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import normswap.conversion.checkpoint as checkpoint

    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("__init__() got an unexpected keyword argument 'hidden_size'")

    monkeypatch.setattr(checkpoint, "_plan", broken)
    line = _failure(capsys, "convert", str(minilm_path), str(tmp_path / "out"), "--norm", "rmsnorm", "--quiet")
    assert line.startswith("Error: internal error (TypeError: __init__() got an unexpected keyword argument")
    assert f"while converting {minilm_path}" in line and "--debug" in line and "report" in line
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_that_does_not_fit_the_model_is_named(minilm_path: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """MiniLM's tokenizer (30522 ids) beside a 128-row embedding: said plainly, not an IndexError."""
    import shutil

    from fault_kit import write_tiny_gpt2

    source = write_tiny_gpt2(tmp_path / "src", tokenizer=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path / name, source / name)
    assert main(["convert", str(source), str(tmp_path / "out"), "--norm", "rmsnorm", "--quiet"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' own warnings on the config
    assert "embedding has 128 rows" in line and "do not belong to this model" in line, line
    assert "internal error" not in line and not (tmp_path / "out").exists()
