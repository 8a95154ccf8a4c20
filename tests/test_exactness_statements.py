"""Every place that states a conversion's exactness states the same value: the printed plan, the JSON plan
and report, the ``normswap`` block of config.json and the model card (its header and its copy of the plan).

One case per conversion kind, on tiny checkpoints with perturbed weights, through the command line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_rms_norm import perturbed

from normswap.cli import main


@dataclass(frozen=True)
class Kind:
    name: str
    config: str
    model_class: str
    flags: tuple[str, ...]
    exact: bool  # what the mathematics says: the test fails if every statement agrees on the wrong value


KINDS = [
    Kind("post-to-pre-native", "bert", "BertModel", ("--placement", "pre"), False),
    Kind("pre-to-post-generated", "llama", "LlamaForCausalLM", ("--placement", "post"), False),
    Kind("pre-ln-to-rmsnorm", "gpt2", "GPT2LMHeadModel", ("--norm", "rmsnorm"), True),
    Kind("post-ln-to-rmsnorm", "bert", "BertModel", ("--norm", "rmsnorm"), False),
    Kind("offset-rmsnorm-to-plain", "gemma", "GemmaForCausalLM", ("--norm", "rmsnorm"), True),
    Kind("rmsnorm-to-layernorm", "llama", "LlamaForCausalLM", ("--norm", "layernorm"), False),
    Kind("rmsnorm-to-layernorm-exact", "llama", "LlamaForCausalLM", ("--norm", "layernorm", "--exact"), True),
]


def _plan_exactness(text: str) -> bool:
    """The ``exact: true|false`` of a plan's first line."""
    found = re.search(r"^plan: .*?; exact: (true|false)", text, re.MULTILINE)
    assert found, f"no plan line with an exactness in:\n{text}"
    return found.group(1) == "true"


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_every_statement_of_exactness_agrees(kind: Kind, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "src"
    perturbed(kind.config, kind.model_class).save_pretrained(source)

    assert main(["convert", str(source), str(tmp_path / "text"), *kind.flags, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert main(["convert", str(source), str(tmp_path / "json"), *kind.flags, "--quiet", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)

    config = json.loads((tmp_path / "text" / "config.json").read_text())
    card = (tmp_path / "text" / "README.md").read_text()
    statements = {
        "printed plan": _plan_exactness(printed),
        "JSON plan": result["plan"]["exact"],
        "JSON report": result["report"]["exact"],
        "config.json": config["normswap"]["exact"],
        "card's plan": _plan_exactness(card),
        "card's header": "**not exact**" not in card,
    }
    assert statements == dict.fromkeys(statements, kind.exact), statements
