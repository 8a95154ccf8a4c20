"""The source lines each libcst statement line spans, for edits addressed by the line an fx trace gave.

libcst's ``PositionProvider`` finds positions by generating the code of every node (0.1 s for a
modeling file, a noticeable part of a conversion's start-up). Python's own parser gives each
statement's first and last line for free, and both parsers list the simple statements of a file in
the same order, so pairing the two lists gives the same spans. Where the pairing does not hold up
(a count or a statement kind differs), ``PositionProvider`` is used after all.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider

Spans = dict[int, tuple[int, int]]  # id(SimpleStatementLine) -> (first line, last line)

_NESTED = ("body", "handlers", "cases", "orelse", "finalbody")  # in source order, for both parsers
_AST_COMPOUND = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.If, ast.For, ast.AsyncFor, ast.While,
                 ast.With, ast.AsyncWith, ast.Try, ast.Match, *((ast.TryStar,) if hasattr(ast, "TryStar") else ()))
_AST_NAMES = {"Del": "Delete"}  # libcst name -> ast name, where they differ


def statement_lines(source: str, module: cst.Module) -> Spans:
    """``id(line) -> (first, last)`` line numbers of every ``SimpleStatementLine`` of ``module`` (parsed from
    ``source``; the ids hold while ``module`` lives)."""
    spans = _paired_spans(source, module)
    return spans if spans is not None else _libcst_spans(module)


def _paired_spans(source: str, module: cst.Module) -> Spans | None:
    statements = list(_ast_simple_statements(ast.parse(source).body))
    spans: Spans = {}
    position = 0
    for line in _libcst_statement_lines(module):
        smalls = line.body
        taken = statements[position:position + len(smalls)]
        position += len(smalls)
        kinds = [_AST_NAMES.get(type(small).__name__, type(small).__name__) for small in smalls]
        if kinds != [type(statement).__name__ for statement in taken]:
            return None
        if isinstance(line, cst.SimpleStatementLine):
            spans[id(line)] = (taken[0].lineno, max(statement.end_lineno or statement.lineno for statement in taken))
    return spans if position == len(statements) else None


def _libcst_spans(module: cst.Module) -> Spans:
    positions = MetadataWrapper(module, unsafe_skip_copy=True).resolve(PositionProvider)
    return {id(node): (span.start.line, span.end.line) for node, span in positions.items()
            if isinstance(node, cst.SimpleStatementLine)}


def _libcst_statement_lines(node: cst.CSTNode) -> Iterator[cst.SimpleStatementLine | cst.SimpleStatementSuite]:
    """Statement lines and one-line suites (``if x: return y``) in source order, not entering expressions."""
    if isinstance(node, (cst.SimpleStatementLine, cst.SimpleStatementSuite)):
        yield node
        return
    for name in _NESTED:
        value = getattr(node, name, None)
        for child in value if isinstance(value, (list, tuple)) else () if value is None else (value,):
            yield from _libcst_statement_lines(child)


def _ast_simple_statements(statements: list[ast.stmt]) -> Iterator[ast.stmt]:
    for statement in statements:
        if not isinstance(statement, _AST_COMPOUND):
            yield statement
            continue
        for name in _NESTED:
            for child in getattr(statement, name, None) or ():
                yield from _ast_simple_statements([child] if isinstance(child, ast.stmt) else child.body)
