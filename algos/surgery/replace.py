"""Swap modules in place and keep the optimizer consistent: the one code path every algorithm (and resume) uses."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from composer.algorithms.warnings import NoEffectWarning
from composer.utils.module_surgery import replace_module_classes
from torch import nn

from algos.surgery.macs import measure_macs_on_first_call
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

# A converter turns one selected module into its replacement, optionally with notes for the report
# (e.g. {"rank": 64}), or into a Rewrite when the change spans several modules. It raises SkipModule to leave the
# module alone with a reason.
Converter = Callable[[nn.Module, str], "nn.Module | tuple[nn.Module, dict] | Rewrite"]


@dataclass
class Rewrite:
    """A converter's answer when one target changes more than one module (e.g. a whole MLP block).

    ``module`` goes at ``at`` (default: the target itself); ``companions`` (fqn -> module) replace further modules
    that must change with it (BERT's ``output.dense`` becomes an identity once the new module yields the block's
    output). The report shows one row at ``at``, counting ``counted_as`` (a module that computes what every replaced
    module did, from the input ``module`` receives; default: the module at ``at``) as the "before".

    A new module that must also adjust its parent (say, turn off a fused fast path that would read weights no longer
    there) defines ``on_install(parent)``; ``replace_modules`` calls it after every swap, resume replays included.
    """

    module: nn.Module
    notes: dict = field(default_factory=dict)
    at: str | None = None
    companions: dict[str, nn.Module] = field(default_factory=dict)
    counted_as: nn.Module | None = None


class SkipModule(Exception):
    """Raised by a converter to leave a module unchanged; the message becomes the report's reason."""


class _Planned(Exception):
    """Stops ``apply_surgery`` right after target selection while ``planning_only`` is active."""

    def __init__(self, targets: list[str], skipped: list[Skip]):
        self.targets, self.skipped = targets, skipped


_planning: ContextVar[bool] = ContextVar("planning", default=False)


@contextmanager
def planning_only():
    """Inside this block ``apply_surgery`` only selects: it raises ``_Planned`` with the targets' names and the
    skipped candidates, before calibrating, converting or changing anything. See ``SurgeryAlgorithm.plan``."""
    token = _planning.set(True)
    try:
        yield
    finally:
        _planning.reset(token)


def apply_surgery(
    model: nn.Module,
    convert: Converter,
    *,
    algorithm: str,
    classes: tuple[type[nn.Module], ...],
    target_modules: ModuleNames = None,
    exclude_modules: ModuleNames = None,
    filter_fn: FilterFn | None = None,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    strict: bool = False,
    example_inputs=None,
    prepare: Callable[[list[tuple[str, nn.Module]]], None] | None = None,
    candidate_fn: FilterFn | None = None,
    skip_fn: SkipFn | None = None,
) -> SurgeryReport:
    """Select targets, convert each, swap them in, update ``optimizers``; return the report.

    ``skip_fn(module, fqn) -> reason | None`` holds the algorithm's rules that need no data (size, tied weights):
    they run at selection, so a dry run (``SurgeryAlgorithm.plan``) applies them too.

    ``prepare(targets)``, when given, runs once with every ``(fqn, module)`` target before any conversion: the place
    for work that needs all targets at once (calibration passes, a budget shared across layers).
    Converters run first for every target (so a converter error leaves the model untouched), then all swaps happen.
    With ``example_inputs`` (a batch the model can be called with) the model runs once after surgery to fill in the
    report's MACs per sample; otherwise MACs are filled in on the model's next forward pass.
    """
    targets, skipped = select_targets(
        model,
        classes,
        algorithm=algorithm,
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        filter_fn=filter_fn,
        strict=strict,
        candidate_fn=candidate_fn,
        skip_fn=skip_fn,
    )
    if _planning.get():
        raise _Planned([fqn for fqn, _ in targets], list(skipped))
    report = SurgeryReport(algorithm, skipped=list(skipped))
    if prepare is not None and targets:
        prepare(targets)
    replacements: dict[str, nn.Module] = {}
    for fqn, module in targets:
        try:
            converted = convert(module, fqn)
        except SkipModule as why:
            report.skipped.append(Skip(fqn, type(module).__name__, str(why)))
            continue
        if not isinstance(converted, Rewrite):
            converted = Rewrite(*converted) if isinstance(converted, tuple) else Rewrite(converted)
        at = converted.at or fqn
        for new_module in (converted.module, *converted.companions.values()):
            setattr(new_module, SURGERY_MARKER, algorithm)
        replacements[at] = converted.module
        replacements.update(converted.companions)
        counted_as = converted.counted_as or (module if at == fqn else model.get_submodule(at))
        report.add(at, counted_as, converted.module, converted.notes, companions=list(converted.companions),
                   old_type=type(module).__name__)
    if targets and not replacements and not any_already_converted(skipped):
        message = (f"{algorithm}: all {len(targets)} selected modules were skipped "
                   f"(e.g. {report.skipped[-1].fqn}: {report.skipped[-1].reason})")
        if strict:
            raise ValueError(message + ".")
        warnings.warn(NoEffectWarning(message + "; the model is unchanged."), stacklevel=2)

    replace_modules(model, replacements, optimizers)
    measure_macs_on_first_call(report, example_inputs=example_inputs, model=model)
    return report


def replace_modules(
    model: nn.Module,
    replacements: Mapping[str, nn.Module],
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
) -> None:
    """Put ``replacements[fqn]`` where ``model.get_submodule(fqn)`` is, on the old module's device and dtype.

    Composer's ``replace_module_classes`` does the swapping (it also fixes every parent of a shared module) and moves
    old parameters' optimizer state out and new parameters into the same param group, in module order, so a
    replayed surgery lays the optimizer out exactly like the original one.

    All or nothing: if anything fails part-way (a swap, the optimizer update, a module's ``on_install``), every
    module and every optimizer is put back as it was before the call, and the error is raised.
    """
    if not replacements:
        return
    old_to_new: dict[nn.Module, nn.Module] = {}
    for fqn, new_module in replacements.items():
        try:
            old_module = model.get_submodule(fqn)
        except AttributeError:
            raise KeyError(f"cannot replace {fqn!r}: the model has no such module") from None
        # same device, dtype and train/eval mode as the module it replaces (a new module is built in train mode)
        old_to_new[old_module] = _match_device_and_dtype(new_module, old_module).train(old_module.training)
    optimizers = _as_list(optimizers)
    undo = _Snapshot(model, old_to_new, optimizers)
    # One policy for every module class: with one per class, a subclass (MultiheadAttention's out_proj is a Linear
    # subclass) matches two policies and Composer asserts.
    policy = {nn.Module: lambda module, _index: old_to_new.get(module)}
    try:
        replace_module_classes(model, policies=policy, optimizers=optimizers or None)
        for fqn, new_module in replacements.items():
            if hasattr(new_module, "on_install"):
                new_module.on_install(model.get_submodule(fqn.rpartition(".")[0]))
        new_parameters = {p for new in old_to_new.values() for p in new.parameters()}
        for optimizer in optimizers:
            start_optimizer_state(optimizer, new_parameters)
    except BaseException:
        undo.restore()
        raise


class _Snapshot:
    """Where each module to be replaced sits (every parent and attribute name), and each optimizer's param groups
    and state, so a failed surgery can put them back. Parameters are not copied: the swap never changes them."""

    def __init__(self, model: nn.Module, old_to_new: Mapping[nn.Module, nn.Module], optimizers):
        self.places = [(parent, name, child) for parent in model.modules()
                       for name, child in parent._modules.items() if child in old_to_new]
        self.parent_state = [(parent, dict(vars(parent))) for parent in {id(p): p for p, _, _ in self.places}.values()]
        self.optimizers = [(opt, [list(group["params"]) for group in opt.param_groups], dict(opt.state))
                           for opt in optimizers]

    def restore(self) -> None:
        for parent, attributes in self.parent_state:  # undoes on_install's changes to a parent's flags too
            parent.__dict__.update(attributes)
        for parent, name, child in self.places:
            parent._modules[name] = child
        for optimizer, params, state in self.optimizers:
            for group, group_params in zip(optimizer.param_groups, params, strict=True):
                group["params"] = group_params
            optimizer.state.clear()
            optimizer.state.update(state)


def start_optimizer_state(optimizer: torch.optim.Optimizer, parameters: set[torch.nn.Parameter]) -> None:
    """Give new ``parameters`` zero optimizer state, if the optimizer already holds state for the others.

    Why: Composer saves and loads optimizers through torch.distributed.checkpoint, which expects state for every
    parameter once any has some. Parameters a surgery adds in mid-training have none until their first step, so a
    checkpoint saved in between would not load. We create it as torch's own ``_init_optim_state`` does (a step with
    zero gradients and lr 0, here with only the new parameters holding gradients) and zero it: exactly the state
    Adam-family optimizers create lazily (moments 0, step 0), and SGD's without dampening.
    """
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    new = [p for p in grouped if p in parameters and p not in optimizer.state and p.requires_grad]
    if not optimizer.state or not new:
        return  # no state yet: every parameter gets it on the first step, as usual
    grads = {p: p.grad for p in grouped}
    rates = [group["lr"] for group in optimizer.param_groups]
    try:
        for p in grouped:
            p.grad = torch.zeros_like(p) if p in parameters else None
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(0.0) if isinstance(group["lr"], torch.Tensor) else 0.0
        optimizer.step()
    finally:
        for group, rate in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        for p, grad in grads.items():
            p.grad = grad
    for p in new:
        for key, value in optimizer.state[p].items():
            if isinstance(value, torch.Tensor):
                value.zero_()
            elif isinstance(value, (int, float)):
                optimizer.state[p][key] = type(value)(0)


def _as_list(optimizers) -> list[torch.optim.Optimizer]:
    if optimizers is None:
        return []
    return [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)


def _match_device_and_dtype(new_module: nn.Module, old_module: nn.Module) -> nn.Module:
    old_tensors = list(itertools.chain(old_module.parameters(), old_module.buffers()))
    if not old_tensors:
        return new_module
    device = old_tensors[0].device
    floating = [t.dtype for t in old_tensors if t.is_floating_point()]
    return new_module.to(device=device, dtype=floating[0]) if floating else new_module.to(device=device)
