"""The self-distillation loss, a pure function of two model outputs and their hidden states at matched boundaries
(``algos.heal.capture``), used by both ``distill`` and ``SelfDistillation``.

The loss (TinyBERT's per-layer hidden-state MSE plus Hinton et al.'s temperature-softened KL on the logits)::

    L = hidden_weight    * 1/|B| * sum_{b in B} MSE(h_b^student, h_b^teacher)
      + logit_weight     * T^2 * KL(softmax(z^teacher / T) || softmax(z^student / T)) (only if the model has logits)
      + embedding_weight * mean_i (1 - cos(e_i^student, e_i^teacher))                 (sentence embeddings)
      + similarity_weight * mean_{i<j} (cos(e_i^s, e_j^s) - cos(e_i^t, e_j^t))^2     (their pairwise geometry)
      + task_weight      * L_task                                                       (the model's own loss)

B: the boundary modules both models share, matched by name (their outputs, read with forward hooks); MSE is the
mean over every element of the real tokens' rows; the KL is summed over the classes / vocabulary and averaged over
the rows (every real token's position of a sequence output is a row). Padding positions (the batch's attention mask)
are left out of both: nothing reads their hidden states, and on short sentences they are half the positions. The
T^2 keeps the logit gradients' scale independent of T (Hinton et al., 2015).
e_i is sentence i's embedding, sentence-transformers' mean pooling: e_i = sum_t m_it h_it / sum_t m_it over the final
hidden state h (the output's ``last_hidden_state``) with the batch's attention mask m. On all-MiniLM-L6-v2 this term
heals more than the per-layer MSE when the surgery changes how tokens mix (FNet): see the heal method card.
The similarity term is relational distillation (Park et al., 2019, "Relational Knowledge Distillation"; Tung & Mori,
2019, "Similarity-Preserving Knowledge Distillation"): it matches how the batch's sentences relate to each other,
which is what a search or ranking over the embeddings reads (the Spearman of pairwise similarities in the heal
benchmarks), rather than each embedding on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from composer.models import ComposerModel
from torch import nn

from algos.heal.config import DistillConfig
from algos.surgery.batches import real_tokens


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


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """sentence-transformers' mean pooling (its Pooling module, before any Normalize): e = sum_t m_t h_t / sum_t m_t,
    the attention-mask weighted mean of the token states ``(batch, seq, dim)`` -> ``(batch, dim)``, in float32. No
    mask (or one of another shape): every position counts."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != hidden.shape[:2]:
        attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
    weights = attention_mask.unsqueeze(-1).float()
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


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
    return mean_pool(hidden, batch.get("attention_mask") if isinstance(batch, dict) else None)


def pairwise_cosines(embeddings: torch.Tensor | None, config: DistillConfig) -> torch.Tensor:
    """cos(e_i, e_j) for every pair i < j of the batch's sentence embeddings ``(batch, dim)``, as a vector."""
    if embeddings is None:
        raise config.error("similarity_weight > 0 needs sentence embeddings (an output with last_hidden_state, or a "
                           "tensor), and the model returned none; use similarity_weight=0.")
    unit = F.normalize(embeddings, dim=-1)
    i, j = torch.triu_indices(len(unit), len(unit), offset=1, device=unit.device)
    return (unit[i] * unit[j]).sum(-1)


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
    if config.similarity_weight > 0:
        pairs = [pairwise_cosines(sentence_embeddings(output, batch), config) for output in (student_output,
                                                                                            teacher_output)]
        # the mean over pairs; a batch of one sentence has none and adds 0
        terms.append(config.similarity_weight * (pairs[0] - pairs[1]).square().sum() / max(1, pairs[0].numel()))
    if not terms and config.hidden_weight == 0 and config.logit_weight == 0:
        raise config.error("hidden_weight and logit_weight are 0 and embedding_weight=None leaves the embedding term "
                           "off (the model's output is not an encoder's: is_encoder_output): nothing to distill; set "
                           "embedding_weight or another weight > 0.")
    if not terms:
        raise config.error("the model gives no hidden states at matched boundaries and no logits: nothing to "
                           "distill; name the boundary modules with layers= (e.g. a regex such as "
                           "'.*layer\\.\\d+').")
    return torch.stack(terms).sum()


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
