"""Offline quick-start: train on real data, factorize the trained model mid-run, then resume without the algorithm.

A 64-256-256-10 MLP trains on scikit-learn's digits; after epoch 1, ``Factorize`` splits its 256 x 256 layer into
two rank-32 layers initialised from the trained weights, whitened by the activations of a few training batches
(``init="activation"``), and training goes on. The report shows ranks, parameters, MACs and the relative output
error; the final checkpoint then resumes in a Trainer built from the original dense model with no algorithm passed.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from composer import Trainer
from composer.models import ComposerClassifier
from torch import nn

from algos import Factorize
from algos.run.data import digits_dataloaders


def digits_mlp(seed: int = 0) -> ComposerClassifier:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    return ComposerClassifier(net, num_classes=10)


def accuracy(trainer: Trainer) -> float:
    trainer.eval()
    return float(trainer.state.eval_metrics["eval"]["MulticlassAccuracy"].compute())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="algos demo", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="runs/demo", help="checkpoint folder (overwritten)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Cannot split tensor")  # the last, smaller batch of each epoch
    train, val = digits_dataloaders()
    common = dict(train_dataloader=train, eval_dataloader=val, device="cpu", seed=0, progress_bar=False,
                  max_duration=f"{args.epochs}ep", save_folder=args.out, save_overwrite=True,
                  save_filename="ep{epoch}.pt")

    print(f"1. Train a 64-256-256-10 MLP on scikit-learn's digits ({len(train.dataset)} train / "
          f"{len(val.dataset)} val images) for {args.epochs} epochs; factorize it after epoch 1.")
    algorithm = Factorize(rank=32, init="activation", min_features=128, apply_at="1ep")
    print(f"   {algorithm!r}")
    model = digits_mlp()
    trainer = Trainer(model=model, optimizers=torch.optim.Adam(model.parameters(), lr=1e-3),
                      algorithms=[algorithm], **common)
    trainer.fit()
    print(algorithm.reports[0])
    trained_accuracy = accuracy(trainer)
    print(f"   validation accuracy after training: {trained_accuracy:.4f}")

    checkpoint = Path(args.out) / f"ep{args.epochs - 1}.pt"
    print(f"\n2. Fresh Trainer from the original model, no algorithm passed, resuming {checkpoint} "
          f"(saved after epoch {args.epochs - 1}), trained to the end again.")
    model = digits_mlp()
    resumed = Trainer(model=model, optimizers=torch.optim.Adam(model.parameters(), lr=1e-3),
                      load_path=str(checkpoint), **{**common, "save_folder": f"{args.out}/resumed"})
    print(f"   architecture after load: {[type(m).__name__ for m in resumed.state.model.module]}")
    resumed.fit()
    resumed_accuracy = accuracy(resumed)
    pairs = zip(trainer.state.model.parameters(), resumed.state.model.parameters(), strict=True)
    same = all(torch.equal(a, b) for a, b in pairs)
    print(f"   validation accuracy after resuming: {resumed_accuracy:.4f}; "
          f"weights bit-identical to the uninterrupted run: {same}")


if __name__ == "__main__":
    main()
