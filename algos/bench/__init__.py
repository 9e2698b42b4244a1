"""Shared benchmark helpers: interleaved side-by-side timing with medians, and markdown tables."""

from algos.bench.timing import markdown_table, median, run_parts, time_forward, time_interleaved

__all__ = ["time_interleaved", "time_forward", "median", "markdown_table", "run_parts"]
