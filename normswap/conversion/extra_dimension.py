"""RMSNorm -> LayerNorm, exact, by one extra hidden dimension (docs/design.md §5).

A trained RMSNorm model's stream does not have zero mean, so LayerNorm cannot replace RMSNorm in place.
Carry the stream into d+1 dimensions with ``U`` ((d+1) x d, orthonormal columns orthogonal to the
all-ones vector): ``h' = U h`` has zero mean and the same norm, so a LayerNorm over d+1 with
``eps' = eps * d/(d+1)`` equals ``sqrt((d+1)/d) * U * RMSNorm_1(h)``. Then, along each tensor's stream axis,

* writers (embedding rows, every branch's output projections, fused experts' ``down_proj`` and its bias, a
  multimodal projection into the stream): ``W -> U W``;
* readers of a norm with weight g (q/k/v, gate/up, routers, fused experts' ``gate_up_proj``, lm_head):
  ``W -> W diag(g) U^T / sqrt((d+1)/d)``, with g = 1 + w for Gemma's offset norms;
* every norm becomes a LayerNorm over d+1 with weight 1, bias 0.

Any Pre-RMSNorm model with a token embedding is tried; no list of families or tensor names decides. The target is
the family's own code with ``hidden_size = d+1`` (and ``head_dim`` written into its config where the family derived
it from ``hidden_size``; a composite's values go into the sub-config its language model is built from,
``stream_config.py``), built on the meta device. Each tensor's role, reader or writer, and its stream axis come from
that code and one run on the meta device (``stream_roles.py``). Code that sizes an inner width inside the language
model by ``hidden_size`` keeps ``d`` there (``inner_width.py``); a projector into the stream that the code sizes by
the language model's ``hidden_size`` inside it (GLM-ASR's 2 x hidden_size inner width, a norm at its end) is built
from a copy of the config at the source's values and its output lifted by ``U`` as it enters the stream
(``BuildAtSourceWidth``); a family whose code sizes something else from ``hidden_size`` builds tensors of other
shapes than the map makes, and is refused with the tensor and both shapes. Code that scales the embeddings by a
function of ``hidden_size`` (Gemma: sqrt(d)) is measured on both widths and the stems folded into the embedding rows
(``embedding_stem.py``); a scale between the last final norm and the LM head (T5's ``d_model ** -0.5``) likewise,
folded into the head (``head_scale.py``). A head with linear maps of its own (UltraBERT's) reads the final norm
through the first, and its inner width, sized by hidden_size, is padded by a unit that nothing reads
(``head_chain.py``). Where the eps field also sets norms beside the stream (q_norm over head_dim), it keeps its
value and the stream norms' eps' goes into the code. Tied embeddings become two tensors with ``untie``: in the
config, or in the generated code where the config's flag ties more than the head
(``generated.head_untied_in_code``). The numerical check (logits within 1e-4 x max|reference| in fp32) then decides
exactness. Everything is computed in float64.

Fixed maps in the generated code (their weights fixed by the map, saved like any tensor) handle the stream's ends
where no weight can take U: a stem with no token rows keeps width d and ``normswap_stream_lift`` (U) lifts its
output; a weighted embedding norm becomes a LayerNorm followed by ``normswap_stream_map`` (U diag(g) U^T / s); a
headless stack with no final norm ends in ``normswap_stream_unlift`` (U^T); a depthwise filter on a branch's output
runs d wide between U^T and U (``branch_filter.py``). A per-channel gain on a branch's output folds into its
writers (``branch_gain.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..codegen.derive import (
    layer_norm_edits,
    list_item_class,
    loop_owner,
    modeling_file,
    norm_owner,
    owner_and_attribute,
)
from ..codegen.edits import (
    INNER_WIDTH_FIELD,
    OUTPUT_PROJECTION,
    SOURCE_FIELDS,
    STREAM_LIFT,
    STREAM_MAP,
    STREAM_UNLIFT,
    AddOutputProjection,
    AddStackProjection,
    BuildAtSourceWidth,
    Edit,
    ReplaceNormClass,
    SizeByInnerWidth,
)
from ..codegen.package import GeneratedModule
from ..detect import inspect
from ..detect.source import build_meta_model
from ..errors import NormswapError, first_line
from ..topology import NormSite, Topology
from .branch_filter import BranchFilter, branch_filters, lift_attribute, unlift_attribute
from .branch_gain import branch_gains
from .embedding_stem import EmbeddingStem, measure_embedding_stem
from .generated import generate_family_code, head_untied_in_code
from .head_chain import head_chain
from .head_scale import measure_head_scale
from .inner_width import inner_width_edits
from .native import meta_instance
from .norm_kind import TOLERANCE, ExactnessReport, NormKindPlan, check_exact, linear_layout
from .program import Step, TensorProgram, combine, constant, copy_of, shapes_of
from .projection_check import check_projections
from .setup import ConversionSetup, convert_in_memory
from .stream_config import StreamConfig, eps_of, eps_sources, stream_config
from .stream_roles import StreamRole, inside, projection_modules, stream_roles, trace_stream_uses

# plain RMSNorm, Gemma's (1 + w) RMSNorm, and a weightless one (g = 1: HRM-Text's, NanoChat's)
_NORM_KINDS = frozenset({"rmsnorm", "rmsnorm-offset", "rmsnorm-noaffine"})


def orthonormal_lift(d: int) -> torch.Tensor:
    """U, (d+1) x d in float64: orthonormal columns orthogonal to the all-ones vector (a Householder reflection)."""
    ones = torch.full((d + 1,), 1.0 / math.sqrt(d + 1), dtype=torch.float64)
    last = torch.zeros(d + 1, dtype=torch.float64)
    last[-1] = 1.0
    v = last - ones
    reflection = torch.eye(d + 1, dtype=torch.float64) - 2.0 * torch.outer(v, v) / v.dot(v)
    return reflection[:, :d]  # the reflection maps e_{d+1} to ones/sqrt(d+1); the other columns are orthogonal to it


def plan_layer_norm_exact(model: nn.Module, *, untie: bool = False) -> ConversionSetup:
    """Plan the exact LayerNorm twin of a Pre-RMSNorm model, one hidden dimension wider.

    With ``untie``, tied input and output embeddings become two tensors (the map changes them differently);
    without it a tied model is refused with the memory that untying costs.
    """
    return _plan_layer_norm_exact(model, untie, (), (), None, {}, False)


def _plan_layer_norm_exact(model: nn.Module, untie: bool, inner: tuple[SizeByInnerWidth, ...],
                           filters: tuple[BranchFilter, ...], sides: tuple[NormSite, ...] | None,
                           projectors: Mapping[str, BuildAtSourceWidth], mirrored: bool) -> ConversionSetup:
    """``plan_layer_norm_exact`` with the ``inner`` edits in the generated code (``inner_width.py``): planned once
    without, and where the wider code sizes tensors inside the language model by hidden_size beyond the stream's
    width, once more with the edits that size them by the inner width. Where branches filter their output per
    channel (``branch_filter.py``), planned again with those ``filters`` kept d wide and lifted after; where norms
    outside the layers grow with the stream (``_side_start_norms``), again with those ``sides`` mapped as starts.
    Where the wider code sizes a projector into the stream by the language model's hidden_size inside it, again
    with those ``projectors`` built at the source's width and their outputs lifted (``_lifted_projectors``);
    ``mirrored``: the model config's own hidden_size, equal to the language model's, is widened with it
    (``_mirrors_width``)."""
    topology = inspect(model)
    family = topology.model_type
    weightless = _all_weightless(topology)
    stream = _require_pre_rms_norm_decoder(model, topology, weightless)
    d = int(stream.config.hidden_size)
    # weightless norms: the stream is c U h with c = sqrt((d+1)/d) and eps stays (see _all_weightless); else U h
    stream_scale, eps_factor = (math.sqrt((d + 1) / d), 1.0) if weightless else (1.0, d / (d + 1))
    token_embedding = _token_embedding(model)
    input_path = _path_of(model, token_embedding) if token_embedding is not None else None
    norms = tuple(n.path for n in topology.residual_norms)
    finals = tuple(stack.final_norm.path for stack in topology.stacks if stack.final_norm)
    last = topology.stacks[-1]
    final = last.final_norm.path if last.final_norm else None  # the last stack's (a decoder's), which lm_head reads
    headless = model.get_output_embeddings() is None  # its output is the final norm's: projected back to d
    # embedding norms with weights: LayerNorms over the lifted rows, then a fixed map U diag(g) U^T / s after each
    starts = () if weightless else (*(stack.embedding_norm for stack in topology.stacks if stack.embedding_norm),
                                    *(sides or ()))
    start_maps = {norm.path: _beside(norm.path, STREAM_MAP) for norm in starts}
    unlift = None if final else AddStackProjection(loop_owner(model, last), last.path.rsplit(".", 1)[-1],
                                                   STREAM_UNLIFT, "after",
                                                   ("{config}.hidden_size", "{config}." + INNER_WIDTH_FIELD))
    first = topology.stacks[0]
    # no token rows to lift: the stem (convolutions, class tokens, position rows: linear or not) keeps width d,
    # and a fixed U lifts what it hands the first layer, or the first stack's embedding norm, where it has one
    lifts_stem = input_path is None
    stem_norm = first.embedding_norm.path if lifts_stem and first.embedding_norm and starts else None
    lift_in = AddStackProjection(loop_owner(model, first), first.path.rsplit(".", 1)[-1], STREAM_LIFT, "before",
                                 ("{config}." + INNER_WIDTH_FIELD, "{config}.hidden_size")
                                 ) if lifts_stem and not stem_norm else None
    lifted = f"{_beside(stem_norm or first.path, STREAM_LIFT)}.weight"
    output_path = (_beside(last.path, STREAM_UNLIFT) if unlift else _beside(final, OUTPUT_PROJECTION) if headless
                   else _path_of(model, model.get_output_embeddings()))
    tied = not headless and _tied(model, stream)
    offsets = {n.path: 1.0 if n.kind == "rmsnorm-offset" else 0.0 for n in topology.stream_norms}
    # embedding tables outside the layers: those the wider code widens (below) are lifted, the language model's
    # token embedding and tables outside it (Ovis2's visual table, whose rows take the image tokens' places; with
    # ``mirrored`` the model config's own hidden_size sizes it), which verification runs alone
    embeddings = [path for path, module in model.named_modules() if isinstance(module, nn.Embedding)
                  and not any(inside(path, layer.path) for layer in topology.layers)]

    head_key = f"{output_path}.weight"
    untied_head = head_untied_in_code(model, head_key) if tied else None
    projection = AddOutputProjection(*owner_and_attribute(model, final)) if headless and final else None
    if projection is not None and any(owner_and_attribute(model, other) == (projection.class_name, projection.norm)
                                      for other in finals[:-1]):
        raise NormswapError(f"{type(model).__name__} has no LM head, and the code that applies its output's final "
                            f"norm ({final}) applies another stack's too, whose output the wider model reads one "
                            "dimension wider: the projection back to d that replaces a head cannot be placed on one "
                            "alone (convert the class with an LM head)")
    narrow, wide = "{config}." + INNER_WIDTH_FIELD, "{config}.hidden_size"
    lifts = tuple(dict.fromkeys(AddOutputProjection(*owner_and_attribute(model, kept.module),
                                                    attribute=lift_attribute(kept.attribute), widths=(narrow, wide),
                                                    input_map=unlift_attribute(kept.attribute),
                                                    input_widths=(wide, narrow))
                                for kept in filters))
    maps: tuple[Edit, ...] = (*(edit for edit in (projection, unlift, lift_in) if edit), *lifts,
                              *_start_map_edits(model, starts, eps_factor, stem_norm))
    generated, cls, config = _generated_layer_norm_target(model, topology, stream, d, eps_factor, untie=tied,
                                                          untied_head=untied_head, inner=inner, maps=maps,
                                                          projectors=projectors, mirrored=mirrored)
    target = _build_wider(cls, config, family, d)
    if tied and target.get_output_embeddings().weight is target.get_input_embeddings().weight:
        raise NormswapError(f"{family}'s code still ties lm_head to the token embedding one dimension wider (its "
                            "config class sets tie_word_embeddings = True whatever it is given, and none of its "
                            "model classes names lm_head's weight in its tied weights, for the generated code to "
                            "leave out), and the extra-dimension map needs the two to differ (rows U e in, "
                            "E diag(g) U^T out), so no exact LayerNorm twin of this family's code exists (leave out "
                            "--exact for the approximate conversion)")
    built = shapes_of(target.state_dict())
    if sides is None and not weightless:
        grown = tuple(norm for norm in _side_start_norms(model, topology, d)
                      if tuple(built.get(f"{norm.path}.weight", ())) == (d + 1,))
        if grown:
            return _plan_layer_norm_exact(model, untie, inner, filters, grown, projectors, mirrored)
    # an embedding the wider code does not widen writes no stream (Phi-4-multimodal's vision position embedding)
    embeddings = [path for path in embeddings if tuple(built.get(f"{path}.weight", ()))[-1:] == (d + 1,)]
    source_shapes = shapes_of(model.state_dict())
    gammas = {norm: _norm_weight(norm, source_shapes, d) for norm in (*norms, *finals, *start_maps)}
    norm_keys = {f"{norm}.{leaf}" for norm in (*norms, *finals, *start_maps) for leaf in ("weight", "bias")}
    skip = norm_keys | {f"{path}.weight" for path in embeddings}
    if lifts_stem:  # the stem keeps its width: nothing outside the layers but the norms is mapped
        embeddings = []
        skip |= {key for key in source_shapes if not any(inside(key, layer.path) for layer in topology.layers)}
    uses = trace_stream_uses(model, (*norms, *finals), family)
    _require_no_norm_of_a_norm(topology, uses)
    chain = None if headless else head_chain(model, uses, final, head_key, source_shapes, built, skip, family)
    if chain is None and final:  # lm_head reads the final norm itself (a slice of its output)
        uses = uses.with_reader(head_key, final)
    read = {norm for found in uses.reads.values() for norm in found}
    for norm in norms:
        if norm not in read:
            raise NormswapError(_unread_norm_message(topology, norm))

    lift = orthonormal_lift(d)
    scale = math.sqrt((d + 1) / d)
    steps: dict[str, Step] = {key: copy_of(key) for key in source_shapes}
    made = {key: tuple(shape) for key, shape in source_shapes.items()}  # each output's shape, as the edits go
    if unlift:  # the stream leaves the last layer as U h (c U h for weightless norms), with no norm: U^T / c
        steps[head_key] = constant(lambda: lift.T.contiguous() / stream_scale)
        made[head_key] = (d, d + 1)
    elif headless:  # the projection starts as the identity, read through the final norm below: diag(g) U^T
        steps[head_key] = combine(lambda gamma: torch.eye(d, dtype=gamma.dtype), gammas[final])
        made[head_key] = (d, d)
    elif model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        # lm_head gets its own copy of the original rows, transformed below as a reader
        steps[f"{output_path}.weight"] = copy_of(f"{input_path}.weight")
        made[f"{output_path}.weight"] = made[f"{input_path}.weight"]
    if lifts_stem:
        steps[lifted] = constant(lambda: lift * stream_scale)
        made[lifted] = (d + 1, d)
    for norm, path in start_maps.items():  # LN(U e) = s U RMS_1(e), so U diag(offset + g) U^T / s gives U (g RMS(e))
        offset = 1.0 if next(site.kind for site in starts if site.path == norm) == "rmsnorm-offset" else 0.0
        steps[f"{path}.weight"] = combine(
            lambda gamma, offset=offset: (lift * (offset + gamma.double())) @ lift.T / scale, gammas[norm])
        made[f"{path}.weight"] = (d + 1, d + 1)
    roles = {**stream_roles(model, topology, source_shapes, built, uses, skip), **(chain.padded if chain else {}),
             **({head_key: StreamRole(1, final)} if headless and final else {})}
    if not filters and (found := branch_filters(model, topology, roles)):
        return _plan_layer_norm_exact(model, untie, inner, tuple(found), sides, projectors, mirrored)
    kept = {key for branch in filters for key in branch.kept}
    roles = {key: role for key, role in roles.items() if key not in kept}
    for branch in filters:  # U^T before the filter, U after: it runs d wide (c U h for weightless norms: U^T / c)
        steps[f"{branch.unlift}.weight"] = constant(lambda: lift.T.contiguous() / stream_scale)
        steps[f"{branch.lift}.weight"] = constant(lambda: lift * stream_scale)
        made[f"{branch.unlift}.weight"], made[f"{branch.lift}.weight"] = (d, d + 1), (d + 1, d)
    head_readers = [] if headless else [key for key in (chain.readers if chain else (head_key,))
                                        if key.endswith(".weight")]
    head_steps = {key: steps[key] for key in head_readers}  # before their map: the head's scale goes in with it
    gains = branch_gains(model, topology, roles, source_shapes)
    for gain, writers in gains.items():  # lambda (W a + b) = (diag(lambda) W) a + lambda b; the gain becomes 1
        for key in writers:
            axis = roles[key].axis
            steps[key] = combine(lambda tensor, scale, axis=axis: tensor * _on_axis(scale, axis, tensor.dim()),
                                 steps[key], copy_of(gain))
    for key, role in roles.items():
        if key in gains:  # a gain of 1 over d + 1, not lifted
            made[key] = (d + 1,)
            steps[key] = combine(lambda ones: ones.new_ones(d + 1), steps[key])
            continue
        steps[key] = _mapped(steps[key], role, offsets, gammas, lift, scale, stream_scale)
        made[key] = tuple(size + 1 if axis in (role.axis, role.padded_input) else size
                          for axis, size in enumerate(made[key]))
    fused = any(len(source_shapes.get(key, ())) > 2 for key in roles)
    if fused:
        _run_experts_eagerly(config)
    for norm in (*norms, *finals, *start_maps):
        if f"{norm}.weight" not in source_shapes:  # a weightless RMSNorm becomes a weightless LayerNorm
            continue
        gamma = copy_of(f"{norm}.weight")
        steps[f"{norm}.weight"] = combine(lambda gamma: torch.ones(d + 1, dtype=gamma.dtype), gamma)
        steps[f"{norm}.bias"] = combine(lambda gamma: torch.zeros(d + 1, dtype=gamma.dtype), gamma)
        made[f"{norm}.weight"] = made[f"{norm}.bias"] = (d + 1,)

    for path in embeddings:
        rows, _ = made[f"{path}.weight"]
        made[f"{path}.weight"] = (rows, d + 1)

    outside = [key for key, shape in made.items() if key in built and tuple(built[key]) != shape
               and not inside(key, stream.path)]
    if (outside and not projectors and not inner and not mirrored
            and _mirrors_width(model, stream, made, built, outside)):
        return _plan_layer_norm_exact(model, untie, inner, filters, sides, projectors, True)
    if outside and not projectors and not inner:
        found = _lifted_projectors(model, outside, stream.path, roles, uses, stream_scale)
        if found:
            return _plan_layer_norm_exact(model, untie, inner, filters, sides, found, mirrored)
    inner_mismatch = {key: shape for key, shape in made.items() if key in built and tuple(built[key]) != shape
                      and (inside(key, stream.path) or lifts_stem)}
    if inner_mismatch and not inner:
        def built_shapes(edits: Sequence[SizeByInnerWidth]) -> dict[str, tuple[int, ...]]:
            _, trial_cls, trial_config = _generated_layer_norm_target(model, topology, stream, d, eps_factor,
                                                                      untie=tied,
                                                                      untied_head=untied_head, inner=tuple(edits),
                                                                      maps=maps, projectors=projectors,
                                                                      mirrored=mirrored)
            return {key: tuple(shape) for key, shape in shapes_of(meta_instance(trial_cls, trial_config)
                                                                   .state_dict()).items()}

        edits = inner_width_edits(model, modeling_file(model, topology).read_text(encoding="utf-8"), inner_mismatch,
                                  built_shapes)
        if edits:
            return _plan_layer_norm_exact(model, untie, edits, filters, sides, projectors, mirrored)
    _require_same_tensors(family, made, built, stream.path)
    _require_scaled_eps(family, topology, target, eps_factor)
    # with an embedding norm (weightless, so scale-invariant but for eps), what it reads is measured
    stem_end = next((stack.embedding_norm.path for stack in topology.stacks if stack.embedding_norm),
                    topology.layers[0].path)
    if input_path is None:  # no token rows to measure a stem by: what starts the stream is lifted as it is
        source_stem = wider_stem = EmbeddingStem(1.0)
    else:
        source_stem = measure_embedding_stem(build_meta_model(model).model, stem_end, family)
        wider_stem = measure_embedding_stem(target, stem_end, family)
    projections = list(dict.fromkeys(_owner(model, key) for key, role in roles.items() if role.stem))
    vectors = [key for key, role in roles.items() if role.vector]
    rebuilt = list(projectors)
    tables = [path for path in embeddings if not inside(path, stream.path)]  # run alone like the projectors
    if projections or vectors or rebuilt or tables:
        _require_unscaled_stem(family, [*projections, *vectors, *rebuilt, *tables][0], source_stem, wider_stem)
    # What lm_head reads may be the final norm's output times a scale of the code's that follows the stream's
    # width: T5 multiplies the decoder's output by d_model ** -0.5 where its config says so (scale_decoder_outputs;
    # SwitchTransformers where it ties its embeddings). The code path is kept, not switched off: switching it off
    # would mean writing each family's own flag (SwitchTransformers' is the tie itself, which has to stay on for
    # its stacks' shared embeddings), while keeping it names nothing. The wider code then scales by
    # (d+1) ** -0.5 where the original scaled by d ** -0.5, and the ratio of the two measured scales goes into
    # lm_head's weight with the norm's weight and U^T, in one float64 product (for T5 the ratio is sqrt((d+1)/d),
    # which cancels the LayerNorm's factor: lm_head = E diag(g) U^T).
    head_note = ""
    for key in head_readers:  # lm_head, or the first linear maps of a head of its own (``head_chain.py``)
        reader = key.rpartition(".")[0]
        source_head = measure_head_scale(build_meta_model(model).model, final, reader, family)
        wider_head = measure_head_scale(_build_wider(cls, config, family, d), final, reader, family)
        if source_head != wider_head and key in roles:
            steps[key] = _mapped(head_steps[key], roles[key], offsets, gammas, lift,
                                 scale * wider_head / source_head, stream_scale)
            head_note += (f"; the code's scale of what {'lm_head' if reader == output_path else reader} reads "
                          f"{source_head:.6g} -> {wider_head:.6g} folded into its weight")
    if tied and not untie:  # asked last, so that a model refused for its structure is never sent to untie first
        raise NormswapError(_tied_refusal(model, family, d))
    for path in embeddings:  # the measured stem is the token embedding's; other stem embeddings are only lifted
        stem = source_stem if path == input_path else EmbeddingStem(wider_stem.scale)
        steps[f"{path}.weight"] = combine(
            lambda weight, stem=stem: _wide(weight, lambda rows: stem.fold(rows, wider_stem, lift) * stream_scale),
            steps[f"{path}.weight"])

    writers = dict.fromkeys(_owner(model, key) for key, role in roles.items() if role.reads is None and not role.head)
    plan = NormKindPlan(family, generated.model_type, f"generated code: {generated.file_name}",
                        (*start_maps, *norms, *finals), (*writers, *embeddings), kind="layernorm", untied=tied,
                        scaled_stream=weightless)
    head_note += chain.describe() if chain else ""
    head_note += (f"; {type(model).__name__} has no head and returns {final}'s output, which the wider model "
                  f"projects back to {d} by {output_path} (diag(g) U^T, fixed by the map: hidden states before it "
                  f"stay {d + 1} wide)" if headless and final else "")
    head_note += (f"; {type(model).__name__} returns its last layer's output with no final norm, which the wider "
                  f"model projects back to {d} by {output_path} (U^T, fixed by the map)" if unlift else "")
    head_note += (f"; what {type(model).__name__}'s stem hands its first layer (no token rows: its input is "
                  f"features) stays {d} wide, and {lifted} (U, fixed by the map) lifts it" if lifts_stem else "")
    head_note += "".join(f"; {norm} normalises the lifted raw embeddings as a LayerNorm, and {path} (U diag(g) U^T "
                         "/ sqrt((d+1)/d), fixed by the map) after it starts the stream as U times the original's"
                         + (" (a tower's last norm: token probes do not run it)" if norm in {side.path for side in
                                                                                      sides or ()} else "")
                         for norm, path in start_maps.items())
    notes = source_stem.describe(wider_stem) + head_note + ("; lm_head untied" if tied else "") + (
        f"; {', '.join(projections)} lifted as projections into the stream, their inner widths padded by a unit "
        "that nothing reads (token probes do not run them: verification runs each projector alone)"
        if projections else "") + (
        f"; {', '.join(vectors)} lifted as vectors the code places among the stream's tokens (token probes do not "
        "run them)" if vectors else "") + (
        f"; {', '.join(rebuilt)} built at width {d} as in the source (the code sizes it by the language model's "
        "hidden_size), its output lifted by U as it enters the stream (token probes do not run it: verification "
        "runs it alone)" if rebuilt else "") + (
        f"; {', '.join(tables)} lifted as embedding tables outside the language model whose output enters the "
        "stream (token probes do not run them)" if tables else "") + (
        "; the model config's own hidden_size widened with the language model's (it sizes the head)"
        if mirrored else "") + (
        f"; {', '.join(gains)} folded into the writers of the branch whose output each scales" if gains else "") + (
        "".join(f"; {branch.module} filters its branch's output per channel: it runs {d} wide between {branch.unlift} "
                f"(U^T) and {branch.lift} (U), fixed by the map" for branch in filters)) + (
        "; fused experts run eagerly (grouped_mm needs rows of 16 bytes)" if fused else "")
    checked = {**projection_modules(roles), **_weighted_modules(model, [*rebuilt, *tables])}  # run alone
    return ConversionSetup(plan, TensorProgram(steps), cls, config, generated,
                           f"norm rmsnorm -> layernorm (exact, hidden {d} -> {d + 1}{notes})",
                           verify=lambda original, converted, probe: _verified(original, converted, probe, checked,
                                                                               lift * stream_scale))


def _lifted_projectors(model: nn.Module, mismatched: Sequence[str], language_model: str,
                       roles: Mapping[str, StreamRole], uses: Any, scale: float) -> dict[str, BuildAtSourceWidth]:
    """The modules outside the language model to build at the source's width, their outputs lifted by ``U``
    (``BuildAtSourceWidth``), for the ``mismatched`` tensors the wider code sizes by the language model's
    hidden_size: each tensor's outermost module that does not hold the language model. Each must be a projector
    into the stream: it holds a linear map whose output axis is the stream's (a ``stem`` role) and no tensor that
    reads a norm's output (the LM head). Empty where some tensor has no such module: the shape check then names it.
    Built as the source built it, the module computes what it computed; its output, the features that enter the
    stream, is then all the extra dimension changes, and ``U`` applies there exactly."""
    found: dict[str, BuildAtSourceWidth] = {}
    for key in mismatched:
        path = _outermost_outside(key, language_model)
        if path is None:
            return {}
        if path not in found:
            holds = [other for other in roles if inside(other, path)]
            if not any(roles[other].stem for other in holds) or any(inside(other, path) for other in uses.reads):
                return {}
            found[path] = BuildAtSourceWidth(*owner_and_attribute(model, path), scale)
    return found


def _mirrors_width(model: nn.Module, stream: StreamConfig, made: Mapping[str, tuple[int, ...]],
                   built: Mapping[str, torch.Size], outside: Sequence[str]) -> bool:
    """Whether the model config's own hidden_size holds the language model's width (a composite whose top class
    sizes its LM head by it: Ovis2) and some tensor outside the language model stays that width where the map
    widens it: then the field is the stream's width too, and the wider model is built with it widened (the
    shapes that come out, and the logits, then decide)."""
    d = int(stream.config.hidden_size)
    if not stream.field or getattr(model.config, "hidden_size", None) != d:
        return False
    return any(len(built[key]) == len(made[key]) and any(wide + 1 == size for wide, size in zip(
        built[key], made[key], strict=True)) for key in outside)


def _outermost_outside(key: str, language_model: str) -> str | None:
    """The outermost module on ``key``'s path that does not hold ``language_model`` (None where that is the tensor
    itself, a parameter of a module that holds the language model)."""
    parts = key.split(".")
    for depth in range(1, len(parts)):
        prefix = ".".join(parts[:depth])
        if not inside(language_model, prefix) and prefix != language_model:
            return prefix
    return None


def _weighted_modules(model: nn.Module, paths: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Each module at ``paths`` with its submodules that hold a weight, in build order (``check_projections``
    reads the first for the input's width)."""
    return {path: tuple(f"{path}.{name}" if name else path for name, module in model.get_submodule(path)
                        .named_modules() if isinstance(getattr(module, "weight", None), torch.Tensor))
            for path in paths}


def _require_no_norm_of_a_norm(topology: Topology, uses: Any) -> None:
    """A branch norm that normalises a stream norm's output again (Mistral Large 4's indexer, ``q_input_norm``)
    reads it where the map would put the stream norm's weight: into the linear maps that read its output."""
    branch_norms = {norm.path for layer in topology.layers for norm in layer.inner_norms}
    for key, found in sorted(uses.reads.items()):
        owner = key.rpartition(".")[0]
        if owner in branch_norms:
            raise NormswapError(f"{owner} in {topology.model_type} normalises {sorted(found)[0]}'s output again; "
                                "the extra-dimension map moves each stream norm's weight into the linear maps that "
                                "read its output (docs/design.md §5), and a norm is no linear map that can take it "
                                "(leave out --exact for the approximate conversion)")


def _unread_norm_message(topology: Topology, norm: str) -> str:
    """Why no linear map reads ``norm``: where one branch reads several norms (each at positions of its own,
    merged into one tensor: HiggsAudio's text and audio tokens), its maps read the merge, not any norm alone."""
    shared = next((branch for layer in topology.layers for sub in layer.sublayers for branch in sub.branches
                   if norm.rsplit(".", 1)[-1] in {read.rsplit(".", 1)[-1] for read in branch.reads}
                   and len(branch.reads) > 1 and norm.startswith(layer.path + ".")), None)
    if shared is None:
        return (f"no linear map reads {norm}'s output in {topology.model_type}; the extra-dimension map moves each "
                "norm's weight into the linear maps that read it")
    return (f"{shared.entry or shared.modules[0]} in {topology.model_type} reads the stream through "
            f"{' and '.join(shared.reads)} together (each norm's output fills positions of its own in one tensor), "
            "so its linear maps would have to take each norm's weight for some tokens and not for others: the "
            "extra-dimension map moves each norm's weight into the linear maps that read it, and one weight matrix "
            "cannot hold two different norm weights")


def _verified(original: nn.Module, converted: nn.Module, probe: dict[str, torch.Tensor],
              projections: Mapping[str, tuple[str, ...]], lift: torch.Tensor) -> ExactnessReport:
    """The logits on token probes, then each projection into the stream run alone (which token probes skip)."""
    report = check_exact(original, converted, probe, logits_only=True)
    checks = check_projections(original, converted, projections, lift, max(report.tolerance, TOLERANCE))
    return dataclasses.replace(report, projections=checks)


def _norm_weight(norm: str, source_shapes: Mapping[str, torch.Size], d: int) -> Step:
    """The norm's weight g as the readers take it: ones for a weightless RMSNorm, which has no tensor to read."""
    key = f"{norm}.weight"
    return copy_of(key) if key in source_shapes else constant(lambda: torch.ones(d, dtype=torch.float64))


def _mapped(step: Step, role: StreamRole, offsets: Mapping[str, float], gammas: Mapping[str, Step],
            lift: torch.Tensor, scale: float, stream_scale: float) -> Step:
    """One tensor's step made one dimension wider along its stream axis: lifted (a writer, times the stream's
    scale) or read through its norm's weight (a reader)."""
    norm, axis = role.reads, role.axis
    if role.padded_input is not None:
        step = combine(lambda tensor: _zero_padded(tensor, role.padded_input), step)
    if role.internal:
        return combine(lambda tensor: _zero_padded(tensor, axis), step)
    if norm is None:
        return combine(lambda tensor: _wide(tensor, lambda wide: _along(wide, axis, lift.T * stream_scale)), step)
    return combine(lambda weight, gamma: _read_through(weight, gamma, offsets[norm], lift, scale, axis),
                   step, gammas[norm])


def _require_unscaled_stem(family: str, projection: str, source: EmbeddingStem, wider: EmbeddingStem) -> None:
    """A projection into the stream is lifted as it is only where what enters the first layer is scaled alike on
    both widths (by a constant, HRM-Text's embedding_scale: it commutes with U) and not centred."""
    if not (math.isclose(source.scale, wider.scale, rel_tol=1e-6) and source.mean_gain == wider.mean_gain == 0.0):
        raise NormswapError(f"{projection} puts its output into {family}'s stream from outside the language model, "
                            f"whose code scales the token embeddings by {source.scale:.6g} ({wider.scale:.6g} one "
                            "dimension wider); whether that scale applies to the projection's output too cannot be "
                            "measured from token inputs, so its lift would be a guess")


def convert_to_layer_norm_exact(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None, *,
                                untie: bool = False
                                ) -> tuple[nn.Module, NormKindPlan, ExactnessReport, GeneratedModule]:
    """The exact LayerNorm twin of a Pre-RMSNorm model, one hidden dimension wider, verified."""
    converted, setup, report = convert_in_memory(model, plan_layer_norm_exact(model, untie=untie), inputs)
    return converted, setup.plan, report, setup.generated


def _read_through(weight: torch.Tensor, gamma: torch.Tensor, offset: float, lift: torch.Tensor, scale: float,
                  axis: int) -> torch.Tensor:
    """``W diag(offset + g) U^T / sqrt((d+1)/d)`` along the stream ``axis``, in float64: a reader of the norm's
    output, one dimension wider (axis 1 of an nn.Linear weight, or the hidden axis of fused experts)."""
    return _wide(weight, lambda wide: _along(wide * _on_axis(offset + gamma.double().to(wide.device), axis,
                                                             wide.dim()), axis, lift.T / scale))


def _zero_padded(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    """``tensor`` one longer along ``axis``, the new slice zero: a unit of a projection's inner width that nothing
    writes (a zero row) or nothing reads (a zero column)."""
    shape = list(tensor.shape)
    shape[axis] = 1
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=axis)


def _along(tensor: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """``tensor`` with its ``axis`` multiplied by ``matrix`` (d x d+1): ``U^T`` lifts a writer, ``U^T / s`` reads."""
    return (tensor.movedim(axis, -1) @ matrix.to(tensor.device)).movedim(-1, axis)  # a model on CUDA: U moves


def _on_axis(vector: torch.Tensor, axis: int, dims: int) -> torch.Tensor:
    """``vector`` shaped to broadcast along ``axis`` of a ``dims``-dimensional tensor."""
    shape = [1] * dims
    shape[axis] = -1
    return vector.reshape(shape)


def _wide(tensor: torch.Tensor, function: Any) -> torch.Tensor:
    """``function`` applied in float64, the result back in the tensor's dtype."""
    return function(tensor.double()).to(tensor.dtype)


def _all_weightless(topology: Topology) -> bool:
    """Whether every norm on the stream is a weightless RMSNorm (HRM-Text's, NanoChat's). Then the stream is
    carried as ``c U h`` with ``c = sqrt((d+1)/d)`` and every eps kept: ``LN_eps(c U h) = c U h / sqrt(|h|^2/d +
    eps) = c U RMSNorm_eps(h)``, so each norm's output is ``c U`` times the original's too, like the stream. A norm
    whose output enters the stream (NanoChat's on the embeddings, HRM-Text's at each stack's hand-off) then keeps
    the map, which the ``U h`` form (eps * d/(d+1), output ``c U`` times a stream of ``U h``) cannot."""
    norms = [*topology.stream_norms, *(stack.embedding_norm for stack in topology.stacks if stack.embedding_norm)]
    return bool(norms) and all(norm.kind == "rmsnorm-noaffine" for norm in norms)


def _require_pre_rms_norm_decoder(model: nn.Module, topology: Topology, weightless: bool) -> StreamConfig:
    """The structure the map needs: stacks of Pre-RMSNorm layers (an encoder-decoder's two: the decoder's
    cross-attention reads the encoder's final norm like any reader), each but the last with a final norm, and a
    config that sizes the stream (returned). Parallel blocks read the stream through their norms like sequential
    ones; a model without an LM head gets a projection back to d in its place, or U^T where its last stack has no
    final norm. Where every norm is ``weightless`` (``_all_weightless``) an embedding norm keeps the map, and the
    stacks hand their stream on as ``c U`` times the original's; elsewhere it is followed by a fixed map."""
    family = topology.model_type
    kinds = {n.kind for n in topology.stream_norms}
    if topology.placement not in ("pre", "parallel") or not kinds or not kinds <= _NORM_KINDS:
        raise NormswapError(f"{family} is not a Pre-RMSNorm model ({topology.summary()}); exact RMSNorm -> "
                            "LayerNorm needs every norm before its branch (plain or 1 + w RMSNorms), where it reads "
                            "the stream and only linear maps read it")
    per_channel = [scale for scale in topology.residual_scales if scale.per_channel]
    if per_channel:
        raise NormswapError(f"{family} scales its residual stream per channel ({per_channel[0].describe()}); the "
                            "extra-dimension map lifts the stream by U (docs/design.md §5), and U(g * h) is no "
                            "per-channel gain of U h unless g is constant, so no exact map exists (leave out --exact "
                            "for the approximate conversion)")
    if not weightless and any(stack.final_norm is None for stack in topology.stacks[:-1]):
        raise NormswapError(f"{family}'s stacks hand the stream on to the next with no final norm; exact RMSNorm -> "
                            "LayerNorm needs a final norm, which the wider stream U h reaches as a LayerNorm whose "
                            "weight moves into the linear maps that read it (a decoder's cross-attention)")
    if topology.stacks[-1].final_norm is None and model.get_output_embeddings() is not None:
        raise NormswapError(f"{family}'s LM head reads the last layer's output with no final norm; exact RMSNorm -> "
                            "LayerNorm needs a final norm, which the wider stream U h reaches as a LayerNorm whose "
                            "weight moves into the LM head")
    return stream_config(model, topology)


def _token_embedding(model: nn.Module) -> nn.Embedding | None:
    """The token embedding whose rows start the stream, measured for a scale of the code's (``embedding_stem``);
    None where the input is no token (features, pixels) or the embedding is a module of the family's own: whatever
    writes the stream's start there (a patch convolution, a class token, position rows) is lifted as a writer."""
    try:
        embedding = model.get_input_embeddings()
    except NotImplementedError:  # transformers' default for models whose input is no token (an audio encoder)
        return None
    return embedding if isinstance(embedding, nn.Embedding) else None


def _beside(path: str, attribute: str) -> str:
    """Where a fixed map the generated code adds lives: ``attribute`` of the module that holds ``path`` (a norm's
    map after it, a stack's U^T or U on the module whose forward runs its loop, a headless model's projection)."""
    owner = path.rpartition(".")[0]
    return f"{owner}.{attribute}" if owner else attribute


def _side_start_norms(model: nn.Module, topology: Topology, d: int) -> tuple[NormSite, ...]:
    """Norms outside the layers, of the stream norms' own class and the stream's width, that are no edge norm of a
    stack: the last norm of a modality's tower, whose output a composite puts into the stream in place of its
    tokens' embeddings (Inkling's audio and vision towers). Those the wider code grows with the stream (not a
    tower's inner norms, sized by its own width) are starts of the stream, mapped as an embedding norm is (a
    LayerNorm, then ``STREAM_MAP``). Token probes do not run the towers, and the plan's notes say so."""
    classes = {type(model.get_submodule(norm.path)): norm.kind for norm in topology.stream_norms}
    known = {norm.path for norm in topology.all_norms}
    found: list[NormSite] = []
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (type(module) in classes and path not in known and isinstance(weight, torch.Tensor)
                and tuple(weight.shape) == (d,) and not any(inside(path, layer.path) for layer in topology.layers)):
            found.append(NormSite(path, "embedding", classes[type(module)], eps_of(module), d))
    return tuple(found)


def _start_map_edits(model: nn.Module, starts: Sequence[Any], eps_factor: float,
                     stem_norm: str | None) -> tuple[Edit, ...]:
    """Each embedding norm with a weight becomes a LayerNorm (eps * d/(d+1), in the code: its eps field may set no
    other norm) followed by the fixed map that starts the stream (``STREAM_MAP``, d+1 to d+1); ``stem_norm``'s
    input, a stem's output d wide, is lifted by U first (``STREAM_LIFT``)."""
    edits: list[Edit] = []
    for norm in starts:
        width = f"self.{owner_and_attribute(model, norm.path)[1]}.weight.shape[-1]"  # the LayerNorm's, d + 1
        as_layer_norm = ReplaceNormClass(*norm_owner(model, norm.path), new_class="NormswapLayerNorm", wrap=True,
                                        item_class=list_item_class(model, norm.path),
                                        keywords=(("eps", repr(norm.eps * eps_factor)),))
        lift = ((STREAM_LIFT, ("{config}." + INNER_WIDTH_FIELD, "{config}.hidden_size"))
                if norm.path == stem_norm else ("", ("", "")))
        edits += [as_layer_norm, AddOutputProjection(*owner_and_attribute(model, norm.path), attribute=STREAM_MAP,
                                                     widths=(width, width), input_map=lift[0], input_widths=lift[1])]
    return tuple(edits)


def _tied(model: nn.Module, stream: StreamConfig) -> bool:
    """Whether lm_head shares the token embedding's tensor, or the config asks for it to."""
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return output.weight is embedding.weight or _config_ties(model.config, stream.field)


def _config_ties(config: Any, field: str | None) -> bool:
    """Whether ``config`` asks for tied embeddings, itself or in the sub-config ``field`` the stream is sized by."""
    return bool(getattr(config, "tie_word_embeddings", False)) or bool(
        field and getattr(getattr(config, field), "tie_word_embeddings", False))


def _tied_refusal(model: nn.Module, family: str, d: int) -> str:
    """A tied model's refusal, with what ``--untie`` costs for this model: one more vocab x (d+1) table, or nothing
    more than the source holds where its checkpoint stores lm_head apart (T5 v1.1, under a config that ties)."""
    vocab = int(model.get_input_embeddings().weight.shape[0])
    dtype = model.get_input_embeddings().weight.dtype
    extra = vocab * (d + 1) * dtype.itemsize
    table = f"{_size(extra)} ({vocab} x {d + 1} x {dtype.itemsize} bytes)"
    cost = f"it adds {table}"
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        cost = f"the checkpoint stores lm_head apart already, so it adds no table to what the source holds ({table})"
    return (f"{family} ties its input and output embeddings, which the extra-dimension map changes differently "
            f"(rows U e in, E diag(g) U^T out); pass --untie (untie=True) to write lm_head as its own tensor: {cost}")


def _size(nbytes: int) -> str:
    """A byte count as a one-line message reads best: kB, MB or GB."""
    if nbytes >= 1e9:
        return f"{nbytes / 1e9:.2f} GB"
    return f"{nbytes / 1e6:.0f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:.0f} kB"


def _path_of(model: nn.Module, target: nn.Module) -> str:
    return next(path for path, module in model.named_modules() if module is target)


def _run_experts_eagerly(config: Any) -> None:
    """Ask for transformers' eager expert loop, in memory and in config.json (which hands it back to the config's
    constructor on loading): its default ``grouped_mm`` kernel needs rows of a multiple of 16 bytes, which a
    hidden_size of d + 1 never gives, so fused experts one dimension wider would fail there on every device."""
    config.experts_implementation = "eager"
    config._experts_implementation = "eager"

def _owner(model: nn.Module, key: str) -> str:
    """A writer as the plan names it: the linear map for its weight or bias, else the tensor itself."""
    path, _, leaf = key.rpartition(".")
    return path if leaf in ("weight", "bias") and linear_layout(model.get_submodule(path)) else key


def _generated_layer_norm_target(model: nn.Module, topology: Topology, stream: StreamConfig, d: int,
                                 eps_factor: float, untie: bool,
                                 untied_head: tuple[str, str] | None = None,
                                 inner: tuple[SizeByInnerWidth, ...] = (),
                                 maps: tuple[Edit, ...] = (),
                                 projectors: Mapping[str, BuildAtSourceWidth] | None = None, mirrored: bool = False
                                 ) -> tuple[GeneratedModule, Any, Any]:
    """The family's code with LayerNorms, and its config one dimension wider.

    ``head_dim`` is written where the source config leaves it to be derived from ``hidden_size``, so that
    families reading ``getattr(config, "head_dim", hidden_size // heads)`` keep their head size. A composite's
    values go into the sub-config its language model is built from. ``untie`` writes tie_word_embeddings = False,
    except where ``untied_head`` unties the head in the code instead (``generated.head_untied_in_code``).
    """
    config = stream.config
    eps, others = eps_sources(model, stream, topology)
    values: dict[str, Any] = {"hidden_size": d + 1, **({INNER_WIDTH_FIELD: d} if inner or maps or projectors
                                                         else {})}
    if eps is not None and eps_factor != 1.0:
        values[eps] = getattr(config, eps) * eps_factor
    if projectors:  # what a projector built at the source's width reads back (``BuildAtSourceWidth``)
        values[SOURCE_FIELDS] = {"hidden_size": d, **({eps: getattr(config, eps)} if eps in values else {})}
    eps_in_code = {norm.path: norm.eps * eps_factor for norm in others if eps_factor != 1.0}
    head_dim = getattr(config, "head_dim", None)
    heads = getattr(config, "num_attention_heads", None)
    if head_dim or heads:
        values["head_dim"] = head_dim or d // heads
    top: dict[str, Any] = {}
    if untie and untied_head is None:
        top["tie_word_embeddings"] = False
        if stream.field and hasattr(config, "tie_word_embeddings"):
            values["tie_word_embeddings"] = False
    if mirrored:  # the model config's own hidden_size, which sizes the head, is the stream's width too
        top["hidden_size"] = d + 1
    if stream.field:
        top[stream.field] = {**config.to_dict(), **values}
    else:
        top.update(values)
    try:
        return generate_family_code(model, topology, [*layer_norm_edits(model, topology, eps_in_code), *inner,
                                                      *maps, *dict.fromkeys((projectors or {}).values())],
                                    f"norm RMSNorm -> LayerNorm (exact: one extra hidden dimension, {d} -> {d + 1})",
                                    top, wider_sub_config=(stream.field, type(config)) if stream.field else None,
                                    untied_head=untied_head, layer_norm=True)
    except NormswapError:
        raise
    except Exception as error:  # the family's config refuses the wider values
        where = (f"'s {stream.field}, a stock {type(config).__name__} (normswap's generated config class lifts "
                 "the check that hidden_size is a multiple of the heads for a model's own config only)"
                 if stream.field else "'s config")
        raise NormswapError(f"{topology.model_type}{where}, does not take hidden_size {d + 1} "
                            f"({type(error).__name__}: {first_line(error)})") from error


def _build_wider(cls: Any, config: Any, family: str, d: int) -> nn.Module:
    """The wider target on the meta device; its own code failing to build is a structural refusal."""
    try:
        return meta_instance(cls, copy.deepcopy(config))
    except Exception as error:  # the family's code cannot be built one dimension wider
        raise NormswapError(f"{family}'s code does not build with hidden_size {d + 1} "
                            f"({type(error).__name__}: {first_line(error)}); exact RMSNorm -> LayerNorm needs code "
                            "whose only use of hidden_size is the stream's width") from error


def _require_same_tensors(family: str, made: dict[str, tuple[int, ...]], built: dict[str, torch.Size],
                          language_model: str) -> None:
    """The wider code must expect exactly the tensors the map makes, in the same shapes."""
    mismatched = [key for key in made if key in built and tuple(built[key]) != made[key]]
    if mismatched:
        key = mismatched[0]
        more = f" (and {len(mismatched) - 1} more like it)" if len(mismatched) > 1 else ""
        shapes = f"one dimension wider it builds {tuple(built[key])}, the map makes {made[key]}{more}"
        stays = next((wide for wide, size in zip(built[key], made[key], strict=True) if wide + 1 == size), None) \
            if len(built[key]) == len(made[key]) else None
        if not inside(key, language_model) and stays is not None:  # Ovis2's lm_head: its model config's own field
            raise NormswapError(f"{family}'s code sizes {key}, outside its language model, by a value that stays "
                                f"{stays} when the language model's hidden_size is one wider ({shapes}): a config "
                                "field beside the language model's hidden_size that holds the same width; the "
                                "extra-dimension map widens the language model's hidden_size only, and which other "
                                "field means the stream's width cannot be told from their equal values (leave out "
                                "--exact for the approximate conversion)")
        if not inside(key, language_model):
            raise NormswapError(f"{family}'s code sizes {key}, outside its language model, by the language model's "
                                f"hidden_size: {shapes}; exact RMSNorm -> LayerNorm lifts a projection whose output "
                                "enters the stream, not a width inside another module (leave out --exact for the "
                                "approximate conversion)")
        raise NormswapError(f"{family}'s code sizes {key} from hidden_size beyond the stream's width: {shapes}; "
                            "exact RMSNorm -> LayerNorm needs code that sizes attention by head_dim and uses "
                            "hidden_size only as the stream's width (leave out --exact for the approximate "
                            "conversion)")
    missing, extra = sorted(set(built) - set(made)), sorted(set(made) - set(built))
    if missing or extra:
        raise NormswapError(f"{family}'s code one dimension wider expects other tensors than the map makes: the map "
                            f"makes {extra[:3]} that it lacks, and it expects {missing[:3]} that the map does not make")


def _require_scaled_eps(family: str, topology: Topology, target: nn.Module, eps_factor: float) -> None:
    """Every wider LayerNorm must take eps * ``eps_factor`` (d/(d+1), or 1 for a stream of c U h): the map is exact
    only with it."""
    for norm in topology.stream_norms:
        found = getattr(target.get_submodule(norm.path), "eps", None)
        if norm.eps is not None and found is not None and not math.isclose(found, norm.eps * eps_factor):
            raise NormswapError(f"{family}'s {norm.path} takes eps {found:g} one dimension wider, not "
                                f"{norm.eps * eps_factor:g}: its code does not read eps from the config field "
                                "that holds it")
