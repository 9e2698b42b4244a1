"""Shared benchmark helpers: interleaved side-by-side timing with medians, and markdown tables."""

from algos.bench.timing import markdown_table, median, time_interleaved

__all__ = ["time_interleaved", "median", "markdown_table"]
