"""Calibration: run a few real batches through the model and hand each target module's input to a callback.

Algorithms that initialise new modules from what the old ones actually see (activation-aware factorization, FFF
built from a trained MLP) share this: forward pre-hooks on the targets, the model in eval mode without gradients,
and one clear error when a batch cannot be run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from algos.surgery.batches import call_model, eval_mode, is_encoder_decoder, real_tokens
from algos.surgery.config import setting

InputCallback = Callable[[str, nn.Module, torch.Tensor, torch.Tensor | None], None]


class CalibrationError(ValueError):
    """Bad calibration input for a named module (raised by a callback; passed through unchanged)."""


def sequential_setting(uses: str):
    """The ``sequential`` setting of a calibrated surgery (``run_surgery`` acts on it); ``uses``: what reads the
    inputs, which it needs on."""
    return setting(False, f"convert the targets in model order, each from the inputs it gets with the ones before it "
                          f"already converted, so errors do not compound unseen (calibration runs once per target); "
                          f"needs {uses}")


def kept_rows_setting(what: str):
    """The cap on the calibration input rows a surgery keeps per target for fitting (FFF's ``calibration_tokens``,
    Factorize's ``fit_tokens``: one knob, declared here once, under each algorithm's own name)."""
    return setting(4096, f"keep at most this many calibration input rows per {what} (a fixed-seed random subset)")


def keep_rows(kept: torch.Tensor | None, rows: torch.Tensor, limit: int, generator: torch.Generator) -> torch.Tensor:
    """``rows`` appended to those ``kept`` so far, at most ``limit`` of them: a random subset (``generator``) once more
    come."""
    if kept is not None:
        rows = torch.cat([kept, rows])
    if len(rows) > limit:
        rows = rows[torch.randperm(len(rows), generator=generator)[:limit].to(rows.device)]
    return rows


def check_sequential(sequential, reads_inputs: bool, uses: str, error: Callable[[str], Exception]) -> None:
    """The ``sequential`` setting's check: a bool, and on only where ``uses`` (the settings that read calibration
    inputs) are on (``reads_inputs``)."""
    if not isinstance(sequential, bool):
        raise error(f"sequential={sequential!r} must be True or False.")
    if sequential and not reads_inputs:
        raise error(f"sequential=True needs {uses} (it changes the calibration inputs they read; without them it does "
                    f"nothing).")


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
    """Call ``on_input(fqn, module, x, real)`` with the first input of every call of each module in ``modules`` while
    up to ``max_batches`` batches of ``calibration`` run through ``model``. Returns the number of batches run.

    ``real`` marks the rows of ``x`` that are real tokens (a bool tensor of ``x.shape[:-1]``), or is None (every row
    counts): padding positions carry hidden states no output reads (attention and pooling mask them out), and on
    short sentences they are half the rows, so what is learned from them is learned about nothing (``token_rows``
    drops them). It is the batch's ``attention_mask`` wherever a module's input is (batch, position, features) of
    that mask's shape; encoder-decoder models are left unmasked (their decoder positions are not the mask's).
    """
    padding = _PaddingMask(model)
    handles = [module.register_forward_pre_hook(_input_hook(fqn, on_input, padding), with_kwargs=True)
               for fqn, module in modules.items()]
    count = 0
    try:
        with eval_mode(model), torch.no_grad():
            for batch in as_batches(calibration):
                if max_batches is not None and count >= max_batches:
                    break
                padding.batch = batch
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


def token_rows(x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """``x`` as rows of its last dimension, without the padding ones (``real``: see :func:`run_calibration`)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if real is None else rows[real.reshape(-1).to(rows.device)]


class _PaddingMask:
    """The current calibration batch's attention mask, for the module inputs it lines up with."""

    def __init__(self, model: nn.Module):
        self.batch, self.encoder_decoder = None, is_encoder_decoder(model)

    def real(self, x: torch.Tensor) -> torch.Tensor | None:
        return real_tokens(self.batch, x, encoder_decoder=self.encoder_decoder)


def _input_hook(fqn: str, on_input: InputCallback, padding: _PaddingMask):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
        if tensors:
            x = tensors[0].detach()
            on_input(fqn, module, x, padding.real(x))

    return hook
