"""Apply source edits to a modeling file with libcst. Every edit must apply exactly once, or we fail.

Statements are matched by the line the fx stack trace gave; inside a statement, by the
``self.<attribute>`` expression the edit names. Everything else is left byte for byte.
"""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import libcst as cst

from .derive import CodegenError
from .edits import (
    INNER_WIDTH_FIELD,
    INPUT_KEYWORDS,
    AddLayerNorm,
    AddOutputProjection,
    AddStackNorm,
    AddStackProjection,
    BuildAtSourceWidth,
    BuildNormAlways,
    BuildSubmodelDirectly,
    CentreNormInput,
    CentreStream,
    DropStatement,
    Edit,
    GiveBias,
    NeutraliseNorm,
    ReadAfterBranch,
    ReplaceNormClass,
    ReplaceResidualAdd,
    SizeByInnerWidth,
    UnwrapModelNorm,
    UnwrapNormCall,
    VariantStatement,
    WrapBranchInput,
    WrapBranchOutput,
    WrapResidualAdd,
)
from .name_scope import bound_names, module_names, read_names
from .stage_loops import insert_at_stage_loop
from .statement_lines import Spans, statement_lines

_EMPTY = cst.Module(body=[])


def apply_edits(source: str, edits: Sequence[Edit]) -> str:
    """The rewritten source; raises ``CodegenError`` naming any edit that did not apply exactly once."""
    module = cst.parse_module(source)
    constructors = _constructors(module)
    lines = statement_lines(source, module) if any(getattr(edit, "line", None) is not None for edit in edits) else {}
    rewriter = _Rewriter(edits, constructors, lines, module_names(module), _width_aliases(module))
    rewritten = module.visit(rewriter)
    # line-addressed edits apply exactly once; class-wide ones (every assignment, every call) at least once
    class_wide = (UnwrapModelNorm, NeutraliseNorm, ReplaceNormClass, CentreNormInput, SizeByInnerWidth,
                  AddOutputProjection, BuildAtSourceWidth)
    wrong = [edit for edit in edits
             if rewriter.applied[edit] == 0 or (rewriter.applied[edit] > 1 and not isinstance(edit, class_wide))]
    if wrong:
        details = ", ".join(f"{edit} applied {rewriter.applied[edit]} times" for edit in wrong)
        raise CodegenError(f"the modeling source did not take the planned edits ({details})")
    return rewritten.code


def _code(node: cst.CSTNode) -> str:
    return _EMPTY.code_for_node(node)


def _normalised(node: cst.BaseExpression) -> str:
    """The expression as Python's own ``ast.unparse`` writes it (what planning names a term by)."""
    return ast.unparse(ast.parse(_code(node).strip(), mode="eval"))


def _self_attribute(node: cst.BaseExpression) -> str | None:
    """``self.a.b`` -> ``"a.b"``, ``self.norms[0]`` -> ``"norms.0"`` (the module path), ``self.norms[i]`` ->
    ``"norms.*"`` (each item, by a loop's index); anything else -> None."""
    parts: list[str] = []
    while True:
        if isinstance(node, cst.Attribute):
            parts.append(node.attr.value)
        elif (isinstance(node, cst.Subscript) and len(node.slice) == 1 and isinstance(node.slice[0].slice, cst.Index)
              and isinstance(node.slice[0].slice.value, cst.Integer)):
            parts.append(node.slice[0].slice.value.value)  # LongCat-Flash: ``self.input_layernorm[1](h)``
        elif _loop_index(node) is not None:
            parts.append("*")  # XLM: ``self.layer_norm1[i](tensor)``
        else:
            break
        node = node.value
    if isinstance(node, cst.Name) and node.value == "self" and parts:
        return ".".join(reversed(parts))
    return None


def _loop_index(node: cst.BaseExpression) -> str | None:
    """``i`` in ``<list>[i]``: a module list indexed by a variable."""
    if (isinstance(node, cst.Subscript) and len(node.slice) == 1 and isinstance(node.slice[0].slice, cst.Index)
            and isinstance(node.slice[0].slice.value, cst.Name)):
        return node.slice[0].slice.value.value
    return None


def _self_call(attribute: str, argument: cst.BaseExpression, index: str | None = None) -> cst.Call:
    """``self.<attribute>(argument)``; a numeric path part is an index into a ModuleList, and ``*`` the loop's
    ``index``."""
    written = "".join(f"[{part}]" if part.isdigit() else f"[{index}]" if part == "*" else f".{part}"
                      for part in attribute.split("."))
    if "*" in attribute and index is None:
        raise CodegenError(f"self.{attribute} is an item of a module list by a loop's index, and the statement "
                           "that calls it names no index")
    return cst.Call(func=cst.parse_expression(f"self{written}"), args=[cst.Arg(value=argument)])


@dataclass(frozen=True)
class Constructor:
    """How an ``__init__`` builds ``self.<attribute>``: the constructor call, and the fields it then sets on the
    built module (MPT's ``self.norm_f.bias = None``: a LayerNorm without bias is built so)."""

    call: str
    settings: tuple[tuple[str, str], ...] = ()

    def statements(self, attribute: str) -> list[str]:
        """The statements that build the same module as ``self.<attribute>``."""
        return [f"self.{attribute} = {self.call}\n",
                *(f"self.{attribute}.{field} = {value}\n" for field, value in self.settings)]


def _builds_identity(value: cst.BaseExpression) -> bool:
    """``nn.Identity()`` or ``Identity()``: a placeholder, not a norm's constructor."""
    return (isinstance(value, cst.Call) and not value.args
            and _code(value.func).rpartition(".")[2] == "Identity")


def _besides_identity(choice: cst.IfExp) -> cst.BaseExpression | None:
    """The branch of ``a if condition else b`` that is not an ``nn.Identity()`` placeholder, where one is."""
    if _builds_identity(choice.orelse) and not _builds_identity(choice.body):
        return choice.body
    if _builds_identity(choice.body) and not _builds_identity(choice.orelse):
        return choice.orelse
    return None


def _constructors(module: cst.Module) -> dict[tuple[str, str], Constructor]:
    """``(class, attribute) -> its constructor`` for every ``self.<attribute> = Cls(...)`` in an ``__init__``."""
    found: dict[tuple[str, str], Constructor] = {}
    for statement in module.body:
        if not isinstance(statement, cst.ClassDef):
            continue
        for item in statement.body.body:
            if isinstance(item, cst.FunctionDef) and item.name.value == "__init__":
                local: dict[str, cst.BaseExpression] = {}
                fields: dict[str, cst.BaseExpression] = {}
                for node in _walk(item):
                    if not isinstance(node, cst.Assign) or len(node.targets) != 1:
                        continue
                    target = node.targets[0].target
                    if isinstance(target, cst.Name):  # `embed_dim = config.hidden_size`, in order
                        local[target.value] = node.value.visit(_InlineLocals(dict(local), dict(fields)))
                        continue
                    attribute = _self_attribute(target)
                    if attribute and isinstance(node.value, (cst.Call, cst.IfExp)) and not _builds_identity(node.value):
                        # the first constructor call wins (`else: self.norm = None` is no constructor, nor is the
                        # placeholder `nn.Identity()` some layers build instead of the norm)
                        inlined = node.value.visit(_InlineLocals(local, fields))
                        found.setdefault((statement.name.value, attribute), Constructor(_code(inlined)))
                    elif attribute and (built := (statement.name.value, attribute.rpartition(".")[0])) in found:
                        value = _code(node.value.visit(_InlineLocals(dict(local), dict(fields))))
                        field = attribute.rpartition(".")[2]  # `self.norm_f.bias = None`
                        found[built] = replace(found[built], settings=(*found[built].settings, (field, value)))
                    elif attribute and "." not in attribute:  # `self.embed_dim = config.d_model`
                        fields[attribute] = node.value.visit(_InlineLocals(dict(local), dict(fields)))
    return found


class _InlineLocals(cst.CSTTransformer):
    """A constructor copied into another class's ``__init__`` cannot use the local variables or plain fields
    of the one it came from (CLIP's ``nn.LayerNorm(embed_dim, ...)`` after ``embed_dim = config.hidden_size``,
    Marian's ``nn.LayerNorm(self.embed_dim)``): each is replaced by what was assigned to it."""

    def __init__(self, local: dict[str, cst.BaseExpression], fields: dict[str, cst.BaseExpression]) -> None:
        super().__init__()
        self.local = local
        self.fields = fields

    def leave_Name(self, original: cst.Name, updated: cst.Name) -> cst.BaseExpression:
        value = self.local.get(updated.value)
        return updated if value is None else _grouped(value)

    def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute) -> cst.BaseExpression:
        own = isinstance(original.value, cst.Name) and original.value.value == "self"
        if own and original.attr.value in self.fields:
            return _grouped(self.fields[original.attr.value])
        return updated.with_changes(attr=original.attr)  # `x.embed_dim` names an attribute, not the local

    def leave_Arg(self, original: cst.Arg, updated: cst.Arg) -> cst.Arg:
        return updated.with_changes(keyword=original.keyword)  # `f(embed_dim=...)` names a parameter


def _grouped(value: cst.BaseExpression) -> cst.BaseExpression:
    """``value`` where an operand goes: in parentheses unless it is atomic."""
    if isinstance(value, (cst.Name, cst.Attribute, cst.Integer, cst.Float, cst.Call, cst.Subscript)):
        return value
    return value.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()])


def _walk(node: cst.CSTNode) -> list[cst.CSTNode]:
    nodes = [node]
    for child in node.children:
        nodes.extend(_walk(child))
    return nodes


def _calls_module(node: cst.CSTNode, attribute: str) -> bool:
    """Whether ``node`` holds a call of ``self.<attribute>``."""
    return any(isinstance(item, cst.Call) and _self_attribute(item.func) == attribute for item in _walk(node))


class _Rewriter(cst.CSTTransformer):
    """Applies the edits inside the classes they name; other classes and module-level code are not entered."""

    def __init__(self, edits: Sequence[Edit], constructors: dict[tuple[str, str], Constructor], lines: Spans,
                 module_names: frozenset[str] = frozenset(),
                 width_aliases: Mapping[str, Mapping[str, str]] | None = None) -> None:
        super().__init__()
        self.edits = list(edits)
        self.module_names = module_names
        self.width_aliases = dict(width_aliases or {})  # per class: attributes that hold hidden_size
        self.edited_classes = {edit.class_name for edit in edits}
        self.constructors = constructors
        self.lines = lines
        self.applied: Counter[Edit] = Counter({edit: 0 for edit in edits})
        self.classes: list[str] = []
        self.functions: list[str] = []
        self.parameters: list[list[str]] = []  # each enclosing function's parameter names
        self.statement_lines: list[tuple[int, int]] = []
        self.additions: list[bool] = []
        self.before_statement: list[str] = []  # statements to insert before the one being left
        self.loop_variables: list[str | None] = []  # the name each enclosing ``for`` binds (XLM's index ``i``)

    # -- context ---------------------------------------------------------------------
    def visit_ClassDef(self, node: cst.ClassDef) -> bool:
        self.classes.append(node.name.value)
        return node.name.value in self.edited_classes

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef) -> cst.ClassDef:
        self.classes.pop()
        return updated

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        self.functions.append(node.name.value)
        self.parameters.append([parameter.name.value for parameter in node.params.params])
        return bool(self.classes)  # a module-level function holds nothing to edit

    def visit_For(self, node: cst.For) -> None:
        self.loop_variables.append(node.target.value if isinstance(node.target, cst.Name) else None)

    def leave_For(self, original: cst.For, updated: cst.For) -> cst.For:
        self.loop_variables.pop()
        return updated

    def _index(self) -> str | None:
        """The index of the innermost loop: what ``self.<list>.*`` calls its items by."""
        return self.loop_variables[-1] if self.loop_variables else None

    def visit_SimpleStatementLine(self, node: cst.SimpleStatementLine) -> None:
        self.statement_lines.append(self.lines.get(id(node), (0, -1)))  # no span: only class-wide edits wanted

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine, updated: cst.SimpleStatementLine
                                  ) -> cst.BaseStatement | cst.RemovalSentinel | cst.FlattenSentinel:
        variant = next((edit for edit in self.edits if isinstance(edit, VariantStatement) and self._here(edit)), None)
        if variant is not None:
            self.statement_lines.pop()
            self.applied[variant] += 1
            return self._dispatched(original, variant)
        dropped = next((edit for edit in self.edits if isinstance(edit, DropStatement) and self._here(edit)), None)
        normalised = self._normalised_after_item_add(updated) if dropped is None else None
        self.statement_lines.pop()
        if dropped is not None:  # ``pass`` keeps a block that held only this statement valid
            self.applied[dropped] += 1
            return cst.SimpleStatementLine([cst.Pass()], leading_lines=updated.leading_lines,
                                           trailing_whitespace=cst.TrailingWhitespace(
                                               whitespace=cst.SimpleWhitespace("  "),
                                               comment=cst.Comment(f"# normswap: {dropped.why}")))
        if normalised is not None:
            return normalised
        if original is not updated and all(_is_self_assignment(small) for small in updated.body):
            return cst.RemoveFromParent()  # `x = self.norm(x)` became `x = x`
        if self.before_statement:  # a ReadAfterBranch names the stream its branch reads, just before
            added = [cst.parse_statement(line + "\n") for line in self.before_statement]
            self.before_statement = []
            return cst.FlattenSentinel([*added, updated])
        return updated

    def _dispatched(self, statement: cst.SimpleStatementLine, variant: VariantStatement) -> cst.If:
        """``if <guard>: <the statement as one variant's edits make it> elif ... else ...``: each variant's edits
        applied to the original statement by a rewriter of their own, in this one's context, exactly once each."""
        cases = []
        for guard, edits in variant.cases:
            nested = _Rewriter(edits, self.constructors, self.lines, self.module_names, self.width_aliases)
            nested.classes, nested.functions = list(self.classes), list(self.functions)
            nested.parameters, nested.loop_variables = list(self.parameters), list(self.loop_variables)
            edited = statement.visit(nested)
            missed = [edit for edit in edits if nested.applied[edit] != 1]
            if missed:
                raise CodegenError(f"the statement at line {variant.line} of {variant.class_name} did not take the "
                                   f"edits of its variant {guard} ({', '.join(map(str, missed))})")
            if isinstance(edited, cst.RemovalSentinel):  # ``x = self.norm(x)`` became ``x = x``: nothing
                body: list[cst.BaseStatement] = [cst.SimpleStatementLine([cst.Pass()])]
            elif isinstance(edited, cst.FlattenSentinel):  # statements added before it (``ReadAfterBranch``)
                body = list(edited.nodes)
            else:
                body = [edited]
            body[0] = body[0].with_changes(leading_lines=())
            cases.append((guard, body))
        otherwise: cst.If | cst.Else = cst.Else(cst.IndentedBlock(cases[-1][1]))
        for guard, body in reversed(cases[:-1]):
            otherwise = cst.If(cst.parse_expression(guard), cst.IndentedBlock(body), otherwise)
        assert isinstance(otherwise, cst.If)  # a variant statement has two cases or more
        return otherwise.with_changes(leading_lines=statement.leading_lines)

    def _normalised_after_item_add(self, statement: cst.SimpleStatementLine) -> cst.FlattenSentinel | None:
        """``h[m] += F`` adds to the stream in place, with no sum to wrap: a ``WrapResidualAdd`` there normalises
        the whole stream after the statement, ``h = self.<norm>(h)``."""
        if len(statement.body) != 1 or not isinstance(small := statement.body[0], cst.AugAssign):
            return None
        target = small.target
        if not (isinstance(small.operator, cst.AddAssign) and isinstance(target, cst.Subscript)
                and isinstance(target.value, cst.Name)):
            return None
        for edit in self.edits:
            if isinstance(edit, WrapResidualAdd) and not edit.call and self._here(edit):
                self.applied[edit] += 1
                stream = target.value.value
                return cst.FlattenSentinel([statement, cst.parse_statement(f"{stream} = self.{edit.norm}({stream})\n")])
        return None

    def _here(self, edit: Edit) -> bool:
        if not self.classes or self.classes[-1] != edit.class_name:
            return False
        line = getattr(edit, "line", None)
        if line is None:
            return True
        return bool(self.statement_lines) and self.statement_lines[-1][0] <= line <= self.statement_lines[-1][1]

    # -- expressions -----------------------------------------------------------------
    def visit_BinaryOperation(self, node: cst.BinaryOperation) -> None:
        self.additions.append(isinstance(node.operator, cst.Add))

    def leave_BinaryOperation(self, original: cst.BinaryOperation,
                              updated: cst.BinaryOperation) -> cst.BaseExpression:
        is_add = self.additions.pop()
        inside_add = any(self.additions)
        if not is_add or inside_add:
            return updated
        updated = self._wrapped_terms(original, updated)
        for edit in self.edits:
            if isinstance(edit, WrapResidualAdd) and not edit.call and self._here(edit):
                self.applied[edit] += 1
                return _self_call(edit.norm, updated.with_changes(lpar=[], rpar=[]), self._index())
            if isinstance(edit, ReplaceResidualAdd) and not edit.helper and self._here(edit):
                self.applied[edit] += 1
                return cst.parse_expression(edit.expression)
        return updated

    def _wrapped_terms(self, original: cst.BinaryOperation, add: cst.BinaryOperation) -> cst.BinaryOperation:
        """The add with each term a ``WrapBranchOutput`` here names wrapped in its norm. A term is known by its text
        as written or as other edits of this statement left it: ModernBERT's ``self.mlp(self.mlp_norm(h))`` is
        ``self.mlp(h)`` once its pre norm is dropped, in the same conversion that puts an out norm around it."""
        wanted = {edit.term: edit for edit in self.edits
                  if isinstance(edit, WrapBranchOutput) and not edit.helper and self._here(edit)}
        if not wanted:
            return add

        def is_add(node: cst.BaseExpression) -> bool:
            return isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.Add)

        def wrap(written: cst.BaseExpression | None, node: cst.BaseExpression) -> cst.BaseExpression:
            if is_add(node):
                assert isinstance(node, cst.BinaryOperation)
                sides = (written.left, written.right) if written is not None and is_add(written) else (None, None)
                return node.with_changes(left=wrap(sides[0], node.left), right=wrap(sides[1], node.right))
            edit = wanted.get(_normalised(node)) or (wanted.get(_normalised(written)) if written is not None else None)
            if edit is None:
                return node
            self.applied[edit] += 1
            return _self_call(edit.norm, node.with_changes(lpar=[], rpar=[]), self._index())

        return wrap(original, add)

    def _wrapped_arguments(self, call: cst.Call, helper: str | None) -> cst.Call:
        """The call of a module-level helper that adds, with each argument a ``WrapBranchOutput`` here names wrapped
        in its norm."""
        wanted = {edit.term: edit for edit in self.edits
                  if isinstance(edit, WrapBranchOutput) and edit.helper == helper and self._here(edit)}
        replaced = {edit.argument: edit for edit in self.edits
                    if isinstance(edit, ReplaceResidualAdd) and edit.helper and edit.helper == helper
                    and self._here(edit)}
        if not wanted and not replaced:
            return call
        arguments = []
        for argument in call.args:
            written = _normalised(argument.value)
            edit = wanted.get(written)
            if edit is not None:
                self.applied[edit] += 1
                argument = argument.with_changes(value=_self_call(edit.norm, argument.value, self._index()))
            replacement = replaced.get(written)
            if replacement is not None:
                self.applied[replacement] += 1
                argument = argument.with_changes(value=cst.parse_expression(replacement.expression))
            arguments.append(argument)
        return call.with_changes(args=arguments)

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        callee = _self_attribute(updated.func)
        if callee is None:
            helper = updated.func.value if isinstance(updated.func, cst.Name) else None
            for edit in self.edits:
                if isinstance(edit, WrapResidualAdd) and edit.call and edit.call == helper and self._here(edit):
                    self.applied[edit] += 1
                    return _self_call(edit.norm, updated)
            updated = self._wrapped_arguments(updated, helper)
            return self._build_directly(updated)
        for edit in self.edits:
            if (isinstance(edit, ReplaceNormClass) and edit.item_class and self._here(edit)
                    and callee in {f"{edit.norm}.{grow}" for grow in _LIST_GROWTH}
                    and self.functions and self.functions[-1] == "__init__"):
                # ``self.norms.append(Norm(...))`` in the loop that builds a list
                wrapped = _ItemCalls(edit.item_class, lambda call, edit=edit: _like_call(edit, call))
                arguments = [arg.visit(wrapped) for arg in updated.args]
                if wrapped.seen:
                    self.applied[edit] += 1
                    return updated.with_changes(args=arguments)
            if isinstance(edit, WrapResidualAdd) and edit.call == f"self.{callee}" and self._here(edit):
                self.applied[edit] += 1  # the add is inside the called module (caller_adds)
                if edit.item is not None:  # it returns the sum as one item of a tuple
                    return cst.parse_expression(f"normswap_norm_item(self.{edit.norm}, {_code(updated)}, "
                                                f"{edit.item})")
                return _self_call(edit.norm, updated)
            if (isinstance(edit, AddOutputProjection) and edit.norm == callee and self._here(edit)
                    and self.functions and self.functions[-1] == "forward"):
                self.applied[edit] += 1
                if edit.input_map:
                    inner = updated.args[0].with_changes(value=_self_call(edit.input_map, updated.args[0].value))
                    updated = updated.with_changes(args=[inner, *updated.args[1:]])
                return _self_call(edit.attribute, updated)
            if (isinstance(edit, UnwrapNormCall) and edit.norm == callee and self._here(edit)
                    and not (edit.branch and _calls_module(updated.args[0].value, edit.branch))):
                self.applied[edit] += 1
                return updated.args[0].value
            if (isinstance(edit, UnwrapModelNorm) and edit.norm == callee and self._here(edit)
                    and self.functions and self.functions[-1] == "forward"):
                self.applied[edit] += 1
                return updated.args[0].value
            if isinstance(edit, WrapBranchInput) and edit.branch == callee and self._here(edit):
                self.applied[edit] += 1
                return _wrap_first_argument(updated, edit.norm, self._index())
            if isinstance(edit, ReadAfterBranch) and edit.branch == callee and self._here(edit):
                self.applied[edit] += 1
                self.before_statement.append(f"{edit.variable} = {edit.stream}")
                reading = cst.parse_expression(f"self.{edit.norm}({edit.variable})")
                if edit.through:
                    return _substitute_in_first_argument(updated, edit.through, reading)
                return _replace_first_argument(updated, reading)
            if (isinstance(edit, CentreNormInput) and edit.norm == callee and self._here(edit)
                    and self.functions and self.functions[-1] == "forward"):
                self.applied[edit] += 1
                return _centre_first_argument(updated, edit.axis)
        return updated

    def _build_directly(self, call: cst.Call) -> cst.Call:
        """``AutoModel.from_config(...)`` -> ``<Class>._from_config(...)`` where a ``BuildSubmodelDirectly`` says."""
        func = call.func
        if not (isinstance(func, cst.Attribute) and func.attr.value == "from_config"
                and isinstance(func.value, cst.Name)):
            return call
        for edit in self.edits:
            if isinstance(edit, BuildSubmodelDirectly) and edit.auto_class == func.value.value and self._here(edit):
                self.applied[edit] += 1
                return call.with_changes(func=cst.Attribute(value=cst.Name(edit.model_class),
                                                            attr=cst.Name("_from_config")))
        return call

    # -- statements ------------------------------------------------------------------
    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        if not self.functions or self.functions[-1] != "__init__" or len(updated.targets) != 1:
            return updated
        attribute = _self_attribute(updated.targets[0].target)
        for edit in self.edits:
            if (isinstance(edit, BuildNormAlways) and edit.norm == attribute and self._here(edit)
                    and isinstance(updated.value, cst.IfExp)):
                chosen = _besides_identity(updated.value)
                if chosen is not None:  # `Norm(...) if layer_idx != 0 else nn.Identity()`
                    self.applied[edit] += 1
                    return updated.with_changes(value=chosen)
            if (isinstance(edit, BuildNormAlways) and edit.norm == attribute and self._here(edit)
                    and _builds_identity(updated.value)):
                constructor = self.constructors.get((edit.class_name, edit.norm))
                if constructor is None or constructor.settings:
                    raise CodegenError(f"{edit.class_name}.__init__ builds self.{edit.norm} as an Identity and by "
                                       "no single constructor call otherwise, so a norm cannot be built in its place")
                self.applied[edit] += 1
                return updated.with_changes(value=cst.parse_expression(constructor.call))
            if isinstance(edit, BuildAtSourceWidth) and edit.attribute == attribute and self._here(edit):
                self.applied[edit] += 1
                return updated.with_changes(value=self._built_at_source_width(updated.value, edit))
            if isinstance(edit, SizeByInnerWidth) and edit.attribute == attribute and self._here(edit):
                self.applied[edit] += 1
                reads = _InnerWidthReads(edit.occurrences, self.width_aliases.get(edit.class_name, {}))
                return updated.with_changes(value=updated.value.visit(reads))
            if isinstance(edit, NeutraliseNorm) and edit.norm == attribute and self._here(edit) and edit.item_class:
                removed = _ItemCalls(edit.item_class, lambda call, edit=edit: cst.parse_expression(
                    f"NormswapRemovedNorm({edit.parameters!r})"))  # ``nn.ModuleList([Norm(...) for ...])``
                value = updated.value.visit(removed)
                if removed.seen:
                    self.applied[edit] += 1
                    return updated.with_changes(value=value)
            if isinstance(edit, NeutraliseNorm) and edit.norm == attribute and self._here(edit):
                self.applied[edit] += 1
                return updated.with_changes(value=cst.parse_expression(f"NormswapRemovedNorm({edit.parameters!r})"))
            if isinstance(edit, ReplaceNormClass) and edit.item_class and edit.norm == attribute and self._here(edit):
                wrapped = _ItemCalls(edit.item_class, lambda call, edit=edit: _like_call(edit, call))
                value = updated.value.visit(wrapped)
                if wrapped.seen:
                    self.applied[edit] += 1
                    return updated.with_changes(value=value)
            if (isinstance(edit, ReplaceNormClass) and not edit.item_class and edit.norm == attribute
                    and self._here(edit)
                    and (isinstance(updated.value, cst.Call) or (edit.wrap and isinstance(updated.value, cst.IfExp)))):
                self.applied[edit] += 1
                # with ``wrap`` the norm as written (normswap's own ``.like`` call, or a conditional choosing the
                # norm class, too) is built and wrapped; without, its arguments are kept, which a ``.like`` call's
                # are not
                if edit.wrap:  # ``New.like(Original(args), keywords)``: any family's constructor arguments
                    return updated.with_changes(value=_like_call(edit, updated.value))
                extra = _keyword_arguments(edit.keywords)
                call = _unwrap_like(updated.value)
                keep = [arg for arg in call.args if not (arg.keyword and arg.keyword.value in dict(edit.keywords))]
                return updated.with_changes(value=call.with_changes(func=cst.Name(edit.new_class), args=keep + extra))
        return updated

    def _built_at_source_width(self, value: cst.BaseExpression, edit: BuildAtSourceWidth) -> cst.BaseExpression:
        """``normswap_lifted_projector(lambda <config>: <value>, <config>, <scale>)``: the lambda rebinds
        ``__init__``'s config, so every read of it in ``value`` reads the copy at the source's width."""
        parameters = self.parameters[-1]
        if len(parameters) < 2:
            raise CodegenError(f"{edit.class_name}.__init__ takes no config to build self.{edit.attribute} from")
        config = parameters[1]
        return cst.parse_expression(f"normswap_lifted_projector(lambda {config}: {_code(value)}, {config}, "
                                    f"{edit.scale!r})")

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        name = self.functions.pop()
        self.parameters.pop()
        for edit in self.edits:
            if isinstance(edit, AddStackNorm) and self._here(edit):
                if name == "__init__":
                    updated = self._add_module(updated, edit)
                elif name == "forward":
                    updated = self._add_call(updated, edit)
            if isinstance(edit, AddLayerNorm) and self._here(edit) and name == "__init__":
                updated = self._add_beside(updated, edit)
            if isinstance(edit, GiveBias) and self._here(edit) and name == "__init__":
                updated = self._give_bias(updated, edit)
            if isinstance(edit, AddOutputProjection) and self._here(edit) and name == "__init__":
                updated = self._add_linear_map(updated, edit, edit.norm)
                if edit.input_map:
                    updated = self._add_linear_map(updated, edit, edit.norm, (edit.input_map, edit.input_widths))
            if isinstance(edit, AddStackProjection) and self._here(edit):
                if name == "__init__":
                    updated = self._add_linear_map(updated, edit, edit.stack_attribute)
                elif name == "forward":
                    updated = self._insert_at_loop(updated, edit.stack_attribute, edit.where, None,
                                                   f"{{stream}} = self.{edit.attribute}({{stream}})")
            if isinstance(edit, CentreStream) and self._here(edit) and name == "forward":
                centre = f"{{stream}} = {{stream}} - {{stream}}.mean({edit.channel_axis}, keepdim=True)"
                if edit.per_stage:
                    updated = insert_at_stage_loop(updated, edit.stack_attribute, "before", centre, _stream_variable)
                    self.applied[edit] += 1
                else:
                    updated = self._insert_at_loop(updated, edit.stack_attribute, "before", edit, centre)
        return updated

    def _add_linear_map(self, function: cst.FunctionDef, edit: AddOutputProjection | AddStackProjection,
                        after: str, named: tuple[str, tuple[str, str]] | None = None) -> cst.FunctionDef:
        """The fixed map's constructor right after ``self.<after> = ...``, sized from ``__init__``'s config;
        ``named``: another map's attribute and widths than the edit's own."""
        attribute, widths = named or (edit.attribute, edit.widths)
        parameters = [parameter.name.value for parameter in function.params.params]
        if len(parameters) < 2 and any("{config}" in width for width in widths):
            raise CodegenError(f"{edit.class_name}.__init__ takes no config to size {attribute} from")
        source, target = (width.format(config=parameters[1] if len(parameters) > 1 else "") for width in widths)
        body = list(function.body.body)
        for index, statement in enumerate(body):
            if _assigns(statement, after):
                body.insert(index + 1, cst.parse_statement(
                    f"self.{attribute} = torch.nn.Linear({source}, {target}, bias=False)\n"))
                if isinstance(edit, AddStackProjection):
                    self.applied[edit] += 1
                return function.with_changes(body=function.body.with_changes(body=body))
        raise CodegenError(f"{edit.class_name}.__init__ does not assign self.{after} in its own body")

    def _give_bias(self, function: cst.FunctionDef, edit: GiveBias) -> cst.FunctionDef:
        """``normswap_give_bias(self.<attribute>)`` after each statement that builds it, in whichever branch of an
        ``if`` does."""
        body = list(function.body.body)
        given = [cst.parse_statement(f"normswap_give_bias(self.{edit.attribute})\n")]
        for index, statement in enumerate(body):
            if _assigns_within(statement, edit.attribute):
                body[index:index + 1] = _inserted_after(statement, edit.attribute, given)
                self.applied[edit] += 1
                return function.with_changes(body=function.body.with_changes(body=body))
        raise CodegenError(f"{edit.class_name}.__init__ does not assign self.{edit.attribute} in its own body, so "
                           "the generated code cannot give it a bias")

    def _add_module(self, function: cst.FunctionDef, edit: AddStackNorm) -> cst.FunctionDef:
        if edit.per_stage:
            return self._add_stage_norms(function, edit)
        return self._add_copied_constructor(function, edit, (edit.copy_from, edit.copy_attribute),
                                            edit.stack_attribute)

    def _add_stage_norms(self, function: cst.FunctionDef, edit: AddStackNorm) -> cst.FunctionDef:
        """``self.<norm> = torch.nn.ModuleList([<a fresh copy of each stage's first layer's norm>])`` in ``__init__``
        after the stages' lists are built: each stage's norm has that stage's width, which no one constructor of the
        loop's class writes."""
        body = list(function.body.body)
        for index, statement in enumerate(body):
            if _assigns(statement, edit.stack_attribute):
                body.insert(index + 1, cst.parse_statement(
                    f"self.{edit.norm} = torch.nn.ModuleList([normswap_fresh_copy(stage[0].{edit.copy_attribute}) "
                    f"for stage in self.{edit.stack_attribute}])\n"))
                self.applied[edit] += 1
                return function.with_changes(body=function.body.with_changes(body=body))
        raise CodegenError(f"{edit.class_name}.__init__ does not assign self.{edit.stack_attribute} in its own body")

    def _add_beside(self, function: cst.FunctionDef, edit: AddLayerNorm) -> cst.FunctionDef:
        if edit.copy_from and edit.copy_from != edit.class_name:
            return self._add_copied_constructor(function, edit, (edit.copy_from, edit.copy_attribute),
                                                _last_module_assigned(function, edit.class_name))
        return self._add_copied_constructor(function, edit, (edit.class_name, edit.copy_attribute),
                                            edit.copy_attribute)

    def _add_copied_constructor(self, function: cst.FunctionDef, edit: AddStackNorm | AddLayerNorm,
                                copied: tuple[str, str], after: str) -> cst.FunctionDef:
        """``self.<edit.norm> = <the constructor of copied = (class, attribute)>`` in ``__init__``, right after
        the statement that assigns ``self.<after>``."""
        constructor = self.constructors.get(copied)
        if constructor is None:
            raise CodegenError(f"no `self.{copied[1]} = ...` in {copied[0]}.__init__ to copy")
        body = list(function.body.body)
        for index, statement in enumerate(body):
            if _assigns_within(statement, after):
                added = [cst.parse_statement(line) for line in constructor.statements(edit.norm)]
                if isinstance(edit, AddLayerNorm) and edit.new_class:
                    if constructor.settings:
                        raise CodegenError(f"{copied[0]}.{copied[1]} is built by a call and then changed, so "
                                           f"{edit.new_class}.like cannot take it as one expression")
                    keywords = "".join(f", {name}={value}" for name, value in edit.keywords)
                    added = [cst.parse_statement(f"self.{edit.norm} = {edit.new_class}.like({constructor.call}"
                                                 f"{keywords})\n")]
                known = self.module_names | bound_names(function, body[:index + 1]) | {getattr(edit, "new_class", "")}
                unbound = sorted({name for node in added for name in read_names(node)} - known)
                if unbound and isinstance(edit, AddStackNorm) and edit.copy_from_layers:
                    added = [cst.parse_statement(f"self.{edit.norm} = normswap_fresh_copy("
                                                 f"self.{edit.stack_attribute}[0].{edit.copy_attribute})")]
                elif unbound:
                    raise CodegenError(f"{copied[0]}.{copied[1]} is built from {', '.join(unbound)}, which "
                                       f"{edit.class_name}.__init__ does not define, so its constructor cannot be "
                                       f"copied there for the new norm {edit.norm}")
                body[index:index + 1] = _inserted_after(statement, after, added)
                self.applied[edit] += 1
                return function.with_changes(body=function.body.with_changes(body=body))
        raise CodegenError(f"{edit.class_name}.__init__ does not assign self.{after} in its own body")

    def _add_call(self, function: cst.FunctionDef, edit: AddStackNorm) -> cst.FunctionDef:
        axis = edit.channel_axis
        norm = f"self.{edit.norm}[{{index}}]" if edit.per_stage else f"self.{edit.norm}"
        call = (f"{norm}({{stream}})" if axis == -1
                else f"{norm}({{stream}}.movedim({axis}, -1)).movedim(-1, {axis})")
        if edit.per_stage:
            return insert_at_stage_loop(function, edit.stack_attribute, edit.where, f"{{stream}} = {call}",
                                        _stream_variable)
        return self._insert_at_loop(function, edit.stack_attribute, edit.where, None, f"{{stream}} = {call}")

    def _insert_at_loop(self, function: cst.FunctionDef, stack_attribute: str, where: str, edit: Edit | None,
                        template: str) -> cst.FunctionDef:
        """Insert ``template`` (with ``{stream}``, the variable the loop passes to each layer) at the layer loop."""
        body = list(function.body.body)
        for index, statement in enumerate(body):
            if isinstance(statement, cst.For) and (f"self.{stack_attribute}" in _code(statement.iter)
                                                   or _indexes(statement, stack_attribute)):
                line = template.format(stream=_stream_variable(statement, stack_attribute))
                body.insert(index if where == "before" else index + 1, cst.parse_statement(line + "\n"))
                if edit is not None:
                    self.applied[edit] += 1
                return function.with_changes(body=function.body.with_changes(body=body))
        raise CodegenError(f"{function.name.value} runs its layers without a `for ... in self.{stack_attribute}` loop "
                           "(ALBERT runs one shared layer group again and again), so the generated code has no "
                           "one place before or after the layers for the stack norm this layout moves there")


_LIST_GROWTH = ("append", "extend", "insert")  # how an ``__init__`` fills a ``nn.ModuleList()`` it built empty


class _ItemCalls(cst.CSTTransformer):
    """Every ``<item_class>(...)`` call -> ``replace(call)``: the norms a module list's constructor expression builds
    (``ReplaceNormClass`` with ``item_class`` wraps each, ``NeutraliseNorm`` with ``item_class`` removes each)."""

    def __init__(self, item_class: str, replace: Callable[[cst.Call], cst.BaseExpression]) -> None:
        super().__init__()
        self.item_class, self.replace, self.seen = item_class, replace, 0

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        if _code(updated.func).rpartition(".")[2] != self.item_class:
            return updated
        self.seen += 1
        return self.replace(updated)


def _like_call(edit: ReplaceNormClass, built: cst.BaseExpression) -> cst.Call:
    """``<new_class>.like(<built>, keywords)``: the norm as its code builds it, handed to normswap's class."""
    like = cst.Attribute(value=cst.Name(edit.new_class), attr=cst.Name("like"))
    return cst.Call(func=like, args=[cst.Arg(value=built), *_keyword_arguments(edit.keywords)])


def _keyword_arguments(keywords: tuple[tuple[str, str], ...]) -> list[cst.Arg]:
    """``name=value`` arguments from (name, source text) pairs."""
    return [cst.Arg(keyword=cst.Name(name), value=cst.parse_expression(value),
                    equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace("")))
            for name, value in keywords]


def config_width_reads(source: str, class_name: str, attribute: str) -> int:
    """How many ``<config>.hidden_size`` reads (or reads of an attribute that holds it) the ``self.<attribute> =
    ...`` of ``class_name.__init__`` holds (``SizeByInnerWidth`` numbers them in this order); 0 where there is no
    such assignment."""
    module = cst.parse_module(source)
    aliases = _width_aliases(module).get(class_name, {})
    for statement in module.body:
        if not isinstance(statement, cst.ClassDef) or statement.name.value != class_name:
            continue
        for item in statement.body.body:
            if isinstance(item, cst.FunctionDef) and item.name.value == "__init__":
                for node in _walk(item):
                    if (isinstance(node, cst.Assign) and len(node.targets) == 1
                            and _self_attribute(node.targets[0].target) == attribute):
                        counter = _InnerWidthReads((), aliases)
                        node.value.visit(counter)
                        return counter.seen
    return 0


def _width_aliases(module: cst.Module) -> dict[str, dict[str, str]]:
    """For each class, the attributes its ``__init__`` sets to ``<config>.hidden_size`` and nothing else (CLIP-style
    attention's ``self.embed_dim = config.hidden_size``), each with the config expression it read: a read of
    ``self.<alias>`` is a read of hidden_size, which ``SizeByInnerWidth`` may choose as the inner width too."""
    found: dict[str, dict[str, str]] = {}
    for statement in module.body:
        if not isinstance(statement, cst.ClassDef):
            continue
        for item in statement.body.body:
            if not (isinstance(item, cst.FunctionDef) and item.name.value == "__init__"):
                continue
            for node in _walk(item):
                if (isinstance(node, cst.Assign) and len(node.targets) == 1
                        and (alias := _self_attribute(node.targets[0].target)) and "." not in alias
                        and isinstance(node.value, cst.Attribute) and node.value.attr.value == "hidden_size"
                        and _code(node.value.value).endswith("config")):
                    found.setdefault(statement.name.value, {})[alias] = _code(node.value.value)
    return found


class _InnerWidthReads(cst.CSTTransformer):
    """``<config>.hidden_size`` (or ``self.<alias>`` that holds it) -> ``<config>.normswap_inner_width`` at the
    numbered reads (``SizeByInnerWidth``)."""

    def __init__(self, occurrences: Sequence[int], aliases: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.occurrences, self.seen, self.aliases = frozenset(occurrences), 0, dict(aliases or {})

    def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute) -> cst.BaseExpression:
        alias = _code(updated.value) == "self" and updated.attr.value in self.aliases
        if not alias and (updated.attr.value != "hidden_size" or not _code(updated.value).endswith("config")):
            return updated
        self.seen += 1
        if self.seen - 1 not in self.occurrences:
            return updated
        if alias:
            return cst.parse_expression(f"{self.aliases[updated.attr.value]}.{INNER_WIDTH_FIELD}")
        return updated.with_changes(attr=cst.Name(INNER_WIDTH_FIELD))


def _is_self_assignment(statement: cst.BaseSmallStatement) -> bool:
    return (isinstance(statement, cst.Assign) and len(statement.targets) == 1
            and isinstance(statement.targets[0].target, cst.Name) and isinstance(statement.value, cst.Name)
            and statement.targets[0].target.value == statement.value.value)


def _last_module_assigned(function: cst.FunctionDef, class_name: str) -> str:
    """The attribute of the last ``self.<attribute> = ...`` statement in ``__init__``'s own body."""
    for statement in reversed(function.body.body):
        if isinstance(statement, cst.SimpleStatementLine):
            for small in statement.body:
                if isinstance(small, cst.Assign) and len(small.targets) == 1:
                    attribute = _self_attribute(small.targets[0].target)
                    if attribute and "." not in attribute:
                        return attribute
    raise CodegenError(f"{class_name}.__init__ assigns no module in its own body, so there is no place to build a "
                       "new norm in")


def _assigns(statement: cst.CSTNode, attribute: str) -> bool:
    if not isinstance(statement, cst.SimpleStatementLine):
        return False
    return any(isinstance(small, cst.Assign) and any(_self_attribute(t.target) == attribute for t in small.targets)
               for small in statement.body)


def _assigns_within(statement: cst.CSTNode, attribute: str) -> bool:
    """Whether ``statement`` assigns ``self.<attribute>``, itself or in a branch of its ``if`` (Falcon builds
    ``input_layernorm`` or ``ln_attn`` and ``ln_mlp`` by its config)."""
    return _assigns(statement, attribute) or (isinstance(statement, cst.If) and any(
        _assigns_within(inner, attribute) for inner in _branch_statements(statement)))


def _branch_statements(statement: cst.If) -> list[cst.BaseStatement]:
    inner = list(statement.body.body)
    if isinstance(statement.orelse, cst.If):
        inner.append(statement.orelse)
    elif isinstance(statement.orelse, cst.Else):
        inner += list(statement.orelse.body.body)
    return inner


def _inserted_after(statement: cst.BaseStatement, attribute: str, added: list[cst.BaseStatement]
                    ) -> list[cst.BaseStatement]:
    """``statement``, with ``added`` right after each statement that assigns ``self.<attribute>``, in each branch of
    an ``if`` that does: the new module is built where, and only where, the one it copies is."""
    if _assigns(statement, attribute) or not isinstance(statement, cst.If):
        return [statement, *added]

    def within(block: cst.BaseSuite) -> cst.BaseSuite:
        assert isinstance(block, cst.IndentedBlock)  # an ``if`` that builds modules has an indented body
        inner: list[cst.BaseStatement] = []
        for item in block.body:
            inner += _inserted_after(item, attribute, added) if _assigns_within(item, attribute) else [item]
        return block.with_changes(body=inner)

    if any(_assigns_within(item, attribute) for item in statement.body.body):
        statement = statement.with_changes(body=within(statement.body))
    if isinstance(statement.orelse, cst.If) and _assigns_within(statement.orelse, attribute):
        statement = statement.with_changes(orelse=_inserted_after(statement.orelse, attribute, added)[0])
    elif isinstance(statement.orelse, cst.Else) and any(_assigns_within(item, attribute)
                                                        for item in statement.orelse.body.body):
        statement = statement.with_changes(orelse=statement.orelse.with_changes(body=within(statement.orelse.body)))
    return [statement]


def _indexes(loop: cst.For, attribute: str) -> bool:
    """Whether the loop runs its layers by index: its body calls ``self.<attribute>[<index>](...)``, by the loop's
    own index (XLM's ``for i in range(self.n_layers)`` over ``self.attentions[i]``) or by one computed from it
    (ALBERT's ``self.albert_layer_groups[group_idx]``, one shared group run on every pass): either way the statement
    after the loop runs once, after every layer."""
    return isinstance(loop.target, cst.Name) and any(
        isinstance(node, cst.Call) and _self_attribute(node.func) == f"{attribute}.*" for node in _walk(loop.body))


def _stream_variable(loop: cst.For, attribute: str = "") -> str:
    """The variable the loop body passes to each layer: the first argument of ``<target>(...)``, or of
    ``<target>.forward(...)`` (SqueezeBERT's encoder calls its layers' forward directly); in a loop by index, of
    the first ``self.<list>[<index>](...)`` that reads a variable, or of ``self.<attribute>[<any index>](...)``."""
    target = loop.target.elements[-1].value if isinstance(loop.target, cst.Tuple) else loop.target
    if not isinstance(target, cst.Name):
        raise CodegenError("the layer loop does not bind its layer to a name")
    for node in _walk(loop.body):
        if not isinstance(node, cst.Call) or not node.args or not isinstance(node.args[0].value, cst.Name):
            continue
        func = node.func.value if isinstance(node.func, cst.Attribute) and node.func.attr.value == "forward" else (
            node.func)
        if isinstance(func, cst.Name) and func.value == target.value:
            return node.args[0].value.value
        if _loop_index(node.func) == target.value and _self_attribute(node.func) is not None:
            return node.args[0].value.value
        if attribute and _self_attribute(node.func) == f"{attribute}.*":
            return node.args[0].value.value
    raise CodegenError(f"no call `{target.value}(hidden_states, ...)` in the layer loop")


def _unwrap_like(call: cst.Call) -> cst.Call:
    """``New.like(Original(args))`` (code normswap generated before) -> ``Original(args)``, the norm as written."""
    func = call.func
    if (isinstance(func, cst.Attribute) and func.attr.value == "like" and len(call.args) >= 1
            and isinstance(call.args[0].value, cst.Call)):
        return call.args[0].value
    return call


def _centre_first_argument(call: cst.Call, axis: int) -> cst.Call:
    """``f(x, ...)`` -> ``f(x - x.mean(axis, keepdim=True), ...)``; ``x`` is read twice, so it must be a name."""
    args = list(call.args)
    if not args or args[0].keyword is not None or not isinstance(args[0].value, (cst.Name, cst.Attribute)):
        raise CodegenError(f"the input of {_code(call.func)}(...) is not a plain variable, so it cannot be centred")
    value = _code(args[0].value)
    args[0] = args[0].with_changes(value=cst.parse_expression(f"{value} - {value}.mean({axis}, keepdim=True)"))
    return call.with_changes(args=args)


def _wrap_first_argument(call: cst.Call, norm: str, index: str | None = None) -> cst.Call:
    return _replace_first_argument(call, None, norm, index)


def _substitute_in_first_argument(call: cst.Call, name: str, value: cst.BaseExpression) -> cst.Call:
    """The call with every ``name`` in its input argument replaced by ``value`` (a variable, not an attribute's or
    a keyword's name that reads the same)."""
    class Substitute(cst.CSTTransformer):
        def leave_Name(self, original: cst.Name, updated: cst.Name) -> cst.BaseExpression:
            return value if updated.value == name else updated

        def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute) -> cst.Attribute:
            return updated.with_changes(attr=original.attr)

        def leave_Arg(self, original: cst.Arg, updated: cst.Arg) -> cst.Arg:
            return updated.with_changes(keyword=original.keyword)

    args = list(call.args)
    index = _input_position(call)
    args[index] = args[index].with_changes(value=args[index].value.visit(Substitute()))
    return call.with_changes(args=args)


def _input_position(call: cst.Call) -> int:
    """The index of the call's input among its arguments: the first positional one, else the first input keyword."""
    args = list(call.args)
    positional = [i for i, arg in enumerate(args) if arg.keyword is None and not arg.star]
    position = positional[0] if positional else next(  # FSMT passes its attention's input as ``query=``
        (i for i, arg in enumerate(args) if arg.keyword and arg.keyword.value in INPUT_KEYWORDS), None)
    if position is None:
        raise CodegenError(f"cannot find the input of {_code(call.func)}(...) to wrap")
    return position


def _replace_first_argument(call: cst.Call, value: cst.BaseExpression | None, norm: str = "",
                            index: str | None = None) -> cst.Call:
    """The call with its input argument replaced by ``value``, or (``value`` None) wrapped in ``self.<norm>``
    (a norm that is an item of a module list by the loop's ``index``: ``self.<list>[index]``)."""
    args = list(call.args)
    position = _input_position(call)
    args[position] = args[position].with_changes(
        value=value if value is not None else _self_call(norm, args[position].value, index))
    return call.with_changes(args=args)
