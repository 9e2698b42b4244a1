"""Side-by-side timing for benchmarks/ (never for tests: the machine is shared and noisy).

Candidates run interleaved (A, B, C, A, B, C, ...) after warm-up, so drifts in machine load hit all of them alike;
compare medians, and report ratios rather than absolute times.
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch
from tabulate import tabulate
from torch import nn


def time_interleaved(candidates: dict[str, Callable[[], object]], *, repeats: int = 5, warmup: int = 2,
                     min_time: float = 0.02) -> dict[str, list[float]]:
    """Seconds per call of each candidate, ``repeats`` times each, interleaved; CUDA work is synchronised.

    Each measurement runs a candidate enough times back to back to take at least ``min_time`` seconds (like
    ``timeit``'s autorange), so sub-millisecond calls are not lost in timer and scheduling noise; that count comes
    from the last warm-up round, so a first call that compiles (numba, torch.compile) does not set it."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    loops: dict[str, int] = {}
    for index in range(warmup):
        for name, run in candidates.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            if index == warmup - 1:
                loops[name] = max(1, math.ceil(min_time / max(time.perf_counter() - start, 1e-9)))
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            sync()
            start = time.perf_counter()
            for _ in range(loops.get(name, 1)):
                run()
            sync()
            times[name].append((time.perf_counter() - start) / loops.get(name, 1))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def time_forward(models: dict[str, nn.Module], inputs, *, repeats: int = 5) -> dict[str, float]:
    """Median seconds of one inference forward of each model (eval mode, ``torch.inference_mode``), interleaved.
    ``inputs`` is a tensor, a dict of keyword arguments, or a list of them: a pool that each model walks through, one
    input per call. Time conditional compute (FFF) on a pool of different inputs: one input repeated keeps its tree
    path in cache and overstates the speed-up."""
    pool = inputs if isinstance(inputs, list) else [inputs]
    for model in models.values():
        model.eval()

    def forward(model: nn.Module):
        calls = itertools.cycle(pool)

        def run():
            batch = next(calls)
            with torch.inference_mode():
                model(**batch) if isinstance(batch, dict) else model(batch)
        return run

    times = time_interleaved({name: forward(model) for name, model in models.items()}, repeats=repeats)
    return {name: median(values) for name, values in times.items()}


def time_train_step(models: dict[str, nn.Module], inputs: dict, *, repeats: int = 5,
                    optimizer=torch.optim.AdamW) -> dict[str, float]:
    """Median seconds of one training step of each model (train mode; zero_grad, forward, backward, optimizer
    step), interleaved. Each model's forward takes ``inputs`` as keyword arguments and returns the loss."""
    def step(model: nn.Module):
        model.train()
        opt = optimizer(model.parameters())

        def run():
            opt.zero_grad()
            model(**inputs).backward()
            opt.step()
        return run

    times = time_interleaved({name: step(model) for name, model in models.items()}, repeats=repeats)
    return {name: median(values) for name, values in times.items()}


def timed_rows(models: dict[str, nn.Module], seconds: dict[str, float], baseline: str,
               decimals: int = 0) -> list[list[str]]:
    """Table rows [name, parameters, median time in ms, speed-up over ``baseline``] for timed ``models``."""
    return [[name, f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M",
             f"{seconds[name] * 1e3:.{decimals}f} ms", f"{seconds[baseline] / seconds[name]:.2f}x"]
            for name, model in models.items()]


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def run_parts(parser: argparse.ArgumentParser, parts: dict[str, Callable[[argparse.Namespace], str]]) -> None:
    """Add ``--parts`` (all by default) to ``parser``, run each chosen part with the parsed arguments, print its
    markdown after a line naming the CPU (or GPU) model, the thread count and torch."""
    parser.add_argument("--parts", default=",".join(parts), help=f"comma-separated, from: {', '.join(parts)}")
    args = parser.parse_args()
    chosen = args.parts.split(",")
    unknown = sorted(set(chosen) - parts.keys())
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {sorted(parts)}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_model()
    print(f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    for name in chosen:
        print(parts[name](args))
