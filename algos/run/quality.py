"""Time to quality, Composer's way of judging a training algorithm: how much sooner a run reaches a quality than its
baseline does, in training wall-clock time (evaluation excluded, Composer's ``Timestamp.total_wct``).

A run's quality curve is its eval metric at each evaluation, against the training seconds at that evaluation; the
time a curve first reaches a quality q is interpolated linearly between the two evaluations around the crossing
(the curve is taken as a straight line between evals, and reaching q means >= q for a metric where higher is
better, <= q for a loss or an error).

* speed-up at matched quality, for the quality q_run the run ends with:
      t_baseline(q_run) / t_run(q_run)
  where t(q) is the first time the curve reaches q. Above 1x: the run got there sooner. When the baseline never
  reaches q_run (the run ends better than the baseline ever was), it is at least t_baseline(end) / t_run(q_run).
* time to the baseline's final quality q_base: t_run(q_base), or not reached with the gap q_run - q_base.

A baseline whose every evaluation reads the same value (a fixed reference, such as the unchanged pretrained model a
healing run is scored against: cosine 1.0 from the first eval) has no learning curve to match, so the speed-up is
``n/a`` there; the time to its quality (or the gap) still stands.
"""

from __future__ import annotations

from dataclasses import dataclass

# a metric whose name holds one of these is better when lower
LOWER_IS_BETTER = ("loss", "crossentropy", "perplexity", "error")


def higher_is_better(metric: str) -> bool:
    return not any(word in metric.lower() for word in LOWER_IS_BETTER)


def time_to_reach(curve: list[tuple[float, float]], quality: float, higher: bool = True) -> float | None:
    """The first time the piecewise-linear ``curve`` [(seconds, value), ...] reaches ``quality``, or None."""
    def reached(value: float) -> bool:
        return value >= quality if higher else value <= quality

    previous = None
    for seconds, value in curve:
        if reached(value):
            if previous is None:
                return seconds
            (t0, v0), (t1, v1) = previous, (seconds, value)
            return t0 + (t1 - t0) * (quality - v0) / (v1 - v0)  # v0 did not reach quality, so v1 != v0
        previous = (seconds, value)
    return None


def quality_curve(summary: dict, metric: str) -> list[tuple[float, float]]:
    """(training seconds, metric) at each evaluation of a run summary that has ``metric``."""
    seconds = summary.get("training_seconds", {}).get("eval", [])
    return [(t, metrics[metric]) for t, (_, metrics) in zip(seconds, summary["history"]["eval"], strict=False)
            if metric in metrics]


@dataclass
class TimeToQuality:
    """A run against its baseline: ``speedup`` (a float, or None with ``note`` saying why) and the time the run took
    to the baseline's final quality (``time_to_baseline``, or None with ``gap``: how far from it the run ends)."""

    speedup: float | None = None
    at_least: bool = False  # the baseline never reached the run's quality: speedup is a lower bound
    time_to_baseline: float | None = None
    gap: float | None = None
    note: str = ""

    def speedup_text(self) -> str:
        if self.speedup is None:
            return self.note
        return f"{'>= ' if self.at_least else ''}{self.speedup:.2f}x"

    def time_text(self) -> str:
        if self.time_to_baseline is not None:
            return f"{self.time_to_baseline:.1f} s"
        return self.note if self.gap is None else f"not reached (gap {self.gap:+.4f})"


def time_to_quality(run: dict, baseline: dict, metric: str | None) -> TimeToQuality:
    """``run`` against ``baseline`` (run summaries of ``algos run``) on ``metric``: see the module docstring."""
    if metric is None:
        return TimeToQuality(note="no shared metric")
    run_curve, base_curve = quality_curve(run, metric), quality_curve(baseline, metric)
    if not base_curve:
        return TimeToQuality(note="baseline has no eval")
    if not run_curve:
        return TimeToQuality(note="no eval")
    higher = higher_is_better(metric)
    final, base_final = run_curve[-1][1], base_curve[-1][1]
    result = TimeToQuality(time_to_baseline=time_to_reach(run_curve, base_final, higher))
    if result.time_to_baseline is None:
        result.gap = final - base_final
    if len(base_curve) > 1 and len({value for _, value in base_curve}) == 1:
        result.note = f"n/a (baseline flat at {base_final:.4g})"
        return result
    run_time = time_to_reach(run_curve, final, higher)
    base_time = time_to_reach(base_curve, final, higher)
    if base_time is None:
        base_time, result.at_least = base_curve[-1][0], True
    if run_time:
        result.speedup = base_time / run_time
    else:  # reached at 0 s (an eval before training): no time to compare
        result.note = "reached at 0 s"
    return result
