"""A parallel block made sequential in the modeling source: what the later branch reads instead.

GPT-J, Cohere and Phi compute ``h + attn(n(h)) + mlp(n(h))`` in one add. Sequential Pre-Norm computes
``h' = h + attn(n(h))`` and then ``h' + mlp(n'(h'))``, so the later branch must read ``h'``: the add's other
operands, the stream and the earlier branch's output, as the source names them at the later branch's call.
They are found by following each operand of the add back through the assignments of ``forward`` to the branch
call it comes from (``attn_output = attn_outputs[0]`` after ``attn_outputs = self.attn(...)``). The generated
code names their sum before the later branch runs and adds the later branch's output to it, so that its graph
is the sequential one (``h' = h + attn``, then ``h' + mlp``), which detection reads back as ``pre``.

Falcon adds the earlier branch into the later one's output in place (``mlp_output += attention_output``) and the
sum to the stream in a module-level helper (``dropout_add(mlp_output, residual, ...)``). There the stream after
the earlier branch is the helper's stream argument plus what the in-place add adds; the generated code no longer
runs the in-place add, and the helper call reads that stream instead.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from .derive import CodegenError

_MAX_DEPTH = 16  # assignment hops followed back from an operand


@dataclass(frozen=True)
class SerialForm:
    """What the sequential form of one parallel block reads and adds, as source text: ``stream`` is the stream
    after the earlier branch's add (the terms the later branch does not make, summed), ``output`` the later
    branch's terms, and ``dropped`` the lines of ``output += <earlier branch>`` statements (Falcon's
    ``mlp_output += attention_output``) whose term ``stream`` now holds, so the generated code no longer runs
    them."""

    stream: str
    output: str
    dropped: tuple[int, ...] = ()
    kept: tuple[str, ...] = ()  # the terms of the add itself that ``stream`` sums (the stream, without ``dropped``'s)
    # the lines of ``name = a + b`` sums of both branches that the add read as ``name`` (Falcon-H1's ``hidden_states =
    # mamba_hidden_states + attention_hidden_states``): the add now reads their terms, so the sums no longer run
    split: tuple[int, ...] = ()


def stream_before(source: Path, class_name: str, add_line: int, branches: tuple[str, str], later_line: int,
                  operands: tuple[str, ...] | None = None) -> SerialForm:
    """The sequential form of the parallel block whose residual add spans ``add_line`` of ``class_name.forward``:
    the operands of that add that do not come from the later branch, summed, and those that do, as source text that
    the later branch's call at ``later_line`` and the add can use. ``operands``: the add's terms as written at
    ``add_line`` where the add itself is in a module-level helper (the arguments its call passes).

    ``branches`` are the earlier and the later branch's ``self.`` attributes. Raises ``CodegenError`` naming what
    stands in the way (an operand that is no plain name, one assigned again after the later branch runs).
    """
    forward = forward_of(ast.parse(source.read_text(encoding="utf-8")), class_name)
    names = list(operands) if operands is not None else _add_operands(forward, add_line)
    if not all(name.isidentifier() for name in names):
        raise CodegenError(f"the residual add at line {add_line} of {class_name} adds an expression that is no plain "
                           f"name ({next(name for name in names if not name.isidentifier())}), so the stream after "
                           "its first branch has no name to read")
    assignments = _assignments(forward)
    earlier, later = branches
    names, split = _split_sums(forward, names, add_line, assignments, branches)
    kept: list[str] = []
    outputs: list[str] = []
    accumulated: list[tuple[int, ast.expr]] = []
    for name in names:
        origins = _origins(name, add_line, assignments, branches, 0)
        if later in origins:
            if earlier in origins:
                accumulated += _accumulated_earlier(name, add_line, later_line, assignments, branches, class_name)
            outputs.append(name)
            continue
        kept.append(name)
    earlier_terms = [ast.unparse(term) for _, term in accumulated]
    for name in (*kept, *(used for _, term in accumulated for used in _names_in(term))):
        moved = [line for line, target, _, _ in assignments if target == name and later_line <= line < add_line
                 and line not in {line for line, _ in accumulated}]
        if moved:
            raise CodegenError(f"{name} is assigned again at line {moved[0]} of {class_name}, after the branch "
                               f"self.{later} runs at line {later_line}: that branch cannot read the stream as the add "
                               "sees it")
    if not outputs or not kept:
        raise CodegenError(f"the residual add at line {add_line} of {class_name} does not add self.{later}'s output "
                           "to the stream in an operand of its own")
    return SerialForm(" + ".join([*kept, *earlier_terms]), " + ".join(outputs),
                      tuple(line for line, _ in accumulated), tuple(kept), split)


def _split_sums(forward: ast.FunctionDef, names: list[str], add_line: int, assignments: list[_Assignment],
                branches: tuple[str, str]) -> tuple[list[str], tuple[int, ...]]:
    """``names``, each one that holds a plain sum of names mixing both branches (``h = mamba + attention``, read by
    nothing but the add) replaced by the names it sums; and the lines of those sums."""
    result: list[str] = []
    split: list[int] = []
    pending = list(names)
    while pending:
        name = pending.pop(0)
        bound = [(line, value, augmented) for line, target, value, augmented in assignments
                 if target == name and line < add_line]
        if not bound or _origins(name, add_line, assignments, branches, 0) != set(branches):
            result.append(name)
            continue
        line, value, augmented = bound[-1]
        terms = add_summands_of(value)
        read_between = any(isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id == name
                           and line < node.lineno < add_line for node in ast.walk(forward))
        if augmented or len(terms) < 2 or not all(isinstance(term, ast.Name) for term in terms) or read_between:
            result.append(name)  # ``_accumulated_earlier`` reads it, or refuses it
            continue
        split.append(line)
        pending[:0] = [term.id for term in terms if isinstance(term, ast.Name)]
    return result, tuple(split)


def _accumulated_earlier(name: str, add_line: int, later_line: int, assignments: list[_Assignment],
                         branches: tuple[str, str], class_name: str) -> list[tuple[int, ast.expr]]:
    """The ``name += term`` statements between the later branch's call and the add whose term is the earlier
    branch's output, where they are what mixes the earlier branch into ``name``: (line, term) each. Without them
    ``name`` must hold the later branch's output alone."""
    earlier, later = branches
    found = [(line, value) for line, target, value, augmented in assignments
             if augmented and target == name and later_line <= line < add_line
             and _value_origins(value, line, assignments, branches) == {earlier}]
    rest = [assignment for assignment in assignments if assignment[0] not in {line for line, _ in found}]
    if not found or _origins(name, add_line, rest, branches, 0) != {later}:
        raise CodegenError(f"{name} in the residual add at line {add_line} of {class_name} mixes both "
                           "branches' outputs, so no name holds the stream after the first branch alone")
    return found


def forward_of(tree: ast.Module, class_name: str) -> ast.FunctionDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "forward":
                    return item
    raise CodegenError(f"{class_name} has no forward of its own to rewrite")


def add_summands_of(node: ast.expr) -> list[ast.expr]:
    """The terms of the sum ``node`` (``a + b + c``), in source order; ``[node]`` where it is no sum."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return [*add_summands_of(node.left), *add_summands_of(node.right)]
    return [node]


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
    return add_summands_of(outer)


_Assignment = tuple[int, str, ast.expr, bool]  # line, the name bound, the value, whether it is ``name op= value``


def _assignments(forward: ast.FunctionDef) -> list[_Assignment]:
    return sorted(((node.lineno, target, node.value, isinstance(node, ast.AugAssign)) for node in ast.walk(forward)
                   if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and node.value is not None
                   for target in _targets(node)), key=lambda assignment: assignment[0])


def _names_in(node: ast.expr) -> set[str]:
    return {inner.id for inner in ast.walk(node) if isinstance(inner, ast.Name)} - {"self"}


def _targets(node: ast.Assign | ast.AnnAssign | ast.AugAssign) -> list[str]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return [name.id for target in targets for name in ast.walk(target) if isinstance(name, ast.Name)]


def _origins(name: str, before: int, assignments: list[_Assignment], branches: tuple[str, str],
             depth: int) -> set[str]:
    """The branch attributes whose calls ``name``'s value at line ``before`` is computed from."""
    earlier = [(line, value, augmented) for line, target, value, augmented in assignments
               if target == name and line < before]
    if not earlier or depth > _MAX_DEPTH:
        return set()  # an argument of forward: the stream itself
    line, value, augmented = earlier[-1]
    found = _value_origins(value, line, assignments, branches, depth, name)
    if augmented or any(isinstance(node, ast.Name) and node.id == name for node in ast.walk(value)):
        found |= _origins(name, line, assignments, branches, depth + 1)  # ``x = dropout(x)``, ``x += y``
    return found


def _value_origins(value: ast.expr, line: int, assignments: list[_Assignment], branches: tuple[str, str],
                   depth: int = 0, bound: str = "") -> set[str]:
    """The branch attributes whose calls the expression ``value`` at ``line`` is computed from, through the names
    it reads as assigned before that line (``bound``, the name the value is assigned to, is followed by the
    caller)."""
    found = {branch for branch in branches for call in ast.walk(value) if isinstance(call, ast.Call)
             and ast.unparse(call.func) == f"self.{branch}"}
    for used in {node.id for node in ast.walk(value) if isinstance(node, ast.Name)} - {"self", bound}:
        found |= _origins(used, line, assignments, branches, depth + 1)
    return found
