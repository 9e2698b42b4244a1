"""Keep Composer's weight averages (``EMA``, ``SWA``) consistent with a model that a surgery rewrites.

Why this exists: both algorithms hold a copy of the model's weights by name, made at ``Event.INIT`` (before or after
a surgery at INIT, depending on the order of ``algorithms``) and again when averaging starts. After a surgery, EMA
keeps averaging only the names that survived (eval and checkpoints then swap in a mix of averaged and raw weights),
and SWA's ``AveragedModel`` still has the old architecture (its next update is a size mismatch). These are all the
weight copies Composer 0.32 keeps in ``composer.algorithms`` and ``composer.callbacks``.

What follows a surgery (at any event, INIT included):

* ``EMA``: its copies cover exactly the model's current parameters and buffers again. An untouched tensor keeps its
  running average; a tensor of a new module starts at its current value (the surgery's converted weights), which is
  what EMA holds for any tensor at the moment it starts averaging it. If the surgery comes while EMA's weights are
  swapped into the model (at ``EPOCH_END`` after a batch checkpoint, which swaps them in until the next batch), the
  training weights are swapped back for the surgery and the averages swapped in again after it.
* ``SWA``: its ``AveragedModel`` is rebuilt from the rewritten model and averaging restarts (``n_averaged`` 0), so
  the average spans the training after the surgery. An equal-weight average of weights from before and after a change
  of architecture is no average of one solution, and SWA keeps a single count for all tensors, so untouched tensors
  cannot keep their average while new ones start. SWA's schedule and ``step_counter`` continue unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
from composer.algorithms import EMA, SWA
from composer.algorithms.ema.ema import get_model_context_manager
from composer.core import State
from torch import nn
from torch.optim.swa_utils import AveragedModel


@contextlib.contextmanager
def weight_averages_follow_surgery(state: State) -> Iterator[None]:
    """Wrap a surgery on ``state.model``: afterwards every EMA and SWA in ``state.algorithms`` matches the rewritten
    model (see the module docstring). If the surgery raises, the averages are left as they were."""
    emas = [a for a in state.algorithms if isinstance(a, EMA) and a.ema_model is not None]
    swas = [a for a in state.algorithms if isinstance(a, SWA) and a.swa_model is not None]
    swapped_in = [ema for ema in emas if ema.ema_weights_active]
    for ema in swapped_in:  # the surgery converts the training weights, never the averages
        ema.ema_model.swap_params(model=state.model)
        ema.ema_weights_active = False
    before = _tensors(state.model) if emas else {}
    try:
        yield
        for ema in emas:
            remap_ema(ema, state.model, before)
        for swa in swas:
            restart_swa(swa, state.model)
    finally:
        for ema in swapped_in:
            ema.ema_model.swap_params(model=state.model)
            ema.ema_weights_active = True


def remap_ema(ema: EMA, model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Make ``ema``'s copies hold exactly ``model``'s trainable parameters and buffers (as ``EMAParameters`` picks
    them): a tensor that is the same object, of the same shape, as ``before[name]`` keeps its average; any other
    starts at its current value. ``before``: the model's tensors by name before the surgery (``_tensors``)."""
    copies = ema.ema_model
    with get_model_context_manager(model), torch.no_grad():
        copies.named_parameters_dict = {
            name: _kept(copies.named_parameters_dict, name, param, before)
            for name, param in model.named_parameters() if param.requires_grad}
        copies.named_buffers_dict = {name: _kept(copies.named_buffers_dict, name, buffer, before)
                                     for name, buffer in model.named_buffers()}


def restart_swa(swa: SWA, model: nn.Module) -> None:
    """Give ``swa`` a fresh ``AveragedModel`` of ``model`` (same device and averaging settings, ``n_averaged`` 0)."""
    old = swa.swa_model
    device = next(itertools.chain(old.parameters(), old.buffers())).device
    swa.swa_model = AveragedModel(model, device=device, avg_fn=old.avg_fn, multi_avg_fn=old.multi_avg_fn,
                                  use_buffers=old.use_buffers)


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(itertools.chain(model.named_parameters(), model.named_buffers()))


def _kept(copies: dict[str, torch.Tensor], name: str, tensor: torch.Tensor,
          before: dict[str, torch.Tensor]) -> torch.Tensor:
    average = copies.get(name)
    if average is not None and before.get(name) is tensor and average.shape == tensor.shape:
        return average
    return tensor.detach().clone()


def weight_averages_follow_replay(state: State) -> None:
    """Call right after resume replays a recorded surgery on ``state.model``, before the checkpoint's algorithm
    states load: each EMA and SWA built at INIT from the model before the replay takes its architecture, so SWA's
    strict load of its checkpointed ``AveragedModel`` fits (EMA's load replaces its copies whole)."""
    with weight_averages_follow_surgery(state):
        pass
