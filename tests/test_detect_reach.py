"""Detection on layers that scale their residual stream or carry several streams.

Tiny models are built from transformers configs. What ``inspect`` records is checked against the models
themselves: a residual gain must be the tensor that multiplies the stream a sublayer keeps (perturbing it
moves the layer output by exactly ``delta * stream``), an output scale the tensor the layer output is
proportional to, a constant the factor the modeling code computes. Refusals must name the structure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn
from transformers import CONFIG_MAPPING, PretrainedConfig, PreTrainedModel

import normswap
import normswap.cli
from normswap.conversion.verify import measure_drift, probe_inputs
from normswap.detect.norms import classify_norm, scales_to_unit_length
from normswap.topology import Topology

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB, FFN = 64, 2, 4, 2, 16, 128, 128
TOKENS = 6
SIZES = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
         "num_key_value_heads": KV_HEADS, "intermediate_size": FFN, "vocab_size": VOCAB}


def _perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter moved off its initial value (unit gains, zero rates would hide a wrong record)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, TOKENS), generator=torch.Generator().manual_seed(seed))


def _layer_output(model: nn.Module, layer_path: str, tokens: torch.Tensor,
                  stream_reader: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The hidden states ``layer_path`` returns, and the input of the module ``stream_reader`` in that run."""
    seen: dict[str, torch.Tensor] = {}

    def keep_output(module: nn.Module, args: tuple, output: Any) -> None:
        seen.setdefault("output", (output[0] if isinstance(output, tuple) else output).detach().clone())

    def keep_input(module: nn.Module, args: tuple) -> None:
        seen.setdefault("stream", args[0].detach().clone())

    handles = [model.get_submodule(layer_path).register_forward_hook(keep_output)]
    if stream_reader is not None:
        handles.append(model.get_submodule(stream_reader).register_forward_pre_hook(keep_input))
    try:
        with torch.no_grad():
            model(input_ids=tokens)
    finally:
        for handle in handles:
            handle.remove()
    return seen["output"], seen.get("stream")


@pytest.fixture(scope="module")
def doge() -> tuple[nn.Module, Topology]:
    from transformers import DogeConfig, DogeForCausalLM

    model = _perturbed(DogeForCausalLM(DogeConfig(**SIZES)))
    return model, normswap.inspect(model)


def test_a_learned_residual_gain_keeps_the_layout_and_is_recorded(doge: tuple[nn.Module, Topology]) -> None:
    model, topology = doge
    assert (topology.placement, topology.norm) == ("pre", "rmsnorm")
    assert not topology.identity_residual
    assert "scaled residual (per-channel gain)" in topology.summary()
    for layer in topology.layers:
        for sub in layer.sublayers:
            scale = sub.residual_scale
            assert scale is not None and (scale.form, scale.extent) == ("gain", "per-channel")
            (gain,) = scale.tensors
            assert gain.startswith(f"{layer.path}.") and model.get_parameter(gain).shape == (HIDDEN,)
            assert scale.describe() == f"per-channel gain {gain} ({scale.source})"
            assert scale.source.startswith("modeling_doge.py:")
        assert len({sub.residual_scale.tensors for sub in layer.sublayers}) == len(layer.sublayers)
    assert any("per-channel gain" in note for note in topology.notes)


def test_the_recorded_gain_is_what_multiplies_the_kept_stream(doge: tuple[nn.Module, Topology]) -> None:
    """``out = g * h + M(N(h))`` for the last sublayer: moving ``g`` by ``delta`` moves ``out`` by ``delta * h``,
    where ``h`` is the stream its pre norm reads."""
    model, topology = doge
    layer = topology.layers[0]
    last = layer.sublayers[-1]
    (gain,) = last.residual_scale.tensors
    (pre_norm,) = last.norms_in("pre")
    before, stream = _layer_output(model, layer.path, _tokens(), pre_norm.path)
    delta = torch.linspace(-1.0, 1.0, HIDDEN)
    parameter = model.get_parameter(gain)
    with torch.no_grad():
        parameter.add_(delta)
    try:
        after, _ = _layer_output(model, layer.path, _tokens())
    finally:
        with torch.no_grad():
            parameter.sub_(delta)
    torch.testing.assert_close(after - before, delta * stream, rtol=1e-4, atol=1e-5)


def test_constant_depth_scaled_residuals_carry_the_code_s_factor() -> None:
    from transformers import BeamConfig, BeamForCausalLM
    from transformers.models.beam import modeling_beam

    config = BeamConfig(**SIZES, head_dim=HEAD_DIM, moe_intermediate_size=FFN, num_experts=4, n_group=2,
                        topk_group=2, num_experts_per_tok=2)
    model = BeamForCausalLM(config)
    topology = normswap.inspect(model)
    assert (topology.placement, topology.norm) == ("sandwich", "rmsnorm")
    assert "scaled residual (constant gain)" in topology.summary()
    for layer, module in zip(topology.layers, model.model.layers, strict=True):
        indices = (module.attn_residual_add_idx, module.mlp_residual_add_idx)
        for sub, index in zip(layer.sublayers, indices, strict=True):
            kept = modeling_beam.depth_scaled_residual_add(torch.zeros(1), torch.ones(1), index)
            assert (sub.residual_scale.form, sub.residual_scale.extent) == ("gain", "constant")
            assert sub.residual_scale.value == pytest.approx(float(kept))
            assert [n.slot for n in sub.norms] == ["pre", "out"]  # the norm before the branch's scaling is seen


def test_a_stream_kept_on_the_unit_sphere_is_refused_by_name() -> None:
    """nGPT-style layers normalise the stream to length 1 (not unit RMS: no norm kind) before every add."""
    from transformers import DoryConfig, DoryForCausalLM

    config = DoryConfig(**{**SIZES, "num_hidden_layers": 3}, head_dim=HEAD_DIM, n_input_layers=1,
                        n_recurrent_layers=1, n_output_layers=1)
    with pytest.raises(normswap.TopologyError) as refused:
        normswap.inspect(DoryForCausalLM(config))
    message = str(refused.value)
    assert "through input_layernorm (DoryL2Norm), which scales each hidden state to length 1" in message
    assert "normswap converts residual transformers only" not in message


def test_a_layer_output_scale_and_a_per_layer_input_sublayer() -> None:
    from transformers import EmbeddingGemma2TextConfig, EmbeddingGemma2TextModel

    config = EmbeddingGemma2TextConfig(**SIZES, head_dim=HEAD_DIM, hidden_size_per_layer_input=HEAD_DIM,
                                       embedding_dim=HEAD_DIM, layer_types=["sliding_attention", "full_attention"])
    model = _perturbed(EmbeddingGemma2TextModel(config))
    topology = normswap.inspect(model)
    layer = topology.layers[0]
    assert [sub.placement for sub in layer.sublayers] == ["sandwich", "sandwich", "post-sublayer"]
    assert all(sub.residual_scale is None for sub in layer.sublayers)
    scale = layer.output_scale
    assert scale is not None and (scale.form, scale.extent) == ("output", "scalar")
    # the per-layer inputs' norm runs before the layers but is not the stream's: no embedding norm
    assert topology.embedding_norm is None and topology.final_norm.path == "norm"

    (tensor,) = scale.tensors
    before, _ = _layer_output(model, layer.path, _tokens())
    buffer = model.get_buffer(tensor)
    factor = 2.0
    with torch.no_grad():
        buffer.mul_(factor)
    try:
        after, _ = _layer_output(model, layer.path, _tokens())
    finally:
        with torch.no_grad():
            buffer.div_(factor)
    torch.testing.assert_close(after, factor * before)


def test_sampled_deep_config_moves_the_scale_records(write_config: Callable[[dict[str, Any]], Path]) -> None:
    from transformers import DogeConfig

    from normswap.detect.sampling import FULL_BUILD_LAYERS

    depth = FULL_BUILD_LAYERS + 6
    topology = normswap.inspect(write_config(DogeConfig(**{**SIZES, "num_hidden_layers": depth}).to_dict()))
    assert len(topology.layers) == depth and any(note.startswith("built ") for note in topology.notes)
    last = topology.layers[-1]
    assert [sub.residual_scale.tensors for sub in last.sublayers] == [
        (f"{last.path}.input_residual",), (f"{last.path}.post_attention_residual",)]


def test_scale_records_reach_the_json(doge: tuple[nn.Module, Topology]) -> None:
    _, topology = doge
    sublayer = topology.to_dict()["layers"][0]["sublayers"][0]
    assert sublayer["residual_scale"]["form"] == "gain" and sublayer["residual_scale"]["extent"] == "per-channel"
    assert topology.to_dict()["layers"][0]["output_scale"] is None


def test_plain_residual_adds_record_no_scale(write_config: Callable[[dict[str, Any]], Path]) -> None:
    from tiny_configs import TINY_CONFIGS

    topology = normswap.inspect(write_config(TINY_CONFIGS["llama"]))
    assert topology.identity_residual and "scaled residual" not in topology.summary()
    assert all(sub.residual_scale is None for layer in topology.layers for sub in layer.sublayers)


class _ToyConfig(PretrainedConfig):
    model_type = "normswap-test-reach"

    def __init__(self, hidden_size: int = HIDDEN, streams: int = 0, loops: int = 1, **kwargs: object) -> None:
        self.hidden_size, self.streams = hidden_size, streams  # streams > 0: mixed streams, else interpolation
        self.loops = loops  # the layers run this many times, with the model's own norm between the runs
        super().__init__(**kwargs)


class _InterpolatingLayer(nn.Module):
    """``h + r * (N2(F(N1(h))) - h)``: the stream keeps ``1 - r``; ``r`` computed from a parameter."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.out_norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.mlp = nn.Linear(hidden_size, hidden_size)
        self.rate = nn.Parameter(torch.full((hidden_size,), 0.05))
        self.rate_scale = 2.0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        update = self.out_norm(self.mlp(self.norm(hidden_states)))
        return hidden_states + (self.rate * self.rate_scale).abs() * (update - hidden_states)


class _MixedStreamsLayer(nn.Module):
    """Hyper-connections in small: ``n`` streams, a branch reads their mean, a matrix computed from them mixes them."""

    def __init__(self, hidden_size: int, streams: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.mlp = nn.Linear(hidden_size, hidden_size)
        self.mixing = nn.Linear(streams * hidden_size, streams * streams)

    def forward(self, hidden_streams: torch.Tensor) -> torch.Tensor:
        batch, tokens, streams, _ = hidden_streams.shape
        mixing = self.mixing(hidden_streams.flatten(2)).view(batch, tokens, streams, streams).softmax(-1)
        update = self.mlp(self.norm(hidden_streams.mean(2)))
        return update.unsqueeze(-2) + torch.matmul(mixing, hidden_streams)


class _ToyModel(PreTrainedModel):
    config_class = _ToyConfig
    main_input_name = "input_ids"

    def __init__(self, config: _ToyConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(VOCAB, config.hidden_size)
        self.layers = nn.ModuleList([
            _MixedStreamsLayer(config.hidden_size, config.streams) if config.streams
            else _InterpolatingLayer(config.hidden_size) for _ in range(LAYERS)])
        self.norm = nn.RMSNorm(config.hidden_size, eps=1e-6)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
        hidden_states = self.embed(input_ids)
        if self.config.streams:
            hidden_states = hidden_states.unsqueeze(2).expand(-1, -1, self.config.streams, -1)
        for loop in range(self.config.loops):
            hidden_states = self.norm(hidden_states) if loop else hidden_states
            for layer in self.layers:
                hidden_states = layer(hidden_states)
        return hidden_states.mean(2) if self.config.streams else hidden_states


def test_an_interpolating_residual_records_its_rate() -> None:
    model = _perturbed(_ToyModel(_ToyConfig()))
    topology = normswap.inspect(model)
    assert topology.placement == "sandwich" and "scaled residual (per-channel interpolation)" in topology.summary()
    layer = topology.layers[0]
    (sub,) = layer.sublayers
    assert [(n.path, n.slot) for n in sub.norms] == [(f"{layer.path}.norm", "pre"), (f"{layer.path}.out_norm", "out")]
    scale = sub.residual_scale
    assert (scale.form, scale.extent, scale.value) == ("interpolation", "per-channel", None)
    (rate,) = scale.tensors
    # a zero rate keeps the whole stream: the layer is the identity
    parameter = model.get_parameter(rate)
    with torch.no_grad():
        parameter.zero_()
        stream = torch.randn(1, TOKENS, HIDDEN, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(model.get_submodule(layer.path)(stream), stream)


def test_layers_run_again_with_a_norm_between_are_noted() -> None:
    loops = 3
    notes = normswap.inspect(_ToyModel(_ToyConfig(loops=loops))).notes
    assert f"{LAYERS} of the {LAYERS} layers of layers run more than once in one forward pass (up to {loops} times)" \
        in " ".join(notes)
    assert any(note.startswith("norm, a norm outside the layers, also runs between layers of layers") for note in notes)
    assert not any("run more than once" in note for note in normswap.inspect(_ToyModel(_ToyConfig())).notes)


def test_several_streams_mixed_by_a_matrix_are_refused_by_name() -> None:
    """The structure of DeepSeek-V4's hyper-connections (whose real layer takes a minute to trace)."""
    streams = 3
    with pytest.raises(normswap.TopologyError) as refused:
        normswap.inspect(_ToyModel(_ToyConfig(streams=streams)))
    message = str(refused.value)
    assert f"carries {streams} residual streams" in message
    assert "mixes them by a matrix computed from the streams (torch.matmul)" in message
    assert "shows no residual add" not in message


class _UnitLength(nn.Module):
    def __init__(self, eps: float, stretch: float = 1.0) -> None:
        super().__init__()
        self.eps, self.stretch = eps, stretch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stretch * x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + self.eps)


def test_unit_length_normalisation_is_told_apart_but_is_no_norm_kind() -> None:
    eps = 1e-6
    assert classify_norm(_UnitLength(eps), HIDDEN) is None
    assert scales_to_unit_length(_UnitLength(eps), HIDDEN)
    assert not scales_to_unit_length(_UnitLength(eps, stretch=math.sqrt(HIDDEN)), HIDDEN)  # unit RMS: an RMSNorm
    assert not scales_to_unit_length(nn.RMSNorm(HIDDEN), HIDDEN)  # has a weight: a norm candidate, not this


def test_a_residual_gain_stays_on_the_residual_path_of_a_placement_change(doge: tuple[nn.Module, Topology]) -> None:
    """The norm-shift mapping keeps what each branch reads (docs/design.md §2); nothing in it needs the residual
    path to be the identity. Doge's per-channel gains stay in the adds: ``h <- s * h + F`` becomes
    ``x <- post(s * x + F(x))``, and the way back returns every tensor bit for bit."""
    model, _ = doge
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    post = normswap.convert(model, placement="post")
    topology = normswap.inspect(post)
    assert topology.placement == "post" and "scaled residual (per-channel gain)" in topology.summary()
    report = measure_drift(model, post, normswap.inspect(model), topology, probe_inputs(model, None, None),
                           exact=False)
    assert report.sublayers[0].max_abs_diff == 0  # branch 0 reads exactly what it read before
    with torch.no_grad():
        before = post(input_ids=tokens).logits
        for layer in post.model.layers:  # the gains are read by the converted adds: without them, another output
            layer.input_residual.copy_(torch.ones_like(layer.input_residual))
        assert not torch.allclose(post(input_ids=tokens).logits, before, atol=1e-3)
    back = normswap.convert(normswap.convert(model, placement="post"), placement="pre")
    original = model.state_dict()
    assert {key: value for key, value in back.state_dict().items() if key in original}.keys() == original.keys()
    assert all(torch.equal(back.state_dict()[key], value) for key, value in original.items())


def test_a_per_channel_residual_gain_blocks_the_exact_extra_dimension_map(doge: tuple[nn.Module, Topology]) -> None:
    model, _ = doge
    with pytest.raises(normswap.NormswapError, match="scales its residual stream per channel"):
        normswap.convert(model, norm="layernorm", exact=True, untie=True)  # U(g * h) is no gain of U h
    converted = normswap.convert(model, norm="layernorm")  # the approximate norm-kind change does not need it
    assert normswap.inspect(converted).norm == "layernorm" and not converted.normswap_report.exact


def _jetmoe() -> nn.Module:
    """JetMoE's routing sizes ``torch.split`` by ``expert_size.tolist()``: no answer to a meta tensor keeps it
    consistent, so its meta forward cannot run."""
    config = CONFIG_MAPPING["jetmoe"](**{**SIZES, "kv_channels": HEAD_DIM, "intermediate_size": 32,
                                         "num_local_experts": 4, "num_experts_per_tok": 2})
    torch.manual_seed(0)
    return _perturbed(transformers.JetMoeForCausalLM(config))


def _imagegpt() -> nn.Module:
    """ImageGPT's layer norm mixes a CPU constant into a meta op, which meta tensors refuse."""
    config = CONFIG_MAPPING["imagegpt"](n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=64)
    torch.manual_seed(0)
    return _perturbed(transformers.ImageGPTForCausalImageModeling(config))


@pytest.mark.parametrize("build", [_jetmoe, _imagegpt], ids=["jetmoe", "imagegpt"])
def test_a_forward_that_meta_tensors_cannot_run_is_inspected_on_a_cpu_twin(build: Callable[[], nn.Module]) -> None:
    model = build()
    rng = torch.random.get_rng_state()
    topology = normswap.inspect(model)
    assert torch.equal(rng, torch.random.get_rng_state())  # the twin's drawn weights leave the caller's draws alone
    assert topology.placement == "pre" and topology.norm == "rmsnorm" and len(topology.layers) == LAYERS
    expected = ["input_layernorm", "post_attention_layernorm"] if build is _jetmoe else ["ln_1", "ln_2"]
    for layer in topology.layers:  # each layer's two sublayers read the norms the model has
        assert [sub.norms_in("pre")[0].path.rsplit(".", 1)[-1] for sub in layer.sublayers] == expected
    converted = normswap.convert(model, placement="post")  # the conversion's own meta passes take the twin too
    assert normswap.inspect(converted).placement == "post"


def test_a_model_too_large_for_a_cpu_twin_is_refused_with_the_step_that_needs_data(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("normswap.detect.capture.REAL_RUN_BYTES", 0)
    with pytest.raises(normswap.NormswapError) as refusal:
        normswap.inspect(_jetmoe())
    message = str(refusal.value)
    assert "modeling_jetmoe.py:" in message and "tolist()" in message and "GiB" in message, message


def test_a_childless_gate_that_adds_the_residual_is_traced_into() -> None:
    """MuseSpark adds its residual inside ``MuseSparkResidualGate(residual, hidden_states)``, a module without
    children, which tracing kept as one node: the layer showed no residual add and was refused."""
    config = transformers.AutoConfig.for_model(
        "muse_spark_text", hidden_size=64, intermediate_size=128, moe_intermediate_size=128, moe_hidden_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, vocab_size=128, max_position_embeddings=64)
    topology = normswap.inspect(transformers.AutoModel.from_config(config))
    gates = [sub.residual_scale for layer in topology.layers for sub in layer.sublayers]
    assert len(gates) == 4 and all(scale is not None and scale.per_channel for scale in gates)
    assert {scale.tensors for scale in gates} == {(f"layers.{i}.{name}_residual_gate.gate",)
                                                  for i in range(2) for name in ("post_attention", "post_feedforward")}
    assert topology.layers[0].sublayers[0].placement == "sandwich"


def test_a_stack_of_several_layer_classes_is_a_stack() -> None:
    """OLMo-Hybrid's ``model.layers`` holds a linear-attention layer class and an attention layer class, both
    called with the stream first: it was 'no list of layer modules'. It inspects as what it is: Pre-Norm linear
    attention layers beside OLMo-2-style post-sublayer attention layers."""
    config = transformers.AutoConfig.for_model(
        "olmo_hybrid", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, pad_token_id=0, max_position_embeddings=64,
        layer_types=["linear_attention", "full_attention"], linear_key_head_dim=12, linear_value_head_dim=24,
        linear_num_key_heads=4, linear_num_value_heads=4)
    topology = normswap.inspect(transformers.AutoModelForCausalLM.from_config(config))
    assert [layer.layer_class for layer in topology.layers] == ["OlmoHybridLinearAttentionDecoderLayer",
                                                                "OlmoHybridAttentionDecoderLayer"]
    assert [layer.placement for layer in topology.layers] == ["pre", "post-sublayer"]
    assert topology.placement == "mixed" and topology.final_norm.path == "model.norm"


def test_a_width_kept_in_the_config_of_the_module_holding_the_layers_is_read() -> None:
    """SAM 3's vision config names no hidden size: its ViT's sits in ``backbone_config``, which the ``backbone``
    module holding the layers carries as ``.config``. It was refused ("names no hidden size"); it is a Pre-LN
    ViT whose un-normalised stream is its ``last_hidden_state``, so LayerNorm -> RMSNorm is approximate."""
    config = transformers.AutoConfig.for_model(
        "sam3_vision_model", fpn_hidden_size=16, backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]],
        backbone_config={"model_type": "sam3_vit_model", "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": LAYERS, "num_attention_heads": 2, "image_size": 56, "patch_size": 14,
                         "window_size": 2, "global_attn_indexes": [1], "pretrain_image_size": 28})
    assert not any(isinstance(getattr(config, name, None), int) for name in ("hidden_size", "d_model", "embed_dim"))
    model = _perturbed(transformers.AutoModel.from_config(config))
    topology = normswap.inspect(model)
    assert topology.placement == "pre" and topology.stacks[0].path == "backbone.layers"
    assert topology.stacks[0].width == 32
    converted = normswap.convert(model, norm="rmsnorm")
    assert not getattr(converted.normswap_report, "exact", False)  # the exact map would centre last_hidden_state
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, found = (m(pixel_values=pixels).last_hidden_state for m in (model, converted))
    assert found.shape == expected.shape and torch.isfinite(found).all()
    assert normswap.inspect(converted).norm == "rmsnorm"


def _mistral_large4_text() -> nn.Module:
    config = CONFIG_MAPPING["mistral_large4_text"](
        hidden_size=HIDDEN, intermediate_size=FFN, moe_intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=64, head_dim=8, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
        n_group=2, topk_group=2, mlp_layer_types=["dense", "dense"])
    return _perturbed(transformers.AutoModel.from_config(config))


def test_a_read_that_only_picks_positions_is_no_norm_of_the_branch_input(tmp_path: Path) -> None:
    """Mistral Large 4's sparse-attention indexer normalises the attention's normed input again (q_input_norm) to
    choose the top-k keys: its values never reach the attention output, so q_input_norm is inside the branch.
    It was a second pre norm of another kind, and --placement post was refused ('layernorm, rmsnorm norms on the
    two sides'); in the Post-Norm form it would read as a pre norm of its own and the layout as mixed."""
    model = _mistral_large4_text()
    topology = normswap.inspect(model)
    assert topology.placement == "pre"
    attention = topology.layers[0].sublayers[0]
    assert [norm.path for norm in attention.norms] == ["layers.0.input_layernorm"]
    assert "layers.0.self_attn.indexer.q_input_norm" in {norm.path for norm in topology.layers[0].inner_norms}
    model.save_pretrained(tmp_path / "source")
    post = tmp_path / "post"
    assert normswap.cli.main(["convert", str(tmp_path / "source"), str(post), "--placement", "post", "--quiet"]) == 0
    converted = transformers.AutoModel.from_pretrained(post, trust_remote_code=True)
    target = normswap.inspect(converted)
    assert target.placement == "post"
    assert torch.equal(converted.layers[0].self_attn.indexer.q_input_norm.weight,
                       model.layers[0].self_attn.indexer.q_input_norm.weight)  # stays where it was
    drift = measure_drift(model, converted, topology, target, probe_inputs(model, None, None), exact=False)
    assert drift.sublayers[0].max_abs_diff == 0.0  # branch 0 reads what it read: the norm-shift's exact part


def test_exact_layer_norm_refuses_a_norm_of_a_stream_norm_by_name() -> None:
    """With the indexer's norm read as a branch norm, the exact map reached it and crashed in verification
    (an internal error: the norm's weight treated as a linear reader); it is refused with the structure."""
    from normswap.conversion.norm_change import plan_norm_kind

    with pytest.raises(normswap.NormswapError, match=r"indexer\.q_input_norm in mistral_large4_text normalises "
                                                     r"layers\.0\.input_layernorm's output again"):
        plan_norm_kind(_mistral_large4_text(), "layernorm", exact=True)


def _mobilebert(normalization_type: str) -> nn.Module:
    config = transformers.MobileBertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, embedding_size=32, intra_bottleneck_size=32,
                                           true_hidden_size=32, num_feedforward_networks=2,
                                           normalization_type=normalization_type)
    return transformers.MobileBertModel(config).eval()


def test_an_elementwise_affine_where_a_post_norm_would_be_is_refused_by_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """MobileBERT's default NoNorm computes ``x * w + b`` on the last residual add: no norm, and the refusal says
    so (it said only that the output came from another add); with LayerNorm the same model is Post-Norm."""
    assert normswap.inspect(_mobilebert("layer_norm")).placement == "post"
    _mobilebert("no_norm").save_pretrained(tmp_path / "mobilebert")
    capsys.readouterr()  # transformers' own progress bar of the save
    for command in (["inspect", str(tmp_path / "mobilebert")],
                    ["convert", str(tmp_path / "mobilebert"), str(tmp_path / "out"), "--placement", "pre"]):
        assert normswap.cli.main(command) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1
        assert ("MobileBertLayer (encoder.layer.0): the layer output is its last residual add times a weight plus a "
                "bias, channel by channel (output.bottleneck.LayerNorm, a NoNorm): an elementwise affine map, which "
                "normalises nothing") in lines[0]
    assert not (tmp_path / "out").exists()
