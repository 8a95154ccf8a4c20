"""The source edits a placement change needs, as frozen records (one kind of edit per class).

Edits name a class of the modeling file, a line (from the fx stack traces of the traced
layer) and ``self.<attribute>`` paths relative to that class, so that the rewrite is a plain
lookup: find the statement at that line in that class, change the one matching expression.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UnwrapNormCall:
    """``self.<norm>(x)`` -> ``x`` in the statement at ``line``."""

    class_name: str
    line: int
    norm: str


@dataclass(frozen=True)
class WrapResidualAdd:
    """``a + b`` -> ``self.<norm>(a + b)``: the outermost addition of the statement at ``line``."""

    class_name: str
    line: int
    norm: str


@dataclass(frozen=True)
class WrapBranchInput:
    """``self.<branch>(x, ...)`` -> ``self.<branch>(self.<norm>(x), ...)`` in the statement at ``line``."""

    class_name: str
    line: int
    branch: str
    norm: str


@dataclass(frozen=True)
class UnwrapModelNorm:
    """Every ``self.<norm>(x)`` call in ``forward`` of a model-level class -> ``x``."""

    class_name: str
    norm: str


@dataclass(frozen=True)
class NeutraliseNorm:
    """Every ``self.<norm> = ...`` in ``__init__`` -> ``NormswapRemovedNorm(parameters)``.

    The placeholder passes its input through and keeps an empty tensor under each of the norm's
    parameter names, so the stock class refuses the checkpoint (size mismatch) instead of loading it.
    """

    class_name: str
    norm: str
    parameters: tuple[str, ...] = ("weight",)


@dataclass(frozen=True)
class AddStackNorm:
    """A new norm on the class that runs the layer loop, applied before or after the loop.

    Its constructor is copied from ``self.<copy_attribute> = ...`` in ``copy_from``'s ``__init__``.
    """

    class_name: str
    stack_attribute: str
    norm: str
    where: str  # "before" or "after" the loop
    copy_from: str
    copy_attribute: str


@dataclass(frozen=True)
class ReplaceNormClass:
    """Every ``self.<norm> = SomeNorm(args)`` in ``__init__`` -> ``<new_class>(args)``.

    The replacement classes take the replaced class's arguments (``NormswapRMSNorm`` those of
    ``nn.LayerNorm``, ``NormswapLayerNorm`` those of a ``(hidden_size, eps)`` RMSNorm), so the call keeps
    its arguments and the parameters keep their names.
    """

    class_name: str
    norm: str
    new_class: str = "NormswapRMSNorm"
    keywords: tuple[tuple[str, str], ...] = ()  # arguments to set, as source text (a weightless norm's eps)


@dataclass(frozen=True)
class CentreStream:
    """``h = h - h.mean(-1, keepdim=True)`` just before the layer loop: the stream starts with zero mean."""

    class_name: str
    stack_attribute: str


Edit = (UnwrapNormCall | WrapResidualAdd | WrapBranchInput | UnwrapModelNorm | NeutraliseNorm | AddStackNorm
        | ReplaceNormClass | CentreStream)
