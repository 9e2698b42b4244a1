"""What FFF trees need in training beyond the surgery: ``FFFTraining``, a Composer algorithm acting on every ``FFF``
in the model (``FFFReplace`` delegates to one; on its own it serves trees built by hand or resumed from a checkpoint).

* ``hardening``: weight of the leaf form's hardening loss (mean decision entropy), added to the loss at
  ``Event.AFTER_LOSS``; ``hardening_ramp`` (a Composer time, e.g. ``"200ba"`` or ``"0.5dur"``) ramps the weight
  linearly from 0 to ``hardening`` over that span.
* ``hard_training_at``: from this time on, leaf-form trees train on their hard path (leaves only).
* Every ``log_interval`` batches: ``fff/leaf_usage_entropy`` (entropy of the leaf/bottom-node usage over the
  interval, divided by its maximum: 1 = even use), ``fff/load_balance`` (busiest over mean usage: 1 = even) and,
  for the leaf form, ``fff/decision_entropy``.
* ``find_unused_parameters`` is True, so DDP tolerates the parameters hard routing leaves without gradient.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass

import torch
from composer.core import Algorithm, Event, State, TimeUnit
from composer.loggers import Logger
from torch import nn

from algos.fff.tree import FFF
from algos.surgery.algorithm import parse_time, time_reached
from algos.surgery.config import SurgeryConfig, fields_help, setting
from algos.surgery.errors import AlgorithmError, SurgeryError
from algos.surgery.yaml_names import yaml_name

# Where the hard-training switch is checked: when trees may have just appeared (a surgery at INIT, FIT_START, a
# batch or an epoch end; FIT_START also after resuming) and after every batch.
_SWITCH_EVENTS = (Event.INIT, Event.FIT_START, Event.BATCH_END, Event.EPOCH_END)


@dataclass(frozen=True)
class FFFTrainingConfig(SurgeryConfig):
    """The training aids' settings, declared once: ``FFFTraining`` takes them, and so does ``FFFReplace``."""

    algorithm = "FFFTraining"

    hardening: float = setting(0.0, "leaf form: weight of the hardening loss (mean decision entropy) added to the "
                                    "loss; 0: none")
    hardening_ramp: str | None = setting(None, "a Composer time (e.g. '200ba', '0.5dur'): the hardening weight ramps "
                                               "linearly from 0 over it")
    hard_training_at: str | None = setting(None, "a Composer time: from then on, leaf-form trees train on their hard "
                                                 "path (one leaf per token)")
    log_interval: int = setting(50, "batches between the usage metrics (fff/leaf_usage_entropy, fff/load_balance, "
                                    "fff/decision_entropy)")

    def check(self) -> None:
        self.require_number("hardening")
        self.require_int("log_interval", least=1)
        for argument in ("hardening_ramp", "hard_training_at"):
            parse_time(getattr(self, argument), self.algorithm, argument)


TRAINING_SETTINGS = tuple(f.name for f in dataclasses.fields(FFFTrainingConfig))


@yaml_name("fff_training")
class FFFTraining(Algorithm):
    """The hardening loss, the hard-training switch and usage logging for the model's ``FFF`` trees.

    ``name`` is the algorithm named in argument errors (``FFFReplace`` passes its own).

    Args:
{settings}
    """

    def __init__(self, *, name: str = "FFFTraining", **settings):
        try:
            self.config = FFFTrainingConfig.build(**settings)
        except AlgorithmError as error:  # named after the algorithm the user called
            raise SurgeryError(name, str(error).removeprefix(f"{FFFTrainingConfig.algorithm}: ")) from None
        self._ramp = parse_time(self.config.hardening_ramp, name, "hardening_ramp")
        self._hard_at = parse_time(self.config.hard_training_at, name, "hard_training_at")

    @property
    def find_unused_parameters(self) -> bool:
        return True

    def match(self, event: Event, state: State) -> bool:
        wanted = ((event == Event.AFTER_LOSS and self.config.hardening > 0) or event == Event.BATCH_END
                  or (event in _SWITCH_EVENTS and self._hard_at is not None))
        return wanted and bool(trees(state.model))

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.AFTER_LOSS:
            self._add_hardening_loss(state)
            return
        if self._hard_at is not None and time_reached(state, self._hard_at):  # "0ba": hard from the surgery on
            for tree in trees(state.model):
                tree.hard_training = True
        if event == Event.BATCH_END and int(state.timestamp.batch) % self.config.log_interval == 0:
            logger.log_metrics(usage_metrics(trees(state.model)))

    def hardening_weight(self, state: State) -> float:
        """``hardening``, times the fraction of ``hardening_ramp`` elapsed (at most 1)."""
        if self._ramp is None:
            return self.config.hardening
        if self._ramp.unit == TimeUnit.DURATION:
            progress = float(state.get_elapsed_duration() or 0) / self._ramp.value
        else:
            progress = int(state.timestamp.get(self._ramp.unit)) / max(self._ramp.value, 1)
        return self.config.hardening * min(1.0, progress)

    def _add_hardening_loss(self, state: State) -> None:
        entropies = [tree.last_entropy for tree in trees(state.model) if tree.soft and tree.last_entropy is not None]
        if not entropies:
            return
        extra = self.hardening_weight(state) * torch.stack(entropies).mean()
        loss = state.loss
        if isinstance(loss, torch.Tensor):
            state.loss = loss + extra
        elif isinstance(loss, dict):  # Composer sums the values, or uses "total" when there is one
            state.loss = {**loss, "fff_hardening": extra}
            if "total" in loss:
                state.loss["total"] = loss["total"] + extra
        else:
            state.loss = (*loss, extra)

    def __repr__(self) -> str:
        """``FFFTraining(arg=value, ...)`` with the arguments that differ from their defaults (eval-able)."""
        return f"FFFTraining({', '.join(f'{key}={value!r}' for key, value in self.config.changed().items())})"


FFFTraining.__doc__ = FFFTraining.__doc__.replace("{settings}", fields_help(FFFTrainingConfig))
FFFTraining.__signature__ = inspect.Signature(
    [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
     for f in dataclasses.fields(FFFTrainingConfig)]
    + [inspect.Parameter("name", inspect.Parameter.KEYWORD_ONLY, default="FFFTraining")])


def trees(model: nn.Module) -> list[FFF]:
    return [module for module in model.modules() if isinstance(module, FFF)]


def usage_metrics(fffs: list[FFF]) -> dict[str, float]:
    """Usage statistics since the last call, averaged over trees; resets the counters."""
    entropies, balances, decisions = [], [], []
    for tree in fffs:
        usage = tree.leaf_usage.float()
        total = usage.sum()
        if total > 0 and usage.numel() > 1:
            p = usage / total
            entropies.append(float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(usage.numel())))
            balances.append(float(usage.max() / usage.mean()))
        if tree.form == "leaf" and tree.last_entropy is not None:
            decisions.append(float(tree.last_entropy) / math.log(2))
        tree.leaf_usage.zero_()
    metrics = {}
    if entropies:
        metrics["fff/leaf_usage_entropy"] = sum(entropies) / len(entropies)
        metrics["fff/load_balance"] = sum(balances) / len(balances)
    if decisions:
        metrics["fff/decision_entropy"] = sum(decisions) / len(decisions)
    return metrics
