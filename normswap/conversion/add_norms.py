"""Adding a norm, started at the calibrated scale (docs/design.md §9): the passes that give every branch a new
``out`` norm (``h + F(x)`` -> ``h + N(F(x))``) or a new ``pre`` norm (``h + F(h)`` -> ``h + F(N(h))``).

A new norm's weight is ``s``, the mean per-token RMS (LayerNorm: standard deviation) of what it will read in the
source model, so on a token whose scale is ``s`` it is the identity and the branch writes (or reads) about what it
did before; an offset norm ``(1 + w) * n`` starts at ``w = s - 1``, a bias at 0. What the norm reads is found by
behaviour: an out norm reads the term of the residual add that the branch's call returns (the module's output, its
first item where it returns several), a pre norm the input of that call; both are measured at that module.

Pre + out is ``sandwich`` (Peri-LN, Gemma 2), out alone ``post-sublayer`` (OLMo 2); a parallel block keeps its one
add and gets one out norm per branch (it stays ``parallel``). A sublayer that already holds a norm in the slot, or
whose slots would add up to no layout, is refused with its reason.
"""

from __future__ import annotations

import ast
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..codegen.branch_terms import FUNCTIONAL_DROPOUT, BranchTerm, branch_terms, entry_call, helper_call_terms
from ..codegen.derive import (
    CodegenError,
    _by_class,
    _class_lines,
    _Locator,
    joined_variant_edits,
    modeling_file,
)
from ..codegen.edits import AddLayerNorm, Edit, ReplaceResidualAdd, WrapBranchInput, WrapBranchOutput
from ..detect.width import WIDTH_NAMES
from ..errors import NormswapError
from ..topology import (
    OFFSET_NORM_KINDS,
    Branch,
    Layer,
    NormSite,
    Sublayer,
    Topology,
    combine_placements,
    placement_of_slots,
)
from .calibration import CalibrationSite
from .passes import Pass, PassMove, Scales
from .program import Step, constant
from .round_trip_carry import added_norms_carried
from .stream_config import eps_of

# the kind a new norm may take other than its template's, and the normswap class that builds it (package flag)
_OTHER_KINDS = {"rmsnorm": ("NormswapRMSNorm", "rms_norm"), "layernorm": ("NormswapLayerNorm", "layer_norm")}




class AddNormError(NormswapError):
    """The model's structure leaves no place for the new norm this pass adds."""


@dataclass(frozen=True)
class _NewTensor:
    """One tensor of a new norm: ``key`` in the converted model, its shape, and what fills it (``s``, ``s - 1`` for an
    offset norm's weight, or 0 for a bias) from the scale measured at ``site``."""

    key: str
    shape: tuple[int, ...]
    site: CalibrationSite
    role: str  # "weight", "offset", "bias"
    factor: float = 1.0  # what the norm reads is the site's module output times this constant: its scale |factor| s


def add_out_norms(model: nn.Module, topology: Topology, kind: str | None = None, *,
                  where_missing: bool = False) -> Pass:
    """Every branch writes through a new ``out`` norm, of the model's own norm kind unless ``kind`` says another
    (``rmsnorm`` or ``layernorm``), started at the calibrated scale of the branch's output. ``where_missing``: a
    sublayer that has an out norm keeps it and gets none (a mixed model's), instead of being refused."""
    return _add_norms(model, topology, "out", kind, where_missing)


def add_pre_norms(model: nn.Module, topology: Topology, kind: str | None = None, *,
                  where_missing: bool = False) -> Pass:
    """Every branch reads the stream through a new ``pre`` norm, started at the calibrated scale of what it read
    (``where_missing``: only the sublayers without one)."""
    return _add_norms(model, topology, "pre", kind, where_missing)


def _add_norms(model: nn.Module, topology: Topology, slot: str, kind: str | None, where_missing: bool) -> Pass:
    path = modeling_file(model, topology)
    classes = _class_lines(path)
    edits: list[Edit] = []
    tensors: list[_NewTensor] = []
    moves: list[PassMove] = []
    placements = []
    helpers: set[str] = set()
    for stack in topology.stacks:
        stack_layers = [layer for layer in topology.layers if layer.stack == stack.path]
        groups = _by_class(stack_layers)
        per_group: list[list[_NewNorm]] = []
        for layers in groups:
            found: list[_NewNorm] = []
            per_group.append(found)
            for layer in layers:
                if layer.items:
                    raise AddNormError(f"{layer.path} runs its layer as items of module lists, with no layer module "
                                       "whose code could build a new norm")
                locate = _Locator(model.get_submodule(layer.path), layer, classes, path.name)
                taken: set[str] = set()  # the new norms' paths in this layer
                for index, sub in enumerate(layer.sublayers):
                    if where_missing and sub.norms_in(slot):
                        placements.append(sub.placement)
                        continue
                    placements.append(_placement_after(layer, index, sub, slot))
                    found += _sublayer_norms(model, layer, index, sub, slot, kind, locate, path, taken, stack.width)
        derived: list[list[Edit]] = []
        for found in _one_name_per_term(per_group):
            derived.append([])
            for new in found:
                derived[-1] += [edit for edit in new.edits if edit not in derived[-1]]
                tensors += new.tensors
                moves.append(new.move)
                helpers |= new.helpers
        edits += [edit for edit in joined_variant_edits(model, groups, derived) if edit not in edits]
    placement = combine_placements(placements)
    what = "out norms on each branch's output" if slot == "out" else "pre norms on each branch's input"
    return Pass(name=f"{topology.placement} -> {placement}: {what}, started at the calibrated scale", exact=False,
                placement=placement, edits=tuple(edits), rewrite=functools.partial(_rewrite, tuple(tensors)),
                calibration=tuple(dict.fromkeys(tensor.site for tensor in tensors)), moves=tuple(moves),
                helpers=frozenset(helpers),
                carry=functools.partial(added_norms_carried,
                                        tuple(dict.fromkeys((t.key.rsplit(".", 1)[0], t.site) for t in tensors))),
                notes=("each new norm starts with weight s, the mean per-token scale of what it reads in the source, "
                       "so it is the identity on a token of scale s; the rest is for healing",))


def _placement_after(layer: Layer, index: int, sub: Sublayer, slot: str) -> str:
    """The sublayer's placement once it holds a norm in ``slot``; refused where it holds one there already or where
    its slots then add up to no layout (an out norm before a post norm)."""
    held = sub.norms_in(slot)
    if held:
        raise AddNormError(f"sublayer {index} of {layer.path} already has {'an' if slot == 'out' else 'a'} {slot} "
                           f"norm ({held[0].path})")
    slots = {norm.slot for norm in sub.norms} | {slot}
    placement = placement_of_slots(slots, sub.kind == "parallel")
    if placement == "mixed":
        raise AddNormError(f"sublayer {index} of {layer.path} normalises its sum after the add (a post norm), so an "
                           f"{slot} norm beside it makes slots {', '.join(sorted(slots))}, which no layout has")
    return placement


@dataclass(frozen=True)
class _NewNorm:
    edits: tuple[Edit, ...]
    tensors: tuple[_NewTensor, ...]
    move: PassMove
    helpers: frozenset[str]


def _sublayer_norms(model: nn.Module, layer: Layer, index: int, sub: Sublayer, slot: str, kind: str | None,
                    locate: _Locator, path: Path, taken: set[str], stream_width: int | None) -> list[_NewNorm]:
    """The new norm of each branch of ``sub``: its edits, its tensors and where its scale is measured. ``taken``: the
    paths of the layer's new norms so far (a branch module two sublayers call gets a norm for each); ``stream_width``:
    the stack's width as detection traced it, the width of a new norm whose template records none."""
    add_line = locate.line(sub.residual_add)
    helper_call = locate.helper_call_line(sub)
    in_function = helper_call is not None
    # an add inside a module-level function: its call, in the class that calls it
    class_name = locate.enclosing_class(sub.residual_add_caller if in_function else sub.residual_add)
    call_line = helper_call if helper_call is not None else add_line
    if class_name is None:
        raise AddNormError(f"the residual add of sublayer {index} of {layer.path} is in a module-level function "
                           f"({sub.residual_add}) that no class's code calls, so no module holds it to build a norm "
                           "in")
    class_path = _class_path(locate, class_name, sub, slot)
    holder = locate.layer.get_submodule(class_path) if class_path else locate.layer
    attributes = {branch: _attributes(locate, class_path, branch) for branch in sub.branches}
    wanted = {attribute for found in attributes.values() for attribute in found}
    passes = functools.partial(_passes_through, holder) if slot == "out" else _any_call
    try:
        config = getattr(holder, "config", None)  # what the class's ``if self.config...`` tests read
        add = (helper_call_terms(path, class_name, call_line, add_line, wanted, passes, config, holder) if in_function
               else branch_terms(path, class_name, add_line, wanted, passes, config, holder))
    except CodegenError as error:
        raise AddNormError(str(error)) from error
    template, copy_from, template_attribute = _template(model, layer, sub, class_path, locate)
    template_module = model.get_submodule(template.path)
    width = _width(template_module) or stream_width
    new_kind, new_class, helper, keywords = _kind(template, template_module, kind, width,
                                                  _width_source(getattr(model, "config", None), width))
    terms = add.branches
    built: list[_NewNorm] = []
    wrapped: dict[str, str] = {}  # a parallel block's branch terms, each in its new norm
    for branch in sub.branches:
        term = next((terms[attribute] for attribute in attributes[branch] if attribute in terms), None)
        if term is None:
            raise AddNormError(f"no term of the residual add at {sub.residual_add} is what {branch.kind} branch "
                               f"{branch.entry or branch.modules[0]} returns (renamed, its first item, or through "
                               "dropout), so no module's output measures what a new norm there would read")
        if slot == "pre":
            term = _reading_call(locate, path, class_name, class_path, branch, term)
        if slot == "pre" and not term.input_first:
            raise AddNormError(f"self.{term.attribute} at {locate.filename}:{term.call_line} takes the stream after "
                               "other arguments, so the scale measured at its input would not be the stream's")
        norm = _norm_name(holder, term, slot, index, taken, class_path)
        module = ".".join(part for part in (layer.path, class_path, term.attribute) if part)
        factor, channel_scale = _factor(holder, term, locate.filename) if slot == "out" else (1.0, "")
        holder_path = ".".join(part for part in (layer.path, class_path) if part)
        site = CalibrationSite(module, "output" if slot == "out" else "input",
                               "std" if new_kind.startswith("layernorm") else "rms", eps=template.eps or 0.0,
                               channel_scale=f"{holder_path}.{channel_scale}" if channel_scale else "")
        wrap: Edit | None = (WrapBranchOutput(class_name, call_line, term.term, norm, add.helper)
                             if slot == "out" else WrapBranchInput(class_name, term.call_line, term.attribute, norm))
        if slot == "out" and len(sub.branches) > 1:
            if add.helper:
                raise AddNormError(f"the branches of sublayer {index} of {layer.path} are added to the stream inside "
                                   f"the module-level function {add.helper}, whose one call adds them all: there is no "
                                   "term of each branch alone to put its own norm on")
            wrapped[term.term], wrap = f"self.{norm}({term.term})", None
        norm_path = ".".join(part for part in (layer.path, class_path, norm) if part)
        built.append(_NewNorm(
            (AddLayerNorm(class_name, norm, template_attribute, new_class, copy_from, keywords),
             *([wrap] if wrap else [])),
            _tensors(template_module, norm_path, new_kind, new_class, site, width, factor),
            PassMove("add", norm_path, site=site,
                     note=f"{new_kind} on the {branch.kind} branch's {'output' if slot == 'out' else 'input'}, "
                          f"weight started at the scale of {module}'s {site.side}"
                          + (f" times {abs(factor):g} (its {' * '.join(f.text for f in term.factors)} on the way)"
                             if term.factors else "")),
            frozenset({helper} if helper else ())))
    if wrapped:  # the stream first, then each branch's normed term: the adds detection reads as one parallel block
        sum_of = " + ".join([*add.others(), *(wrapped.get(term, term) for term in add.terms if term in wrapped)])
        built[0] = replace(built[0], edits=(*built[0].edits,
                                            ReplaceResidualAdd(class_name, locate.line(sub.residual_add), sum_of)))
    return built


def _one_name_per_term(per_group: list[list[_NewNorm]]) -> list[list[_NewNorm]]:
    """The new norms of each group of a stack's layers, with one name for every norm that wraps the same term of the
    same add. Layers of one class may reach that term from different modules (LFM2's ``hidden_states`` is
    ``self.self_attn``'s output in its attention layers and ``self.conv``'s in its convolution layers, by a per-layer
    flag): the class's code builds and calls one norm there, named after all of them
    (``normswap_conv_or_self_attn_out_norm``)."""
    names: dict[tuple[str, int, str], set[str]] = {}
    for found in per_group:
        for new in found:
            for edit in new.edits:
                if isinstance(edit, WrapBranchOutput):
                    names.setdefault((edit.class_name, edit.line, edit.term), set()).add(edit.norm)
    renamed = {norm: "normswap_" + "_or_".join(sorted(name.removeprefix("normswap_").removesuffix("_out_norm")
                                                      for name in shared)) + "_out_norm"
               for shared in names.values() if len(shared) > 1 for norm in shared}
    return [[_renamed(new, renamed) for new in found] for found in per_group] if renamed else per_group


def _renamed(new: _NewNorm, renamed: Mapping[str, str]) -> _NewNorm:
    """``new`` with its norm's attribute named as ``renamed`` says, in its edits, tensor keys and plan line."""
    def path(value: str) -> str:
        head, _, last = value.rpartition(".")
        return f"{head}.{renamed.get(last, last)}" if head else renamed.get(last, last)

    edits = tuple(replace(edit, norm=renamed.get(edit.norm, edit.norm))
                  if isinstance(edit, (AddLayerNorm, WrapBranchOutput)) else edit for edit in new.edits)
    tensors = tuple(replace(tensor, key=f"{path(tensor.key.rsplit('.', 1)[0])}.{tensor.key.rsplit('.', 1)[1]}")
                    for tensor in new.tensors)
    return replace(new, edits=edits, tensors=tensors, move=replace(new.move, norm=path(new.move.norm)))


def _reading_call(locate: _Locator, path: Path, class_name: str, class_path: str, branch: Branch,
                  term: BranchTerm) -> BranchTerm:
    """The call a new pre norm wraps: the branch's term's call where the branch enters there (or inside it), else the
    call of the branch's entry module in the same class; refused where that class does not call it."""
    if not branch.entry:
        return term
    entry = _attribute_in(locate, class_path, branch.entry)
    if entry == term.attribute or entry.startswith(f"{term.attribute}."):
        return term
    line = locate.line(branch.entry_source)
    found = (entry_call(path, class_name, entry, line)
             if line is not None and locate.enclosing_class(branch.entry_source) == class_name else None)
    if found is None:
        raise AddNormError(f"the {branch.kind} branch adds self.{term.attribute}'s output but first reads the stream "
                           f"in {branch.entry} ({branch.entry_source}), which {class_name} does not call itself, so no "
                           "call there takes the stream for a new pre norm to wrap")
    return found


def _factor(holder: nn.Module, term: BranchTerm, filename: str) -> tuple[float, str]:
    """The product of the constants the branch's output is multiplied (or divided) by before the add, each a number
    or an attribute of the module that runs the code, and the name of the one parameter of that module that may
    multiply it channel by channel (BEiT's layer scale ``self.lambda_1 * attention_output``: the new norm's scale is
    measured on the product); refused where a factor is anything else (a learned scalar gain, a tensor)."""
    value, channel_scale = 1.0, ""
    for factor in term.factors:
        found: Any = holder
        if factor.text.startswith("self."):
            for part in factor.text.removeprefix("self.").split("."):
                found = getattr(found, part, None)
        else:
            found = ast.literal_eval(factor.text)
        if (isinstance(found, nn.Parameter) and found.dim() == 1 and not factor.divides and not channel_scale
                and "." not in factor.text.removeprefix("self.")):
            channel_scale = factor.text.removeprefix("self.")
            continue
        number = isinstance(found, (int, float)) and not isinstance(found, bool)
        if not number or (factor.divides and found == 0):
            raise AddNormError(f"self.{term.attribute}'s output is {'divided' if factor.divides else 'multiplied'} by "
                               f"{factor.text} at {filename}:{term.call_line} or after, which is "
                               f"{'zero' if number else 'no number but a ' + type(found).__name__} when the model "
                               "is built, so the scale of what a new norm there reads is no constant times that "
                               "module's output" + (" (a layer scale, a vector of the module's own, may multiply "
                                                    "it once)" if not channel_scale and not number else ""))
        value = value / found if factor.divides else value * found
    return value, channel_scale


def _class_path(locate: _Locator, class_name: str, sub: Sublayer, slot: str) -> str:
    """The path, in the layer, of the module of class ``class_name`` that adds ``sub``'s branches to the stream: the
    one that holds them ("" for the layer itself). An ``out`` norm wraps only the term the add adds, so for it a
    module that holds one module of each branch is enough (BERT's ``attention.output`` adds its ``dense``'s output,
    while the attention that feeds it lives beside it); the term is then found among the calls it makes."""
    candidates = locate.class_paths.get(class_name, [])
    inside = [locate.relative(module) for branch in sub.branches for module in branch.modules]
    for candidate in candidates:
        if not candidate or all(module.startswith(f"{candidate}.") for module in inside):
            return candidate
    for candidate in candidates if slot == "out" else ():
        if candidate and all(any(locate.relative(module).startswith(f"{candidate}.") for module in branch.modules)
                             for branch in sub.branches):
            return candidate
    raise AddNormError(f"the residual add at {sub.residual_add} is in {class_name}, which holds none of its branches' "
                       "modules, so its code calls no branch whose output a new norm could take")


def _attributes(locate: _Locator, class_path: str, branch: Branch) -> tuple[str, ...]:
    """Every ``self.`` attribute path, in the adding class, that leads to one of the branch's modules: the branch's
    call in that class is a call of one of them (``self_attn`` for OLMo 2's ``self_attn.q_proj``)."""
    found: list[str] = []
    for module in branch.modules:
        parts = _attribute_in(locate, class_path, module).split(".")
        found += [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
    return tuple(dict.fromkeys(found))


def _any_call(_attribute: str) -> bool:
    """A pre norm wraps the branch call's input, whatever the code does to its output before the add (OLMo 2's out
    norm): any call on the way from the term back to the branch's call is passed."""
    return True


def _passes_through(holder: nn.Module, callee: str) -> bool:
    """Whether the call of ``callee`` in the adding module returns its input unchanged at inference: a module of it
    that does (dropout, told by what it does), or torch's functional dropout (OPT, Whisper), which calibration and
    inference run with ``training`` False."""
    from ..detect.analysis import _passes_through as passes  # detection imports conversion helpers

    if not callee.startswith("self."):
        return callee in FUNCTIONAL_DROPOUT
    try:
        module = holder.get_submodule(callee.removeprefix("self."))
    except AttributeError:
        return False
    return isinstance(module, (nn.Dropout, nn.Identity)) or passes(module.eval() if module.training else module)


def _template(model: nn.Module, layer: Layer, sub: Sublayer, class_path: str, locate: _Locator
              ) -> tuple[NormSite, str, str]:
    """The norm whose constructor the new norm copies, the class that builds it ("" for the adding class) and its
    attribute there: one the adding class builds itself, of this sublayer first; else one another module of the
    layer builds as a plain attribute (MegatronBERT's SelfOutput adds the attention's output, and its Attention
    builds the attention's pre norm), whose constructor the code generation copies where its names are defined."""
    norms = [norm for norm in (*sub.norms, *(n for other in layer.sublayers if other is not sub for n in other.norms))
             if norm.kind != "identity"]
    for norm in norms:
        attribute = _attribute_in(locate, class_path, norm.path)
        if "." not in attribute:
            return norm, "", attribute
    for norm in norms:
        owner, _, attribute = norm.path.rpartition(".")
        if owner and not attribute.isdigit():
            return norm, type(model.get_submodule(owner)).__name__, attribute
    holder = type(locate.layer.get_submodule(class_path)).__name__ if class_path else locate.layer_class
    where = ".".join(part for part in (layer.path, class_path) if part)
    raise AddNormError(f"{holder} ({where}) adds a branch to the stream, and no module of the layer builds a residual "
                       "norm as a plain attribute, so there is no norm constructor to build the new norm like")


def _attribute_in(locate: _Locator, class_path: str, module: str) -> str:
    """``module``'s path relative to the module at ``class_path`` in the layer (its full path where it is outside)."""
    relative = locate.relative(module)
    if not class_path:
        return relative
    return relative.removeprefix(f"{class_path}.") if relative.startswith(f"{class_path}.") else module


def _kind(template: NormSite, module: nn.Module, kind: str | None, width: int | None, width_source: str = ""
          ) -> tuple[str, str, str, tuple[tuple[str, str], ...]]:
    """(the new norm's kind, the normswap class that builds it from the template's constructor or "", its package
    flag or "", the keywords of its ``.like`` call). A weightless template (OLMo's LayerNorm) gives a norm of its
    kind with a weight, built by normswap's class: the new norm must start at the scale s, which only a weight
    can hold (and no bias, which a model without biases could not take back when the norm is dropped). Its width is
    the one the template records, else ``width``, the stream's (NanoChat builds its norms from eps alone), written
    as ``width_source`` (the config field that names it, so one generated file serves every size)."""
    weightless = template.kind.endswith("-noaffine")
    if (kind is None or kind == template.kind) and not weightless:
        return template.kind, "", "", ()
    wanted = template.kind.removesuffix("-noaffine") if kind is None or kind == template.kind else kind
    if wanted not in _OTHER_KINDS:
        kinds = ", ".join(dict.fromkeys((template.kind, *_OTHER_KINDS)))
        raise AddNormError(f"a new norm of kind {kind} cannot be built from {template.path}'s constructor, only of "
                           f"kind {kinds} (the first is the model's own)")
    if getattr(module, "weight", None) is not None:
        return wanted, *_OTHER_KINDS[wanted], ()
    if width is None or template.eps is None:
        missing = "its width (it records none, and detection traced no stream width)" if width is None else "its eps"
        raise AddNormError(f"{template.path} is a {template.kind} norm with no weight, and normswap does not know "
                           f"{missing}, so no norm with a weight, to start at the scale s, can be built like it")
    built = "layernorm-nobias" if wanted == "layernorm" else wanted  # NormswapLayerNorm.like: no bias, as the model
    # eps and width as the template records them, where it does (.like reads them there); else from detection (OLMo's
    # LayerNorm keeps its eps in its code, NanoChat's RMSNorm records no width)
    eps = () if not math.isnan(eps_of(module)) else (("eps", repr(template.eps)),)
    recorded = () if _width(module) is not None else (("width", width_source or str(width)),)
    return built, *_OTHER_KINDS[wanted], (("affine", "True"), *eps, *recorded)


def _width_source(config: Any, width: int | None) -> str:
    """``config.<field>`` where the model's config names the stream width ``width`` (``hidden_size``...), else ""."""
    if config is None or width is None:
        return ""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return next((f"config.{name}" for name in WIDTH_NAMES if getattr(text_config, name, None) == width), "")


def _width(module: nn.Module) -> int | None:
    """The width a weightless norm normalises, where it records it (``normalized_shape``, as OLMo's does)."""
    shape = getattr(module, "normalized_shape", None)
    return int(shape[-1]) if isinstance(shape, (tuple, list, torch.Size)) and len(shape) else None


def _norm_name(holder: nn.Module, term: BranchTerm, slot: str, index: int, taken: set[str], class_path: str) -> str:
    """``normswap_<branch attribute>_<slot>_norm`` (``_<sublayer index>`` after it where another sublayer's new norm
    has that name), unless the family has that name already."""
    name = f"normswap_{term.attribute.replace('.', '_')}_{slot}_norm"
    if f"{class_path}.{name}" in taken:
        name = f"{name}_{index}"
    if hasattr(holder, name):
        raise AddNormError(f"{type(holder).__name__} already has an attribute {name}, the new norm's name")
    taken.add(f"{class_path}.{name}")
    return name


def _tensors(template: nn.Module, norm_path: str, kind: str, new_class: str, site: CalibrationSite,
             width: int | None, factor: float = 1.0) -> tuple[_NewTensor, ...]:
    """The new norm's tensors: the template's parameters (its class copied), or what ``new_class.like`` builds from
    it (``NormswapRMSNorm``: weight, and a bias where the template has one; ``NormswapLayerNorm``: weight and bias,
    the weight alone where the template has no weight, ``width`` wide)."""
    weight = getattr(template, "weight", None)
    names = [name for name, _ in template.named_parameters(recurse=False)]
    if new_class == "NormswapLayerNorm":
        names = ["weight", "bias"] if isinstance(weight, torch.Tensor) else ["weight"]
    elif new_class == "NormswapRMSNorm":
        names = ["weight", *(["bias"] if getattr(template, "bias", None) is not None else [])]
    if isinstance(weight, torch.Tensor):
        shape = tuple(weight.shape) if new_class != "NormswapLayerNorm" else (weight.shape[-1],)
    elif new_class and width is not None:  # weightless template: the width it records, or the stream's
        shape = (width,)
    else:
        raise AddNormError(f"{site.module}'s template norm has no weight to start at the scale s")
    offset = kind in OFFSET_NORM_KINDS
    return tuple(_NewTensor(f"{norm_path}.{name}", shape, site,
                            "bias" if name == "bias" else "offset" if offset else "weight", factor) for name in names)


def _rewrite(tensors: tuple[_NewTensor, ...], steps: dict[str, Step], scales: Scales) -> None:
    """Each new norm's tensors, constants from the measured scales: weight ``s`` (offset: ``s - 1``), bias 0."""
    for tensor in tensors:
        scale = scales[tensor.site].scale * abs(tensor.factor)
        value = {"weight": scale, "offset": scale - 1.0, "bias": 0.0}[tensor.role]
        steps[tensor.key] = constant(functools.partial(torch.full, tensor.shape, value, dtype=torch.float64))
