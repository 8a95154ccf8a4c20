"""``--placement pre`` on a parallel Pre-Norm model means sequential Pre-Norm (issue 17).

Inspection calls GPT-NeoX, GPT-J, Phi and Falcon ``parallel``; convert used to call them ``pre`` and do
nothing. Now the two agree: converting to ``pre`` serialises the blocks, natively where the family's own
code has a sequential form, and through generated code where it has none (GPT-J, Phi).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from test_rms_norm import perturbed

import normswap
from normswap.cli import main
from normswap.conversion.verify import measure_drift, probe_inputs

SERIALISED = [  # (tiny config, class, the config switch that makes it sequential)
    ("gpt_neox_parallel", "GPTNeoXForCausalLM", ("use_parallel_residual", False)),
    ("stablelm_parallel", "StableLmForCausalLM", ("use_parallel_residual", False)),
    ("falcon", "FalconForCausalLM", ("parallel_attn", False)),
]


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize(("config", "class_name", "switch"), SERIALISED, ids=[c[0] for c in SERIALISED])
def test_parallel_to_pre_is_the_stock_sequential_form(config: str, class_name: str, switch: tuple[str, bool]) -> None:
    model = perturbed(config, class_name)
    assert normswap.inspect(model).placement == "parallel"
    converted = normswap.convert(model, "pre")
    assert converted is not model
    assert type(converted) is type(model)
    assert getattr(converted.config, switch[0]) is switch[1]
    assert normswap.inspect(converted).placement == "pre"
    plan = converted.normswap_plan
    assert plan.exact is False and plan.source_placement == "parallel" and plan.target_placement == "pre"
    assert any("parallel -> sequential" in note for note in plan.notes)
    # each branch keeps the norm it read: attention's norm is bit for bit the one it had
    source = dict(model.named_parameters())
    target = dict(converted.named_parameters())
    for move in plan.stacks[0].moves:
        if move.source and move.target:
            assert torch.equal(target[f"{move.target}.weight"], source[f"{move.source}.weight"]), move
    # the first attention branch reads exactly what it read before; the MLP reads h + attention(h) now
    inputs = probe_inputs(model, None, None)
    report = measure_drift(model, converted, normswap.inspect(model), normswap.inspect(converted), inputs,
                           exact=False)
    assert report.sublayers[0].max_abs_diff == 0.0
    assert not torch.allclose(_logits(model, inputs), _logits(converted, inputs), atol=1e-3)


def test_shared_norm_is_copied_to_both_sublayers() -> None:
    """StableLM's parallel block reads one input_layernorm; the MLP's new norm starts as its copy."""
    model = perturbed("stablelm_parallel", "StableLmForCausalLM")
    converted = normswap.convert(model, "pre")
    layer, original = converted.model.layers[0], model.model.layers[0]
    assert torch.equal(layer.post_attention_layernorm.weight, original.input_layernorm.weight)
    assert torch.equal(layer.input_layernorm.weight, original.input_layernorm.weight)
    moves = converted.normswap_plan.stacks[0].moves
    assert [m.copy for m in moves if m.source == "model.layers.0.input_layernorm"] == [False, True]


@pytest.mark.parametrize(("config", "class_name"), [("gptj", "GPTJForCausalLM"), ("phi", "PhiForCausalLM")])
def test_parallel_without_a_sequential_form_is_serialised_in_generated_code(
        config: str, class_name: str, tmp_path: Path) -> None:
    """GPT-J and Phi have no sequential switch (they were refused): the generated code gives the MLP a norm of its
    own, a copy of the shared one, reading h + attention(h); the add as the family writes it then sums the same
    terms, so attention's input is unchanged and the MLP's is the sequential block's."""
    model = perturbed(config, class_name)
    converted = normswap.convert(model, "pre")
    topology = normswap.inspect(converted)
    assert topology.placement == "pre" and len(topology.layers[0].sublayers) == 2
    layer = topology.layers[0]
    (attention_norm,), (mlp_norm,) = (sub.norms_in("pre") for sub in layer.sublayers)
    assert mlp_norm.path.endswith("normswap_mlp_norm") and attention_norm.path != mlp_norm.path
    assert torch.equal(converted.get_submodule(mlp_norm.path).weight, model.get_submodule(attention_norm.path).weight)
    plan = converted.normswap_plan
    assert not plan.exact and any("parallel -> sequential" in note for note in plan.notes)
    # the block is sequential: the MLP reads n'(h + attention), and the layer returns h + attention + MLP
    inputs = probe_inputs(model, None, None)
    seen = _block_values(converted, layer)
    _logits(converted, inputs)
    for handle in seen.pop("handles"):
        handle.remove()
    after_attention = seen["input"] + seen["attention"]
    norm = converted.get_submodule(mlp_norm.path)
    assert torch.allclose(seen["mlp input"], norm(after_attention), atol=1e-5)
    assert torch.allclose(seen["output"], after_attention + seen["mlp"], atol=1e-5)
    report = measure_drift(model, converted, normswap.inspect(model), topology, inputs, exact=False)
    assert report.sublayers[0].max_abs_diff == 0.0  # attention reads what it read
    assert not torch.allclose(_logits(model, inputs), _logits(converted, inputs), atol=1e-3)
    model.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--placement", "pre", "--quiet"]) == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dst", trust_remote_code=True).eval()
    assert torch.allclose(_logits(loaded, inputs), _logits(converted, inputs), atol=1e-5)
    ids = inputs["input_ids"][:1]
    assert loaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                           do_sample=False, pad_token_id=0).shape[-1] == ids.shape[-1] + 3


def _block_values(model: torch.nn.Module, layer: Any) -> dict[str, Any]:
    """Hooks that keep the first layer's input and output, its attention branch's output, and its MLP's input and
    output, on the next forward."""
    seen: dict[str, Any] = {}

    def first(value: Any) -> torch.Tensor:
        return value[0] if isinstance(value, tuple) else value

    def module(sub: Any) -> torch.nn.Module:
        entry = sub.branches[0].entry
        return model.get_submodule(entry if entry.startswith(layer.path) else f"{layer.path}.{entry}")

    def keep(name: str, value: Any) -> None:
        seen.setdefault(name, value.detach().clone())

    block, attention, mlp = model.get_submodule(layer.path), module(layer.sublayers[0]), module(layer.sublayers[1])
    seen["handles"] = [
        block.register_forward_pre_hook(lambda m, a, k: keep("input", a[0] if a else k["hidden_states"]),
                                        with_kwargs=True),
        block.register_forward_hook(lambda m, a, out: keep("output", first(out))),
        attention.register_forward_hook(lambda m, a, out: keep("attention", first(out))),
        mlp.register_forward_pre_hook(lambda m, a, k: keep("mlp input", a[0] if a else next(iter(k.values()))),
                                      with_kwargs=True),
        mlp.register_forward_hook(lambda m, a, out: keep("mlp", first(out)))]
    return seen


def test_parallel_to_post_and_back_returns_the_parallel_model() -> None:
    """``pre`` from a post-norm parallel model is the way home: its blocks stay parallel."""
    model = perturbed("gpt_neox_parallel", "GPTNeoXForCausalLM")
    post = normswap.convert(model, "post")
    assert normswap.inspect(post).placement == "post"
    back = normswap.convert(post, "pre")
    assert type(back) is type(model) and back.config.use_parallel_residual is True
    for key, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key


def test_command_line_converts_and_the_output_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = perturbed("gpt_neox_parallel", "GPTNeoXForCausalLM")
    model.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--placement", "pre", "--quiet"]) == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dst", trust_remote_code=False).eval()
    assert type(loaded).__name__ == "GPTNeoXForCausalLM" and loaded.config.use_parallel_residual is False
    assert normswap.inspect(str(tmp_path / "dst")).placement == "pre"
    inputs = probe_inputs(model, None, None)
    assert torch.equal(_logits(loaded, inputs), _logits(normswap.convert(model, "pre"), inputs))
    ids = inputs["input_ids"][:1]
    assert loaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                           do_sample=False, pad_token_id=0).shape[-1] == ids.shape[-1] + 3


def test_sandwich_placement_change_reaches_the_placement() -> None:
    """It used to generate code, find it detects as mixed, and call that a normswap bug; then it was refused;
    now the out norms go as their calibrated stand-ins (tests/test_placements.py has the whole matrix)."""
    fields = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128}
    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**fields)).eval()
    for placement in ("pre", "post"):
        assert normswap.inspect(normswap.convert(model, placement)).placement == placement
