"""Per-class handlers: *what* a surgery does is its config; *how* it does it to one kind of module is a handler
registered for that module's class (torchao's shape). Families (HF BERT, T5, GPT-2, torch, torchvision) are found by
type, never by strings in the code that uses them."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

from torch import nn

H = TypeVar("H")


class Handlers(Generic[H]):
    """A table ``module class -> handler``; :meth:`find` picks the handler of the nearest class in the module's MRO,
    so a subclass (RoBERTa's layers subclassing BERT's, a user's ``nn.Sequential``) gets its base's handler."""

    def __init__(self):
        self._table: dict[type[nn.Module], H] = {}

    def register(self, handler: H, *classes: type[nn.Module]) -> H:
        for cls in classes:
            self._table[cls] = handler
        return handler

    def add(self, *classes: type[nn.Module]) -> Callable[[H], H]:
        """Decorator form: ``@handlers.add(nn.TransformerEncoderLayer)`` over a handler class or function."""
        return lambda handler: self.register(handler, *classes)

    def find(self, module: nn.Module) -> H | None:
        for cls in type(module).__mro__:
            if cls in self._table:
                return self._table[cls]
        return None

    @property
    def classes(self) -> tuple[type[nn.Module], ...]:
        return tuple(self._table)


def hf_classes(*names: tuple[str, str]) -> tuple[type[nn.Module], ...]:
    """The Hugging Face modeling classes named ``(model_type, ClassName)`` that the installed transformers has, e.g.
    ``hf_classes(("bert", "BertAttention"))``; none without the ``nlp`` extra."""
    found = []
    for model_type, class_name in names:
        try:
            module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
            found.append(getattr(module, class_name))
        except (ImportError, AttributeError):  # pragma: no cover - transformers (the nlp extra) not installed
            continue
    return tuple(found)
