"""Which plain names a statement copied from one class into another reads, and which the new place binds.

A norm constructor copied into another class's ``__init__`` (a new stack norm built as a layer's norm) may read
a name of its old place, a parameter or local there (CvT's ``nn.LayerNorm(embed_dim)``); written as it is, the
generated code would fail with a NameError when it loads. The rewriter refuses the copy instead.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence

import libcst as cst


def _walk(node: cst.CSTNode) -> list[cst.CSTNode]:
    nodes = [node]
    for child in node.children:
        nodes.extend(_walk(child))
    return nodes


def _top_level(module: cst.Module) -> list[cst.CSTNode]:
    """The module's nodes outside any class or function body (top-level imports may sit in ``try``/``if``)."""
    found: list[cst.CSTNode] = []
    todo: list[cst.CSTNode] = list(module.body)
    while todo:
        node = todo.pop()
        found.append(node)
        if not isinstance(node, (cst.ClassDef, cst.FunctionDef)):
            todo.extend(node.children)
    return found


def _code(node: cst.CSTNode) -> str:
    return cst.Module(body=[]).code_for_node(node)


def module_names(module: cst.Module) -> frozenset[str]:
    """The names a module binds at its top level (imports, classes, functions, assignments) and the builtins."""
    names = set(dir(builtins))
    for node in _top_level(module):
        if isinstance(node, (cst.ClassDef, cst.FunctionDef)):
            names.add(node.name.value)
        elif isinstance(node, cst.ImportAlias):
            bound = node.asname.name if node.asname else node.name
            names.add(_code(bound).split(".")[0])
        elif isinstance(node, cst.AssignTarget) and isinstance(node.target, cst.Name):
            names.add(node.target.value)
    return frozenset(names)


def bound_names(function: cst.FunctionDef, statements: Sequence[cst.CSTNode]) -> set[str]:
    """The names ``function``'s parameters and ``statements`` (its body so far) bind."""
    names = {param.name.value for param in (*function.params.params, *function.params.kwonly_params,
                                            *function.params.posonly_params)}
    for extra in (function.params.star_arg, function.params.star_kwarg):
        if isinstance(extra, cst.Param):
            names.add(extra.name.value)
    for statement in statements:
        for node in _walk(statement):
            if isinstance(node, cst.AssignTarget) and isinstance(node.target, cst.Name):
                names.add(node.target.value)
    return names


def read_names(node: cst.CSTNode) -> set[str]:
    """The plain names an added statement reads (not attribute names, keywords or its ``self.x`` target)."""
    skip: set[int] = set()
    for inner in _walk(node):
        if isinstance(inner, cst.Attribute):
            skip.add(id(inner.attr))
        elif isinstance(inner, cst.Arg) and inner.keyword is not None:
            skip.add(id(inner.keyword))
    return {inner.value for inner in _walk(node) if isinstance(inner, cst.Name) and id(inner) not in skip}
