"""normswap: convert pretrained transformers between norm placements and norm kinds."""

from .detect import inspect
from .errors import NormswapError, RecipeError, SourceError, TopologyError, TracingError
from .topology import Branch, Layer, NormSite, Stack, Sublayer, Topology

__version__ = "0.1.0"

__all__ = [
    "Branch",
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
    "inspect",
]
