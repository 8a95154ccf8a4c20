"""Composite models through generated code: the wrapper's classes must build the rewritten language model.

Three ways a model's top classes reach its layers, one family each: Aria builds its text model with
``AutoModel.from_config`` in the same module; Llava builds a Llama from another family's module the same way;
DPR names ``BertModel`` from modeling_bert; Exaone is Llama's own classes under a config of its own module.
Each converts through the command line, loads with its Auto class and ``trust_remote_code``, equals the
in-memory conversion and re-inspects as the target; and loading one leaves transformers' Auto classes as they
were, so stock checkpoints of both families still load into the stock classes in the same process.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import normswap
from normswap.cli import main
from normswap.codegen.composite import require_generated_path
from normswap.codegen.derive import CodegenError
from normswap.conversion.checkpoint import tensors_equal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import coverage_checks  # the coverage run's own tiny, perturbed models of every family


@dataclass(frozen=True)
class Case:
    family: str
    placement: str
    model_class: str  # the class the tiny model is built as
    redirect: str  # what the generated file must say where the stock code builds the language model


CASES = [
    Case("aria", "post", "AriaForConditionalGeneration",
         "self.language_model = AriaTextModel._from_config(config.text_config)"),
    Case("llava", "post", "LlavaForConditionalGeneration",
         "self.language_model = LlamaModel._from_config(config.text_config)"),
    Case("dpr", "pre", "DPRQuestionEncoder", "self.bert_model = BertModel(config, add_pooling_layer=False)"),
    Case("exaone", "post", "LlamaForCausalLM", "class NormswapExaoneConfig(ExaoneConfig):"),
]


@dataclass(frozen=True)
class Converted:
    case: Case
    model: torch.nn.Module  # the stock source, as built
    auto_class: Any
    source: Path
    destination: Path


@pytest.fixture(scope="module", params=CASES, ids=[case.family for case in CASES])
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    case: Case = request.param
    built = coverage_checks.build(coverage_checks.candidate(case.family))
    folder = tmp_path_factory.mktemp(case.family)
    built.model.save_pretrained(folder / "src")
    code = main(["convert", str(folder / "src"), str(folder / "dst"), "--placement", case.placement, "--quiet"])
    assert code == 0
    return Converted(case, built.model.eval(), getattr(transformers, built.auto_class), folder / "src", folder / "dst")


def _output(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return coverage_checks.main_output(model(input_ids=input_ids))


def test_written_composite_loads_runs_and_equals_the_in_memory_conversion(converted: Converted) -> None:
    case = converted.case
    assert type(converted.model).__name__ == case.model_class
    loaded = converted.auto_class.from_pretrained(converted.destination, trust_remote_code=True).eval()
    assert type(loaded).__name__ == case.model_class
    assert type(loaded).__module__.rsplit(".", 1)[-1].startswith("modeling_normswap_")
    source = Path(sys.modules[type(loaded).__module__].__file__ or "").read_text(encoding="utf-8")
    assert case.redirect in source

    in_memory = normswap.convert(converted.model, placement=case.placement).eval()
    input_ids = torch.randint(4, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    written, expected = _output(loaded, input_ids), _output(in_memory, input_ids)
    torch.testing.assert_close(written, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(written, _output(converted.model, input_ids), atol=1e-3)  # the layout did change

    assert normswap.inspect(converted.destination, trust_remote_code=True).placement == case.placement
    assert normswap.inspect(loaded).placement == case.placement
    if loaded.can_generate():
        assert loaded.generate(input_ids, max_new_tokens=3, do_sample=False).shape == (1, 15)


def test_in_memory_composite_returns_to_the_stock_family_bit_for_bit(converted: Converted) -> None:
    converted_model = normswap.convert(converted.model, placement=converted.case.placement)
    back = normswap.convert(converted_model, placement="pre" if converted.case.placement == "post" else "post")
    assert type(back) is type(converted.model)  # the stock transformers class again
    assert tensors_equal(converted.model.state_dict(), back.state_dict())


def test_loading_a_converted_composite_leaves_stock_checkpoints_to_the_stock_classes(converted: Converted,
                                                                                     tmp_path: Path) -> None:
    stock_class = type(converted.model)
    converted.auto_class.from_pretrained(converted.destination, trust_remote_code=True)

    again = converted.auto_class.from_pretrained(converted.source)
    assert type(again) is stock_class
    assert type(transformers.AutoConfig.from_pretrained(converted.source)) is type(converted.model.config)
    # the language model on its own too: its stock checkpoint still loads into a class of transformers
    stack = normswap.inspect(converted.model).stacks[0].path.split(".")
    text_model = next(module for module in (converted.model.get_submodule(".".join(stack[:depth]))
                                            for depth in range(len(stack) - 1, 0, -1))
                      if isinstance(module, transformers.PreTrainedModel))
    text_model.save_pretrained(tmp_path / "text")
    assert type(transformers.AutoModel.from_pretrained(tmp_path / "text")).__module__.startswith("transformers.models.")
    # and the converted checkpoint never loads into the stock class (its removed norm is a 0-d tensor)
    with pytest.raises(RuntimeError, match="mismatch"):
        stock_class.from_pretrained(converted.destination)


def test_a_language_model_built_past_the_generated_code_is_refused_in_one_line() -> None:
    llava = coverage_checks.build(coverage_checks.candidate("llava")).model.model  # LlavaModel, inside its head
    with pytest.raises(CodegenError) as refused:  # as if LlavaModel had built its language model some other way
        require_generated_path(llava, ["language_model.layers"], "normswap_generated_x.modeling_normswap_llava")
    assert "LlavaModel builds its language_model as the stock LlamaModel" in str(refused.value)
    assert "\n" not in str(refused.value)
