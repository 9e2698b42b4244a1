"""The settings of self-distillation, each declared once, as frozen dataclasses of the core's shape
(``algos.surgery.config``): ``DistillConfig``, the loss (``distill`` and ``SelfDistillation`` both take it), and
``DistillLoop``, the functional loop's optimizer and schedule (``distill`` only; in a Composer run the Trainer's
optimizer and scheduler do that). Their errors are ``DistillError``s: self-distillation is not a surgery."""

from __future__ import annotations

from dataclasses import dataclass

from algos.surgery.config import SurgeryConfig, setting
from algos.surgery.errors import AlgorithmError
from algos.surgery.targets import ModuleNames, check_names_argument

SCHEDULES = ("constant", "linear", "cosine")


class DistillError(AlgorithmError):
    """Bad settings or input of self-distillation, raised before the first step: nothing has been changed."""


@dataclass(frozen=True)
class DistillConfig(SurgeryConfig):
    algorithm = "SelfDistillation"
    error_type = DistillError

    hidden_weight: float = setting(1.0, "weight of the mean hidden-state MSE over the matched boundaries")
    logit_weight: float = setting(1.0, "weight of T^2 * KL(teacher || student) on the logits (when the model has any)")
    temperature: float = setting(2.0, "T: both logit sets are divided by it before the softmax")
    layers: ModuleNames = setting(None, "the boundary modules whose outputs are matched: a list of names or "
                                        "'.suffix'es, or a regex (fullmatch); None: the children of the first "
                                        "nn.ModuleList (every transformer layer)")
    embedding_weight: float | None = setting(None, "weight of 1 - cosine between the student's and the teacher's "
                                                  "sentence embeddings (the attention-mask weighted mean of the final "
                                                  "hidden state, sentence-transformers' mean pooling); None: 1.0 when "
                                                  "the model is an encoder (its output has a last_hidden_state and no "
                                                  "logits, e.g. a sentence encoder), else 0")
    similarity_weight: float = setting(0.0, "weight of the MSE between the student's and the teacher's in-batch "
                                            "matrices of pairwise cosine similarities of the sentence embeddings "
                                            "(relational distillation: the geometry between sentences that "
                                            "retrieval and ranking read)")
    task_weight: float = setting(0.0, "weight of the model's own loss (0: pure distillation, no labels needed)")

    def check(self) -> None:
        self.require_number("hidden_weight", "logit_weight", "similarity_weight", "task_weight")
        if self.embedding_weight is not None:  # None: chosen from the model's output (the help above)
            self.require_number("embedding_weight")
        self.require_number("temperature", strictly=True)
        if self.hidden_weight == self.logit_weight == self.embedding_weight == self.similarity_weight == 0:
            raise self.error("hidden_weight, logit_weight, embedding_weight and similarity_weight are all 0: nothing "
                             "to distill.")
        if self.layers is not None and self.hidden_weight == 0:
            raise self.error(f"layers={self.layers!r} has no effect with hidden_weight=0 (layers chooses the "
                             f"hidden states matched); remove layers or set hidden_weight > 0.")
        try:
            check_names_argument(self.layers, "layers")
        except (TypeError, ValueError) as bad:
            raise self.error(str(bad)) from None


@dataclass(frozen=True)
class DistillLoop(SurgeryConfig):
    """The functional ``distill`` loop: AdamW over the student's trainable parameters, a linear warm-up, then a
    decay. The defaults are the settings measured best on all-MiniLM-L6-v2 (the heal method card)."""

    algorithm = "SelfDistillation"
    error_type = DistillError

    steps: int = setting(help="AdamW steps (required, an int >= 1); the batches are cycled when fewer")
    lr: float = setting(7e-4, "peak learning rate")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    schedule: str = setting("cosine", "after the warm-up: 'constant', or 'linear' / 'cosine' decay to 0 at steps")
    warmup_steps: int | None = setting(None, "linear warm-up steps; None: 5% of steps, rounded down")

    def check(self) -> None:
        self.require_int("steps", least=1)
        self.require_number("lr", strictly=True)
        self.require_number("weight_decay")
        if self.schedule not in SCHEDULES:
            raise self.error(f"schedule={self.schedule!r} is not one of {', '.join(map(repr, SCHEDULES))}.")
        warmup = self.warmup
        if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup < self.steps:
            raise self.error(f"warmup_steps={warmup!r} must be an int in [0, steps={self.steps}).")

    @property
    def warmup(self) -> int:
        """The warm-up steps in effect (``warmup_steps``, or its default)."""
        return self.steps // 20 if self.warmup_steps is None else self.warmup_steps
