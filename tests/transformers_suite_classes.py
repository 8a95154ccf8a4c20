"""The classes one run of transformers' model tests covers: a family's stock classes, or the classes of the module
``normswap convert`` wrote for one conversion of a tiny model of that family.

The generated module is imported from the converted folder as it is, by its file path, as a user importing it
would: nothing here registers its classes anywhere.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import transformers
from test_convert_native import tiny_model
from transformers import PreTrainedConfig
from transformers_suite_families import Family, Variant

from normswap.cli import main

STOCK = "stock"


@dataclass(frozen=True)
class ClassesUnderTest:
    """What one run tests: its config class, its model classes, and the tester config for them."""

    family: Family
    variant: str  # STOCK or a Variant's name
    config_class: type[PreTrainedConfig]
    model_classes: tuple[type, ...]
    config_kwargs: dict[str, Any]


def stock_classes(family: Family) -> ClassesUnderTest:
    return ClassesUnderTest(family, STOCK, getattr(transformers, family.config_class),
                            tuple(getattr(transformers, name) for name in family.model_classes),
                            dict(family.config_kwargs))


def generated_classes(family: Family, variant: Variant, folder: Path) -> ClassesUnderTest:
    """Convert a tiny model of ``family`` with ``variant``'s flags into ``folder``/dst and take the generated
    module's classes of the stock classes' names, and its config class (the one its auto_map names)."""
    source, destination = folder / "src", folder / "dst"
    tiny_model(family.source_config, family.source_class).save_pretrained(source)
    code = main(["convert", str(source), str(destination), *variant.flags, "--quiet"])
    if code != 0:
        raise RuntimeError(f"normswap convert {' '.join(variant.flags)} of a tiny {family.name} failed ({code})")
    written = json.loads((destination / "config.json").read_text())
    if "auto_map" not in written:
        raise RuntimeError(f"{family.name} {variant.name}: the conversion wrote no generated code "
                           f"(realised as {written['normswap']['realisation']})")
    module_file, config_class = written["auto_map"]["AutoConfig"].split(".")
    package = f"suite_{family.name}_{variant.name.replace('-', '_')}"  # save_pretrained names the module's last part
    module = _import_from_file(destination / f"{module_file}.py", f"{package}.{module_file}")
    return ClassesUnderTest(family, variant.name, getattr(module, config_class),
                            tuple(getattr(module, name) for name in family.model_classes),
                            _widened(family, json.loads((source / "config.json").read_text()), written))


def _import_from_file(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _widened(family: Family, source: dict[str, Any], written: dict[str, Any]) -> dict[str, Any]:
    """The tester config, widened as the conversion widened the tiny model's stream, with the same head width."""
    kwargs = dict(family.config_kwargs)
    extra = written[family.width_key] - source[family.width_key]
    if extra:
        kwargs["head_dim"] = kwargs[family.width_key] // kwargs[family.heads_key]
        kwargs[family.width_key] += extra
    return kwargs
