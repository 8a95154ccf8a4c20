"""Hostile and oversized input to ``inspect``: config.json size, nesting, types and permissions, and deep configs
inspected from a sample of their layers (whose topology must equal the full build's)."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tiny_configs import TINY_CONFIGS

import normswap
from normswap.cli import main
from normswap.detect import sampling, source
from normswap.detect.source import MAX_CONFIG_BYTES, config_from_dict, load_config

DEEP = sampling.FULL_BUILD_LAYERS + 1
_GQA = {"hidden_size": 64, "intermediate_size": 128, "vocab_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2}


def _error(source_path: Path) -> str:
    with pytest.raises(normswap.SourceError) as caught:
        load_config(source_path)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_config_over_the_size_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    with config.open("wb") as file:
        file.truncate(2 * 1024**3)  # sparse: no disk, and reading it would take 2 GB
    assert _error(tmp_path) == (
        f"{config} is 2147483648 bytes; normswap reads config.json files up to 8 MiB (a real config is a few KB): "
        "pass the checkpoint's own config.json")


def test_config_that_grows_past_the_limit_while_read_is_refused(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.json"
    config.write_bytes(b" " * (MAX_CONFIG_BYTES + 10))
    real_fstat = os.fstat
    small = os.stat_result((stat.S_IFREG | 0o644, *[0] * 5, 10, 0, 0, 0))  # what fstat said before it grew
    monkeypatch.setattr(source.os, "fstat", lambda fd: small if fd > 2 else real_fstat(fd))
    assert "grew past that size while it was read; normswap reads config.json files up to 8 MiB" in _error(config)


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_config_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path: Path, kind: str) -> None:
    config = tmp_path / "config.json"
    if kind == "fifo":
        os.mkfifo(config)  # opening it for reading would wait for a writer forever
    elif kind == "device":
        config.symlink_to("/dev/zero")  # endless
    else:
        config.mkdir()
    expected = {"fifo": "a FIFO", "device": "a character device", "folder": "a folder"}[kind]
    assert _error(tmp_path) == (f"{config} is {expected}, not a regular file; pass the checkpoint's config.json file")


@pytest.mark.parametrize(("text", "expected"), [
    ("[" * 100_000, "nests JSON arrays or objects too deeply to parse"),
    ('{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "too deeply to parse"),
    ('{"model_type": "llama", "x": 1' + "0" * 5000 + "}", "cannot be parsed as JSON (ValueError: Exceeds the limit"),
])
def test_json_that_python_cannot_parse_is_one_line(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "config.json"
    config.write_text(text)
    message = _error(config)
    assert message.startswith(f"{config} ") and expected in message


@pytest.mark.parametrize(("fields", "expected"), [
    ({"model_type": ["llama"]}, 'has "model_type": ["llama"], which is not a model family name; make it a string'),
    ({"model_type": 7}, 'has "model_type": 7, which is not a model family name'),
    ({"model_type": {"a": [[[1]]]}}, 'has "model_type": {"a": [[[1]]]}, which is not a model family name'),
    ({"model_type": " "}, 'has "model_type": " ", which is not a model family name'),
    ({"model_type": ""}, "has no 'model_type' key"),
    ({"model_type": "llama", "architectures": [123]},
     'has "architectures": [123], which is not a list of class names; make it a list of strings'),
    ({"model_type": "llama", "architectures": "LlamaForCausalLM"}, 'has "architectures": "LlamaForCausalLM", which'),
    ({"model_type": "llama\nx"}, "has model_type 'llama\\nx', which this transformers version does not know"),
])
def test_wrong_json_types_are_one_line_errors(capsys: pytest.CaptureFixture[str], write_config: Any,
                                              fields: dict[str, Any], expected: str) -> None:
    folder = write_config({**TINY_CONFIGS["llama"], **fields})
    assert main(["inspect", str(folder)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {folder / 'config.json'} "), lines
    assert expected in lines[0]


def test_null_architectures_are_accepted(write_config: Any) -> None:
    assert normswap.inspect(write_config({**TINY_CONFIGS["llama"], "architectures": None})).placement == "pre"


_READ_AS_USER = r"""
import json, sys
from normswap.detect.source import load_config
from normswap.errors import SourceError

results = {}
try:  # does this process really obey permission bits?
    open(sys.argv[1], "rb").close()
    results["enforced"] = False
except PermissionError:
    results["enforced"] = True
for path in sys.argv[1:]:
    try:
        load_config(path)
        results[path] = "loaded"
    except SourceError as error:
        results[path] = str(error)
print(json.dumps(results))
"""


def test_unreadable_config_and_folders_are_one_line_errors(tmp_path: Path) -> None:
    """Root ignores permission bits; the check runs in a process without root's override (one start, ~3 s)."""
    unreadable_file = tmp_path / "a" / "config.json"
    unreadable_file.parent.mkdir()
    unreadable_file.write_text(json.dumps(TINY_CONFIGS["llama"]))
    closed, unlistable = tmp_path / "b", tmp_path / "c"
    closed.mkdir()
    (closed / "config.json").write_text("{}")
    unlistable.mkdir()
    (unlistable / "weights.safetensors").write_bytes(b"")
    modes = {unreadable_file: 0o000, closed: 0o000, unlistable: 0o300}  # c: enterable, not listable
    command = [sys.executable, "-c", _READ_AS_USER, str(unreadable_file), str(unreadable_file.parent), str(closed),
               str(unlistable)]
    if os.geteuid() == 0:
        drop = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", *command]
    try:
        for path, mode in modes.items():
            path.chmod(mode)
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    finally:
        for path in modes:
            path.chmod(0o700)
    if result.returncode != 0 and os.geteuid() == 0 and "setpriv" in result.stderr:
        pytest.skip(f"running as root and setpriv cannot drop the permission override here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    if not results.pop("enforced"):
        pytest.skip("running as root and the dropped capabilities still read a chmod-000 file")

    def fix(path: Path) -> str:
        return f"cannot read {path}: permission denied; make it readable (chmod) or run as a user who can read it"

    assert results == {str(unreadable_file): fix(unreadable_file), str(unreadable_file.parent): fix(unreadable_file),
                       str(closed): fix(closed), str(unlistable): fix(unlistable)}


def test_smallest_period_spans_the_whole_list() -> None:
    assert sampling.smallest_period(["s", "f"] * 50, 32) == (0, 2)
    assert sampling.smallest_period(["dense"] * 3 + ["moe"] * 97, 32) == (3, 1)
    assert sampling.smallest_period([*["s"] * 5, "f"] * 20, 32) == (0, 6)
    assert sampling.smallest_period(["s"] * 99 + ["f"], 32) == (99, 1)  # only the last layer differs: no repeat


def _both(write_config: Callable[[dict[str, Any]], Path], config: dict[str, Any]) -> tuple[Any, Any]:
    folder = write_config(config)
    sampled = normswap.inspect(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampling, "FULL_BUILD_LAYERS", 10**9)  # the full build, as before sampling existed
        full = normswap.inspect(folder)
    return sampled, full


def _sample_notes(topology: Any) -> list[str]:
    return [note for note in topology.notes if re.match(r"built \d+ of \d+ layers of ", note)]


def _without_sample_notes(topology: Any) -> dict[str, Any]:
    payload = topology.to_dict()
    payload["notes"] = [note for note in payload["notes"] if note not in _sample_notes(topology)]
    return payload


_DEEP_CONFIGS = {
    "llama": ({**TINY_CONFIGS["llama"], "num_hidden_layers": DEEP}, ["layers"], 1),
    "gemma2": ({**TINY_CONFIGS["gemma2"], "num_hidden_layers": DEEP}, ["layers"], 2),  # sliding/full alternate
    "gemma3_text": ({"model_type": "gemma3_text", **_GQA, "head_dim": 16, "num_hidden_layers": DEEP},
                    ["layers"], 6),  # five sliding, one full
    "modernbert": ({**TINY_CONFIGS["modernbert"], "num_hidden_layers": DEEP, "global_attn_every_n_layers": 3},
                   ["layers"], 3),
    "bart": ({**TINY_CONFIGS["bart"], "encoder_layers": DEEP, "decoder_layers": DEEP},
             ["encoder.layers", "decoder.layers"], 1),
    "t5": ({**TINY_CONFIGS["t5"], "num_layers": DEEP}, ["encoder.block", "decoder.block"], 1),
}


@pytest.mark.parametrize("name", list(_DEEP_CONFIGS))
def test_sampled_topology_equals_the_full_build(name: str, write_config: Any) -> None:
    config, stacks, period = _DEEP_CONFIGS[name]
    sampled, full = _both(write_config, config)
    assert _without_sample_notes(sampled) == _without_sample_notes(full)
    assert not _sample_notes(full)
    notes = _sample_notes(sampled)
    assert len(notes) == len(stacks)
    for note, stack in zip(notes, stacks, strict=True):
        built = int(note.split()[1])
        repeated = f"layer {built - 1}" if period == 1 else f"layers {built - period}-{built - 1}"
        assert note == (f"built {built} of {DEEP} layers of {stack} on the meta device; layers {built}-{DEEP - 1} "
                        f"repeat {repeated} (period {period})")
        assert sampling.SLACK_LAYERS + max(2 * period, sampling.MIN_TAIL_LAYERS) <= built < DEEP


def test_index_pattern_no_config_key_names_falls_back_to_the_full_build(write_config: Any,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The check of the built sample catches what the config scan missed: the sample is not trusted.

    ModernBERT's global layer every third is named twice in the config (``layer_types`` and
    ``global_attn_every_n_layers``); the scan is blinded to both.
    """
    monkeypatch.setattr(sampling, "_HINT_NAME", re.compile(r"(?!)"))
    monkeypatch.setattr(sampling, "_is_per_layer", lambda attribute, real: False)
    config, _, _ = _DEEP_CONFIGS["modernbert"]
    plan = sampling.plan_sample(config_from_dict(dict(config), "config.json"))
    assert plan is not None and plan.samples[0].period == 1
    sampled, full = _both(write_config, config)
    assert not _sample_notes(sampled)
    assert sampled.to_dict() == full.to_dict()


def test_per_layer_list_that_does_not_repeat_builds_every_layer() -> None:
    layer_types = ["sliding_attention"] * DEEP
    layer_types[DEEP - 10] = "full_attention"
    config = {**TINY_CONFIGS["gemma2"], "num_hidden_layers": DEEP, "layer_types": layer_types}
    assert sampling.plan_sample(config_from_dict(config, "config.json")) is None
    repeating = {**config, "layer_types": ["full_attention"] * 3 + ["sliding_attention"] * (DEEP - 3)}
    plan = sampling.plan_sample(config_from_dict(repeating, "config.json"))
    assert plan is not None
    (sample,) = plan.samples
    assert (sample.start, sample.period) == (3 + sampling.SLACK_LAYERS, 1)
    assert plan.config.layer_types == repeating["layer_types"][:sample.built]
    assert plan.config.num_hidden_layers == sample.built


def test_layer_counts_behind_attribute_map_are_sampled() -> None:
    config = config_from_dict({**TINY_CONFIGS["gpt2"], "n_layer": 10_000}, "config.json")
    plan = sampling.plan_sample(config)
    assert plan is not None
    assert plan.config.n_layer == plan.config.num_hidden_layers == plan.samples[0].built
    assert config.n_layer == 10_000  # the loaded config is left as it is


def test_loaded_models_are_not_sampled() -> None:
    import torch
    from transformers import LlamaConfig, LlamaModel

    config = dict(TINY_CONFIGS["llama"], num_hidden_layers=DEEP)
    with torch.device("meta"):
        model = LlamaModel(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    topology = normswap.inspect(model)
    assert len(topology.layers) == DEEP and not _sample_notes(topology)


def test_floats_that_json_cannot_hold_are_read_as_transformers_writes_them(tmp_path: Path) -> None:
    """``save_pretrained`` writes Mamba-2's ``time_step_limit = (0.0, inf)`` as ``[0.0, {"__float__": "Infinity"}]``;
    read as plain JSON, the config class refuses the dict it gets."""
    from transformers import CONFIG_MAPPING

    CONFIG_MAPPING["nemotron_h"](hidden_size=64, num_hidden_layers=2, layers_block_type=["mamba", "attention"],
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, mamba_num_heads=4,
                                 mamba_head_dim=16, n_groups=1, vocab_size=128).save_pretrained(tmp_path)
    assert '"__float__": "Infinity"' in (tmp_path / "config.json").read_text()
    config = load_config(tmp_path)
    assert list(config.time_step_limit) == [0.0, float("inf")]
    assert normswap.inspect(tmp_path).placement == "pre"
