"""Local transfer: fit a replacement module to reproduce the outputs of the module it replaces, on that module's real
calibration inputs, while the old module is still alive (inside the surgery, before the swap).

This is the first half of "healing" (block reconstruction as in BRECQ, attention transfer in LoLCATs): an MSE between
the new module's output and the old one's on the same input rows, minimised with Adam for ``steps`` steps of
``batch_tokens`` rows. The error reported is relative, ||f(x) - y|| / ||y||, measured on rows held out from the fit
(``held_out``, 10% by default), so "fitting lowers the error" is measured on rows the fit never saw. When fitting
raises that error (a learning rate too high for the data, or an init already optimal for these rows, as Factorize's
whitened SVD), the fit is undone: the module keeps its parameters from before (``FitResult.kept`` is False). Buffers
(e.g. an FFF's leaf usage counter) are restored either way: fitting changes parameters only.

Modes: the module is fitted in train mode (the mode it is in when training follows the surgery: for an FFF leaf tree
that is its soft mixture; a neuron tree takes its hard path in both modes) and both errors are measured in eval mode
(what inference computes). The batch order comes from a generator seeded with ``seed`` and any random numbers the
module draws in training (e.g. FFF's region leak) come from a forked, seeded RNG, so fitting is deterministic and
leaves the global random state as it found it (a resumed run replays the same numbers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

BATCH_TOKENS = 256
HELD_OUT = 0.1


class FitResult(NamedTuple):
    """Relative output error on the held-out rows (eval mode) before and after fitting, and whether the fitted
    parameters were kept (False: the error rose, so the fit was undone)."""

    before: float
    after: float
    kept: bool = True

    def notes(self, prefix: str = "fit_") -> dict[str, float | str]:
        """The report notes: ``{prefix}error_before`` / ``{prefix}error_after`` (rounded), and ``{prefix}undone``
        when the fit was undone."""
        notes: dict[str, float | str] = {f"{prefix}error_before": round(self.before, 4),
                                         f"{prefix}error_after": round(self.after, 4)}
        if not self.kept:
            notes[f"{prefix}undone"] = "the held-out error rose, the parameters from before are kept"
        return notes


def check_fit_settings(fit_steps, fit_lr, error: Callable[[str], Exception]) -> None:
    """Raise ``error(...)`` for a bad ``fit_steps`` (an int >= 0) or ``fit_lr`` (a number > 0)."""
    if isinstance(fit_steps, bool) or not isinstance(fit_steps, int) or fit_steps < 0:
        raise error(f"fit_steps={fit_steps!r} must be an int >= 0 (0: no fitting).")
    if isinstance(fit_lr, bool) or not isinstance(fit_lr, (int, float)) or not fit_lr > 0 or fit_lr == float("inf"):
        raise error(f"fit_lr={fit_lr!r} must be a finite number > 0 (Adam's learning rate for fit_steps).")


def fit_to_outputs(
    module: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_tokens: int = BATCH_TOKENS,
    held_out: float = HELD_OUT,
    seed: int = 0,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> FitResult:
    """Train ``module``'s parameters so that ``forward(inputs) ~ targets`` (rows: (tokens, features) and
    (tokens, out)); ``forward`` defaults to ``module``. Returns the held-out relative errors before and after.

    ``held_out`` of the rows (at least one, when there are two or more) are kept aside; with ``steps=0`` nothing is
    trained and both errors are the same. If the error rose, the parameters from before are put back. The module is
    left in the mode it came in, its buffers as they were, its gradients cleared."""
    forward = module if forward is None else forward
    parameters = [p for p in module.parameters() if p.requires_grad]
    dtype = parameters[0].dtype if parameters else inputs.dtype
    x, y = inputs.detach().to(dtype), targets.detach().to(dtype)
    rows = len(x)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(rows, generator=generator).to(x.device)
    count = max(1, round(rows * held_out)) if rows >= 2 and held_out > 0 else 0
    test, train = (order[:count], order[count:]) if count else (order, order)
    was_training = module.training
    try:
        before = _relative_error(module, forward, x[test], y[test])
        if steps == 0 or not parameters:
            return FitResult(before, before)
        saved = [p.detach().clone() for p in parameters]
        buffers = [(b, b.detach().clone()) for b in module.buffers()]
        _train(module, forward, parameters, x[train], y[train], steps=steps, lr=lr,
               batch=min(batch_tokens, len(train)), generator=generator, seed=seed)
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)
            after = _relative_error(module, forward, x[test], y[test])
            kept = after <= before
            if not kept:
                for parameter, value in zip(parameters, saved, strict=True):
                    parameter.copy_(value)
    finally:
        module.train(was_training)
    return FitResult(before, after, kept)


def _train(module, forward, parameters, x, y, *, steps, lr, batch, generator, seed) -> None:
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        torch.manual_seed(seed)
        module.train()
        optimizer = torch.optim.Adam(parameters, lr=lr)
        permutation, position = torch.randperm(len(x), generator=generator), 0
        for _ in range(steps):
            if position + batch > len(x):
                permutation, position = torch.randperm(len(x), generator=generator), 0
            pick = permutation[position:position + batch].to(x.device)
            position += batch
            loss = (forward(x[pick]) - y[pick]).float().pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    for parameter in parameters:
        parameter.grad = None


@torch.no_grad()
def _relative_error(module, forward, x, y) -> float:
    module.eval()
    return ((forward(x).float() - y.float()).norm() / y.float().norm().clamp_min(1e-12)).item()
