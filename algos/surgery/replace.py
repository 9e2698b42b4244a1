"""Swap modules in place and keep the optimizer consistent: the one code path every algorithm (and resume) uses.
A converter's answer is a module, ``(module, notes)``, a ``Rewrite`` (several modules), or ``SkipModule(reason)``."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from composer.utils.module_surgery import replace_module_classes
from torch import nn


@runtime_checkable
class InstallsIntoParent(Protocol):
    """A new module that must also adjust its parent once swapped in (say, turn off a fused fast path that would
    read weights no longer there); ``replace_modules`` calls it after every swap, resume replays included."""

    def on_install(self, parent: nn.Module) -> None: ...


@dataclass
class Rewrite:
    """A converter's answer when one target changes more than one module (e.g. a whole MLP block).

    ``module`` goes at ``at`` (default: the target itself); ``companions`` (fqn -> module) replace further modules
    that must change with it (BERT's ``output.dense`` becomes an identity once the new module yields the block's
    output). The report shows one row at ``at``, counting ``counted_as`` (a module that computes what every replaced
    module did, from the input ``module`` receives; default: the module at ``at``) as the "before".

    A new module that must also adjust its parent implements ``InstallsIntoParent``.
    """

    module: nn.Module
    notes: dict = field(default_factory=dict)
    at: str | None = None
    companions: dict[str, nn.Module] = field(default_factory=dict)
    counted_as: nn.Module | None = None


class SkipModule(Exception):
    """Raised by a converter to leave a module unchanged; the message becomes the report's reason."""


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
            if isinstance(new_module, InstallsIntoParent):
                new_module.on_install(model.get_submodule(fqn.rpartition(".")[0]))
        new_parameters = {p for new in old_to_new.values() for p in new.parameters()}
        for optimizer in optimizers:
            start_optimizer_state(optimizer, new_parameters)
    except BaseException:
        undo.restore()
        raise


@contextmanager
def installed(model: nn.Module, replacements: Mapping[str, nn.Module]) -> Iterator[None]:
    """``replacements`` swapped in for the duration of the ``with`` block, then every module put back where it was
    (parents' flags included): sequential calibration runs data through the converted-so-far model this way, so the
    real swap stays all or nothing."""
    olds = {model.get_submodule(fqn): new for fqn, new in replacements.items()}
    undo = _Snapshot(model, olds, [])
    replace_modules(model, replacements)
    try:
        yield
    finally:
        undo.restore()


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
