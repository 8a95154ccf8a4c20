"""Generated modules work when imported as they are (issue 20), and leave no empty tensor in the state dict.

A generated module registers its config class with each of transformers' Auto model classes that config.json's
``auto_map`` names, so ``AutoModel*.from_config`` and the generic heads (``...ForSequenceClassification`` calls
``AutoModel.from_config``) build its classes, as after ``from_pretrained(..., trust_remote_code=True)``. It also
registers its model_type with AutoConfig, so a checkpoint it saved reads back by model_type. That model_type holds
the digest of the module's source: another layout of the same family is another model_type, and must still need
trust_remote_code, and load its own classes with it. A removed norm's placeholder keeps a 0-d tensor, which
transformers' loader refuses where the stock norm has a vector, and which a reduction can read.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from test_convert_native import tiny_model
from weights_kit import assert_same_weights

from normswap.codegen.package import _sealed, config_fields
from normswap.conversion.checkpoint import convert_checkpoint
from normswap.conversion.route import plan_layout

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import coverage_checks  # the coverage run's own tiny, perturbed models of every family
from test_encoder_decoder_generated import _model as encoder_decoder_model

_imported = count()


@dataclass(frozen=True)
class Variant:
    name: str
    build: Any  # () -> the stock model
    placement: str | None = None
    norm: str | None = None
    exact: bool = False
    native: bool = False


VARIANTS = [
    Variant("llama-post", lambda: tiny_model("llama", "LlamaForCausalLM"), "post"),
    Variant("llama-layernorm-exact", lambda: tiny_model("llama", "LlamaForCausalLM"), norm="layernorm", exact=True),
    Variant("llama-post-layernorm", lambda: tiny_model("llama", "LlamaForCausalLM"), "post", "layernorm"),  # 2 passes
    Variant("llama-post-sublayer", lambda: tiny_model("llama", "LlamaForCausalLM"), "post-sublayer"),  # drops norms
    Variant("gpt2-post", lambda: tiny_model("gpt2", "GPT2LMHeadModel"), "post"),
    Variant("bert-pre", lambda: tiny_model("bert", "BertForMaskedLM"), "pre"),
    Variant("llava-post", lambda: coverage_checks.build(coverage_checks.candidate("llava")).model, "post"),
    Variant("dpr-pre", lambda: coverage_checks.build(coverage_checks.candidate("dpr")).model, "pre"),
    Variant("t5-post", lambda: encoder_decoder_model("t5", "T5ForConditionalGeneration"), "post"),
]


def import_by_path(path: Path) -> ModuleType:
    """The generated file imported as a user would import it: by its path, outside transformers' remote code."""
    name = f"imported_{next(_imported)}.{path.stem}"  # as ``import modeling_normswap_llama`` names it, in a package
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variant", VARIANTS, ids=[variant.name for variant in VARIANTS])
def test_an_imported_module_builds_its_classes_through_the_auto_classes(variant: Variant, tmp_path: Path) -> None:
    model = variant.build()
    setup = plan_layout(model, variant.placement, variant.norm, exact=variant.exact, native=variant.native)
    generated = setup.generated
    assert generated is not None
    (tmp_path / generated.file_name).write_text(generated.source, encoding="utf-8")
    module = import_by_path(tmp_path / generated.file_name)
    config = getattr(module, generated.config_class).from_dict(config_fields(setup.target_config))  # no auto_map

    # every Auto class config.json's auto_map names, as it names them
    found_by_auto = {auto: reference.removeprefix(f"{generated.module_name}.")
                     for auto, reference in setup.target_config.auto_map.items() if auto != "AutoConfig"}
    assert "AutoModel" in found_by_auto
    for auto, name in found_by_auto.items():
        built = getattr(transformers, auto).from_config(config, trust_remote_code=False)
        assert type(built) is getattr(module, name), auto
        for key, tensor in built.state_dict().items():  # removed norms' placeholders included
            assert tensor.numel() > 0, key
            torch.max(tensor)
    for name in found_by_auto.values():  # a generic head builds its base model by AutoModel.from_config
        if name.endswith(("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")):
            head = getattr(module, name)(config)
            assert all(type(sub).__module__ == module.__name__ for sub in head.children()
                       if isinstance(sub, transformers.PreTrainedModel)), name


@pytest.fixture(scope="module")
def llama_layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny Llama's source checkpoint, and two converted layouts of it (two model_types)."""
    folder = tmp_path_factory.mktemp("layouts")
    tiny_model("llama", "LlamaForCausalLM").save_pretrained(folder / "source")
    convert_checkpoint(folder / "source", folder / "post", "post", native=False)
    convert_checkpoint(folder / "source", folder / "exact", norm="layernorm", exact=True)
    return {"source": folder / "source", "post": folder / "post", "exact": folder / "exact"}


FRESH_PROCESS_CHECK = """
import importlib.util, json, sys, transformers
imported, other = sys.argv[1], sys.argv[2]
found = {}
for name, call in (("other config", lambda: transformers.AutoConfig.from_pretrained(other, trust_remote_code=False)),
                   ("other model", lambda: transformers.AutoModelForCausalLM.from_pretrained(other,
                                                                                           trust_remote_code=False)),
                   ("imported model", lambda: transformers.AutoModelForCausalLM.from_pretrained(
                       imported, trust_remote_code=False))):
    if name == "imported model":  # the user imports one layout's module as it is
        spec = importlib.util.spec_from_file_location("user_code.modeling_normswap_llama",
                                                      imported + "/modeling_normswap_llama.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    try:
        found[name] = type(call()).__module__
    except ValueError as error:
        found[name] = "refused" if "trust_remote_code" in str(error) else str(error)
print(json.dumps(found))
"""


def in_fresh_process(imported: Path, other: Path) -> dict[str, str]:
    """Where each load lands, in a process that has imported no generated code before (the conversion that
    wrote them imported normswap's own copies, which register their model_types in this one)."""
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS_CHECK, str(imported), str(other)],
                          capture_output=True, text=True, check=True, timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("imported", "loaded"), [("post", "exact"), ("exact", "post")])
def test_an_imported_module_leaves_another_layout_to_trust_remote_code(llama_layouts: dict[str, Path],
                                                                       imported: str, loaded: str) -> None:
    other = llama_layouts[loaded]
    own_type = json.loads((llama_layouts[imported] / "config.json").read_text())["model_type"]
    assert re.fullmatch(r"normswap-llama-[0-9a-f]{12}", own_type)
    assert json.loads((other / "config.json").read_text())["model_type"] != own_type
    assert in_fresh_process(llama_layouts[imported], other) == {
        "other config": "refused", "other model": "refused", "imported model": "user_code.modeling_normswap_llama"}
    own = transformers.AutoModelForCausalLM.from_pretrained(other, trust_remote_code=True)
    assert type(own).__module__.endswith(".modeling_normswap_llama")
    assert own.config.hidden_size == (65 if loaded == "exact" else 64)  # exact adds one hidden dimension


def test_trust_remote_code_loads_every_head_and_saves_a_loadable_copy(llama_layouts: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    post = llama_layouts["post"]
    causal = transformers.AutoModelForCausalLM.from_pretrained(post, trust_remote_code=True)
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(post, trust_remote_code=True)
    assert type(classifier.model) is type(causal.model)  # its generic head built the generated base model
    causal.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "modeling_normswap_llama.py").is_file()
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    ids = torch.tensor([[5, 17, 42, 7]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, causal(ids).logits)


def test_no_tensor_of_the_state_dict_is_empty(llama_layouts: dict[str, Path]) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_layouts["post"], trust_remote_code=True)
    state = model.state_dict()
    assert state["model.norm.weight"].shape == ()  # the removed final norm's placeholder
    for key, tensor in state.items():
        assert tensor.numel() > 0, key
        torch.max(tensor), tensor.float().mean()  # every reduction over every tensor works
    written = load_file(str(llama_layouts["post"] / "model.safetensors"))
    assert all(tensor.numel() > 0 for tensor in written.values())
    fresh = type(model)(model.config)  # built, not loaded: the placeholder's own value
    assert all(tensor.numel() > 0 for tensor in fresh.state_dict().values())


def test_a_converted_checkpoint_never_loads_into_the_stock_class(llama_layouts: dict[str, Path]) -> None:
    post = llama_layouts["post"]
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # [] where the stock norm has [64]
        transformers.LlamaForCausalLM.from_pretrained(post)
    # here, where the conversion imported normswap's own copy of the code, the model_type reads as that code
    assert type(transformers.AutoModelForCausalLM.from_pretrained(post, trust_remote_code=False)).__module__ \
        .endswith(".modeling_normswap_llama")
    stock = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(llama_layouts["source"]))
    with pytest.raises(RuntimeError, match="size mismatch"):  # torch's own loader does not broadcast it either
        stock.load_state_dict(load_file(str(post / "model.safetensors")), strict=False)


def as_earlier_version(folder: Path) -> None:
    """``folder`` as normswap wrote it before 0-d placeholders: empty tensors, in its own shipped code too, under
    the family's one model_type (before it named the layout)."""
    code, config = folder / "modeling_normswap_llama.py", folder / "config.json"
    source = code.read_text(encoding="utf-8")
    data = json.loads(config.read_text(encoding="utf-8"))
    assert "torch.tensor(1.0), persistent=True" in source and data["model_type"] in source
    source = source.replace("torch.tensor(1.0), persistent=True", "torch.empty(0), persistent=True")
    code.write_text(source.replace(data["model_type"], "normswap-llama"), encoding="utf-8")
    config.write_text(json.dumps({**data, "model_type": "normswap-llama"}), encoding="utf-8")
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    state["model.norm.weight"] = torch.empty(0)
    save_file(state, str(weights), metadata={"format": "pt"})


def test_a_checkpoint_with_empty_placeholders_converts_back_and_onward(llama_layouts: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    earlier = tmp_path / "earlier"
    shutil.copytree(llama_layouts["post"], earlier)
    as_earlier_version(earlier)
    home = convert_checkpoint(earlier, tmp_path / "home", "pre", trust_remote_code=True).destination
    assert_same_weights(llama_layouts["source"], home)

    onward = convert_checkpoint(earlier, tmp_path / "onward", norm="layernorm", trust_remote_code=True).destination
    expected = convert_checkpoint(llama_layouts["post"], tmp_path / "expected", norm="layernorm",
                                  trust_remote_code=True).destination
    assert load_file(str(onward / "model.safetensors"))["model.norm.weight"].shape == ()
    assert_same_weights(expected, onward)


def test_a_norm_with_a_0d_parameter_is_not_removed() -> None:
    from normswap.codegen.derive import CodegenError, _parameter_names

    class ScaleNorm(torch.nn.Module):  # g * x / ||x||, its gain one number: the placeholder's shape
        def __init__(self) -> None:
            super().__init__()
            self.g = torch.nn.Parameter(torch.tensor(8.0))

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), ScaleNorm())
    assert _parameter_names(model, "0") == ("weight", "bias")
    with pytest.raises(CodegenError, match="0-d"):
        _parameter_names(model, "1")


def test_a_saved_model_reads_back_by_model_type_once_its_module_is_imported(llama_layouts: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """transformers' own ``test_load_with_mismatched_shapes``: save, then ``AutoConfig``/``AutoModel`` by
    model_type, with no auto_map and no trust_remote_code."""
    module = import_by_path(llama_layouts["post"] / "modeling_normswap_llama.py")
    config = module.NormswapLlamaConfig.from_pretrained(llama_layouts["post"])
    model = module.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "saved")
    data = json.loads((tmp_path / "saved" / "config.json").read_text())
    data.pop("auto_map", None)
    (tmp_path / "saved" / "config.json").write_text(json.dumps(data))
    for stray in (tmp_path / "saved").glob("*.py"):
        stray.unlink()
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=False)
    assert type(again) is module.LlamaForCausalLM
    ids = torch.tensor([[5, 17, 42, 7]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_the_model_type_names_the_code_not_the_weights(tmp_path: Path) -> None:
    """Two sizes of one layout share the model_type, and it is the digest of the source it is written in."""
    small = plan_layout(tiny_model("llama", "LlamaForCausalLM"), "post", native=False).generated
    wider = transformers.LlamaConfig(hidden_size=96, intermediate_size=128, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    large = plan_layout(transformers.LlamaForCausalLM(wider), "post", native=False).generated
    other = plan_layout(tiny_model("llama", "LlamaForCausalLM"), "post-sublayer").generated
    assert small is not None and large is not None and other is not None
    assert small.model_type == large.model_type and small.source == large.source
    assert other.model_type != small.model_type
    for generated in (small, other):
        undigested = generated.model_type.rsplit("-", 1)[0] + "-@layout-digest@"
        assert _sealed(generated.source.replace(generated.model_type, undigested), undigested) == \
            (generated.source, generated.model_type)


def test_code_converted_again_leaves_the_earlier_model_type_to_the_earlier_code(llama_layouts: dict[str, Path],
                                                                                tmp_path: Path) -> None:
    """A generated checkpoint converted again is generated code of generated code: the earlier module's
    registration is not carried into it, where it would map the earlier model_type to the new layout's classes."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    post = llama_layouts["post"]
    earlier_type = json.loads((post / "config.json").read_text())["model_type"]
    onward = convert_checkpoint(post, tmp_path / "onward", norm="layernorm", trust_remote_code=True).destination
    assert [code.name for code in onward.glob("*.py")] == ["modeling_normswap_llama.py"]
    source = (onward / "modeling_normswap_llama.py").read_text()
    onward_type = json.loads((onward / "config.json").read_text())["model_type"]
    assert re.fullmatch(r"normswap-llama-[0-9a-f]{12}", onward_type)
    assert source.count("Auto class registration begins") == 1 and f'register("{earlier_type}"' not in source
    assert CONFIG_MAPPING[earlier_type].model_type == earlier_type
    assert CONFIG_MAPPING[onward_type].model_type == onward_type != earlier_type
