"""Healing after surgery: self-distillation from the model before surgery (``distill``, ``SelfDistillation``)."""

from algos.heal.algorithm import SelfDistillation
from algos.heal.config import DistillConfig
from algos.heal.distill import boundary_names, distill, distillation_loss, matched_boundaries

__all__ = ["DistillConfig", "SelfDistillation", "boundary_names", "distill", "distillation_loss", "matched_boundaries"]
