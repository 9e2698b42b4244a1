"""Side-by-side timing for benchmarks/ (never for tests: the machine is shared and noisy).

Candidates run interleaved (A, B, C, A, B, C, ...) after warm-up, so drifts in machine load hit all of them alike;
compare medians, and report ratios rather than absolute times.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from tabulate import tabulate


def time_interleaved(candidates: dict[str, Callable[[], object]], *, repeats: int = 5,
                     warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each candidate, ``repeats`` times each, interleaved; CUDA work is synchronised."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    for _ in range(warmup):
        for run in candidates.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
