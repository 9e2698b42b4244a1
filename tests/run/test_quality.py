"""Time to quality on hand-made run histories: interpolation between evals, metrics where lower is better, a
quality that is never reached, ties, a flat baseline, runs that end above anything the baseline reached, and the
table's messages for a run or baseline without the metric."""

import pytest

from algos.run.compare import add_speedups, comparison_table
from algos.run.quality import higher_is_better, time_to_quality, time_to_reach


def summary(name: str, evals: list[tuple[float, float]], metric: str = "Accuracy", group: str = "base",
            samples_per_s: float = 10.0) -> dict:
    """A run summary as ``algos run`` returns it, with evals (training seconds, value) every 10 batches."""
    return {"name": name, "group": group, "samples_per_s": samples_per_s, "tokens_per_s": None,
            "metrics": {metric: evals[-1][1]} if evals else {}, "parameters": 1, "checkpoint_bytes": None,
            "history": {"train_loss": [], "eval": [(10 * (i + 1), {metric: v}) for i, (_, v) in enumerate(evals)]},
            "training_seconds": {"train_loss": [], "eval": [t for t, _ in evals]}}


def test_time_to_reach_interpolates_between_evals():
    curve = [(10.0, 0.2), (20.0, 0.6), (30.0, 0.8)]
    assert time_to_reach(curve, 0.4) == pytest.approx(15.0)
    assert time_to_reach(curve, 0.7) == pytest.approx(25.0)
    assert time_to_reach(curve, 0.2) == 10.0  # reached at the first eval
    assert time_to_reach(curve, 0.81) is None
    assert time_to_reach([(10.0, 3.0), (20.0, 1.0)], 2.5, higher=False) == pytest.approx(12.5)  # a loss falling
    assert time_to_reach([(10.0, 0.5), (20.0, 0.3), (30.0, 0.7)], 0.6) == pytest.approx(27.5)  # after the dip


def test_metric_direction_from_its_name():
    assert higher_is_better("MulticlassAccuracy") and higher_is_better("EmbeddingCosine")
    assert not higher_is_better("LanguageCrossEntropy") and not higher_is_better("LanguagePerplexity")


def test_speedup_at_matched_quality_against_the_baseline():
    baseline = summary("base", [(10.0, 0.5), (20.0, 0.7), (40.0, 0.9)])
    faster = summary("fast", [(5.0, 0.5), (10.0, 0.8), (20.0, 0.85)])  # ends at 0.85: the baseline had it at 35 s
    result = time_to_quality(faster, baseline, "Accuracy")
    assert result.speedup == pytest.approx(35.0 / 20.0) and not result.at_least
    assert result.time_to_baseline is None and result.gap == pytest.approx(0.85 - 0.9)
    assert result.time_text() == "not reached (gap -0.0500)"
    better = summary("better", [(10.0, 0.6), (20.0, 0.95)])  # passes 0.9 at 18.57 s, ends above the baseline's best
    result = time_to_quality(better, baseline, "Accuracy")
    assert result.time_to_baseline == pytest.approx(10.0 + 10.0 * 0.3 / 0.35)
    assert result.at_least and result.speedup == pytest.approx(40.0 / 20.0)
    assert result.speedup_text() == ">= 2.00x"
    tie = time_to_quality(baseline, baseline, "Accuracy")
    assert tie.speedup == pytest.approx(1.0) and tie.time_to_baseline == pytest.approx(40.0)


def test_lower_is_better_metric_and_missing_evals():
    baseline = summary("base", [(10.0, 4.0), (20.0, 2.0)], metric="LanguageCrossEntropy")
    run = summary("run", [(5.0, 3.0), (10.0, 2.0)], metric="LanguageCrossEntropy")
    result = time_to_quality(run, baseline, "LanguageCrossEntropy")
    assert result.speedup == pytest.approx(20.0 / 10.0) and result.time_to_baseline == pytest.approx(10.0)
    assert time_to_quality(run, summary("base", []), "LanguageCrossEntropy").speedup_text() == "baseline has no eval"
    assert time_to_quality(summary("run", []), baseline, "LanguageCrossEntropy").time_text() == "no eval"
    assert time_to_quality(run, baseline, None).speedup_text() == "no shared metric"


def test_a_flat_baseline_has_no_speedup_to_match():
    """A healing run is scored against the unchanged model (cosine 1.0 at every eval): no curve, no speed-up."""
    reference = summary("base", [(10.0, 1.0), (20.0, 1.0)], metric="EmbeddingCosine")
    healed = summary("healed", [(10.0, 0.90), (20.0, 0.95)], metric="EmbeddingCosine")
    result = time_to_quality(healed, reference, "EmbeddingCosine")
    assert result.speedup is None and result.speedup_text() == "n/a (baseline flat at 1)"
    assert result.time_text() == "not reached (gap -0.0500)"
    one_eval = time_to_quality(healed, summary("base", [(20.0, 1.0)], metric="EmbeddingCosine"), "EmbeddingCosine")
    assert one_eval.speedup is not None  # a single evaluation is not a flat curve


def test_compare_table_has_the_time_to_quality_columns():
    runs = [summary("base", [(10.0, 0.5), (20.0, 0.7), (40.0, 0.9)]),
            summary("base+fast", [(5.0, 0.5), (10.0, 0.8), (20.0, 0.85)], samples_per_s=20.0),
            summary("other", [(10.0, 0.4)], metric="LanguageCrossEntropy", group="other"),
            summary("other+x", [(10.0, 0.3)], metric="LanguageCrossEntropy", group="other")]
    add_speedups(runs)
    assert runs[0]["time_to_quality"] is None and runs[1]["speedup"] == 2.0
    lines = comparison_table(runs).splitlines()
    assert "speed-up at matched Accuracy" in lines[0] and "time to baseline's Accuracy" in lines[0]
    assert "| baseline " in lines[2] and "| 1.75x " in lines[3] and "not reached (gap -0.0500)" in lines[3]
    assert "no shared metric" in lines[5]  # the main metric (Accuracy) is not among the other group's metrics
