"""Generated code loads wherever the stock family loads: an optional package the stock file imports only
when a feature is on (DistilBERT's ``import deepspeed`` under ZeRO-3) must not be required to load it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import transformers
from test_convert_native import tiny_model
from transformers.dynamic_module_utils import get_imports

from normswap.cli import main
from normswap.codegen.package import _guard_optional_imports

SOURCE = '''import torch
from transformers.utils import logging


def gather(x):
    if zero3():
        import deepspeed
        from deepspeed.zero import (
            GatheredParameters,
        )
        import json
    try:
        import apex
    except ImportError:
        apex = None
    return x
'''


def test_optional_imports_are_guarded_and_required_ones_kept(tmp_path: Path) -> None:
    guarded = _guard_optional_imports(SOURCE)
    compile(guarded, "generated.py", "exec")
    written = tmp_path / "generated.py"
    written.write_text(guarded)
    assert get_imports(written) == ["json", "torch", "transformers"]  # what transformers' check would require
    assert "        try:  # optional" in guarded and "            import deepspeed\n" in guarded
    assert guarded.count("except ImportError:\n            raise") == 2  # both deepspeed imports re-raise
    assert "    try:\n        import apex" in guarded  # already guarded: left as it was


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="needs deepspeed absent")
@pytest.mark.parametrize("flags", [("--placement", "pre"), ("--norm", "rmsnorm")], ids=["pre", "rmsnorm"])
def test_distilbert_output_loads_without_deepspeed(flags: tuple[str, ...], tmp_path: Path) -> None:
    tiny_model("distilbert", "DistilBertForMaskedLM").save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), *flags, "--quiet", "--no-native"]) == 0
    model = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "dst", trust_remote_code=True)
    assert type(model).__module__.endswith("modeling_normswap_distilbert")
