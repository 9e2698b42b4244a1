"""Speed-fidelity frontier on all-MiniLM-L6-v2 (issue 24): every surgery healed, alone, combined and composed with
dynamic int8 quantization, against what a user tries first (``torch.ao.quantization.quantize_dynamic``, one line).

    .venv/bin/python benchmarks/frontier.py --parts heal --work runs/frontier     # heal and save every point
    .venv/bin/python benchmarks/frontier.py --parts heal --points "Factorize 50%" --work runs/frontier   # one point
    .venv/bin/python benchmarks/frontier.py --parts measure --work runs/frontier --plot docs/frontier.png
    .venv/bin/python benchmarks/frontier.py --parts heal,measure --points "FFF leaf 2x768" --docstrings 8000 \
        --work runs/frontier_text                                                    # more healing text
    .venv/bin/python benchmarks/frontier.py --steps 2 --fit-steps 2 --sentences 16 --pool 2 --repeats 1   # smoke

(a) heal: each point of ``POINTS`` (``--points``, default all) is the surgery (with its layer-wise fitting where it
    has one) and ``--steps`` steps of self-distillation from the original model, with ``benchmarks/heal.py``'s
    recipe (AdamW at ``--lr``, 5% warm-up, cosine decay; 1 - cosine of the sentence embeddings, plus every layer's
    hidden-state MSE except for FNet), on the training split of the ``sentences`` data (Python's reference
    documentation). Each healed model is saved with ``algos.save_pretrained`` under ``--work`` with its healing wall
    time (surgery, fitting and distillation; this CPU), so the slow part runs once per point. ``--docstrings N``
    adds N sentences of the installed packages' docstrings (other subjects, no licence text) to the healing text
    (the point's name says so): does more, more varied text keep more on another domain?
(b) measure: loads every saved point (``algos.from_pretrained`` on a fresh copy of the original), adds the int8
    variants (``algos.quantize_dynamic``: dynamic int8 for every ``nn.Linear`` and the FFF leaves; "+ int8": torch's
    default settings, per-tensor weights and 7-bit inputs; "+ int8 best": per-channel weights and, on a CPU with
    VNNI, 8-bit inputs) and the baselines (the original; torch's one-line ``quantize_dynamic(model, {nn.Linear})``,
    per-tensor as its default and per-channel; the best int8 alone), and scores each on two held-out sets never used for
    calibration or training: the held-out split of the Python documentation sentences and sentences of another
    domain (the licence texts of the installed Python packages: legal English). Fidelity: the mean cosine of each
    sentence's embedding (mean-pooled, normalised) to the original model's, and the Spearman correlation of all
    pairwise similarities to the original's. Speed: the encoder forward at batch 32 x ``--length`` against the
    original, all candidates timed side by side in one process (``algos.bench.time_forward``), each call on the next
    of a pool of ``--pool`` different batches of real text (one input repeated keeps a tree's paths in cache).
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from heal import embed, held_out_batches, load, recipe, score, train_on_hard_path  # noqa: E402

from algos import (  # noqa: E402
    apply_factorization,
    apply_fff,
    apply_fnet_mixing,
    distill,
    from_pretrained,
    quantize_dynamic,
    save_pretrained,
)
from algos.bench import markdown_table, run_parts, time_forward  # noqa: E402
from algos.run.data import split_sentences  # noqa: E402
from algos.surgery.quantize import has_vnni  # noqa: E402

# the kept attention layers of FNet-Hybrid, and their projections (Factorize's targets in the combination)
KEPT = [-2, -1]
KEPT_ATTENTION = r"encoder\.layer\.[45]\.attention\..*"


def _factorize(rank, **settings):
    return lambda m, c, a: apply_factorization(m, rank=rank, init="activation", calibration=c, fit_steps=a.fit_steps,
                                               fit_lr=a.fit_lr, sequential=a.sequential, **settings)


def _fff(depth, leaf_width, **settings):
    return lambda m, c, a: train_on_hard_path(apply_fff(m, init="dense", form="leaf", depth=depth,
                                                        leaf_width=leaf_width, calibration=c, fit_steps=a.fit_steps,
                                                        fit_lr=a.fit_lr, sequential=a.sequential, **settings), m)


def _fnet(**settings):  # gate=True reads the calibration batches (the gate's shift starts at attention's mean)
    return lambda m, c, a: apply_fnet_mixing(m, impl="rfft", padding="mask", max_length=a.length,
                                             calibration=c if settings.get("gate") else None, **settings)


def _chain(*surgeries):
    def run(m, c, a):
        for surgery in surgeries:
            surgery(m, c, a)
    return run


# name -> surgery(model, calibration batches, args); FNet's distillation uses no hidden-state term (heal.recipe)
POINTS = {
    "Factorize 50%": _factorize(0.5),
    "Factorize 25%": _factorize(0.25),
    # the MACs of rank 25% (37.5% of the encoder's Linear MACs: 384 x 384 layers at half, 384 x 1536 at 5/16),
    # spent by each layer's whitened spectrum (mac_budget: the per-layer allocation)
    "Factorize budget 37.5%": _factorize(None, mac_budget=0.375),
    "FFF leaf 2x768": _fff(1, 768),
    # light trees (each token keeps 2/3 or 3/4 of the 1536 hidden neurons): with int8, faster than torch's one-liner
    # at a higher fidelity?
    "FFF leaf 2x1024": _fff(1, 1024),
    "FFF leaf 2x1152": _fff(1, 1152),
    "FFF leaf 4x384": _fff(2, 384),
    # the MACs of 2x768 (50% of the feed-forward MACs), each block's leaf width chosen by its error at each width
    # (mac_budget: the per-block allocation, in steps of 64)
    "FFF leaf 2 x budget 50%": _fff(1, 64, mac_budget=0.5),
    # leaves of 768 or none: mac_budget picks the blocks whose error per saved MAC is lowest; 0.76 of the MACs (the
    # decision neurons cost a little over half of a block) converts 3 of the 6 blocks and keeps the others dense
    "FFF leaf 2x768 on half the blocks": _fff(1, 768, mac_budget=0.76),
    "FNet-Hybrid": _fnet(keep_attention_layers=KEPT),
    "all-FNet": _fnet(),
    # a learned per-channel gate (from 0) and shift (from attention's mean output) on each Fourier mixing
    "FNet-Hybrid gated": _fnet(keep_attention_layers=KEPT, gate=True),
    "all-FNet gated": _fnet(gate=True),
    "FNet-Hybrid gated + FFF leaf 2x768": _chain(_fnet(keep_attention_layers=KEPT, gate=True), _fff(1, 768)),
    "FNet-Hybrid gated + FFF leaf 2x1024": _chain(_fnet(keep_attention_layers=KEPT, gate=True), _fff(1, 1024)),
    "FNet-Hybrid + FFF leaf 2x768": _chain(_fnet(keep_attention_layers=KEPT), _fff(1, 768)),
    "FNet-Hybrid + FFF leaf 2x768 + Factorize attention 25%": _chain(
        _fnet(keep_attention_layers=KEPT), _fff(1, 768), _factorize(0.25, target_modules=KEPT_ATTENTION)),
}
# suffix -> algos.quantize_dynamic's settings: torch's default int8 (per-tensor weights, 7-bit inputs), and the best
# measured (per-channel weights, 8-bit inputs where the CPU has VNNI)
BEST_INT8 = dict(per_channel=True, activation_bits=8 if has_vnni() else 7)
VARIANTS = {"": None, " + int8": dict(per_channel=False, activation_bits=7), " + int8 best": BEST_INT8}


STEPS = 600  # distillation steps per point unless --steps says otherwise (the point's name then says so)
CALIBRATION = 8  # training batches (of 16) for calibration unless --calibration-batches says otherwise (named then)
BASELINES = ("original", "int8 (torch one-liner)", "int8 per-channel (torch)", "int8 best (algos.quantize_dynamic)")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def heal(args) -> str:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    original, train, held_out = load(args)
    train_batches = list(train)
    calibration = train_batches[:args.calibration_batches]
    if args.docstrings:
        packages = tuple(args.docstring_packages.split(","))
        train_batches = with_docstrings(train_batches, held_out, args.docstrings, packages)
    rows = []
    for name in chosen_points(args):
        torch.manual_seed(0)
        net = copy.deepcopy(original)
        start = time.perf_counter()
        POINTS[name](net, calibration, args)
        if args.steps:  # --steps 0: the surgery and its fitting only
            distill(net, original, train_batches, steps=args.steps,
                    **recipe(name, argparse.Namespace(lr=args.lr, steps=str(args.steps)),
                             similarity_weight=args.similarity_weight))
        seconds = time.perf_counter() - start
        label = name + (f", {args.steps} steps" if args.steps != STEPS else "") + (
            f", {args.calibration_batches} calibration batches" if args.calibration_batches != CALIBRATION else "") + (
            ", sequential" if args.sequential else "") + (
            f", similarity {args.similarity_weight:g}" if args.similarity_weight else "") + (
            f", healed on docs + {args.docstrings} docstrings" if args.docstrings else "")
        save_pretrained(net, work / slug(label), overwrite=True)
        (work / slug(label) / "frontier.json").write_text(json.dumps(
            {"name": label, "heal_seconds": seconds, "steps": args.steps, "fit_steps": args.fit_steps}))
        rows.append([label, f"{seconds:.0f} s"])
        print(time.strftime("%H:%M:%S"), label, f"healed in {seconds:.0f} s", file=sys.stderr, flush=True)
    return markdown_table(["point", "healing time"], rows) + "\n"


def chosen_points(args) -> list[str]:
    names = list(POINTS) if args.points == "all" else args.points.split(",")
    unknown = [name for name in names if name not in POINTS]
    if unknown:
        raise SystemExit(f"--points: unknown {unknown}; choose from {list(POINTS)} or 'all'")
    return names


def licence_sentences() -> list[str]:
    """Sentences of another domain than the healing text: the licence files of the installed Python packages
    (``*.dist-info``), each sentence once."""
    site = Path(nn.__file__).parents[2]
    files = sorted({*glob.glob(f"{site}/*.dist-info/*LICEN[CS]E*"), *glob.glob(f"{site}/*.dist-info/licenses/*")})
    texts = [Path(f).read_text(errors="ignore") for f in files if os.path.isfile(f)]
    return split_sentences(texts)


# packages the project installs, whose docstrings are English of other subjects than Python's reference documentation
DOCSTRING_PACKAGES = ("sklearn", "scipy", "numpy", "composer", "torchvision", "transformers")


def docstring_sentences(count: int, packages: tuple[str, ...] = DOCSTRING_PACKAGES) -> list[str]:
    """``count`` sentences (seeded sample) of the docstrings of ``packages``: more, and more varied,
    unlabeled text for healing; no sentence that names a licence, a warranty or a copyright (the other held-out
    domain is licence text)."""
    import ast
    import random

    site = Path(nn.__file__).parents[2]
    texts = []
    for package in packages:
        for file in sorted(glob.glob(f"{site}/{package}/**/*.py", recursive=True)):
            try:
                tree = ast.parse(Path(file).read_text(errors="ignore"))
            except (SyntaxError, ValueError):
                continue
            texts += [doc for node in ast.walk(tree) if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                                           ast.AsyncFunctionDef))
                      and (doc := ast.get_docstring(node))]
    legal = re.compile(r"licen[cs]e|warrant|copyright", re.IGNORECASE)
    sentences = [s for s in split_sentences(texts) if not legal.search(s)]
    return random.Random(0).sample(sentences, min(count, len(sentences)))


def with_docstrings(train: list[dict], held_out, count: int, packages: tuple[str, ...]) -> list[dict]:
    """The training batches plus ``count`` docstring sentences in batches of 16, shuffled together (seeded); a
    docstring row that is also a held-out documentation row is left out."""
    held = {tuple(row[row != 0].tolist()) for batch in held_out for row in batch["input_ids"]}
    extra = tokenized(minilm_tokenizer(), docstring_sentences(count, packages), batch_size=16)
    extra = [{key: value[keep] for key, value in batch.items()} for batch in extra
             if (keep := torch.tensor([tuple(row[row != 0].tolist()) not in held for row in batch["input_ids"]])).any()]
    batches = train + extra
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(0)).tolist()
    return [batches[i] for i in order]


def minilm_tokenizer():
    from transformers import AutoTokenizer

    from algos.run.models import MODELS

    return AutoTokenizer.from_pretrained(MODELS.build("sentence_encoder", {"pretrained": "all-MiniLM-L6-v2"},
                                                      "model").input_spec.tokenizer)


def tokenized(tokenizer, sentences: list[str], batch_size: int = 64, length: int = 64) -> list[dict]:
    batches = []
    for start in range(0, len(sentences), batch_size):
        encoded = tokenizer(sentences[start:start + batch_size], padding=True, truncation=True, max_length=length,
                            return_tensors="pt")
        batches.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return batches


def speed_pool(train, args) -> list[dict]:
    """``--pool`` different batches of 32 x ``--length`` tokens of real text: the training sentences' tokens end to
    end, cut into rows."""
    stream = torch.cat([row[row != 0] for batch in train for row in batch["input_ids"]])
    size = 32 * args.length
    stream = stream.repeat(args.pool * size // stream.numel() + 1)
    return [{"input_ids": (ids := stream[i * size:(i + 1) * size].reshape(32, args.length)),
             "attention_mask": torch.ones_like(ids)} for i in range(args.pool)]


def measure(args) -> str:
    original, train, held_out_loader = load(args)
    tokenizer = minilm_tokenizer()
    sets = {"docs": held_out_batches(held_out_loader, args.sentences)}
    other = licence_sentences()
    other = other[::max(1, len(other) // args.sentences)][:args.sentences] if args.sentences else other
    sets["licences"] = tokenized(tokenizer, other)
    references = {key: embed(original, batches) for key, batches in sets.items()}
    models = {"original": original,
              "int8 (torch one-liner)": torch.ao.quantization.quantize_dynamic(
                  copy.deepcopy(original), {nn.Linear}, dtype=torch.qint8),
              "int8 per-channel (torch)": torch.ao.quantization.quantize_dynamic(
                  copy.deepcopy(original), {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
                  dtype=torch.qint8),
              "int8 best (algos.quantize_dynamic)": quantize_dynamic(original, inplace=False, **BEST_INT8)}
    healed = {}
    for folder in sorted(Path(args.work).glob("*/frontier.json")):
        record = json.loads(folder.read_text())
        net = from_pretrained(copy.deepcopy(original), folder.parent)
        healed[record["name"]] = record
        for suffix, settings in VARIANTS.items():
            models[record["name"] + suffix] = net if settings is None else quantize_dynamic(net, inplace=False,
                                                                                           **settings)
    if not healed:
        raise SystemExit(f"no healed point under {args.work}: run --parts heal first")
    fidelity = {name: {key: score(model, batches, references[key]) for key, batches in sets.items()}
                for name, model in models.items()}
    seconds = time_forward(models, speed_pool(train, args), repeats=args.repeats)
    speed = {name: seconds["original"] / seconds[name] for name in models}
    record = {"speed": speed, "fidelity": fidelity, "healed": healed,
              "sentences": {key: sum(b["input_ids"].shape[0] for b in batches) for key, batches in sets.items()}}
    if args.save:
        Path(args.save).write_text(json.dumps(record, indent=1))
    if args.plot:
        plot(record, args.plot)
    return report(record, args)


def int8_anatomy(args) -> str:
    original, _, held_out_loader = load(args)
    held_out = held_out_batches(held_out_loader, args.sentences)
    reference = embed(original, held_out)
    linears = [name for name, module in original.named_modules() if type(module) is nn.Linear]
    per_channel = torch.ao.quantization.per_channel_dynamic_qconfig
    rows = []

    def row(label: str, model: nn.Module) -> None:
        cosine, spearman = score(model, held_out, reference)
        rows.append([label, f"{cosine:.4f}", f"{spearman:.4f}"])

    row("torch int8, per-tensor weights, 7-bit inputs (the one-liner)", torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(original), {nn.Linear}, dtype=torch.qint8))
    row("torch int8, per-channel weights, 7-bit inputs", torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(original), {nn.Linear: per_channel}, dtype=torch.qint8))
    for channel in (False, True):
        rounded = copy.deepcopy(original)
        with torch.no_grad():
            for name in linears:
                weight = rounded.get_submodule(name).weight
                # symmetric int8 as torch's weight observers: scale = max|w| / 127.5 per tensor or per output row
                scale = (weight.abs().amax(1, keepdim=True) if channel else weight.abs().amax()) / 127.5
                weight.copy_(torch.clamp(torch.round(weight / scale), -128, 127) * scale)
        row(f"int8 weight rounding only, {'per-channel' if channel else 'per-tensor'}, float inputs", rounded)
    if has_vnni():
        for channel in (False, True):
            row(f"algos int8, {'per-channel' if channel else 'per-tensor'} weights, 8-bit inputs",
                quantize_dynamic(original, per_channel=channel, activation_bits=8, inplace=False))
    kinds = sorted({name.split(".", 3)[3] for name in linears if name.startswith("encoder.layer.")})
    for kind in kinds:
        spec = {name: per_channel for name in linears if name.split(".", 3)[-1] != kind}
        row(f"torch int8 per-channel, {kind} left float", torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(original), spec, dtype=torch.qint8))
    sentences = sum(batch["input_ids"].shape[0] for batch in held_out)
    return (f"### Where int8's error comes from: all-MiniLM-L6-v2, {sentences} held-out documentation sentences\n\n"
            + markdown_table(["variant", "cosine", "Spearman"], rows) + "\n")


def heal_time(name: str, healed: dict) -> str:
    base = next((point for point in sorted(healed, key=len, reverse=True) if name.startswith(point)), None)
    return "-" if base is None else f"{healed[base]['heal_seconds']:.0f} s"


def report(record: dict, args) -> str:
    speed, fidelity, healed = record["speed"], record["fidelity"], record["healed"]
    steps = {r["steps"] for r in healed.values()}
    rows = [[name, heal_time(name, healed), f"{speed[name]:.2f}x",
             *(f"{fidelity[name][key][i]:.4f}" for key in ("docs", "licences") for i in (0, 1))]
            for name in sorted(speed, key=lambda n: -speed[n])]
    int8 = "int8 (torch one-liner)"
    better = [name for name in speed if name != int8 and speed[name] >= speed[int8]
              and all(fidelity[name]["docs"][i] > fidelity[int8]["docs"][i] for i in (0, 1))]
    matched = [name for name in speed if name != int8 and fidelity[name]["docs"][0] >= fidelity[int8]["docs"][0]]
    fastest = max(matched, key=lambda n: speed[n])
    targets = []
    for goal_speed, goal_cosine in ((1.5, 0.97), (2.0, 0.95), (3.0, 0.90)):
        row = [f">= {goal_speed}x at cosine >= {goal_cosine}"]
        for candidates in (speed, [n for n in speed if n not in BASELINES]):  # any point; a surgery point
            reaching = [n for n in candidates if fidelity[n]["docs"][0] >= goal_cosine]
            best = max(reaching, key=lambda n: speed[n]) if reaching else None
            row += ["-" if best is None else f"{best}: {speed[best]:.2f}x, {fidelity[best]['docs'][0]:.4f}",
                    "met" if best and speed[best] >= goal_speed else "not met"]
        targets.append(row)
    sentences = record["sentences"]
    return "\n".join([
        f"### all-MiniLM-L6-v2 speed-fidelity frontier: {sentences['docs']} held-out documentation sentences, "
        f"{sentences['licences']} licence sentences (another domain); healing: {sorted(steps)} distillation steps\n",
        f"Speed: encoder forward at batch 32 x {args.length}, side by side, a pool of {args.pool} batches, median of "
        f"{args.repeats}. Healing time: surgery + fitting + distillation on this CPU (int8 adds none).\n",
        markdown_table(["model", "healing time", "speed-up", "cosine (docs)", "Spearman (docs)",
                        "cosine (licences)", "Spearman (licences)"], rows), "",
        f"At least as fast as the int8 one-liner ({speed[int8]:.2f}x) with higher cosine and Spearman (docs): "
        + (", ".join(f"{n} ({speed[n]:.2f}x)" for n in sorted(better, key=lambda n: -speed[n])) or "none") + ".",
        f"Fastest at the int8 one-liner's cosine or above ({fidelity[int8]['docs'][0]:.4f}): {fastest} "
        f"({speed[fastest]:.2f}x, {fidelity[fastest]['docs'][0]:.4f}).", "",
        markdown_table(["target", "fastest point reaching the cosine", "", "fastest surgery point reaching it", ""],
                       targets), ""])


def plot(record: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed, fidelity = record["speed"], record["fidelity"]
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    markers = {"": "o", " + int8": "s", " + int8 best": "^"}
    colors = {}
    for axis, key, title in zip(axes, ("docs", "licences"), ("held-out documentation sentences",
                                                             "licence sentences (another domain)"), strict=True):
        for name in speed:
            x, y = speed[name], fidelity[name][key][0]
            if name in BASELINES:
                axis.scatter(x, y, marker="*", s=180, color="black", zorder=3)
                axis.annotate(name, (x, y), textcoords="offset points", xytext=(6, -10), fontsize=8)
                continue
            suffix = max((s for s in markers if s and name.endswith(s)), key=len, default="")
            base = name.removesuffix(suffix)
            color = colors.setdefault(base, f"C{len(colors) % 10}")
            axis.scatter(x, y, marker=markers[suffix], color=color, label=base if suffix == "" else None, s=45)
        axis.set_title(title)
        axis.set_xlabel("speed-up over the original (encoder forward, 2 CPU cores)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("mean cosine to the original's embeddings")
    axes[0].legend(fontsize=7, loc="lower left", title="o float  s +int8  ^ +int8 best", title_fontsize=7)
    figure.suptitle("all-MiniLM-L6-v2: healed surgeries vs dynamic int8 (stars: original and torch's int8)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/frontier", help="where healed points are saved and read")
    names = ", ".join(POINTS).replace("%", "%%")  # argparse formats help strings with %
    parser.add_argument("--points", default="all", help=f"heal: comma-separated, from: {names}")
    parser.add_argument("--steps", type=int, default=STEPS,
                        help="distillation steps per point (batch 16); 0: surgery and fitting only")
    parser.add_argument("--docstrings", type=int, default=0,
                        help="heal: add this many sentences of installed packages' docstrings to the healing text")
    parser.add_argument("--docstring-packages", default=",".join(DOCSTRING_PACKAGES),
                        help="heal: the installed packages whose docstrings --docstrings samples")
    parser.add_argument("--fit-steps", type=int, default=300, help="fit_steps of Factorize and FFF")
    parser.add_argument("--fit-lr", type=float, default=1e-3)
    parser.add_argument("--sequential", action="store_true",
                        help="Factorize and FFF fit each target on the inputs it gets with the earlier ones converted")
    parser.add_argument("--lr", type=float, default=7e-4, help="distillation AdamW peak learning rate")
    parser.add_argument("--similarity-weight", type=float, default=0.0,
                        help="distill's similarity_weight (in-batch pairwise cosines, relational distillation)")
    parser.add_argument("--calibration-batches", type=int, default=CALIBRATION,
                        help="training batches of 16 for calibration")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="the sentences data's held-out share")
    parser.add_argument("--sentences", type=int, default=None, help="sentences scored per held-out set (default: all)")
    parser.add_argument("--length", type=int, default=128, help="sequence length of the speed measurement")
    parser.add_argument("--pool", type=int, default=8, help="different input batches the timing cycles through")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--plot", default=None, help="measure: write the frontier plot here (PNG)")
    parser.add_argument("--save", default=None, help="measure: write speed-ups and fidelities here (JSON)")
    run_parts(parser, {"heal": heal, "measure": measure, "int8": int8_anatomy})


if __name__ == "__main__":
    main()
