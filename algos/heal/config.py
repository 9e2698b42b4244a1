"""``DistillConfig``: the settings of self-distillation, one frozen dataclass (the core's shape, see
``algos.surgery.config``); ``distill`` and ``SelfDistillation`` both take them."""

from __future__ import annotations

from dataclasses import dataclass

from algos.surgery.config import SurgeryConfig, setting
from algos.surgery.targets import ModuleNames, check_names_argument


@dataclass(frozen=True)
class DistillConfig(SurgeryConfig):
    algorithm = "SelfDistillation"

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
    task_weight: float = setting(0.0, "weight of the model's own loss (0: pure distillation, no labels needed)")

    def check(self) -> None:
        for name in ("hidden_weight", "logit_weight", "embedding_weight", "task_weight"):
            value = getattr(self, name)
            if name == "embedding_weight" and value is None:  # chosen from the model's output (the help above)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise self.error(f"{name}={value!r} must be a number >= 0.")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or self.temperature <= 0:
            raise self.error(f"temperature={self.temperature!r} must be a number > 0.")
        if self.hidden_weight == 0 and self.logit_weight == 0 and self.embedding_weight == 0:
            raise self.error("hidden_weight, logit_weight and embedding_weight are all 0: nothing to distill.")
        if self.layers is not None and self.hidden_weight == 0:
            raise self.error(f"layers={self.layers!r} has no effect with hidden_weight=0 (layers chooses the "
                             f"hidden states matched); remove layers or set hidden_weight > 0.")
        try:
            check_names_argument(self.layers, "layers")
        except (TypeError, ValueError) as bad:
            raise self.error(str(bad)) from None
