"""``algos compare``: a baseline and one run per recipe, side by side: a table, ``results.json`` / ``results.csv`` and
``compare.png`` (the main metric against training throughput, then every metric over training).

Arguments are groups: a YAML with a ``model:`` section is a base and starts a group, the recipes after it are run on
top of it, each group's first run being its base alone (the baseline its speed-ups are measured against).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from omegaconf import OmegaConf
from tabulate import tabulate

from algos.run.config import load_config
from algos.run.registry import ConfigError
from algos.run.rundir import run_lock
from algos.run.runner import build, check_run_dir, default_name, run


def split_groups(paths: list[str]) -> list[tuple[str, list[str]]]:
    """``[base, recipe, recipe, base, recipe]`` -> ``[(base, [recipe, recipe]), (base, [recipe])]``."""
    groups: list[tuple[str, list[str]]] = []
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path!r} does not exist")
        if "model" in (OmegaConf.load(path) or {}):
            groups.append((path, []))
        elif not groups:
            raise ConfigError(f"{path} has no model: section, so it is a recipe; give a base YAML (one with model:, "
                              f"see yamls/) before it")
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
    """Each run's training throughput over its group baseline's (the first run of the group)."""
    baselines: dict[str, float] = {}
    for summary in summaries:
        baseline = baselines.setdefault(summary["group"], summary["samples_per_s"])
        summary["speedup"] = summary["samples_per_s"] / baseline


def main_metric(summaries: list[dict]) -> str | None:
    names = [name for s in summaries for name in s["metrics"]]
    return next((name for name in names if "Accuracy" in name), names[0] if names else None)


def comparison_table(summaries: list[dict]) -> str:
    metric_names = list(dict.fromkeys(name for s in summaries for name in s["metrics"]))
    tokens = any(s.get("tokens_per_s") for s in summaries)
    generation = any(s.get("generate_ms_per_token") for s in summaries)
    headers = ["run", *metric_names, "train samples/s", *(["train tokens/s"] if tokens else []), "speed vs baseline",
               *(["generate ms/token"] if generation else []), "parameters", "checkpoint MiB"]

    def optional(value, form: str) -> str:
        return format(value, form) if value else ""

    rows = [[s["name"], *(f"{s['metrics'][m]:.4f}" if m in s["metrics"] else "" for m in metric_names),
             f"{s['samples_per_s']:.0f}", *([optional(s.get("tokens_per_s"), ".0f")] if tokens else []),
             f"{s['speedup']:.2f}x", *([optional(s.get("generate_ms_per_token"), ".2f")] if generation else []),
             f"{s['parameters']:,}", optional(s["checkpoint_bytes"] and s["checkpoint_bytes"] / 2**20, ".2f")]
            for s in summaries]
    return tabulate(rows, headers=headers, disable_numparse=True, tablefmt="github")


CSV_FIELDS = ("name", "group", "samples_per_s", "tokens_per_s", "speedup", "generate_ms_per_token", "parameters",
              "peak_memory_bytes", "checkpoint_bytes", "batches", "final_train_loss")


def write_results(summaries: list[dict], table: str, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(summaries, indent=2))
    (out_dir / "results.md").write_text(table + "\n")
    metric_names = list(dict.fromkeys(name for s in summaries for name in s["metrics"]))
    with open(out_dir / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*CSV_FIELDS, *metric_names])
        for s in summaries:
            writer.writerow([s.get(key) for key in CSV_FIELDS] + [s["metrics"].get(m, "") for m in metric_names])
    plot(summaries, out_dir / "compare.png")


def plot(summaries: list[dict], path: Path) -> None:
    """Left: main metric against training throughput (tokens/s when every run counts tokens, else samples/s), one
    point per run. Then generation latency per token (generative runs), the train loss and each eval metric over
    training batches, one line per run (same colour as its point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = main_metric(summaries)
    eval_names = list(dict.fromkeys(name for s in summaries for _, m in s["history"]["eval"] for name in m))
    speed = "tokens_per_s" if all(s.get("tokens_per_s") for s in summaries) else "samples_per_s"
    generative = [s for s in summaries if s.get("generate_ms_per_token")]
    panels = 2 + bool(generative) + len(eval_names)
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    if generative:
        bars = axes[1]
        axes = [axes[0], *axes[2:]]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = list(dict.fromkeys(s["group"] for s in summaries))
    markers = {group: "osD^v<>p*h"[index % 10] for index, group in enumerate(groups)}
    for index, s in enumerate(summaries):
        colour = colours[index % len(colours)]
        if metric in s["metrics"]:
            axes[0].scatter(s[speed], s["metrics"][metric], color=colour, marker=markers[s["group"]], s=60)
            axes[0].annotate(s["name"], (s[speed], s["metrics"][metric]), textcoords="offset points",
                             xytext=(5, 5), fontsize=8)
        losses = s["history"]["train_loss"]
        axes[1].plot([b for b, _ in losses], [v for _, v in losses], color=colour, label=s["name"], lw=1)
        for axis, name in zip(axes[2:], eval_names, strict=True):
            points = [(b, m[name]) for b, m in s["history"]["eval"] if name in m]
            axis.plot([b for b, _ in points], [v for _, v in points], color=colour, marker="o", ms=3,
                      label=s["name"])
    axes[0].margins(0.15)  # room for the labels
    if generative:
        bars.barh([s["name"] for s in generative], [s["generate_ms_per_token"] for s in generative],
                  color=[colours[summaries.index(s) % len(colours)] for s in generative])
        bars.invert_yaxis()
        bars.tick_params(axis="y", labelsize=7)
        bars.set(xlabel="ms per new token", title="generation latency (greedy, batch 1)")
    axes[0].set(xlabel=f"training throughput ({speed.split('_')[0]}/s)", ylabel=f"final {metric}",
                title=f"{metric} vs speed")
    axes[1].set(xlabel="batch", ylabel="train loss", title="train loss", yscale="log")
    for axis, name in zip(axes[2:], eval_names, strict=True):
        axis.set(xlabel="batch", ylabel=name, title=f"eval {name}")
    axes[1].legend(fontsize=7)
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
