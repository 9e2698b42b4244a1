"""Datasets that need no network."""

from __future__ import annotations

import torch
from composer.utils import dist
from torch.utils.data import DataLoader, TensorDataset


def digits_dataloaders(batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """UCI handwritten digits (1,797 8x8 grey images, 10 classes), shipped inside scikit-learn.

    Returns (train, val) loaders of ``(image (1, 8, 8) in [0, 1], label)``; the split is fixed by ``seed``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(labels) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    train_set, val_set = TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val])
    return (
        DataLoader(train_set, batch_size=batch_size, sampler=dist.get_sampler(train_set, shuffle=True)),
        DataLoader(val_set, batch_size=batch_size, sampler=dist.get_sampler(val_set, shuffle=False)),
    )
