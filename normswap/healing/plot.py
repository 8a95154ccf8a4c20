"""A PNG of per-sublayer drift before and after healing: where the conversion hurt, and what healing mended.

Drift is ``1 - cosine`` of what each branch reads, on a log scale, so that 0.5 and 0.005 are both readable.
matplotlib is an optional extra (``pip install 'normswap[plot]'``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import NormswapError
from .api import HealReport

PLOT_FILE = "normswap_drift.png"
_FLOOR = 1e-6  # drift of a perfect match, so the log scale stays finite


def require_matplotlib() -> None:
    """Checked before healing starts, so a missing extra does not cost a training run."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise NormswapError("the drift plot needs matplotlib: pip install 'normswap[plot]' (or drop --plot)") from None


def plot_drift(report: HealReport, path: str | Path) -> Path:
    """Write the plot to ``path``; refuses with the fix when matplotlib is missing."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    series = [("before healing", report.before["entry_cosines"])]
    if report.warm_start:
        series.append(("after the warm start", report.warm_start["entry_cosines"]))
    series.append((f"after healing ({report.steps} steps)", report.after["entry_cosines"]))
    positions = list(range(len(series[0][1])))
    figure, axes = plt.subplots(figsize=(max(6.0, 0.35 * len(positions)), 4.0))
    for label, cosines in series:
        axes.plot(positions, [max(1.0 - c, _FLOOR) for c in cosines], marker="o", label=label)
    axes.set_yscale("log")
    axes.set_ylabel("1 - cosine to the original (held out)")
    axes.set_xticks(positions)
    axes.set_xticklabels(_short_names(report.entries, len(positions)), rotation=60, ha="right", fontsize=7)
    axes.set_xlabel("what each branch reads, in order (the last is the output)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    target = Path(path)
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target


def _short_names(entries: tuple[str, ...], count: int) -> list[str]:
    """Module paths without the parts every entry shares (``encoder.layer.3.attention...`` -> ``3.attention...``)."""
    if len(entries) != count:
        return [str(index) for index in range(count)]
    split = [entry.split(".") for entry in entries]
    shared = 0
    while all(len(parts) > shared + 1 for parts in split) and len({parts[shared] for parts in split}) == 1:
        shared += 1
    return [".".join(parts[shared:]) for parts in split]
