"""Registries: a name in a YAML file -> a function that builds the thing (llm-foundry's pattern, without catalogue).

Each registry maps names to builder functions; ``registry.build(name, kwargs, where)`` calls the builder with
the config's keyword arguments. An unknown name, an argument the builder does not take or of a plainly wrong type,
and a ValueError from the builder's own checks are one-line ``ConfigError``s naming the config key (and the valid
choices), raised before any training starts.
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
        check_kwargs(builder, kwargs, where, reserved=tuple(context))
        try:
            return builder(**context, **kwargs)
        except ConfigError:
            raise
        except (ValueError, TypeError) as error:  # the builder's own argument checks: one line, prefixed with the key
            raise ConfigError(f"{where} ({name}): {str(error).splitlines()[0]}") from None


_SIMPLE_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def check_kwargs(function: Callable, kwargs: Mapping, where: str, reserved: tuple[str, ...] = ()) -> None:
    """One-line error for a keyword ``function`` does not take (listing those it does), a required one missing,
    or a value whose type contradicts a plain ``int`` / ``float`` / ``bool`` / ``str`` annotation (an int passes
    for a float)."""
    parameters = inspect.signature(function).parameters
    accepted = [name for name, p in parameters.items()
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name not in reserved and name != "self"]
    unknown = [key for key in kwargs if key not in accepted]
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(accepted)}")
    missing = [name for name in accepted if parameters[name].default is parameters[name].empty and name not in kwargs]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(map(repr, missing))} (no default)")
    for key, value in kwargs.items():
        annotation = parameters[key].annotation if key in parameters else None
        expected = _SIMPLE_TYPES.get(annotation if isinstance(annotation, str) else getattr(annotation, "__name__",
                                                                                              None))
        if expected is None or value is None:
            continue
        ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(f"{where}.{key}: expected {expected.__name__}, got {value!r} "
                              f"({type(value).__name__})")
