"""Post-Norm read one layer off (MiniMax): every layer normalises the stream where it starts and after its
attention's add. Moving each of those norms onto the branch after it is the norm shift (docs/design.md §3); the
norms keep their modules and weights, so to Pre-Norm the pass changes code only, and every other placement
follows from there."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers
from tiny_configs import TINY_CONFIGS

import normswap
from normswap.cli import main


def minimax() -> torch.nn.Module:
    """A lightning-attention layer, whose branch starts inside its attention module, and a softmax-attention one."""
    fields = {key: value for key, value in TINY_CONFIGS["llama"].items() if key != "model_type"}
    config = transformers.AutoConfig.for_model("minimax", **fields, num_local_experts=4, num_experts_per_tok=2,
                                               layer_types=["linear_attention", "full_attention"])
    model = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norm weights away from 1: a norm moved without its weights changes the output
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def test_the_stream_norms_move_onto_the_branches_and_keep_their_weights(tmp_path: Path) -> None:
    model = minimax()
    assert normswap.inspect(model).placement == "mixed"
    model.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "pre"), "--placement", "pre", "--quiet"]) == 0
    code = (tmp_path / "pre" / "modeling_normswap_minimax.py").read_text()
    assert "residual = hidden_states\n        hidden_states, _ = self.self_attn(\n" \
           "            hidden_states=self.input_layernorm(hidden_states)," in code
    assert "residual = hidden_states\n        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))" \
           in code
    converted = normswap.convert(model, "pre")
    topology = normswap.inspect(converted)
    assert topology.placement == "pre"
    assert [[(n.path, n.slot) for n in sub.norms] for sub in topology.layers[1].sublayers] == [
        [("model.layers.1.input_layernorm", "pre")], [("model.layers.1.post_attention_layernorm", "pre")]]
    weights, original = converted.state_dict(), model.state_dict()
    assert weights.keys() == original.keys()
    assert all(torch.equal(weights[key], original[key]) for key in original)  # code only: no tensor changes
    # the inspected checkpoint is compared with the code normswap generates, with no --trust-remote-code
    assert normswap.inspect(str(tmp_path / "pre")).placement == "pre"


@pytest.mark.parametrize("target", ["pre", "post", "sandwich", "post-sublayer"])
def test_every_placement_is_reached_and_generates(target: str, tmp_path: Path) -> None:
    converted = normswap.convert(minimax(), target)
    assert normswap.inspect(converted).placement == target
    report = converted.normswap_report
    whole = getattr(report, "whole", None) or report.drift
    assert not report.exact and 0.2 < whole.output_cosine < 0.99999
    converted.save_pretrained(tmp_path)
    source_file = Path(sys.modules[type(converted).__module__].__file__ or "")  # the generated module
    (tmp_path / source_file.name).write_text(source_file.read_text())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # MiniMax's grouped experts differ in the last bits between two copies of one model
        assert torch.allclose(loaded(ids).logits, converted.eval()(ids).logits, atol=1e-5)
    cached = loaded.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(cached, loaded.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False))
