"""transformers' own model tests (``ModelTesterMixin``) on generated code, beside the stock classes (issue 20).

For each family of ``tests/transformers_suite_families.py``: the stock classes, then the classes of the module
``normswap convert`` writes for each of the family's conversions of a tiny model, imported from the converted
folder as they are, each under the same tiny tester. A test the generated classes fail or skip while stock passes
it is a difference from stock. transformers' test files are fetched for the installed version
(``tests/transformers_tests_source.py``); each run is a process of its own, so that no run sees another's state.

Usage: ``PYTHONPATH=. python benchmarks/transformers_suite.py [--families llama,gpt2] [--json OUT.json]
[--markdown docs/transformers_suite.md]``; about 15 minutes on 2 cores for every family (45 to 80 s a run).
``tests/test_transformers_suite.py`` is the CI subset.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from transformers_suite_classes import STOCK, generated_classes, stock_classes
from transformers_suite_families import FAMILIES, family
from transformers_suite_runner import Outcome, run_tests
from transformers_tests_source import MissingTestFilesError, transformers_tests_folder

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "PYTHONPATH=. python benchmarks/transformers_suite.py --json RUN.json --markdown docs/transformers_suite.md"
NOT_RUNNABLE = {  # what the source distribution's tests/ lacks, and so never runs here
    "GenerationTesterMixin (tests/generation/test_utils.py)": "generate() under every decoding strategy and cache",
    "ExportTesterMixin (tests/exporters/test_export.py)": "torch.export / ExecuTorch export of each class",
    "tests/models/<family>/test_modeling_<family>.py": "each family's own tests and its test class's overrides "
                                                        "(integration tests against Hub checkpoints among them)",
    "tests/causal_lm_tester.py": "CausalLMModelTest's extra tests (rope scaling by layer, sequence "
                                 "classification shapes); the testers here are this project's own",
}
NOT_RUN = {  # in the source distribution, not run here
    "TrainingTesterMixin (tests/test_training_mixin.py)": "300-step overfitting runs, gated by RUN_TRAINING_TESTS",
    "PipelineTesterMixin (tests/test_pipeline_mixin.py)": "pipelines built from tiny Hub checkpoints",
}


def run_one(family_name: str, variant: str, folder: Path) -> Outcome:
    """One run, in this process: the family's stock classes, or one conversion's generated classes."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    chosen = family(family_name)
    classes = stock_classes(chosen) if variant == STOCK else generated_classes(chosen, chosen.variant(variant), folder)
    return run_tests(classes)


def run_isolated(family_name: str, variant: str, timeout: float) -> dict[str, Any]:
    """One run in a process of its own; a crash or a timeout is recorded as the run's error."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "outcome.json"
        started = time.perf_counter()
        command = [sys.executable, __file__, "--one", family_name, variant, "--out", str(out)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
            error = None if out.is_file() else (done.stderr.strip().splitlines() or ["no output"])[-1]
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout:.0f} s"
        row: dict[str, Any] = {"family": family_name, "variant": variant, "commit": _commit(),
                               "seconds": round(time.perf_counter() - started, 1)}
        if error is not None:
            return {**row, "error": error}
        return {**json.loads(out.read_text()), **row}


def render(rows: list[dict[str, Any]], scope: str) -> str:
    """docs/transformers_suite.md from the runs' rows."""
    import torch
    import transformers

    by_key = {(row["family"], row["variant"]): row for row in rows}
    lines = [
        "# transformers' own model tests on generated code",
        "",
        "`benchmarks/transformers_suite.py` runs transformers' `ModelTesterMixin` (its `tests/test_modeling_common.py`",
        "for the installed version, fetched from the source distribution on the package index) on each family's",
        "stock classes, and on the classes of the module `normswap convert` writes for a conversion of a tiny model",
        "of that family, imported from the converted folder as it is (by its file path; the module registers its",
        "classes and model type with transformers' Auto classes). Both run under the same tester: a tiny config of",
        "the run's config class",
        "(the stock one, or the generated `Normswap<Family>Config`, one dimension wider where the conversion widens",
        "the stream) and the same seeded inputs. A test that stock passes and the generated classes fail or skip is",
        "a difference from stock; the target is none. (`test_load_with_mismatched_shapes` reloads a saved model",
        "through `AutoConfig` by its model type: the module registers it, `normswap-<family>-<digest of the",
        "module's source>`, so a checkpoint of another layout, another model type, still needs",
        "`trust_remote_code`.) In CI, `tests/test_transformers_suite.py` runs every test on Llama",
        "`--placement post` and nine chosen tests on one conversion of each other family.",
        "",
        f"Command: `{COMMAND}`",
        "",
        f"Run: {scope}; {datetime.date.today().isoformat()}; transformers {transformers.__version__}, torch "
        f"{torch.__version__}, Python {platform.python_version()}, "
        f"{', '.join(sorted({row.get('commit') or _commit() for row in rows}))}.",
        "",
        "| family | variant (flags) | passed | failed | skipped | not as stock | stock passed | stock failed "
        "| stock skipped | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for chosen in FAMILIES:
        stock = by_key.get((chosen.name, STOCK))
        if stock is None:
            continue
        for variant in chosen.variants:
            row = by_key.get((chosen.name, variant.name))
            if row is None:
                continue
            label = f"{variant.name} (`{' '.join(variant.flags)}`)"
            lines.append(f"| {chosen.name} | {label} | {_counts(row)} | {_lost(row, stock)} | {_counts(stock)} "
                         f"| {row['seconds']} |")
    lines += ["", "## Differences from stock", ""]
    differences = 0
    for row in rows:
        stock = by_key.get((row["family"], STOCK))
        if row["variant"] == STOCK or stock is None or "error" in stock:
            continue
        if "error" in row:
            lines.append(f"- {row['family']} {row['variant']}: the run did not finish: {row['error']}")
            differences += 1
            continue
        lost = Outcome.from_json(row).lost_from(Outcome.from_json(stock))
        groups: dict[str, list[str]] = collections.defaultdict(list)
        for name, reason in lost.items():
            groups[reason].append(name)
        for reason, names in groups.items():
            lines.append(f"- {row['family']} {row['variant']} ({len(names)}): {_names(names)}: {_quoted(reason)}")
            differences += 1
    if not differences:
        lines.append("None.")
    lines += ["", "## Stock failures under these testers", "",
              "Failures of the stock classes under this project's testers (transformers' own test classes override",
              "or skip these); a generated class failing them too is not a difference.", ""]
    stock_failures = [f"- {row['family']}: `{name}`: {_quoted(line)}" for row in rows if row["variant"] == STOCK
                      for name, line in sorted(row.get("failed", {}).items())]
    lines += stock_failures or ["None."]
    lines += ["", "## Skipped as stock skips them", "",
              "Skipped for the stock classes (hardware, optional packages, features the family lacks); the reason is",
              "transformers' own. Tests skipped by every family:", ""]
    lines += _skips([row for row in rows if row["variant"] == STOCK and "error" not in row])
    lines += ["", "## How the testers differ from transformers' own", "",
              "- The testers (`tests/transformers_suite_families.py`, `tests/transformers_suite_tester.py`) are this",
              "  project's: tiny configs as transformers' own testers build them, not their exact values, and none of",
              "  the test classes' overrides. A stock failure above is one such override missing, not a bug.",
              "- `test_can_init_all_missing_weights` runs for every family (transformers runs it only where the",
              "  config class's file has a copyright of 2023 or later; a generated module's is its modeling file's",
              "  header, which Qwen2's lacks, so it would skip where stock runs).",
              "- Each run is a process of its own; inputs come from a seeded generator."]
    lines += ["", "## Not run", "", "Not in the source distribution's `tests/` (the two mixins stand in as empty "
              "classes, so `test_generation_tester_mixin_inheritance` passes trivially):", ""]
    lines += [f"- {name}: {what}" for name, what in NOT_RUNNABLE.items()]
    lines += ["", "In the source distribution, not run:", ""]
    lines += [f"- {name}: {what}" for name, what in NOT_RUN.items()]
    return "\n".join(lines) + "\n"


def _counts(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"error: {row['error']} | | "
    return f"{len(row['passed'])} | {len(row['failed'])} | {len(row['skipped'])}"


def _lost(row: dict[str, Any], stock: dict[str, Any]) -> str:
    if "error" in row or "error" in stock:
        return "?"
    return str(len(Outcome.from_json(row).lost_from(Outcome.from_json(stock))))


def _quoted(text: str, limit: int = 240) -> str:
    """An error line as inline code, whatever backticks it holds, cut at ``limit`` characters."""
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _names(names: list[str]) -> str:
    shown = ", ".join(f"`{name}`" for name in names[:4])
    return shown + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _skips(stock_rows: list[dict[str, Any]]) -> list[str]:
    if not stock_rows:
        return ["None measured."]
    everywhere = set.intersection(*(set(row["skipped"]) for row in stock_rows))
    reasons: dict[str, list[str]] = collections.defaultdict(list)
    for name in sorted(everywhere):
        reasons[stock_rows[0]["skipped"][name]].append(name)
    lines = [f"- {reason}: {', '.join(f'`{n}`' for n in names)}" for reason, names in sorted(reasons.items())]
    lines += ["", "Skipped by some families only:", ""]
    for row in stock_rows:
        own = {name: reason for name, reason in sorted(row["skipped"].items()) if name not in everywhere}
        if own:
            lines.append(f"- {row['family']}: " + "; ".join(f"`{n}` ({r})" for n, r in own.items()))
    return lines


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    return f"normswap commit {done.stdout.strip()}" if done.returncode == 0 else "normswap (no git checkout)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", help="comma-separated family names (default: all)")
    parser.add_argument("--json", type=Path, help="write every run's outcome here")
    parser.add_argument("--markdown", type=Path, help="write the table document here")
    parser.add_argument("--scope", help="what the run covers, for the document (default: the families)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take")
    parser.add_argument("--render", nargs="+", type=Path, metavar="RUN.json",
                        help="render --markdown from earlier runs' --json files (a later file's rows replace an "
                             "earlier one's for the same family and variant), running nothing")
    parser.add_argument("--one", nargs=2, metavar=("FAMILY", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as scratch:
            outcome = run_one(*args.one, Path(scratch))
        args.out.write_text(json.dumps(outcome.as_json()))
        return
    if args.render:
        merged = {(row["family"], row["variant"]): row for path in args.render for row in json.loads(path.read_text())}
        text = render(list(merged.values()), args.scope or "merged from " + ", ".join(p.name for p in args.render))
        if args.markdown:
            args.markdown.write_text(text)
        else:
            print(text)
        return
    try:
        transformers_tests_folder()  # fetched once, before the runs
    except MissingTestFilesError as error:
        sys.exit(f"error: {error}")
    names = args.families.split(",") if args.families else [f.name for f in FAMILIES]
    rows = []
    for name in names:
        for variant in (STOCK, *(v.name for v in family(name).variants)):
            row = run_isolated(name, variant, args.timeout)
            rows.append(row)
            print(f"{name:10} {variant:16} {_counts(row).replace(' | ', ' / ')} ({row['seconds']} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    text = render(rows, args.scope or "families " + ", ".join(names))
    if args.markdown:
        args.markdown.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
