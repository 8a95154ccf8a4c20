"""The source shards are copied while planning, and the output keeps their layout where it can: the same
tensors bit for bit as the planned layout, loadable, and nothing left beside DST whichever way it goes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_rms_norm import perturbed
from test_streaming import assert_bit_identical, expected_tensors, saved_tensors

import normswap
from normswap.cli import main
from normswap.conversion.checkpoint import convert_checkpoint
from normswap.io.mirror import MirroredFile
from normswap.io.mirror_layout import mirror_layout
from normswap.io.shard_writer import PlannedTensor
from normswap.io.source_weights import CheckpointWeights


def _leftovers(folder: Path) -> list[Path]:
    return [path for path in folder.iterdir() if path.name.startswith(".")]


def test_output_keeps_the_source_shards_and_rewrites_only_what_changed(tmp_path: Path) -> None:
    model = perturbed("llama", "LlamaForCausalLM")
    source = tmp_path / "source"
    model.save_pretrained(source, max_shard_size="40KB")
    source_shards = sorted(p.name for p in source.glob("model-*.safetensors"))
    assert len(source_shards) > 2

    result = convert_checkpoint(source, tmp_path / "out", placement="post")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == source_shards
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map.values()) == set(source_shards)
    converted = normswap.convert(model, placement="post")
    expected = expected_tensors(converted)
    assert_bit_identical(saved_tensors(out), expected)
    matrices = sum(t.numel() * t.element_size() for t in expected.values() if t.dim() == 2)
    assert result.reused_bytes >= matrices  # every projection and embedding was copied while planning
    assert not _leftovers(tmp_path)

    loaded = __import__("transformers").AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, converted(input_ids=ids).logits, atol=1e-5)


def test_the_same_bits_as_the_planned_layout(tmp_path: Path) -> None:
    model = perturbed("gpt2", "GPT2LMHeadModel")
    model.save_pretrained(tmp_path / "source")
    mirrored = convert_checkpoint(tmp_path / "source", tmp_path / "mirrored", norm="rmsnorm")
    planned = convert_checkpoint(tmp_path / "source", tmp_path / "planned", norm="rmsnorm", max_shard_size="1KB")
    assert mirrored.reused_bytes > 0 and planned.reused_bytes == 0  # 1KB shards: the source's layout is refused
    assert_bit_identical(saved_tensors(tmp_path / "mirrored"), saved_tensors(tmp_path / "planned"))
    assert not _leftovers(tmp_path)


def test_a_tensor_the_output_drops_falls_back_to_the_planned_layout(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    model = perturbed("gpt2", "GPT2LMHeadModel")
    source = tmp_path / "source"
    model.save_pretrained(source)
    tensors = load_file(str(source / "model.safetensors"))
    save_file({**tensors, "stray.weight": torch.ones(3)}, str(source / "model.safetensors"), {"format": "pt"})
    assert main(["convert", str(source), str(tmp_path / "out"), "--placement", "post", "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reused_bytes"] == 0  # a 12-byte hole nothing fills: safetensors files cannot have holes
    assert_bit_identical(saved_tensors(tmp_path / "out"),
                         expected_tensors(normswap.convert(model, placement="post")))
    assert not _leftovers(tmp_path)


def test_a_hole_rewrites_only_its_own_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = perturbed("llama", "LlamaForCausalLM")
    source = tmp_path / "source"
    model.save_pretrained(source, max_shard_size="40KB")
    shards = sorted(source.glob("model-*.safetensors"))
    assert len(shards) > 2
    holed = shards[1]
    save_file({**load_file(str(holed)), "stray.weight": torch.ones(3)}, str(holed), {"format": "pt"})
    index = json.loads((source / "model.safetensors.index.json").read_text())
    index["weight_map"]["stray.weight"] = holed.name
    (source / "model.safetensors.index.json").write_text(json.dumps(index))

    assert main(["convert", str(source), str(tmp_path / "out"), "--placement", "post", "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == [p.name for p in shards]
    kept = sum(p.stat().st_size for p in shards if p != holed)
    assert 0 < report["reused_bytes"] <= kept  # reused bytes come only from the other shards
    assert "stray.weight" not in load_file(str(out / holed.name))
    assert_bit_identical(saved_tensors(out), expected_tensors(normswap.convert(model, placement="post")))
    assert not _leftovers(tmp_path)


def test_a_failing_conversion_leaves_no_copy_behind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "source"
    perturbed("gpt2", "GPT2LMHeadModel").save_pretrained(source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "no-such-family"}))
    assert main(["convert", str(source), str(tmp_path / "out"), "--placement", "post", "--quiet"]) == 1
    assert "no-such-family" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def _file(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> tuple[list[MirroredFile], CheckpointWeights]:
    return _shards(tmp_path, {"model.safetensors": tensors})


def _shards(folder: Path, shards: dict[str, dict[str, torch.Tensor]]
            ) -> tuple[list[MirroredFile], CheckpointWeights]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name), {"format": "pt"})
        (length,) = struct.unpack("<Q", (folder / name).read_bytes()[:8])
        size = (folder / name).stat().st_size
        files.append(MirroredFile(name, folder / name, 8 + length, size - 8 - length, 8 + 2 * length + 4096))
    if len(shards) > 1:
        weight_map = {tensor: name for name, tensors in shards.items() for tensor in tensors}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return files, CheckpointWeights(folder)


def _planned(**shapes: tuple[int, ...]) -> list[PlannedTensor]:
    return [PlannedTensor(name, torch.float32, shape) for name, shape in shapes.items()]


def test_layout_rules(tmp_path: Path) -> None:
    files, weights = _file(tmp_path / "a", {"a": torch.zeros(4, 4), "b": torch.zeros(4), "c": torch.zeros(4)})
    sources = {"a": "a", "b": "b", "c": "c"}
    # copies stay where they are; a changed tensor takes its own source's slot; a new one goes at the end
    layout = mirror_layout(files, _planned(a=(4, 4), b=(4,), c=(4,), new=(2,)), weights, sources,
                           frozenset({"a", "b"}), 10**9)
    assert layout is not None and layout.in_place == {"a", "b"}
    slot = {name: entry.begin - files[0].source_data_start + files[0].data_start
            for name, entry in ((n, weights.tensors[n].entry) for n in "abc")}
    assert {name: layout.places[name][1] for name in "abc"} == slot
    assert layout.places["new"][1] == files[0].data_start + files[0].data_bytes
    assert layout.files[0].size == files[0].data_start + files[0].data_bytes + 8
    # a dropped source tensor that nothing of its size replaces is a hole: refused
    assert mirror_layout(files, _planned(a=(4, 4), b=(4,)), weights, sources, frozenset({"a", "b"}), 10**9) is None
    # with several files, only the one with the hole is written afresh (packed, in source order)
    two, two_weights = _shards(tmp_path / "two", {"one.safetensors": {"a": torch.zeros(4, 4), "b": torch.zeros(4),
                                                                      "c": torch.zeros(4)},
                                                  "two.safetensors": {"d": torch.zeros(2, 4), "e": torch.zeros(3)}})
    split = mirror_layout(two, _planned(a=(4, 4), b=(4,), c=(4,), d=(2, 4)), two_weights,
                          {**sources, "d": "d", "e": "e"}, frozenset("abcd"), 10**9)
    assert split is not None and [f.fresh for f in split.files] == [False, True]
    assert split.in_place == {"a", "b", "c"}
    assert split.places["d"] == (1, len(split.files[1].header))
    assert split.files[1].size == len(split.files[1].header) + 32
    # when every file has a hole, the planned layout is used instead
    assert mirror_layout(two, _planned(a=(4, 4), b=(4,), d=(2, 4)), two_weights, {**sources, "d": "d"},
                         frozenset("abd"), 10**9) is None
    # ... but a renamed one of the same size fills it
    renamed = mirror_layout(files, _planned(a=(4, 4), b=(4,), z=(4,)), weights, {**sources, "z": "c"},
                            frozenset({"a", "b", "z"}), 10**9)
    assert renamed is not None and renamed.places["z"][1] == slot["c"] and "z" in renamed.in_place
    # shards above --max-shard-size are refused, and so is a header that does not fit its room
    assert mirror_layout(files, _planned(a=(4, 4), b=(4,), c=(4,)), weights, sources, frozenset("abc"), 32) is None
    tight = [MirroredFile(f.name, f.source, f.source_data_start, f.data_bytes, 16) for f in files]
    assert mirror_layout(tight, _planned(a=(4, 4), b=(4,), c=(4,)), weights, sources, frozenset("abc"), 10**9) is None
