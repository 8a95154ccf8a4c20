"""normswap: convert pretrained transformers between norm placements and norm kinds."""

from .conversion import ConversionPlan, convert
from .detect import inspect
from .errors import NormswapError, RecipeError, SourceError, TopologyError, TracingError
from .topology import Branch, Layer, NormSite, Stack, Sublayer, Topology
from .version import __version__

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
    "inspect",
]
