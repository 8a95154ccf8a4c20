"""The CI sample of the coverage matrix (``benchmarks/coverage.py --sample``): one family of each layout.

Converted through the command line in subprocesses, as a user would, then loaded, run, generated from and
re-inspected (``docs/coverage.md`` is the full run). A cell that passes today must stay free of crashes, bad
outputs and usage errors; a cell that fails today is an expected failure (strict), so that fixing it turns
this test red until the cell is moved out of ``KNOWN_FAILURES``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
FAILED = ("crash", "bad output", "usage")


def _coverage() -> ModuleType:
    """``benchmarks/coverage.py`` under a name of its own (``coverage`` is also a well-known package); it puts
    ``benchmarks/`` on the path itself, for its helper module."""
    spec = importlib.util.spec_from_file_location("normswap_coverage_matrix", BENCHMARKS / "coverage.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


coverage = _coverage()


def _cells() -> list[Any]:
    cells = []
    for family, names in coverage.SAMPLE.items():
        for cell in names:
            reason = coverage.KNOWN_FAILURES.get((family, cell))
            marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
            cells.append(pytest.param(family, cell, marks=marks, id=f"{family}-{cell.replace(' ', '-')}"))
    return cells


@pytest.fixture(scope="module")
def sample() -> Any:
    """The sample, run once for the module, two families at a time."""
    return coverage.run(list(coverage.SAMPLE), jobs=2, scope="sample", sample=True)


def _cell(sample: Any, family: str, cell: str) -> Any:
    row = next((f for f in sample.families if f.name == family), None)
    assert row is not None, f"{family} was skipped: {[f.skipped for f in sample.skipped if f.name == family]}"
    found = next((c for c in row.cells if c.cell == cell), None)
    assert found is not None, f"{family} {cell} did not run"
    return found


def test_sample_covers_every_layout(sample: Any) -> None:
    layouts = {f.placement for f in sample.families}
    assert {"post", "pre", "parallel", "sandwich", "post-sublayer"} <= layouts, layouts
    assert any(f.encoder_decoder for f in sample.families)
    failed = [(c.family, c.message) for f in sample.families for c in f.cells if c.cell == "inspect"
              and c.category != "ok"]
    assert not failed


@pytest.mark.parametrize(("family", "cell"), _cells())
def test_sample_cell(sample: Any, family: str, cell: str) -> None:
    found = _cell(sample, family, cell)
    assert found.category not in FAILED, f"{family} {cell}: {found.category}: {found.message}"


@pytest.mark.parametrize(("family", "cell"), coverage.SAMPLE_EXACT)
def test_sample_exact_cell_stays_exact(sample: Any, family: str, cell: str) -> None:
    """An exact conversion that became approximate (or refused) is a regression even without a bad output."""
    found = _cell(sample, family, cell)
    assert found.category == "exact", f"{family} {cell}: {found.category}: {found.message}"


@pytest.mark.parametrize(("family", "cell"), [("gemma2", "placement post"), ("olmo2", "placement pre")])
def test_sample_branch_norm_placements_convert(sample: Any, family: str, cell: str) -> None:
    """Sandwich and post-sublayer families convert to Pre- and Post-Norm (issue 18): refused before."""
    found = _cell(sample, family, cell)
    assert found.category == "approximate", f"{family} {cell}: {found.category}: {found.message}"


def test_issue_17_count_sets_aside_families_that_norm_a_branch_output() -> None:
    """The target's count leaves out issue 18's layouts, also where a mixed family has them in some sublayers;
    a mixed family without them stays counted. The plain placement rule is printed beside it."""
    def family(name: str, placement: str, branch_output_norm: bool, category: str) -> Any:
        return coverage.Family(name, placement=placement, branch_output_norm=branch_output_norm,
                               cells=(coverage.Cell(name, "placement pre", category),))

    rows = (family("a", "pre", False, "approximate"), family("b", "mixed", True, "refused"),
            family("c", "mixed", False, "refused"), family("d", "sandwich", True, "refused"))
    run = coverage.Run(rows, (), 0.0, 1, "test")
    assert coverage.converting(run, coverage._issue_17) == 50.0  # a and c
    assert coverage.converting(run, coverage._whole_layout_aside) == 100.0 / 3  # a, b and c
    table = "\n".join(coverage._summary_table(run))
    assert "| 50% |" in table and "| 33% |" in table


def test_merged_runs_take_each_row_from_the_last_run_that_has_it() -> None:
    """A partial rerun replaces its families' rows (and skips) in the full matrix and names the code of each."""
    def row(name: str, category: str, code: str) -> Any:
        return coverage.Family(name, placement="pre", code=code,
                               cells=(coverage.Cell(name, "placement post", category),))

    full = coverage.Run((row("a", "refused", "0.1 (old)"), row("b", "approximate", "0.1 (old)")),
                        (coverage.Family("c", skipped="too slow"),), 60.0, 2, "all", {"torch": "2"})
    rerun = coverage.Run((row("a", "exact", "0.1 (new)"), row("c", "approximate", "0.1 (new)")), (), 30.0, 2, "some",
                         {"torch": "2"})
    result = coverage.merged([full, rerun], "both")
    assert [(f.name, f.cells[0].category, f.code) for f in result.families] == [
        ("a", "exact", "0.1 (new)"), ("b", "approximate", "0.1 (old)"), ("c", "approximate", "0.1 (new)")]
    assert not result.skipped and result.seconds == 90.0
    assert result.versions["normswap"] == "0.1 (new) for 2 rows, 0.1 (old) for 1 row"
