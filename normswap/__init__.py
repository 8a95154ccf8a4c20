"""normswap: convert pretrained transformers between norm placements and norm kinds."""

from typing import Any

from .conversion import ConversionPlan, convert
from .detect import inspect
from .errors import NormswapError, RecipeError, SourceError, TopologyError, TracingError
from .topology import Branch, Layer, NormSite, Stack, Sublayer, Topology
from .version import __version__


def heal(teacher: Any, student: Any, data: Any = None, **options: Any) -> Any:
    """Distil ``student`` (a converted model) toward ``teacher``; see ``normswap.healing.api.heal``.

    Imported on first use: training pulls in transformers' ``Trainer`` and accelerate, which converting
    and inspecting never need.
    """
    from .healing.api import heal as run

    return run(teacher, student, data, **options)

__all__ = [
    "Branch",
    "ConversionPlan",
    "Layer",
    "NormSite",
    "NormswapError",
    "RecipeError",
    "SourceError",
    "Stack",
    "Sublayer",
    "Topology",
    "TopologyError",
    "TracingError",
    "__version__",
    "convert",
    "heal",
    "inspect",
]
