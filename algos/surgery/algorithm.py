"""SurgeryAlgorithm: the Composer ``Algorithm`` every surgery in this suite is."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import ClassVar, Protocol, runtime_checkable

from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from algos.surgery.averaging import weight_averages_follow_surgery
from algos.surgery.batches import first_sample
from algos.surgery.config import Selection
from algos.surgery.errors import SurgeryError
from algos.surgery.report import SurgeryReport, measure_macs
from algos.surgery.skeleton import meta_copy
from algos.surgery.surgery import Surgery, plan_surgery, run_surgery, settings_signature, split_settings

log = logging.getLogger(__name__)

# Key of a SurgeryAlgorithm's checkpoint entry holding [(fqn, weightless copy of the new module), ...].
RECORD_KEY = "algos_surgery_record"


@runtime_checkable
class BeforeSurgery(Protocol):
    """An algorithm that wants to see the model right before a surgery rewrites it (``SelfDistillation`` copies it
    as its teacher): every ``SurgeryAlgorithm`` calls ``before_surgery(state)`` on those in ``state.algorithms``,
    whatever their order in the list, right before its surgery."""

    def before_surgery(self, state: State) -> None: ...


class SurgeryAlgorithm(Algorithm):
    """A ``Surgery`` as a Composer algorithm: rewrites ``state.model`` once, by default at ``Event.INIT`` (before
    checkpoint loading, DDP wrapping and compiling, with the optimizer already built and kept consistent).

    A subclass names its ``surgery_class``; its constructor then takes the config's settings, the ``Selection``'s
    and ``apply_at`` as keyword arguments (the class's signature, ``repr`` and the YAML key check come from them).

    ``apply_at`` (a Composer time such as ``"2ep"``, ``"500ba"``, ``"0.5dur"``) moves the surgery to the first
    batch or epoch end at or after that time, on the model trained so far; the optimizer keeps the state of the
    parameters that stay and starts fresh for the new ones. A surgery that needs calibration batches (its config's
    ``calibration_needed`` is > 0) draws them from the train dataloader, which Composer sets after INIT, so it runs
    at ``Event.FIT_START`` at the earliest. Surgery after INIT would rewrite a DDP-wrapped model, so it is
    refused at construction when more than one process runs.

    The checkpoint entry records what was put where (weightless copies), so a run resumes from it in a Trainer built
    from the original model with no algorithm passed: see ``algos.surgery.resume``.
    """

    surgery_class: ClassVar[type[Surgery]]

    def __init__(self, *, apply_at: str | Time | None = None, **settings):
        self.selection, self.config = split_settings(self.surgery_class.config_class, dict(settings))
        self.apply_at = apply_at
        self._apply_at_time = parse_time(apply_at, self.name, "apply_at")
        if (self._apply_at_time is not None or self.calibration_needed) and dist.get_world_size() > 1:
            when = f"apply_at={apply_at!r}" if apply_at is not None else "calibration from the train dataloader"
            raise SurgeryError(self.name, f"{when} rewrites the model after DDP wraps it, which is not supported "
                                          f"with {dist.get_world_size()} processes; apply it at INIT (apply_at=None) "
                                          f"without calibration, or run in one process.")
        self.reports: list[SurgeryReport] = []
        self._record: list[tuple[str, nn.Module]] = []
        # At INIT, weightless copies of the modules the surgery replaced: if a checkpoint then loads whose recorded
        # surgery differs (ranks chosen from other weights), resume swaps them back before replaying the record.
        self._originals: list[tuple[str, nn.Module]] = []
        self._unlogged: list[SurgeryReport] = []
        self._done = False

    def __init_subclass__(cls, **kwargs):
        """The constructor's signature, from the subclass's own keyword arguments (if it adds any), its config's
        fields, the selection's and ``apply_at``: what ``help()``, IDEs and the YAML runner's key check read."""
        super().__init_subclass__(**kwargs)
        if not hasattr(cls, "surgery_class") or ("surgery_class" not in vars(cls) and "__init__" not in vars(cls)):
            return
        own = [p for name, p in inspect.signature(cls.__init__).parameters.items()
               if name != "self" and p.kind is p.KEYWORD_ONLY and name != "apply_at"]
        settings = inspect.signature(settings_signature(lambda model: None, cls.surgery_class.config_class,
                                                        doc="")).parameters.values()
        apply_at = inspect.Parameter("apply_at", inspect.Parameter.KEYWORD_ONLY, default=None)
        params = own + [p for p in settings if p.name != "model"] + [apply_at]
        cls.__signature__ = inspect.Signature(params)

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
        return self.config.calibration_needed

    def surgery(self, model: nn.Module, optimizers=None, calibration=None) -> SurgeryReport:
        """Rewrite ``model`` in place, keep ``optimizers`` consistent, return the report. ``calibration`` is an
        iterable of batches for the model (drawn lazily from the train dataloader) when the config asks for it."""
        return run_surgery(self.surgery_class(model, self.config, self.selection), optimizers=optimizers,
                           calibration=calibration)

    def plan(self, model: nn.Module) -> tuple[list[str], list]:
        """What :meth:`surgery` would select in ``model`` now, without calibrating or changing anything:
        ``(names of the targets, skipped candidates)``. Errors a model would raise surface here too."""
        return plan_surgery(self.surgery_class(model, self.config, self.selection))

    def match(self, event: Event, state: State) -> bool:
        return (event == Event.INIT or self._due(event, state)
                or (event == Event.BEFORE_FORWARD and bool(self._unlogged)))

    def _due(self, event: Event, state: State) -> bool:
        if self._done:
            return False
        when = self._apply_at_time
        if when is None:
            return event == (Event.FIT_START if self.calibration_needed else Event.INIT)
        return event in (Event.BATCH_END, Event.EPOCH_END) and time_reached(state, when)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._refuse_after_init_under_fsdp(state)
        if not self._due(event, state):  # the first batch after the surgery: measure its MACs on it, then log
            unmeasured = [report for report in self._unlogged if not report.measured]
            if unmeasured and state.batch is not None:
                model = state.model.module if isinstance(state.model, DistributedDataParallel) else state.model
                measure_macs(unmeasured, model, first_sample(state.batch))
            self._log_reports(logger)
            return
        self._done = True
        with weight_averages_follow_surgery(state):  # Composer's EMA / SWA copies take the new modules
            for algorithm in state.algorithms:
                if isinstance(algorithm, BeforeSurgery):
                    algorithm.before_surgery(state)
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
        if report.measured:  # else MACs are measured on the next batch, and the report is logged then
            self._log_reports(logger)

    def _refuse_after_init_under_fsdp(self, state: State) -> None:
        """FSDP wraps the model right after INIT (flat, sharded parameters): a surgery after that cannot rewrite it.
        Refused at INIT, before anything is wrapped or trained (in one process too, where DDP would be fine)."""
        if getattr(state, "fsdp_config", None) is None or not (self._apply_at_time is not None
                                                                or self.calibration_needed):
            return
        when = f"apply_at={self.apply_at!r}" if self._apply_at_time is not None else "calibration from the train data"
        raise SurgeryError(self.name, f"{when} rewrites the model after FSDP wraps it (the Trainer's "
                                      f"parallelism_config has fsdp), which is not supported; apply it at INIT "
                                      f"(apply_at=None) without calibration, or train without FSDP.")

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
        shown = {**self._own_arguments(), **self.config.changed(), **self.selection_changed()}
        if self.apply_at is not None:
            shown["apply_at"] = self.apply_at
        arguments = [f"{name}={value.__module__}.{value.__qualname__}" if inspect.isroutine(value)
                     else f"{name}={value!r}" for name, value in shown.items()]
        return f"{self.name}({', '.join(arguments)})"

    def selection_changed(self) -> dict:
        return {key: value for key, value in dataclasses.asdict(self.selection).items()
                if value != getattr(Selection(), key)}

    def _own_arguments(self) -> dict:
        """A subclass's own keyword arguments (not settings) that differ from their defaults, kept as attributes."""
        if "__init__" not in vars(type(self)) or type(self).__init__ is SurgeryAlgorithm.__init__:
            return {}
        shown = {}
        for name, parameter in inspect.signature(type(self).__init__).parameters.items():
            if parameter.kind is parameter.KEYWORD_ONLY and name != "apply_at":
                value = getattr(self, name)
                if not (value is parameter.default or (_comparable(value) and value == parameter.default)):
                    shown[name] = value
        return shown


def parse_time(value, name: str, argument: str) -> Time | None:
    """A Composer ``Time`` from a string such as "2ep", or a one-line error naming the argument."""
    if value is None or isinstance(value, Time):
        return value
    try:
        return Time.from_input(value)
    except (ValueError, TypeError):
        raise SurgeryError(name, f"{argument}={value!r} is not a Composer time; use None or a string such as "
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
