"""Which modules an algorithm rewrites.

One selection rule for every algorithm, following the conventions users already know:

* ``classes``: only modules that are instances of these types are candidates (the algorithm decides them).
* ``target_modules``: a *list* keeps modules whose fully-qualified name equals an entry or ends with ``"." + entry``
  (PEFT's convention, so ``["query", "value"]`` hits every attention projection); a *string* is a regular expression
  that must match the whole name (``re.fullmatch``).
* ``exclude_modules``: the same two forms, applied afterwards.
* ``filter_fn(module, fqn) -> bool``: a last say (torchao's ``quantize_`` convention).

Modules an earlier surgery produced (and everything inside them) are never candidates again, which is what makes a
second application a no-op.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from composer.algorithms.warnings import NoEffectWarning
from torch import nn

ModuleNames = Sequence[str] | str | None
FilterFn = Callable[[nn.Module, str], bool]

# Attribute set on every module a surgery creates; its value names the algorithm.
SURGERY_MARKER = "_algos_surgery"


@dataclass(frozen=True)
class Skip:
    """A candidate module that was not replaced, and why."""

    fqn: str
    module_type: str
    reason: str


def any_already_converted(skipped: list[Skip]) -> bool:
    """True if a skip says an earlier application of the same algorithm is in place (a repeat, not a no-op)."""
    return any(skip.reason.startswith("already converted by ") for skip in skipped)


def name_matches(fqn: str, names: ModuleNames) -> bool:
    """PEFT's rule: a list matches an exact name or a ``.suffix``; a string is a regex matching the whole name."""
    if names is None:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, fqn) is not None
    return any(fqn == key or fqn.endswith("." + key.lstrip(".")) for key in names)


def _check_names_argument(value: ModuleNames, argument: str) -> None:
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"{argument}={value!r} is not a valid regular expression ({error}).") from None
        return
    if not isinstance(value, Sequence) or not all(isinstance(item, str) for item in value):
        raise TypeError(f"{argument} must be a list of module names, a regex string, or None; got {value!r}.")


def converted_by(module: nn.Module) -> str | None:
    """Name of the algorithm that created ``module``, or None for an original module."""
    return getattr(module, SURGERY_MARKER, None)


def select_targets(
    model: nn.Module,
    classes: tuple[type[nn.Module], ...],
    *,
    algorithm: str,
    target_modules: ModuleNames = None,
    exclude_modules: ModuleNames = None,
    filter_fn: FilterFn | None = None,
    strict: bool = False,
    candidate_fn: FilterFn | None = None,
) -> tuple[list[tuple[str, nn.Module]], list[Skip]]:
    """Return ``(targets, skipped)``: ``(fqn, module)`` pairs to rewrite, in module order, and candidates left alone.

    ``candidate_fn(module, fqn)`` is the algorithm's own finer test than ``classes`` (e.g. "an nn.Sequential shaped
    like an MLP"): a module failing it is no candidate at all, silently, and the search goes on inside it.

    With no target at all (and nothing already converted), warn with Composer's ``NoEffectWarning``, or raise
    ``ValueError`` listing some candidate names when ``strict=True``.
    """
    _check_names_argument(target_modules, "target_modules")
    _check_names_argument(exclude_modules, "exclude_modules")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable (module, fqn) -> bool; got {filter_fn!r}.")

    targets: list[tuple[str, nn.Module]] = []
    skipped: list[Skip] = []
    # Never descend into a module a surgery created, nor into one already chosen as a target.
    do_not_descend: list[str] = []
    for fqn, module in model.named_modules():
        if any(fqn.startswith(prefix + ".") for prefix in do_not_descend):
            continue
        marker = converted_by(module)
        if marker is not None:
            do_not_descend.append(fqn)
            if marker == algorithm:
                skipped.append(Skip(fqn, type(module).__name__, f"already converted by {algorithm}"))
            continue
        if fqn == "" or not isinstance(module, classes) or (candidate_fn is not None and not candidate_fn(module, fqn)):
            continue
        if target_modules is not None and not name_matches(fqn, target_modules):
            continue
        if name_matches(fqn, exclude_modules):
            skipped.append(Skip(fqn, type(module).__name__, "excluded by exclude_modules"))
        elif filter_fn is not None and not filter_fn(module, fqn):
            skipped.append(Skip(fqn, type(module).__name__, "filter_fn returned False"))
        else:
            targets.append((fqn, module))
            do_not_descend.append(fqn)

    if not targets and not any_already_converted(skipped):
        wanted = "/".join(cls.__name__ for cls in classes)
        message = f"{algorithm}: no {wanted} module selected (target_modules={target_modules!r}"
        message += f", {len(skipped)} excluded or filtered)" if skipped else ")"
        if strict:
            raise ValueError(f"{message}; candidates: {_describe_candidates(model)}.")
        warnings.warn(NoEffectWarning(f"{message}; the model is unchanged."), stacklevel=3)
    return targets, skipped


def _describe_candidates(model: nn.Module, limit: int = 8) -> str:
    """A few module names with their types, to help the user fix ``target_modules``."""
    named = [(fqn, type(m).__name__) for fqn, m in model.named_modules() if fqn and not list(m.children())]
    shown = ", ".join(f"{fqn} ({kind})" for fqn, kind in named[:limit])
    more = f", ... {len(named) - limit} more" if len(named) > limit else ""
    return (shown + more) or "the model has no submodules"
