"""Golden files for generated modeling code: what normswap changes in a family's transformers source.

Each golden file is the unified diff from the installed transformers modeling file to the module
normswap ships beside the weights. Regenerate after a deliberate change (or a transformers upgrade):

    python tests/golden_code.py --update
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"
CASES = {
    "gpt2_pre_to_post": ("gpt2", "GPT2LMHeadModel", "post"),
    "llama_pre_to_post": ("llama", "LlamaForCausalLM", "post"),
    "bert_post_to_pre": ("bert", "BertForMaskedLM", "pre"),
}


def generated_diff(config_name: str, model_class: str, placement: str) -> str:
    """The diff from the family's modeling file to the generated module for this conversion."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_convert_native import tiny_model

    from normswap.conversion.api import plan_conversion

    model = tiny_model(config_name, model_class)
    setup = plan_conversion(model, placement, native=False)
    assert setup.generated is not None
    family = setup.generated.family
    original_path = Path(sys.modules[type(model).__module__].__file__ or "")
    original = original_path.read_text(encoding="utf-8").splitlines(keepends=True)
    generated = setup.generated.source.splitlines(keepends=True)
    return "".join(difflib.unified_diff(original, generated, f"transformers/models/{family}/{original_path.name}",
                                        setup.generated.file_name, n=1))


def main() -> int:
    if sys.argv[1:] != ["--update"]:
        print(__doc__)
        return 2
    GOLDEN.mkdir(exist_ok=True)
    for name, case in CASES.items():
        (GOLDEN / f"{name}.diff").write_text(generated_diff(*case), encoding="utf-8")
        print(f"wrote {GOLDEN / name}.diff")
    return 0


if __name__ == "__main__":
    sys.exit(main())
