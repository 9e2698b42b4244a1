"""Shared benchmark helpers: interleaved side-by-side timing with medians, markdown tables, and the small training
loop the accuracy parts share."""

from algos.bench.timing import (
    markdown_table,
    median,
    run_parts,
    time_forward,
    time_interleaved,
    time_train_step,
    timed_rows,
)
from algos.bench.training import loader_accuracy, train_steps

__all__ = ["time_interleaved", "time_forward", "time_train_step", "timed_rows", "median", "markdown_table", "run_parts",
           "train_steps", "loader_accuracy"]
