"""normswap: convert pretrained transformers between norm placements and norm kinds.

The public names are imported on first use (PEP 562), so that ``import normswap`` and the CLI start
without torch and transformers: ``normswap convert`` starts copying the source shards while those import.
"""

from importlib import import_module
from typing import Any

from .errors import NormswapError, RecipeError, SourceError, TopologyError, TracingError
from .version import __version__

_LAZY = {
    "ConversionPlan": ".conversion", "convert": ".conversion", "convert_checkpoint": ".conversion.checkpoint",
    "inspect": ".detect",
    "Branch": ".topology", "Layer": ".topology", "NormSite": ".topology", "Stack": ".topology",
    "ResidualScale": ".topology", "Sublayer": ".topology", "Topology": ".topology",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'normswap' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


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
    "ResidualScale",
    "SourceError",
    "Stack",
    "Sublayer",
    "Topology",
    "TopologyError",
    "TracingError",
    "__version__",
    "convert",
    "convert_checkpoint",
    "heal",
    "inspect",
]
