"""Which passes take a model from the layout it has to the one asked for (docs/design.md §9).

Placements meet at Pre-Norm: Post <-> Pre is the norm-shift mapping (§3), the branch-norm placements reach
Pre by dropping or adding norms with calibrated stand-ins (§9), and two that share a slot go directly
(sandwich -> post-sublayer drops the pre norms). A norm-kind change runs where the model is Pre-Norm, where
the exact maps are exact (§4, §5): before the placement passes when the source is Pre-Norm, after them when it
is not.
"""

from __future__ import annotations

from torch import nn

from ..detect import inspect
from ..errors import NormswapError
from ..topology import Topology
from .chain import Planner, chain
from .plan import ConversionPlan, PlanError, require_placement_source
from .setup import ConversionSetup

PLACEMENTS = ("pre", "post", "sandwich", "post-sublayer")
PRE_LIKE = ("pre", "parallel")

# (from, to) -> the branch-norm passes that go directly, by name; everything else goes through "pre"
_BRANCH_NORM_STEPS: dict[tuple[str, str], tuple[str, ...]] = {
    ("sandwich", "pre"): ("drop out",),
    ("post-sublayer", "pre"): ("add pre", "drop out"),
    ("pre", "sandwich"): ("add out",),
    ("pre", "post-sublayer"): ("drop pre", "add out"),
    ("sandwich", "post-sublayer"): ("drop pre",),
    ("post-sublayer", "sandwich"): ("add pre",),
}


def plan_layout(model: nn.Module, placement: str | None = None, norm: str | None = None, *, exact: bool = False,
                untie: bool = False, native: bool = True, keep_stream_size: bool = False) -> ConversionSetup:
    """The setup for ``--placement`` and/or ``--norm`` on ``model`` (loaded or meta), as one conversion.
    ``keep_stream_size``: a Pre-Norm model moved to post first sets its pre norms to the stream's calibrated scale
    (``stream_scale.py``), so the moved norms keep the stream's size; refused for any other placement change."""
    if placement is None and norm is None:
        raise NormswapError("pass placement=, norm= or both")
    if placement is not None and placement not in PLACEMENTS:
        raise NormswapError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if placement is None:
        return _norm_planner(norm, exact, untie)(model)
    topology = inspect(model)
    source = topology.placement
    if source not in (*PLACEMENTS, *PRE_LIKE):
        require_placement_source(topology)  # raises, naming what rules the placement passes out
    if keep_stream_size and not (placement == "post" and source in PRE_LIKE):
        raise PlanError(f"keeping the stream's size applies to a Pre-Norm model moved to post; this is {source} -> "
                        f"{placement} (sandwich -> post keeps it always): leave --keep-stream-size out")
    planners = [_stream_scale_planner(native)] if keep_stream_size else placement_planners(source, placement, native)
    if not planners and norm is None:
        return _already(topology, placement)
    if norm is None:
        return chain(model, planners)
    kind = _norm_planner(norm, exact, untie)
    # the kind changes where the model is Pre-Norm, where it is exact; norms removed (none, dyt) go last, since the
    # placement passes move norms
    ordered = [kind, *planners] if source in PRE_LIKE and norm not in ("none", "dyt") else [*planners, kind]
    return chain(model, ordered)


def _already(topology: Topology, placement: str) -> ConversionSetup:
    """Nothing to do: the model has ``placement`` already."""
    family = topology.model_type
    return ConversionSetup(ConversionPlan(family, family, topology.placement, placement, "none", exact=True,
                                          notes=(f"{family} already has {placement} placement: nothing to do",)),
                           None, source=topology)


def placement_planners(source: str, target: str, native: bool = True) -> list[Planner]:
    """The planners from placement ``source`` to ``target``, in order (none where they are one placement)."""
    if source == target or (source == "parallel" and target == "parallel"):
        return []
    if (source, target) in _BRANCH_NORM_STEPS:
        return [_branch_norm_planner(source, target, native)]
    if source == "post" and target == "pre":  # back home where the way out rescaled the pre norms (sandwich)
        return [_home_or(target, [_norm_shift_planner(target, native)])]
    if source in ("post", *PRE_LIKE) and target in ("post", *PRE_LIKE):
        return [_norm_shift_planner(target, native)]
    if source == "post":  # post -> pre by the norm shift, then pre -> the branch-norm placement
        # no stock family stands between: the new norms go into the source family's own code (a stock Pre-Norm
        # twin may add its branches where it builds no norm to copy: MegatronBERT's SelfOutput)
        return [_home_or(target, [_norm_shift_planner("pre", False), _branch_norm_planner("pre", target, native)])]
    if target == "post" and source == "sandwich":  # its pre norms take the stream's scale before they move
        return [_home_or(target, [_branch_norm_planner(source, "pre", native, extra=("scale pre",)),
                                  _norm_shift_planner("post", native)])]
    if target == "post":  # post-sublayer: the pre norms it gains start at the stream's scale already
        return [_home_or(target, [*placement_planners(source, "pre", native), _norm_shift_planner("post", native)])]
    if source == "parallel":
        return [_norm_shift_planner("pre", native), *placement_planners("pre", target, native)]
    raise PlanError(f"a model of {source} placement has no single norm per slot for the placement passes to move")


def _stream_scale_planner(native: bool) -> Planner:
    """Pre norms at the stream's calibrated scale, then the norm shift to post. The rescale is exact and changes no
    code (the conversion's code and provenance are the shift's), so the shift, planned once on the model before it,
    is the shift of the rescaled model too; the norms it drops keep their weights, to be carried as they are. A model
    that came from Post-Norm goes home by the plain shift, its exact inverse."""
    def plan(model: nn.Module) -> ConversionSetup:
        from .api import plan_conversion
        from .compose import compose
        from .stream_scale import stream_scaled_pre_norms

        shift = plan_conversion(model, "post", native)
        if _came_from_post(model):
            return shift
        topology = shift.source or inspect(model)  # the shift detected this model already
        dropped = frozenset(move.source for stack in getattr(shift.plan, "stacks", ()) for move in stack.moves
                            if move.target is None)
        rescale = compose(model, topology, [stream_scaled_pre_norms(model, topology, dropped)], "")
        return chain(model, [lambda _: rescale, lambda _: shift])

    return plan


def _came_from_post(model: nn.Module) -> bool:
    """Whether normswap made ``model`` from a Post-Norm one (its provenance says so)."""
    provenance = getattr(model.config, "normswap", None)
    conversion = provenance.get("conversion", "") if isinstance(provenance, dict) else ""
    return any(part.startswith("placement post -> ") for part in str(conversion).split("; then "))


def _norm_shift_planner(target: str, native: bool) -> Planner:
    from .api import plan_conversion

    return lambda model: plan_conversion(model, target, native)


def branch_norm_steps(source: str, target: str) -> tuple[str, ...]:
    """The branch-norm passes, by name, that go directly from placement ``source`` to ``target``."""
    return _BRANCH_NORM_STEPS[(source, target)]


def _branch_norm_planner(source: str, target: str, native: bool, extra: tuple[str, ...] = ()) -> Planner:
    names = _BRANCH_NORM_STEPS[(source, target)] + extra

    def plan(model: nn.Module) -> ConversionSetup:
        from .branch_norm_passes import branch_norm_setup

        return branch_norm_setup(model, names, f"placement {source} -> {target} (calibrated stand-ins)", target,
                                 native)

    return _home_or(target, [plan])


def _home_or(target: str, planners: list[Planner]) -> Planner:
    """A model the branch-norm passes made, converted to its stock family's placement, goes back to that family
    (``return_home.py``); any other model takes ``planners``."""
    def plan(model: nn.Module) -> ConversionSetup:
        from .return_home import home_setup

        return home_setup(model, target) or chain(model, planners)

    return plan


def _norm_planner(norm: str | None, exact: bool, untie: bool) -> Planner:
    from .norm_change import plan_norm_kind

    return lambda model: plan_norm_kind(model, norm or "", exact=exact, untie=untie)
