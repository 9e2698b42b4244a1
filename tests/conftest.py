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


# The `slow` marker follows measured durations: a test whose setup + call + teardown takes SLOW_SECONDS or more on a
# quiet machine is marked slow, one under FAST_SECONDS is not (between the two, either: noise moves tests across one
# line). After every run, the summary lists the tests that disagree, to re-mark when the machine was quiet.
SLOW_SECONDS, FAST_SECONDS = 3.0, 1.0
_seconds: dict[str, float] = {}
_marked_slow: set[str] = set()


def pytest_collection_modifyitems(items):
    _marked_slow.update(item.nodeid for item in items if item.get_closest_marker("slow"))


def pytest_runtest_logreport(report):
    if not report.skipped:
        _seconds[report.nodeid] = _seconds.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    unmarked = sorted((s, n) for n, s in _seconds.items() if s >= SLOW_SECONDS and n not in _marked_slow)
    overmarked = sorted((s, n) for n, s in _seconds.items() if s < FAST_SECONDS and n in _marked_slow)
    if unmarked or overmarked:
        terminalreporter.section("slow markers against this run's durations (tests/conftest.py)")
        for seconds, nodeid in unmarked[::-1]:
            terminalreporter.write_line(f"{seconds:6.1f}s not marked slow: {nodeid}")
        for seconds, nodeid in overmarked:
            terminalreporter.write_line(f"{seconds:6.1f}s marked slow: {nodeid}")
