"""The stream read and updated at the positions a mask selects: layers that route tokens.

HiggsAudio v2 gives its text and audio tokens norms and MLPs of their own inside one layer:

    h = h.masked_scatter(m[..., None], N_a(h[m]))      # the audio positions normalised by N_a
    h = h.masked_scatter(~m[..., None], N_t(h[~m]))    # the text positions by N_t
    h = r + attn(h)
    h[~m] += M_t(N'_t(h[~m]))                          # a residual add at the text positions

Each token still meets one norm before each branch and one add after it. Read by what the operations do:

* selecting positions (``h[m]``, a boolean mask over the leading axes) keeps every selected token's vector
  whole, so it passes the stream on as a cast does;
* an augmented item assignment ``h[i] += F`` adds ``F`` to the stream at the positions ``i``: a residual add;
* a masked scatter into ``h`` of a norm of ``h``'s own positions normalises those positions.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx


def selects_positions(node: fx.Node) -> bool:
    """``h[m]`` with ``m`` a boolean mask over leading axes of ``h``: whole token vectors, picked by position."""
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return False
    container, index = node.args
    stream = container.meta.get("meta_value") if isinstance(container, fx.Node) else None
    mask = index.meta.get("meta_value") if isinstance(index, fx.Node) else None
    return (isinstance(stream, torch.Tensor) and isinstance(mask, torch.Tensor) and mask.dtype is torch.bool
            and 0 < mask.dim() < stream.dim())


def item_update(node: fx.Node, is_add: object) -> tuple[fx.Node, fx.Node] | None:
    """``(h, F)`` where ``node`` is ``h[i] += F`` (``operator.setitem(h, i, h[i] + F)``), else None.

    ``is_add`` tells an add node (the graph's own test, so in-place and method adds count too)."""
    if node.op != "call_function" or node.target is not operator.setitem or len(node.args) != 3:
        return None
    stream, index, value = node.args
    if not isinstance(stream, fx.Node) or not isinstance(value, fx.Node) or not is_add(value):  # type: ignore[operator]
        return None
    summands = [arg for arg in value.args[:2] if isinstance(arg, fx.Node)]
    if len(summands) != 2:
        return None
    for read, update in (summands, summands[::-1]):
        if (read.op == "call_function" and read.target is operator.getitem and len(read.args) == 2
                and read.args[0] is stream and read.args[1] is index):
            return stream, update
    return None


def scattered_source(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(h, v)`` where ``node`` is ``h.masked_scatter(mask, v)``: ``v`` written over the masked positions of ``h``."""
    if ((node.op == "call_method" and node.target == "masked_scatter")
            or (node.op == "call_function" and node.target is torch.masked_scatter)) and len(node.args) == 3:
        base, _, source = node.args
        if isinstance(base, fx.Node) and isinstance(source, fx.Node):
            return base, source
    return None
