"""A parallel block made sequential in the modeling source: what the later branch reads instead.

GPT-J, Cohere and Phi compute ``h + attn(n(h)) + mlp(n(h))`` in one add. Sequential Pre-Norm computes
``h' = h + attn(n(h))`` and then ``h' + mlp(n'(h'))``, so the later branch must read ``h'``: the add's other
operands, the stream and the earlier branch's output, as the source names them at the later branch's call.
They are found by following each operand of the add back through the assignments of ``forward`` to the branch
call it comes from (``attn_output = attn_outputs[0]`` after ``attn_outputs = self.attn(...)``). The generated
code names their sum before the later branch runs and adds the later branch's output to it, so that its graph
is the sequential one (``h' = h + attn``, then ``h' + mlp``), which detection reads back as ``pre``.
"""

from __future__ import annotations

import ast
from pathlib import Path

from .derive import CodegenError

_MAX_DEPTH = 16  # assignment hops followed back from an operand


def stream_before(source: Path, class_name: str, add_line: int, branches: tuple[str, str], later_line: int
                  ) -> tuple[str, str]:
    """(the stream after the earlier branch's add, the later branch's output), as source text that the later
    branch's call at ``later_line`` and the residual add at ``add_line`` can use: the operands of that add that do
    not come from the later branch, summed, and those that do.

    ``branches`` are the earlier and the later branch's ``self.`` attributes. Raises ``CodegenError`` naming what
    stands in the way (an operand that is no plain name, one assigned again after the later branch runs).
    """
    forward = forward_of(ast.parse(source.read_text(encoding="utf-8")), class_name)
    operands = _add_operands(forward, add_line)
    assignments = sorted(((node.lineno, target, node.value) for node in ast.walk(forward)
                          if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and node.value is not None
                          for target in _targets(node)), key=lambda assignment: assignment[0])
    earlier, later = branches
    kept: list[str] = []
    outputs: list[str] = []
    for name in operands:
        origins = _origins(name, add_line, assignments, branches, 0)
        if later in origins:
            outputs.append(name)
            if earlier in origins:
                raise CodegenError(f"{name} in the residual add at line {add_line} of {class_name} mixes both "
                                   "branches' outputs, so no name holds the stream after the first branch alone")
            continue
        moved = [line for line, target, _ in assignments if target == name and later_line <= line < add_line]
        if moved:
            raise CodegenError(f"{name} is assigned again at line {moved[0]} of {class_name}, after the branch "
                               f"self.{later} runs at line {later_line}: that branch cannot read the stream as the add "
                               "sees it")
        kept.append(name)
    if not outputs or not kept:
        raise CodegenError(f"the residual add at line {add_line} of {class_name} does not add self.{later}'s output "
                           "to the stream in an operand of its own")
    return " + ".join(kept), " + ".join(outputs)


def forward_of(tree: ast.Module, class_name: str) -> ast.FunctionDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "forward":
                    return item
    raise CodegenError(f"{class_name} has no forward of its own to rewrite")


def _add_operands(forward: ast.FunctionDef, line: int) -> list[str]:
    """The plain names added up by the outermost ``a + b + c`` that spans ``line``."""
    operands = add_summands(forward, line)
    if not all(isinstance(node, ast.Name) for node in operands):
        raise CodegenError(f"the residual add at line {line} adds an expression that is no plain name "
                           f"({ast.unparse(next(n for n in operands if not isinstance(n, ast.Name)))}), so the "
                           "stream after its first branch has no name to read")
    return [node.id for node in operands if isinstance(node, ast.Name)]


def add_summands(forward: ast.FunctionDef, line: int) -> list[ast.expr]:
    """The terms of the outermost ``a + b + c`` that spans ``line``, in source order."""
    adds = [node for node in ast.walk(forward) if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add)
            and node.lineno <= line <= (node.end_lineno or node.lineno)]
    if not adds:
        in_place = any(isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Add) and node.lineno == line
                       for node in ast.walk(forward))
        raise CodegenError(
            f"the parallel block adds its branches to the stream in place, one statement each (`h[i] += F` at line "
            f"{line}), not as one sum whose terms a sequential form would split" if in_place
            else f"no residual add at line {line}")
    outer = max(adds, key=lambda node: (node.end_col_offset or 0) - node.col_offset + 1000 * (
        (node.end_lineno or node.lineno) - node.lineno))
    operands: list[ast.expr] = []
    pending: list[ast.expr] = [outer]
    while pending:
        node = pending.pop(0)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            pending[:0] = [node.left, node.right]
        else:
            operands.append(node)
    return operands


def _targets(node: ast.Assign | ast.AnnAssign | ast.AugAssign) -> list[str]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return [name.id for target in targets for name in ast.walk(target) if isinstance(name, ast.Name)]


def _origins(name: str, before: int, assignments: list[tuple[int, str, ast.expr]], branches: tuple[str, str],
             depth: int) -> set[str]:
    """The branch attributes whose calls ``name``'s value at line ``before`` is computed from."""
    earlier = [(line, value) for line, target, value in assignments if target == name and line < before]
    if not earlier or depth > _MAX_DEPTH:
        return set()  # an argument of forward: the stream itself
    line, value = earlier[-1]
    found = {branch for branch in branches for call in ast.walk(value) if isinstance(call, ast.Call)
             and ast.unparse(call.func) == f"self.{branch}"}
    for used in {node.id for node in ast.walk(value) if isinstance(node, ast.Name)} - {"self", name}:
        found |= _origins(used, line, assignments, branches, depth + 1)
    if any(isinstance(node, ast.Name) and node.id == name for node in ast.walk(value)):
        found |= _origins(name, line, assignments, branches, depth + 1)  # ``x = dropout(x)``
    return found
