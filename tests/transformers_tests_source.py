"""transformers' own common test files, for the installed version, fetched at test time and never copied here.

The source distribution on the package index holds ``tests/`` with the common mixins (``test_modeling_common.py``
and its neighbours at the top level; not ``tests/models``, ``tests/generation`` or ``tests/exporters``). It is
fetched once per version with pip into a cache folder; ``NORMSWAP_TRANSFORMERS_TESTS`` names an extracted copy
instead (the ``tests`` folder or the extracted distribution above it) on a machine without the index.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ENVIRONMENT_VARIABLE = "NORMSWAP_TRANSFORMERS_TESTS"
MARKER = "test_modeling_common.py"


class MissingTestFilesError(Exception):
    """transformers' test files could not be found or fetched; the message says, in one line, how to fix it."""


def transformers_tests_folder() -> Path:
    """The folder holding transformers' ``test_modeling_common.py`` for the installed transformers."""
    import transformers

    version = transformers.__version__
    named = os.environ.get(ENVIRONMENT_VARIABLE)
    if named:
        return _named_folder(Path(named))
    folder = _cache_root() / f"transformers-tests-{version}"
    if not (folder / MARKER).is_file():
        _fetch(version, folder)
    return folder


def _named_folder(path: Path) -> Path:
    for candidate in (path, path / "tests"):
        if (candidate / MARKER).is_file():
            return candidate
    raise MissingTestFilesError(f"{ENVIRONMENT_VARIABLE}={path} holds no {MARKER} (nor tests/{MARKER}): point it at "
                           "the tests folder of an extracted transformers source distribution of the installed "
                           "version")


def _cache_root() -> Path:
    root = os.environ.get("NORMSWAP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "normswap")
    return Path(root)


def _fetch(version: str, folder: Path) -> None:
    """Download the sdist with pip and keep its top-level ``tests/*.py``, written atomically into ``folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   f"transformers=={version}", "--dest", scratch]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        archives = list(Path(scratch).glob("transformers-*.tar.gz"))
        if done.returncode != 0 or len(archives) != 1:
            raise MissingTestFilesError(
                f"cannot fetch transformers=={version}'s source distribution with pip (needed for transformers' own "
                f"model tests): reach the package index, or set {ENVIRONMENT_VARIABLE} to the tests folder of an "
                f"extracted transformers-{version}.tar.gz")
        extracted = Path(scratch) / "tests"
        extracted.mkdir()
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                parts = Path(member.name).parts
                if member.isfile() and len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py"):
                    (extracted / parts[2]).write_bytes(archive.extractfile(member).read())
        if not (extracted / MARKER).is_file():
            raise MissingTestFilesError(f"transformers-{version}.tar.gz holds no tests/{MARKER}: set "
                                   f"{ENVIRONMENT_VARIABLE} to a folder that holds transformers' common test files")
        try:
            extracted.replace(folder)
        except OSError:  # another process wrote it first
            if not (folder / MARKER).is_file():
                raise
