"""Moves to Post-Norm that keep the stream's size (docs/design.md §3): each pre norm first takes the calibrated
scale of its input (``stream_scale.py``), then the norm shift moves it behind the residual add.

Sandwich -> post always goes this way (a direct step, cheaper than through Pre-Norm: moved at their own weights,
the norms would make the stream about 1 in size where the branches write into one that grows with depth), and so
does a mixed model (its Pre-Norm layers' norms rescaled, its new pre norms started at the calibrated scale). Pre ->
post goes this way when ``keep_stream_size`` is asked; by default it is the plain shift, which moves norm tensors
only.
"""

from __future__ import annotations

from torch import nn

from ..detect import inspect
from .chain import chain
from .registry import EdgeContext, PlacementEdge, Planner
from .setup import ConversionSetup


def _sandwich_to_post(context: EdgeContext) -> Planner:
    from .branch_norm_passes import branch_norm_planner

    return _through_stream_scaled_pre(branch_norm_planner("sandwich", "pre", context.native, extra=("scale pre",)),
                                      context)


def _mixed_to_post(context: EdgeContext) -> Planner:
    from .branch_norm_passes import mixed_planner

    return _through_stream_scaled_pre(mixed_planner("pre", context.native, extra=("scale pre",)), context)


def _through_stream_scaled_pre(to_pre: Planner, context: EdgeContext) -> Planner:
    """``to_pre`` (a step to Pre-Norm whose pre norms end at the stream's calibrated scale), then the norm shift."""
    from .api import plan_conversion
    from .route import home_or

    pre = home_or("pre", [to_pre])
    return lambda model: chain(model, [pre, lambda meta: plan_conversion(meta, "post", context.native)])


def _stream_scaled_shift(context: EdgeContext) -> Planner:
    """Pre norms at the stream's calibrated scale, then the norm shift to post. The rescale is exact and changes no
    code (the conversion's code and provenance are the shift's), so the shift, planned once on the model before it,
    is the shift of the rescaled model too; the norms it drops keep their weights, to be carried as they are. A model
    that came from Post-Norm goes home by the plain shift, its exact inverse."""
    def plan(model: nn.Module) -> ConversionSetup:
        from .api import plan_conversion
        from .compose import compose
        from .stream_scale import stream_scaled_pre_norms

        shift = plan_conversion(model, "post", context.native)
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


_KEPT = "pre norms at the stream's calibrated scale, then the norm shift"
PLACEMENT_EDGES = (
    PlacementEdge("sandwich", "post", _sandwich_to_post, cost=1.5, description=f"out norms dropped; {_KEPT}"),
    PlacementEdge("mixed", "post", _mixed_to_post, cost=1.5,
                  description=f"out norms dropped and pre norms added where missing; {_KEPT}"),
    PlacementEdge("pre", "post", _stream_scaled_shift, option="keep_stream_size", description=_KEPT),
    PlacementEdge("parallel", "post", _stream_scaled_shift, option="keep_stream_size", description=_KEPT),
)
