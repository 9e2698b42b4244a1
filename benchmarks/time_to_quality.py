"""Time to quality (issue 26): does a run with a surgery reach the baseline's quality sooner, Composer's way?

    .venv/bin/python benchmarks/time_to_quality.py --out runs/ttq --plot docs/time_to_quality.png   # minutes per run
    .venv/bin/python benchmarks/time_to_quality.py --out runs/ttq_tuned --batches 300 --eval-every 30 \
        --lrs 2.5e-4,5e-4,1e-3 --bracket 2 --tune-jobs 2 --metric LanguageCrossEntropy   # learning rates tuned first
    .venv/bin/python benchmarks/time_to_quality.py --batches 2 --eval-every 1 --seeds 0 --runs fnet_hybrid  # smoke
    .venv/bin/python benchmarks/time_to_quality.py --task digits --out runs/ttq_digits   # about a minute per seed

Masked-LM pre-training of a small BERT from scratch (``yamls/bert_base_mlm.yaml`` cut to ``--layers`` x
``--width`` with a ``--vocab``-token WordPiece vocabulary, offline: Python's reference documentation), the baseline
and each of ``--runs`` trained for the same number of batches with the same optimizer and schedule, per seed, through
``algos compare``; every run is judged against the same seed's baseline on masked-token accuracy
(``algos.run.quality``: the baseline's training time to the quality the run ends with over the run's, and the run's
time to the baseline's final quality). The held-out rows (``--val-fraction`` of the text) are masked once, so every
evaluation scores the same tokens. ``--task digits`` judges the quick-start's image runs the same way, trained for
``--epochs``. The table gives the median over seeds and the range; ``--plot`` draws each run's
accuracy against training time, one panel per seed.

A run is a stack of ``recipes/`` files plus settings of their algorithms (``RUNS``), written as one recipe into
``--out/recipes/`` so that ``algos compare`` names and runs it like any recipe. Without ``--lrs`` the runs share the
base YAML's learning rate (AdamW 5e-4, linear warm-up 6% and decay), tuned for none of them. With ``--lrs`` each run,
the baseline included, is tuned the same way first: trained once per learning rate on ``--tune-seed`` (same batches
and schedule, one evaluation at the end), it keeps the rate with the best final quality (``--out/tune.json``), written
into its recipe (and the baseline's into a copy of the base YAML) for the timed seeds. Run again with the same
``--out``, a tuning run already finished with the same config is not trained again (a wider grid costs only the new
rates). A run whose best rate is the grid's highest (lowest) is tried at double (half) that, up to ``--bracket`` times,
so that no run is held back by where the grid happens to end. Tuning times nothing, so its runs may share the cores
(``--tune-jobs``); the timed seeds run one at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from algos.bench import markdown_table  # noqa: E402
from algos.bench.timing import cpu_model  # noqa: E402
from algos.run.compare import compare, main_metric  # noqa: E402
from algos.run.quality import higher_is_better, quality_curve, time_to_quality, time_to_reach  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# name -> (recipes/ files, settings of their algorithms: of the first one's unless named; "{width}" is --width)
RUNS = {
    "fnet_hybrid": (["fnet_hybrid"], []),  # Fourier mixing in all layers but the last two
    "fnet": (["fnet"], []),  # Fourier mixing in every layer
    "fff": (["fff"], []),  # every FFN a neuron-form tree of depth 5 (6 of 63 node pairs per token)
    # every FFN a leaf-form tree of depth 2 (a token runs one leaf of {width} neurons, a quarter of the 4 x {width}
    # FFN): soft mixture with a hardening loss for the first quarter, then the hard path (one leaf per token)
    "fff_leaf": (["fff"], ["form=leaf", "depth=2", "leaf_width={width}", "hardening=0.1", "hardening_ramp=0.25dur",
                           "hard_training_at=0.25dur"]),
    "factorize": (["factorize"], ["apply_at=null", "init=svd"]),  # rank 25% from the first step
    "factorize_half": (["factorize"], []),  # rank 25% at half time, activation-aware from the trained layers
    "fnet_hybrid_fff": (["fnet_hybrid", "fff"], []),  # both of the above, from the first step
    # the two that gained most once their rates were tuned: all-FNet, and Factorize at INIT on what attention leaves
    "fnet_factorize": (["fnet", "factorize"], ["factorize.apply_at=null", "factorize.init=svd"]),
}


BASE = ROOT / "yamls/bert_base_mlm.yaml"
BASELINE = "baseline"  # the base YAML alone, in --out/tune.json's learning rates


def write_run_recipes(args, lrs: dict[str, float] | None = None, folder: str = "recipes") -> list[str]:
    """One recipe YAML per ``--runs`` entry in ``--out/<folder>/``: its recipes merged, its settings applied, and its
    tuned learning rate where ``lrs`` has one."""
    from omegaconf import OmegaConf

    folder = Path(args.out) / folder
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in args.runs:
        if name not in RUNS:
            raise SystemExit(f"--runs: {name!r} is not a run; valid: {', '.join(RUNS)}")
        files, settings = RUNS[name]
        config = OmegaConf.merge(*(OmegaConf.load(ROOT / "recipes" / f"{f}.yaml") for f in files))
        first = next(iter(config.algorithms))  # a setting is the first algorithm's unless it names its algorithm
        config = OmegaConf.merge(config, OmegaConf.from_dotlist(
            [f"algorithms.{s if s.split('.')[0] in config.algorithms else f'{first}.{s}'}".format(width=args.width)
             for s in settings]))
        tuned = f"; learning rate {lrs[name]:g} (tuned)" if lrs else ""
        if lrs:
            config.optimizer = {"lr": lrs[name]}  # merged over the base YAML's optimizer: only the rate changes
        path = folder / f"{name}.yaml"
        path.write_text(f"# {' + '.join(files)}" + (f" with {', '.join(settings)}" if settings else "").format(
            width=args.width) + tuned + "\n" + OmegaConf.to_yaml(config))
        paths.append(str(path))
    return paths


def write_tuned_base(args, lr: float) -> str:
    """The base YAML with the baseline's tuned learning rate, under its own name (the runs' names stay the same)."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(BASE)
    config.optimizer.lr = lr
    path = Path(args.out) / "base" / BASE.name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {BASE.relative_to(ROOT)} with the baseline's tuned learning rate {lr:g}\n"
                    + OmegaConf.to_yaml(config))
    return str(path)


def _train(files: list[str], settings: list[str], threads: int) -> subprocess.Popen:
    """One tuning run as its own ``algos run`` process (a Python process of its own: transformers' masked-LM collator
    refuses to seed inside a multiprocessing worker)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, "-m", "algos.run", *files, *settings], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finished_as(run_dir: Path, files: list[str], settings: list[str]) -> bool:
    """Whether ``run_dir`` holds a finished run (its summary.json) of exactly this config."""
    from omegaconf import OmegaConf

    from algos.run.config import load_config

    if not (run_dir / "summary.json").exists() or not (run_dir / "config.yaml").exists():
        return False
    return OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")) == OmegaConf.to_container(
        load_config(files, settings))


def rates_beyond_the_edge(quality: dict[str, dict[str, float | None]], higher: bool, factor: float = 2.0
                          ) -> dict[str, float]:
    """For each run whose best rate is the highest (lowest) it was tried at, the next rate up (down) by ``factor``:
    a best rate on the edge of the grid is not known to be the best, so the grid is widened until it is bracketed.
    Failed or non-finite results (a diverged run) count as worst."""
    extra = {}
    for name, values in quality.items():
        finite = {float(lr): value for lr, value in values.items() if value is not None and math.isfinite(value)}
        if not finite:
            continue
        best = (max if higher else min)(finite, key=finite.__getitem__)
        tried = [float(lr) for lr in values]
        if best == max(tried):
            extra[name] = best * factor
        elif best == min(tried):
            extra[name] = best / factor
    return extra


def _tuning_jobs(args, folder: Path, recipes: dict, rates: dict[str, list[float]]) -> dict:
    """(run, lr) -> (files, settings) of every tuning run not already finished with the same config."""
    jobs = {}
    for name, lrs in rates.items():
        for lr in lrs:
            files = [str(BASE)] + ([recipes[name]] if name in recipes else [])
            out = folder / f"{name}_lr{lr:g}"
            settings = [*overrides(args, args.tune_seed), f"optimizer.lr={lr}",
                        f"trainer.eval_interval={args.batches}ba", f"run.name={out.name}", f"run.dir={out}",
                        "run.overwrite=true"]
            if not finished_as(out, files, settings):  # a finished run of the same config is not trained again
                jobs[name, lr] = (files, settings)
    return jobs


def _train_all(jobs: dict, parallel: int) -> None:
    """Train ``jobs``, at most ``parallel`` at once, each with its share of the threads."""
    threads, waiting, running = max(1, torch.get_num_threads() // parallel), list(jobs), []
    while waiting or running:
        while waiting and len(running) < parallel:
            key = waiting.pop(0)
            running.append((key, _train(*jobs[key], threads)))
        key, process = running.pop(0)
        if process.wait() != 0:
            raise SystemExit(f"tuning run {key[0]} at lr {key[1]:g} failed:\n{process.stderr.read()[-3000:]}")


def tune(args) -> dict:
    """Each run's (and the baseline's) learning rate: the one whose ``--tune-seed`` run ends with the best quality on
    the held-out rows, over ``--lrs`` widened by up to ``--bracket`` doublings (halvings) for runs whose best rate is
    still on the grid's edge. Returns ``{"metric", "quality": {run: {lr: value}}, "chosen": {run: lr}}``."""
    names = [BASELINE, *args.runs]
    recipes = dict(zip(args.runs, write_run_recipes(args, folder="tune/recipes"), strict=True))
    folder, start = Path(args.out) / "tune", time.perf_counter()
    rates = {name: sorted(args.lrs) for name in names}
    for widening in range(args.bracket + 1):
        _train_all(_tuning_jobs(args, folder, recipes, rates), args.tune_jobs)
        metrics = {(name, lr): json.loads((folder / f"{name}_lr{lr:g}" / "summary.json").read_text())["metrics"]
                   for name in names for lr in rates[name]}
        metric = args.metric or main_metric([{"metrics": m} for m in metrics.values()])
        higher = higher_is_better(metric)
        quality = {name: {f"{lr:g}": metrics[name, lr].get(metric) for lr in sorted(rates[name])} for name in names}
        extra = rates_beyond_the_edge(quality, higher)
        if widening == args.bracket or not extra:
            break
        print(time.strftime("%H:%M:%S"), "widening the grid:",
              ", ".join(f"{name} {lr:g}" for name, lr in extra.items()), file=sys.stderr)
        for name, lr in extra.items():
            rates[name].append(lr)
    chosen = {name: float((max if higher else min)(
        (lr for lr, value in values.items() if value is not None and math.isfinite(value)), key=values.__getitem__))
        for name, values in quality.items()}
    print(time.strftime("%H:%M:%S"), f"tuning in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    tuned = {"metric": metric, "seed": args.tune_seed, "quality": quality, "chosen": chosen,
             "on_edge": sorted(extra)}  # runs whose best rate is still the grid's highest or lowest
    (Path(args.out) / "tune.json").write_text(json.dumps(tuned, indent=1))
    return tuned


def tuning_table(tuned: dict) -> str:
    """Each run's final quality per learning rate on the tuning seed, the kept one in bold."""
    lrs = sorted({lr for values in tuned["quality"].values() for lr in values}, key=float)
    rows = [[name, *(("**{:.4f}**" if float(lr) == tuned["chosen"][name] else "{:.4f}").format(values[lr])
                     if values.get(lr) is not None else "-" for lr in lrs)]
            for name, values in tuned["quality"].items()]
    return (f"Learning rate per run: final {tuned['metric']} on seed {tuned['seed']} (bold: kept)\n\n"
            + markdown_table(["run", *(f"lr {lr}" for lr in lrs)], rows) + "\n")


# --task digits: the quick-start's comparison (scikit-learn's digits, offline), each base with its recipes
DIGITS = ["yamls/digits_mlp.yaml", "recipes/factorize.yaml", "recipes/fff.yaml", "yamls/digits_vit.yaml",
          "recipes/fnet.yaml"]


def overrides(args, seed: int) -> list[str]:
    common = [f"run.seed={seed}", "trainer.progress_bar=false", "callbacks={}", *args.override]
    if args.task == "digits":
        return [f"trainer.max_duration={args.epochs}ep", f"trainer.save_interval={args.epochs}ep", *common]
    heads = max(1, args.width // 64)
    config = (f"{{num_hidden_layers: {args.layers}, hidden_size: {args.width}, num_attention_heads: {heads}, "
              f"intermediate_size: {4 * args.width}, max_position_embeddings: {args.seq_len}, "
              f"vocab_size: {args.vocab}}}")
    return [f"model.config={config}", f"data.seq_len={args.seq_len}", f"data.batch_size={args.batch_size}",
            f"data.val_fraction={args.val_fraction}", f"trainer.max_duration={args.batches}ba",
            f"trainer.eval_interval={args.eval_every}ba", "trainer.precision=fp32",
            f"trainer.save_interval={args.batches}ba", *common]


def run_seeds(args, tuned: dict | None = None) -> dict[int, list[dict]]:
    if args.task == "digits":
        paths = [str(ROOT / path) for path in DIGITS]
    elif tuned:
        lrs = tuned["chosen"]
        paths = [write_tuned_base(args, lrs[BASELINE]), *write_run_recipes(args, lrs)]
    else:
        paths = [str(BASE), *write_run_recipes(args)]
    results = {}
    for seed in args.seeds:
        start = time.perf_counter()
        results[seed] = compare(paths, overrides(args, seed), out=f"{args.out}/seed{seed}", overwrite=True)
        print(time.strftime("%H:%M:%S"), f"seed {seed} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return results


def spread(values: list[float], form: str = ".2f", unit: str = "x") -> str:
    if not values:
        return "-"
    text = f"{statistics.median(values):{form}}{unit}"
    return text if len(values) == 1 else f"{text} ({min(values):{form}}-{max(values):{form}})"


def batches_ratio(run: dict, baseline: dict, metric: str) -> float | None:
    """Quality per step: the batches the baseline took to the quality the run ends with, over the run's own (below
    1: the run needs more steps). Speed-up at matched quality ~ this x the throughput ratio."""
    def curve(summary):
        return [(batch, metrics[metric]) for batch, metrics in summary["history"]["eval"] if metric in metrics]

    if not curve(run) or not curve(baseline):
        return None
    quality, higher = curve(run)[-1][1], higher_is_better(metric)
    theirs, ours = time_to_reach(curve(baseline), quality, higher), time_to_reach(curve(run), quality, higher)
    return theirs / ours if theirs and ours else None


def trained(results: dict[int, list[dict]], args) -> str:
    """What the runs trained, read from the first run's resolved config (so that ``--from-results`` describes the
    runs it reads, not its own defaults); the arguments where that config is gone."""
    from omegaconf import OmegaConf

    path = Path(next(iter(results.values()))[0]["run_dir"]) / "config.yaml"
    if not path.exists():
        return (f"digits MLP and ViT, {args.epochs} epochs" if args.task == "digits" else
                f"BERT {args.layers} x {args.width}, masked LM, vocabulary {args.vocab}, batch {args.batch_size} x "
                f"{args.seq_len}, {args.batches} batches, eval every {args.eval_every}")
    config = OmegaConf.load(path)
    if "config" not in config.model:
        return f"digits MLP and ViT, {config.trainer.max_duration}"
    bert = config.model.config
    return (f"BERT {bert.num_hidden_layers} x {bert.hidden_size}, masked LM, vocabulary {bert.vocab_size}, batch "
            f"{config.data.batch_size} x {config.data.seq_len}, {config.trainer.max_duration}, eval every "
            f"{config.trainer.eval_interval}")


def report(results: dict[int, list[dict]], args) -> str:
    names = [s["name"] for s in next(iter(results.values()))]
    metric = args.metric or main_metric(next(iter(results.values())))
    rows = []
    for name in names:
        runs = [next(s for s in summaries if s["name"] == name) for summaries in results.values()]
        baselines = [next(s for s in summaries if s["group"] == run["group"]) for run, summaries in
                     zip(runs, results.values(), strict=True)]  # a group's first run is its baseline
        steps = [r for r in (batches_ratio(run, base, metric) for run, base in zip(runs, baselines, strict=True)
                             if run is not base) if r]
        quality = [time_to_quality(run, base, metric) for run, base in zip(runs, baselines, strict=True)
                   if run is not base]
        reached = [q.time_to_baseline for q in quality if q.time_to_baseline is not None]
        # Composer's other reading: the baseline's whole run over the run's time to the baseline's final quality
        sooner = [quality_curve(base, metric)[-1][0] / q.time_to_baseline
                  for q, base in zip(quality, [b for run, b in zip(runs, baselines, strict=True) if run is not b],
                                     strict=True) if q.time_to_baseline]
        gaps = [q.gap for q in quality if q.gap is not None]
        rows.append([name, spread([r["metrics"].get(metric, float("nan")) for r in runs], ".4f", ""),
                     spread([r["speedup"] for r in runs]),
                     "baseline" if not quality else spread(steps),
                     "baseline" if not quality else spread([q.speedup for q in quality if q.speedup]),
                     "baseline" if not quality else (
                         f"{len(reached)} of {len(quality)} seeds" + (f", {spread(reached, '.0f', ' s')}" if reached
                                                                       else "")
                         + (f"; final gap {spread(gaps, '+.4f', '')}" if gaps else "")),
                     "baseline" if not quality else (spread(sooner) if sooner else "not reached")])
    return "\n".join([
        f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads; {trained(results, args)}; "
        f"seeds {list(results)} "
        f"(median, range)\n",
        markdown_table(["run", f"final {metric}", "training throughput vs baseline",
                        "baseline's batches / run's to the run's final quality",
                        f"speed-up at matched {metric}", f"reached the baseline's final {metric}",
                        f"speed-up to the baseline's final {metric}"], rows), ""])


def plot(results: dict[int, list[dict]], path: str, metric: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric or main_metric(next(iter(results.values())))
    figure, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for axis, (seed, summaries) in zip(axes[0], results.items(), strict=True):
        for summary in summaries:
            curve = quality_curve(summary, metric)
            axis.plot([t for t, _ in curve], [v for _, v in curve], marker="o", ms=3, label=summary["name"])
        axis.set(xlabel="training seconds (eval excluded)", ylabel=metric, title=f"seed {seed}")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=["mlm", "digits"], default="mlm", help="mlm: a small BERT's masked-LM "
                        "pre-training and --runs; digits: the quick-start's comparison (MLP + Factorize, FFF; ViT + "
                        "FNet) for --epochs")
    parser.add_argument("--runs", default=",".join(RUNS), type=lambda s: s.split(","),
                        help=f"runs, each against the baseline (of: {', '.join(RUNS)})")
    parser.add_argument("--epochs", type=int, default=24, help="--task digits: epochs per run")
    parser.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--vocab", type=int, default=4096, help="WordPiece vocabulary (trained on the text)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of the text (all of it is "
                        "evaluated each time)")
    parser.add_argument("--metric", default=None, help="the quality judged and tuned on (default: the accuracy), "
                        "e.g. LanguageCrossEntropy: the held-out masked-LM loss, finer than the accuracy early on")
    parser.add_argument("--lrs", default=None, type=lambda s: [float(x) for x in s.split(",")],
                        help="tune each run's learning rate (the baseline's too) over these first, e.g. 5e-4,1e-3,2e-3")
    parser.add_argument("--bracket", type=int, default=0, help="--lrs: up to this many more rates per run, each "
                        "double (half) the best so far while that is the highest (lowest) tried")
    parser.add_argument("--tune-seed", type=int, default=0, help="--lrs: the seed the rates are tuned on")
    parser.add_argument("--tune-jobs", type=int, default=1, help="--lrs: tuning runs at once (each gets the threads / "
                        "this); tuning times nothing")
    parser.add_argument("--out", default="runs/time_to_quality")
    parser.add_argument("--plot", default=None, help="write the accuracy-over-time plot here (PNG)")
    parser.add_argument("--from-results", action="store_true", help="train nothing: report on --out's results")
    parser.add_argument("override", nargs="*", help="more key=value overrides for every run")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.lrs and args.task != "mlm":
        raise SystemExit("--lrs: learning-rate tuning is for --task mlm")
    tuning = Path(args.out) / "tune.json"
    if args.from_results:  # the tables and plot again from a finished benchmark's --out
        tuned = json.loads(tuning.read_text()) if tuning.exists() else None
        args.metric = args.metric or (tuned or {}).get("metric")  # judged on what it was tuned on
        results = {int(path.parent.name.removeprefix("seed")): json.loads(path.read_text())
                   for path in sorted(Path(args.out).glob("seed*/results.json"))}
    else:
        tuned = tune(args) if args.lrs else None
        results = run_seeds(args, tuned)
    if args.plot:
        plot(results, args.plot, args.metric)
    if tuned:
        print(tuning_table(tuned))
    print(report(results, args))


if __name__ == "__main__":
    main()
