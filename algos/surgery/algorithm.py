"""SurgeryAlgorithm: the Composer ``Algorithm`` every surgery in this suite is."""

from __future__ import annotations

import inspect
import logging
from abc import abstractmethod

from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist
from torch import nn

from algos.surgery.replace import _Planned, planning_only
from algos.surgery.report import SurgeryReport
from algos.surgery.skeleton import meta_copy
from algos.surgery.targets import FilterFn, ModuleNames

log = logging.getLogger(__name__)

# Key of a SurgeryAlgorithm's checkpoint entry holding [(fqn, weightless copy of the new module), ...].
RECORD_KEY = "algos_surgery_record"


class SurgeryAlgorithm(Algorithm):
    """Rewrites modules of ``state.model`` once, by default at ``Event.INIT``: before checkpoint loading, DDP
    wrapping and compiling, with the optimizer already built (it is kept consistent).

    ``apply_at`` (a Composer time such as ``"2ep"``, ``"500ba"``, ``"0.5dur"``) moves the surgery to the first
    batch or epoch end at or after that time, on the model trained so far; the optimizer keeps the state of the
    parameters that stay and starts fresh for the new ones. An algorithm that needs calibration batches (its
    ``calibration_needed`` is > 0) draws them from the train dataloader, which Composer sets after INIT, so it runs
    at ``Event.FIT_START`` at the earliest. Surgery after INIT would rewrite a DDP-wrapped model, so it is
    refused at construction when more than one process runs.

    A subclass implements :meth:`surgery` (usually one call to ``apply_surgery`` with its converter) and keeps each
    ``__init__`` argument in an attribute of the same name, from which ``repr`` is built; it sets those attributes
    before calling ``super().__init__``, which reads ``calibration_needed``.

    The checkpoint entry records what was put where (weightless copies), so a run resumes from it in a Trainer built
    from the original model with no algorithm passed: see ``algos.surgery.resume``.
    """

    def __init__(
        self,
        *,
        apply_at: str | Time | None = None,
        target_modules: ModuleNames = None,
        exclude_modules: ModuleNames = None,
        filter_fn: FilterFn | None = None,
        strict: bool = False,
    ):
        self.apply_at = apply_at
        self.target_modules = target_modules
        self.exclude_modules = exclude_modules
        self.filter_fn = filter_fn
        self.strict = strict
        self._apply_at_time = parse_time(apply_at, self.name, "apply_at")
        if (self._apply_at_time is not None or self.calibration_needed) and dist.get_world_size() > 1:
            when = f"apply_at={apply_at!r}" if apply_at is not None else "calibration from the train dataloader"
            raise ValueError(f"{self.name}: {when} rewrites the model after DDP wraps it, which is not supported "
                             f"with {dist.get_world_size()} processes; apply it at INIT (apply_at=None) without "
                             f"calibration, or run in one process.")
        self.reports: list[SurgeryReport] = []
        self._record: list[tuple[str, nn.Module]] = []
        # At INIT, weightless copies of the modules the surgery replaced: if a checkpoint then loads whose recorded
        # surgery differs (ranks chosen from other weights), resume swaps them back before replaying the record.
        self._originals: list[tuple[str, nn.Module]] = []
        self._unlogged: list[SurgeryReport] = []
        self._done = False

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def applied(self) -> bool:
        """True once the surgery has happened in this run."""
        return self._done

    @property
    def calibration_needed(self) -> int:
        """How many train batches :meth:`surgery` wants as calibration (0: none)."""
        return 0

    @abstractmethod
    def surgery(self, model: nn.Module, optimizers=None, calibration=None) -> SurgeryReport:
        """Rewrite ``model`` in place, keep ``optimizers`` consistent, return the report. ``calibration`` is an
        iterable of batches for the model (drawn lazily from the train dataloader) when the subclass asked for it."""

    def plan(self, model: nn.Module) -> tuple[list[str], list]:
        """What :meth:`surgery` would select in ``model`` now, without calibrating or changing anything:
        ``(names of the targets, skipped candidates)``. Argument errors surface here as they would in surgery."""
        with planning_only():
            try:
                self.surgery(model, calibration=iter(()))
            except _Planned as planned:
                return planned.targets, planned.skipped
        raise RuntimeError(f"{self.name}.surgery did not go through apply_surgery; cannot plan it")

    def match(self, event: Event, state: State) -> bool:
        return self._due(event, state) or (event == Event.BATCH_END and bool(self._unlogged))

    def _due(self, event: Event, state: State) -> bool:
        if self._done:
            return False
        when = self._apply_at_time
        if when is None:
            return event == (Event.FIT_START if self.calibration_needed else Event.INIT)
        return event in (Event.BATCH_END, Event.EPOCH_END) and time_reached(state, when)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if not self._due(event, state):
            self._log_reports(logger)
            return
        self._done = True
        calibration = _dataloader_batches(state, self.calibration_needed) if self.calibration_needed else None
        before = meta_copy(state.model) if event == Event.INIT else None  # a checkpoint may load after INIT
        report = self.surgery(state.model, optimizers=state.optimizers, calibration=calibration)
        self.reports.append(report)
        replaced = [fqn for row in report.replaced for fqn in (row.fqn, *row.companions)]
        self._record += [(fqn, meta_copy(state.model.get_submodule(fqn))) for fqn in replaced]
        if before is not None:
            self._originals = [(fqn, before.get_submodule(fqn)) for fqn in replaced]
        self._unlogged.append(report)
        log.info("%s", report)
        if report.measured:  # else MACs come with the first forward pass, and the report is logged after batch 1
            self._log_reports(logger)

    def adopt(self, record: list[tuple[str, nn.Module]]) -> None:
        """Take a checkpoint's record as this run's surgery (resume replays it): done, never recomputed."""
        self._done = True
        self._record = list(record)
        self._originals = []

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


def parse_time(value, name: str, argument: str) -> Time | None:
    """A Composer ``Time`` from a string such as "2ep", or a one-line error naming the argument."""
    if value is None or isinstance(value, Time):
        return value
    try:
        return Time.from_input(value)
    except (ValueError, TypeError):
        raise ValueError(f"{name}: {argument}={value!r} is not a Composer time; use None or a string such as "
                         f"'2ep', '500ba', '0.5dur'.") from None


def time_reached(state: State, when: Time) -> bool:
    """Has training reached ``when`` (epochs, batches, samples, tokens or a fraction of the duration)?"""
    if when.unit == TimeUnit.DURATION:
        elapsed = state.get_elapsed_duration()
        return elapsed is not None and elapsed >= when
    return state.timestamp.get(when.unit) >= when


def _dataloader_batches(state: State, count: int):
    """Up to ``count`` batches of the train dataloader on the training device, drawn only when iterated."""
    if state.train_dataloader is None:
        raise ValueError("calibration needs the Trainer's train_dataloader, and none was given")
    for index, batch in enumerate(state.train_dataloader):
        if index >= count:
            return
        yield state.device.batch_to_device(batch)


def _comparable(value) -> bool:
    return isinstance(value, (str, int, float, bool, tuple, list, dict, type(None)))
