"""The one interface every algorithm implements (``Surgery``), and the core's two calls on it: ``plan_surgery``
(selection only, nothing changed) and ``run_surgery`` (select, prepare, convert every target, then swap them all).

A new algorithm is a ``SurgeryConfig`` dataclass (its settings), a ``Surgery`` subclass (which modules, how each is
converted), and a method card; ``SurgeryAlgorithm`` makes it a Composer algorithm. ``algos/surgery/example.py`` is
the smallest complete one.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import ClassVar

import torch
from composer.algorithms.warnings import NoEffectWarning
from torch import nn

from algos.surgery.config import Selection, SurgeryConfig, fields_help
from algos.surgery.errors import NothingToRewrite, SurgeryError
from algos.surgery.quantize import quantized_modules
from algos.surgery.replace import Rewrite, SkipModule, installed, replace_modules
from algos.surgery.report import SurgeryReport
from algos.surgery.targets import (
    SURGERY_MARKER,
    FilterFn,
    ModuleNames,
    Skip,
    SkipFn,
    any_already_converted,
    select_targets,
)

Targets = list[tuple[str, nn.Module]]


class Surgery(ABC):
    """How one algorithm rewrites one model, built for one call from its config and selection.

    The core calls, in this order: :meth:`check_model`; selection over ``classes`` with :meth:`is_candidate` and
    :meth:`skip_reason`; :meth:`prepare` once with every target (calibration, budgets shared across layers);
    :meth:`convert` for every target; then the swap (all or nothing) and the report. With a config whose
    ``sequential`` setting is on, :meth:`recalibrate` runs before each target's :meth:`convert` but the first.
    """

    config_class: ClassVar[type[SurgeryConfig]]
    classes: tuple[type[nn.Module], ...] = ()  # candidate types (a property where they depend on the config)

    def __init__(self, model: nn.Module, config: SurgeryConfig, selection: Selection | None = None):
        self.model, self.config, self.selection = model, config, selection or Selection()

    @property
    def name(self) -> str:
        return self.config.algorithm

    def check_model(self) -> None:  # noqa: B027 (an optional hook)
        """Before anything else runs: raise a ``SurgeryError`` for a model this surgery must refuse, or
        ``NothingToRewrite`` when it simply has nothing for it (a warning unless ``strict``)."""

    def is_candidate(self, module: nn.Module, fqn: str) -> bool:
        """A finer test than ``classes``; a module failing it is no candidate, silently, and the search goes inside."""
        return True

    def skip_reason(self, module: nn.Module, fqn: str) -> str | None:
        """Why a target stays as it is, from rules that need no data (so :func:`plan_surgery` applies them)."""
        return None

    def prepare(self, targets: Targets, calibration) -> None:  # noqa: B027 (an optional hook)
        """Work that needs every target at once, before any conversion; ``calibration`` is None or batches."""

    def recalibrate(self, module: nn.Module, fqn: str, calibration) -> None:
        """``sequential``: learn again what ``module`` sees, now that the targets before it are converted (they are
        in place, temporarily, while this runs); what :meth:`prepare` learned from the original model is replaced."""
        raise NotImplementedError(f"{self.name} has no sequential calibration")

    @abstractmethod
    def convert(self, module: nn.Module, fqn: str) -> Rewrite | nn.Module | tuple[nn.Module, dict]:
        """The replacement for one target (copying what it learned), or raise ``SkipModule(reason)``."""

    @classmethod
    def apply(cls, model: nn.Module, *, calibration=None, optimizers=None, example_inputs=None,
              **settings) -> SurgeryReport:
        """The functional form: ``settings`` are the config's fields and the ``Selection``'s."""
        selection, config = split_settings(cls.config_class, settings)
        return run_surgery(cls(model, config, selection), calibration=calibration, optimizers=optimizers,
                           example_inputs=example_inputs)


def split_settings(config_class: type[SurgeryConfig], settings: dict) -> tuple[Selection, SurgeryConfig]:
    """Keyword arguments -> (``Selection``, the algorithm's config), each checked once."""
    selection_names = {f.name for f in dataclasses.fields(Selection)}
    selection = Selection(**{key: settings.pop(key) for key in list(settings) if key in selection_names})
    return selection, config_class.build(**settings)


def plan_surgery(surgery: Surgery) -> tuple[list[str], list[Skip]]:
    """What :func:`run_surgery` would select: ``(target names, skipped candidates)``; nothing is changed."""
    targets, skipped = _select(surgery)
    return [fqn for fqn, _ in targets], skipped


def run_surgery(surgery: Surgery, *, calibration=None, optimizers=None, example_inputs=None) -> SurgeryReport:
    """Select targets, prepare, convert every target, swap them all in (updating ``optimizers``); the report.

    Converters run for every target before the first swap, so a converter error leaves the model untouched; the
    swap itself is all or nothing (``replace_modules``). With ``example_inputs`` (a batch the model can be called
    with) the model runs once after surgery to fill in the report's MACs per sample; otherwise they stay unknown
    until ``report.measure(model, batch)``. Nothing but the new modules is left on the model (no hook).

    ``sequential`` (a config setting of the calibrated surgeries): targets are converted in model order, each from
    the inputs it gets with the ones before it already converted (so errors do not compound unseen); calibration
    then runs once per target, through the model with the replacements made so far swapped in for that pass only.
    """
    model, name, strict = surgery.model, surgery.name, surgery.selection.strict
    targets, skipped = _select(surgery)
    report = SurgeryReport(name, skipped=list(skipped))
    if targets:
        surgery.prepare(targets, calibration)
    replacements: dict[str, nn.Module] = {}
    sequential = getattr(surgery.config, "sequential", False) and calibration is not None
    for fqn, module in targets:
        if sequential and replacements:
            with installed(model, replacements):
                surgery.recalibrate(module, fqn, calibration)
        try:
            converted = surgery.convert(module, fqn)
        except SkipModule as why:
            report.skipped.append(Skip(fqn, type(module).__name__, str(why)))
            continue
        if not isinstance(converted, Rewrite):
            converted = Rewrite(*converted) if isinstance(converted, tuple) else Rewrite(converted)
        at = converted.at or fqn
        for new_module in (converted.module, *converted.companions.values()):
            setattr(new_module, SURGERY_MARKER, name)
        replacements[at] = converted.module
        replacements.update(converted.companions)
        counted_as = converted.counted_as or (module if at == fqn else model.get_submodule(at))
        report.add(at, counted_as, converted.module, converted.notes, companions=list(converted.companions),
                   old_type=type(module).__name__)
    if targets and not replacements and not any_already_converted(skipped):
        message = (f"all {len(targets)} selected modules were skipped "
                   f"(e.g. {report.skipped[-1].fqn}: {report.skipped[-1].reason})")
        if strict:
            raise SurgeryError(name, message + ".")
        warnings.warn(NoEffectWarning(f"{name}: {message}; the model is unchanged."), stacklevel=2)
    replace_modules(model, replacements, optimizers)
    if example_inputs is not None:
        report.measure(model, example_inputs)
    return report


def _select(surgery: Surgery):
    selection = surgery.selection
    quantized = quantized_modules(surgery.model)
    if quantized:
        name, module = quantized[0]
        raise SurgeryError(surgery.name, f"the model holds {len(quantized)} quantized module(s) (e.g. "
                           f"{name or 'the model'}: {module._get_name()}); surgery rewrites float modules: apply "
                           "it to the float model, then quantize (algos.quantize_dynamic).")
    try:
        surgery.check_model()
    except NothingToRewrite as why:
        if selection.strict:
            raise
        warnings.warn(NoEffectWarning(f"{str(why).rstrip('.')}; the model is unchanged."), stacklevel=3)
        return [], []
    return select_targets(surgery.model, surgery.classes, algorithm=surgery.name,
                          target_modules=selection.target_modules, exclude_modules=selection.exclude_modules,
                          filter_fn=selection.filter_fn, strict=selection.strict, candidate_fn=surgery.is_candidate,
                          skip_fn=surgery.skip_reason)


def settings_signature(function: Callable, config_class: type[SurgeryConfig], *, doc: str) -> Callable:
    """Give a ``(model, *, ..., **settings)`` function the full signature and docstring its settings make, so
    ``help()``, IDEs and the YAML runner see every argument."""
    own = [p for p in inspect.signature(function).parameters.values() if p.kind is not p.VAR_KEYWORD]
    extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                               default=f.default if f.default is not dataclasses.MISSING else inspect.Parameter.empty)
             for cls in (config_class, Selection) for f in dataclasses.fields(cls)]
    function.__signature__ = inspect.signature(function).replace(parameters=own + extra)
    function.__doc__ = f"{doc}\n\n    Settings:\n{fields_help(config_class, Selection)}\n"
    return function


# ------------------------------------------------------------------------------------------------ a converter function
class _ConverterSurgery(Surgery):
    """``apply_surgery``'s converter function as a ``Surgery``."""

    def __init__(self, model, selection, name, classes, convert, prepare, candidate_fn, skip_fn):
        super().__init__(model, SurgeryConfig(), selection)
        self._name, self.classes, self._convert, self._prepare = name, classes, convert, prepare
        self._candidate_fn, self._skip_fn = candidate_fn, skip_fn

    @property
    def name(self) -> str:
        return self._name

    def is_candidate(self, module, fqn):
        return self._candidate_fn is None or self._candidate_fn(module, fqn)

    def skip_reason(self, module, fqn):
        return self._skip_fn(module, fqn) if self._skip_fn else None

    def prepare(self, targets, calibration):
        if self._prepare is not None:
            self._prepare(targets)

    def convert(self, module, fqn):
        return self._convert(module, fqn)


def apply_surgery(
    model: nn.Module,
    convert: Callable[[nn.Module, str], Rewrite | nn.Module | tuple[nn.Module, dict]],
    *,
    algorithm: str,
    classes: tuple[type[nn.Module], ...],
    target_modules: ModuleNames = None,
    exclude_modules: ModuleNames = None,
    filter_fn: FilterFn | None = None,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    strict: bool = False,
    example_inputs=None,
    prepare: Callable[[Targets], None] | None = None,
    candidate_fn: FilterFn | None = None,
    skip_fn: SkipFn | None = None,
) -> SurgeryReport:
    """A one-off surgery from a converter function ``convert(module, fqn)``, without writing a ``Surgery`` class:
    the same selection, all-or-nothing swap, optimizer bookkeeping and report as every algorithm."""
    selection = Selection(target_modules, exclude_modules, filter_fn, strict)
    surgery = _ConverterSurgery(model, selection, algorithm, classes, convert, prepare, candidate_fn, skip_fn)
    return run_surgery(surgery, optimizers=optimizers, example_inputs=example_inputs)
