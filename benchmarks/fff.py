"""FFF-replace benchmark: FFF trees vs the dense feed-forward block they replace, side by side in one process, with
the `fastfeedforward` PyPI package as the peer, and accuracy / conversion fidelity on a small real dataset.
Prints markdown.

    .venv/bin/python benchmarks/fff.py                       # all parts (`make` installs the package into .venv)
    .venv/bin/python benchmarks/fff.py --parts block --batches 1,512 [--compile]

(a) block: dense 768-3072-768 GELU vs FFF neuron form depth 11 (12 of 4095 neurons per token; mirrored and
    UltraFastBERT's form), a leaf form of about the dense parameter count (depth 4, leaves 192 wide), and
    fastfeedforward's FFF with the same leaf widths, at the given token batches. Inference (eval, inference_mode).
(b) bert: BERT-base-size BertModel (HF config, random init), every FFN dense vs FFF, batch 32 x 128.
(c) accuracy: scikit-learn digits (8x8 images, ``algos.run.data.digits_dataloaders``: 1,438 train / 359 held out);
    dense MLP vs FFF forms at about the same parameter count, trained the same way (``algos.bench.train_steps``); then
    a trained wider MLP converted to FFF by dense vs scratch init: relative output error, accuracy right after
    conversion and after a short fine-tune.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable

import torch
from torch import nn

from algos import FFF, apply_fff
from algos.bench import loader_accuracy, markdown_table, run_parts, time_forward, train_steps
from algos.run.data import digits_dataloaders
from algos.surgery import count_params


def dense_block(d: int = 768, hidden: int = 3072) -> nn.Module:
    return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))


def block(batches: list[int], repeats: int, compile_: bool) -> str:
    from fastfeedforward import FFF as PeerFFF

    torch.manual_seed(0)
    models = {
        "dense 768-3072-768": dense_block(),
        "FFF neuron depth 11 (mirrored)": FFF(768, 768, 11),
        "FFF neuron depth 11 (UltraFastBERT form)": FFF(768, 768, 11, mirrored=False),
        "FFF leaf depth 4 x 192": FFF(768, 768, 4, form="leaf", leaf_width=192),
        "fastfeedforward FFF depth 4 x 192 (peer)": PeerFFF(768, 192, 768, 4, activation=nn.GELU()),
    }
    if compile_:
        models["FFF neuron depth 11 (mirrored), torch.compile"] = torch.compile(copy.deepcopy(
            models["FFF neuron depth 11 (mirrored)"]), dynamic=True)
    out = ["### FFN block, inference, d 768 (ratios: dense time / candidate time)\n"]
    headers = ["block", "params"] + [f"{b} tokens" for b in batches]
    rows = {name: [name, f"{count_params(model) / 1e6:.2f} M"] for name, model in models.items()}
    dense_ms = ["dense median"] + [""]
    for batch in batches:
        x = torch.randn(batch, 768)
        chosen = {name: model for name, model in models.items()
                  if not (name.startswith("fastfeedforward") and batch > 512)}  # peer: one token at a time
        seconds = time_forward(chosen, x, repeats=repeats)
        dense = seconds["dense 768-3072-768"]
        dense_ms.append(f"{dense * 1e3:.2f} ms")
        for name in models:
            rows[name].append(f"{dense / seconds[name]:.1f}x" if name in seconds else "(skipped: too slow)")
    out.append(markdown_table(headers, [dense_ms] + list(rows.values())))
    return "\n".join(out) + "\n"


def bert(repeats: int) -> str:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    dense = BertModel(BertConfig(), add_pooling_layer=False)
    models = {"BERT-base encoder (dense FFN)": dense}
    for name, kwargs in {"every FFN -> FFF neuron depth 11": dict(depth=11),
                         "every FFN -> FFF leaf depth 4 x 192": dict(depth=4, form="leaf", leaf_width=192)}.items():
        model = copy.deepcopy(dense)
        apply_fff(model, **kwargs)
        models[name] = model
    inputs = {"input_ids": torch.randint(0, 30000, (32, 128))}
    seconds = time_forward(models, inputs, repeats=repeats)
    base = seconds["BERT-base encoder (dense FFN)"]
    rows = [[name, f"{count_params(model) / 1e6:.1f} M", f"{seconds[name] * 1e3:.0f} ms",
             f"{base / seconds[name]:.2f}x"] for name, model in models.items()]
    return ("### BERT-base-size encoder, batch 32 x 128, inference\n\n"
            + markdown_table(["model", "params", "median forward", "speed-up"], rows) + "\n")


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
        "FFF neuron depth 5, mirrored (ours)": (lambda: FFF(64, 10, 5), 0.0),
        "FFF neuron depth 4, mirrored (ours)": (lambda: FFF(64, 10, 4), 0.0),
        "FFF neuron depth 5, UltraFastBERT form": (lambda: FFF(64, 10, 5, mirrored=False), 0.0),
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
        report = apply_fff(model, form=form, init=init, calibration=calibration, **kwargs)
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
    parser.add_argument("--compile", action="store_true", help="add a torch.compile'd neuron-form row")
    parser.add_argument("--steps", type=int, default=800, help="training steps for the accuracy part")
    parser.add_argument("--seeds", type=int, default=3)
    run_parts(parser, {
        "block": lambda args: block([int(n) for n in args.batches.split(",")], args.repeats, args.compile),
        "bert": lambda args: bert(max(3, args.repeats // 2)),
        "accuracy": lambda args: accuracy(args.steps, args.seeds),
    })


if __name__ == "__main__":
    main()
