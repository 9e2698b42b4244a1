"""Small training loops for benchmarks/' accuracy parts: a model trained the same way under every variant."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def train_steps(model: nn.Module, loader, steps: int, lr: float = 1e-3,
                extra_loss: Callable[[nn.Module], torch.Tensor] | None = None) -> nn.Module:
    """``steps`` Adam steps of cross-entropy over ``(inputs, labels)`` batches, cycling through ``loader``.

    ``extra_loss(model)``, when given, is added to each step's loss after the forward (e.g. a regulariser that the
    forward leaves on the model's modules)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    step = 0
    while step < steps:
        for inputs, labels in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs), labels)
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                return model
    return model


def loader_accuracy(model: nn.Module, loader) -> float:
    """Top-1 accuracy over every ``(inputs, labels)`` batch of ``loader``, in eval mode."""
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    return correct / len(loader.dataset)
