"""Which term of a residual add carries which branch's output, and which call of the layer's code makes it.

A norm added to a branch (docs/design.md §9) is written into the modeling source: an ``out`` norm around the
branch's term of the add (``h + F`` -> ``h + N(F)``), a ``pre`` norm around the input of the branch's call
(``F(h)`` -> ``F(N(h))``). Its starting scale is measured at that call's module, so the term must be exactly
what the module returns (its first item) times constants: each term is followed back through the assignments of
``forward`` to the call it comes from, passing only renames, first items (``x, _ = self.attn(...)``, ``out[0]``),
modules that pass their input through at inference (dropout) and products with (or divisions by) a constant, a
number or a ``self.`` attribute (Falcon-H1's ``attn_out_multiplier``), whose text the term records so the scale
can be multiplied by its value; anything else (a layer scale, another arithmetic step) stops the walk, and the term
is then no module's output.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config_branches import running_statements
from .derive import CodegenError
from .edits import INPUT_KEYWORDS
from .serialise import add_summands, forward_of

_MAX_DEPTH = 16  # assignment hops followed back from a term
# torch's functional dropout as modeling code calls it (OPT, Whisper, the helpers of BLOOM and Falcon): its input
# passes through at inference, where calibration and the converted model run with ``training`` False
FUNCTIONAL_DROPOUT = frozenset({"nn.functional.dropout", "torch.nn.functional.dropout", "F.dropout",
                                "functional.dropout"})


@dataclass(frozen=True)
class BranchTerm:
    """One branch's term in a residual add: ``self.<attribute>`` is the call whose output it is (called at
    ``call_line``), ``term`` the term's source text in the add, and ``input_first`` whether the call's input
    (what a pre norm wraps) is its first argument, which is what calibration measures at the module's input."""

    attribute: str
    call_line: int
    term: str
    input_first: bool
    factors: tuple[Factor, ...] = ()  # the constants the call's output is multiplied by on its way to the add


@dataclass(frozen=True)
class Factor:
    """A constant a branch's output is multiplied by (``divides``: divided by) on its way to the add, as source text:
    a number or a ``self.`` attribute, whose value the module that runs the code holds."""

    text: str
    divides: bool = False


@dataclass(frozen=True)
class AddTerms:
    """The terms of one residual add, as source text in order, and the branch calls that some of them return;
    ``helper``: the module-level function the add is written in, whose call's arguments the terms are ("": the add
    is in the class's own forward)."""

    terms: tuple[str, ...]
    branches: dict[str, BranchTerm]
    helper: str = ""

    def others(self) -> tuple[str, ...]:
        """The terms no branch call returns: the stream."""
        taken = {term.term for term in self.branches.values()}
        return tuple(term for term in self.terms if term not in taken)


def branch_terms(source: Path, class_name: str, add_line: int, attributes: Collection[str],
                 passes_through: Callable[[str], bool], config: Any | None = None, holder: Any | None = None
                 ) -> AddTerms:
    """The terms of the add at ``add_line`` in ``class_name.forward``, and for each ``self.<attribute>`` (of
    ``attributes``) whose output is one of them, that term. ``passes_through(callee)`` says whether the call of
    ``callee`` (``self.dropout``, ``nn.functional.dropout``) returns its first argument unchanged at inference: the
    term passes through it on its way to the add. ``config``, the module's own, leaves out the statements its ``if``
    tests rule out (``config_branches``), and ``holder``, the module running the code, those its own plain attributes
    rule out (LFM2's ``if self.is_attention_layer:``)."""
    forward = forward_of(ast.parse(source.read_text(encoding="utf-8")), class_name)
    return _terms_of(forward, add_summands(forward, add_line), add_line, class_name, attributes, passes_through,
                     config, holder)


def helper_call_terms(source: Path, class_name: str, call_line: int, add_line: int, attributes: Collection[str],
                      passes_through: Callable[[str], bool], config: Any | None = None, holder: Any | None = None
                      ) -> AddTerms:
    """``branch_terms`` for an add inside a module-level helper (BLOOM's and Falcon's ``dropout_add(x, residual,
    ...)``), called from ``class_name.forward`` at ``call_line``: each term of the helper's add at ``add_line`` is
    followed back, inside the helper and through pass-through calls (its dropout), to the parameter it comes from,
    and the term of the add is then the argument the call passes for that parameter. A term no parameter carries
    (computed inside the helper) makes the helper's add no sum of the call's arguments, and is refused."""
    tree = ast.parse(source.read_text(encoding="utf-8"))
    helper = next((node for node in tree.body if isinstance(node, ast.FunctionDef)
                   and node.lineno <= add_line <= (node.end_lineno or node.lineno)), None)
    if helper is None:
        raise CodegenError(f"no module-level function holds the residual add at line {add_line}")
    inside = _assignments(helper)
    parameters = [argument.arg for argument in (*helper.args.posonlyargs, *helper.args.args)]
    forward = forward_of(tree, class_name)
    call = next((node for node in ast.walk(forward) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                 and node.func.id == helper.name and node.lineno <= call_line <= (node.end_lineno or node.lineno)),
                None)
    if call is None:
        raise CodegenError(f"{class_name}.forward calls no {helper.name} at line {call_line}")
    passed = {**dict(zip(parameters, call.args, strict=False)),
              **{keyword.arg: keyword.value for keyword in call.keywords if keyword.arg}}
    terms = []
    for operand in add_summands(helper, add_line):
        parameter = _parameter_of(operand, add_line, inside, passes_through, 0)
        if parameter not in passed or isinstance(passed[parameter], ast.Starred):
            raise CodegenError(f"the term {ast.unparse(operand)} of {helper.name}'s residual add at line {add_line} is "
                               f"not one of the arguments {class_name} passes it at line {call_line}, so no argument "
                               "there is the branch's output")
        terms.append(passed[parameter])
    return replace(_terms_of(forward, terms, call_line, class_name, attributes, passes_through, config, holder),
                   helper=helper.name)


def _parameter_of(node: ast.expr, before: int, assignments: list[tuple[int, ast.expr, ast.expr | None]],
                  passes_through: Callable[[str], bool], depth: int) -> str | None:
    """The helper's parameter whose value ``node`` is at line ``before``, through renames and pass-through calls."""
    if depth > _MAX_DEPTH:
        return None
    if isinstance(node, ast.Call):
        return (_parameter_of(node.args[0], before, assignments, passes_through, depth + 1)
                if node.args and passes_through(ast.unparse(node.func)) else None)
    if not isinstance(node, ast.Name):
        return None
    earlier = [(line, target, value) for line, target, value in assignments if line < before
               and _binds(target, node.id)]
    if not earlier:
        return node.id  # never assigned in the helper: its parameter
    line, target, value = earlier[-1]
    if value is None or not (isinstance(target, ast.Name) and target.id == node.id):
        return None
    return _parameter_of(value, line, assignments, passes_through, depth + 1)


def _assignments(function: ast.FunctionDef, config: Any | None = None, holder: Any | None = None
                 ) -> list[tuple[int, ast.expr, ast.expr | None]]:
    """(line, target, value) of every assignment in ``function`` that may run for ``config`` and ``holder``, in line
    order (value None: augmented)."""
    return sorted(((node.lineno, target, node.value if isinstance(node, ast.Assign) else None)
                   for node in running_statements(function, config, holder)
                   if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
                   for target in (node.targets if isinstance(node, ast.Assign) else [node.target])),
                  key=lambda assignment: assignment[0])


_Assignments = list[tuple[int, ast.expr, ast.expr | None]]


def _terms_of(forward: ast.FunctionDef, terms: list[ast.expr], add_line: int, class_name: str,
              attributes: Collection[str], passes_through: Callable[[str], bool], config: Any | None,
              holder: Any | None = None) -> AddTerms:
    """The terms, as source text, and the branch call each one returns, followed back through ``forward``."""
    start = min(term.lineno for term in terms)
    assignments = _assignments(forward, config, holder)
    written = [ast.unparse(term) for term in terms]
    found: dict[str, BranchTerm] = {}
    for term, text in zip(terms, written, strict=True):
        reached = _call_of(term, start, assignments, frozenset(attributes), passes_through, 0)
        if reached is None:
            continue
        call, factors = reached
        attribute = ast.unparse(call.func).removeprefix("self.")
        if attribute in found or written.count(text) > 1:
            raise CodegenError(f"the residual add at line {add_line} of {class_name} adds self.{attribute}'s output "
                               "in more than one term, so no one term holds the branch's output")
        found[attribute] = BranchTerm(attribute, call.lineno, text, _input_first(call), factors)
    return AddTerms(tuple(written), found)


def _call_of(node: ast.expr, before: int, assignments: _Assignments, attributes: frozenset[str],
             passes_through: Callable[[str], bool], depth: int) -> tuple[ast.Call, tuple[Factor, ...]] | None:
    """The call of ``self.<one of attributes>`` whose output (or first item) ``node`` is, at line ``before``, times
    the constant factors on the way."""
    if depth > _MAX_DEPTH:
        return None
    if isinstance(node, ast.Call):
        callee = ast.unparse(node.func)
        if callee.removeprefix("self.") in attributes and callee.startswith("self."):
            return node, ()
        if node.args and passes_through(callee):
            return _call_of(node.args[0], before, assignments, attributes, passes_through, depth + 1)
        if isinstance(node.func, ast.Attribute) and node.func.attr in _VALUE_KEEPING_METHODS \
                and ast.unparse(node.func.value) != "self":  # Llama 4's ``h.view(residual.shape)``: h, re-shaped
            return _call_of(node.func.value, before, assignments, attributes, passes_through, depth + 1)
        return None
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == 0:
        return _call_of(node.value, before, assignments, attributes, passes_through, depth + 1)
    if isinstance(node, ast.IfExp):  # ``self.mlp(h) if flag else self.mlp(h, extra)`` (Moshi): one module either way
        sides = [_call_of(side, before, assignments, attributes, passes_through, depth + 1)
                 for side in (node.body, node.orelse)]
        if sides[0] is None or sides[1] is None or ast.unparse(sides[0][0].func) != ast.unparse(sides[1][0].func) \
                or sides[0][1] != sides[1][1]:
            return None  # another module, or another factor, on each side: the term is no one module's output
        return sides[0]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
        sides = ([(node.left, node.right), (node.right, node.left)] if isinstance(node.op, ast.Mult)
                 else [(node.left, node.right)])
        for followed, constant in sides:
            if _constant_like(constant):
                reached = _call_of(followed, before, assignments, attributes, passes_through, depth + 1)
                if reached is not None:
                    factor = Factor(ast.unparse(constant), isinstance(node.op, ast.Div))
                    return reached[0], (*reached[1], factor)
        return None
    if not isinstance(node, ast.Name):
        return None
    earlier = [(line, target, value) for line, target, value in assignments if line < before
               and _binds(target, node.id)]
    if not earlier:
        return None  # an argument of forward: the stream itself
    line, target, value = earlier[-1]
    if value is None or not _binds_first(target, node.id):
        return None  # changed in place, or a later item of a tuple: not the call's output as it returns it
    return _call_of(value, line, assignments, attributes, passes_through, depth + 1)


# tensor methods that hand on their tensor's values, each token's channels whole: a new norm reads what it read
_VALUE_KEEPING_METHODS = frozenset({"view", "reshape", "contiguous", "to", "type_as", "float"})


def _constant_like(node: ast.expr) -> bool:
    """A number, or an attribute of ``self`` (``self.multiplier``, ``self.config.scale``): a constant of the module."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name) and node.id == "self"


def _binds_first(target: ast.expr, name: str) -> bool:
    """``name = ...`` or ``name, ... = ...``: the target binds ``name`` to the value or to its first item."""
    if isinstance(target, ast.Name):
        return target.id == name
    return (isinstance(target, (ast.Tuple, ast.List)) and bool(target.elts) and isinstance(target.elts[0], ast.Name)
            and target.elts[0].id == name)


def _binds(target: ast.expr, name: str) -> bool:
    return any(isinstance(node, ast.Name) and node.id == name for node in ast.walk(target))


def entry_call(source: Path, class_name: str, attribute: str, line: int) -> BranchTerm | None:
    """The call of ``self.<attribute>`` on ``line`` of ``class_name.forward`` (None where there is none): where a
    branch first reads the stream, when the call its add's term comes back to is a later step of the branch
    (EmbeddingGemma 2's per-layer block: the term is ``per_layer_projection``'s output, the stream goes into
    ``per_layer_input_gate``)."""
    forward = forward_of(ast.parse(source.read_text(encoding="utf-8")), class_name)
    call = next((node for node in ast.walk(forward) if isinstance(node, ast.Call)
                 and ast.unparse(node.func) == f"self.{attribute}" and node.lineno <= line <= (node.end_lineno or 0)),
                None)
    return None if call is None else BranchTerm(attribute, call.lineno, "", _input_first(call))


def _input_first(call: ast.Call) -> bool:
    """Whether the argument a pre norm wraps (the first positional one, else the first of the input keywords) is the
    call's first argument: the one calibration reads as the module's input."""
    if not call.args and not call.keywords:
        return False
    if call.args:
        return not isinstance(call.args[0], ast.Starred)
    return call.keywords[0].arg in INPUT_KEYWORDS
