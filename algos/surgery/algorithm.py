"""SurgeryAlgorithm: the Composer ``Algorithm`` every surgery in this suite is."""

from __future__ import annotations

import inspect
import logging
from abc import abstractmethod

from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from torch import nn

from algos.surgery.report import SurgeryReport
from algos.surgery.skeleton import meta_copy
from algos.surgery.targets import FilterFn, ModuleNames

log = logging.getLogger(__name__)

# Key of a SurgeryAlgorithm's checkpoint entry holding [(fqn, weightless copy of the new module), ...].
RECORD_KEY = "algos_surgery_record"


class SurgeryAlgorithm(Algorithm):
    """Rewrites modules of ``state.model`` at ``Event.INIT``: before checkpoint loading, DDP wrapping and compiling,
    with the optimizer already built (it is kept consistent).

    A subclass implements :meth:`surgery` (usually one call to ``apply_surgery`` with its converter) and keeps each
    ``__init__`` argument in an attribute of the same name, from which ``repr`` is built.

    The checkpoint entry records what was put where (weightless copies), so a run resumes from it in a Trainer built
    from the original model with no algorithm passed: see ``algos.surgery.resume``.
    """

    event = Event.INIT

    def __init__(
        self,
        *,
        target_modules: ModuleNames = None,
        exclude_modules: ModuleNames = None,
        filter_fn: FilterFn | None = None,
        strict: bool = False,
    ):
        self.target_modules = target_modules
        self.exclude_modules = exclude_modules
        self.filter_fn = filter_fn
        self.strict = strict
        self.reports: list[SurgeryReport] = []
        self._record: list[tuple[str, nn.Module]] = []
        self._unlogged: list[SurgeryReport] = []

    @property
    def name(self) -> str:
        return type(self).__name__

    @abstractmethod
    def surgery(self, model: nn.Module, optimizers=None) -> SurgeryReport:
        """Rewrite ``model`` in place, keep ``optimizers`` consistent, return the report."""

    def match(self, event: Event, state: State) -> bool:
        return event == self.event or (event == Event.BATCH_END and bool(self._unlogged))

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BATCH_END:
            self._log_reports(logger)
            return
        report = self.surgery(state.model, optimizers=state.optimizers)
        self.reports.append(report)
        self._record += [(row.fqn, meta_copy(state.model.get_submodule(row.fqn))) for row in report.replaced]
        self._unlogged.append(report)
        log.info("%s", report)
        if report.measured:  # else MACs come with the first forward pass, and the report is logged after batch 1
            self._log_reports(logger)

    def _log_reports(self, logger: Logger) -> None:
        for report in self._unlogged:
            report.log_to(logger)
        self._unlogged.clear()

    @staticmethod
    def required_on_load() -> bool:
        return True

    def state_dict(self) -> dict:
        return {"repr": repr(self), RECORD_KEY: list(self._record)}

    def __repr__(self) -> str:
        """``Name(arg=value, ...)`` with the arguments that differ from their defaults; eval-able in ``algos``'s
        namespace unless an argument is a function (``filter_fn``), which shows as its qualified name."""
        arguments = []
        for name, parameter in inspect.signature(type(self).__init__).parameters.items():
            if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            value = getattr(self, name)
            if value is parameter.default or (_comparable(value) and value == parameter.default):
                continue
            shown = f"{value.__module__}.{value.__qualname__}" if callable(value) else repr(value)
            arguments.append(f"{name}={shown}")
        return f"{self.name}({', '.join(arguments)})"


def _comparable(value) -> bool:
    return isinstance(value, (str, int, float, bool, tuple, list, dict, type(None)))
