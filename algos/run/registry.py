"""Registries: a name in a YAML file -> a function that builds the thing (llm-foundry's pattern, without catalogue).

Each registry maps names to builder functions; ``build(registry, spec, where)`` calls the builder with the spec's
keyword arguments. An unknown name, or an argument the builder does not take, is a one-line error naming the config
key and the valid choices, raised before anything is built.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the valid choices."""


class Registry:
    """Named builders of one kind (models, datasets, optimizers, ...). Extend it with ``@registry.register(name)``."""

    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable] = {}

    def register(self, name: str, builder: Callable | None = None):
        def add(function: Callable) -> Callable:
            if name in self._builders:
                raise ValueError(f"{self.kind} registry: {name!r} is already registered")
            self._builders[name] = function
            return function

        return add(builder) if builder is not None else add

    def names(self) -> list[str]:
        return sorted(self._builders)

    def get(self, name: str, where: str) -> Callable:
        if name not in self._builders:
            raise ConfigError(f"{where}: unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._builders[name]

    def __contains__(self, name: str) -> bool:
        return name in self._builders

    def build(self, name: str, kwargs: Mapping, where: str, **context):
        """Call the builder ``name`` with ``kwargs`` (from the config) plus ``context`` (from the runner)."""
        builder = self.get(name, where)
        check_kwargs(builder, kwargs, f"{where}.{name}" if where else name)
        return builder(**context, **kwargs)


def check_kwargs(function: Callable, kwargs: Mapping, where: str) -> None:
    """One-line error for a keyword ``function`` does not take, listing those it does."""
    parameters = inspect.signature(function).parameters
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [name for name, p in parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = [key for key in kwargs if key not in accepted]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(accepted)}")
