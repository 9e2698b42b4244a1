"""The smallest complete surgery algorithm: the template for new ones, and the subject of the core's tests.

``SwapLinear`` replaces each selected ``nn.Linear`` by ``SwappedLinear``, a subclass holding the very same weights, so
the model computes exactly what it computed before. A new algorithm is these three pieces, plus a method card:

1. a config dataclass: its settings, their defaults and help text, checked once on construction;
2. a ``Surgery``: which classes are candidates, the rules that skip a target without data, the converter;
3. a ``SurgeryAlgorithm`` naming the surgery, and a functional ``apply_*`` calling ``Surgery.apply``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from algos.surgery.algorithm import SurgeryAlgorithm
from algos.surgery.config import SurgeryConfig, setting
from algos.surgery.pretrained import SPECS
from algos.surgery.report import SurgeryReport
from algos.surgery.surgery import Surgery, settings_signature
from algos.surgery.yaml_names import yaml_name


@dataclass(frozen=True)
class SwapLinearConfig(SurgeryConfig):
    algorithm = "SwapLinear"

    min_features: int = setting(0, "layers with min(in, out) below this stay as they are")

    def check(self) -> None:
        self.require_int("min_features", least=0)   # or raise self.error("...") for checks of your own


class SwappedLinear(nn.Linear):
    """An ``nn.Linear`` that a surgery put there."""


SPECS.register("SwappedLinear", SwappedLinear,
               lambda m, spec: {"in_features": m.in_features, "out_features": m.out_features,
                                "bias": m.bias is not None},
               lambda s, child: SwappedLinear(s["in_features"], s["out_features"], bias=s["bias"]))


class SwapLinearSurgery(Surgery):
    config_class = SwapLinearConfig
    classes = (nn.Linear,)
    config: SwapLinearConfig

    def skip_reason(self, linear: nn.Linear, fqn: str) -> str | None:
        """A rule that needs no data: it runs at selection, so a dry run (``plan``) applies it too. A rule that
        needs what ``prepare`` gathered raises ``SkipModule(reason)`` in ``convert`` instead."""
        smallest = min(linear.in_features, linear.out_features)
        if smallest < self.config.min_features:
            return f"min(in, out) = {smallest} below min_features {self.config.min_features}"
        return None

    def convert(self, linear: nn.Linear, fqn: str) -> SwappedLinear:
        """The new module, computing what ``linear`` did."""
        swapped = SwappedLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            swapped.load_state_dict(linear.state_dict())
        return swapped


def apply_swap_linear(model: nn.Module, *, optimizers=None, example_inputs=None, **settings) -> SurgeryReport:
    return SwapLinearSurgery.apply(model, optimizers=optimizers, example_inputs=example_inputs, **settings)


settings_signature(apply_swap_linear, SwapLinearConfig, doc="Swap ``nn.Linear`` layers of ``model`` for "
                   "``SwappedLinear`` ones holding the same weights, in place; returns the report.")


@yaml_name("swap_linear")
class SwapLinear(SurgeryAlgorithm):
    """Composer form of :func:`apply_swap_linear`."""

    surgery_class = SwapLinearSurgery
