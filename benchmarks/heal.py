"""Healing benchmark (issue 16): surgery on the real pretrained all-MiniLM-L6-v2, then layer-wise fitting and
self-distillation, scored on held-out sentences against the original model. Prints markdown.

    .venv/bin/python benchmarks/heal.py                                  # --steps 100,300,600,1000, every surgery
    .venv/bin/python benchmarks/heal.py --surgeries FNet-Hybrid --save fnet_hybrid.json   # one surgery
    .venv/bin/python benchmarks/heal.py --parts replot --results a.json,b.json --plot docs/heal.png
    .venv/bin/python benchmarks/heal.py --steps 2 --sentences 32 --fit-steps 5 --repeats 1   # smoke run, ~2 min
    .venv/bin/python benchmarks/heal.py --parts speed                    # FFF settings: encoder speed-ups only
    .venv/bin/python benchmarks/heal.py --parts defaults                 # distill's defaults vs the recipe

The model is the runner's ``sentence_encoder`` (offline weights of the ``heal`` extra), the text the runner's
``sentences`` data (Python's reference documentation split into sentences): its held-out split is only ever embedded
and scored, never used for calibration, fitting or distillation; the training split gives the calibration batches
and the unlabeled distillation batches (batch 16). Surgery and healing run on the ``BertModel`` inside the encoder.

(a) heal: for each surgery (Factorize rank 0.25 init="activation"; FFF (``--fff``, default leaf form depth 2 x 384,
    init="dense"); FNet-Hybrid keeping the last 2 attention layers; all-FNet), the mean cosine between each held-out
    sentence's embedding (mean-pooled, normalised, as sentence-transformers) and the original model's, and the
    Spearman correlation of all pairwise similarities against the original's: right after surgery, after fitting
    (``fit_steps``, Factorize and FFF), and during one run of fitting + pure distillation (``algos.distill``,
    teacher = a copy of the model before surgery) of max(``--steps``) steps, scored at each of ``--steps``. The
    distillation recipe (``recipe``): AdamW at ``--lr`` with a 5% linear warm-up and cosine decay to 0 at the last
    step, 1 - cosine of the mean-pooled sentence embeddings (``embedding_weight=1``), plus every layer's hidden-state
    MSE for Factorize and FFF (``hidden_weight=1``; 0 for FNet, whose changed token mixing it holds back). Baselines,
    at ``--baseline-steps``: the same recipe with no fitting; the plain loop of issue 16 (every layer's hidden-state
    MSE only, constant lr); the last layer's hidden-state MSE only (``layers=["encoder.layer.5"]``), constant lr.
    Wall time of each healing phase (this CPU, scoring excluded), and the encoder's forward speed-up at batch
    32 x 128 against the original, timed side by side (``algos.bench.time_forward``). ``--plot``: cosine against
    healing steps, one line per surgery.
(b) speed: the encoder forward at batch 32 x 128, original vs every surgery and a few FFF settings (to choose one).
(c) replot: with ``--results a.json,b.json``, the plot from the ``--save`` files of runs over subsets of the
    surgeries (``--surgeries``); without it, nothing.
(d) defaults: ``distill`` with its defaults against the defaults before issue 24 and the recipe above, on issue
    24's cases (Factorize 25% with fit_steps 200 + 200 steps; FNet-Hybrid + 400 steps).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
from torch import nn

from algos import apply_factorization, apply_fff, apply_fnet_mixing, distill
from algos.bench import markdown_table, run_parts, time_forward, timed_rows
from algos.fff import FFF
from algos.run.data import DATA
from algos.run.metrics import EmbeddingCosine, SimilaritySpearman
from algos.run.models import MODELS, unit_embeddings

TARGETS = {"Factorize 25%": 0.97, "FFF": 0.95, "FNet-Hybrid": 0.93, "all-FNet": 0.85}
FFF_CHOICES = {"neuron8": dict(depth=8, form="neuron"), "neuron6": dict(depth=6, form="neuron"),
               "leaf3x64": dict(depth=3, form="leaf", leaf_width=64),
               "leaf4x32": dict(depth=4, form="leaf", leaf_width=32),
               "leaf1x768": dict(depth=1, form="leaf", leaf_width=768),
               "leaf2x384": dict(depth=2, form="leaf", leaf_width=384),
               "leaf2x192": dict(depth=2, form="leaf", leaf_width=192)}


def target_of(name: str) -> float:
    """The issue's cosine target for a surgery's name (the FFF names carry their setting: "FFF leaf2x384")."""
    return TARGETS["FFF" if name.startswith("FFF") else name]


def surgeries(args) -> dict:
    """name -> (surgery(model, calibration, fit_steps), has fitting)."""
    fff = FFF_CHOICES[args.fff]
    # padding="mask" (fixed length 128): a sentence's embedding does not depend on how much its batch pads it
    fnet = dict(impl="rfft", padding="mask", max_length=args.length)
    return {
        "Factorize 25%": (lambda m, c, f: apply_factorization(m, rank=0.25, init="activation", calibration=c,
                                                              fit_steps=f, fit_lr=args.fit_lr), True),
        "FFF": (lambda m, c, f: train_on_hard_path(apply_fff(m, init="dense", calibration=c, fit_steps=f,
                                                             fit_lr=args.fit_lr, **fff), m), True),
        "FNet-Hybrid": (lambda m, c, f: apply_fnet_mixing(m, keep_attention_layers=[-2, -1], **fnet), False),
        "all-FNet": (lambda m, c, f: apply_fnet_mixing(m, **fnet), False),
    }


def train_on_hard_path(report, model: nn.Module):
    """Leaf-form trees train on the path they are evaluated on (one leaf per token, as ``FFFReplace``'s
    ``hard_training_at``): the distilled function is the one scored, and a step costs a quarter of the leaves."""
    for module in model.modules():
        if isinstance(module, FFF):
            module.hard_training = True
    return report


def load(args):
    encoder = MODELS.build("sentence_encoder", {"pretrained": "all-MiniLM-L6-v2"}, "model")
    train, held_out = DATA.build("sentences", {"batch_size": 16, "seq_len": 64, "eval_batch_size": 64,
                                               "val_fraction": args.val_fraction}, "data", spec=encoder.input_spec)
    return encoder.model, train, held_out


def held_out_batches(loader, limit: int | None) -> list[dict]:
    batches, count = [], 0
    for batch in loader:
        if limit is not None and count >= limit:
            break
        take = batch["input_ids"].shape[0] if limit is None else min(batch["input_ids"].shape[0], limit - count)
        batches.append({key: value[:take] for key, value in batch.items()})
        count += take
    return batches


@torch.no_grad()
def embed(net: nn.Module, batches: list[dict]) -> torch.Tensor:
    was = net.training
    net.eval()
    out = torch.cat([unit_embeddings(net(**batch).last_hidden_state, batch["attention_mask"]) for batch in batches])
    net.train(was)
    return out


def score(net: nn.Module, batches: list[dict], reference: torch.Tensor) -> tuple[float, float]:
    embeddings = embed(net, batches)
    cosine, spearman = EmbeddingCosine(), SimilaritySpearman()
    cosine.update(embeddings, reference)
    spearman.update(embeddings, reference)
    return float(cosine.compute()), float(spearman.compute())


def speed_inputs(args) -> dict:
    ids = torch.randint(1000, 30000, (32, args.length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class Run:
    """One student: its score after each phase, and the healing wall time spent on it so far (scoring excluded)."""

    def __init__(self, name: str, net: nn.Module, held_out: list[dict], reference: torch.Tensor):
        self.name, self.net, self.held_out, self.reference = name, net, held_out, reference
        self.rows: list[list[str]] = []
        self.curve: list[tuple[int, float]] = []
        self.seconds = 0.0

    def record(self, phase: str, steps: int | None = None) -> None:
        cosine, spearman = score(self.net, self.held_out, self.reference)
        self.rows.append([self.name, phase, f"{cosine:.4f}", f"{spearman:.4f}", f"{self.seconds:.0f} s"])
        print(time.strftime("%H:%M:%S"), *self.rows[-1], sep=" | ", file=sys.stderr, flush=True)  # progress
        if steps is not None:
            self.curve.append((steps, cosine))

    def heal(self, teacher, batches, counts: list[int], label: str, **options) -> None:
        """One ``distill`` run of max(counts) steps, scored after each of ``counts`` steps."""
        clock = [time.perf_counter()]

        def checkpoint(step: int, loss: float) -> None:
            if step in counts:
                self.seconds += time.perf_counter() - clock[0]
                self.record(f"{label}, {step} steps" if len(counts) == 1 else f"{label}: {step} of {max(counts)}",
                            step)
                self.net.train()
                clock[0] = time.perf_counter()

        distill(self.net, teacher, batches, steps=max(counts), callback=checkpoint, **options)


def recipe(name: str, args, **changes) -> dict:
    """The distillation settings of surgery ``name`` (see the module docstring), with ``changes``."""
    steps = max(int(n) for n in args.steps.split(","))
    settings = dict(lr=args.lr, schedule="cosine", warmup_steps=max(1, steps // 20), embedding_weight=1.0,
                    hidden_weight=0.0 if "FNet" in name else 1.0)
    return {**settings, **changes}


def heal(args) -> str:
    torch.manual_seed(0)
    counts = sorted(int(n) for n in args.steps.split(","))
    original, train, held_out_loader = load(args)
    held_out = held_out_batches(held_out_loader, args.sentences)
    sentences = sum(batch["input_ids"].shape[0] for batch in held_out)
    train_batches = list(train)
    calibration = train_batches[:args.calibration_batches]
    teacher = copy.deepcopy(original)  # the model before surgery; distill freezes it
    reference = embed(original, held_out)
    rows, curves, converted, fits, notes = [], {}, {}, {}, []
    chosen = surgeries(args)
    if args.surgeries:
        chosen = {name: chosen[name] for name in args.surgeries.split(",")}
    chosen = {f"FFF {args.fff}" if name == "FFF" else name: value for name, value in chosen.items()}
    base = [args.baseline_steps or counts[0]]
    for name, (surgery, fits_layers) in chosen.items():
        net = copy.deepcopy(original)
        start = time.perf_counter()
        surgery(net, calibration, 0)
        surgery_seconds = time.perf_counter() - start
        bare = Run(name, net, held_out, reference)
        bare.record("surgery only", 0)
        main, fit_seconds = bare, 0.0
        if fits_layers:
            fitted = copy.deepcopy(original)
            start = time.perf_counter()
            report = surgery(fitted, calibration, args.fit_steps)
            fit_seconds = time.perf_counter() - start - surgery_seconds
            main = Run(name, fitted, held_out, reference)
            fit_seconds = main.seconds = max(fit_seconds, 0.0)
            main.record(f"fit ({args.fit_steps} steps per module)", 0)
            for prefix in ("fit_", "block_fit_"):
                errors = [(r.notes[f"{prefix}error_before"], r.notes[f"{prefix}error_after"],
                           f"{prefix}undone" in r.notes) for r in report.replaced if f"{prefix}error_before" in r.notes]
                if errors:  # an undone fit keeps the error from before
                    fits[f"{name} ({'blocks' if prefix == 'block_fit_' else 'modules'})"] = (
                        sum(b for b, _, _ in errors) / len(errors),
                        sum(b if undone else a for b, a, undone in errors) / len(errors),
                        len(errors), sum(undone for _, _, undone in errors))
            notes.append(f"{name}: surgery {surgery_seconds:.1f} s, surgery with fit_steps={args.fit_steps} "
                         f"{surgery_seconds + main.seconds:.1f} s (fitting: the difference)")
        else:
            notes.append(f"{name}: surgery {surgery_seconds:.1f} s (nothing to fit)")
        starts = {"plain": copy.deepcopy(main.net), "last": copy.deepcopy(main.net)}
        main.heal(teacher, train_batches, counts, "fit + distill" if fits_layers else "distill", **recipe(name, args))
        rows += main.rows if not fits_layers else bare.rows + main.rows
        curves[name] = main.curve
        converted[name] = main.net
        if fits_layers:
            bare.rows.clear()
            bare.heal(teacher, train_batches, base, "baseline: no fit, distill",
                      **recipe(name, args, warmup_steps=max(1, base[0] // 20)))
            rows += bare.rows
        for key, label, changes in (
                ("plain", "baseline: every layer's hidden MSE only, constant lr",
                 dict(hidden_weight=1.0, embedding_weight=0.0, schedule="constant", warmup_steps=0)),
                ("last", "baseline: last layer's hidden MSE only, constant lr",
                 dict(hidden_weight=1.0, embedding_weight=0.0, schedule="constant", warmup_steps=0,
                      layers=["encoder.layer.5"]))):
            run = Run(name, starts[key], held_out, reference)
            run.seconds = fit_seconds
            run.heal(teacher, train_batches, base, label, **recipe(name, args, **changes))
            rows += run.rows
    seconds = time_forward({"original": original, **converted}, speed_inputs(args), repeats=args.repeats)
    speed = {name: seconds["original"] / seconds[name] for name in converted}
    speed_rows = timed_rows({"original": original, **converted}, seconds, "original")
    if args.save:
        with open(args.save, "w") as file:
            json.dump({"curves": curves, "speed": speed, "counts": counts}, file)
    if args.plot:
        plot(curves, speed, counts, args.plot)
    targets = []
    for name in curves:  # the best cosine reached within 10 minutes of healing, baselines aside
        goal = target_of(name)
        within = [row for row in rows if row[0] == name and "baseline" not in row[1]
                  and float(row[4].split()[0]) <= 600]
        if within:
            row = max(within, key=lambda row: float(row[2]))
            targets.append([name, f">= {goal}", row[2], row[1], row[4],
                            "met" if float(row[2]) >= goal else "not met"])
    fff = FFF_CHOICES[args.fff]
    out = [f"### all-MiniLM-L6-v2: surgery + healing, {sentences} held-out sentences, "
           f"{len(train.dataset)} training sentences (batch 16), distill lr {args.lr}, fit_steps {args.fit_steps} "
           f"(fit_lr {args.fit_lr}), {len(calibration)} calibration batches\n",
           f"FFF: {fff}, init='dense'. FNet: impl='rfft', padding='mask', max_length={args.length}. Healing time: "
           "cumulative wall time of fitting (the surgery's extra time with fit_steps) and distillation, this CPU.\n",
           markdown_table(["surgery", "phase", "cosine", "Spearman", "healing time"], rows), "",
           "Mean held-out relative fit error before -> after fitting (an undone fit counts its error from before): "
           + "; ".join(f"{name} {b:.3f} -> {a:.3f} ({n}, {u} undone)" for name, (b, a, n, u) in fits.items()), "",
           "Surgery wall time: " + "; ".join(notes), "",
           f"### Encoder forward, batch 32 x {args.length}, inference, side by side\n",
           markdown_table(["model", "params", "median forward", "speed-up"], speed_rows), "",
           "### Targets: the best cosine within 10 minutes of healing on this CPU (baselines aside)\n",
           markdown_table(["surgery", "target", "cosine", "at", "healing time", ""], targets), ""]
    return "\n".join(out)


# issue 24's cases for the defaults: surgery -> (fit_steps, distillation steps)
DEFAULTS_CASES = {"Factorize 25%": (200, 200), "FNet-Hybrid": (0, 400)}


def defaults(args) -> str:
    """What a user who does not read the card gets: ``distill(student, teacher, batches, steps=N)`` with nothing
    else, against the defaults before issue 24 (lr 1e-4 constant, every layer's hidden-state MSE only) and the
    card's recipe (``recipe``), on issue 24's cases (``DEFAULTS_CASES``)."""
    original, train, held_out_loader = load(args)
    held_out = held_out_batches(held_out_loader, args.sentences)
    reference = embed(original, held_out)
    train_batches = list(train)
    calibration = train_batches[:args.calibration_batches]
    rows = []
    for name, (fit_steps, steps) in DEFAULTS_CASES.items():
        surgery, _ = surgeries(args)[name]
        settings = recipe(name, argparse.Namespace(lr=args.lr, steps=str(steps)))
        for label, options in (
                ("before issue 24: lr 1e-4 constant, hidden-state MSE only",
                 dict(lr=1e-4, schedule="constant", warmup_steps=0, hidden_weight=1.0, embedding_weight=0.0)),
                ("the defaults: distill(student, teacher, batches, steps=N)", {}),
                (f"the card's recipe ({', '.join(f'{k}={v}' for k, v in settings.items())})", settings)):
            torch.manual_seed(0)
            net = copy.deepcopy(original)
            start = time.perf_counter()
            surgery(net, calibration, fit_steps)
            distill(net, original, train_batches, steps=steps, **options)
            seconds = time.perf_counter() - start
            cosine, spearman = score(net, held_out, reference)
            rows.append([f"{name}, fit_steps {fit_steps}, {steps} steps", label, f"{cosine:.4f}", f"{spearman:.4f}",
                         f"{seconds:.0f} s"])
            print(time.strftime("%H:%M:%S"), *rows[-1], sep=" | ", file=sys.stderr, flush=True)  # progress
    sentences = sum(batch["input_ids"].shape[0] for batch in held_out)
    return (f"### distill's defaults: all-MiniLM-L6-v2, {sentences} held-out sentences\n\n"
            + markdown_table(["surgery", "distillation settings", "cosine", "Spearman", "time"], rows) + "\n")


def plot(curves: dict, speed: dict, counts: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        xs, ys = zip(*points, strict=True)
        axis.plot(xs, ys, marker="o", label=f"{name} ({speed[name]:.2f}x faster)")
    for goal in {target_of(name) for name in curves}:
        axis.axhline(goal, linestyle=":", linewidth=0.8, color="grey")
    axis.set_xlabel("distillation steps (batch 16; at 0: after surgery, plus fitting where the surgery has it)")
    axis.set_ylabel("mean cosine to the original (held-out)")
    axis.set_title("all-MiniLM-L6-v2: healing after surgery (dotted: issue targets)")
    axis.set_xticks([0, *counts])
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def replot(args) -> str:
    """The plot from the ``--save`` files of runs over different surgeries (``--results a.json,b.json``)."""
    if not args.results:
        return ""
    curves, speed, counts = {}, {}, set()
    for path in args.results.split(","):
        with open(path) as file:
            saved = json.load(file)
        curves.update(saved["curves"])
        speed.update(saved["speed"])
        counts.update(saved["counts"])
    plot(curves, speed, sorted(counts), args.plot)
    return f"plot of {', '.join(curves)} written to {args.plot}\n"


def speed(args) -> str:
    original, train, _ = load(args)
    calibration = list(train)[:2]
    models = {"original": original}
    fnet = dict(impl="rfft", padding="mask", max_length=args.length)
    for name, settings in FFF_CHOICES.items():
        if args.fff_choices and name not in args.fff_choices.split(","):
            continue
        net = copy.deepcopy(original)
        apply_fff(net, init="dense", calibration=calibration, **settings)
        models[f"FFF {name}"] = net
    for name, surgery in (("Factorize 25%", lambda m: apply_factorization(m, rank=0.25, init="activation",
                                                                          calibration=calibration)),
                          ("FNet-Hybrid", lambda m: apply_fnet_mixing(m, keep_attention_layers=[-2, -1], **fnet)),
                          ("all-FNet", lambda m: apply_fnet_mixing(m, **fnet))):
        net = copy.deepcopy(original)
        surgery(net)
        models[name] = net
    seconds = time_forward(models, speed_inputs(args), repeats=args.repeats)
    rows = timed_rows(models, seconds, "original")
    return (f"### all-MiniLM-L6-v2 encoder forward, batch 32 x {args.length}, inference\n\n"
            + markdown_table(["model", "params", "median forward", "speed-up"], rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="100,300,600,1000", help="distillation step counts scored, one run "
                        "of the largest")
    parser.add_argument("--sentences", type=int, default=None, help="held-out sentences scored (default: all)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="the sentences data's held-out share")
    parser.add_argument("--baseline-steps", type=int, default=None, help="distillation steps of the baseline rows "
                        "(default: the smallest of --steps)")
    parser.add_argument("--fit-steps", type=int, default=300, help="fit_steps of Factorize and FFF")
    parser.add_argument("--fit-lr", type=float, default=1e-3)
    parser.add_argument("--lr", type=float, default=7e-4, help="distillation AdamW peak learning rate")
    parser.add_argument("--calibration-batches", type=int, default=8, help="training batches of 16 for calibration")
    parser.add_argument("--fff", default="leaf2x384", choices=list(FFF_CHOICES), help="FFF setting")
    parser.add_argument("--fff-choices", default=None, help="speed: the FFF settings timed (default: all)")
    parser.add_argument("--length", type=int, default=128, help="sequence length of the speed measurement")
    parser.add_argument("--repeats", type=int, default=5)
    names = ", ".join(TARGETS).replace("%", "%%")  # argparse formats help strings with %
    parser.add_argument("--surgeries", default=None, help=f"comma-separated subset of: {names}")
    parser.add_argument("--plot", default=None, help="write the cosine-vs-steps plot here (PNG)")
    parser.add_argument("--save", default=None, help="heal: write the curves and speed-ups here (JSON)")
    parser.add_argument("--results", default=None, help="replot: the --save files to draw together")
    run_parts(parser, {"heal": heal, "speed": speed, "replot": replot, "defaults": defaults})


if __name__ == "__main__":
    main()
