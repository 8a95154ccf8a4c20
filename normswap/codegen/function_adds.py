"""Residual adds written inside a module-level helper function (BLOOM's and Falcon's ``dropout_add``,
GPT-NeoX-Japanese's ``bias_dropout_add``).

The trace names the ``+`` inside the helper, which belongs to no class, so there is no norm module to wrap
it in. Every layer calls the helper, though, and the call's result is the sum: wrapping the call in the norm
(``self.norm(dropout_add(...))``) is the same edit one frame out. The calls are found in the layer's own
class, in source order, and matched to the sublayers whose add is in a helper, in order.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from ..errors import NormswapError


@dataclass(frozen=True)
class HelperCall:
    """A call of a module-level function from a method of ``class_name``, at ``line`` (the call's first)."""

    function: str
    class_name: str
    line: int


@dataclass(frozen=True)
class ModuleFunctions:
    """The module-level functions of a modeling file (name -> first and last line) and their calls in classes."""

    spans: dict[str, tuple[int, int]]
    calls: tuple[HelperCall, ...]

    def enclosing(self, line: int) -> str | None:
        """The module-level function whose body holds ``line``, if any."""
        return next((name for name, (start, end) in self.spans.items() if start <= line <= end), None)


def module_functions(path: Path) -> ModuleFunctions:
    """Parsed with Python's own ``ast`` (line numbers are all that is needed)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    spans = {node.name: (node.lineno, node.end_lineno or node.lineno) for node in tree.body
             if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    calls = [HelperCall(call.func.id, node.name, call.lineno)
             for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
             for call in ast.walk(node)
             if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in spans]
    return ModuleFunctions(spans, tuple(sorted(set(calls), key=lambda c: c.line)))


def helper_add_calls(functions: ModuleFunctions, add_lines: list[int | None], layer_class: str, filename: str,
                     branch_classes: list[set[str]], caller_lines: list[int | None]) -> dict[int, HelperCall]:
    """For each sublayer (by index) whose residual add is inside a helper, the call of that helper that adds.

    The calls in ``layer_class`` are matched to those sublayers: by the calling line the trace names for each add
    (``caller_lines``, by sublayer), else in order. Where the trace names none and their numbers differ (a call
    this configuration skips, such as Falcon's sequential add in a parallel model), which call adds is a run-time
    choice the source cannot tell, and the conversion is refused with that reason. Where only the branch modules
    call the helper (BLOOM's attention and MLP), each sublayer's call is the one in the class of a module its
    branch runs in (``branch_classes``, by sublayer): the add is then inside a child (``caller_adds``).
    """
    in_helper = {index: functions.enclosing(line) for index, line in enumerate(add_lines) if line is not None}
    in_helper = {index: name for index, name in in_helper.items() if name is not None}
    if not in_helper:
        return {}
    found: dict[int, HelperCall] = {}
    for name in sorted(set(in_helper.values())):
        indices = [index for index, helper in in_helper.items() if helper == name]
        calls = [call for call in functions.calls if call.function == name and call.class_name == layer_class]
        if not calls:
            found.update(_calls_in_branches(functions, name, indices, branch_classes, filename))
            continue
        by_line = {call.line: call for call in calls}
        traced = [caller_lines[index] for index in indices]
        if all(line in by_line for line in traced):
            found.update((index, by_line[line]) for index, line in zip(indices, traced, strict=True))
            continue
        if len(calls) != len(indices):
            lines = ", ".join(str(call.line) for call in calls) or "none"
            raise NormswapError(f"the residual add of {filename} is inside the module-level function {name}, "
                                f"which {layer_class} calls at lines {lines} for {len(indices)} residual add(s) of "
                                "this configuration: which call adds is decided at run time, so the source edit "
                                "that must wrap it cannot be placed")
        found.update(zip(indices, calls, strict=True))
    return found


def _calls_in_branches(functions: ModuleFunctions, name: str, indices: list[int], branch_classes: list[set[str]],
                       filename: str) -> dict[int, HelperCall]:
    """Each sublayer's call of helper ``name``: the one call in a class its branch runs in."""
    found: dict[int, HelperCall] = {}
    for index in indices:
        calls = [call for call in functions.calls
                 if call.function == name and call.class_name in branch_classes[index]]
        if len(calls) != 1:
            classes = ", ".join(sorted(branch_classes[index])) or "none"
            raise NormswapError(f"the residual add of sublayer {index} in {filename} is inside the module-level "
                                f"function {name}, which the classes its branch runs in ({classes}) call {len(calls)} "
                                "times: which call adds is decided at run time, so the norm cannot be placed around "
                                "it")
        found[index] = calls[0]
    return found
