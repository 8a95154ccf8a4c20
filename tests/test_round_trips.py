"""Placement round trips X -> Y -> X through the branch-norm passes (issue 18, docs/design.md §6).

The way back to the placement of the model's stock family goes home to that family's transformers class: dropped
norms return bit for bit from the carried vectors, the tensors their stand-ins were folded into are unfolded in
float64 with the carried g and s, and norms the first conversion added are dropped at their carried scale; a
Post-Norm model goes back through the norm shift to Pre-Norm first. Every other tensor must come back within
``BOUND * max|W0|`` of the original (fp32: measured at most 9.7e-8 here, under one fp32 epsilon of 1.19e-7); the
carried data holds vectors and 0-d scales, never a matrix. The unfold divides by the norm's gain ``g``, which
multiplies the rounding of the folded fp32 tensor by ``1/g``: where a norm has a channel with ``|g| < SMALL_GAIN``
(the tiny StableLM's first norm has one at 0.0027), the bound grows by ``SMALL_GAIN / min|g|``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from test_convert_native import tiny_model
from test_layer_norm_exact_weightless import CONFIGS as WEIGHTLESS
from test_layer_norm_exact_weightless import perturbed as weightless_model

import normswap
from normswap.conversion import weights
from normswap.conversion.checkpoint import CARRIED_FILE
from normswap.conversion.plan import NormMove
from normswap.conversion.program import copy_of, run_step
from normswap.conversion.round_trip_carry import MEAN_PREFIX
from normswap.topology import OFFSET_NORM_KINDS

BOUND = 1e-6  # max|W - W0| <= BOUND * max|W0|, in fp32
SMALL_GAIN = 0.1  # a norm gain under this in size amplifies the unfold's rounding past BOUND

CASES = [
    ("gemma2", "Gemma2ForCausalLM", "pre"),
    ("gemma2", "Gemma2ForCausalLM", "post-sublayer"),
    ("gemma2", "Gemma2ForCausalLM", "post"),  # out norms dropped, then the norm shift; back through pre
    ("olmo2", "Olmo2ForCausalLM", "pre"),
    ("olmo2", "Olmo2ForCausalLM", "sandwich"),
    ("olmo2", "Olmo2ForCausalLM", "post"),
    ("llama", "LlamaForCausalLM", "sandwich"),
    ("llama", "LlamaForCausalLM", "post-sublayer"),
    ("gpt2", "GPT2LMHeadModel", "sandwich"),  # LayerNorms added, dropped again without their centring
    ("bert", "BertForMaskedLM", "sandwich"),  # Post-Norm: out norms added to its Pre-Norm twin; back by the shift
    ("gpt2", "GPT2LMHeadModel", "post-sublayer"),  # pre LayerNorms dropped: their centring undone by carried means
    ("bert", "BertForMaskedLM", "post-sublayer"),
    ("olmo", "OlmoForCausalLM", "sandwich"),  # weightless LayerNorms: the added ones, with weights, dropped again
    ("olmo", "OlmoForCausalLM", "post-sublayer"),
    ("nanochat", "NanoChatForCausalLM", "sandwich"),  # weightless, width-less RMSNorms: the added ones dropped again
    ("nanochat", "NanoChatForCausalLM", "post-sublayer"),
    ("bloom", "BloomForCausalLM", "sandwich"),  # out norms on the arguments of the module-level dropout_add
    ("bloom", "BloomForCausalLM", "post-sublayer"),
    ("opt_post", "OPTForCausalLM", "sandwich"),  # a Post-Norm decoder: through its Pre-Norm twin, back by the shift
    # Falcon-RW: the stock code's parallel-only in-place add (`mlp_output += attention_output`) is a line this
    # config never runs
    ("falcon_rw", "FalconForCausalLM", "sandwich"),
    ("falcon_rw", "FalconForCausalLM", "post-sublayer"),
    # readers without a bias (StableLM's q_proj, k_proj, v_proj and MLP; Falcon's query_key_value and
    # dense_h_to_4h): given one for the dropped LayerNorm's beta on the way out, and left behind on the way home,
    # where the restored norm adds beta again
    ("stablelm", "StableLmForCausalLM", "post-sublayer"),
    ("falcon_sequential", "FalconForCausalLM", "post-sublayer"),
    # one out norm on the term `hidden_states`, which is self.conv's output in the convolution layer and
    # self.self_attn's in the attention layer (LFM2's `if self.is_attention_layer:`)
    ("lfm2", "Lfm2ForCausalLM", "sandwich"),
    ("lfm2", "Lfm2ForCausalLM", "post-sublayer"),
]


def assert_home(original: torch.nn.Module, back: torch.nn.Module) -> None:
    """``back`` is the stock class of ``original`` with its norm vectors bit for bit and every other tensor within
    ``BOUND`` of the original's, relative to its largest entry."""
    assert type(back) is type(original) and type(back).__module__.startswith("transformers.")
    assert_same_weights(original, back)


def assert_same_weights(reference: torch.nn.Module, model: torch.nn.Module) -> None:
    """``model``'s norm vectors are ``reference``'s bit for bit, every other tensor within ``BOUND`` of its largest
    entry, in the same dtype."""
    sites = normswap.inspect(reference).all_norms
    norms = {norm.path for norm in sites}
    before, after = reference.state_dict(), model.state_dict()
    assert before.keys() == after.keys()
    gains = [before[f"{norm.path}.weight"].abs().min() if norm.kind not in OFFSET_NORM_KINDS else
             (before[f"{norm.path}.weight"] + 1).abs().min() for norm in sites if f"{norm.path}.weight" in before]
    bound = BOUND * max(1.0, SMALL_GAIN / float(min(gains, default=1.0)))
    for key, tensor in before.items():
        if key.rsplit(".", 1)[0] in norms:
            assert torch.equal(after[key], tensor), key
        else:
            assert after[key].dtype == tensor.dtype
            assert (after[key] - tensor).abs().max() <= bound * tensor.abs().max(), key


def assert_only_vectors_and_scales(carried: dict[str, torch.Tensor]) -> None:
    assert carried and all(tensor.dim() <= 1 for tensor in carried.values())
    assert any(tensor.dim() == 0 and tensor.dtype == torch.float64 for tensor in carried.values())


@pytest.mark.parametrize(("family", "model_class", "via"), CASES, ids=[f"{c[0]}-via-{c[2]}" for c in CASES])
def test_round_trip_goes_home(family: str, model_class: str, via: str) -> None:
    model = weightless_model(family) if family in WEIGHTLESS else tiny_model(family, model_class)
    with torch.no_grad():  # trained biases are not zero; an all-zero one would make the relative bound meaningless
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.add_(torch.randn_like(parameter) * 0.02)
    home = normswap.inspect(model).placement
    there = normswap.convert(model, via)
    assert normswap.inspect(there).placement == via and type(there) is not type(model)
    assert_only_vectors_and_scales(there.normswap_carried)
    # a dropped norm's vectors are those of the model the drop ran on: the source, or a Post-Norm source's Pre-Norm
    # twin (its own code after the norm shift, where the norms have moved)
    state = (normswap.convert(model, "pre", native=False) if home == "post" else model).state_dict()
    for key, tensor in there.normswap_carried.items():
        if tensor.dim() == 1 and not key.startswith(MEAN_PREFIX):
            assert torch.equal(tensor, state[key]), key
    back = normswap.convert(there, home)
    assert_home(model, back)
    assert normswap.inspect(back).placement == home
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the forward is the original's, up to rounding
        reference, logits = model(ids).logits, back(ids).logits
    assert (logits - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_cli_round_trip_goes_home_to_stock_transformers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from normswap.cli import main

    model = tiny_model("gemma2", "Gemma2ForCausalLM")
    model.save_pretrained(tmp_path / "source")
    there, back = tmp_path / "pre", tmp_path / "back"
    assert main(["convert", str(tmp_path / "source"), str(there), "--placement", "pre"]) == 0
    assert main(["convert", str(there), str(back), "--placement", "sandwich"]) == 0
    capsys.readouterr()
    assert_only_vectors_and_scales(load_file(str(there / CARRIED_FILE)))
    assert not (back / CARRIED_FILE).exists() and not list(back.glob("modeling_*.py"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(back)  # stock transformers, no remote code
    assert_home(model, loaded)


def test_layer_norm_folds_without_carried_means_take_the_ordinary_way(caplog: pytest.LogCaptureFixture) -> None:
    """A dropped LayerNorm's centring is undone only by its carried means: without them (a checkpoint from a normswap
    that carried none), GPT-2 pre -> post-sublayer -> pre converts through generated code, and says why."""
    model = tiny_model("gpt2", "GPT2LMHeadModel")
    there = normswap.convert(model, "post-sublayer")
    assert any(key.startswith(MEAN_PREFIX) for key in there.normswap_carried)
    there.normswap_carried = {key: value for key, value in there.normswap_carried.items()
                              if not key.startswith(MEAN_PREFIX)}
    with caplog.at_level(logging.WARNING, logger="normswap"):
        back = normswap.convert(there, "pre")
    assert normswap.inspect(back).placement == "pre" and type(back) is not type(model)
    assert "LayerNorm" in caplog.text and "mean" in caplog.text


def test_post_back_to_pre_restores_the_rescaled_pre_norms() -> None:
    """Gemma 2 -> post rescales its pre norms before the shift (stream_scale.py); going on to pre, the shift back
    restores them from the carried vectors: the result is Gemma 2 -> pre, up to the float64 unfold."""
    model = tiny_model("gemma2", "Gemma2ForCausalLM")
    direct = normswap.convert(model, "pre")
    through = normswap.convert(normswap.convert(model, "post"), "pre")
    assert type(through) is type(direct)
    assert_same_weights(direct, through)


def test_a_plain_final_norm_moves_into_an_offset_slot_as_g_minus_one_and_comes_home_bit_for_bit() -> None:
    """Muse Glimmer's layer norms are ``(1 + w)`` RMSNorms and its final norm a plain one. Going to post, the final
    norm becomes the last layer's post norm (the generated code's layers.1.input_layernorm, after the branch), an
    offset one, with weight ``g - 1`` (the same function, docs/design.md §6); the way back gives ``1 + w``, and the
    carried ``g`` where that is the incoming weight."""
    config = transformers.AutoConfig.for_model(
        "muse_glimmer_text", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"], bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    source = normswap.inspect(model)
    assert source.stacks[0].final_norm.kind == "rmsnorm"
    assert {norm.kind for norm in source.residual_norms} == {"rmsnorm-offset"}
    post = normswap.convert(model, "post")
    assert normswap.inspect(post).placement == "post"
    final_g = model.state_dict()["norm.weight"]
    assert torch.equal(post.state_dict()["layers.1.input_layernorm.weight"], (final_g.double() - 1).float())
    inputs = {"input_ids": torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(2))}
    back = normswap.convert(post, "sandwich")
    assert_home(model, back)
    with torch.no_grad():  # the way back computes what the original did
        assert torch.allclose(back(**inputs).last_hidden_state, model(**inputs).last_hidden_state, atol=1e-5)


def test_a_weight_whose_offset_form_rounds_comes_home_from_the_carried_original() -> None:
    """``1 + w`` in fp32 drops the low bits of a small ``w``, so ``(1 + w) - 1`` is not ``w``: the way back takes
    the carried ``w`` where it gives the incoming weight exactly, and the rounded difference where it does not
    (the weight was changed in between, by fine-tuning)."""
    w = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 1e-3
    there = (w.double() + 1).float()
    assert not torch.equal((there.double() - 1).float(), w)
    home = NormMove(0, "final", "layers.1.post", "final", "norm", target_kind="rmsnorm-offset",
                    source_kind="rmsnorm")
    assert weights._offset_changes(home)

    def way_back(incoming: torch.Tensor) -> torch.Tensor:
        return run_step(weights._reoffset(copy_of("g"), home, {"weight": w}), {"g": incoming})

    assert torch.equal(way_back(there), w)
    tuned = there + 1e-2
    assert torch.equal(way_back(tuned), (tuned.double() - 1).float())
