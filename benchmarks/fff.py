"""FFF-replace benchmark: FFF trees vs the dense feed-forward block they replace, side by side in one process, with
the `fastfeedforward` PyPI package as the peer, and accuracy / conversion fidelity on a small real dataset.
Prints markdown.

    .venv/bin/python benchmarks/fff.py                       # all parts (`make` installs the package into .venv)
    .venv/bin/python benchmarks/fff.py --parts block --batches 1,512 [--compile]

Every timing cycles through a pool of ``--pool`` different inputs (fewer for the largest batches; at least 2): one
input repeated keeps a tree's paths in cache and overstates its speed-up.

(a) block: dense 768-3072-768 GELU vs FFF neuron form depth 11 (12 of 4095 neurons per token; each node variant,
    and the mirrored one on its PyTorch path, without the compiled kernels), a leaf form of about the dense parameter
    count (depth 4, leaves 192 wide), and fastfeedforward's FFF with the same leaf widths, at the given token
    batches. Inference (eval, inference_mode).
(b) bert: BERT-base-size BertModel (HF config, random init), every FFN dense vs FFF, batch 32 x 128.
(w) width: speed-up against layer width w = 2^8 .. 2^14 (in = out = w) over a w x w Linear and a w -> 4w -> w block,
    neuron form at depth log2(w) - 1, leaf form and fastfeedforward of about the w x w layer's parameters, at 1 and
    512 tokens; the crossover widths, and a log-log plot (--plot, docs/fff_width.png).
(c) accuracy: scikit-learn digits (8x8 images, ``algos.run.data.digits_dataloaders``: 1,438 train / 359 held out);
    dense MLP vs FFF forms at about the same parameter count, trained the same way (``algos.bench.train_steps``); then
    a trained wider MLP converted to FFF by dense vs scratch init: relative output error, accuracy right after
    conversion and after a short fine-tune.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
from collections.abc import Callable

import torch
from torch import nn

from algos import FFF, apply_fff
from algos.bench import loader_accuracy, markdown_table, run_parts, time_forward, timed_rows, train_steps
from algos.fff import kernels
from algos.fff.tree import NODES
from algos.run.data import digits_dataloaders
from algos.surgery import count_params


class PyTorchPath(nn.Module):
    """A neuron-form tree run with the compiled kernels switched off (``algos.fff.kernels.ENABLED``)."""

    def __init__(self, tree: FFF):
        super().__init__()
        self.tree = tree

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enabled, kernels.ENABLED = kernels.ENABLED, False
        try:
            return self.tree(x)
        finally:
            kernels.ENABLED = enabled


def dense_block(d: int = 768, hidden: int = 3072) -> nn.Module:
    return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))


def pool_of(make: Callable[[], object], batch_size: int, pool: int, budget: int = 2**25) -> list:
    """``pool`` different inputs (fewer for large batches: at most ``budget`` elements in all, and at least 2): a tree
    timed on one input repeated keeps that input's paths in cache and overstates its speed-up."""
    return [make() for _ in range(max(2, min(pool, budget // max(batch_size, 1))))]


def block(batches: list[int], repeats: int, compile_: bool, pool: int) -> str:
    from fastfeedforward import FFF as PeerFFF

    torch.manual_seed(0)
    models = {
        "dense 768-3072-768": dense_block(),
        **{f"FFF neuron depth 11, node={node}": FFF(768, 768, 11, node=node) for node in NODES},
        "FFF neuron depth 11, node=mirrored, PyTorch path": PyTorchPath(FFF(768, 768, 11)),
        "FFF leaf depth 4 x 192": FFF(768, 768, 4, form="leaf", leaf_width=192),
        "fastfeedforward FFF depth 4 x 192 (peer)": PeerFFF(768, 192, 768, 4, activation=nn.GELU()),
    }
    if compile_:
        models["FFF neuron depth 11, node=mirrored, PyTorch path, torch.compile"] = torch.compile(
            PyTorchPath(FFF(768, 768, 11)), dynamic=True)
    out = [f"### FFN block, inference, d 768 (ratios: dense time / candidate time; each call on the next of a pool of "
           f"up to {pool} different inputs)\n"]
    headers = ["block", "params"] + [f"{b} tokens" for b in batches]
    rows = {name: [name, f"{count_params(model) / 1e6:.2f} M"] for name, model in models.items()}
    dense_ms = ["dense median"] + [""]
    for batch in batches:
        x = pool_of(lambda batch=batch: torch.randn(batch, 768), batch * 768, pool)
        chosen = {name: model for name, model in models.items()
                  if not (name.startswith("fastfeedforward") and batch > 512)}  # peer: one token at a time
        seconds = time_forward(chosen, x, repeats=repeats)
        dense = seconds["dense 768-3072-768"]
        dense_ms.append(f"{dense * 1e3:.2f} ms")
        for name in models:
            rows[name].append(f"{dense / seconds[name]:.1f}x" if name in seconds else "(skipped: too slow)")
    out.append(markdown_table(headers, [dense_ms] + list(rows.values())))
    return "\n".join(out) + "\n"


def bert(repeats: int, pool: int) -> str:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    dense = BertModel(BertConfig(), add_pooling_layer=False)
    models = {"BERT-base encoder (dense FFN)": dense}
    for name, kwargs in {"every FFN -> FFF neuron depth 11": dict(depth=11),
                         "every FFN -> FFF leaf depth 4 x 192": dict(depth=4, form="leaf", leaf_width=192)}.items():
        model = copy.deepcopy(dense)
        apply_fff(model, **kwargs)
        models[name] = model
    inputs = pool_of(lambda: {"input_ids": torch.randint(0, 30000, (32, 128))}, 32 * 128, min(pool, 8))
    seconds = time_forward(models, inputs, repeats=repeats)
    rows = timed_rows(models, seconds, "BERT-base encoder (dense FFN)")
    return (f"### BERT-base-size encoder, batch 32 x 128, inference, a pool of {len(inputs)} different batches\n\n"
            + markdown_table(["model", "params", "median forward", "speed-up"], rows) + "\n")


def leaf_shape(width: int) -> tuple[int, int]:
    """Leaf-form depth and leaf width for a w -> w tree of about the w x w layer's parameters: 2^D leaves of
    w / 2^(D+1) units each (w / 2 hidden units in all, each with w inputs and w outputs), D = floor(log2(w) / 2)."""
    depth = int(math.log2(width)) // 2
    return depth, max(1, width // 2 ** (depth + 1))


def width_curve(widths: list[int], batches: list[int], repeats: int, plot: str | None, pool: int = 64,
                max_dense: float = 2**30) -> str:
    """Speed-up of FFF trees over dense layers of growing width w (in = out = w), inference: against a single w x w
    Linear (the reference FFF repository's baseline) and a w -> 4w -> w GELU block; the neuron form at depth
    log2(w) - 1 (w - 1 nodes, log2(w) of them per token), the leaf form of about the w x w layer's parameters
    (``leaf_shape``) and the fastfeedforward package's FFF of the same leaf shape. Dense baselines of more than
    ``max_dense`` parameters are not built."""
    from fastfeedforward import FFF as PeerFFF

    headers = ["width", "tree", "params"] + [f"{b} tok vs {base}" for b in batches for base in ("w x w", "w-4w-w")]
    rows, curves = [], {}
    for width in widths:
        torch.manual_seed(0)
        depth = int(math.log2(width)) - 1
        leaf_depth, leaf_width = leaf_shape(width)
        dense = {"w x w": nn.Linear(width, width)}
        if 8 * width * width <= max_dense:
            dense["w-4w-w"] = dense_block(width, 4 * width)
        trees = {f"neuron depth {depth}": FFF(width, width, depth),
                 f"leaf {leaf_depth} x {leaf_width}": FFF(width, width, leaf_depth, form="leaf", leaf_width=leaf_width),
                 f"fastfeedforward {leaf_depth} x {leaf_width} (peer)": PeerFFF(width, leaf_width, width, leaf_depth,
                                                                                activation=nn.GELU())}
        cells = {name: [] for name in trees}
        for batch in batches:
            inputs = pool_of(lambda batch=batch, width=width: torch.randn(batch, width), batch * width, pool)
            seconds = time_forward({**dense, **trees}, inputs, repeats=repeats)
            for name in trees:
                for base in ("w x w", "w-4w-w"):
                    ratio = seconds[base] / seconds[name] if base in seconds else None
                    cells[name].append(f"{ratio:.2f}x" if ratio else "(not built)")
                    if ratio:
                        curves.setdefault((name.split(" ")[0], batch, base), []).append((width, ratio))
        rows += [[str(width), name, f"{count_params(tree) / 1e6:.2f} M", *cells[name]] for name, tree in trees.items()]
    out = ["### Speed-up against layer width (in = out = w), inference (ratios: dense time / tree time)\n",
           markdown_table(headers, rows), ""]
    for (form, batch, base), points in sorted(curves.items()):
        faster = [w for w, ratio in points if ratio > 1]
        out.append(f"- {form}, {batch} token{'s' if batch > 1 else ''}, vs {base}: "
                   + (f"faster from width {faster[0]}" if faster else "never faster in this range")
                   + f" ({', '.join(f'{w}: {r:.2f}x' for w, r in points)})")
    if plot:
        out.append(f"\nPlot: {plot}")
        plot_curves(curves, plot)
    return "\n".join(out) + "\n"


def plot_curves(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, base in zip(axes, ("w x w", "w-4w-w"), strict=True):
        for (form, batch, line_base), points in sorted(curves.items()):
            if line_base == base:
                widths, ratios = zip(*points, strict=True)
                axis.plot(widths, ratios, marker="o", linestyle="-" if batch == 1 else "--",
                          label=f"{form}, {batch} token{'s' if batch > 1 else ''}")
        axis.axhline(1, color="gray", linewidth=0.8)
        axis.set(xscale="log", yscale="log", xlabel="width w (in = out)", title=f"vs dense {base}")
        axis.set_xscale("log", base=2)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speed-up (dense time / tree time)")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def hardening_loss(weight: float) -> Callable[[nn.Module], torch.Tensor] | None:
    """``extra_loss`` for ``train_steps``: ``weight`` x the mean decision entropy the leaf-form trees' last soft
    forward left (``FFF.last_entropy``); None (no extra loss) for weight 0."""
    if not weight:
        return None

    def loss(model: nn.Module) -> torch.Tensor:
        entropies = [tree.last_entropy for tree in model.modules() if isinstance(tree, FFF) and tree.soft]
        return weight * torch.stack(entropies).mean()
    return loss


def accuracy(steps: int, seeds: int) -> str:
    train, val = digits_dataloaders(batch_size=64)  # images (B, 1, 8, 8): each model starts with nn.Flatten
    held_out = len(val.dataset)
    variants = {
        "dense MLP 64-64-10 (GELU)": (lambda: nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10)), 0.0),
        "FFF neuron depth 5, node=mirrored (ours)": (lambda: FFF(64, 10, 5), 0.0),
        "FFF neuron depth 4, node=mirrored (ours)": (lambda: FFF(64, 10, 4), 0.0),
        "FFF neuron depth 5, node=ultrafastbert": (lambda: FFF(64, 10, 5, node="ultrafastbert"), 0.0),
        "FFF neuron depth 5, node=linear": (lambda: FFF(64, 10, 5, node="linear"), 0.0),
        "FFF leaf depth 2 x 16, hardening 0.1": (lambda: FFF(64, 10, 2, form="leaf", leaf_width=16), 0.1),
    }
    rows = []
    for name, (make, hardening) in variants.items():
        scores = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = nn.Sequential(nn.Flatten(), make())
            train_steps(model, train, steps, lr=1e-2, extra_loss=hardening_loss(hardening))
            scores.append(loader_accuracy(model, val))
        rows.append([name, f"{count_params(model):,}", f"{statistics.median(scores):.3f}",
                     " / ".join(f"{s:.3f}" for s in scores)])
    out = [f"### Accuracy at about matched parameters: digits, {steps} Adam steps (batch 64, lr 1e-2), {seeds} seeds "
           f"(of the initialisation), {held_out} held-out images (hard inference path)\n",
           markdown_table(["model", "params", "median accuracy", "per seed"], rows), ""]

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 10)))
    train_steps(dense, train, steps, lr=1e-2)
    rows = [["dense 64-256-10 (trained)", f"{count_params(dense):,}", "-", f"{loader_accuracy(dense, val):.3f}", "-"]]
    calibration = train.dataset.tensors[0]  # every training image, as one batch
    conversions = [("neuron", dict(depth=4), "scratch", False), ("neuron", dict(depth=4), "dense", False),
                   ("leaf", dict(depth=2, leaf_width=32), "scratch", False),
                   ("leaf", dict(depth=2, leaf_width=32), "dense", False),
                   ("leaf", dict(depth=2, leaf_width=32), "dense", True)]
    for form, kwargs, init, hard in conversions:
        model = copy.deepcopy(dense)
        torch.manual_seed(0)
        report = apply_fff(model, form=form, init=init, calibration=calibration, min_width=0, **kwargs)
        converted = loader_accuracy(model, val)
        model[1].hard_training = hard
        tuned = loader_accuracy(train_steps(model, train, steps // 4, lr=3e-3), val)
        rows.append([f"FFF {form} {' x '.join(str(v) for v in kwargs.values())}, init={init}"
                     + (", hard-training fine-tune" if hard else ""),
                     f"{count_params(model):,}", f"{report.replaced[0].notes['rel_error']:.3f}",
                     f"{converted:.3f}", f"{tuned:.3f}"])
    out += [f"### Converting a trained MLP: relative output error on the training inputs, held-out accuracy right "
            f"after conversion and after {steps // 4} fine-tuning steps (lr 3e-3)\n",
            markdown_table(["model", "params", "rel. error", "accuracy converted", "accuracy fine-tuned"], rows)]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,32,512,4096", help="token batches for the block part")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--pool", type=int, default=64, help="different inputs each timing cycles through")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile'd neuron-form row")
    parser.add_argument("--widths", default=",".join(str(2**k) for k in range(6, 15)), help="widths for the width part")
    parser.add_argument("--width-batches", default="1,512", help="token batches for the width part")
    parser.add_argument("--plot", default="docs/fff_width.png", help="the width part's plot ('' for none)")
    parser.add_argument("--steps", type=int, default=800, help="training steps for the accuracy part")
    parser.add_argument("--seeds", type=int, default=3)
    run_parts(parser, {
        "block": lambda args: block([int(n) for n in args.batches.split(",")], args.repeats, args.compile, args.pool),
        "bert": lambda args: bert(max(3, args.repeats // 2), args.pool),
        "width": lambda args: width_curve([int(n) for n in args.widths.split(",")],
                                          [int(n) for n in args.width_batches.split(",")], args.repeats, args.plot,
                                          args.pool),
        "accuracy": lambda args: accuracy(args.steps, args.seeds),
    })


if __name__ == "__main__":
    main()
