"""The exact centring of a Pre-LN stream as a pass (docs/design.md §4), for passes that build on it.

Every reader of a Pre-LN stream is a LayerNorm, which ignores the stream's mean: centre every writer (each
branch's output projection, in float64) and the stream in code before each stack's layer loop, and the
function is unchanged while every norm now reads a zero-mean input. A pass that then replaces the LayerNorms
by something that does not subtract the mean (DyT, a calibrated stand-in) finds the mean subtraction already
done. The steps are the exact LayerNorm -> RMSNorm conversion's own (``norm_kind.centre_writers``,
``derive.stream_centring_edits``).
"""

from __future__ import annotations

from torch import nn

from ..codegen.derive import stream_centring_edits
from ..topology import Topology
from .native import meta_twin
from .norm_kind import centre_writers, require_centrable, stream_writers
from .passes import Pass, PassMove, Scales
from .program import Step


def centring_pass(model: nn.Module, topology: Topology) -> Pass:
    """The pass that centres ``model``'s stream; raises (``NormswapError``, with the reason) where the stream of
    this model cannot be centred without changing its function (not Pre-LN, a per-channel residual scale, a
    branch reading the stream with no norm, no class that runs the layer loop)."""
    require_centrable(model, topology)
    _, writers, tails = stream_writers(meta_twin(model), topology)

    def rewrite(steps: dict[str, Step], _scales: Scales) -> None:
        centre_writers(model, writers, tails, steps)

    return Pass("centre the residual stream: writers' outputs and the stream before each layer loop (exact: every "
                "norm the stream meets is a LayerNorm, which ignores its mean)", exact=True,
                placement=topology.placement, edits=tuple(stream_centring_edits(model, topology)), rewrite=rewrite,
                moves=tuple(PassMove("centre", writer, (writer,)) for writer in writers))
