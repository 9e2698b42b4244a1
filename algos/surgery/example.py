"""The smallest complete surgery algorithm: the template for new ones, and the subject of the core's tests.

``SwapLinear`` replaces each selected ``nn.Linear`` by ``SwappedLinear``, a subclass holding the very same weights, so
the model computes exactly what it computed before. Everything a real algorithm needs is exercised: selection, a
converter that copies weights, skipping with a reason, the report, optimizer bookkeeping and checkpoint resume.
"""

from __future__ import annotations

import torch
from torch import nn

from algos.surgery.algorithm import SurgeryAlgorithm
from algos.surgery.replace import apply_surgery
from algos.surgery.report import SurgeryReport


class SwappedLinear(nn.Linear):
    """An ``nn.Linear`` that a surgery put there."""


def too_small(linear: nn.Linear, min_features: int) -> str | None:
    """A rule that needs no data: passed as ``skip_fn``, so a dry run (``plan``) applies it too."""
    smallest = min(linear.in_features, linear.out_features)
    return f"min(in, out) = {smallest} below min_features {min_features}" if smallest < min_features else None


def to_swapped_linear(linear: nn.Linear, fqn: str) -> SwappedLinear:
    """The converter: a new module that computes what ``linear`` did. A rule that needs the data a ``prepare``
    step gathered raises ``SkipModule(reason)`` here instead of being a ``skip_fn``."""
    swapped = SwappedLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        swapped.load_state_dict(linear.state_dict())
    return swapped


def apply_swap_linear(model: nn.Module, *, min_features: int = 0, optimizers=None, example_inputs=None,
                      **selection) -> SurgeryReport:
    """Functional form; ``selection`` takes ``target_modules``, ``exclude_modules``, ``filter_fn``, ``strict``."""
    return apply_surgery(
        model,
        to_swapped_linear,
        algorithm="SwapLinear",
        classes=(nn.Linear,),
        optimizers=optimizers,
        example_inputs=example_inputs,
        skip_fn=lambda module, fqn: too_small(module, min_features),
        **selection,
    )


class SwapLinear(SurgeryAlgorithm):
    """Composer form of :func:`apply_swap_linear`."""

    def __init__(self, *, min_features: int = 0, apply_at=None, target_modules=None, exclude_modules=None,
                 filter_fn=None, strict: bool = False):
        super().__init__(apply_at=apply_at, target_modules=target_modules, exclude_modules=exclude_modules,
                         filter_fn=filter_fn, strict=strict)
        self.min_features = min_features

    def surgery(self, model: nn.Module, optimizers=None, calibration=None) -> SurgeryReport:
        return apply_swap_linear(model, min_features=self.min_features, optimizers=optimizers,
                                 target_modules=self.target_modules, exclude_modules=self.exclude_modules,
                                 filter_fn=self.filter_fn, strict=self.strict)
