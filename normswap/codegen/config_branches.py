"""Which statements of a modeling function run for one config: ``if`` tests that read only the config.

Modeling code keeps every variant of a family in one ``forward`` and picks one by its config (Falcon:
``if self.config.new_decoder_architecture or self.config.parallel_attn: mlp_output += attention_output``), or by a
plain value the module set for itself in ``__init__`` (LFM2's ``if self.is_attention_layer:``, per layer). A
reading of the source that follows assignments back must not follow one the model never runs. Tests built from
config attributes, the module's own plain attributes (a bool, number, string or None: ``holder``), constants,
``not``, ``and``, ``or`` and one comparison are decided; any other test (a tensor, ``self.training``, which
training changes, a call) is undecided, and both its branches count as possibly running.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_CONFIG_ROOTS = (("self", "config"), ("config",))
_COMPARISONS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Is: operator.is_, ast.IsNot: operator.is_not,
                ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}
_UNDECIDED = object()


def running_statements(function: ast.FunctionDef, config: Any | None, holder: Any | None = None
                       ) -> Iterator[ast.stmt]:
    """Every statement of ``function`` (nested ones too) that may run for ``config`` and for ``holder``, the module
    whose code it is: the branches of an ``if`` whose test they decide are left out where it decides against them
    (all are kept without either)."""
    yield from _within(function.body, _Reader(config, holder))


@dataclass(frozen=True)
class _Reader:
    """What a test may read: the config, and the plain attributes of the module running the code."""

    config: Any | None
    holder: Any | None


def _within(statements: list[ast.stmt], reader: _Reader) -> Iterator[ast.stmt]:
    for statement in statements:
        yield statement
        if isinstance(statement, ast.If):
            truth = (_value(statement.test, reader) if reader.config is not None or reader.holder is not None
                     else _UNDECIDED)
            if truth is _UNDECIDED or truth:
                yield from _within(statement.body, reader)
            if truth is _UNDECIDED or not truth:
                yield from _within(statement.orelse, reader)
            continue
        for field in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(statement, field, None)
            if isinstance(inner, list):
                yield from _within([node for node in inner if isinstance(node, ast.stmt)], reader)
                for handler in (node for node in inner if isinstance(node, ast.ExceptHandler)):
                    yield from _within(handler.body, reader)


def _value(node: ast.expr, reader: _Reader) -> Any:
    """The value of ``node`` for ``reader``'s config and module, or ``_UNDECIDED``."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Attribute):
        return _config_attribute(node, reader)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        inner = _value(node.operand, reader)
        return _UNDECIDED if inner is _UNDECIDED else not inner
    if isinstance(node, ast.BoolOp):
        return _bool_op(node, reader)
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARISONS:
        left, right = _value(node.left, reader), _value(node.comparators[0], reader)
        if left is _UNDECIDED or right is _UNDECIDED:
            return _UNDECIDED
        try:
            return _COMPARISONS[type(node.ops[0])](left, right)
        except TypeError:
            return _UNDECIDED
    return _UNDECIDED


def _bool_op(node: ast.BoolOp, reader: _Reader) -> Any:
    """``and`` / ``or`` as Python decides them: one decided operand can settle the whole test."""
    settles = isinstance(node.op, ast.Or)  # the truth value that ends the test early
    undecided = False
    for operand in node.values:
        value = _value(operand, reader)
        if value is _UNDECIDED:
            undecided = True
        elif bool(value) == settles:
            return settles
    return _UNDECIDED if undecided else not settles


def _config_attribute(node: ast.Attribute, reader: _Reader) -> Any:
    """``self.config.x`` or ``config.x``: the config's value (``_UNDECIDED`` where it has no such attribute);
    ``self.x``: the module's own value where it is a plain one (not ``training``, which training flips)."""
    chain: list[str] = []
    current: ast.expr = node
    while isinstance(current, ast.Attribute):
        chain.insert(0, current.attr)
        current = current.value
    if not isinstance(current, ast.Name):
        return _UNDECIDED
    chain.insert(0, current.id)
    for root in _CONFIG_ROOTS:
        if tuple(chain[:len(root)]) == root and len(chain) == len(root) + 1:
            return getattr(reader.config, chain[-1], _UNDECIDED) if reader.config is not None else _UNDECIDED
    if reader.holder is not None and len(chain) == 2 and chain[0] == "self" and chain[1] != "training":
        value = getattr(reader.holder, chain[1], _UNDECIDED)
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
    return _UNDECIDED
