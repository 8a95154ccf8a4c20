"""Which norm-kind conversion a model takes: one choice, shared by the API and the command line."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..detect import inspect
from ..detect.norms import is_norm_stand_in
from ..errors import ExactImpossibleError, NormswapError
from ..topology import Topology
from .approximate_kind import plan_layer_norm_approximate, plan_offset_to_rms_norm, plan_rms_norm_approximate
from .extra_dimension import plan_layer_norm_exact
from .norm_kind import NormKindPlan, plan_rms_norm
from .registry import NormKind
from .setup import ConversionSetup, convert_in_memory

# the norm kinds (as detected) that a --norm target already is: a LayerNorm without bias or weights, or with
# Nemotron's (1 + w) weight, is a LayerNorm; RMSNorm -> RMSNorm would only rename (Gemma's (1 + w) RMSNorm does
# become a plain one: the stock RMSNorm classes compute w * x / rms(x))
_ALREADY_RMS = frozenset({"rmsnorm", "rmsnorm-noaffine"})
_ALREADY_LAYER = frozenset({"layernorm", "layernorm-nobias", "layernorm-noaffine", "layernorm-offset"})


def plan_norm_kind(model: nn.Module, norm: str, *, exact: bool = False, untie: bool = False,
                   only: tuple[str, ...] = ()) -> ConversionSetup:
    """The setup for ``norm`` (a declared ``NORM_KINDS`` name: rmsnorm, layernorm, none, dyt) on a loaded or
    meta-device ``model``. What every kind shares is here: the refusal of ``exact`` where the kind cannot be exact,
    and nothing to do where the model's norms are that kind already, or where it has none. ``only``: the groups of
    norms to replace, for the kinds that can keep the rest (``NormKind.plan_some``)."""
    from .registry import norm_kinds
    from .route import require_norm_kind

    require_norm_kind(norm)
    kind = norm_kinds()[norm]
    if exact and kind.exact_refusal:
        raise NormswapError(kind.exact_refusal)
    if only:
        if kind.plan_some is None:
            some = ", ".join(name for name, each in norm_kinds().items() if each.plan_some is not None)
            raise NormswapError(f"--only picks the norms a norm-removing kind replaces ({some}); --norm {norm} "
                                "changes every norm of the model, so leave out --only")
        return kind.plan_some(model, only)
    try:
        topology = inspect(model)
    except NormswapError:  # no stack inspection can describe (MobileNet's convolutions): nothing to change either
        if _any_norm_module(model):
            raise
        family = getattr(model.config, "model_type", type(model).__name__)
        plan = NormKindPlan(family, family, "none", (), (), kind=norm, notes=(_no_norm_note(model, family),))
        return ConversionSetup(plan, None)
    kinds = {n.kind for n in topology.all_norms if n.kind != "identity"}
    if kind.removes_norms and (kinds or _any_norm_module(model)):
        return kind.plan(model, topology, exact, untie)
    if (kinds and kinds <= kind.already) or (not kinds and not _any_norm_module(model)):
        note = (f"{topology.model_type}'s norms are {kind.norms_named} already ({', '.join(sorted(kinds))})"
                if kinds else _no_norm_note(model, topology.model_type))
        plan = NormKindPlan(topology.model_type, topology.model_type, "none", (), (), kind=norm, notes=(note,))
        return ConversionSetup(plan, None, source=topology)
    return kind.plan(model, topology, exact, untie)


def _to_layer_norm(model: nn.Module, topology: Topology, exact: bool, untie: bool) -> ConversionSetup:
    """Exactly by one extra dimension with ``exact``, else approximately."""
    return plan_layer_norm_exact(model, untie=untie) if exact else plan_layer_norm_approximate(model)


def _to_rms_norm(model: nn.Module, topology: Topology, exact: bool, untie: bool) -> ConversionSetup:
    """Gemma's (1 + w) norms become plain RMSNorms (exact); Post-LN models convert approximately; Pre-LN models
    exactly, or approximately where their structure rules the exact map out (the plan says why)."""
    kinds = {n.kind for n in topology.all_norms if n.kind != "identity"}
    if "rmsnorm-offset" in kinds and kinds <= {"rmsnorm", "rmsnorm-offset", "rmsnorm-noaffine"}:
        return plan_offset_to_rms_norm(model)
    if topology.placement not in ("pre", "parallel"):  # a norm reads a branch's uncentred output
        return plan_rms_norm_approximate(model)
    try:
        return plan_rms_norm(model, untie=untie)
    except ExactImpossibleError as error:  # the structure rules the exact map out, not the conversion
        return plan_rms_norm_approximate(model, exact_impossible=error.reason)


NORM_KINDS = (
    NormKind("rmsnorm", _to_rms_norm, already=_ALREADY_RMS, plural="RMSNorms",
             description="exact for Pre-LN models (docs/design.md §4), approximate for Post-LN"),
    NormKind("layernorm", _to_layer_norm, already=_ALREADY_LAYER, plural="LayerNorms",
             description="approximate; exact with --exact, by one extra dimension (docs/design.md §5)"),
)


_BATCH_OR_GROUP = (nn.modules.batchnorm._NormBase, nn.GroupNorm)


def _any_norm_module(model: nn.Module) -> bool:
    """Whether ``model`` holds a normalisation other than batch and group norms: a LayerNorm or RMSNorm (where
    inspection placed none, a norm outside the stacks it found) or any module its code calls a norm (Dory's L2 norm,
    MobileBERT's NoNorm): then the model is not one with nothing to change, and the refusal says why."""
    return any(isinstance(module, (nn.LayerNorm, nn.RMSNorm))
               or ("norm" in type(module).__name__.lower() and not isinstance(module, _BATCH_OR_GROUP)
                   and not is_norm_stand_in(module))  # a norm-free model's stand-ins normalise nothing
               for module in model.modules())


def _no_norm_note(model: nn.Module, family: str) -> str:
    """Why a model with no LayerNorm or RMSNorm anywhere has nothing to change, naming the norms it keeps."""
    others = sorted({type(module).__name__ for module in model.modules() if isinstance(module, _BATCH_OR_GROUP)})
    kept = (f"; its {', '.join(others)} layers (statistics over a batch, or over positions and channels together, "
            "not per token) are no norm kind this changes and stay" if others else "")
    stand_ins = sorted({type(module).__name__ for module in model.modules() if is_norm_stand_in(module)})
    removed = (f"; it is norm-free: {', '.join(stand_ins)} modules stand where normswap removed its norms (convert "
               "the original checkpoint instead)" if stand_ins else "")
    return f"{family} has no LayerNorm or RMSNorm anywhere{kept}{removed}"


def convert_norm_kind(model: nn.Module, norm: str, *, exact: bool = False, untie: bool = False,
                      inputs: dict[str, torch.Tensor] | None = None, allow_nonfinite: bool = False
                      ) -> tuple[nn.Module, Any, Any, Any]:
    """(converted model, plan, report, generated module), converted and verified in memory."""
    converted, setup, report = convert_in_memory(model, plan_norm_kind(model, norm, exact=exact, untie=untie),
                                                 inputs, allow_nonfinite)
    return converted, setup.plan, report, setup.generated
