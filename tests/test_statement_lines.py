"""Statement line spans from Python's parser agree with libcst's PositionProvider, statement by statement."""

from __future__ import annotations

import importlib
import textwrap
from pathlib import Path

import libcst as cst
import pytest

from normswap.codegen import statement_lines as lines_module
from normswap.codegen.statement_lines import _libcst_spans, _paired_spans, statement_lines

TRICKY = textwrap.dedent('''\
    """Module docstring."""
    import os; import sys
    x = (1 +
         2)  # a comment


    @decorator(
        argument=1,
    )
    class A(Base):
        """Docstring."""

        value: int = 3

        def __init__(self):
            if x: return None
            elif y:
                del self.a, self.b
            else:
                self.c = [
                    1, 2,
                ]; self.d = 4
            try:
                pass
            except ValueError:
                raise
            else:
                global q
            finally:
                assert True, "message"
            try:
                pass
            except* OSError:
                z += 1

        async def forward(self, hidden):
            async with lock as held:
                async for item in stream:
                    hidden = self.norm(
                        hidden + item
                    )
            while True:
                break
            else:
                continue
            match hidden:
                case [first, *rest]:
                    return first
                case _:
                    lambda: (yield)
            return hidden


    def outer():
        def inner():
            nonlocal_value = 1
        return inner
''')


def _modeling_source(family: str) -> str:
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    return Path(module.__file__).read_text(encoding="utf-8")


@pytest.mark.parametrize("source", [TRICKY, *(pytest.param(family, id=family) for family in
                                              ("llama", "gpt2", "bert", "opt", "gpt_neox", "bart", "t5", "qwen2"))])
def test_paired_spans_equal_position_provider(source: str) -> None:
    text = source if "\n" in source else _modeling_source(source)
    module = cst.parse_module(text)
    paired = _paired_spans(text, module)
    assert paired is not None, "the two parsers' statement lists did not pair up"
    expected = _libcst_spans(module)
    assert paired == expected
    assert len(expected) > 20


def test_falls_back_to_position_provider_when_the_lists_disagree(monkeypatch: pytest.MonkeyPatch) -> None:
    module = cst.parse_module(TRICKY)
    original = lines_module._ast_simple_statements
    monkeypatch.setattr(lines_module, "_ast_simple_statements", lambda statements: list(original(statements))[1:])
    assert _paired_spans(TRICKY, module) is None
    assert statement_lines(TRICKY, module) == _libcst_spans(module)
