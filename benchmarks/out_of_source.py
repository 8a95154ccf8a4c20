"""Out-of-source evaluation for the healing benchmarks, and the healing data sources they compare.

``data/general_prose.txt`` (259 sentences of general English prose written for normswap, ``data/README.md``)
shares no text and no source with any training data: healing is judged on text it could not have learned.
The student is measured against the teacher with the same figures as healing's own held-out evaluation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

PROSE = Path(__file__).resolve().parent / "data" / "general_prose.txt"
SOURCES = ("shipped", "docstrings", "teacher")  # names --data takes besides a file


def out_of_source_texts() -> list[str]:
    """The fixed out-of-source evaluation texts, one a line."""
    return [line.strip() for line in PROSE.read_text(encoding="utf-8").splitlines() if line.strip()]


def docstring_sentences() -> list[str]:
    """The default healing corpus before issue 19: standard-library docstrings split into sentences."""
    from normswap.corpus import default_corpus
    end = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
    return [s for paragraph in default_corpus() for s in end.split(paragraph) if len(s) >= 40]


def healing_data(name: str) -> str | Sequence[str] | None:
    """What ``heal(data=...)`` gets for a benchmark's data name: the ``shipped`` corpus, the old
    ``docstrings``, ``teacher`` samples, or a file path."""
    if name == "shipped":  # explicitly: for a causal LM, no data means the teacher's samples
        from normswap.corpus import healing_corpus
        return healing_corpus()
    if name == "docstrings":
        return docstring_sentences()
    return name


class OutOfSource:
    """The out-of-source texts measured on a student: once before healing (which also keeps the teacher's
    side), again after."""

    def __init__(self, teacher: nn.Module, student: nn.Module, tokenizer: Any, max_length: int = 64,
                 batch_size: int = 8) -> None:
        from normswap.healing.evaluation import HeldOutEvaluation
        from normswap.healing.rows import TokenisedTexts
        from normswap.healing.taps import correspond

        vocab = student.get_input_embeddings().num_embeddings
        rows = TokenisedTexts(out_of_source_texts(), tokenizer, max_length, vocab)
        self.evaluation = HeldOutEvaluation(teacher, student, correspond(teacher, student), rows, batch_size)
        self.indices = list(range(len(rows)))

    def measure(self) -> dict[str, Any]:
        return self.evaluation.summary(self.evaluation.measure(self.indices))
