"""``normswap convert`` on the real MiniLM checkpoint, and the rules that keep data safe."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers

import normswap
from normswap.cli import main


@pytest.fixture(scope="module")
def minilm_pre(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    """The real MiniLM converted to Pre-Norm once for this module."""
    out = tmp_path_factory.mktemp("convert") / "minilm-pre"
    assert main(["convert", str(minilm_path), str(out), "--placement", "pre"]) == 0
    return out


def test_minilm_converts_to_megatron_bert_that_loads_natively(minilm_pre: Path, minilm_path: Path) -> None:
    from transformers import AutoModel, AutoTokenizer, BertModel

    config = json.loads((minilm_pre / "config.json").read_text())
    assert config["model_type"] == "megatron-bert" and config["architectures"] == ["MegatronBertModel"]
    assert "auto_map" not in config
    assert config["normswap"]["source_model_type"] == "bert"
    assert config["normswap"]["conversion"] == "placement post -> pre" and config["normswap"]["exact"] is False

    converted = AutoModel.from_pretrained(minilm_pre).eval()
    original = BertModel.from_pretrained(minilm_path).eval()
    assert type(converted).__name__ == "MegatronBertModel"
    tokenizer = AutoTokenizer.from_pretrained(minilm_pre)  # copied from the source
    batch = tokenizer(["Norms move, branches keep what they read."], return_tensors="pt")
    reads: dict[str, torch.Tensor] = {}
    hooks = [
        original.encoder.layer[0].attention.self.register_forward_pre_hook(
            lambda m, a: reads.__setitem__("original", a[0])),
        converted.encoder.layer[0].attention.self.register_forward_pre_hook(
            lambda m, a: reads.__setitem__("converted", a[0])),
    ]
    with torch.no_grad():
        original(**batch)
        converted(**batch)
    for hook in hooks:
        hook.remove()
    assert torch.equal(reads["original"], reads["converted"])  # branch 0 is exact


def test_minilm_report_and_card(minilm_pre: Path) -> None:
    report = json.loads((minilm_pre / "normswap_report.json").read_text())
    assert report["exact"] is False
    assert report["probe_tokens"] > 100
    assert len(report["sublayers"]) == 12
    assert report["sublayers"][0]["max_abs_diff"] == 0.0
    assert all(0.0 < s["cosine"] < 1.0 for s in report["sublayers"][1:])
    assert 0.0 < report["output_cosine"] < 0.5  # the norm-shift mapping alone does not preserve the output
    assert report["plan"]["realisation"] == "native: megatron-bert"
    card = (minilm_pre / "README.md").read_text()
    assert "not exact" in card and "normswap heal" in card and "AutoModel.from_pretrained" in card
    for name in ("tokenizer.json", "vocab.txt", "modules.json", "1_Pooling"):
        assert (minilm_pre / name).exists(), name


def test_existing_destination_needs_overwrite(minilm_path: Path, minilm_pre: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    before = (minilm_pre / "model.safetensors").stat().st_mtime_ns
    assert main(["convert", str(minilm_path), str(minilm_pre), "--placement", "pre"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"Error: {minilm_pre.resolve()} already exists; pass --overwrite to replace it"
    assert (minilm_pre / "model.safetensors").stat().st_mtime_ns == before


def test_overwrite_replaces_atomically(minilm_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier output: --overwrite replaces checkpoint folders only
    (out / "stale.txt").write_text("old")
    assert main(["convert", str(minilm_path), str(out), "--placement", "pre", "--overwrite", "--json"]) == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old folders left


def test_destination_inside_source_or_a_file_is_refused(minilm_path: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(minilm_path), str(minilm_path / "converted"), "--placement", "pre"]) == 1
    assert "is inside the source checkpoint" in capsys.readouterr().err
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["convert", str(minilm_path), str(target), "--placement", "pre", "--overwrite"]) == 1
    assert "is an existing file" in capsys.readouterr().err


def test_read_only_parent_is_refused(minilm_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real write attempt decides: permission bits for ordinary users, a read-only mount (/sys) for root."""
    if os.getuid() == 0:
        parent = Path("/sys")
        if not parent.is_dir() or _can_create_in(parent):
            pytest.skip("no read-only location to test with as root")
    else:
        parent = tmp_path / "locked"
        parent.mkdir()
        parent.chmod(0o500)
    try:
        assert main(["convert", str(minilm_path), str(parent / "normswap-out"), "--placement", "pre"]) == 1
        assert f"Error: cannot write in {parent}" in capsys.readouterr().err
        assert not (parent / "normswap-out").exists()
    finally:
        if parent != Path("/sys"):
            parent.chmod(0o700)


def _can_create_in(folder: Path) -> bool:
    try:
        (folder / ".normswap-can-write").mkdir()
    except OSError:
        return False
    (folder / ".normswap-can-write").rmdir()
    return True


def test_failure_while_writing_leaves_nothing(minilm_path: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import normswap.conversion.checkpoint as checkpoint

    def explode(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "copy_support_files", explode)
    assert main(["convert", str(minilm_path), str(tmp_path / "out"), "--placement", "pre"]) == 130
    assert list(tmp_path.iterdir()) == []


def test_source_is_never_modified(minilm_path: Path, minilm_pre: Path) -> None:
    assert not any(".normswap" in p.name for p in minilm_path.iterdir())
    assert json.loads((minilm_path / "config.json").read_text())["model_type"] == "bert"


def test_same_placement_writes_nothing(minilm_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(minilm_path), str(tmp_path / "out"), "--placement", "post"]) == 0
    assert "nothing written: bert already has post placement" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [["--norm", "layernorm"], ["--norm", "layernorm", "--exact"]])
def test_same_norm_kind_writes_nothing(minilm_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       flags: list[str]) -> None:
    """Like a placement the model already has: nothing to do is no error (it was exit 1, 'starts from a model
    whose norms are RMSNorms'), and nothing is written."""
    assert main(["convert", str(minilm_path), str(tmp_path / "out"), *flags]) == 0
    assert "nothing written: bert's norms are LayerNorms already (layernorm)" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_round_trip_through_the_cli_restores_the_weights(minilm_path: Path, minilm_pre: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    back = tmp_path / "back"
    assert main(["convert", str(minilm_pre), str(back), "--placement", "post"]) == 0
    assert json.loads((back / "config.json").read_text())["model_type"] == "bert"
    original = load_file(str(minilm_path / "model.safetensors"))
    restored = load_file(str(back / "model.safetensors"))
    # the checkpoint still carries a position_ids buffer that transformers 5 no longer saves
    assert set(original) - set(restored) == {"embeddings.position_ids"}
    assert set(restored) <= set(original)
    assert all(torch.equal(original[k], restored[k]) for k in restored)


def test_the_real_minilm_goes_to_sandwich_and_home_again(minilm_path: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """BERT adds each branch in the module that runs the branch's last linear map (``attention.output``), beside the
    attention itself: its out norms go there (refused before). The result loads as generated code of sandwich
    placement, and converted back to post it is stock BERT with the original's norm vectors bit for bit."""
    from safetensors.torch import load_file

    there, back = tmp_path / "sandwich", tmp_path / "back"
    assert main(["convert", str(minilm_path), str(there), "--placement", "sandwich", "--quiet"]) == 0
    assert main(["convert", str(there), str(back), "--placement", "post", "--quiet", "--trust-remote-code"]) == 0
    capsys.readouterr()
    assert normswap.inspect(there, trust_remote_code=True).placement == "sandwich"
    loaded = transformers.AutoModel.from_pretrained(back)  # stock transformers, no remote code
    assert type(loaded).__name__ == "BertModel" and not list(back.glob("modeling_*.py"))
    original, returned = load_file(str(minilm_path / "model.safetensors")), load_file(str(back / "model.safetensors"))
    original.pop("embeddings.position_ids")  # a buffer the checkpoint stores and BERT does not load
    assert original.keys() == returned.keys()
    for key, tensor in original.items():
        if "LayerNorm" in key:
            assert torch.equal(returned[key], tensor), key
        else:
            assert (returned[key] - tensor).abs().max() <= 1e-6 * tensor.abs().max(), key


def test_calib_text_and_sharding(minilm_path: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog.\n\nNorms move; branches keep their inputs.\n")
    out = tmp_path / "out"
    assert main(["convert", str(minilm_path), str(out), "--placement", "pre", "--calib", str(calib),
                 "--max-shard-size", "20MB"]) == 0
    report = json.loads((out / "normswap_report.json").read_text())
    assert report["probe_tokens"] < 40  # two short documents, not the built-in corpus
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    tensors_in = {shard: sum(1 for s in index["weight_map"].values() if s == shard) for shard in shards}
    assert len(shards) >= 3
    # a shard stays under the limit unless one tensor alone is larger (the 47 MB word embedding)
    assert all((out / shard).stat().st_size <= 20 * 10**6 or tensors_in[shard] == 1 for shard in shards)
    from transformers import AutoModel

    assert type(AutoModel.from_pretrained(out)).__name__ == "MegatronBertModel"


def test_unreadable_calib_is_a_one_line_error(minilm_path: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["convert", str(minilm_path), str(tmp_path / "out"), "--placement", "pre",
                 "--calib", str(empty)]) == 1
    assert capsys.readouterr().err.strip() == f"Error: {empty} holds no text; pass a file with one document per line"
    assert not (tmp_path / "out").exists()


def test_sentence_transformers_loads_the_converted_minilm(minilm_pre: Path, minilm_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    converted = SentenceTransformer(str(minilm_pre), device="cpu")
    original = SentenceTransformer(str(minilm_path), device="cpu")
    assert type(converted[0].auto_model).__name__ == "MegatronBertModel"
    sentences = ["Norms move; branches keep what they read.", "A cat sat on the mat."]
    a = torch.tensor(converted.encode(sentences))
    b = torch.tensor(original.encode(sentences))
    assert a.shape == b.shape == (2, 384)
    # unhealed, the pooled embeddings are far from the original's (benchmarks/README.md: cosine about 0.05)
    assert torch.nn.functional.cosine_similarity(a, b).abs().max() < 0.5
