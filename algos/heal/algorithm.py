"""``SelfDistillation``: the distillation loss of ``algos.heal.loss`` as a Composer algorithm, against a frozen
teacher that is, by default, the model as it was right before the run's first surgery."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import os

import torch
from composer.core import Algorithm, Event, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from algos.heal.capture import HiddenCapture, matched_boundaries
from algos.heal.config import DistillConfig
from algos.heal.loss import distillation_loss
from algos.surgery.algorithm import SurgeryAlgorithm
from algos.surgery.batches import call_model, eval_mode, is_encoder_decoder
from algos.surgery.config import fields_help
from algos.surgery.resume import REBUILD_KEY, load_model
from algos.surgery.skeleton import materialize, meta_copy
from algos.surgery.yaml_names import yaml_name

# Key of SelfDistillation's checkpoint entry: the settings, the teacher's weightless copy and its weights.
TEACHER_KEY = "algos_distill_teacher"


@yaml_name("self_distillation")
class SelfDistillation(Algorithm):
    """Adds the self-distillation loss (``algos.heal.loss``) to the training loss at ``Event.AFTER_LOSS``::

        loss = task_weight * loss + hidden_weight * mean_b MSE(h_b, h_b^teacher) + logit_weight * T^2 * KL(...)
               + embedding_weight * mean_i (1 - cos(e_i, e_i^teacher))
               + similarity_weight * mean_{i<j} (cos(e_i, e_j) - cos(e_i^teacher, e_j^teacher))^2

    The teacher is frozen and never part of ``state.model`` (so DDP never wraps it); it runs on the same batch under
    ``torch.no_grad`` in eval mode, on the student's device. Which teacher:
    * ``teacher=None`` (default): a copy of ``state.model`` taken right before the first surgery of the run (every
      ``SurgeryAlgorithm`` calls ``before_surgery`` on the algorithms before it rewrites the model, whatever their
      order in ``algorithms=[...]``); with no surgery pending at ``Event.FIT_START``, the model then. Until it is
      taken (a surgery at ``apply_at``), no loss is added: the student is the teacher.
    * ``teacher=`` an ``nn.Module`` (used as is, frozen), or the path of a Composer checkpoint of this model (loaded
      with ``algos.load_model`` into a copy of the model before surgery).

    The teacher's weights are in this algorithm's checkpoint entry: a resumed run, with or without this algorithm
    passed again, distills from the same teacher. Its memory (parameters and buffers) is logged as the
    hyperparameter ``distill/teacher_bytes`` and shown in ``report()``.

    Args:
    teacher: None, an nn.Module, or a checkpoint path.
{settings}
    """

    def __init__(self, *, teacher: nn.Module | str | os.PathLike | None = None, **settings):
        self.config = DistillConfig.build(**settings)
        if teacher is not None and not isinstance(teacher, (nn.Module, str, os.PathLike)):
            raise self.config.error(f"teacher={teacher!r} must be None, an nn.Module or a checkpoint path.")
        if isinstance(teacher, (str, os.PathLike)) and not os.path.isfile(teacher):
            raise self.config.error(f"teacher={os.fspath(teacher)!r} is no checkpoint file.")
        self.teacher_source = teacher
        self.teacher: nn.Module | None = None
        if isinstance(teacher, nn.Module):
            self._set_teacher(teacher, own=False)
        self._student: HiddenCapture | None = None
        self._teacher_capture: HiddenCapture | None = None
        self._logged = False

    # -- the teacher
    def before_surgery(self, state: State) -> None:
        """Called by a ``SurgeryAlgorithm`` right before it rewrites ``state.model``: the teacher is taken now, once."""
        if self.teacher is None:
            self._take_teacher(state)

    def _take_teacher(self, state: State) -> None:
        model = _unwrap(state.model)
        self._unhook()  # no hook of ours travels into the copy
        snapshot = copy.deepcopy(model)
        if isinstance(self.teacher_source, (str, os.PathLike)):
            try:
                load_model(snapshot, self.teacher_source)
            except Exception as error:  # noqa: BLE001 (any reason it does not load is the same one-line error)
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise self.config.error(f"teacher={os.fspath(self.teacher_source)!r} does not load into this model: "
                                        f"{first[:300]}") from None
        self._set_teacher(snapshot)

    def _set_teacher(self, teacher: nn.Module, *, own: bool = True) -> None:
        """The teacher runs without gradients in eval mode (``_add_loss``). A copy of ours is also frozen for good;
        a teacher passed in is the user's model, and none of its flags is touched (``own=False``)."""
        if own:
            teacher.eval().requires_grad_(False)
        self.teacher = teacher
        self._teacher_capture = None
        self._logged = False

    @property
    def teacher_bytes(self) -> int:
        """The teacher's memory: its parameters and buffers, in bytes."""
        if self.teacher is None:
            return 0
        return sum(t.numel() * t.element_size() for t in itertools.chain(self.teacher.parameters(),
                                                                          self.teacher.buffers()))

    # -- Composer
    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.BEFORE_FORWARD, Event.AFTER_LOSS, Event.FIT_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            if isinstance(self.teacher_source, (str, os.PathLike)) and self.teacher is None:
                self._take_teacher(state)  # before any surgery: a bad checkpoint fails before training
        elif event == Event.FIT_START:
            pending = any(isinstance(a, SurgeryAlgorithm) and not a.applied for a in state.algorithms)
            if self.teacher is None and not pending:
                self._take_teacher(state)
            self._check(state)
        elif event == Event.BEFORE_FORWARD and self.teacher is not None:
            self._hooks(state)
        elif event == Event.AFTER_LOSS and self.teacher is not None and self._student is not None:
            try:
                self._add_loss(state)
            finally:  # the hooks live for one training step: nothing of ours stays on either model between steps
                self._unhook()
        elif event == Event.FIT_END:
            self._unhook()
        if self.teacher is not None and not self._logged:
            logger.log_hyperparameters({"distill/teacher_bytes": self.teacher_bytes})
            self._logged = True

    def check_model(self, model: nn.Module) -> None:
        """One-line errors before training for settings ``model`` (as built, before any surgery) cannot meet, such as
        ``layers`` that name none of its modules; the runner calls it while it checks the config."""
        matched_boundaries(_unwrap(model), self.teacher if self.teacher is not None else _unwrap(model), self.config)

    def _check(self, state: State) -> None:
        if self.teacher is not None:
            matched_boundaries(_unwrap(state.model), self.teacher, self.config)

    def _hooks(self, state: State) -> None:
        """Hook the boundaries by name on the current modules (a surgery may have rewritten the model since)."""
        model = _unwrap(state.model)
        if self._student is None:
            self._student = HiddenCapture(matched_boundaries(model, self.teacher, self.config))
        self._student.attach(model)
        if self._teacher_capture is None:
            self._teacher_capture = HiddenCapture(self._student.names)
        self._teacher_capture.attach(self.teacher)

    def _unhook(self) -> None:
        for capture in (self._student, self._teacher_capture):
            if capture is not None:
                capture.detach()

    def _add_loss(self, state: State) -> None:
        device = _device_of(_unwrap(state.model))
        if _device_of(self.teacher) != device:
            self.teacher.to(device)
        with torch.no_grad(), eval_mode(self.teacher), get_precision_context(state.precision):
            teacher_output = call_model(self.teacher, state.batch)
        extra = distillation_loss(state.outputs, teacher_output, self._student.outputs, self._teacher_capture.outputs,
                                  self.config, state.batch, encoder_decoder=is_encoder_decoder(self.teacher))
        self._student.outputs.clear()
        self._teacher_capture.outputs.clear()
        weight = self.config.task_weight
        loss = state.loss
        if isinstance(loss, torch.Tensor):
            state.loss = loss * weight + extra
        elif isinstance(loss, dict):  # Composer sums the values, or uses "total" when there is one
            state.loss = {**{key: value * weight for key, value in loss.items()}, "distillation": extra}
            if "total" in loss:
                state.loss["total"] = loss["total"] * weight + extra
        else:
            state.loss = (*(value * weight for value in loss), extra)

    def report(self) -> str:
        where = "not taken yet" if self.teacher is None else f"{type(self.teacher).__name__}"
        return f"{self!r}: teacher {where}, {self.teacher_bytes:,} bytes ({self.teacher_bytes / 2**20:,.1f} MiB)"

    # -- checkpoints
    @staticmethod
    def required_on_load() -> bool:
        return True

    def state_dict(self) -> dict:
        teacher = None if self.teacher is None else {"skeleton": meta_copy(self.teacher),
                                                     "weights": self.teacher.state_dict()}
        return {"repr": repr(self), TEACHER_KEY: {"config": dataclasses.asdict(self.config), "teacher": teacher},
                REBUILD_KEY: f"{type(self).__module__}:{type(self).__qualname__}"}

    def load_state_dict(self, state: dict) -> None:
        """The checkpoint's teacher (the run's own), materialized on the device of the teacher or model at hand."""
        saved = state[TEACHER_KEY]["teacher"]
        if saved is None:
            return
        device = _device_of(self.teacher) if self.teacher is not None else "cpu"
        teacher = materialize(saved["skeleton"], device)
        teacher.load_state_dict(saved["weights"])
        self._set_teacher(teacher)

    @classmethod
    def from_state_dict(cls, state: dict) -> SelfDistillation:
        """The algorithm a checkpoint entry describes (resume without it passed again: ``algos.surgery.resume``)."""
        algorithm = cls(**state[TEACHER_KEY]["config"])
        algorithm.load_state_dict(state)
        return algorithm

    def __repr__(self) -> str:
        shown = {**self.config.changed()}
        if self.teacher_source is not None:
            shown["teacher"] = (os.fspath(self.teacher_source) if not isinstance(self.teacher_source, nn.Module)
                                else f"<{type(self.teacher_source).__name__}>")
        return f"SelfDistillation({', '.join(f'{key}={value!r}' for key, value in shown.items())})"


SelfDistillation.__doc__ = SelfDistillation.__doc__.replace("{settings}", fields_help(DistillConfig))
SelfDistillation.__signature__ = inspect.Signature(
    [inspect.Parameter("teacher", inspect.Parameter.KEYWORD_ONLY, default=None)]
    + [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
       for f in dataclasses.fields(DistillConfig)])


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _device_of(module: nn.Module):
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")
