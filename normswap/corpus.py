"""The built-in texts: probe and calibration text (docstrings of Python's standard library), and the
healing corpus shipped in ``normswap/data``.

The probe text is always present, licence-clean (PSF), English technical prose, and the same on every
machine for a given Python version; ``--calib FILE`` replaces it with the user's own text. It stays the
docstrings so that what ``convert`` measures and reports does not change.

Healing needs more varied text than that: trained on docstrings, MiniLM matched its teacher on held-out
docstrings far better than on general English prose. ``healing_corpus`` is fixed data shipped in the wheel
(fiction, dialogue, legal, technical, news-like and list texts; sources and licences in
``normswap/data/README.md``), read without network and without looking at the machine it runs on.
"""

from __future__ import annotations

import importlib
import inspect
from importlib import resources
from pathlib import Path

from .errors import NormswapError

_MODULES = (
    "argparse", "collections", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "fractions", "functools", "heapq", "html.parser", "http.client", "inspect", "itertools", "json",
    "logging", "pathlib", "pickle", "queue", "random", "re", "shutil", "socket", "statistics", "string",
    "subprocess", "tarfile", "textwrap", "threading", "unittest", "urllib.parse", "uuid", "zipfile",
)


def default_corpus() -> list[str]:
    """Paragraphs of standard-library docstrings, in a fixed order."""
    paragraphs: list[str] = []
    for name in _MODULES:
        module = importlib.import_module(name)
        documented = [module, *(member for _, member in sorted(vars(module).items())
                                if (inspect.isclass(member) or inspect.isfunction(member))
                                and getattr(member, "__module__", None) == name)]
        for item in documented:
            for paragraph in (inspect.getdoc(item) or "").split("\n\n"):
                text = " ".join(paragraph.split())
                if len(text) >= 80 and not text.startswith((">>>", "...")):
                    paragraphs.append(text)
    return paragraphs


HEALING_CORPUS = "healing_corpus.txt"  # in normswap/data: one "register<TAB>text" a line


def healing_corpus(registers: tuple[str, ...] | None = None) -> list[str]:
    """The shipped healing texts, in file order; ``registers`` keeps only those (e.g. ``("fiction",)``)."""
    lines = resources.files("normswap").joinpath("data", HEALING_CORPUS).read_text(encoding="utf-8").splitlines()
    tagged = [line.split("\t", 1) for line in lines if line.strip()]
    return [text for register, text in tagged if registers is None or register in registers]


def read_corpus(path: str | Path) -> list[str]:
    """A user's text: one document per non-empty line of a UTF-8 file."""
    file = Path(path)
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise NormswapError(f"cannot read calibration text {file}: {error}; pass a UTF-8 text file") from None
    documents = [line for line in lines if line]
    if not documents:
        raise NormswapError(f"{file} holds no text; pass a file with one document per line")
    return documents
