"""Code before or after one stage's layers, where one loop over stages runs every stage's layer list.

GLPN and PVT keep their stages' layer lists in one list (``self.block``) and run them from one forward::

    for idx, x in enumerate(zip(self.patch_embeddings, self.block, self.layer_norm)):
        embedding_layer, block_layer, norm_layer = x
        hidden_states, height, width = embedding_layer(hidden_states)
        for i, blk in enumerate(block_layer):
            ...

No module holds one stage, so a norm of each stage is an item of a module list, picked by the stage loop's index,
and its call goes just before or after the inner loop (the loop over the stage's layers), inside the stage loop.
"""

from __future__ import annotations

from collections.abc import Callable

import libcst as cst

from .derive import CodegenError

_EMPTY = cst.Module(body=[])


class StageLoopError(CodegenError):
    """The forward has no loop over stages whose body runs one stage's layers in a loop of its own."""


def insert_at_stage_loop(function: cst.FunctionDef, stack_attribute: str, where: str, template: str,
                         stream_of: Callable[[cst.For], str]) -> cst.FunctionDef:
    """``function`` with ``template`` (``{stream}``: the variable the inner loop passes to each layer; ``{index}``:
    the stage loop's index) inserted ``where`` ("before" or "after") the inner loop of the loop over
    ``self.<stack_attribute>``."""
    body = list(function.body.body)
    for position, statement in enumerate(body):
        if not (isinstance(statement, cst.For) and f"self.{stack_attribute}" in _code(statement.iter)):
            continue
        index, stage = _stage_names(statement, stack_attribute)
        inner = list(statement.body.body)
        for at, candidate in enumerate(inner):
            if isinstance(candidate, cst.For) and stage in _names(candidate.iter):
                stream = stream_of(candidate)
                if stream not in _handed_on(candidate):
                    raise StageLoopError(f"the layers of self.{stack_attribute} read {stream}, which is not what they "
                                         "hand on from one layer to the next, so a norm of it before or after a "
                                         "stage's layers would not be a norm of the stream")
                line = template.format(stream=stream, index=index)
                inner.insert(at if where == "before" else at + 1, cst.parse_statement(line + "\n"))
                body[position] = statement.with_changes(body=statement.body.with_changes(body=inner))
                return function.with_changes(body=function.body.with_changes(body=body))
        raise StageLoopError(f"the loop over self.{stack_attribute} in {function.name.value} runs no loop over "
                             f"{stage}, one stage's layers, in its own body, so there is no one place before or after "
                             "a stage's layers for the norm this layout puts there")
    raise StageLoopError(f"{function.name.value} runs no `for` loop over self.{stack_attribute}, so there is no one "
                         "place before or after a stage's layers for the norm this layout puts there")


def _stage_names(loop: cst.For, stack_attribute: str) -> tuple[str, str]:
    """(the name the loop binds to the stage's position, the name it binds to the stage's layer list), through
    ``enumerate`` and ``zip`` and a tuple the body unpacks (GLPN's ``embedding_layer, block_layer, norm_layer = x``)."""
    iterated, target = loop.iter, loop.target
    if not (_called(iterated, "enumerate") and isinstance(target, cst.Tuple) and len(target.elements) == 2
            and isinstance(target.elements[0].value, cst.Name)):
        raise StageLoopError(f"the loop over self.{stack_attribute} binds no index (no `enumerate`), by which each "
                             "stage would pick its own norm from a list of them")
    index = target.elements[0].value.value
    iterated, item = iterated.args[0].value, target.elements[1].value
    if _code(iterated) == f"self.{stack_attribute}" and isinstance(item, cst.Name):
        return index, item.value
    if _called(iterated, "zip"):
        lists = [_code(arg.value) for arg in iterated.args]
        if f"self.{stack_attribute}" in lists:
            unpacked = _unpacked(loop, item)
            column = lists.index(f"self.{stack_attribute}")
            if unpacked is not None and len(unpacked.elements) == len(lists):
                stage = unpacked.elements[column].value
                if isinstance(stage, cst.Name):
                    return index, stage.value
    raise StageLoopError(f"the loop over self.{stack_attribute} does not bind each stage's layer list to a name")


def _handed_on(loop: cst.For) -> set[str]:
    """The names the loop's body assigns from what its layer returns (``layer_outputs = blk(...)``, then
    ``hidden_states = layer_outputs[0]``), in order: the stream the next layer reads is one of them. Funnel's
    ``query = hidden`` before ``layer(query, ...)`` is not: ``hidden`` carries the stream."""
    target = loop.target.elements[-1].value if isinstance(loop.target, cst.Tuple) else loop.target
    if not isinstance(target, cst.Name):
        return set()
    layer = target.value
    handed: set[str] = set()

    class _Assignments(cst.CSTVisitor):
        def visit_Assign(self, node: cst.Assign) -> None:
            read = _names(node.value)
            if layer in read or read & handed:
                handed.update(name for target in node.targets for name in _bound(target.target))

    loop.body.visit(_Assignments())
    return handed


def _bound(target: cst.BaseAssignTargetExpression) -> set[str]:
    """The plain names an assignment target binds."""
    if isinstance(target, cst.Name):
        return {target.value}
    if isinstance(target, (cst.Tuple, cst.List)):
        return {name for element in target.elements for name in _bound(element.value)}
    return set()


def _unpacked(loop: cst.For, item: cst.BaseExpression) -> cst.Tuple | None:
    """The tuple the loop binds ``item`` to: the loop's own target, or ``a, b = item`` in its body."""
    if isinstance(item, cst.Tuple):
        return item
    if not isinstance(item, cst.Name):
        return None
    for statement in loop.body.body:
        if not isinstance(statement, cst.SimpleStatementLine):
            continue
        for small in statement.body:
            if (isinstance(small, cst.Assign) and len(small.targets) == 1 and isinstance(small.targets[0].target,
                                                                                          cst.Tuple)
                    and isinstance(small.value, cst.Name) and small.value.value == item.value):
                return small.targets[0].target
    return None


def _called(node: cst.BaseExpression, name: str) -> bool:
    """Whether ``node`` is ``name(...)`` with positional arguments."""
    return (isinstance(node, cst.Call) and isinstance(node.func, cst.Name) and node.func.value == name
            and bool(node.args) and all(arg.keyword is None and not arg.star for arg in node.args))


def _names(node: cst.CSTNode) -> set[str]:
    """Every plain name ``node`` reads."""
    found: set[str] = set()

    class _Names(cst.CSTVisitor):
        def visit_Name(self, name: cst.Name) -> None:
            found.add(name.value)

        def visit_Attribute(self, attribute: cst.Attribute) -> bool:
            attribute.value.visit(self)  # ``x.attr``: the attribute's name is no variable
            return False

    node.visit(_Names())
    return found


def _code(node: cst.CSTNode) -> str:
    return _EMPTY.code_for_node(node)
