"""From a detected topology to the source edits that move the norms (docs/internals.md, code generation).

Pre -> Post: every pre-norm call is unwrapped; every residual add is wrapped in a norm. The
layer reuses its own norm modules cyclically (sublayer j's add takes the module that was
sublayer j+1's pre norm, the last add takes the first), and the plan moves the weights to
match. The final norm leaves the model's forward and a new embedding norm runs before the loop.

Post -> Pre: every post-norm call is unwrapped; every branch input is wrapped in its
sublayer's (former post) norm. The embedding norm leaves the embeddings and a new final norm
runs after the loop.
"""

from __future__ import annotations

import ast
import functools
import inspect as pyinspect
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

from torch import nn

from ..errors import NormswapError
from ..topology import Branch, Layer, NormSite, Stack, Sublayer, Topology, embedding_norm_stays
from .caller_adds import caller_of_add
from .config_branches import running_statements
from .edits import (
    INPUT_KEYWORDS,
    AddLayerNorm,
    AddStackNorm,
    BuildNormAlways,
    CentreNormInput,
    CentreStream,
    DropStatement,
    Edit,
    NeutraliseNorm,
    ReadAfterBranch,
    ReplaceNormClass,
    ReplaceResidualAdd,
    UnwrapModelNorm,
    UnwrapNormCall,
    VariantStatement,
    WrapBranchInput,
    WrapResidualAdd,
)
from .function_adds import ModuleFunctions, helper_add_calls, module_functions

EMBEDDING_NORM = "normswap_embedding_norm"
FINAL_NORM = "normswap_final_norm"


class CodegenError(NormswapError):
    """The modeling source cannot be rewritten for this conversion."""


def modeling_file(model: nn.Module, topology: Topology) -> Path:
    """The transformers modeling file that defines the model's layers."""
    layer = model.get_submodule(topology.layers[0].path)
    return Path(pyinspect.getsourcefile(type(layer)) or "")


def placement_edits(model: nn.Module, topology: Topology, placement: str) -> list[Edit]:
    """The edits that turn ``model``'s layout into ``placement``, stack by stack (an encoder-decoder has two;
    classes both stacks share, such as T5's, take each edit once)."""
    if placement not in ("pre", "post"):
        raise CodegenError(f"placement must be pre or post, got {placement!r}")
    path = modeling_file(model, topology)
    classes = _class_lines(path)
    edits: list[Edit] = []
    for stack in topology.stacks:
        stack_layers = [layer for layer in topology.layers if layer.stack == stack.path]

        def stack_edits(position: int, layers: list[Layer], stack: Stack = stack,
                        stack_layers: list[Layer] = stack_layers) -> list[Edit]:
            parallel = any(sub.kind == "parallel" for sub in layers[0].sublayers)
            template = next((layer for layer in layers if not identity_pre_norms(layer)), layers[0])
            if placement == "post":
                keep = embedding_norm_stays(stack, stack_layers[0].sublayers[0].norms_in("pre"))
                found = [*_post_edits(model, stack, template, path, classes, keep_embedding_norm=keep,
                                      shared_loop=_shares_loop(model, topology, stack)),
                         *_realised_placeholders(model, layers, template)]
            else:
                found = (_serial_edits if parallel else _pre_edits)(model, stack, template, path, classes)
            if position:  # the stack's own norm is added once, from its first layer group
                found = [edit for edit in found if not isinstance(edit, AddStackNorm)]
            return found

        edits += [edit for edit in variant_edits(model, stack_layers, stack_edits)
                  if edit not in edits]
    require_one_stage_norm_list(edits)
    return edits


def require_one_stage_norm_list(edits: list[Edit]) -> None:
    """The stages of one stage list share one list of new norms (``_stage_norm``), built by one expression: their
    first layers must hold the norm it copies under one path."""
    lists: dict[tuple[str, str], AddStackNorm] = {}
    for edit in edits:
        if isinstance(edit, AddStackNorm) and edit.per_stage:
            other = lists.setdefault((edit.class_name, edit.norm), edit)
            if other != edit:
                raise CodegenError(f"the stages of {edit.class_name}.{edit.stack_attribute} hold their first layer's "
                                   f"norm as {other.copy_attribute} and as {edit.copy_attribute}, and one list of "
                                   "stage norms is built by one expression that copies it")


def _by_class(layers: list[Layer]) -> list[list[Layer]]:
    """The stack's layers grouped by class and, within a class, by where they place their norms, in order of first
    appearance: a hybrid stack (Nemotron-H's Mamba, attention and MLP blocks, Jamba's layer classes) has each
    class's code rewritten once, and a class whose layers build different modules (AXK1's MoE layers, with an out
    norm inside the MoE, beside its dense ones) has each variant's edits derived from a layer of that variant
    (``variant_edits`` checks that they agree on the code the variants share)."""
    groups: dict[tuple[str, object, object], list[Layer]] = {}
    for layer in layers:
        groups.setdefault((layer.layer_class, _norm_shape(layer), _branch_attributes(layer)), []).append(layer)
    return list(groups.values())


def _branch_attributes(layer: Layer) -> tuple[str, ...]:
    """The attributes of the layer that hold its branches' modules: LFM2's one layer class runs ``self.conv`` in some
    layers and ``self.self_attn`` in others (by a per-layer flag), on different lines of its code."""
    return tuple(sorted({layer.relative(module).split(".", 1)[0] for sub in layer.sublayers for branch in sub.branches
                         for module in branch.modules}))


def _norm_shape(layer: Layer) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Each sublayer's placement and the paths of its norms, relative to the layer."""
    return tuple((sub.placement, tuple(layer.relative(norm.path) for norm in sub.norms)) for sub in layer.sublayers)


def variant_edits(model: nn.Module, layers: list[Layer], derive: Callable[[int, list[Layer]], list[Edit]]
                  ) -> list[Edit]:
    """``derive``'s edits for each group of ``_by_class`` (its position and layers), joined by
    ``joined_variant_edits``."""
    groups = _by_class(layers)
    return joined_variant_edits(model, groups, [derive(position, group) for position, group in enumerate(groups)])


def each_variant_edits(model: nn.Module, topology: Topology,
                       derive: Callable[[_Locator, Layer], list[Edit]]) -> list[Edit]:
    """``derive(locate, layer)`` for one layer of each group of ``_by_class`` in every stack, joined by
    ``joined_variant_edits``: the edits of a pass that rewrites each layer's own norm calls."""
    path = modeling_file(model, topology)
    classes = _class_lines(path)
    edits: list[Edit] = []
    for stack in topology.stacks:
        stack_layers = [layer for layer in topology.layers if layer.stack == stack.path]

        def derive_group(_: int, layers: list[Layer]) -> list[Edit]:
            locate = _Locator(model.get_submodule(layers[0].path), layers[0], classes, path.name)
            return derive(locate, layers[0])

        edits += [edit for edit in variant_edits(model, stack_layers, derive_group)
                  if edit not in edits]
    return edits


def joined_variant_edits(model: nn.Module, groups: list[list[Layer]], derived: list[list[Edit]]) -> list[Edit]:
    """The edits derived from each group of ``_by_class`` (``derived[i]`` from ``groups[i]``), as one list.

    A class's code serves every instance of it, so an edit derived from one group must hold for every other group
    that holds the edited class too. Where variants of one layer class need different edits of a statement of that
    class (AXK2's dense layers call their ``post_attention_layernorm``, a norm, on the line where its MoE layers call
    a gated norm), the statement runs as each variant needs: ``VariantStatement``, guarded by the class of a module
    that tells the variants apart. Anything else that differs is refused."""
    held = [{type(module).__name__ for layer in group for module in model.get_submodule(layer.path).modules()}
            for group in groups]
    conflicts = [(index, other, edit) for index, found in enumerate(derived) for edit in found
                 for other, classes in enumerate(held)
                 if other != index and getattr(edit, "class_name", "") in classes and edit not in derived[other]
                 and _runs(model, groups[other], edit)]
    statements: dict[tuple[str, int], list[int]] = {}
    for index, other, edit in conflicts:
        line = getattr(edit, "line", None)
        layer_class = groups[index][0].layer_class
        if edit.class_name != layer_class or groups[other][0].layer_class != layer_class or line is None:
            raise _variant_refusal(groups[index][0], groups[other][0], edit)
        statements.setdefault((layer_class, line), [i for i, group in enumerate(groups)
                                                    if group[0].layer_class == layer_class])
    dispatched = [_variant_statement(model, name, line, [groups[i] for i in members], [derived[i] for i in members])
                  for (name, line), members in statements.items()]
    edits: list[Edit] = []
    for found in derived:
        edits += [edit for edit in found if edit not in edits
                  and (getattr(edit, "class_name", ""), getattr(edit, "line", None)) not in statements]
    return [*edits, *dispatched]


def _runs(model: nn.Module, group: list[Layer], edit: Edit) -> bool:
    """Whether the layers of ``group`` may run the statement ``edit`` changes: not where it lies in a branch of an
    ``if`` that their own plain attributes rule out (LFM2's convolution layers never run the attention's call, whose
    norm an edit derived from an attention layer moves). Edits of other classes, or of no line, count as run."""
    line = getattr(edit, "line", None)
    layer = model.get_submodule(group[0].path)
    if line is None or getattr(edit, "class_name", "") != type(layer).__name__:
        return True
    try:
        tree = _parsed(pyinspect.getsourcefile(type(layer)) or "")
    except (OSError, TypeError, SyntaxError):
        return True
    functions = [item for node in tree.body if isinstance(node, ast.ClassDef) and node.name == type(layer).__name__
                 for item in node.body if isinstance(item, ast.FunctionDef)
                 and item.lineno <= line <= (item.end_lineno or item.lineno)]
    if not functions:
        return True
    holding = [node for node in ast.walk(functions[0]) if isinstance(node, ast.stmt) and node is not functions[0]
               and node.lineno <= line <= (node.end_lineno or node.lineno)]
    if not holding:
        return True
    innermost = min(holding, key=lambda node: (node.end_lineno or node.lineno) - node.lineno)
    return any(node is innermost for node in running_statements(functions[0], getattr(layer, "config", None), layer))


@functools.lru_cache(maxsize=8)
def _parsed(path: str) -> ast.Module:
    """The modeling file's syntax tree, parsed once per file for every edit ``_runs`` asks about."""
    return ast.parse(Path(path).read_text(encoding="utf-8"))


def _variant_statement(model: nn.Module, class_name: str, line: int, groups: list[list[Layer]],
                       derived: list[list[Edit]]) -> VariantStatement:
    guards = _variant_guards(model, groups)
    if guards is None:
        raise CodegenError(f"the {class_name} layers {', '.join(group[0].path for group in groups)} place their norms "
                           f"differently and need different code at line {line}, and no module of theirs has a "
                           "class of its own in each variant for the code to tell them apart by")
    return VariantStatement(class_name, line, tuple(
        (guard, tuple(edit for edit in found if getattr(edit, "line", None) == line
                      and getattr(edit, "class_name", "") == class_name))
        for guard, found in zip(guards, derived, strict=True)))


def _variant_guards(model: nn.Module, groups: list[list[Layer]]) -> list[str] | None:
    """For each group, an expression true in exactly its layers: the class of the shallowest module (relative to
    the layer) whose class is one in each group and another in every other group; None where no module tells them
    apart. torch's own classes (``nn.Linear``) are passed over: PEFT replaces those modules by its own wrappers when
    it fine-tunes the converted model, which would change what the guard reads."""
    def classes(layer: Layer) -> dict[str, str]:
        found = {path: type(module).__name__ for path, module in model.get_submodule(layer.path).named_modules()
                 if path and not type(module).__module__.startswith("torch.")}
        return dict(sorted(found.items(), key=lambda item: item[0].count(".")))

    per_group = []
    for group in groups:
        first, *rest = (classes(layer) for layer in group)
        per_group.append({path: name for path, name in first.items() if all(other.get(path) == name for other in rest)})
    for path in per_group[0]:
        names = [found.get(path) for found in per_group]
        if None not in names and len(set(names)) == len(names):
            reads = "self." + path if all(part.isidentifier() for part in path.split(".")) else ""
            if reads:
                return [f'type({reads}).__name__ == "{name}"' for name in names]
    return None


def _variant_refusal(layer: Layer, other: Layer, edit: Edit) -> CodegenError:
    class_name = getattr(edit, "class_name", "")
    classes = (f"both {layer.layer_class} layers" if layer.layer_class == other.layer_class
               else f"{layer.layer_class} and {other.layer_class} layers")
    return CodegenError(
        f"{layer.path} and {other.path} ({classes}) place their norms "
        f"differently ({_describe_shape(layer)}; {_describe_shape(other)}), and {_describe_edit(edit)} would hold for "
        f"one and not the other, while both run that code of {class_name}: code that one class shares with other "
        "layers cannot move a norm in some of them and not in others")


def _describe_shape(layer: Layer) -> str:
    return ", ".join(f"{sub.kind} {sub.placement}: {' + '.join(layer.relative(n.path) for n in sub.norms) or '-'}"
                     for sub in layer.sublayers)


def _describe_edit(edit: Edit) -> str:
    """One edit in words, for a refusal."""
    line = getattr(edit, "line", None)
    what = type(edit).__name__
    where = f" at line {line}" if line is not None else ""
    fields = ", ".join(f"{name}={value!r}" for name, value in vars(edit).items() if name not in ("class_name", "line")
                       and value not in ("", None, ()))
    return f"{what}({fields}){where}"


def _post_edits(model: nn.Module, stack: Stack, layer: Layer, path: Path, classes: list[tuple[str, int, int]],
                keep_embedding_norm: bool = False, shared_loop: bool = False) -> list[Edit]:
    """Pre -> Post for one stack: unwrap the pre norms, wrap each add in the next sublayer's norm, and move
    the final norm before the loop (an embedding norm, where the model has one, leaves: the plan drops it,
    unless ``keep_embedding_norm``: then it stays, and the final norm's place is the last layer's).

    Where one stage class runs every stage's loop (``shared_loop``: FocalNet's ``FocalNetStage``), the new norm
    is built like the layer's own norm in every stage, not like the one stage's final norm that moves."""
    locate = _Locator(model.get_submodule(layer.path), layer, classes, path.name)
    subs = layer.sublayers
    edits: list[Edit] = []
    for index, sub in enumerate(subs):
        pre_norms = sub.norms_in("pre")
        if not pre_norms:
            raise CodegenError(f"sublayer {index} of {layer.path} has no pre norm")
        for norm in pre_norms:
            class_name, attribute = locate.attribute(norm.source, norm.path)
            edits.append(UnwrapNormCall(class_name, locate.line(norm.source), attribute,
                                        _branch_called_beside(locate, sub, class_name, norm.source)))
        for extra in pre_norms[1:]:
            owner, attribute = owner_and_attribute(model, extra.path)
            edits.append(NeutraliseNorm(owner, attribute, _parameter_names(model, extra.path)))
    edits += _wrapped_adds(subs, locate, module_functions(path), path)
    first = subs[0].norms_in("pre")[0]  # the norm whose weights the new stack norm takes
    alike = (stack.final_norm if stack.final_norm is not None and stack.final_norm.kind == first.kind
             and not shared_loop else None)
    template = _template(model, alike, first, locate)  # built as the final norm, unless its kind differs (ESMC)
    if stack.final_norm is not None:
        edits += _removed_model_norm(model, stack.final_norm.path)
    if keep_embedding_norm:
        return edits  # it already normalises what branch 0 reads: it stays the embedding norm (ModernBERT)
    if stack.embedding_norm is not None:
        edits += _removed_model_norm(model, stack.embedding_norm.path)
    if _stage_list(model, stack):
        return [*edits, _stage_norm(model, stack, EMBEDDING_NORM, "before", first, locate)]
    return [*edits, AddStackNorm(loop_owner(model, stack), stack.path.rsplit(".", 1)[-1], EMBEDDING_NORM, "before",
                                 *template, channel_axis=_axis_to_move(stack, alike or first))]


def identity_pre_norms(layer: Layer) -> tuple[NormSite, ...]:
    """The identity placeholders among a layer's pre norms (ModernBERT's first ``attn_norm``)."""
    return tuple(norm for sub in layer.sublayers for norm in sub.norms_in("pre") if norm.kind == "identity")


def _realised_placeholders(model: nn.Module, layers: list[Layer], template: Layer) -> list[Edit]:
    """Identity placeholders of pre norms become norms: in a Post-Norm target each holds a moved norm."""
    edits: list[Edit] = []
    for layer in layers:
        for norm in identity_pre_norms(layer):
            if template is layer:
                raise CodegenError(f"every layer of {layer.stack} reads the stream through an identity placeholder "
                                   f"({norm.path}), so there is no norm constructor to build in its place")
            edit = BuildNormAlways(*owner_and_attribute(model, norm.path))
            if edit not in edits:
                edits.append(edit)
    return edits


def _wrapped_adds(subs: tuple[Sublayer, ...], locate: _Locator, functions: ModuleFunctions, path: Path
                  ) -> list[Edit]:
    """Each residual add wrapped in one of the layer's former pre norms, each norm used once.

    Sublayer j's add takes sublayer j+1's norm (the last add the first), which keeps names meaningful
    (Llama's ``post_attention_layernorm`` ends up after attention). Where that norm is not reachable from the
    class that adds (T5 keeps each sublayer's norm in the sublayer's own module), every add takes its own
    sublayer's norm instead. Either way the plan, read from the generated code, moves the weights to match.
    An add inside a module-level helper function is wrapped where the layer calls the helper (function_adds).
    """
    helper_calls = helper_add_calls(functions, [locate.line_or_none(sub.residual_add) for sub in subs],
                                    locate.layer_class, locate.filename, [locate.branch_classes(sub) for sub in subs],
                                    [locate.line_or_none(sub.residual_add_caller) for sub in subs])
    for shift in (1, 0):
        try:
            edits: list[Edit] = []
            for index, sub in enumerate(subs):
                norm = subs[(index + shift) % len(subs)].norms_in("pre")[0]
                call = helper_calls.get(index)
                source = f"{locate.filename}:{call.line}" if call else sub.residual_add
                edits.append(_wrapped_add(locate, source, norm.path, call.function if call else "", path))
            return edits
        except CodegenError as error:
            unreachable = error
    raise unreachable


def _wrapped_add(locate: _Locator, source: str | None, norm_path: str, helper: str, path: Path) -> WrapResidualAdd:
    """The add at ``source`` wrapped in ``norm_path``: where it is written, else (the add is inside a child module
    and the norm belongs to its caller) around the child's call (``caller_adds``)."""
    try:
        class_name, attribute = locate.attribute(source, norm_path)
        return WrapResidualAdd(class_name, locate.line(source), attribute, helper)
    except CodegenError:
        add_class = locate.enclosing_class(source)
        if add_class is None or (helper and add_class == locate.layer_class):
            raise
        try:
            call, attribute, item = caller_of_add(locate.layer, add_class, locate.line(source),
                                                  locate.relative(norm_path), path, helper)
        except NormswapError as reason:
            raise CodegenError(str(reason)) from reason
        return WrapResidualAdd(call.class_name, call.line, attribute, f"self.{call.attribute}", item)


def _pre_edits(model: nn.Module, stack: Stack, layer: Layer, path: Path, classes: list[tuple[str, int, int]]
               ) -> list[Edit]:
    """Post -> Pre for one stack: unwrap the post norms, wrap each branch input in its sublayer's norm, and
    move the embedding norm after the loop (where there is none, the final norm is built like a layer norm)."""
    locate = _Locator(model.get_submodule(layer.path), layer, classes, path.name)
    edits: list[Edit] = []
    first_post: NormSite | None = None
    for index, sub in enumerate(layer.sublayers):
        (norm,) = sub.norms_in("post") or (None,)
        if norm is None or len(sub.branches) != 1 or not sub.branches[0].entry:
            raise CodegenError(f"sublayer {index} of {layer.path} is not a single branch with one post norm")
        first_post = first_post or norm
        class_name, attribute = locate.attribute(norm.source, norm.path)
        edits.append(UnwrapNormCall(class_name, locate.line(norm.source), attribute))
        branch = sub.branches[0]
        class_name, branch_attribute = locate.attribute(branch.entry_source, branch.entry or "")
        _, norm_attribute = locate.attribute(branch.entry_source, norm.path)
        edits.append(WrapBranchInput(class_name, locate.line(branch.entry_source), branch_attribute,
                                     norm_attribute))
        for reader, source in branch.other_readers():  # ALBERT's key and value read the stream beside query
            class_name, reader_attribute = locate.attribute(source, reader)
            _, norm_attribute = locate.attribute(source, norm.path)
            edits.append(WrapBranchInput(class_name, locate.line(source), reader_attribute, norm_attribute))
    assert first_post is not None  # a layer has at least one sublayer
    if stack.embedding_norm is not None:
        edits += _removed_model_norm(model, stack.embedding_norm.path)
    if _stage_list(model, stack):
        return [*edits, _stage_norm(model, stack, FINAL_NORM, "after", first_post, locate)]
    template = _template(model, stack.embedding_norm, first_post, locate)
    return [*edits, AddStackNorm(loop_owner(model, stack), stack.path.rsplit(".", 1)[-1], FINAL_NORM, "after",
                                 *template, channel_axis=_axis_to_move(stack, stack.embedding_norm or first_post))]


def _serial_edits(model: nn.Module, stack: Stack, layer: Layer, path: Path, classes: list[tuple[str, int, int]]
                  ) -> list[Edit]:
    """Parallel Pre-Norm -> sequential Pre-Norm for one stack: in each parallel block the later branch reads the
    stream after the earlier branch's add through a norm of its own (a new one built like a shared norm; its own
    norm where it has one), and the add sums the stream after the earlier branch and the later branch's output
    (``serialise``). The stack norms stay where they are."""
    from .serialise import forward_of, stream_before  # it reads this module's errors

    locate = _Locator(model.get_submodule(layer.path), layer, classes, path.name)
    edits: list[Edit] = []
    for index, sub in enumerate(layer.sublayers):
        if sub.kind != "parallel":
            continue
        if len(sub.branches) != 2 or not all(branch.entry and branch.reads for branch in sub.branches):
            raise CodegenError(f"sublayer {index} of {layer.path} is not two branches that each read a norm")
        earlier, later = sorted(sub.branches, key=lambda branch: locate.line(branch.entry_source))
        class_name, later_attribute = locate.attribute(later.entry_source, later.entry or "")
        _, earlier_attribute = locate.attribute(earlier.entry_source, earlier.entry or "")
        _, norm_attribute = locate.attribute(later.entry_source, later.reads[0])
        if "." in norm_attribute or "." in later_attribute:
            raise CodegenError(f"{later.reads[0]} or {later.entry} is built in a submodule of {class_name}, so the "
                               "new norm of its branch has no constructor in one class to copy")
        add_line, helper, operands = _parallel_add(locate, sub, class_name, path)
        form = stream_before(path, class_name, add_line, (earlier_attribute, later_attribute),
                             locate.line(later.entry_source), operands)
        variable = f"normswap_after_{earlier_attribute}"
        if helper and len(form.kept) != 1:
            raise CodegenError(f"{helper} adds {' + '.join(form.kept)} to self.{later_attribute}'s output at line "
                               f"{add_line} of {class_name}: no one argument of its call is the stream to replace")
        forward = forward_of(ast.parse(path.read_text(encoding="utf-8")), class_name)
        shared = later.reads[0] in earlier.reads
        called_apart, through = _norm_reading(forward, sub, later, later_attribute, locate, own=not shared)
        if shared:  # a shared norm (GPT-J's ln_1): the later branch gets one of its own
            norm = f"normswap_{later_attribute}_norm"
            edits.append(AddLayerNorm(class_name, norm, norm_attribute))
        else:  # its own norm (GPT-NeoX's, Falcon's ln_mlp) reads the new stream instead
            norm = norm_attribute
            edits += [DropStatement(class_name, called_apart, f"self.{norm} reads {variable} below")
                      ] if called_apart is not None else []
        edits += [ReadAfterBranch(class_name, locate.line(later.entry_source), later_attribute, norm, variable,
                                  form.stream, through),
                  ReplaceResidualAdd(class_name, add_line, variable, helper, form.kept[0]) if helper
                  else ReplaceResidualAdd(class_name, add_line, f"{variable} + {form.output}"),
                  *(DropStatement(class_name, line, f"{variable} holds this term") for line in form.dropped),
                  *(DropStatement(class_name, line, "the residual add below sums these terms") for line in form.split)]
    return edits


def _norm_reading(forward: ast.FunctionDef, sub: Sublayer, later: Branch, later_attribute: str,
                  locate: _Locator, own: bool) -> tuple[int | None, str]:
    """How the later branch reads its norm: (with ``own``, a norm only that branch reads, the line of ``name =
    self.<norm>(stream)`` to drop, None where the norm is called in the branch's call itself, GPT-NeoX's
    ``self.mlp(self.post_attention_layernorm(h))``, whose argument the new stream replaces; ``name`` where the
    call's input is an expression of it, Falcon-H1's ``hidden_states * self.attention_in_multiplier``, else "")."""
    site = next((norm for norm in sub.norms if norm.path == later.reads[0]), None)
    line = locate.line(site.source if site is not None else None)
    entry_line = locate.line(later.entry_source)
    statement = next((node for node in ast.walk(forward) if isinstance(node, ast.Assign) and node.lineno == line
                      and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)), None)
    bound = statement.targets[0].id if statement is not None else ""  # type: ignore[union-attr]
    call = next((node for node in ast.walk(forward) if isinstance(node, ast.Call)
                 and node.lineno <= entry_line <= (node.end_lineno or node.lineno)
                 and ast.unparse(node.func) == f"self.{later_attribute}"), None)
    argument = None if call is None else call.args[0] if call.args else next(
        (keyword.value for keyword in call.keywords if keyword.arg in INPUT_KEYWORDS), None)
    through = bound if argument is not None and not isinstance(argument, ast.Name) and any(
        isinstance(node, ast.Name) and node.id == bound for node in ast.walk(argument)) else ""
    return _own_norm_line(forward, line, entry_line, bound, later) if own else None, through


def _own_norm_line(forward: ast.FunctionDef, line: int, entry_line: int, bound: str, later: Branch) -> int | None:
    """``line``, where it binds the later branch's own norm output to ``bound``, which only the branch's call
    reads: the serial form drops it, the branch reading its norm on the new stream instead."""
    if line == entry_line:
        return None
    readers = {node.lineno for node in ast.walk(forward) if isinstance(node, ast.Name)
               and isinstance(node.ctx, ast.Load) and node.id == bound}
    if not bound or readers - {entry_line}:
        raise CodegenError(f"{later.reads[0]}'s output at line {line} is not one name that only {later.entry} "
                           "reads, so the branch cannot read the stream after the earlier branch through that norm "
                           "alone")
    return line


def _parallel_add(locate: _Locator, sub: Sublayer, class_name: str, path: Path
                  ) -> tuple[int, str, tuple[str, ...] | None]:
    """(the line of ``class_name.forward`` that adds the block to the stream, the module-level helper that adds it
    there or "", the add's terms as that call passes them): Falcon adds in ``dropout_add(x, residual, ...)``."""
    from .branch_terms import FUNCTIONAL_DROPOUT, helper_call_terms  # it reads this module's errors

    call_line = locate.helper_call_line(sub)
    if call_line is None:
        return locate.line(sub.residual_add), "", None
    terms = helper_call_terms(path, class_name, call_line, locate.line(sub.residual_add), (),
                              FUNCTIONAL_DROPOUT.__contains__)
    return call_line, terms.helper, terms.terms


def _removed_model_norm(model: nn.Module, path: str) -> list[Edit]:
    """A stack-level norm (embedding or final) that the target layout no longer runs. An item of a module list of
    stage norms (GLPN's ``encoder.layer_norm``, called through the stage loop's variable) is built as a placeholder
    that passes its input through, so its call needs no edit."""
    if _is_list_item(model, path):
        owner, attribute = owner_and_attribute(model, path.rsplit(".", 1)[0])
        item_class = type(model.get_submodule(path)).__name__
        return [NeutraliseNorm(owner, attribute, _parameter_names(model, path), item_class)]
    owner, attribute = owner_and_attribute(model, path)
    return [UnwrapModelNorm(owner, attribute), NeutraliseNorm(owner, attribute, _parameter_names(model, path))]


def _stage_norm(model: nn.Module, stack: Stack, norm: str, where: str, layer_norm: NormSite,
                locate: _Locator) -> AddStackNorm:
    """The new stack norm of a stack that is one stage of a list of layer lists (``stage_loops``): one per stage,
    each a fresh copy of its stage's first layer's ``layer_norm`` (the same class and settings, its stage's width),
    whose weights loading replaces."""
    holder, attribute = owner_and_attribute(model, stack.path.rsplit(".", 1)[0])
    return AddStackNorm(holder, attribute, norm, where, locate.layer_class, locate.relative(layer_norm.path),
                        copy_from_layers=True, channel_axis=_axis_to_move(stack, layer_norm), per_stage=True)


def _stage_list(model: nn.Module, stack: Stack) -> bool:
    """Whether ``stack`` is one item of a list of layer lists (PVT's ``encoder.block``, one list per stage)."""
    parent = stack.path.rsplit(".", 1)[0] if "." in stack.path else ""
    return isinstance(model.get_submodule(parent), (nn.ModuleList, nn.Sequential))


def _branch_called_beside(locate: _Locator, sub: Sublayer, class_name: str, source: str | None) -> str:
    """The attribute of the sublayer's branch, where its class calls it on the norm call's line: the pre norm's call
    is then the one that does not read the branch's output; "" where no such attribute is known."""
    entry = sub.branches[0].entry if len(sub.branches) == 1 else None
    if not entry or sub.branches[0].entry_source != source:
        return ""
    try:
        owner, attribute = locate.attribute(source, entry)
    except CodegenError:
        return ""
    return attribute if owner == class_name else ""


def _axis_to_move(stack: Stack, template: NormSite) -> int:
    """The axis a new stack norm built like ``template`` must move last to normalise the stream's channels between
    layers: -1 where it already normalises them (a channels-last stream, or a channels-first norm on a
    channels-first one, as SqueezeBERT's), the stream's channel axis where it normalises the last axis."""
    if template.axis == stack.axis:
        return -1
    if template.axis != -1:
        raise CodegenError(f"{template.path} normalises axis {template.axis}, but {stack.path} carries its channels on "
                           "the last axis between layers, so a norm built like it cannot normalise that stream")
    return stack.axis


def _template(model: nn.Module, moved: NormSite | None, layer_norm: NormSite,
              locate: _Locator) -> tuple[str, str, bool]:
    """(class, attribute, whether it is the stack items' own attribute) whose constructor the new stack norm
    copies: the stack norm that moves, else (a layout with no norm in that slot: Marian has no embedding norm,
    some Pre-Norm models no final norm) the layer's own norm, which the plan starts as a unit norm."""
    if moved is not None:
        return (*owner_and_attribute(model, moved.path), False)
    class_name, attribute = locate.attribute(layer_norm.source, layer_norm.path)
    if "." in attribute:
        raise CodegenError(f"{layer_norm.path} is built in a submodule of {class_name}, so there is no constructor "
                           "in one class to copy for the new stack norm")
    return class_name, attribute, class_name == locate.layer_class


def layer_norm_edits(model: nn.Module, topology: Topology, eps_in_code: Mapping[str, float] | None = None,
                     only: Collection[str] | None = None) -> list[Edit]:
    """Every residual RMSNorm (pre norms and final norm) becomes ``NormswapLayerNorm.like(<the norm as written>)``,
    which reads its width and eps from the built norm whatever its constructor takes (CpmAnt's takes the config).
    ``eps_in_code``: the eps to write into the code for norms (by path) whose eps no config field reaches;
    ``only``: the norms to replace, where LayerNorms beside them stay as they are."""
    edits: list[Edit] = []
    for path in (norm.path for norm in topology.stream_norms if only is None or norm.path in only):
        require_plain_norm(model, path)
        eps = (eps_in_code or {}).get(path)
        edit = ReplaceNormClass(*norm_owner(model, path), new_class="NormswapLayerNorm", wrap=True,
                                item_class=list_item_class(model, path),
                                keywords=(("eps", repr(eps)),) if eps is not None else ())
        if edit not in edits:
            edits.append(edit)
    return edits


def rms_norm_edits(model: nn.Module, topology: Topology, centre_in_code: bool = True) -> list[Edit]:
    """The edits that make a Pre-LN model run RMSNorm on a zero-mean stream (docs/design.md §4).

    Every norm that reads the residual stream (pre norms, final norm) becomes ``NormswapRMSNorm``; the
    stream is centred once before the layer loop, which also centres the embeddings without touching
    their weights, so a tied ``lm_head`` stays tied. An embedding LayerNorm (BLOOM, BERT-style embeddings)
    reads the raw embeddings: its input is centred in code too, where it equals the RMSNorm that replaces it;
    the centring before the loop then takes care of its output (its weight and bias).
    """
    edits: list[Edit] = []
    for norm in (*topology.stream_norms, *(embedding_layer_norms(topology) if centre_in_code else ())):
        edit = rms_norm_replacement(model, norm)  # a Pre-LN model's layer norms are all pre norms
        if edit not in edits:
            edits.append(edit)
    if centre_in_code:
        edits += [edit for edit in stream_centring_edits(model, topology) if edit not in edits]
    return edits


def stream_centring_edits(model: nn.Module, topology: Topology) -> list[Edit]:
    """The edits that centre a Pre-LN model's stream in code, touching no weight (with the writers centred): its
    input centred before each embedding LayerNorm, and the stream before each stack's layer loop."""
    edits: list[Edit] = []
    for norm in embedding_layer_norms(topology):
        edit = CentreNormInput(*owner_and_attribute(model, norm.path), norm.axis)
        if edit not in edits:
            edits.append(edit)
    for stack in topology.stacks:  # an encoder-decoder has two streams to centre
        edit = (CentreStream(*owner_and_attribute(model, stack.path.rsplit(".", 1)[0]), stack.axis, per_stage=True)
                if _stage_list(model, stack)
                else CentreStream(loop_owner(model, stack), stack.path.rsplit(".", 1)[-1], stack.axis))
        if edit not in edits:  # stacks of one class (T5's two, SegFormer's stages) run one loop in shared code
            edits.append(edit)
    return edits


def embedding_layer_norms(topology: Topology) -> list[NormSite]:
    """The LayerNorms that read a stack's raw embeddings, before its first layer."""
    return [stack.embedding_norm for stack in topology.stacks
            if stack.embedding_norm is not None and stack.embedding_norm.kind.startswith("layernorm")]


def rms_norm_replacement(model: nn.Module, norm: NormSite) -> ReplaceNormClass:
    """``NormswapRMSNorm`` in place of the LayerNorm at ``norm``.

    The original norm is built as written and handed to ``NormswapRMSNorm.like``, which copies its shape, eps
    and affine parameters whatever its constructor's arguments are called (Cohere: ``hidden_size``); a
    weightless LayerNorm (OLMo) keeps eps in its code, not in an attribute, so the edit states it.
    """
    require_plain_norm(model, norm.path)
    keywords = (("eps", repr(norm.eps)),) if norm.kind == "layernorm-noaffine" else ()
    keywords += (("axis", repr(norm.axis)),) if norm.axis != -1 else ()  # a channels-first norm (SqueezeBERT's)
    return ReplaceNormClass(*norm_owner(model, norm.path), keywords=keywords, wrap=True,
                            item_class=list_item_class(model, norm.path))


def norm_owner(model: nn.Module, path: str) -> tuple[str, str]:
    """The class and attribute whose ``__init__`` assignment builds the norm at ``path``: for an item of a module
    list, the list's (``ReplaceNormClass.item_class`` then names the items' class)."""
    return owner_and_attribute(model, path.rsplit(".", 1)[0] if _is_list_item(model, path) else path)


def list_item_class(model: nn.Module, path: str) -> str:
    """The class whose calls, in the constructor expression that builds the norm at ``path``, are the norm: set
    where that expression builds other modules too, else "". An item of a module list is built inside the list's
    expression; an attribute that some instances of its class build as another module (AXK2's
    ``post_attention_layernorm``: a gated RMSNorm in MoE layers, a plain RMSNorm in dense ones) by a conditional."""
    norm_class = type(model.get_submodule(path)).__name__
    if _is_list_item(model, path):
        return norm_class
    return norm_class if _attribute_classes(model, path) - {norm_class} else ""


def _is_list_item(model: nn.Module, path: str) -> bool:
    parent, _, leaf = path.rpartition(".")
    return leaf.isdigit() and isinstance(model.get_submodule(parent), nn.ModuleList)


def _attribute_classes(model: nn.Module, path: str) -> set[str]:
    """The classes of the modules that every instance of the norm's owner class holds under the norm's attribute."""
    owner, attribute = owner_and_attribute(model, path)
    return {type(getattr(module, attribute)).__name__ for module in model.modules()
            if type(module).__name__ == owner and isinstance(getattr(module, attribute, None), nn.Module)}


def require_plain_norm(model: nn.Module, path: str) -> None:
    """A norm whose class is replaced must be a norm and nothing more, wherever its class builds it: a module
    that wraps one with more computation (AXK2's gated RMSNorm: a norm, then a gate MLP) would lose that
    computation. Where the constructor expression builds other modules too (a module list's items, a conditional
    choosing the class per layer), only the norm's class's calls are replaced: a module list must then hold
    nothing else, since every item its expression builds is replaced."""
    norm_class = type(model.get_submodule(path)).__name__
    if _is_list_item(model, path):
        parent = path.rpartition(".")[0]
        others = sorted({type(item).__name__ for item in model.get_submodule(parent)} - {norm_class})
        if others:
            owner, attribute = owner_and_attribute(model, parent)
            raise CodegenError(f"{path} is an item of {owner}.{attribute}, a module list that also holds "
                               f"{', '.join(others)}; generated code replaces every {norm_class} its constructor "
                               "builds, which would replace those too")
        return
    owner, attribute = owner_and_attribute(model, path)
    for where, parent in model.named_modules():
        module = getattr(parent, attribute, None) if type(parent).__name__ == owner else None
        if not isinstance(module, nn.Module) or type(module).__name__ != norm_class:
            continue
        inner = [name for name, child in module.named_children() if any(True for _ in child.parameters())]
        if inner:
            raise CodegenError(f"{where + '.' if where else ''}{attribute} is a {type(module).__name__}, which "
                               f"computes more than a norm (its submodule {inner[0]} has weights of its own); "
                               "replacing its class would drop that computation")


class _Locator:
    """Resolves (source line, module path) to (enclosing class, ``self.`` attribute path in that class)."""

    def __init__(self, layer: nn.Module, record: Layer, classes: list[tuple[str, int, int]], filename: str):
        self.layer = layer
        self.record = record
        self.layer_path = record.path
        self.layer_class = type(layer).__name__
        self.classes = classes
        self.filename = filename
        self.class_paths: dict[str, list[str]] = {}
        for path, module in layer.named_modules():
            self.class_paths.setdefault(type(module).__name__, []).append(path)

    def line(self, source: str | None) -> int:
        if not source or ":" not in source:
            raise CodegenError("a norm or add has no source line in the trace; cannot rewrite it")
        filename, line = source.rsplit(":", 1)
        if filename != self.filename:
            raise CodegenError(f"{source} is outside {self.filename}; cannot rewrite code in two files")
        return int(line)

    def line_or_none(self, source: str | None) -> int | None:
        """The line of ``source`` in this file, None where it has none or is in another file."""
        try:
            return self.line(source)
        except CodegenError:
            return None

    def helper_call_line(self, sub: Sublayer) -> int | None:
        """The line where a class calls the module-level function that holds ``sub``'s residual add (BLOOM's and
        Falcon's ``dropout_add``); None where a class holds the add itself."""
        if self.enclosing_class(sub.residual_add) is not None or not sub.residual_add_caller:
            return None
        return self.line(sub.residual_add_caller)

    def enclosing_class(self, source: str | None) -> str | None:
        """The innermost class whose source holds ``source``'s line (None in a module-level function)."""
        line = self.line(source)
        enclosing = [(name, start, end) for name, start, end in self.classes if start <= line <= end]
        return max(enclosing, key=lambda item: item[1])[0] if enclosing else None

    def branch_classes(self, sub: Sublayer) -> set[str]:
        """The classes of the modules, below the layer, that ``sub``'s branches run in (BLOOM's attention module
        holds its branch's linear maps)."""
        classes: set[str] = set()
        for branch in sub.branches:
            for module in branch.modules:
                parts = self.relative(module).split(".")
                for depth in range(1, len(parts)):
                    classes.add(type(self.layer.get_submodule(".".join(parts[:depth]))).__name__)
        return classes

    def relative(self, module_path: str) -> str:
        """``module_path`` relative to the layer."""
        return module_path.removeprefix(self.layer_path + ".") if self.layer_path else module_path

    def attribute(self, source: str | None, module_path: str) -> tuple[str, str]:
        class_name = self.enclosing_class(source)
        if class_name is None:
            raise CodegenError(f"{source} (a norm call or residual add the conversion must rewrite) is in a "
                               "module-level function, which holds no norm module to wrap it in: generated code "
                               "edits the classes of the modeling file")
        relative = self.relative(module_path)
        for class_path in self.class_paths.get(class_name, []):
            if not class_path:  # a layer of list items names its item by the loop's index: ``layer_norm1.*``
                return class_name, self.record.relative(module_path) if self.record.items else relative
            if relative.startswith(class_path + "."):
                return class_name, relative[len(class_path) + 1:]
        raise CodegenError(f"{module_path} is not reachable from {class_name} (at {source}): the code there "
                           "cannot call that norm, because it belongs to an enclosing module, and generated code "
                           "keeps each family's module tree")


def _owner(model: nn.Module, path: str) -> str:
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    return type(model.get_submodule(parent)).__name__


def loop_owners(model: nn.Module, topology: Topology) -> list[str]:
    """The class that runs each stack's layer loop, where the exact RMSNorm map centres its stream (``CodegenError``
    where a stack has none of its own); for a stage of a list of layer lists, the class whose loop over the stages
    runs it (``stage_loops``), where every stage ends in a final norm: a stage that hands its stream on without one
    (PVT's first stages, read by the next stage's patch embedding) would hand on the centred stream."""
    owners = []
    for stack in topology.stacks:
        if not _stage_list(model, stack):
            owners.append(loop_owner(model, stack))
            continue
        if stack.final_norm is None:
            raise CodegenError(f"{stack.path}, a stage that one loop of its model runs with the others, hands its "
                               "stream on with no final norm, so what reads it next would see the centred stream")
        owners.append(owner_and_attribute(model, stack.path.rsplit(".", 1)[0])[0])
    return owners


def _shares_loop(model: nn.Module, topology: Topology, stack: Stack) -> bool:
    """Whether the class that runs ``stack``'s loop runs another stack's too (a stage class, one per stage) and
    does not build the stack's final norm itself (FocalNet's model does), so that its constructor is not there."""
    def owner(path: str) -> type:
        return type(model.get_submodule(path.rsplit(".", 1)[0] if "." in path else ""))

    if stack.final_norm is None or owner(stack.final_norm.path) is owner(stack.path):
        return False
    return any(owner(other.path) is owner(stack.path) for other in topology.stacks if other.path != stack.path)


def loop_owner(model: nn.Module, stack: Stack) -> str:
    """The class whose ``forward`` runs the stack's layer loop, where code before or after that loop goes.

    A stack that is an item of a list of layer lists (PVT's ``encoder.block``, one list per stage) is run by a
    loop over several lists at once, in a forward that holds no one place per stack; a stack norm goes inside
    that loop instead (``_stage_norm``), but other code around the loop does not."""
    parent = stack.path.rsplit(".", 1)[0] if "." in stack.path else ""
    if _stage_list(model, stack):
        holder = parent.rsplit(".", 1)[0] if "." in parent else ""
        raise CodegenError(f"{stack.path} is an item of {parent}, a list of layer lists that "
                           f"{type(model.get_submodule(holder)).__name__}.forward runs in one loop over every "
                           "stage; code that runs before or after one stack's layers needs a module of its own per "
                           "stack, whose forward runs that stack's loop")
    return type(model.get_submodule(parent)).__name__


def owner_and_attribute(model: nn.Module, path: str) -> tuple[str, str]:
    """The class that owns the module at ``path`` and the attribute it is stored under."""
    return _owner(model, path), path.rsplit(".", 1)[-1]


def _parameter_names(model: nn.Module, path: str) -> tuple[str, ...]:
    """The removed norm's parameter names, under which its placeholder keeps 0-d tensors (removed_norm_tensors.py):
    where the stock norm holds a 0-d parameter, its stock class would load one of those silently."""
    parameters = list(model.get_submodule(path).named_parameters(recurse=False))
    scalar = next((name for name, parameter in parameters if parameter.dim() == 0), None)
    if scalar is not None:
        raise CodegenError(f"{path}.{scalar} is 0-d, so the 0-d tensor normswap leaves where the norm is removed "
                           "would load into the stock class silently")
    return tuple(name for name, _ in parameters)


def _class_lines(path: Path) -> list[tuple[str, int, int]]:
    """(class name, first line, last line) of every class in the file.

    Only line numbers are needed here, so Python's own parser does it (libcst, which keeps the source
    exact for rewriting, takes about a second per modeling file).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [(node.name, min([node.lineno, *(d.lineno for d in node.decorator_list)]), node.end_lineno or node.lineno)
            for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
