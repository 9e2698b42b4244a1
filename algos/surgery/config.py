"""Settings: an algorithm's are one frozen dataclass that checks itself; which modules it touches is a ``Selection``.

Defaults, checks and help text live once, on the dataclass fields. The functional ``apply_*`` call, the Composer
class, its ``repr`` and the YAML runner's key check are all made from them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from algos.surgery.errors import AlgorithmError, SurgeryError
from algos.surgery.targets import FilterFn, ModuleNames, check_selection


def setting(default: Any = dataclasses.MISSING, help: str = "", **kwargs) -> Any:  # noqa: A002 (dataclass style)
    """A dataclass field with its help text, the one place a setting is described."""
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass(frozen=True)
class Selection:
    """Which modules an algorithm rewrites (see ``algos.surgery.targets``); the same four arguments everywhere."""

    target_modules: ModuleNames = setting(None, "list: names or '.suffix'es (PEFT's rule); str: a regex (fullmatch)")
    exclude_modules: ModuleNames = setting(None, "the same two forms, applied after target_modules")
    filter_fn: FilterFn | None = setting(None, "filter_fn(module, fqn) -> bool: the last say")
    strict: bool = setting(False, "an error instead of a warning when nothing is rewritten")

    def __post_init__(self):
        check_selection(self.target_modules, self.exclude_modules, self.filter_fn)


@dataclass(frozen=True)
class SurgeryConfig:
    """Base of every algorithm's settings. A subclass sets ``algorithm`` (its name in reports and errors), lists its
    fields with :func:`setting`, and checks them in :meth:`check` (run once, on construction)."""

    algorithm: ClassVar[str] = "Surgery"
    error_type: ClassVar[type[AlgorithmError]] = SurgeryError  # what ``error`` makes

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise ``self.error(...)`` for a bad value."""

    def error(self, message: str) -> AlgorithmError:
        return self.error_type(self.algorithm, message)

    def require_int(self, *names: str, least: int) -> None:
        """A one-line error unless each named setting is an int (not a bool) >= ``least``: the check most settings
        share, written once."""
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise self.error(f"{name}={value!r} must be an int >= {least}.")

    def require_number(self, *names: str, least: float = 0, strictly: bool = False) -> None:
        """A one-line error unless each named setting is a number (int or float, not a bool) >= ``least`` (>
        ``least`` with ``strictly``)."""
        for name in names:
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or value < least or (strictly and value == least):
                raise self.error(f"{name}={value!r} must be a number {'>' if strictly else '>='} {least}.")

    @property
    def calibration_needed(self) -> int:
        """How many calibration batches the surgery wants (0: none); a Composer run draws them from the train data."""
        return 0

    @classmethod
    def build(cls, **settings):
        """``cls(**settings)``, with an unknown name as a one-line error listing the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in settings if key not in names]
        if unknown:
            raise TypeError(f"{cls.algorithm}: unexpected argument(s) {', '.join(map(repr, unknown))}; valid: "
                            f"{', '.join(names)}")
        return cls(**settings)

    def changed(self) -> dict[str, Any]:
        """The settings that differ from their defaults, in field order (what ``repr`` shows)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not _is_default(self, f)}


def _is_default(config, f: dataclasses.Field) -> bool:
    value = getattr(config, f.name)
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
    if value is default:
        return True
    try:
        return bool(value == default) and type(value) is type(default)
    except Exception:  # values without a plain ==
        return False


def fields_help(*classes: type) -> str:
    """``name (default): help`` lines of the given dataclasses' fields: the Args section of generated docstrings."""
    lines = []
    for cls in classes:
        for f in dataclasses.fields(cls):
            default = "" if f.default is dataclasses.MISSING else f" (default {f.default!r})"
            lines.append(f"    {f.name}{default}: {f.metadata.get('help', '')}")
    return "\n".join(lines)
