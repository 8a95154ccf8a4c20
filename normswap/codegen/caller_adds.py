"""Residual adds written inside a child module whose caller owns the norm (RoBERTa-PreLayerNorm's ``SelfOutput``,
ViT-style ``Output`` modules in DPT and YOLOS, MPT's ``MptMLP``).

Pre -> Post wraps each add in a norm; the add here is ``hidden_states + input_tensor`` inside the child's forward,
and the norm belongs to the module that calls the child, which the child's code cannot reach. Where the child's
forward returns that sum as it is, wrapping the child's call in the norm (``self.norm(self.output(x, residual))``)
is the same edit one frame out, as for an add inside a module-level helper (``function_adds.py``).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import NormswapError


@dataclass(frozen=True)
class ChildCall:
    """Where the add's module is called: the calling class, the attribute it calls, and the call's line."""

    class_name: str
    attribute: str
    line: int


def caller_of_add(layer: nn.Module, add_class: str, add_line: int, norm_path: str, path: Path
                  ) -> tuple[ChildCall, str]:
    """The call of the module that adds, in the class that can reach ``norm_path`` (relative to ``layer``), and the
    norm's attribute path from there; a ``NormswapError`` says why the add cannot be wrapped one frame out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    classes = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    if add_class not in classes or not _returns_the_sum(classes[add_class], add_line):
        raise NormswapError(f"the residual add at {path.name}:{add_line} is inside {add_class}, whose forward does not "
                            "return the sum as it is, and the norm that must follow it belongs to the module that "
                            f"calls {add_class}: there is no call to wrap in it")
    found: set[tuple[str, str, str]] = set()
    for child_path, module in layer.named_modules():
        if type(module).__name__ != add_class or not child_path:
            continue
        parent, _, attribute = child_path.rpartition(".")
        if not norm_path.startswith(f"{parent}." if parent else ""):
            continue
        found.add((type(layer.get_submodule(parent)).__name__, attribute, norm_path.removeprefix(f"{parent}.")
                   if parent else norm_path))
    if len(found) != 1:
        raise NormswapError(f"the residual add at {path.name}:{add_line} is inside {add_class}, and {len(found)} of "
                            f"the modules that call it can reach {norm_path}, the norm that must follow it: the "
                            "call to wrap is not one")
    (caller, attribute, norm_attribute), = found
    lines = sorted({call.lineno for call in ast.walk(classes[caller]) if isinstance(call, ast.Call)
                    and _is_self_attribute(call.func, attribute)}) if caller in classes else []
    if len(lines) != 1:
        raise NormswapError(f"the residual add at {path.name}:{add_line} is inside {add_class}, which {caller} calls "
                            f"as self.{attribute} at {len(lines)} places: which call adds is decided at run time, so "
                            "the norm cannot be placed around it")
    return ChildCall(caller, attribute, lines[0]), norm_attribute


def _is_self_attribute(node: ast.expr, attribute: str) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == attribute and isinstance(node.value, ast.Name)
            and node.value.id == "self")


def _returns_the_sum(cls: ast.ClassDef, add_line: int) -> bool:
    """Whether ``forward`` returns the value of the add at ``add_line``: ``return a + b`` there, or ``x = a + b``
    there and ``return x`` as the statement right after it."""
    forward = next((node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == "forward"),
                   None)
    if forward is None:
        return False
    body = forward.body
    for index, statement in enumerate(body):
        if not statement.lineno <= add_line <= (statement.end_lineno or statement.lineno):
            continue
        if isinstance(statement, ast.Return):
            return isinstance(statement.value, ast.BinOp) and isinstance(statement.value.op, ast.Add)
        if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name) and isinstance(statement.value, ast.BinOp)
                and isinstance(statement.value.op, ast.Add)):
            return False
        following = body[index + 1] if index + 1 < len(body) else None
        return (isinstance(following, ast.Return) and isinstance(following.value, ast.Name)
                and following.value.id == statement.targets[0].id)
    return False
