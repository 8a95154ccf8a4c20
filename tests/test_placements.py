"""Every placement to every placement (docs/design.md §6, §8): pre, post, sandwich and post-sublayer sources each
converted to every other placement, then re-detected, saved, loaded with transformers, and run with and without
the KV cache; the refusals that remain name their structural reason."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from test_convert_native import tiny_model
from test_layer_norm_exact_weightless import CONFIGS as WEIGHTLESS
from test_layer_norm_exact_weightless import perturbed as weightless_model

import normswap
from normswap.cli import main
from normswap.codegen.package import family_model_type

SOURCES = {
    "gemma2": ("Gemma2ForCausalLM", "sandwich"),
    "glm4": ("Glm4ForCausalLM", "sandwich"),
    "olmo2": ("Olmo2ForCausalLM", "post-sublayer"),
    "llama": ("LlamaForCausalLM", "pre"),
    "olmo": ("OlmoForCausalLM", "pre"),  # weightless LayerNorms: new norms get a weight to start at the scale s
    "gpt2": ("GPT2LMHeadModel", "pre"),
    "gpt_neox_parallel": ("GPTNeoXForCausalLM", "parallel"),  # serialised first: each branch its own sublayer
    "nanochat": ("NanoChatForCausalLM", "pre"),  # weightless RMSNorms that record no width: new ones the stream's
    "bloom": ("BloomForCausalLM", "pre"),  # adds inside the module-level dropout_add: out norms wrap its argument
    "opt_post": ("OPTForCausalLM", "post"),  # OPT-350m's Post-Norm: through its Pre-Norm twin
    # Falcon-7B: one shared norm, the branches summed in place (`mlp_output += attention_output`) before the
    # module-level dropout_add; Falcon-40B and Falcon2-11B: new_decoder_architecture, which ignores the stock
    # sequential switch (parallel_attn), so serialised in generated code; Falcon-RW: sequential, biased
    "falcon": ("FalconForCausalLM", "parallel"),
    "falcon_new": ("FalconForCausalLM", "parallel"),
    "falcon_new_one_norm": ("FalconForCausalLM", "parallel"),
    "falcon_rw": ("FalconForCausalLM", "pre"),
    # LFM2: one layer class whose branch is self.conv or self.self_attn by a per-layer flag; one out norm serves both
    "lfm2": ("Lfm2ForCausalLM", "pre"),
    # OLMo-Hybrid: Pre-Norm linear-attention layers among OLMo 2 (post-sublayer) attention layers
    "olmo_hybrid": ("OlmoHybridForCausalLM", "mixed"),
}
TARGETS = ("pre", "post", "sandwich", "post-sublayer")
# Falcon -> post-sublayer: dropping a LayerNorm's stand-in puts its shift W beta in its readers' biases, which
# query_key_value and dense_h_to_4h are given in the generated code (conversion/reader_bias.py)
CASES = [(family, target) for family, (_, source) in SOURCES.items() for target in TARGETS if target != source]


@pytest.mark.parametrize(("family", "target"), CASES, ids=[f"{f}-to-{t}" for f, t in CASES])
def test_converts_loads_and_generates(family: str, target: str, tmp_path: Path) -> None:
    source = SOURCES[family][1]
    model = source_model(family)
    assert normswap.inspect(model).placement == source
    converted = normswap.convert(model, target)
    assert normswap.inspect(converted).placement == target
    report = getattr(converted, "normswap_report", None)  # Pre <-> Post alone is realised without a probe run
    if report is not None:
        whole = getattr(report, "whole", getattr(report, "drift", report))
        assert not report.exact and 0.3 < whole.output_cosine < 0.99999  # moved, and not broken
    assert_saved_loads_and_generates_alike(converted, tmp_path)


def assert_saved_loads_and_generates_alike(converted: torch.nn.Module, folder: Path) -> None:
    """``converted``, saved with its generated module beside it, loads with transformers, computes what it computed,
    and generates the same tokens with and without the KV cache."""
    converted.save_pretrained(folder)
    module = type(converted).__module__
    source_file = Path(transformers.utils.import_utils.sys.modules[module].__file__)  # the generated module
    (folder / source_file.name).write_text(source_file.read_text())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, converted.eval()(ids).logits)
    cached = loaded.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(cached, loaded.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False))


def test_a_sequential_switch_the_config_ignores_gives_way_to_generated_code() -> None:
    """Falcon-40B's new_decoder_architecture reads its norms by num_ln_in_parallel_attn whatever parallel_attn says,
    so the stock switch the recipe names builds a model that cannot run: the serial form is generated instead (the
    in-place sum dropped, ln_mlp reading the stream after attention), and the plan says why."""
    model = source_model("falcon_new")
    converted = normswap.convert(model, "pre")
    assert normswap.inspect(converted).placement == "pre"
    assert converted.config.normswap["realisation"] == "generated code: modeling_normswap_falcon.py"
    assert any("falcon with {'parallel_attn': False} does not run this model's config (AttributeError" in note
               for note in converted.normswap_plan.notes)
    source = Path(sys.modules[type(converted).__module__].__file__).read_text()
    assert "mlp_output = self.mlp(self.ln_mlp(normswap_after_self_attention))" in source
    assert "output = dropout_add(mlp_output, normswap_after_self_attention," in source
    assert "mlp_output += attention_output" not in source


@pytest.mark.parametrize("target", ["pre", "sandwich"])
def test_a_mixed_model_gets_norms_only_where_its_sublayers_lack_them(target: str) -> None:
    """OLMo-Hybrid's layer 0 is Pre-Norm already: going to pre or sandwich keeps its pre norms' weights as they
    are and gives new pre norms to layer 1 alone, whose out norms go (pre) or stay (sandwich, where layer 0 gets
    out norms of its own)."""
    model = source_model("olmo_hybrid")
    converted = normswap.convert(model, target)
    plan = converted.normswap_plan
    moves = [move for step in getattr(plan, "plans", (plan,)) for each in step.passes for move in each.moves]
    added = sorted(move.norm for move in moves if move.action == "add")
    assert [name for name in added if name.endswith("_pre_norm")] == [
        "model.layers.1.normswap_mlp_pre_norm", "model.layers.1.normswap_self_attn_pre_norm"]
    assert [name for name in added if name.endswith("_out_norm")] == ([
        "model.layers.0.normswap_linear_attn_out_norm", "model.layers.0.normswap_mlp_out_norm"]
        if target == "sandwich" else [])
    weights = converted.state_dict()
    for kept in ("model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"):
        assert torch.equal(weights[kept], model.state_dict()[kept])
    layer = converted.model.layers[1]
    out_norms = {type(layer.post_attention_layernorm).__name__, type(layer.post_feedforward_layernorm).__name__}
    assert out_norms == ({"OlmoHybridRMSNorm"} if target == "sandwich" else {"NormswapRemovedNorm"})


def _neomme() -> torch.nn.Module:
    config = transformers.AutoConfig.for_model(
        "neomme", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, embedding_rank=256, embedding_dim=128, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"])
    return transformers.AutoModelForMaskedLM.from_config(config)


@pytest.mark.parametrize(("build", "reason"), [
    # NeoMME's attention reads a learned mix of the stream and the first layer's input through its own norm, so
    # detection sees no pre norm there; the pre norm the conversion adds wraps that norm's output, and the branch
    # still does not read the stream through it: the generated code detects as mixed, and nothing is written
    (_neomme, r"code detects as mixed, not pre; sublayer 0 of model\.layers\.0 \(attention\) detects as none"),
], ids=["neomme-mixed-read"])
def test_a_mixed_model_that_no_branch_norm_pass_makes_pre_is_refused_with_its_reason(
        build: Callable[[], torch.nn.Module], reason: str) -> None:
    model = build()
    assert normswap.inspect(model).placement == "mixed"
    with pytest.raises(normswap.NormswapError, match=reason):
        normswap.convert(model, "pre")


def source_model(family: str) -> torch.nn.Module:
    return weightless_model(family) if family in WEIGHTLESS else tiny_model(family, SOURCES[family][0])


@pytest.mark.parametrize(("family", "placement", "norm"), [("gpt2", "sandwich", "rmsnorm"),
                                                          ("gemma2", "pre", "layernorm")])
def test_placement_with_norm_kind_in_one_conversion(family: str, placement: str, norm: str) -> None:
    converted = normswap.convert(tiny_model(family, SOURCES[family][0]), placement, norm=norm)
    topology = normswap.inspect(converted)
    assert (topology.placement, topology.norm) == (placement, norm)
    assert len(converted.normswap_plan.plans) == 2 and len(converted.normswap_report.passes) == 2


def test_calibrated_start_beats_the_unit_start() -> None:
    """The calibrated stand-in and the calibrated new norm move the model less than unit scales do."""
    for family, target in (("gemma2", "pre"), ("olmo2", "pre"), ("llama", "sandwich"), ("llama", "post-sublayer")):
        model = tiny_model(family, SOURCES[family][0])
        calibrated = normswap.convert(model, target).normswap_report.drift.next_token_kl
        unit = normswap.convert(model, target, calibrate=False).normswap_report.drift.next_token_kl
        assert calibrated < unit, (family, target, calibrated, unit)


@pytest.mark.parametrize("target", ["sandwich", "post-sublayer"])
def test_a_new_norm_copies_a_constructor_another_module_builds(target: str, tmp_path: Path) -> None:
    """MegatronBERT adds each attention output in SelfOutput, which builds no norm (its Attention builds the
    attention's pre norm): the new out norm copies that constructor into SelfOutput, whose ``__init__`` has the
    ``config`` it reads. The result moved, and it loads and runs as it converted."""
    model = tiny_model("megatron_bert", "MegatronBertForMaskedLM")
    converted = normswap.convert(model, target)
    assert normswap.inspect(converted).placement == target
    assert 0.3 < converted.normswap_report.drift.output_cosine < 0.99999
    source = Path(transformers.utils.import_utils.sys.modules[type(converted).__module__].__file__).read_text()
    assert "self.normswap_dense_out_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)" in source
    converted.save_pretrained(tmp_path)
    (tmp_path / Path(sys.modules[type(converted).__module__].__file__).name).write_text(source)
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, converted.eval()(ids).logits)


def test_a_placement_the_structure_cannot_take_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    """PhiMoE's pre norms have biases, and its router reads the MLP's through ``F.linear`` of its weight alone:
    dropping the norms for post-sublayer would have to add the norm's shift beta to a bias the router's forward
    never adds. (GPT-J's projections, refused here before, are given biases: ``test_reader_bias.py``; NanoChat's
    weightless, width-less norms convert: ``SOURCES``.)"""
    tiny_model("phimoe", "PhimoeForCausalLM").save_pretrained(tmp_path / "phimoe")
    capsys.readouterr()  # transformers' progress bar while saving
    assert main(["convert", str(tmp_path / "phimoe"), str(tmp_path / "out"), "--placement", "post-sublayer",
                 "--quiet"]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Traceback" not in error
    assert ("model.layers.0.mlp.router.weight reads model.layers.0.post_attention_layernorm, whose bias beta folds "
            "into its readers' biases") in error and "ignores a bias" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("family", "target"), [("gemma2", "pre"), ("olmo2", "pre"), ("llama", "post-sublayer")])
def test_healing_matches_what_each_branch_reads(family: str, target: str) -> None:
    """Sandwich and post-sublayer models have no one norm per entry: healing pairs the branches' inputs and the
    stacks' outputs, and training on them brings the matched activations closer (the lowest per-entry cosine)."""
    from normswap.healing.api import heal
    from normswap.healing.taps import correspond

    model = tiny_model(family, SOURCES[family][0])
    student = normswap.convert(model, target)
    pairs = correspond(model, student)
    assert len(pairs.entries) == 2 * 2 + 1 and all(e.teacher.endswith(":in") for e in pairs.entries[:-1])
    texts = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(24)) for i in range(96)]
    _, report = heal(model, student, texts, max_steps=20, batch_size=8, learning_rate=3e-4, held_out=16, quiet=True)
    assert min(report.after["entry_cosines"]) > min(report.before["entry_cosines"]), (report.before, report.after)


@pytest.mark.parametrize(("family", "model_class", "target", "stock"), [
    ("gemma2", "Gemma2ForCausalLM", "pre", "vaultgemma"), ("glm4", "Glm4ForCausalLM", "pre", "glm"),
    ("llama", "LlamaForCausalLM", "sandwich", "hyperclovax")])
def test_a_stock_family_that_computes_the_target_is_the_output(family: str, model_class: str, target: str,
                                                               stock: str) -> None:
    """Where a recipe names a stock family for the target placement (found by behaviour, docs/native_pairs.md),
    the output is that family, and it computes what the generated code computes from the same weights."""
    model = tiny_model(family, model_class)
    native = normswap.convert(model, target)
    generated = normswap.convert(model, target, native=False)
    assert native.config.model_type == stock and type(native).__module__.startswith("transformers.models.")
    assert family_model_type(generated.config.model_type) == model.config.model_type
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, found = generated(ids).logits, native(ids).logits
    assert (found - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_a_stock_family_whose_norm_takes_a_removed_norms_name_is_not_used() -> None:
    """Qwen3 -> post-sublayer computes as Exaone 4 (docs/native_pairs.md), but Exaone 4's attention out norm is
    called post_attention_layernorm, the name of the Qwen3 MLP pre norm the conversion removes: the carried vectors
    and scales of the two would share one name, so the generated code, whose new norms have names of their own,
    stays."""
    converted = normswap.convert(tiny_model("qwen3", "Qwen3ForCausalLM"), "post-sublayer")
    assert family_model_type(converted.config.model_type) == "qwen3" != converted.config.model_type
    assert normswap.inspect(converted).placement == "post-sublayer"


def test_a_one_wider_model_moving_its_norms_is_told_to_convert_the_original_in_one_command(tmp_path: Path) -> None:
    """An exact RMSNorm -> LayerNorm Llama is one dimension wider than any stock Llama config allows: the placement
    change after it is refused in one line (it was an internal error), naming the one-command way."""
    from normswap.cli import main

    tiny_model("llama", "LlamaForCausalLM").save_pretrained(tmp_path / "source")
    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "wide"), "--norm", "layernorm", "--exact",
                 "--quiet"]) == 0
    with pytest.raises(normswap.NormswapError) as error:
        normswap.convert_checkpoint(tmp_path / "wide", tmp_path / "post", "post", trust_remote_code=True)
    assert "\n" not in str(error.value) and "--placement and --norm" in str(error.value)
    assert not (tmp_path / "post").exists()


def test_an_out_norm_wraps_a_term_whose_pre_norm_the_same_conversion_drops(tmp_path: Path) -> None:
    """ModernBERT adds ``self.mlp(self.mlp_norm(h))`` in one expression; to post-sublayer its pre norm leaves the
    term and an out norm wraps it, in one statement. The wrap was matched against the term's text after the unwrap
    and never applied ("did not take the planned edits"); the result now inspects as post-sublayer, saves and
    loads with transformers and computes what it computed."""
    model = tiny_model("modernbert", "ModernBertForMaskedLM")
    assert normswap.inspect(model).placement == "pre"
    converted = normswap.convert(model, "post-sublayer")
    assert normswap.inspect(converted).placement == "post-sublayer"
    report = converted.normswap_report
    assert getattr(report, "whole", getattr(report, "drift", report)).output_cosine > 0.3
    converted.save_pretrained(tmp_path)
    source_file = Path(sys.modules[type(converted).__module__].__file__ or "")
    assert "hidden_states + self.normswap_mlp_out_norm(self.mlp(hidden_states))" in source_file.read_text()
    (tmp_path / source_file.name).write_text(source_file.read_text())
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, converted.eval()(ids).logits)
