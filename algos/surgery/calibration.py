"""Calibration: run a few real batches through the model and hand each target module's input to a callback.

Algorithms that initialise new modules from what the old ones actually see (activation-aware factorization, FFF
built from a trained MLP) share this: forward pre-hooks on the targets, the model in eval mode without gradients,
and one clear error when a batch cannot be run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from algos.surgery.batches import call_model, eval_mode

InputCallback = Callable[[str, nn.Module, torch.Tensor], None]


class CalibrationError(ValueError):
    """Bad calibration input for a named module (raised by a callback; passed through unchanged)."""


def as_batches(calibration) -> Iterable:
    """A single tensor or dict is one batch; anything else is iterated as a sequence of batches."""
    if isinstance(calibration, (torch.Tensor, Mapping)):
        return [calibration]
    if not isinstance(calibration, Iterable):
        raise TypeError(f"calibration must be a tensor, a dict of model keyword arguments, or an iterable of them; "
                        f"got {type(calibration).__name__}")
    return calibration


def run_calibration(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    calibration,
    on_input: InputCallback,
    *,
    max_batches: int | None = None,
) -> int:
    """Call ``on_input(fqn, module, x)`` with the first input of every call of each module in ``modules`` while up
    to ``max_batches`` batches of ``calibration`` run through ``model``. Returns the number of batches run."""
    handles = [module.register_forward_pre_hook(_input_hook(fqn, on_input), with_kwargs=True)
               for fqn, module in modules.items()]
    count = 0
    try:
        with eval_mode(model):
            for batch in as_batches(calibration):
                if max_batches is not None and count >= max_batches:
                    break
                try:
                    call_model(model, batch)
                except CalibrationError:
                    raise
                except Exception as error:
                    first_line = (str(error).splitlines() or [""])[0]
                    raise ValueError(f"calibration: batch {count} could not be run through the model "
                                     f"({type(error).__name__}: {first_line})") from error
                count += 1
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("calibration: no batches were given")
    return count


def _input_hook(fqn: str, on_input: InputCallback):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
        if tensors:
            on_input(fqn, module, tensors[0].detach())

    return hook
