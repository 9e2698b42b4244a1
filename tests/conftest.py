import os

import pytest
import torch
from composer.models import ComposerClassifier
from composer.utils import dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("WANDB_MODE", "offline")


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))


@pytest.fixture
def composer_model_factory():
    """Fresh, identically initialised Composer classifiers."""
    return lambda seed=0: ComposerClassifier(tiny_mlp(seed), num_classes=4)


@pytest.fixture
def train_dataloader():
    generator = torch.Generator().manual_seed(1)
    dataset = TensorDataset(torch.randn(64, 16, generator=generator), torch.randint(0, 4, (64,), generator=generator))
    return DataLoader(dataset, batch_size=8, sampler=dist.get_sampler(dataset, shuffle=True))
