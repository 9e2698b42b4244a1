"""Healing after surgery: self-distillation from the model before surgery (``distill``, ``SelfDistillation``).

One job per module: ``config`` (the settings, declared once), ``loss`` (the loss, a pure function), ``capture``
(which hidden states are matched, and the hooks that read them), ``distill`` (the functional loop) and
``algorithm`` (the Composer algorithm)."""

from algos.heal.algorithm import SelfDistillation
from algos.heal.capture import boundary_names, matched_boundaries
from algos.heal.config import DistillConfig, DistillError, DistillLoop
from algos.heal.distill import distill
from algos.heal.loss import distillation_loss

__all__ = ["DistillConfig", "DistillError", "DistillLoop", "SelfDistillation", "boundary_names", "distill",
           "distillation_loss", "matched_boundaries"]
