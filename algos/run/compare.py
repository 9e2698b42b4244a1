"""``algos compare``: a baseline and one run per recipe, side by side: a table, ``results.json`` / ``results.csv`` and
``compare.png`` (the main metric against training throughput, then every metric over training batches and over
training wall-clock time). Each run is also judged Composer's way, by time to quality against its group's baseline
(``algos.run.quality``): the speed-up at matched quality and the time it took to the baseline's final quality.

Arguments are groups: a YAML with a ``model:`` section is a base and starts a group, the recipes after it are run on
top of it, each group's first run being its base alone (the baseline its speed-ups are measured against).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf
from tabulate import tabulate

from algos.run.build import build, default_name
from algos.run.config import load_config, recipe_header
from algos.run.quality import TimeToQuality, quality_curve, time_to_quality
from algos.run.registry import ConfigError
from algos.run.rundir import run_lock
from algos.run.runner import check_run_dir, run


def split_groups(paths: list[str]) -> list[tuple[str, list[str]]]:
    """``[base, recipe, recipe, base, recipe]`` -> ``[(base, [recipe, recipe]), (base, [recipe])]``."""
    groups: list[tuple[str, list[str]]] = []
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path!r} does not exist")
        if "model" in (OmegaConf.load(path) or {}):
            groups.append((path, []))
        elif not groups:
            base = recipe_header(path).get("base")
            hint = f", e.g. its header's {base}" if base else ""
            raise ConfigError(f"{path} has no model: section, so it is a recipe; give a base YAML (one with model:, "
                              f"see yamls/) before it{hint}")
        else:
            groups[-1][1].append(path)
    if not groups:
        raise ConfigError("no config given: pass a base YAML (see yamls/) and recipes (see recipes/)")
    return groups


def compare(paths: list[str], overrides: list[str] = (), out: str = "runs/compare",
            overwrite: bool = False) -> list[dict]:
    """Run every group's baseline and recipes into ``out/<name>``, then write and print the comparison. ``out`` is
    locked for the whole comparison, as each run directory is for its run (``algos.run.rundir.run_lock``)."""
    out_dir = Path(out)
    with run_lock(out_dir, label="--out"):
        return _compare(paths, overrides, out_dir, overwrite)


def _compare(paths: list[str], overrides: list[str], out_dir: Path, overwrite: bool) -> list[dict]:
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"--out {str(out_dir)!r} already exists; pass --overwrite to replace its runs, or another "
                          f"--out")
    plan = []
    for base, recipes in split_groups(paths):
        for files in ([base], *([base, recipe] for recipe in recipes)):
            name = default_name(files)
            config = load_config(files, [*overrides, f"run.name={name}", f"run.dir={out_dir / name}",
                                         f"run.overwrite={str(overwrite).lower()}"])
            plan.append((default_name([base]), config))
    for _, config in plan:  # every config and run directory is checked before the first run trains
        check_run_dir(build(config, for_training=False))
    summaries = []
    for group, config in plan:
        print(f"\n=== {config.run.name} ===")
        summary = run(config)
        summary["group"] = group
        summaries.append(summary)
    add_speedups(summaries)
    table = comparison_table(summaries)
    print("\n" + table)
    write_results(summaries, table, out_dir)
    print(f"\nwrote {out_dir}/results.json, results.csv, results.md and compare.png")
    return summaries


def add_speedups(summaries: list[dict]) -> None:
    """Each run's training throughput over its group baseline's (the first run of the group), and its time to
    quality against the baseline on the main metric (``time_to_quality``: None for the baseline itself)."""
    baselines: dict[str, dict] = {}
    metric = main_metric(summaries)
    for summary in summaries:
        baseline = baselines.setdefault(summary["group"], summary)
        summary["speedup"] = summary["samples_per_s"] / baseline["samples_per_s"]
        shared = metric if metric in summary["metrics"] and metric in baseline["metrics"] else None
        summary["time_to_quality"] = None if summary is baseline else {
            "metric": shared, **asdict(time_to_quality(summary, baseline, shared))}


def main_metric(summaries: list[dict]) -> str | None:
    names = [name for s in summaries for name in s["metrics"]]
    return next((name for name in names if "Accuracy" in name), names[0] if names else None)


def comparison_table(summaries: list[dict]) -> str:
    metric_names = list(dict.fromkeys(name for s in summaries for name in s["metrics"]))
    tokens = any(s.get("tokens_per_s") for s in summaries)
    generation = any(s.get("generate_ms_per_token") for s in summaries)
    metric = main_metric(summaries)
    headers = ["run", *metric_names, "train samples/s", *(["train tokens/s"] if tokens else []), "speed vs baseline",
               f"speed-up at matched {metric}", f"time to baseline's {metric}",
               *(["generate ms/token"] if generation else []), "parameters", "checkpoint MiB"]

    def optional(value, form: str) -> str:
        return format(value, form) if value else ""

    rows = [[s["name"], *(f"{s['metrics'][m]:.4f}" if m in s["metrics"] else "" for m in metric_names),
             f"{s['samples_per_s']:.0f}", *([optional(s.get("tokens_per_s"), ".0f")] if tokens else []),
             f"{s['speedup']:.2f}x", *quality_cells(s),
             *([optional(s.get("generate_ms_per_token"), ".2f")] if generation else []),
             f"{s['parameters']:,}", optional(s["checkpoint_bytes"] and s["checkpoint_bytes"] / 2**20, ".2f")]
            for s in summaries]
    return tabulate(rows, headers=headers, disable_numparse=True, tablefmt="github")


def quality_cells(summary: dict) -> list[str]:
    """The two time-to-quality cells of a run: ``baseline`` for a group's baseline."""
    record = summary.get("time_to_quality")
    if record is None:
        return ["baseline", "baseline"]
    result = TimeToQuality(**{key: value for key, value in record.items() if key != "metric"})
    return [result.speedup_text(), result.time_text()]


CSV_FIELDS = ("name", "group", "samples_per_s", "tokens_per_s", "speedup", "generate_ms_per_token", "parameters",
              "peak_memory_bytes", "checkpoint_bytes", "batches", "final_train_loss")


def write_results(summaries: list[dict], table: str, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(summaries, indent=2))
    (out_dir / "results.md").write_text(table + "\n")
    metric_names = list(dict.fromkeys(name for s in summaries for name in s["metrics"]))
    with open(out_dir / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*CSV_FIELDS, *metric_names, "speedup_at_matched_quality", "seconds_to_baseline_quality"])
        for s in summaries:
            quality = s.get("time_to_quality") or {}
            writer.writerow([s.get(key) for key in CSV_FIELDS] + [s["metrics"].get(m, "") for m in metric_names]
                            + [quality.get("speedup"), quality.get("time_to_baseline")])
    plot(summaries, out_dir / "compare.png")


def plot(summaries: list[dict], path: Path) -> None:
    """Top row: the main metric against training throughput (tokens/s when every run counts tokens, else
    samples/s), one point per run; generation latency per token (generative runs); the train loss and each eval
    metric over training batches, one line per run (same colour as its point). Bottom row: each run's speed-up at
    matched quality (the main metric), then the train loss and each eval metric over training wall-clock time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = main_metric(summaries)
    eval_names = list(dict.fromkeys(name for s in summaries for _, m in s["history"]["eval"] for name in m))
    speed = "tokens_per_s" if all(s.get("tokens_per_s") for s in summaries) else "samples_per_s"
    generative = [s for s in summaries if s.get("generate_ms_per_token")]
    columns = 2 + bool(generative) + len(eval_names)
    figure, grid = plt.subplots(2, columns, figsize=(5 * columns, 8.4), squeeze=False)
    top, bottom = list(grid[0]), list(grid[1])
    if generative:
        bars = top.pop(1)
        bottom.pop(1).axis("off")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = list(dict.fromkeys(s["group"] for s in summaries))
    markers = {group: "osD^v<>p*h"[index % 10] for index, group in enumerate(groups)}
    for index, s in enumerate(summaries):
        colour = colours[index % len(colours)]
        if metric in s["metrics"]:
            top[0].scatter(s[speed], s["metrics"][metric], color=colour, marker=markers[s["group"]], s=60)
            top[0].annotate(s["name"], (s[speed], s["metrics"][metric]), textcoords="offset points",
                            xytext=(5, 5), fontsize=8)
        losses = s["history"]["train_loss"]
        loss_seconds = s.get("training_seconds", {}).get("train_loss", [])
        top[1].plot([b for b, _ in losses], [v for _, v in losses], color=colour, label=s["name"], lw=1)
        bottom[1].plot(loss_seconds, [v for _, v in losses][:len(loss_seconds)], color=colour, lw=1)
        for axis, time_axis, name in zip(top[2:], bottom[2:], eval_names, strict=True):
            points = [(b, m[name]) for b, m in s["history"]["eval"] if name in m]
            axis.plot([b for b, _ in points], [v for _, v in points], color=colour, marker="o", ms=3,
                      label=s["name"])
            curve = quality_curve(s, name)
            time_axis.plot([t for t, _ in curve], [v for _, v in curve], color=colour, marker="o", ms=3)
    top[0].margins(0.15)  # room for the labels
    if generative:
        bars.barh([s["name"] for s in generative], [s["generate_ms_per_token"] for s in generative],
                  color=[colours[summaries.index(s) % len(colours)] for s in generative])
        bars.invert_yaxis()
        bars.tick_params(axis="y", labelsize=7)
        bars.set(xlabel="ms per new token", title="generation latency (greedy, batch 1)")
    judged = [(index, s) for index, s in enumerate(summaries) if (s.get("time_to_quality") or {}).get("speedup")]
    bottom[0].barh([s["name"] for _, s in judged], [s["time_to_quality"]["speedup"] for _, s in judged],
                   color=[colours[index % len(colours)] for index, _ in judged])
    bottom[0].axvline(1.0, color="grey", lw=1)
    bottom[0].invert_yaxis()
    bottom[0].tick_params(axis="y", labelsize=7)
    bottom[0].set(xlabel="baseline's time to the run's final quality / the run's", title=f"speed-up at matched "
                  f"{metric}" + ("" if judged else " (no run to judge)"))
    top[0].set(xlabel=f"training throughput ({speed.split('_')[0]}/s)", ylabel=f"final {metric}",
               title=f"{metric} vs speed")
    top[1].set(xlabel="batch", ylabel="train loss", title="train loss", yscale="log")
    bottom[1].set(xlabel="training seconds (eval excluded)", ylabel="train loss", title="train loss over time",
                  yscale="log")
    for axis, time_axis, name in zip(top[2:], bottom[2:], eval_names, strict=True):
        axis.set(xlabel="batch", ylabel=name, title=f"eval {name}")
        time_axis.set(xlabel="training seconds (eval excluded)", ylabel=name, title=f"eval {name} over time")
    top[1].legend(fontsize=7)
    for axis in [*top, *bottom]:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
