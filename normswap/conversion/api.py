"""``normswap.convert``: change a loaded model's norm placement, in memory.

The result is an ordinary transformers model (a stock class for native targets), ready for
``Trainer``, PEFT or ``generate()``. It carries ``normswap_plan`` (what was done) and
``normswap_carried`` (norm tensors the target had no slot for, restored by a conversion back).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..codegen.package import GeneratedModule
from ..detect import inspect
from ..errors import NormswapError, SourceError
from ..recipe import NativeTarget, recipe_for
from ..topology import Topology
from .generated import generated_target, head_stored_apart
from .native import meta_instance, target_class, target_config
from .plan import ConversionPlan, build_placement_plan, require_placement_source, serialises
from .program import shapes_of
from .registry import EdgeContext, PlacementEdge, Planner
from .removed_norm_tensors import removed_norm_keys
from .round_trip_carry import carried_scales
from .setup import ConversionSetup, convert_in_memory, realise
from .verify import DriftReport, measure_drift, require_branch_zero, require_topology
from .weights import placement_program

PLACEMENTS = ("pre", "post")


def _norm_shift_edge(source: str, target: str) -> PlacementEdge:
    """The norm shift as a route's step. Leaving Post-Norm or parallel blocks on the way to a branch-norm placement,
    no stock family stands between: the new norms go into the source family's own code, as the norm shift wrote
    it (a stock Pre-Norm twin may build no norm where a branch needs one: MegatronBERT's SelfOutput; a stock
    sequential switch keeps the parallel code that its config skips: Falcon's in-place ``mlp_output +=
    attention_output``, which hides the MLP's term of the add from the out norm's rewrite)."""
    def plan(context: EdgeContext) -> Planner:
        native = context.native and not (source in ("post", "parallel") and context.between)
        return lambda model: plan_conversion(model, target, native)

    return PlacementEdge(source, target, plan, description="the norm shift (docs/design.md §3)")


PLACEMENT_EDGES = tuple(_norm_shift_edge(source, target)
                        for source, target in (("post", "pre"), ("pre", "post"), ("parallel", "pre"),
                                               ("parallel", "post")))


class RealisationError(NormswapError):
    """No way to express the target layout for this model: the message says what in its structure rules it out."""


def placement_of(topology: Topology) -> str:
    """``pre`` or ``post``: a model with parallel blocks normalised before them counts as pre-norm where a
    target is checked (a post-norm parallel model converted back to ``pre`` returns to its parallel blocks)."""
    return "pre" if topology.placement == "parallel" else topology.placement


def plan_conversion(model: nn.Module, placement: str, native: bool = True) -> ConversionSetup:
    """Detect ``model``, choose the realisation and plan the norm moves to ``placement``.

    ``pre`` on a parallel Pre-Norm model means sequential Pre-Norm (each branch its own sublayer), the
    layout it is not yet in; it is realised by the family's own switch (GPT-NeoX ``use_parallel_residual``), or
    by generated code where the family has none (GPT-J, Phi, Cohere: the later branch gets a norm of its own and
    reads the stream after the earlier branch's add).
    """
    if placement not in PLACEMENTS:
        raise NormswapError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    source = inspect(model)
    model_type = source.model_type
    if source.placement == placement:
        plan = ConversionPlan(model_type, model_type, source.placement, placement, "none", exact=True,
                              notes=(f"{model_type} already has {placement} placement: nothing to do",))
        return ConversionSetup(plan, None, source=source)
    require_placement_source(source)
    serial = serialises(source.placement, placement)
    back_home = _original_family(model, placement)
    target = back_home or (_native_target(model_type, placement) if native else None)
    passed_over = ""
    if target is not None:
        config = target_config(model.config, target)
        if head_stored_apart(model) is not None:  # a head of its own stays apart in the stock target too
            config.tie_word_embeddings = False
        cls = target_class(model, target)
        switched = f"{target.model_type} with {dict(target.config) or 'the recipe config'}"
        try:
            target_topology = inspect(meta_instance(cls, config))
        except SourceError as error:
            if not serial or back_home is not None:
                raise
            raised = error.__cause__  # what the stock code raised, as detection keeps it
            target_topology, passed_over = None, (f"the stock {switched} does not run this model's config ("
                                                  f"{f'{type(raised).__name__}: {raised}' if raised else error})")
        if target_topology is not None:
            reached = target_topology.placement if serial else placement_of(target_topology)
            if reached != placement and serial:  # the switch is ignored where this config sets something else
                passed_over = f"the stock {switched} still builds {reached} blocks for this model's config"
            elif reached != placement:
                raise RealisationError(f"the native target {target.model_type} has {target_topology.placement} "
                                       f"placement, not {placement}; the recipe for {model_type} is wrong")
            else:
                plan = build_placement_plan(source, target_topology, f"native: {target.model_type}")
                return _placement_setup(model, plan, source, target_topology, cls, config, None)
    if getattr(model.config, "normswap", None):
        raise RealisationError(f"{model_type} is already normswap-generated code that no norm shift of its own "
                               f"expresses; convert the original {model.config.normswap.get('source_model_type')} "
                               "checkpoint instead, with every change in one command (--placement and --norm)")
    generated, cls, config = generated_target(model, source, placement)
    target_topology = inspect(meta_instance(cls, config))
    if placement_of(target_topology) != placement:
        raise RealisationError(f"the generated {generated.model_type} code detects as {target_topology.placement}, "
                               f"not {placement}; this is a normswap bug, please report it")
    plan = build_placement_plan(source, target_topology, f"generated code: {generated.file_name}")
    if passed_over:  # a sequential switch that this config's code ignores (Falcon's new_decoder_architecture)
        plan = replace(plan, notes=(*plan.notes, f"{passed_over}: generated code instead"))
    return _placement_setup(model, plan, source, target_topology, cls, config, generated)


def _placement_setup(model: nn.Module, plan: ConversionPlan, source: Topology, target: Topology, cls: Any,
                     config: Any, generated: GeneratedModule | None) -> ConversionSetup:
    """The plan's tensor program against the target's expected tensors, and its verification."""
    built = meta_instance(cls, config)
    program = placement_program(shapes_of(model.state_dict()), plan, shapes_of(built.state_dict()),
                                getattr(model, "normswap_carried", None), removed_norm_keys(built))

    def verify(original: nn.Module, converted: nn.Module, probe: dict[str, torch.Tensor]) -> DriftReport:
        require_topology(converted, target)
        report = measure_drift(original, converted, source, target, probe, exact=plan.exact)
        require_branch_zero(plan, report)
        return report

    return ConversionSetup(plan, program, cls, config, generated,
                           f"placement {plan.source_placement} -> {plan.target_placement}", source, target, verify)


def convert(model: nn.Module, placement: str | None = None, *, norm: str | None = None, exact: bool = False,
            untie: bool = False, native: bool = True, allow_nonfinite: bool = False,
            inputs: dict[str, torch.Tensor] | None = None, calibrate: bool = True,
            keep_stream_size: bool = False, only: tuple[str, ...] = ()) -> nn.Module:
    """Return ``model`` converted to ``placement`` (pre, post, sandwich, post-sublayer), to ``norm``, or both.

    Pre <-> Post follows the norm-shift mapping (inexact; converting to the placement the model already
    has returns ``model`` itself and logs that); the sandwich and post-sublayer placements are reached by removing
    norms as their calibrated stand-ins and adding norms at their calibrated scale (docs/design.md §9), measured
    on ``inputs`` (token ids with their attention mask; fixed random ids where not given; ``calibrate=False``
    starts them at unit scale instead, the naive start, for comparison). ``norm="rmsnorm"`` on
    a Pre-LN model and ``norm="layernorm", exact=True`` on a Pre-RMSNorm decoder (one extra hidden dimension) are
    exact and checked: the result matches the original to 1e-4 x max|reference| in fp32, or ``ExactnessError`` is
    raised. ``norm="layernorm"`` alone is approximate and carries a drift report. Both at once are one conversion
    (one generated module, one verification against the original), exact only if every pass is. The realised
    model is re-detected and must show the planned topology. A model holding NaN or Inf is refused
    (``NonFiniteError`` names the tensor) unless ``allow_nonfinite``. ``keep_stream_size`` (Pre -> Post only):
    first set each pre norm to the calibrated scale of its input, folding its own weight into its readers, so the
    moved norms keep the stream's size (``stream_scale.py``; the way back is then within float rounding, not bit
    for bit). ``only`` (``norm="none"`` or ``"dyt"``): replace only the norms of these groups (``embedding``,
    ``final``, a sublayer kind such as ``mlp``, a slot such as ``pre``, or both as ``mlp:pre``) and keep the others,
    one stage of a staged removal.
    """
    from .route import plan_layout

    if placement is None and norm is None:
        raise NormswapError("pass placement=, norm= or both")
    if norm is None and placement in PLACEMENTS and inputs is None and not keep_stream_size:
        source = inspect(model).placement
        carried = carried_scales(getattr(model, "normswap_carried", None) or {})
        if (source == "post" and not carried) or source in ("pre", "parallel"):
            # the norm shift alone: realised and re-detected, no probe run (a model carrying the scales its pre norms
            # were rescaled with goes home through them)
            setup = plan_conversion(model, placement, native)
            converted = realise(model, setup, allow_nonfinite)
            if setup.target is not None:
                require_topology(converted, setup.target)
            return converted
    setup = plan_layout(model, placement, norm, exact=exact, untie=untie, native=native,
                        keep_stream_size=keep_stream_size, only=tuple(only))
    converted, setup, _ = convert_in_memory(model, setup, inputs, allow_nonfinite, unit_scales=not calibrate)
    if setup.target is not None and converted is not model:
        require_topology(converted, setup.target)
    return converted


def _original_family(model: nn.Module, placement: str) -> NativeTarget | None:
    """A normswap-generated model goes back to its stock family when that family has the target placement."""
    provenance = getattr(model.config, "normswap", None)
    original = provenance.get("source_model_type") if isinstance(provenance, dict) else None
    if not original or original == model.config.model_type:
        return None
    target = NativeTarget(placement, original)
    try:
        target_topology = inspect(meta_instance(target_class(model, target), target_config(model.config, target)))
    except NormswapError:  # no stock class, or its config refuses the values (a width made one wider)
        return None
    return target if placement_of(target_topology) == placement else None


def _native_target(model_type: str, placement: str) -> NativeTarget | None:
    recipe = recipe_for(model_type)
    return recipe.native_target(placement) if recipe else None
