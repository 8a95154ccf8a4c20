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


def caller_of_add(layer: nn.Module, add_class: str, add_line: int, norm_path: str, path: Path, helper: str = ""
                  ) -> tuple[ChildCall, str, int | None]:
    """The call of the module that adds, in the class that can reach ``norm_path`` (relative to ``layer``), the
    norm's attribute path from there, and which item of the child's returned tuple is the sum (None: the child
    returns the sum itself); a ``NormswapError`` says why the add cannot be wrapped one frame out. With
    ``helper``, the add is that module-level function's, called at ``add_line`` (BLOOM's ``dropout_add``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    classes = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    item = _returned_item(classes[add_class], add_line, helper) if add_class in classes else _NOT_RETURNED
    if item is _NOT_RETURNED:
        raise NormswapError(f"the residual add at {path.name}:{add_line} is inside {add_class}, whose forward does not "
                            "return the sum (as it is, or as one item of a tuple), and the norm that must follow it "
                            f"belongs to the module that calls {add_class}: there is no call to wrap in it")
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
    return ChildCall(caller, attribute, lines[0]), norm_attribute, item  # type: ignore[return-value]


def _is_self_attribute(node: ast.expr, attribute: str) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == attribute and isinstance(node.value, ast.Name)
            and node.value.id == "self")


_NOT_RETURNED = object()


def _returned_item(cls: ast.ClassDef, add_line: int, helper: str) -> object:
    """Where ``forward`` returns the value of the add at ``add_line``: None for the value itself (``return a + b``
    there, or ``x = a + b`` there and ``return x`` as the statement right after it), the item's index where that
    return is a tuple holding ``x`` (``return x, attention_probs``), else ``_NOT_RETURNED``. With ``helper``, the add
    is a call of that function (``x = dropout_add(...)``) instead of ``a + b``."""
    forward = next((node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == "forward"),
                   None)
    if forward is None:
        return _NOT_RETURNED
    body = forward.body
    for index, statement in enumerate(body):
        if not statement.lineno <= add_line <= (statement.end_lineno or statement.lineno):
            continue
        if isinstance(statement, ast.Return):
            return None if _is_the_add(statement.value, helper) else _NOT_RETURNED
        if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name) and _is_the_add(statement.value, helper)):
            return _NOT_RETURNED
        name = statement.targets[0].id
        following = body[index + 1] if index + 1 < len(body) else None
        if not isinstance(following, ast.Return):
            return _NOT_RETURNED
        if isinstance(following.value, ast.Name) and following.value.id == name:
            return None
        if isinstance(following.value, ast.Tuple):
            items = [isinstance(item, ast.Name) and item.id == name for item in following.value.elts]
            return items.index(True) if items.count(True) == 1 else _NOT_RETURNED
        return _NOT_RETURNED
    return _NOT_RETURNED


def _is_the_add(value: ast.expr | None, helper: str) -> bool:
    if helper:
        return isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == helper
    return isinstance(value, ast.BinOp) and isinstance(value.op, ast.Add)
