"""Registries: a name in a YAML file -> a function that builds the thing (llm-foundry's pattern, without catalogue).

Each registry maps names to builder functions; ``registry.build(name, kwargs, where)`` calls the builder with
the config's keyword arguments. An unknown name, an argument the builder does not take or of a plainly wrong type,
and a ValueError from the builder's own checks are one-line ``ConfigError``s naming the config key (and the valid
choices), raised before any training starts.
"""

from __future__ import annotations

import inspect
import re
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
# Other members of a union that a YAML value is checked against: None, a tensor (never from YAML), a Composer time.
_KNOWN_MEMBERS = {"None", "NoneType", "Tensor", "Time"}
TIME_UNITS = "ba, ep, sp, tok, dur, sec, iter"


def check_kwargs(function: Callable, kwargs: Mapping, where: str, reserved: tuple[str, ...] = ()) -> None:
    """One-line error for a keyword ``function`` does not take (listing those it does), a required one missing,
    a value whose type contradicts an annotation made of ``int`` / ``float`` / ``bool`` / ``str`` (an int passes for
    a float), optionally in a ``Union`` / ``Optional`` with ``Tensor`` or ``Time``, or a string that is not a
    Composer time where the annotation takes a ``Time`` (``max_duration``, ``save_interval``, ``t_warmup``, ...)."""
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
        if key not in parameters or value is None:
            continue
        text = _annotation_text(parameters[key].annotation)
        if isinstance(value, str) and re.search(r"\bTime\b", text):
            check_time(value, f"{where}.{key}")
            continue
        members = _members(text)
        if not members or not set(members) <= {*_SIMPLE_TYPES, *_KNOWN_MEMBERS}:
            continue  # not annotated, or with a type not checked here (a class, a Callable, a list ...)
        if not any(_is(value, _SIMPLE_TYPES[member]) for member in members if member in _SIMPLE_TYPES):
            names = [m for m in members if m in _SIMPLE_TYPES and not (m == "str" and "Time" in members)]
            names += [f"a Composer time ({TIME_UNITS})"] if "Time" in members else []
            raise ConfigError(f"{where}.{key}: expected {' or '.join(names)}, got {value!r} ({type(value).__name__})")


def check_time(value: str, key: str) -> None:
    """A one-line error unless ``value`` parses as Composer parses time strings (``2ep``, ``100ba``, ``0.5dur``)."""
    from composer.core import Time

    try:
        Time.from_timestring(value)
    except (ValueError, TypeError) as error:
        reason = str(error).splitlines()[0]
        why = "" if reason.startswith("Invalid time string") else f" ({reason.rstrip('.')})"
        raise ConfigError(f"{key}={value!r} is not a Composer time{why}: write a number and a unit ({TIME_UNITS}), "
                          f"e.g. 2ep, 100ba, 0.5dur") from None


def _is(value, expected: type) -> bool:
    if isinstance(value, bool):
        return expected is bool
    return isinstance(value, expected) or (expected is float and isinstance(value, int))


def _annotation_text(annotation) -> str:
    """``typing.Optional[typing.Union[int, str, composer.core.time.Time]]`` or a class or a string annotation ->
    ``Optional[Union[int,str,Time]]``."""
    text = annotation if isinstance(annotation, str) else annotation.__name__ if isinstance(annotation, type) \
        else repr(annotation)
    return re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", text).replace(" ", "")


def _members(text: str) -> list[str] | None:
    """``Optional[Union[int,str,Time]]`` -> ``['int', 'str', 'Time', 'None']``; ``int|None`` -> ``['int', 'None']``;
    ``int`` -> ``['int']``; None for anything else (``list[str]``, ``Callable[...]``)."""
    match = re.fullmatch(r"(Optional|Union)\[(.*)\]", text)
    inner, separator = (match[2], ",") if match else (text, "|")
    parts, depth, start = [], 0, 0
    for index, char in enumerate(inner + separator):
        depth += (char == "[") - (char == "]")
        if char == separator and depth == 0:
            parts.append(inner[start:index])
            start = index + 1
    if not match and len(parts) == 1:
        return [text] if re.fullmatch(r"\w+", text) else None
    members = [_members(part) for part in parts]
    if None in members:
        return None
    return [name for part in members for name in part] + (["None"] if match and match[1] == "Optional" else [])
