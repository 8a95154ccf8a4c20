"""Families the coverage matrix found crashing (issue 17), each converted as a user would.

Each case was an ``internal error`` before: a traceback's worth of normswap bug in one line. Now each
converts through the command line, loads as its card says and matches the in-memory conversion, or is
refused with the structural reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from test_convert_native import main_output
from weights_kit import assert_same_weights

import normswap
from normswap.cli import main
from normswap.conversion.verify import measure_drift, probe_inputs


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():  # norm weights away from 1, biases away from 0
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


def _converted_matches(model: torch.nn.Module, tmp_path: Path, flags: list[str], auto: str,
                       **in_memory: object) -> torch.nn.Module:
    """Convert ``model`` saved under tmp_path with ``flags``; the loaded result must equal ``normswap.convert``."""
    model.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), *flags, "--quiet"]) == 0
    loaded = getattr(transformers, auto).from_pretrained(tmp_path / "dst", trust_remote_code=True).eval()
    expected = normswap.convert(model, **in_memory)
    inputs = probe_inputs(model, None, None)
    with torch.no_grad():
        assert torch.allclose(main_output(loaded(**inputs)), main_output(expected(**inputs)), atol=1e-5)
    return loaded


def test_clip_text_post_copies_a_norm_whose_width_is_a_local_variable(tmp_path: Path) -> None:
    """CLIP builds its final norm as ``nn.LayerNorm(embed_dim, ...)`` after ``embed_dim = config.hidden_size``;
    the embedding norm copied from it into another method referred to a name that did not exist there."""
    config = transformers.CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=128, max_position_embeddings=64)
    model = _perturbed(transformers.CLIPTextModel(config))
    loaded = _converted_matches(model, tmp_path, ["--placement", "post"], "AutoModel", placement="post")
    assert normswap.inspect(loaded).placement == "post"
    source = (tmp_path / "dst" / "modeling_normswap_clip.py").read_text()
    assert "self.normswap_embedding_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)" in source


def test_cpmant_layer_norm_replaces_a_norm_built_from_the_config(tmp_path: Path) -> None:
    """``CpmAntLayerNorm(config)``: the LayerNorm standing in reads width and eps from the built norm."""
    config = transformers.CpmAntConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, dim_head=16,
                                       dim_ff=128, vocab_size=128, prompt_length=8, segment_types=8)
    model = _perturbed(transformers.CpmAntForCausalLM(config))
    loaded = _converted_matches(model, tmp_path, ["--norm", "layernorm"], "AutoModelForCausalLM",
                                norm="layernorm")
    assert normswap.inspect(loaded).norm.startswith("layernorm")
    norm = loaded.cpmant.encoder.output_layernorm
    assert norm.normalized_shape == (64,) and norm.eps == pytest.approx(config.eps)


def test_fsmt_probe_reads_the_decoder_vocabulary(tmp_path: Path) -> None:
    """FSMT's decoder has its own vocabulary (128 rows against the encoder's 1000): the probe's decoder ids
    used to be the encoder's, out of range."""
    config = transformers.FSMTConfig(langs=["en", "de"], src_vocab_size=1000, tgt_vocab_size=128, d_model=64,
                                     encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                     max_position_embeddings=64)
    model = _perturbed(transformers.FSMTForConditionalGeneration(config))
    inputs = probe_inputs(model, None, None)
    assert int(inputs["decoder_input_ids"].max()) < 128 and int(inputs["input_ids"].max()) >= 128
    model.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--norm", "rmsnorm", "--quiet"]) == 0
    loaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "dst", trust_remote_code=True)
    with torch.no_grad():
        assert torch.isfinite(loaded.eval()(**inputs).logits).all()


def test_stages_of_several_widths_are_stacks_of_their_own(tmp_path: Path) -> None:
    """SegFormer keeps a list of stages, each with a patch embedding (its LayerNorm: the embedding norm), a list of
    Pre-LN layers of the stage's width and a final norm. It was refused as 'no single residual width'; each stage
    is a stack, and the stage class's own loop takes the generated code."""
    config = transformers.SegformerConfig(num_encoder_blocks=2, depths=[2, 2], sr_ratios=[2, 1], hidden_sizes=[32, 64],
                                          patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                                          mlp_ratios=[2, 2], image_size=32)
    model = _perturbed(transformers.SegformerModel(config))
    topology = normswap.inspect(model)
    assert [(s.path, s.width, s.embedding_norm.path, s.final_norm.path) for s in topology.stacks] == [
        (f"stages.{i}.blocks", width, f"stages.{i}.patch_embeddings.layer_norm", f"stages.{i}.layer_norm")
        for i, width in enumerate((32, 64))]
    converted = normswap.convert(model, norm="rmsnorm")
    assert converted.normswap_report.exact and converted.normswap_report.relative < 1e-5
    loaded = _converted_matches(model, tmp_path, ["--placement", "post"], "AutoModel", placement="post")
    assert normswap.inspect(loaded).placement == "post"


def _pvt() -> torch.nn.Module:
    config = transformers.PvtConfig(num_encoder_blocks=2, depths=[1, 1], sequence_reduction_ratios=[2, 1],
                                    hidden_sizes=[32, 64], patch_sizes=[4, 2], strides=[4, 2],
                                    num_attention_heads=[1, 2], mlp_ratios=[2, 2], image_size=32)
    return _perturbed(transformers.PvtModel(config))


def _glpn() -> torch.nn.Module:
    config = transformers.GLPNConfig(num_encoder_blocks=2, depths=[1, 2], sr_ratios=[2, 1], hidden_sizes=[32, 64],
                                     patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                                     mlp_ratios=[2, 2], decoder_hidden_size=32)
    return _perturbed(transformers.GLPNModel(config))


def test_a_stage_list_whose_stages_hand_on_no_final_norm_keeps_the_exact_rms_norm_map_out() -> None:
    """PVT keeps the patch embeddings (no residual add: not a stack) and the stages' layer lists in lists of their
    own, all run by one loop of its encoder. The exact RMSNorm map would centre each stage's stream before its
    layers, inside that loop; but PVT's first stage hands its stream on with no final norm, to the next stage's
    patch embedding, which would read the centred stream: it gives way to the approximate map, saying so."""
    model = _pvt()
    topology = normswap.inspect(model)
    assert [s.path for s in topology.stacks] == ["encoder.block.0", "encoder.block.1"]
    converted = normswap.convert(model, norm="rmsnorm")
    assert not converted.normswap_report.exact
    assert "encoder.block.0, a stage that one loop of its model runs with the others, hands its stream on with no " \
           "final norm" in converted.normswap_plan.exact_impossible


def test_a_stage_list_whose_stages_end_in_norms_goes_to_rms_norm_exactly(tmp_path: Path) -> None:
    """GLPN's stages each end in a norm (kept in a list beside the stages), so centring each stage's stream before
    its layers, inside the loop over the stages, keeps the model: ``--norm rmsnorm`` is exact (it was approximate,
    with no place to centre the stream)."""
    model = _glpn()
    loaded = _converted_matches(model, tmp_path, ["--norm", "rmsnorm"], "AutoModel", norm="rmsnorm")
    report = json.loads((tmp_path / "dst" / "normswap_report.json").read_text())
    assert report["exact"] and report["relative"] < 1e-5
    assert normswap.inspect(loaded).norm == "rmsnorm"
    source = (tmp_path / "dst" / "modeling_normswap_glpn.py").read_text()
    assert "hidden_states = hidden_states - hidden_states.mean(-1, keepdim=True)" in source


@pytest.mark.parametrize("build", [_pvt, _glpn], ids=["pvt", "glpn"])
def test_stage_lists_run_by_one_loop_take_one_stack_norm_per_stage_inside_it(
        build: Callable[[], torch.nn.Module], tmp_path: Path) -> None:
    """PVT and GLPN run every stage's layer list from one loop of their encoder, which once refused Post-Norm (no
    one place before one stage's layers). Each stage's new embedding norm is now an item of a module list, built as
    a fresh copy of the stage's first layer's norm and picked by the stage loop's index just before the stage's
    layers; GLPN's stage norms, kept in a list beside the stages, become placeholders. The norm-shift holds stage
    by stage: the embedding norm takes the first pre norm, the last layer's add the stage's final norm (PVT's last
    stage, every GLPN stage), branch 0 reads what it read (PVT; GLPN's patch-embedding norm has no target slot and
    is carried), and the way back is bit for bit."""
    model = build()
    source = normswap.inspect(model)
    loaded = _converted_matches(model, tmp_path, ["--placement", "post"], "AutoModel", placement="post")
    target = normswap.inspect(loaded)
    assert target.placement == "post"
    assert [s.embedding_norm.path for s in target.stacks] == [f"encoder.normswap_embedding_norm.{i}" for i in (0, 1)]
    with torch.no_grad():
        assert torch.isfinite(main_output(loaded(**probe_inputs(model, None, None)))).all()
    for index, stack in enumerate(source.stacks):
        first, last = model.encoder.block[index][0], loaded.encoder.block[index][-1]
        assert torch.equal(loaded.encoder.normswap_embedding_norm[index].weight, first.layer_norm_1.weight)
        if stack.final_norm is not None:
            final = model.get_submodule(stack.final_norm.path)
            assert torch.equal(last.layer_norm_1.weight, final.weight)
            assert torch.equal(last.layer_norm_1.bias, final.bias)
    report = json.loads((tmp_path / "dst" / "normswap_report.json").read_text())
    if source.stacks[0].embedding_norm is None:
        assert report["sublayers"][0]["max_abs_diff"] == 0.0  # branch 0 reads exactly what it read before
    else:
        assert any("patch_embeddings.0.layer_norm is dropped" in note for note in report["plan"]["notes"])
    assert main(["convert", str(tmp_path / "dst"), str(tmp_path / "back"), "--placement", "pre", "--quiet"]) == 0
    assert_same_weights(tmp_path / "src", tmp_path / "back")


def test_stages_whose_first_layers_hold_their_norm_apart_share_no_list_of_stage_norms() -> None:
    """One expression builds a stage list's new norms, copying each stage's first layer's norm by one path: stages
    that hold it under different paths would each add a list of their own, so they are refused."""
    from normswap.codegen.derive import CodegenError, require_one_stage_norm_list
    from normswap.codegen.edits import AddStackNorm

    lists = [AddStackNorm("Encoder", "block", "normswap_embedding_norm", "before", layer, norm, True, per_stage=True)
             for layer, norm in (("LayerA", "norm1"), ("LayerB", "ln_1"))]
    require_one_stage_norm_list(lists[:1])
    with pytest.raises(CodegenError, match="hold their first layer's norm as norm1 and as ln_1"):
        require_one_stage_norm_list(lists)


def test_a_layer_norm_built_from_a_name_the_stage_lacks_is_copied_from_the_first_layer(tmp_path: Path) -> None:
    """CvT's layer builds its norm as ``nn.LayerNorm(embed_dim)`` from its own argument, which the stage class
    that runs the loop does not have: copying the constructor raised NameError when loaded (an internal error),
    then was refused. The new embedding norm is now a fresh copy of the first layer's, built after the layers.
    Its stochastic depth (``CvtDropPath``, identity at inference) wraps the whole layer output and is seen
    through; the second stage reads the first, whose output the placement change moves."""
    config = transformers.CvtConfig(embed_dim=[16, 32], num_heads=[1, 2], depth=[2, 2], patch_sizes=[7, 3],
                                    patch_stride=[4, 2], patch_padding=[2, 1], stride_kv=[2, 2], padding_kv=[1, 1],
                                    kernel_qkv=[3, 3], mlp_ratio=[2.0, 2.0], attention_drop_rate=[0.0, 0.0],
                                    drop_rate=[0.0, 0.0], drop_path_rate=[0.0, 0.1], qkv_bias=[True, True],
                                    cls_token=[False, True], qkv_projection_method=["dw_bn", "dw_bn"],
                                    padding_q=[1, 1], stride_q=[1, 1])
    model = _perturbed(transformers.CvtModel(config))
    assert [s.width for s in normswap.inspect(model).stacks] == [16, 32]
    loaded = _converted_matches(model, tmp_path, ["--placement", "post"], "AutoModel", placement="post")
    topology = normswap.inspect(loaded)
    assert topology.placement == "post"
    assert [s.embedding_norm.path for s in topology.stacks] == [
        f"encoder.stages.{index}.normswap_embedding_norm" for index in (0, 1)]
    assert [loaded.get_submodule(f"encoder.stages.{index}.normswap_embedding_norm").weight.shape[0]
            for index in (0, 1)] == [16, 32]
    source = (tmp_path / "dst" / "modeling_normswap_cvt.py").read_text()
    assert "self.normswap_embedding_norm = normswap_fresh_copy(self.layers[0].layernorm_before)" in source


def test_funnel_whose_blocks_one_loop_runs_is_refused_not_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Funnel's encoder keeps its blocks as a list of layer lists. Detection once missed them, and the norm-shift
    moved the embedding norm into the decoder, whose branch 0 then read something else (a bad output, exit 0);
    then the branch-0 check refused it. Each block is a stack now, and one loop of the encoder runs them all; a
    block's final norm would go inside that loop, after the block's layers, but they read ``query``, which the loop
    sets from ``hidden``, the name that carries the stream: a norm of ``query`` there would normalise nothing the
    next block reads, so it is refused with that reason."""
    config = transformers.FunnelConfig(block_sizes=[1, 1], d_model=64, n_head=4, d_head=16, d_inner=128,
                                       vocab_size=128)
    _perturbed(transformers.FunnelModel(config)).save_pretrained(tmp_path / "src")
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--placement", "pre", "--quiet"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "read query, which is not what they hand on" in error[0]
    assert not (tmp_path / "dst").exists()


def test_a_branch_reading_the_raw_stream_rules_the_exact_rms_norm_map_out_and_converts_approximately() -> None:
    """ModernBERT's first attention reads the stream through an Identity placeholder; centring the stream would
    change its input. It used to be refused as 'residual norms are identity, layernorm-nobias', then with this
    reason; the exact map is impossible, the conversion is not: the norms become RMSNorms, and the plan says why."""
    from normswap.conversion.norm_kind import plan_rms_norm
    from normswap.errors import ExactImpossibleError

    config = transformers.ModernBertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, vocab_size=128, pad_token_id=0,
                                           bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    model = _perturbed(transformers.ModernBertModel(config))
    with pytest.raises(ExactImpossibleError, match="identity placeholder") as error:
        plan_rms_norm(model)
    assert "layers.0.attn_norm" in str(error.value) and "centres the stream" in str(error.value)
    converted = normswap.convert(model, norm="rmsnorm")
    assert not converted.normswap_report.exact and "layers.0.attn_norm" in converted.normswap_plan.exact_impossible
    topology = normswap.inspect(converted)
    assert {n.kind for n in topology.all_norms if n.kind != "identity"} == {"rmsnorm"}


def test_auto_map_names_a_class_where_the_family_maps_an_auto_class_to_several() -> None:
    """transformers maps AutoModel to (FunnelModel, FunnelBaseModel) for Funnel; the generated auto_map lacked
    AutoModel, so the output loaded in no way although its architectures named FunnelModel."""
    from normswap.conversion.norm_change import plan_norm_kind

    config = transformers.FunnelConfig(block_sizes=[1, 1], d_model=64, n_head=4, d_head=16, d_inner=128,
                                       vocab_size=128)
    setup = plan_norm_kind(transformers.FunnelModel(config), "rmsnorm")
    assert setup.target_config.auto_map["AutoModel"].endswith(".FunnelModel")


def test_a_norm_chosen_by_a_conditional_is_replaced_whole(tmp_path: Path) -> None:
    """Cohere2-MoE builds ``self.norm = (RMSNorm(...) if config.rms_norm_eps is not None else LayerNorm(...))``:
    the edit applied zero times and the conversion was refused as a failed rewrite."""
    config = transformers.Cohere2MoeConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           num_experts=4, num_experts_per_tok=2, vocab_size=128,
                                           max_position_embeddings=64, bos_token_id=1)
    model = _perturbed(transformers.Cohere2MoeForCausalLM(config))
    source = normswap.inspect(model)
    assert source.norm.startswith("layernorm")
    converted = normswap.convert(model, norm="rmsnorm")
    assert converted.normswap_report.exact and normswap.inspect(converted).norm == "rmsnorm"
    loaded = _converted_matches(model, tmp_path, ["--placement", "post"], "AutoModelForCausalLM", placement="post")
    assert normswap.inspect(loaded).placement == "post"


def test_a_norm_of_the_patches_that_positions_follow_is_not_on_the_stream() -> None:
    """AIMv2 normalises its patch embeddings with an RMSNorm and then adds positions: the norm computes the
    stream's first value, it does not normalise the stream (once it was taken for the embedding norm, and
    ``--norm layernorm`` left it while replacing it was planned: 'mixed', a bad output). It is no stream norm now,
    a norm-kind change leaves it as it is, and the result inspects as LayerNorm throughout its residual path."""
    config = transformers.Aimv2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=28, patch_size=14)
    model = _perturbed(transformers.Aimv2VisionModel(config))
    assert normswap.inspect(model).stacks[0].embedding_norm is None
    converted = normswap.convert(model, norm="layernorm")
    topology = normswap.inspect(converted)
    assert topology.norm == "layernorm" and topology.stacks[0].embedding_norm is None
    assert torch.equal(converted.embeddings.rms_norm.weight, model.embeddings.rms_norm.weight)


def test_weightless_rms_norms_become_weightless_layer_norms(tmp_path: Path) -> None:
    """NanoChat's RMSNorms have no weight and no width (``NanoChatRMSNorm(eps=...)``); ``--norm layernorm`` was
    refused with 'starts from a model whose norms are RMSNorms', though they are."""
    config = transformers.NanoChatConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = _perturbed(transformers.NanoChatForCausalLM(config))
    assert normswap.inspect(model).norm == "rmsnorm-noaffine"
    loaded = _converted_matches(model, tmp_path, ["--norm", "layernorm"], "AutoModelForCausalLM", norm="layernorm")
    topology = normswap.inspect(loaded)
    assert topology.norm == "layernorm-noaffine" and topology.stacks[0].embedding_norm.kind == "layernorm-noaffine"
    assert not [key for key in loaded.state_dict() if "layernorm" in key or key.startswith("model.norm")]
    inputs = probe_inputs(model, None, None)
    with torch.no_grad():  # the same function but for the mean each norm now removes: close, not equal
        original, converted = main_output(model(**inputs)), main_output(loaded(**inputs))
    cosine = torch.nn.functional.cosine_similarity(original.flatten(), converted.flatten(), dim=0)
    assert 0.9 < cosine < 1 - 1e-6
    assert loaded.generate(inputs["input_ids"], max_new_tokens=3, do_sample=False).shape[-1] == inputs[
        "input_ids"].shape[-1] + 3


def test_offset_rms_norms_become_plain_beside_other_rms_norms() -> None:
    """Muse Glimmer's layer norms are (1 + w) RMSNorms, its final norm a plain one and its embedding norm a
    weightless one; ``--norm rmsnorm`` was refused as 'for models with norms after their sublayers'."""
    config = transformers.CONFIG_MAPPING["muse_glimmer_text"](
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=128, max_position_embeddings=64, layer_types=["sliding_attention", "full_attention"])
    model = _perturbed(transformers.AutoModel.from_config(config))
    before = normswap.inspect(model)
    assert {n.kind for n in before.all_norms} == {"rmsnorm-offset", "rmsnorm", "rmsnorm-noaffine"}
    converted = normswap.convert(model, norm="rmsnorm")
    assert converted.normswap_report.exact
    after = normswap.inspect(converted)
    assert {n.kind for n in after.all_norms} == {"rmsnorm", "rmsnorm-noaffine"}
    inputs = probe_inputs(model, None, None)
    with torch.no_grad():
        reference, actual = main_output(model(**inputs)), main_output(converted(**inputs))
    assert float((reference - actual).abs().max()) <= 1e-5 * float(reference.abs().max())
    offset = next(n.path for n in before.residual_norms)
    assert torch.allclose(converted.get_submodule(offset).weight, 1 + model.get_submodule(offset).weight)


def test_a_norm_that_computes_more_than_a_norm_is_not_replaced() -> None:
    """AXK2's gated RMSNorm is a norm followed by a gate MLP; replacing its class crashed the generated code
    (StopIteration: no eps of its own) and would have dropped the gate."""
    from torch import nn

    from normswap.codegen.derive import CodegenError, require_plain_norm

    class GatedNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.gate = nn.Linear(8, 8)

    model = nn.Module()
    model.plain, model.gated = nn.LayerNorm(8), GatedNorm()
    require_plain_norm(model, "plain")
    with pytest.raises(CodegenError, match="computes more than a norm"):
        require_plain_norm(model, "gated")


def test_a_norm_that_a_conditional_builds_in_some_layers_changes_kind_where_others_build_a_gate(
        tmp_path: Path) -> None:
    """AXK2 builds ``post_attention_layernorm`` as a gated RMSNorm in its MoE layers and a plain RMSNorm in its
    dense ones: the residual norm is the attribute in one layer and its ``.norm`` in the other. Replacing the
    whole conditional was refused (it would drop the gate); only the plain norm's call is replaced now."""
    config = transformers.AXK2Config(hidden_size=64, intermediate_size=128, moe_intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                     mlp_layer_types=["dense", "sparse"], n_routed_experts=4, num_experts_per_tok=2,
                                     n_group=None, topk_group=None, q_lora_rank=32, kv_lora_rank=32,
                                     qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, gated_norm_rank=16,
                                     vocab_size=128, max_position_embeddings=64)
    model = _perturbed(transformers.AXK2ForCausalLM(config))
    loaded = _converted_matches(model, tmp_path, ["--norm", "layernorm"], "AutoModelForCausalLM", norm="layernorm")
    assert normswap.inspect(loaded).norm == "layernorm"
    gated = [type(layer.post_attention_layernorm).__name__ for layer in loaded.model.layers]
    assert gated[0] == "NormswapLayerNorm" and gated[1] == "AXK2GatedRMSNorm", gated
    assert type(loaded.model.layers[1].post_attention_layernorm.norm).__name__ == "NormswapLayerNorm"


def test_an_add_inside_a_module_level_helper_is_wrapped_where_the_layer_calls_it(tmp_path: Path) -> None:
    """GPT-NeoX-Japanese adds its residual inside ``bias_dropout_add``, a module-level function: Pre -> Post was
    refused as 'in a module-level function'. The layer's two calls of it are wrapped in order."""
    config = transformers.GPTNeoXJapaneseConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_multiple_size=2, vocab_size=128,
                                                max_position_embeddings=64)
    model = _perturbed(transformers.GPTNeoXJapaneseForCausalLM(config))
    loaded = _converted_matches(model, tmp_path, ["--placement", "post"], "AutoModelForCausalLM", placement="post")
    assert normswap.inspect(loaded).placement == "post"
    source = (tmp_path / "dst" / "modeling_normswap_gpt_neox_japanese.py").read_text()
    assert source.count("= self.post_attention_layernorm(bias_dropout_add(") == 1
    assert source.count("= self.input_layernorm(bias_dropout_add(") == 1


def test_a_helper_add_called_from_a_branch_module_is_wrapped_where_the_layer_calls_that_module(tmp_path: Path) -> None:
    """BLOOM's ``dropout_add`` is called inside BloomAttention and BloomMLP, which cannot reach BloomBlock's norms
    (it was refused): the layer's call of each module is wrapped, the attention's tuple by its sum's item alone."""
    config = transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=128)
    model = _perturbed(transformers.BloomForCausalLM(config))
    loaded = _converted_matches(model, tmp_path, ["--placement", "post"], "AutoModelForCausalLM", placement="post")
    assert normswap.inspect(loaded).placement == "post"
    source = (tmp_path / "dst" / "modeling_normswap_bloom.py").read_text()
    assert source.count("normswap_norm_item(self.post_attention_layernorm, self.self_attention(") == 1
    assert source.count("= self.input_layernorm(self.mlp(") == 1
    prompt = torch.tensor([[5, 17, 42, 7]])
    cached, uncached = (loaded.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=use_cache)
                        for use_cache in (True, False))
    assert torch.equal(cached, uncached)
    assert main(["convert", str(tmp_path / "dst"), str(tmp_path / "back"), "--placement", "pre", "--quiet"]) == 0
    assert_same_weights(tmp_path / "src", tmp_path / "back")


def test_the_helper_call_that_adds_in_this_configuration_is_the_traced_one(tmp_path: Path) -> None:
    """Falcon's layer calls ``dropout_add`` twice, and its parallel configuration skips the first call: which one
    adds was refused as a run-time choice; the trace names the calling line of the add."""
    config = transformers.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                                       parallel_attn=True, new_decoder_architecture=False)
    model = _perturbed(transformers.FalconForCausalLM(config))
    loaded = _converted_matches(model, tmp_path, ["--placement", "post"], "AutoModelForCausalLM", placement="post")
    assert normswap.inspect(loaded).placement == "post"
    source = (tmp_path / "dst" / "modeling_normswap_falcon.py").read_text()
    assert source.count("dropout_add(") == 3  # its definition and the two calls
    assert source.count("(dropout_add(mlp_output, residual,") == 1  # the call that adds here, wrapped
    assert main(["convert", str(tmp_path / "dst"), str(tmp_path / "back"), "--placement", "pre", "--quiet"]) == 0
    assert normswap.inspect(tmp_path / "back").placement == "parallel"


def test_a_wrapper_without_an_auto_model_entry_inspects_and_re_inspects(tmp_path: Path) -> None:
    """``EncoderDecoderModel`` has no AutoModel entry: inspecting it (and the normswap output, re-inspected as
    the coverage matrix does) failed with 'Unrecognized configuration class'."""
    bert = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 128, "max_position_embeddings": 64}
    config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(
        transformers.BertConfig(**bert), transformers.BertConfig(**bert, is_decoder=True, add_cross_attention=True))
    config.decoder_start_token_id, config.pad_token_id = 1, 0
    model = _perturbed(transformers.EncoderDecoderModel(config))
    model.save_pretrained(tmp_path / "src")
    source = normswap.inspect(tmp_path / "src")
    assert source.placement == "post" and len(source.stacks) == 2
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--placement", "pre", "--quiet"]) == 0
    converted = normswap.inspect(tmp_path / "dst", trust_remote_code=True)
    assert converted.placement == "pre" and len(converted.stacks) == 2


def test_a_norm_in_a_module_list_is_called_by_index() -> None:
    """LongCat-Flash calls ``self.input_layernorm[1](h)``: the rewrite built ``self.input_layernorm.1(...)``,
    which is no Python (a ParserSyntaxError crash), and did not recognise the indexed call to unwrap."""
    import libcst as cst

    from normswap.codegen.rewrite import _self_attribute, _self_call

    call = _self_call("post_attention_layernorm.1", cst.Name("h"))
    assert cst.Module([]).code_for_node(call) == "self.post_attention_layernorm[1](h)"
    assert _self_attribute(call.func) == "post_attention_layernorm.1"
    assert _self_attribute(cst.parse_expression("self.blocks[0].norm")) == "blocks.0.norm"
    # XLM's loop by index: ``self.layer_norm1[i]`` stands for each item, and is written back with the loop's index
    assert _self_attribute(cst.parse_expression("self.norms[i]")) == "norms.*"
    assert cst.Module([]).code_for_node(_self_call("norms.*", cst.Name("h"), "i")) == "self.norms[i](h)"
    assert _self_attribute(cst.parse_expression("self.norms[i + 1]")) is None


def test_a_branch_that_reads_an_earlier_sublayer_s_norm_blocks_placement_changes() -> None:
    """LongCat-Flash's shortcut MoE reads the first MLP's norm and adds at the end of the layer: no sequence of
    ``h + F(norm(h))`` steps, so the norm-shift mapping has no place for it (the rewrite crashed before)."""
    config = transformers.LongcatFlashConfig(hidden_size=64, ffn_hidden_size=128, expert_ffn_hidden_size=128,
                                             num_layers=1, num_attention_heads=4, n_routed_experts=4,
                                             moe_topk=2, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8,
                                             qk_nope_head_dim=16, v_head_dim=16, head_dim=8, vocab_size=128,
                                             max_position_embeddings=64)
    model = _perturbed(transformers.LongcatFlashForCausalLM(config))
    with pytest.raises(normswap.NormswapError, match="a branch that skips sublayers") as error:
        normswap.convert(model, placement="post")
    assert "post_attention_layernorm.0 in sublayer 1 and again in sublayer 4" in str(error.value)
    converted = normswap.convert(model, norm="layernorm")  # its norms are pairs built in one list expression
    assert normswap.inspect(converted).norm == "layernorm"


def test_a_converted_model_whose_output_is_not_finite_is_not_written() -> None:
    """Falcon-H1's --norm layernorm wrote a model whose output was NaN (a buffer its loaded code left
    uninitialised) with exit 0 and 'output cosine nan'. A converted output that holds NaN or Inf where the
    original's is finite now fails verification, naming the first branch that reads one."""
    from normswap.conversion.verify import VerificationError, measure_drift

    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    model = _perturbed(transformers.GPT2LMHeadModel(config))
    converted = normswap.convert(model, placement="post")
    with torch.no_grad():
        converted.transformer.h[0].mlp.c_fc.bias.fill_(float("inf"))  # layer 1 reads what it writes
    inputs = probe_inputs(model, None, None)
    with pytest.raises(VerificationError, match="outputs NaN or Inf on the probe inputs") as error:
        measure_drift(model, converted, normswap.inspect(model), normswap.inspect(converted), inputs, exact=False)
    assert "transformer.h.1" in str(error.value) and "nothing is written" in str(error.value)


def test_generated_code_initialises_non_persistent_buffers_on_loading_as_stock_does(tmp_path: Path) -> None:
    """transformers takes any code outside its package for custom code and skips initialising a module without
    tensors of its own; FalconH1Model fills its layers' non-persistent ``mup_vector`` there, so the loaded
    generated model held uninitialised memory (NaN output). It now loads them as stock does."""
    config = transformers.FalconH1Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_d_state=16,
                                         mamba_chunk_size=16, ssm_multipliers=[0.5, 2.0, 3.0, 0.25, 1.5])
    model = _perturbed(transformers.FalconH1ForCausalLM(config))
    loaded = _converted_matches(model, tmp_path, ["--norm", "layernorm"], "AutoModelForCausalLM", norm="layernorm")
    stock = model.model.layers[1].mamba.mup_vector
    assert not torch.all(stock == 1)  # the multipliers shape it, so a fresh torch.ones would not pass
    assert torch.equal(loaded.model.layers[1].mamba.mup_vector, stock)


@pytest.mark.parametrize("family", ["roberta-prelayernorm", "mpt"])
def test_an_add_inside_a_child_module_is_wrapped_where_its_caller_calls_it(tmp_path: Path, family: str) -> None:
    """RoBERTa-PreLayerNorm adds inside ``SelfOutput``/``Output`` and MPT inside ``MptMLP``, while the norm that
    must follow the add belongs to the module that calls them: Pre -> Post was refused ('not reachable from').
    The call is wrapped one frame out (``self.LayerNorm(self.output(...))``); MPT's new embedding norm also keeps
    the ``self.norm_f.bias = None`` its constructor is followed by, or it would detect as another kind."""
    if family == "mpt":
        config = transformers.MptConfig(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, vocab_size=128,
                                        max_seq_len=64)
        model, auto, file = transformers.MptForCausalLM(config), "AutoModelForCausalLM", "mpt"
        wrapped = "self.norm_1(self.ffn(layernorm_output, residual))"
    else:
        config = transformers.RobertaPreLayerNormConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                        num_attention_heads=4, vocab_size=128,
                                                        max_position_embeddings=72)
        model, auto = transformers.RobertaPreLayerNormForMaskedLM(config), "AutoModelForMaskedLM"
        file, wrapped = "roberta_prelayernorm", "self.intermediate.LayerNorm(self.output(intermediate_output, "
    loaded = _converted_matches(_perturbed(model), tmp_path, ["--placement", "post"], auto, placement="post")
    assert normswap.inspect(loaded).placement == "post"
    source = (tmp_path / "dst" / f"modeling_normswap_{file}.py").read_text()
    assert wrapped in source
    if family == "mpt":
        assert "self.normswap_embedding_norm.bias = None" in source


@pytest.mark.parametrize("flags, in_memory", [(["--placement", "post"], {"placement": "post"}),
                                              (["--norm", "rmsnorm"], {"norm": "rmsnorm"})])
def test_a_dual_encoder_whose_hidden_states_are_nested_outputs_converts(
        tmp_path: Path, flags: list[str], in_memory: dict[str, str]) -> None:
    """TIPSv2 returns its text tower's hidden states inside ``text_model_output``; verification looked only at
    the top level and refused the model for having none."""
    text = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4}
    vision = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 28, "patch_size": 14}
    model = _perturbed(transformers.Tipsv2Model(transformers.Tipsv2Config(text_config=text, vision_config=vision)))
    loaded = _converted_matches(model, tmp_path, flags, "AutoModel", **in_memory)
    detected = normswap.inspect(loaded)
    assert (detected.placement, detected.norm) == (in_memory.get("placement", "pre"),
                                                   in_memory.get("norm", "layernorm"))


@pytest.mark.parametrize("model_class", ["ModernBertModel", "ModernBertDecoderModel"])
def test_an_embedding_norm_read_through_an_identity_placeholder_stays_going_to_post(tmp_path: Path,
                                                                                   model_class: str) -> None:
    """ModernBERT's first layer reads its embedding norm through ``nn.Identity()`` (a statement ``if``;
    the decoder's is a conditional expression). Going to post, the embedding norm stays and every layer builds
    a real ``attn_norm`` to hold a moved norm; it was refused as 'attn_norm.weight is non-zero but the target norm
    has no weight'."""
    config_class = "ModernBertDecoderConfig" if "Decoder" in model_class else "ModernBertConfig"
    config = getattr(transformers, config_class)(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    model = _perturbed(getattr(transformers, model_class)(config))
    converted = normswap.convert(model, placement="post")
    drift = measure_drift(model, converted, normswap.inspect(model), normswap.inspect(converted),
                          probe_inputs(model, None, None), exact=False)
    assert drift.sublayers[0].max_abs_diff == 0.0  # the norm-shift keeps what branch 0 reads
    loaded = _converted_matches(model, tmp_path, ["--placement", "post"], "AutoModel", placement="post")
    detected = normswap.inspect(loaded)
    assert detected.placement == "post" and detected.embedding_norm.path == "embeddings.norm"
    assert isinstance(loaded.layers[0].attn_norm, torch.nn.LayerNorm)
    assert torch.equal(loaded.embeddings.norm.weight, model.embeddings.norm.weight)
    assert torch.equal(loaded.layers[0].attn_norm.weight, model.layers[1].attn_norm.weight)


def test_layers_of_one_class_with_different_branches_convert_to_post(tmp_path: Path) -> None:
    """Nemotron-H runs one block class whose mixer is a Mamba, an attention or an MLP, chosen per layer: the code
    around the mixer is the same, but the layers' branch kinds differ, and that was refused as 'the layers differ
    from each other'. One rewrite of the class serves them all."""
    config = transformers.AutoConfig.for_model(
        "nemotron_h", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=128, max_position_embeddings=64, mamba_num_heads=8, mamba_head_dim=16, n_groups=2,
        ssm_state_size=16, chunk_size=16, layers_block_type=["linear_attention", "full_attention", "mlp"])
    model = _perturbed(transformers.AutoModelForCausalLM.from_config(config))
    assert len({sub.kind for layer in normswap.inspect(model).layers for sub in layer.sublayers}) > 1
    loaded = _converted_matches(model, tmp_path, ["--placement", "post"], "AutoModelForCausalLM",
                                placement="post")
    assert normswap.inspect(loaded).placement == "post"


def test_a_layer_norm_with_a_bias_moves_beside_norms_without_one(tmp_path: Path) -> None:
    """ESMC's layer norms have biases, its final norm none. Going to post, the plan refused 'pre 0 holds
    layernorm, layernorm-nobias norms on the two sides', and the new embedding norm, built as the final norm,
    could not hold the first layer norm's bias: it is built as that norm now, and a norm that loses its bias on
    the way (the final norm's slot) has none to lose."""
    config = transformers.AutoConfig.for_model(
        "esmc", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=16, vocab_size=128, max_position_embeddings=64)
    model = _perturbed(transformers.AutoModelForMaskedLM.from_config(config))
    assert normswap.inspect(model).norm == "mixed"
    loaded = _converted_matches(model, tmp_path, ["--placement", "post"], "AutoModelForMaskedLM", placement="post")
    detected = normswap.inspect(loaded)
    assert detected.placement == "post" and detected.embedding_norm.kind == "layernorm"
    first = normswap.inspect(model).layers[0].sublayers[0].norms[0].path
    assert torch.equal(loaded.get_submodule(detected.embedding_norm.path).bias, model.get_submodule(first).bias)


def test_a_norm_of_the_embeddings_that_positions_are_added_to_is_no_stream_norm(tmp_path: Path) -> None:
    """BlenderBot-Small's decoder normalises its token embeddings and then adds positions: the norm does not
    feed the first layer, so it is no embedding norm of the stream (the norm-shift would move a norm whose
    output no branch reads as it is). Going to pre was refused by the branch-0 check; it converts now, the norm
    staying where it is."""
    config = transformers.BlenderbotSmallConfig(d_model=64, encoder_layers=2, decoder_layers=2,
                                                encoder_attention_heads=4, decoder_attention_heads=4,
                                                encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=128,
                                                max_position_embeddings=64)
    model = _perturbed(transformers.BlenderbotSmallForConditionalGeneration(config))
    stacks = {stack.path: stack for stack in normswap.inspect(model).stacks}
    assert stacks["model.encoder.layers"].embedding_norm.path == "model.encoder.layernorm_embedding"
    assert stacks["model.decoder.layers"].embedding_norm is None
    loaded = _converted_matches(model, tmp_path, ["--placement", "pre"], "AutoModelForSeq2SeqLM", placement="pre")
    assert normswap.inspect(loaded).placement == "pre"
    assert torch.equal(loaded.model.decoder.layernorm_embedding.weight, model.model.decoder.layernorm_embedding.weight)


def test_a_stage_norm_kept_in_a_list_beside_the_stages_is_the_stage_s_final_norm() -> None:
    """GLPN keeps its stages' final norms in ``encoder.layer_norm``, a list beside ``encoder.block`` (the stages'
    layer lists): item i reads what stage i's last layer hands on, so it ends stage i; the next stage's
    patch-embedding norm is that stage's embedding norm."""
    config = transformers.GLPNConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[32, 64],
                                     patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                                     mlp_ratios=[2, 2], decoder_hidden_size=32)
    topology = normswap.inspect(_perturbed(transformers.GLPNModel(config)))
    assert [(s.path, s.width, s.embedding_norm.path, s.final_norm.path) for s in topology.stacks] == [
        (f"encoder.block.{i}", width, f"encoder.patch_embeddings.{i}.layer_norm", f"encoder.layer_norm.{i}")
        for i, width in enumerate((32, 64))]


def test_norms_built_in_one_module_list_expression_change_kind(tmp_path: Path) -> None:
    """GLPN builds its stage norms as ``nn.ModuleList([nn.LayerNorm(...) for ...])``: no ``self.<norm> = Norm(...)``
    to replace, and ``--norm rmsnorm`` was refused; every LayerNorm call of the list's expression is wrapped."""
    config = transformers.GLPNConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[32, 64],
                                     patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                                     mlp_ratios=[2, 2], decoder_hidden_size=32)
    model = _perturbed(transformers.GLPNModel(config))
    model.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--norm", "rmsnorm", "--quiet"]) == 0
    source = (tmp_path / "dst" / "modeling_normswap_glpn.py").read_text()
    assert "[NormswapRMSNorm.like(nn.LayerNorm(config.hidden_sizes[i])) for i in range(" in source
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "dst", trust_remote_code=True).eval()
    topology = normswap.inspect(loaded)
    assert topology.norm == "rmsnorm" and {s.final_norm.kind for s in topology.stacks} == {"rmsnorm"}
    inputs = probe_inputs(model, None, None)
    with torch.no_grad():
        assert torch.isfinite(main_output(loaded(**inputs))).all()


def test_a_stage_norm_run_by_the_module_around_the_stage_ends_that_stage(tmp_path: Path) -> None:
    """MobileViT's stage runs its transformer (whose list is the stack) and then its own ``layernorm`` on what the
    transformer's last layer handed on: that norm is the stack's final norm although the stack's parent does not
    hold it. Going to post once wrote a model with two of the three stage norms gone; and a vision model without
    a token embedding raised NotImplementedError (an internal error) when asked for one."""
    config = transformers.MobileViTConfig(hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 32, 48, 64, 96],
                                          image_size=64, num_attention_heads=4)
    model = _perturbed(transformers.MobileViTModel(config))
    stacks = normswap.inspect(model).stacks
    assert [(s.width, s.final_norm.path) for s in stacks] == [
        (width, f"encoder.layer.{i + 2}.layernorm") for i, width in enumerate((32, 48, 64))]
    loaded = _converted_matches(model, tmp_path, ["--placement", "post"], "AutoModel", placement="post")
    assert normswap.inspect(loaded).placement == "post"


def test_a_shared_layer_group_run_by_a_computed_index_goes_to_pre_with_every_reader_normalised(
        tmp_path: Path) -> None:
    """ALBERT runs one shared layer group on every pass, ``for i in range(num_hidden_layers)`` over
    ``self.albert_layer_groups[group_idx]`` with ``group_idx`` computed from ``i``: Pre-Norm was refused for want of
    one place after the layers, which the statement after that loop is. Its attention calls query, key and value
    in its own forward, beside the residual add: each reads the stream, so each reads the moved norm (the entry
    alone once did, and key and value read the raw stream). The norm-shift moves the post norms one entry on:
    attention's norm starts as a unit norm (no embedding norm on this width), the MLP's takes attention's old one,
    the final norm the MLP's; the shared modules hold one norm per slot for every pass. The way back is bit for
    bit. ``inspect`` counts the passes beside the one layer it lists."""
    config = transformers.AlbertConfig(vocab_size=128, embedding_size=32, hidden_size=64, num_hidden_layers=3,
                                       num_hidden_groups=1, inner_group_num=1, num_attention_heads=4,
                                       intermediate_size=128, max_position_embeddings=64)
    model = _perturbed(transformers.AlbertForMaskedLM(config))
    (stack,) = normswap.inspect(model).stacks
    assert (stack.num_layers, stack.passes) == (1, 3)  # one shared group, run on each of the 3 passes
    assert normswap.inspect(model).summary().endswith("1 layers, 3 passes")
    loaded = _converted_matches(model, tmp_path, ["--placement", "pre"], "AutoModelForMaskedLM", placement="pre")
    topology = normswap.inspect(loaded)
    assert topology.placement == "pre"
    assert topology.stacks[0].final_norm.path == "albert.encoder.normswap_final_norm"
    before, after = (m.albert.encoder.albert_layer_groups[0].albert_layers[0] for m in (model, loaded))
    assert torch.equal(after.attention.LayerNorm.weight, torch.ones(64))
    assert torch.equal(after.full_layer_layer_norm.weight, before.attention.LayerNorm.weight)
    assert torch.equal(loaded.albert.encoder.normswap_final_norm.weight, before.full_layer_layer_norm.weight)
    reads: dict[str, torch.Tensor] = {}
    hooks = [getattr(after.attention, name).register_forward_hook(
        lambda module, args, output, name=name: reads.setdefault(name, args[0])) for name in ("query", "key", "value")]
    with torch.no_grad():
        assert torch.isfinite(main_output(loaded(**probe_inputs(model, None, None)))).all()
    for hook in hooks:
        hook.remove()
    assert torch.equal(reads["key"], reads["query"]) and torch.equal(reads["value"], reads["query"])
    assert main(["convert", str(tmp_path / "dst"), str(tmp_path / "back"), "--placement", "post", "--quiet"]) == 0
    assert_same_weights(tmp_path / "src", tmp_path / "back")
