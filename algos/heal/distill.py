"""``distill``: the functional self-distillation loop (the loss is ``algos.heal.loss``, the hidden states come from
``algos.heal.capture``); ``SelfDistillation`` adds the same loss inside a Composer run."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.optim import lr_scheduler

from algos.heal.capture import HiddenCapture, matched_boundaries
from algos.heal.config import DistillConfig, DistillLoop
from algos.heal.loss import distillation_loss, task_loss
from algos.surgery.batches import call_model, eval_mode, is_encoder_decoder, map_tensors
from algos.surgery.config import fields_help


def learning_rate_schedule(optimizer: torch.optim.Optimizer, loop: DistillLoop) -> lr_scheduler.LRScheduler:
    """torch's schedulers chained: step s (from 0) runs at lr * f(s), with f(s) = (s + 1) / W during the warm-up of
    W steps, then, with p = (s - W) / (steps - W) in [0, 1): 1 (constant), 1 - p (linear), (1 + cos(pi p)) / 2
    (cosine)."""
    decay_steps = loop.steps - loop.warmup
    decay = {"constant": lambda: lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0),
             "linear": lambda: lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=decay_steps),
             "cosine": lambda: lr_scheduler.CosineAnnealingLR(optimizer, T_max=decay_steps)}[loop.schedule]
    if loop.warmup == 0:
        return decay()
    warmup = lr_scheduler.LinearLR(optimizer, 1 / loop.warmup, 1.0, total_iters=loop.warmup - 1)
    return lr_scheduler.SequentialLR(optimizer, [warmup, decay()], milestones=[loop.warmup])


def distill(student: nn.Module, teacher: nn.Module, batches: Iterable, *,
            callback: Callable[[int, float], None] | None = None, **settings) -> list[float]:
    """Train ``student`` in place for ``steps`` AdamW steps to match ``teacher`` (run without gradients in eval mode,
    never changed: its weights, ``requires_grad`` flags, modes and device are as they were when this returns)
    on ``batches`` (model inputs: dicts of tensors for HF models, tuples or tensors otherwise; cycled when shorter
    than ``steps``), and return the loss of every step. The loss is ``algos.heal.loss``'s; ``task_weight`` 0 is pure
    distillation, so the batches need no labels; ``embedding_weight`` None turns the sentence-embedding term on for
    an encoder (``is_encoder_output``). The learning rate: ``learning_rate_schedule``. The defaults are the settings
    measured best on all-MiniLM-L6-v2 (the heal method card). ``callback(step, loss)`` runs after each step (step
    counts from 1), e.g. to score the student on the way. Bad input (bad settings, boundaries the teacher lacks, a
    model with neither hidden states nor logits, a model without its own loss when task_weight > 0) is a one-line
    ``DistillError`` raised before the first step, with nothing changed.

    Args:
{settings}
    """
    loop_names = [f.name for f in dataclasses.fields(DistillLoop)]
    valid = [*loop_names, *(f.name for f in dataclasses.fields(DistillConfig))]
    unknown = [key for key in settings if key not in valid]
    if unknown:
        raise TypeError(f"distill: unexpected argument(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}, "
                        f"callback")
    loop = DistillLoop.build(**{key: value for key, value in settings.items() if key in loop_names})
    config = DistillConfig.build(**{key: value for key, value in settings.items() if key not in loop_names})
    if teacher is student:
        raise config.error("teacher is the student itself; pass a copy (copy.deepcopy(model) before surgery).")
    if not any(parameter.requires_grad for parameter in student.parameters()):
        raise config.error("the student has no parameter with requires_grad=True, so there is nothing to train; "
                           "unfreeze the parameters to heal (e.g. student.requires_grad_(True)).")
    names = matched_boundaries(student, teacher, config)
    device = next(itertools.chain(student.parameters(), student.buffers())).device
    teacher_device = next(itertools.chain(teacher.parameters(), teacher.buffers()), torch.empty(0)).device
    teacher.to(device)  # moved back when done; never trained (no-grad forward), its flags never touched
    student_capture, teacher_capture = HiddenCapture(names), HiddenCapture(names)
    encoder_decoder = is_encoder_decoder(teacher)
    student_capture.attach(student)
    teacher_capture.attach(teacher)
    optimizer = None
    history: list[float] = []
    modes = [(module, module.training) for module in student.modules()]
    student.train()
    try:
        stream = itertools.cycle(batches)
        for _ in range(loop.steps):
            batch = map_tensors(next(stream), lambda tensor: tensor.to(device))
            with torch.no_grad(), eval_mode(teacher):
                teacher_output = call_model(teacher, batch)
            student_output = call_model(student, batch)
            loss = distillation_loss(student_output, teacher_output, student_capture.outputs,
                                     teacher_capture.outputs, config, batch, encoder_decoder=encoder_decoder)
            if config.task_weight > 0:
                own = task_loss(student, student_output, batch)
                if own is None:
                    raise config.error(f"task_weight={config.task_weight!r} needs the model's own loss, and the "
                                       "model returned none (batches without labels?); use task_weight=0.")
                loss = loss + config.task_weight * own
            if not math.isfinite(float(loss)):
                raise FloatingPointError(f"SelfDistillation: the loss became {float(loss)} at step {len(history)}")
            if optimizer is None:  # built after the first loss: an error above leaves nothing changed
                optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=loop.lr,
                                              weight_decay=loop.weight_decay)
                scheduler = learning_rate_schedule(optimizer, loop)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with warnings.catch_warnings():  # SequentialLR passes an epoch to the decay at the milestone; torch warns
                warnings.filterwarnings("ignore", "The epoch parameter", UserWarning)
                scheduler.step()
            history.append(float(loss))
            if callback is not None:
                callback(len(history), history[-1])
    finally:
        student_capture.detach()
        teacher_capture.detach()
        teacher.to(teacher_device)
        for module, training in modes:
            module.training = training
    return history


# The settings are declared once, on the two dataclasses: the signature and the Args section are made from them.
distill.__doc__ = distill.__doc__.replace("{settings}", fields_help(DistillLoop, DistillConfig)
                                          + "\n    callback: callback(step, loss) after each step")
distill.__signature__ = inspect.Signature(
    [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in ("student", "teacher", "batches")]
    + [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                         default=inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default)
       for f in (*dataclasses.fields(DistillLoop), *dataclasses.fields(DistillConfig))]
    + [inspect.Parameter("callback", inspect.Parameter.KEYWORD_ONLY, default=None)])
