"""Domain errors. Each carries a one-line message that says what is wrong and how to fix it.

The CLI maps ``NormswapError`` to ``Error: <message>`` and exit code 1; anything else
is a bug and is not swallowed.
"""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """An exception's text for a one-line message: texts can span many lines (the first two, joined, at most
    300 characters), and an empty one says its type."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2])[:300] if lines else type(error).__name__


class NormswapError(Exception):
    """A known failure with an actionable one-line message."""


class SourceError(NormswapError):
    """The input checkpoint or config cannot be used as given."""


class TracingError(NormswapError):
    """torch.fx could not trace a layer; the message names the layer class and the construct."""


class TopologyError(NormswapError):
    """The traced model does not have the residual structure normswap works on."""


class RecipeError(NormswapError):
    """A recipe file does not follow the schema."""


class ExactnessError(NormswapError):
    """An exact conversion did not reproduce the original within the tolerance."""


class ExactImpossibleError(NormswapError):
    """The model's structure rules an exact conversion out (found while planning), not an approximate one.
    ``reason`` says why in one clause."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class StructuralMissError(ExactnessError):
    """The exact conversion missed, and a measurement shows the model's structure is why (not normswap): the
    mathematics forbids the exact conversion, not an approximate one. ``reason`` says why in one clause."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class StreamOutputError(StructuralMissError):
    """The model returns its un-normalised residual stream as an output, which no exact norm-kind map keeps."""
