"""RWKV's ``pre_ln``: a norm that only block 0 builds and runs, on the stream before its first residual, is the
stack's embedding norm (``detect/stem_norm.py``). Read as a pre norm of block 0 it gave block 0 one norm more
than block 1, and ``--placement post`` was refused (one rewrite of ``RwkvBlock`` serves every block)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from test_streaming_relayouts import perturbed
from weights_kit import assert_same_weights

import normswap
from normswap.cli import main
from normswap.conversion.verify import probe_inputs


def perturbed_rwkv(layers: int = 2, rescale_every: int = 6) -> torch.nn.Module:
    """A tiny RWKV whose every parameter is moved away from its init value (norm weights 1, biases 0)."""
    config = transformers.RwkvConfig(vocab_size=128, hidden_size=64, attention_hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=layers, context_length=64, rescale_every=rescale_every)
    return perturbed(transformers.RwkvForCausalLM(config))


def test_block_zero_pre_ln_is_the_embedding_norm() -> None:
    topology = normswap.inspect(perturbed_rwkv())
    (stack,) = topology.stacks
    assert stack.embedding_norm is not None and stack.embedding_norm.path == "rwkv.blocks.0.pre_ln"
    assert stack.final_norm is not None and stack.final_norm.path == "rwkv.ln_out"
    shapes = {tuple(tuple(norm.path.removeprefix(layer.path) for norm in sub.norms) for sub in layer.sublayers)
              for layer in topology.layers}
    assert shapes == {((".ln1",), (".ln2",))}  # every block reads the stream alike
    assert topology.placement == "pre"
    assert not any(sub.notes for layer in topology.layers for sub in layer.sublayers)


def test_rwkv_post_loads_generates_and_round_trips(tmp_path: Path) -> None:
    model = perturbed_rwkv()
    model.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "post"), "--placement", "post", "--quiet"]) == 0
    report = json.loads((tmp_path / "post" / "normswap_report.json").read_text())
    dropped = [move for stack in report["plan"]["stacks"] for move in stack["moves"] if move["target"] is None]
    assert [move["source"] for move in dropped] == ["rwkv.blocks.0.pre_ln"]  # kept aside for the way back

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "post", trust_remote_code=True).eval()
    assert normswap.inspect(loaded).placement == "post"
    inputs = probe_inputs(model, None, None)
    with torch.no_grad():
        logits = loaded(**inputs).logits
    assert torch.isfinite(logits).all()
    prompt = torch.tensor([[5, 17, 42, 7]])
    assert loaded.generate(prompt, max_new_tokens=4, do_sample=False).shape == (1, 8)

    assert main(["convert", str(tmp_path / "post"), str(tmp_path / "back"), "--placement", "pre", "--quiet"]) == 0
    assert_same_weights(tmp_path / "src", tmp_path / "back")  # pre_ln came back from the carried file


def test_rwkv_post_does_not_halve_its_stream_in_eval_mode(tmp_path: Path) -> None:
    """RWKV halves its stream every ``rescale_every`` blocks in eval mode: harmless under Pre-Norm, where every
    branch reads the stream through a norm, not under Post-Norm. The recipe's ``[target_config.post]`` turns it
    off, so the converted model computes the same in eval and train mode (it has no dropout)."""
    perturbed_rwkv(layers=4, rescale_every=2).save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "post"), "--placement", "post", "--quiet"]) == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "post", trust_remote_code=True)
    assert loaded.config.rescale_every == 0
    inputs = probe_inputs(loaded, None, None)
    with torch.no_grad():
        trained = loaded.train()(**inputs).logits
        evaluated = loaded.eval()(**inputs).logits
    torch.testing.assert_close(evaluated, trained, rtol=1e-5, atol=1e-5)
