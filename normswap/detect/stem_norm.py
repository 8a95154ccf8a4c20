"""A norm that only a stack's first layer runs, on the stream before its first residual is taken, is the stack's
embedding norm (RWKV builds ``pre_ln`` in block 0 alone and applies it there: ``if layer_id == 0``).

Read as a pre norm of layer 0 it would give layer 0 one norm more than the layers after it, so the stack's norms
would not form the one sequence per stack that the norm-shift mapping moves (docs/design.md §2), and one rewrite
of the layer class could not serve every layer. It normalises what the whole stack starts from, exactly what an
embedding norm before the loop does; the stack's sequence then reads ``E, N_0, ..., Z`` like BLOOM's.
"""

from __future__ import annotations

from dataclasses import replace

from ..topology import Layer, NormSite, Stack

TAKEN_AFTER_PRE_NORM = "the residual is taken after the pre norm"


def lift_stem_norms(stacks: list[Stack], layers: list[Layer], stems: dict[str, tuple[str, ...]]
                    ) -> tuple[list[Stack], list[Layer]]:
    """``stacks`` and ``layers`` with each first-layer-only stem norm moved to its stack's embedding norm.

    ``stems`` maps a layer's path to the paths (absolute) of the norms it runs on the stream before its first
    residual is taken. A stack that already has an embedding norm, or whose later layers run such norms too
    (then each is a norm of every layer, not of the stack), or that runs more than one, is left as it is."""
    lifted: dict[str, NormSite] = {}  # layer path -> the norm it gives up
    new_stacks = []
    for stack in stacks:
        own = [layer for layer in layers if layer.stack == stack.path]
        first = own[0] if own else None
        if (stack.embedding_norm is not None or first is None or first.index != 0 or len(stems.get(first.path, ())) != 1
                or any(stems.get(layer.path) for layer in own[1:])):
            new_stacks.append(stack)
            continue
        site = next((norm for norm in first.sublayers[0].norms if norm.path == stems[first.path][0]), None)
        if site is None:
            new_stacks.append(stack)
            continue
        lifted[first.path] = site
        new_stacks.append(replace(stack, embedding_norm=replace(site, slot="embedding")))
    return new_stacks, [_without(layer, lifted[layer.path]) if layer.path in lifted else layer for layer in layers]


def _without(layer: Layer, norm: NormSite) -> Layer:
    """``layer`` with ``norm`` gone from its first sublayer: from the norms, the branches' reads and the notes."""
    first, *rest = layer.sublayers
    first = replace(
        first,
        norms=tuple(site for site in first.norms if site.path != norm.path),
        branches=tuple(replace(branch, reads=tuple(path for path in branch.reads if path != norm.path))
                       for branch in first.branches),
        notes=tuple(note for note in first.notes if note != TAKEN_AFTER_PRE_NORM),
    )
    return replace(layer, sublayers=(first, *rest))
