"""The source edits that remove a slot's norms from every layer (their stand-ins folded in: docs/design.md §9).

Each call of a removed norm is unwrapped where the trace found it (``self.<norm>(x)`` -> ``x``) and its
constructor becomes the placeholder every removed norm becomes (``NeutraliseNorm``), so the generated code
runs no norm there and the checkpoint keeps none of its weights. Layers are rewritten once per layer class and
variant, as ``placement_edits`` does.
"""

from __future__ import annotations

from torch import nn

from ..topology import Layer, NormSlot, Topology
from .derive import (
    _branch_called_beside,
    _is_list_item,
    _Locator,
    _parameter_names,
    each_variant_edits,
    owner_and_attribute,
)
from .edits import Edit, NeutraliseNorm, UnwrapNormCall


def removed_norm_edits(model: nn.Module, topology: Topology, slot: NormSlot) -> list[Edit]:
    """Unwrap and neutralise every ``slot`` norm of the layers (``pre`` or ``out``)."""
    def layer_edits(locate: _Locator, layer: Layer) -> list[Edit]:
        found: list[Edit] = []
        for sub in layer.sublayers:
            for norm in sub.norms_in(slot):
                class_name, attribute = locate.attribute(norm.source, norm.path)
                # a pre norm's call beside its branch's call on one line (FocalNet) must not take the other
                beside = _branch_called_beside(locate, sub, class_name, norm.source) if slot == "pre" else ""
                found += [edit for edit in (UnwrapNormCall(class_name, locate.line(norm.source), attribute, beside),
                                            _placeholder(model, norm.path)) if edit not in found]
        return found

    return each_variant_edits(model, topology, layer_edits)


def _placeholder(model: nn.Module, path: str) -> NeutraliseNorm:
    """The removed norm's constructor -> ``NormswapRemovedNorm``; for an item of a module list, each item's."""
    if _is_list_item(model, path):
        owner, attribute = owner_and_attribute(model, path.rsplit(".", 1)[0])
        return NeutraliseNorm(owner, attribute, _parameter_names(model, path), type(model.get_submodule(path)).__name__)
    return NeutraliseNorm(*owner_and_attribute(model, path), _parameter_names(model, path))
