"""Side-by-side timing shared by the benchmarks: interleaved pairs, alternating order, median of ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ratio(baseline: Callable[[], object], candidate: Callable[[], object], repeats: int,
                 synchronise: Callable[[], object] = lambda: None, warmup: int = 3) -> tuple[float, float, float]:
    """Median seconds of each, and the median of per-pair ratios candidate / baseline. ``synchronise`` waits
    for queued device work (``torch.cuda.synchronize``) before each clock reading."""
    for _ in range(warmup):
        baseline(), candidate()
    base_times, cand_times, ratios = [], [], []
    for index in range(repeats):
        order = (baseline, candidate) if index % 2 == 0 else (candidate, baseline)
        times = []
        for run in order:
            synchronise()
            start = time.perf_counter()
            run()
            synchronise()
            times.append(time.perf_counter() - start)
        t_base, t_cand = times if index % 2 == 0 else times[::-1]
        base_times.append(t_base)
        cand_times.append(t_cand)
        ratios.append(t_cand / t_base)
    return statistics.median(base_times), statistics.median(cand_times), statistics.median(ratios)
