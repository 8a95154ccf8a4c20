"""Coverage matrix: every conversion cell on every family transformers ships, as a user would run it.

For each family that builds tiny from its config (``coverage_checks``), every parameter is perturbed, the
model is saved, inspected, and converted through the command line in a subprocess (``python -m normswap
convert ... --quiet --json``, with a timeout), so a crash is seen as the user sees it. A conversion that exits
0 is then loaded the way its card says, run on the source's inputs, run through ``generate()`` (causal LMs) and
re-inspected. Each cell gets one category: exact (with its relative difference), approximate (with its output
cosine), no-op, refused (with the message), usage (exit 2), bad output, or crash. Writes ``docs/coverage.md``.

    python benchmarks/coverage.py [--families a,b] [--sample] [--jobs N] [--out docs/coverage.md] [--json FILE]

The full run is a benchmark (tens of minutes on 2 cores); CI runs ``--sample``
(``tests/test_coverage_sample.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from coverage_checks import CATEGORIES, EXACT_BOUND, Cell  # noqa: E402 - the helper sits beside this script, loaded by path

# The CI sample (about two minutes on 2 cores): a family of each layout, and a few cells each: the exact
# paths, the cells issue 17 names, and one failure of each kind found by the full run.
SAMPLE: dict[str, tuple[str, ...]] = {
    "bert": ("placement pre",),  # post
    "distilbert": ("placement pre",),  # post: issue 17's bad output, good since its generated code loads
    "gpt2": ("norm rmsnorm",),  # pre, LayerNorm
    "llama": ("placement post", "norm layernorm --exact"),  # pre, RMSNorm
    "gpt_neox": ("placement post", "placement pre"),  # parallel: pre is its stock sequential form
    "t5": ("placement post",),  # pre, encoder-decoder through generated code
    "qwen3": ("norm layernorm --exact",),  # exact by construction (it was refused by a name list)
    "cohere": ("norm rmsnorm",),  # parallel: issue 17's, fixed
    "gemma2": ("norm rmsnorm", "placement post"),  # sandwich: placement converts since issue 18
    "olmo2": ("placement pre",),  # post-sublayer: converts since issue 18
    "bart": ("placement pre",),  # post, encoder-decoder
    "bloom": ("norm rmsnorm",),
}
SAMPLE_EXACT = (("gpt2", "norm rmsnorm"), ("llama", "norm layernorm --exact"), ("cohere", "norm rmsnorm"),
                ("gemma2", "norm rmsnorm"), ("qwen3", "norm layernorm --exact"))
# cells of the sample that fail today, and why: the sample test expects them to fail, strictly
KNOWN_FAILURES: dict[tuple[str, str], str] = {
}
FAMILY_SECONDS = 1800  # a worker's time limit is this per family it takes
FAMILY_BATCH = 5  # families per worker process at most: each start costs ~4 s of imports
DISCOVERY_BATCH = 24


@dataclass(frozen=True)
class Family:
    """One row of the matrix: what was built, its layout as inspected, and its cells."""

    name: str
    model_type: str = ""
    model_class: str = ""
    auto_class: str = ""
    hand_config: bool = False
    encoder_decoder: bool = False
    placement: str = ""
    norm: str = ""
    # a norm on a branch's output, inside its residual add (what makes a sublayer sandwich or post-sublayer):
    # issue 18's, which sets the family aside in issue 17's count also where its layout is mixed or parallel
    branch_output_norm: bool = False
    code: str = ""  # the normswap version (and commit) that made the row: merged runs keep each row's own
    cells: tuple[Cell, ...] = ()
    skipped: str = ""  # why the candidate is no row, where it is none

    @property
    def layout(self) -> str:
        return f"{self.placement}, encoder-decoder" if self.encoder_decoder else self.placement


@dataclass(frozen=True)
class Run:
    """A whole run: the rows, the skipped candidates and how long it took."""

    families: tuple[Family, ...]
    skipped: tuple[Family, ...]
    seconds: float
    jobs: int
    scope: str
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run(names: Iterable[str] | None, jobs: int, scope: str, sample: bool = False, state: Path | None = None,
        cells: Sequence[str] = ()) -> Run:
    """The matrix for ``names`` (None: every candidate transformers ships, found first); ``sample``: only the
    sample's cells (``SAMPLE``) and the inspection; ``cells``: these cells on every family instead of those its
    layout calls for. ``state``: a folder that keeps what is done, so that a run that was stopped goes on where it
    was."""
    import coverage_checks

    clock = _Clock(state)
    if state:
        state.mkdir(parents=True, exist_ok=True)
        _versions(state)  # the first piece's code names the whole run
    with tempfile.TemporaryDirectory(prefix="normswap-coverage-") as folder:
        work = Path(folder)
        journal = (lambda name: state / f"{name}.jsonl") if state else (lambda name: None)
        skipped: list[Family] = []
        if names is None:
            candidates = [c.name for c in coverage_checks.candidates()]
            lines = _batched(candidates, DISCOVERY_BATCH, jobs, work, "--discover", [], 60, journal("discovery"),
                             clock)
            skipped = [Family(name, skipped=_skip_reason(own)) for name, own in lines.items() if _skip_reason(own)]
            names = sorted(name for name, own in lines.items() if not _skip_reason(own))
        names = list(names)
        per_batch = max(1, min(FAMILY_BATCH, -(-len(names) // jobs)))  # the sample: one worker per job
        extra = (["--sample"] if sample else []) + (["--cells", ",".join(cells)] if cells else [])
        lines = _batched(names, per_batch, jobs, work, "--family", extra, FAMILY_SECONDS, journal("families"), clock)
    return _assembled(lines, skipped, clock.tick(), jobs, scope, _versions(state))


def _assembled(lines: dict[str, list[dict[str, Any]]], skipped: list[Family], seconds: float, jobs: int, scope: str,
               versions: dict[str, str]) -> Run:
    """A run from each family's worker lines and the candidates discovery skipped."""
    rows = [replace(_family(name, own), code=versions.get("normswap", "")) for name, own in lines.items()]
    families = tuple(sorted((r for r in rows if not r.skipped), key=lambda r: r.name))
    skipped = sorted([*skipped, *(r for r in rows if r.skipped)], key=lambda r: r.name)
    return Run(families, tuple(skipped), seconds, jobs, scope, versions)


def _journal_lines(journal: Path | None) -> dict[str, list[dict[str, Any]]]:
    """Each name's lines in a ``--state`` journal (none where there is no journal yet)."""
    found: dict[str, list[dict[str, Any]]] = {}
    if journal is not None and journal.exists():
        for line in map(json.loads, journal.read_text().splitlines()):
            found.setdefault(line["name"], []).append(line)
    return found


def merged(runs: list[Run], scope: str) -> Run:
    """One matrix from several runs, each family's row (or skip) from the last run that has it: the full matrix
    takes hours on 2 cores, so a change is followed by a run of the families it reaches, merged into the last
    full matrix (``docs/coverage.json``). ``versions`` says which code made how many rows."""
    rows: dict[str, Family] = {}
    for result in runs:
        for family in (*result.families, *result.skipped):
            rows[family.name] = family
    families = tuple(sorted((r for r in rows.values() if not r.skipped), key=lambda r: r.name))
    skipped = tuple(sorted((r for r in rows.values() if r.skipped), key=lambda r: r.name))
    made: dict[str, int] = {}
    for family in families:
        made[family.code or "?"] = made.get(family.code or "?", 0) + 1
    versions = {**runs[-1].versions,
                "normswap": ", ".join(f"{code} for {count} row{'s' * (count != 1)}" for code, count in made.items())}
    return Run(families, skipped, sum(result.seconds for result in runs), runs[-1].jobs, scope, versions)


def from_state(state: Path, jobs: int) -> Run:
    """The families a stopped run (``--state``) has finished, as a run of its own: the full matrix takes hours on
    2 cores, so it is run in pieces, and the document says how many candidates it covers so far."""
    lines = _journal_lines(state / "families.jsonl")
    finished = {name: own for name, own in lines.items() if any(line["kind"] in _FINAL for line in own)}
    found = _journal_lines(state / "discovery.jsonl")
    skipped = [Family(name, skipped=_skip_reason(own)) for name, own in found.items() if _skip_reason(own)]
    scope = f"every family, in part: {len(finished)} of the {len(found) - len(skipped)} candidates that build, so far"
    return _assembled(finished, skipped, _Clock(state).before, jobs, scope, _versions(state))


class _Clock:
    """Wall time of a run, summed over the sessions of a resumed one (kept in ``state/clock.json``)."""

    def __init__(self, state: Path | None) -> None:
        self.path = state / "clock.json" if state else None
        self.before = json.loads(self.path.read_text())["seconds"] if self.path and self.path.exists() else 0.0
        self.started = time.monotonic()
        self.lock = threading.Lock()

    def tick(self) -> float:
        """The seconds so far, saved."""
        with self.lock:
            seconds = self.before + time.monotonic() - self.started
            if self.path:
                self.path.write_text(json.dumps({"seconds": seconds}))
            return seconds


# --- the orchestrator: workers in subprocesses, so a family that kills its process costs only its row ---

def _batched(names: list[str], size: int, jobs: int, work: Path, flag: str, extra: list[str], seconds_each: int,
             journal: Path | None, clock: _Clock) -> dict[str, list[dict[str, Any]]]:
    """Each name's JSON lines from workers that take ``size`` names at a time, ``jobs`` workers at once. A worker
    that dies (or runs out of time) costs the name it was on, which gets a ``died`` line; the rest go on. Names
    the ``journal`` has finished are not run again; what finishes is added to it."""
    journaled = _journal_lines(journal)
    found: dict[str, list[dict[str, Any]]] = {name: journaled.get(name, []) for name in names}
    finished = {name for name, lines in found.items() if any(line["kind"] in _FINAL for line in lines)}
    for name in set(found) - finished:
        found[name] = []
    lock = threading.Lock()

    def work_through(batch: list[str]) -> None:
        while batch:
            lines = _worker([*extra, flag, ",".join(batch)], work, seconds_each * len(batch))
            done = {line["name"] for line in lines if line.get("kind") in _FINAL}
            rest = [name for name in batch if name not in done]
            if rest:  # the first one not done took the process down with it
                lines.insert(-1, {"name": rest[0], "kind": "died", "why": _last_words(lines)})
            with lock:
                for line in lines[:-1]:
                    found[line["name"]].append(line)
                if journal is not None:
                    with journal.open("a") as handle:
                        handle.writelines(json.dumps(line) + "\n" for line in lines[:-1])
            clock.tick()
            batch = rest[1:]

    todo = [name for name in names if name not in finished]
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(work_through, [todo[i:i + size] for i in range(0, len(todo), size)]))
    return found


_FINAL = ("done", "skip", "died")  # a name's last line


def _skip_reason(lines: list[dict[str, Any]]) -> str:
    """Why a candidate is no row ('' when it is one): its skip line, or the process it ended."""
    for line in lines:
        if line["kind"] == "skip":
            return str(line["skipped"])
        if line["kind"] == "died" and not any(other["kind"] == "family" for other in lines):
            return f"building it ended the check process ({line['why']})"
    return ""


def _family(name: str, lines: list[dict[str, Any]]) -> Family:
    """A row from its worker's lines; a cell that was started but never reported is a crash."""
    head = next((line for line in lines if line["kind"] == "family"), None)
    if head is None:
        return Family(name, skipped=_skip_reason(lines) or "no result")
    cells = [Cell(**line["cell"]) for line in lines if line["kind"] == "cell"]
    started = [line["cell"] for line in lines if line["kind"] == "start"]
    died = next((line["why"] for line in lines if line["kind"] == "died"), "no result")
    if len(started) > len(cells) - 1:  # the inspect cell has no start line
        cells.append(Cell(name, started[-1], "crash", message=f"the check process died ({died})"))
    fields = {k: v for k, v in head.items() if k not in ("kind", "name")}
    return Family(name, **fields, cells=tuple(cells))


def _worker(arguments: list[str], work: Path, timeout: int) -> list[dict[str, Any]]:
    """Run this script as a worker; its JSON lines, and an ``end`` line saying how it ended."""
    with tempfile.NamedTemporaryFile("r", dir=work, suffix=".jsonl", delete=False) as handle:
        record = Path(handle.name)
    command = [sys.executable, str(Path(__file__).resolve()), *arguments, "--record", str(record),
               "--work", str(work)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_environment(work),
                              check=False)
        end = {"kind": "end", "code": done.returncode, "stderr": done.stderr[-2000:]}
    except subprocess.TimeoutExpired:
        end = {"kind": "end", "code": None, "stderr": f"timed out after {timeout} s"}
    lines = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    record.unlink()
    return [*lines, end]


def _last_words(lines: list[dict[str, Any]]) -> str:
    end = lines[-1]
    tail = [line for line in str(end.get("stderr", "")).splitlines() if line.strip()]
    return f"exit {end.get('code')}: {tail[-1][:200] if tail else 'no message'}"


def _environment(work: Path) -> dict[str, str]:
    """Offline, one thread per process (the run is ``--jobs`` processes wide), modules cached in the work folder."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_MODULES_CACHE": str(work / "modules"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH", "")]))}


def _versions(state: Path | None = None) -> dict[str, str]:
    """What ran: versions and the normswap commit. A run in pieces keeps its first piece's in ``state``, so that
    rendering it later names the code that made it, not the code that renders."""
    saved = state / "versions.json" if state else None
    if saved is not None and saved.exists():
        return json.loads(saved.read_text())
    import torch
    import transformers

    import normswap

    commit = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    versions = {"normswap": normswap.__version__ + (f" ({commit})" if commit else ""),
                "transformers": transformers.__version__, "torch": torch.__version__, "python": sys.version.split()[0]}
    if saved is not None:
        saved.write_text(json.dumps(versions))
    return versions


# --- the workers ---

def _write(record: Path, line: dict[str, Any]) -> None:
    with record.open("a") as handle:
        handle.write(json.dumps(line) + "\n")


def _work_discover(names: list[str], record: Path) -> None:
    import coverage_checks as families

    for name in names:
        try:
            families.build(families.candidate(name))
            _write(record, {"name": name, "kind": "done"})
        except families.SkipError as error:
            _write(record, {"name": name, "kind": "skip", "skipped": str(error)})


def _work_families(names: list[str], record: Path, work: Path, sample: bool, cells: list[str]) -> None:
    import coverage_checks

    for name in names:
        folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
        try:
            coverage_checks.check_family(name, folder, lambda line, name=name: _write(record, {"name": name, **line}),
                                         SAMPLE.get(name) if sample else (cells or None))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        _write(record, {"name": name, "kind": "done"})


# --- the document ---

COLUMNS = ("placement pre", "placement post", "norm rmsnorm", "norm layernorm", "norm layernorm --exact")
_SHORT = {"crash": "CRASH", "bad output": "BAD", "usage": "usage", "refused": "refused"}


_NEXT_ISSUE = ("sandwich", "post-sublayer")  # placements issue 18 covers, which issue 17's target sets aside


def counts(result: Run, families: Callable[[Family], bool] = lambda family: True) -> dict[str, int]:
    """Conversion cells per category (the inspect cells are counted apart, as ``inspect ok`` and so on), over the
    rows ``families`` keeps."""
    found = dict.fromkeys(CATEGORIES, 0)
    for family in filter(families, result.families):
        for cell in family.cells:
            key = cell.category if cell.cell != "inspect" else f"inspect {cell.category}"
            found[key] = found.get(key, 0) + 1
    return found


def converting(result: Run, families: Callable[[Family], bool] = lambda family: True) -> float:
    """Exact and approximate cells among the conversion cells that had something to do (no-ops left out), over
    the rows ``families`` keeps."""
    found = counts(result, families)
    tried = sum(found[c] for c in CATEGORIES) - found["no-op"]
    return 100.0 * (found["exact"] + found["approximate"]) / tried if tried else 0.0


def summary(result: Run) -> str:
    found = counts(result)
    parts = ", ".join(f"{found[c]} {c}" for c in CATEGORIES)
    inspected = ", ".join(f"{v} {k}" for k, v in found.items() if k.startswith("inspect"))
    return (f"{len(result.families)} families ({len(result.skipped)} candidates skipped), {result.seconds:.0f} s: "
            f"{parts}; {converting(result):.0f}% converting ({converting(result, _issue_17):.0f}% without the "
            f"sandwich and post-sublayer families, {converting(result, _inspected):.0f}% also without the families "
            f"inspect refuses); {inspected}")


def _arrow(cell: str) -> str:
    """``placement pre`` -> ``→ pre``, ``norm layernorm --exact`` -> ``→ layernorm --exact``."""
    return cell if cell == "inspect" else "→ " + cell.split(" ", 1)[1]


def load(path: Path) -> Run:
    """A run written with ``--json``, to render again."""
    data = json.loads(path.read_text())

    def family(row: dict[str, Any]) -> Family:
        return Family(**{**row, "cells": tuple(Cell(**cell) for cell in row["cells"])})

    return Run(**{**data, "families": tuple(family(r) for r in data["families"]),
                  "skipped": tuple(family(r) for r in data["skipped"])})


def markdown(result: Run) -> str:
    """``docs/coverage.md``: the summary, the matrix, then every message, grouped, and the skipped candidates."""
    groups = _groups(result)
    lines = [*_introduction(result), *_summary_table(result), *_matrix(result, groups), *_messages(result, groups),
             *_skipped(result)]
    return "\n".join(lines) + "\n"


def _introduction(result: Run) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in result.versions.items())
    return [
        "# Coverage matrix", "",
        f"Generated by `python benchmarks/coverage.py --jobs {result.jobs}` ({result.scope}; {versions}); the run "
        f"took {result.seconds / 60:.0f} minutes on 2 CPU cores. Do not edit by hand: rerun the script (issue 17).",
        "",
        "Every model type that transformers' auto mappings name a model class for is a candidate. Its config is "
        "built with every common size field it has set small (hidden 64, 2 layers, 4 heads, 2 key-value heads "
        "where it has a count, vocabulary 128), in its sub-configs too; the candidate is a family if its "
        "preferred class (a seq2seq head for an encoder-decoder, else a masked-LM head, else a causal-LM head, "
        "else an image-text-to-text head, else the base model) builds within seconds and runs a forward pass on "
        "normswap's probe inputs. "
        "`tests/tiny_configs.py` is a second try where the generic sizing fails (marked *hand config*), and gives "
        "five layout variants no default config has (`opt_post`, `gpt_neox_sequential`, `falcon_sequential`, "
        "`falcon_new` (Falcon-40B's `new_decoder_architecture`), `stablelm_parallel`). "
        "Every parameter is then perturbed (+ 0.1 · N(0, 1)), and the model saved, "
        "inspected (`normswap inspect SRC --json`) and converted with "
        "`python -m normswap convert SRC DST ... --quiet --json` in a subprocess. A conversion that exits 0 is "
        "loaded as its card says (the source's auto class, `trust_remote_code=True` for generated code), run on "
        "the source's inputs, run through `generate(max_new_tokens=3)` (causal LMs) and re-inspected.", "",
        "Cells: the other placement (both for a layout that is neither pre nor post), `--norm rmsnorm` for "
        "LayerNorm and Gemma's offset RMSNorm, `--norm layernorm` and `--norm layernorm --exact` for RMSNorm "
        "(all of them where inspection fails or the kinds are mixed). Outcomes:", "",
        f"- **exact** `max|out − ref| / max|ref|` of the logits (of the last hidden state without a head), at most "
        f"{EXACT_BOUND:g}; **cos**: approximate, the mean per-token cosine of the same output against the "
        "source's; **no-op**: nothing to do, nothing written;",
        "- **refused**: exit 1 with a message; **usage**: exit 2; a refusal that names `--untie` as its fix (tied "
        "embeddings, which the flag writes twice) is followed as a user would, and the cell begins `with --untie:`;",
        "- **BAD** (bad output): DST does not load, its forward or `generate()` fails, an exact claim misses the "
        "bound or picks other greedy tokens, or DST re-inspects as another layout than the target;",
        "- **CRASH**: a traceback, an exit code other than 0/1/2, a timeout, or an error in which normswap says it "
        "is a normswap bug (its `internal error`, or a failed check of its own output).", "",
    ]


def _summary_table(result: Run) -> list[str]:
    found = counts(result)
    inspected = ", ".join(f"{v} {k.removeprefix('inspect ')}" for k, v in found.items() if k.startswith("inspect"))
    cells = sum(found[c] for c in CATEGORIES)
    return [
        "## Summary", "",
        f"{len(result.families)} families, {cells} conversion cells; {len(result.skipped)} candidates skipped "
        "(listed at the end). Inspection: " + inspected + ".", "",
        "| outcome | conversion cells |", "| --- | --- |",
        *(f"| {c} | {found[c]} |" for c in CATEGORIES),
        f"| **converting** (exact or approximate, of the cells that were not no-ops) | **{converting(result):.0f}%** |",
        f"| converting, the sandwich and post-sublayer families aside (issue 18's: those with that layout, and those "
        f"with another that norm a branch's output inside its residual add) | {converting(result, _issue_17):.0f}% |",
        f"| converting, only the families whose whole layout is sandwich or post-sublayer aside | "
        f"{converting(result, _whole_layout_aside):.0f}% |",
        f"| converting, also without the families `inspect` refuses (no residual transformer: convolutional stages "
        f"of several widths, no residual add, no layer list) | {converting(result, _inspected):.0f}% |",
        "",
    ]


def _issue_17(family: Family) -> bool:
    """Issue 17's target sets aside the sandwich and post-sublayer families: those whose layout is one of them, and
    those with another layout and a sublayer that has a norm on its branch's output (OLMo-Hybrid's post-sublayer
    attention layers, A.X-K1's normed MoE output), whose conversion needs issue 18's stand-in for that norm."""
    return family.placement not in _NEXT_ISSUE and not family.branch_output_norm


def _whole_layout_aside(family: Family) -> bool:
    return family.placement not in _NEXT_ISSUE


def _inspected(family: Family) -> bool:
    return _issue_17(family) and any(cell.cell == "inspect" and cell.category == "ok" for cell in family.cells)


def _matrix(result: Run, groups: dict[tuple[str, str], str]) -> list[str]:
    lines = ["## Matrix", "",
             "| family | class | inspect | → pre | → post | → rmsnorm | → layernorm | → layernorm --exact |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for family in result.families:
        cells = {cell.cell: cell for cell in family.cells}
        inspected = cells.get("inspect")
        first = (f"{family.layout}, {family.norm}" if inspected is not None and inspected.category == "ok"
                 else _label(inspected, family, groups) if inspected is not None else "?")
        row = [_label(cells[c], family, groups) if c in cells else "–" for c in COLUMNS]
        hand = " *(hand config)*" if family.hand_config else ""
        lines.append(f"| {family.name}{hand} | {family.model_class} | {first} | " + " | ".join(row) + " |")
    return [*lines, ""]


def _label(cell: Cell, family: Family, groups: dict[tuple[str, str], str]) -> str:
    if cell.category == "exact":
        return f"exact {cell.figure:.0e}"
    if cell.category == "approximate":
        return f"cos {cell.figure:.3f}"
    if cell.category == "no-op":
        return "no-op"
    return f"{_SHORT[cell.category]} [{groups[cell.category, _general(cell.message, family)]}]"


def _groups(result: Run) -> dict[tuple[str, str], str]:
    """A label per (category, message with the family's names taken out), numbered by how many cells share it."""
    sizes: dict[tuple[str, str], int] = {}
    for family in result.families:
        for cell in family.cells:
            if cell.category in _SHORT:
                key = (cell.category, _general(cell.message, family))
                sizes[key] = sizes.get(key, 0) + 1
    labels: dict[tuple[str, str], str] = {}
    for category, tag in (("crash", "C"), ("bad output", "B"), ("usage", "U"), ("refused", "R")):
        ranked = sorted((k for k in sizes if k[0] == category), key=lambda k: (-sizes[k], k[1]))
        labels.update({key: f"{tag}{index}" for index, key in enumerate(ranked, 1)})
    return labels


def _general(message: str, family: Family) -> str:
    """The message with the family's own names as placeholders, so that one refusal of many families groups."""
    for name, placeholder in ((family.model_class, "<class>"), (family.model_type, "<family>"),
                              (family.name, "<family>")):
        if name:
            message = re.sub(rf"(?<!\w){re.escape(name)}(?!\w)", placeholder, message)
    return re.sub(r"'[^']*, \d+ layers'", "'<its summary>'", message)  # the one-line summary inspect prints


def _messages(result: Run, groups: dict[tuple[str, str], str]) -> list[str]:
    lines: list[str] = []
    for category, title in (("crash", "Crashes"), ("bad output", "Bad outputs"), ("refused", "Refusals"),
                            ("usage", "Usage errors")):
        keyed = sorted(((label, key[1]) for key, label in groups.items() if key[0] == category),
                       key=lambda item: int(item[0][1:]))
        if not keyed:
            continue
        lines += [f"## {title}", "", "`<family>` and `<class>` stand for each family's model type and class.", ""]
        for label, message in keyed:
            where = [f"{f.name} {_arrow(c.cell)}" for f in result.families for c in f.cells
                     if c.category == category and _general(c.message, f) == message]
            lines.append(f"- **[{label}]** {message} — {len(where)} cell{'s' * (len(where) != 1)}: "
                         f"{', '.join(where)}")
        lines.append("")
    return lines


_REASONS = (("takes '", "takes inputs normswap's probe cannot give"),
            ("parameters at the tiny sizes", "too large at the tiny sizes"),
            ("the tiny sizes are not a valid config", "the tiny sizes are not a valid config"),
            ("needs arguments", "the config class needs arguments"),
            ("ended the check process", "building it ended the process"),
            ("does not load and run back", "transformers cannot load its own saved model back"),
            ("took more than", "too slow to build or run"),
            ("no model class", "no model class"))


def _reason_kind(reason: str) -> str:
    return next((kind for marker, kind in _REASONS if marker in reason), "building it or its forward pass fails")


def _skipped(result: Run) -> list[str]:
    kinds: dict[str, int] = {}
    for family in result.skipped:
        kinds[_reason_kind(family.skipped)] = kinds.get(_reason_kind(family.skipped), 0) + 1
    rows = sorted(result.skipped, key=lambda f: (_reason_kind(f.skipped), f.name))
    return [
        "## Skipped candidates", "",
        "Candidates that are no row, and why: " + ("; ".join(f"{kind}: {n}" for kind, n in
                                                               sorted(kinds.items(), key=lambda i: -i[1])) or "none")
        + ".", "",
        "| candidate | why | reason |", "| --- | --- | --- |",
        *(f"| {f.name} | {_reason_kind(f.skipped)} | {f.skipped.replace('|', '/')[:240]} |" for f in rows),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", help="comma-separated families (model types or variants) instead of all")
    parser.add_argument("--sample", action="store_true", help=f"the CI sample: {', '.join(SAMPLE)}")
    parser.add_argument("--jobs", type=int, default=1, help="families checked at once (each is one process)")
    parser.add_argument("--out", default=None, help="the Markdown document (default docs/coverage.md, full run only)")
    parser.add_argument("--json", dest="json_out", help="also write every record as JSON here")
    parser.add_argument("--state", help="a folder that keeps finished families, so that rerunning the same command "
                                         "after a stop goes on where it was")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="write --out and --json (default docs/coverage.md and docs/coverage.json) from several "
                             "runs' --json files, each family's row from the last file that has it")
    parser.add_argument("--scope", help="with --merge: what the merged runs were, for the document's first line")
    parser.add_argument("--render", help="write --out from an earlier run's --json file instead of running")
    parser.add_argument("--render-state", help="write --out (and --json) from the families a stopped run's --state "
                                               "folder has finished, instead of running")
    parser.add_argument("--cells", help="comma-separated conversion cells to run on every family instead of those "
                                        "its layout calls for (e.g. 'placement sandwich,placement post-sublayer'); "
                                        "the run then writes the summary and --json, never the matrix document")
    parser.add_argument("--discover", help=argparse.SUPPRESS)
    parser.add_argument("--family", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cells = args.cells.split(",") if args.cells else []
    if args.discover or args.family:
        import torch

        torch.set_num_threads(1)
        if args.discover:
            _work_discover(args.discover.split(","), Path(args.record))
        else:
            _work_families(args.family.split(","), Path(args.record), Path(args.work), args.sample, cells)
        return 0
    if args.render:
        Path(args.out or HERE.parent / "docs" / "coverage.md").write_text(markdown(load(Path(args.render))))
        return 0
    if args.merge:
        result = merged([load(Path(path)) for path in args.merge], args.scope or "merged runs")
        Path(args.out or HERE.parent / "docs" / "coverage.md").write_text(markdown(result))
        Path(args.json_out or HERE.parent / "docs" / "coverage.json").write_text(json.dumps(result.to_dict(), indent=1))
        print(summary(result))
        return 0
    if args.render_state:
        result = from_state(Path(args.render_state), max(1, args.jobs))
        Path(args.out or HERE.parent / "docs" / "coverage.md").write_text(markdown(result))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result.to_dict(), indent=1))
        print(summary(result))
        return 0
    names = list(SAMPLE) if args.sample else (args.families.split(",") if args.families else None)
    scope = "sample" if args.sample else ("selected families" if args.families else "every family")
    result = run(names, max(1, args.jobs), scope, sample=args.sample, state=Path(args.state) if args.state else None,
                 cells=cells)
    out = None if cells else args.out or (str(HERE.parent / "docs" / "coverage.md") if names is None else None)
    if out:
        Path(out).write_text(markdown(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result.to_dict(), indent=1))
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
