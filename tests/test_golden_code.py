"""The generated modeling code must match the committed golden diffs; drift shows as a diff of diffs."""

from __future__ import annotations

import difflib
import re

import pytest
from golden_code import CASES, GOLDEN, generated_diff


@pytest.mark.parametrize("name", sorted(CASES))
def test_generated_code_matches_golden(name: str) -> None:
    expected = (GOLDEN / f"{name}.diff").read_text(encoding="utf-8")
    actual = generated_diff(*CASES[name])
    if actual != expected:
        drift = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                             f"golden/{name}.diff", "regenerated"))
        pytest.fail(f"generated code drifted from golden/{name}.diff; if intended, run "
                    f"`python tests/golden_code.py --update`\n{drift}")


def test_golden_diffs_show_the_norm_moves() -> None:
    llama = (GOLDEN / "llama_pre_to_post.diff").read_text()
    assert "-        hidden_states = self.input_layernorm(hidden_states)\n" in llama
    assert "+        hidden_states = self.post_attention_layernorm(residual + hidden_states)\n" in llama
    assert "+        hidden_states = self.normswap_embedding_norm(hidden_states)\n" in llama
    assert re.search(r'\n\+    model_type = "normswap-llama-[0-9a-f]{12}"\n', llama)
    bert = (GOLDEN / "bert_post_to_pre.diff").read_text()
    assert "+        intermediate_output = self.intermediate(self.output.LayerNorm(attention_output))\n" in bert
    assert "+        hidden_states = self.normswap_final_norm(hidden_states)\n" in bert
