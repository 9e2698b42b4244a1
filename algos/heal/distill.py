"""Self-distillation: the loss, the hidden-state capture at named module boundaries, and the functional loop
``distill``.

The loss (TinyBERT's per-layer hidden-state MSE plus Hinton et al.'s temperature-softened KL on the logits)::

    L = hidden_weight    * 1/|B| * sum_{b in B} MSE(h_b^student, h_b^teacher)
      + logit_weight     * T^2 * KL(softmax(z^teacher / T) || softmax(z^student / T)) (only if the model has logits)
      + embedding_weight * mean_i (1 - cos(e_i^student, e_i^teacher))                 (sentence embeddings)
      + task_weight      * L_task                                                       (the model's own loss)

B: the boundary modules both models share, matched by name (their outputs, read with forward hooks); MSE is the
mean over every element of the real tokens' rows; the KL is summed over the classes / vocabulary and averaged over
the rows (every real token's position of a sequence output is a row). Padding positions (the batch's attention mask)
are left out of both: nothing reads their hidden states, and on short sentences they are half the positions. The
T^2 keeps the logit gradients' scale independent of T (Hinton et al., 2015).
e_i is sentence i's embedding, sentence-transformers' mean pooling: e_i = sum_t m_it h_it / sum_t m_it over the final
hidden state h (the output's ``last_hidden_state``) with the batch's attention mask m. On all-MiniLM-L6-v2 this term
heals more than the per-layer MSE when the surgery changes how tokens mix (FNet): see the heal method card.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from functools import partial

import torch
import torch.nn.functional as F
from composer.models import ComposerModel
from torch import nn

from algos.heal.config import DistillConfig
from algos.surgery.batches import eval_mode, is_encoder_decoder, map_tensors, real_tokens
from algos.surgery.targets import name_matches


def boundary_names(model: nn.Module, layers=None) -> list[str]:
    """The modules whose outputs are matched: those ``layers`` names (a list of names or '.suffix'es, or a regex,
    PEFT's rule), or by default the children of the first ``nn.ModuleList`` in ``model`` (a transformer's layers:
    HF ``encoder.layer.N``, ``nn.TransformerEncoder``'s ``layers.N``). Outermost matches only."""
    if layers is None:
        for fqn, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module):
                return [f"{fqn}.{name}" if fqn else name for name, _ in module.named_children()]
        return []
    names = []
    for fqn, _ in model.named_modules():
        if fqn and name_matches(fqn, layers) and not any(fqn.startswith(outer + ".") for outer in names):
            names.append(fqn)
    return names


class HiddenCapture:
    """Forward hooks keeping the latest output tensor of each named module (the first element of a tuple or an HF
    output). ``attach`` (re)hooks the modules now at those names, so a module a surgery replaced is followed."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.outputs: dict[str, torch.Tensor] = {}
        self._hooked: dict[str, tuple[nn.Module, object]] = {}

    def attach(self, model: nn.Module) -> None:
        for name in self.names:
            module = model.get_submodule(name)
            hooked = self._hooked.get(name)
            if hooked is not None and hooked[0] is module:
                continue
            if hooked is not None:
                hooked[1].remove()
            self._hooked[name] = (module, module.register_forward_hook(self._keeper(name)))

    def detach(self) -> None:
        for _, handle in self._hooked.values():
            handle.remove()
        self._hooked.clear()
        self.outputs.clear()

    def _keeper(self, name: str):
        def hook(module, args, output):
            tensor = first_tensor_of(output)
            if tensor is not None:
                self.outputs[name] = tensor
        return hook


def first_tensor_of(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return first_tensor_of(output[0])
    if isinstance(output, dict) and output:  # HF ModelOutput is an OrderedDict
        return first_tensor_of(next(iter(output.values())))
    return None


def logits_of(output) -> torch.Tensor | None:
    """A model output's logits: a tensor output is taken as the logits, else an HF output's ``logits``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else None


def is_encoder_output(output) -> bool:
    """Whether ``output`` is an encoder's: a final hidden state (``last_hidden_state``) and no logits (an HF base
    model such as a sentence encoder's ``BertModel``)."""
    hidden = output.get("last_hidden_state") if isinstance(output, dict) else getattr(output, "last_hidden_state",
                                                                                        None)
    return isinstance(hidden, torch.Tensor) and logits_of(output) is None


def sentence_embeddings(output, batch) -> torch.Tensor | None:
    """(batch, dim): the attention-mask weighted mean over positions of the output's final hidden state (its
    ``last_hidden_state``, or the output itself when it is a tensor); a 2-D output is taken as the embeddings."""
    if isinstance(output, torch.Tensor):
        hidden = output
    else:
        hidden = output.get("last_hidden_state") if isinstance(output, dict) else getattr(output, "last_hidden_state",
                                                                                            None)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
        return None
    if hidden.dim() == 2:
        return hidden.float()
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if not isinstance(mask, torch.Tensor) or mask.shape != hidden.shape[:2]:
        mask = torch.ones(hidden.shape[:2], device=hidden.device)
    weights = mask.unsqueeze(-1).float()
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def matched_boundaries(student: nn.Module, teacher: nn.Module, config: DistillConfig) -> list[str]:
    """The boundary names, found in the teacher (the architecture before surgery: a surgery may add module lists of
    its own to the student), each of which the student must have too. One-line errors, before any training:
    ``layers`` that name nothing, a teacher boundary the student lacks, a teacher sharing no module with the
    student."""
    if config.hidden_weight == 0:
        return []
    names = boundary_names(teacher, config.layers)
    if config.layers is not None and not names:
        raise config.error(f"layers={config.layers!r} names no module of the teacher.")
    student_modules = dict(student.named_modules())
    missing = [name for name in names if name not in student_modules]
    if missing:
        raise config.error(f"the student has no module {missing[0]!r} (a boundary of the teacher; {len(missing)} of "
                           f"{len(names)} missing); pass the student's own model before surgery as teacher, or "
                           f"layers= naming modules both have.")
    own = boundary_names(student, config.layers)
    if not names and own and not (set(student_modules) & {fqn for fqn, _ in teacher.named_modules() if fqn}):
        raise config.error(f"the teacher has no module {own[0]!r} (a student boundary) and shares no module name "
                           f"with the student; pass the student's own model before surgery as teacher.")
    return names


def distillation_loss(student_output, teacher_output, student_hidden: dict, teacher_hidden: dict,
                      config: DistillConfig, batch=None, *, encoder_decoder: bool = False) -> torch.Tensor:
    """hidden_weight * mean_b MSE(h_b^s, h_b^t) + logit_weight * T^2 * KL(softmax(z^t/T) || softmax(z^s/T))
    + embedding_weight * mean_i (1 - cos(e_i^s, e_i^t)): see the module docstring. Raises a one-line error when
    there is no hidden state, logits or embedding to match, or embedding_weight > 0 and the output has no final
    hidden state. ``encoder_decoder``: the model is one (``algos.surgery.batches.real_tokens``)."""
    terms = []

    def real_rows(x: torch.Tensor) -> torch.Tensor:  # the rows of real tokens, padding left out (same for s and t)
        real = real_tokens(batch, x, encoder_decoder=encoder_decoder)
        return x.float() if real is None else x[real].float()

    if config.hidden_weight > 0:
        shared = [name for name in student_hidden if name in teacher_hidden]
        for name in shared:
            s, t = student_hidden[name], teacher_hidden[name]
            if s.shape != t.shape:
                raise config.error(f"boundary {name!r} gives a {tuple(s.shape)} output in the student but "
                                   f"{tuple(t.shape)} in the teacher; name boundaries of equal width in layers=.")
        if shared:
            mse = torch.stack([F.mse_loss(real_rows(student_hidden[n]), real_rows(teacher_hidden[n])) for n in shared])
            terms.append(config.hidden_weight * mse.mean())
    student_logits, teacher_logits = logits_of(student_output), logits_of(teacher_output)
    if config.logit_weight > 0 and student_logits is not None and teacher_logits is not None:
        T = config.temperature
        s = F.log_softmax(real_rows(student_logits).reshape(-1, student_logits.shape[-1]) / T, dim=-1)
        t = F.log_softmax(real_rows(teacher_logits).reshape(-1, teacher_logits.shape[-1]) / T, dim=-1)
        kl = F.kl_div(s, t, log_target=True, reduction="batchmean")  # sum_c p_t (log p_t - log p_s), mean over rows
        terms.append(config.logit_weight * T * T * kl)
    embedding_weight = config.embedding_weight
    if embedding_weight is None:  # the default: the embedding term for an encoder, the logits' KL otherwise
        embedding_weight = 1.0 if is_encoder_output(teacher_output) else 0.0
    if embedding_weight > 0:
        student_embeddings = sentence_embeddings(student_output, batch)
        teacher_embeddings = sentence_embeddings(teacher_output, batch)
        if student_embeddings is None or teacher_embeddings is None:
            raise config.error(f"embedding_weight={embedding_weight!r} needs a final hidden state (an output "
                               f"with last_hidden_state, or a tensor), and the model returned "
                               f"{type(student_output).__name__}; use embedding_weight=0.")
        cosine = F.cosine_similarity(student_embeddings, teacher_embeddings, dim=-1)
        terms.append(embedding_weight * (1 - cosine).mean())
    if not terms and config.hidden_weight == 0 and config.logit_weight == 0:
        raise config.error("hidden_weight and logit_weight are 0 and embedding_weight=None leaves the embedding term "
                           "off (the model's output is not an encoder's: is_encoder_output): nothing to distill; set "
                           "embedding_weight or another weight > 0.")
    if not terms:
        raise config.error("the model gives no hidden states at matched boundaries and no logits: nothing to "
                           "distill; name the boundary modules with layers= (e.g. a regex such as "
                           "'.*layer\\.\\d+').")
    return torch.stack(terms).sum()


def call(model: nn.Module, batch):
    """A forward pass: a ComposerModel takes the batch whole, a plain module a tensor, tuple or dict (HF kwargs)."""
    if isinstance(model, ComposerModel) or isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    return model(*batch)


def task_loss(model: nn.Module, output, batch) -> torch.Tensor | None:
    if isinstance(model, ComposerModel):
        loss = model.loss(output, batch)
    else:
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if isinstance(loss, dict):
        loss = loss.get("total", sum(loss.values()))
    elif isinstance(loss, (tuple, list)):
        loss = sum(loss)
    return loss if isinstance(loss, torch.Tensor) else None


def teacher_bytes(teacher: nn.Module) -> int:
    """The teacher's memory: its parameters and buffers, in bytes."""
    return sum(t.numel() * t.element_size() for t in itertools.chain(teacher.parameters(), teacher.buffers()))


SCHEDULES = ("constant", "linear", "cosine")


def learning_rate_factor(step: int, *, schedule: str, warmup: int, steps: int) -> float:
    """The learning rate of step ``step`` (from 0) as a fraction of ``lr``: (step + 1) / warmup during the warm-up,
    then with p = (step - warmup) / (steps - warmup) in [0, 1): 1 (constant), 1 - p (linear), (1 + cos(pi p)) / 2
    (cosine)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def distill(student: nn.Module, teacher: nn.Module, batches: Iterable, *, steps: int, lr: float = 7e-4,
            hidden_weight: float = 1.0, logit_weight: float = 1.0, temperature: float = 2.0, layers=None,
            embedding_weight: float | None = None, task_weight: float = 0.0, weight_decay: float = 0.0,
            schedule: str = "cosine", warmup_steps: int | None = None,
            callback: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``student`` in place for ``steps`` AdamW steps to match ``teacher`` (run without gradients in eval mode,
    never changed: its weights, ``requires_grad`` flags, modes and device are as they were when this returns)
    on ``batches`` (model inputs: dicts of tensors for HF models, tuples or tensors otherwise; cycled when shorter
    than ``steps``), and return the loss of every step. The loss is in this module's docstring; ``task_weight`` 0
    is pure distillation, so the batches need no labels; ``embedding_weight`` None turns the sentence-embedding
    term on for an encoder (``is_encoder_output``). The learning rate: a linear warm-up over ``warmup_steps`` (None:
    5% of ``steps``, rounded down), then ``schedule`` "constant", or "linear" / "cosine" decay to 0 at ``steps``
    (``SCHEDULES``). The defaults are the settings measured best on all-MiniLM-L6-v2 (the heal method card).
    ``callback(step, loss)`` runs after each step (step counts from 1), e.g. to score the student on the way.
    Bad input (boundaries the teacher lacks, a model with neither hidden states nor logits, a model without its
    own loss when task_weight > 0) is a one-line ``SurgeryError`` raised before the first step, with nothing
    changed."""
    config = DistillConfig.build(hidden_weight=hidden_weight, logit_weight=logit_weight, temperature=temperature,
                                 layers=layers, embedding_weight=embedding_weight, task_weight=task_weight)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise config.error(f"steps={steps!r} must be an int >= 1.")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise config.error(f"lr={lr!r} must be a number > 0.")
    if schedule not in SCHEDULES:
        raise config.error(f"schedule={schedule!r} is not one of {', '.join(map(repr, SCHEDULES))}.")
    if warmup_steps is None:
        warmup_steps = steps // 20
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps < steps:
        raise config.error(f"warmup_steps={warmup_steps!r} must be an int in [0, steps={steps}).")
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
        for _ in range(steps):
            batch = map_tensors(next(stream), lambda tensor: tensor.to(device))
            with torch.no_grad(), eval_mode(teacher):
                teacher_output = call(teacher, batch)
            student_output = call(student, batch)
            loss = distillation_loss(student_output, teacher_output, student_capture.outputs,
                                     teacher_capture.outputs, config, batch, encoder_decoder=encoder_decoder)
            if config.task_weight > 0:
                own = task_loss(student, student_output, batch)
                if own is None:
                    raise config.error(f"task_weight={task_weight!r} needs the model's own loss, and the model "
                                       "returned none (batches without labels?); use task_weight=0.")
                loss = loss + config.task_weight * own
            if not math.isfinite(float(loss)):
                raise FloatingPointError(f"SelfDistillation: the loss became {float(loss)} at step {len(history)}")
            if optimizer is None:  # built after the first loss: an error above leaves nothing changed
                optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr,
                                              weight_decay=weight_decay)
                scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer, partial(learning_rate_factor, schedule=schedule, warmup=warmup_steps, steps=steps))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
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
