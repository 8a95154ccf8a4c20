"""Import transformers' ``test_modeling_common`` from its fetched test files, as the package its imports expect.

``test_modeling_common`` imports ``.generation.test_utils.GenerationTesterMixin`` and
``.exporters.test_export.ExportTesterMixin``, which the source distribution does not ship. Both stand in here as
empty mixins: the generation and export tests do not run (``docs/transformers_suite.md`` lists them).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
import warnings

import pytest
from transformers_tests_source import MissingTestFilesError, transformers_tests_folder

PACKAGE = "normswap_transformers_tests"


class GenerationTesterMixin:
    """Stands in for transformers' generation tests, which its source distribution does not ship."""


class ExportTesterMixin:
    """Stands in for transformers' export tests, which its source distribution does not ship."""


@functools.cache
def modeling_common() -> types.ModuleType:
    """transformers' ``tests/test_modeling_common.py`` for the installed version (``ModelTesterMixin``, ...)."""
    if importlib.util.find_spec("parameterized") is None:
        raise MissingTestFilesError("transformers' model tests need the `parameterized` package: "
                               "pip install -e '.[test]'")
    folder = transformers_tests_folder()
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(folder)]
    sys.modules[PACKAGE] = package
    for name, mixin in (("generation.test_utils", GenerationTesterMixin), ("exporters.test_export", ExportTesterMixin)):
        parent = name.split(".")[0]
        sys.modules.setdefault(f"{PACKAGE}.{parent}", types.ModuleType(f"{PACKAGE}.{parent}")).__path__ = []
        stand_in = types.ModuleType(f"{PACKAGE}.{name}")
        setattr(stand_in, mixin.__name__, mixin)
        sys.modules[f"{PACKAGE}.{name}"] = stand_in
    with warnings.catch_warnings():  # its pytest marks (flash_attn_test, ...) are registered in its own conftest
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        return importlib.import_module(f"{PACKAGE}.test_modeling_common")
