"""Which modules an algorithm rewrites.

One selection rule for every algorithm, following the conventions users already know:

* ``classes``: only modules that are instances of these types are candidates (the algorithm decides them).
* ``target_modules``: a *list* keeps modules whose fully-qualified name equals an entry or ends with ``"." + entry``
  (PEFT's convention, so ``["query", "value"]`` hits every attention projection); a *string* is a regular expression
  that must match the whole name (``re.fullmatch``).
* ``exclude_modules``: the same two forms, applied afterwards.
* ``filter_fn(module, fqn) -> bool``: a last say (torchao's ``quantize_`` convention).
* ``skip_fn(module, fqn) -> str | None``: the algorithm's own rules that need no data (too small, tied weights),
  returning the reason to leave a target alone. They run here, so ``plan`` (a dry run) sees them too.

Whatever the algorithm, an ``nn.MultiheadAttention``'s ``out_proj`` is never a target: MHA's forward reads
``out_proj.weight`` and ``.bias`` directly (``F.multi_head_attention_forward``), so a replacement would be bypassed
or break attention. It is skipped with that reason; replace the whole MHA instead.

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

from algos.surgery.errors import SurgeryError

ModuleNames = Sequence[str] | str | None
FilterFn = Callable[[nn.Module, str], bool]
SkipFn = Callable[[nn.Module, str], "str | None"]

# Attribute set on every module a surgery creates; its value names the algorithm.
SURGERY_MARKER = "_algos_surgery"


@dataclass(frozen=True)
class Skip:
    """A candidate module that was not replaced, and why."""

    fqn: str
    module_type: str
    reason: str
    converted: bool = False  # the same algorithm already rewrote it: a repeat, not a no-op


def any_already_converted(skipped: list[Skip]) -> bool:
    """True if a skip says an earlier application of the same algorithm is in place (a repeat, not a no-op)."""
    return any(skip.converted for skip in skipped)


def name_matches(fqn: str, names: ModuleNames) -> bool:
    """PEFT's rule: a list matches an exact name or a ``.suffix``; a string is a regex matching the whole name."""
    if names is None:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, fqn) is not None
    return any(fqn == key or fqn.endswith("." + key.lstrip(".")) for key in names)


def check_names_argument(value: ModuleNames, argument: str) -> None:
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


def check_selection(target_modules: ModuleNames, exclude_modules: ModuleNames, filter_fn: FilterFn | None) -> None:
    """One-line errors for malformed selection arguments."""
    check_names_argument(target_modules, "target_modules")
    check_names_argument(exclude_modules, "exclude_modules")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable (module, fqn) -> bool; got {filter_fn!r}.")


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
    skip_fn: SkipFn | None = None,
) -> tuple[list[tuple[str, nn.Module]], list[Skip]]:
    """Return ``(targets, skipped)``: ``(fqn, module)`` pairs to rewrite, in module order, and candidates left alone.

    ``candidate_fn(module, fqn)`` is the algorithm's own finer test than ``classes`` (e.g. "an nn.Sequential shaped
    like an MLP"): a module failing it is no candidate at all, silently, and the search goes on inside it.

    ``skip_fn(module, fqn)`` returns why a target stays as it is (None: rewrite it); see the module docstring.

    With no target at all (and nothing already converted), warn with Composer's ``NoEffectWarning``, or raise
    ``ValueError`` when ``strict=True``, naming why candidates were skipped or listing some module names.
    """
    check_selection(target_modules, exclude_modules, filter_fn)

    targets: list[tuple[str, nn.Module]] = []
    skipped: list[Skip] = []
    # Never descend into a module a surgery created, nor into one already chosen as a target.
    do_not_descend: list[str] = []
    parents: dict[str, nn.Module] = {}
    for fqn, module in model.named_modules():
        parents[fqn] = module
        if any(fqn.startswith(prefix + ".") for prefix in do_not_descend):
            continue
        marker = converted_by(module)
        if marker is not None:
            do_not_descend.append(fqn)
            if marker == algorithm:
                skipped.append(Skip(fqn, type(module).__name__, f"already converted by {algorithm}", converted=True))
            continue
        if fqn == "" or not isinstance(module, classes) or (candidate_fn is not None and not candidate_fn(module, fqn)):
            continue
        if target_modules is not None and not name_matches(fqn, target_modules):
            continue
        if name_matches(fqn, exclude_modules):
            skipped.append(Skip(fqn, type(module).__name__, "excluded by exclude_modules"))
        elif filter_fn is not None and not filter_fn(module, fqn):
            skipped.append(Skip(fqn, type(module).__name__, "filter_fn returned False"))
        elif (reason := _read_by_parent(fqn, parents) or (skip_fn(module, fqn) if skip_fn else None)) is not None:
            skipped.append(Skip(fqn, type(module).__name__, reason))
        else:
            targets.append((fqn, module))
            do_not_descend.append(fqn)

    if not targets and not any_already_converted(skipped):
        wanted = "/".join(cls.__name__ for cls in classes)
        message = f"{algorithm}: no {wanted} module selected (target_modules={target_modules!r}"
        if skipped:
            message += f"; all {len(skipped)} candidates skipped, e.g. {skipped[0].fqn}: {skipped[0].reason})"
        else:
            message += ")"
        if strict:
            detail = "" if skipped else f"; candidates: {_describe_candidates(model)}"
            raise SurgeryError(algorithm, f"{message.removeprefix(algorithm + ': ')}{detail}.")
        warnings.warn(NoEffectWarning(f"{message}; the model is unchanged."), stacklevel=3)
    return targets, skipped


def _read_by_parent(fqn: str, modules: dict[str, nn.Module]) -> str | None:
    """Why a module cannot be swapped on its own because its parent reads its tensors directly, or None."""
    parent_name, _, name = fqn.rpartition(".")
    parent = modules.get(parent_name)
    if isinstance(parent, nn.MultiheadAttention) and name == "out_proj":
        return ("nn.MultiheadAttention reads out_proj.weight directly, so a replacement would be bypassed; "
                "replace the whole attention module instead")
    return None


def _describe_candidates(model: nn.Module, limit: int = 8) -> str:
    """A few module names with their types, to help the user fix ``target_modules``."""
    named = [(fqn, type(m).__name__) for fqn, m in model.named_modules() if fqn and not list(m.children())]
    shown = ", ".join(f"{fqn} ({kind})" for fqn, kind in named[:limit])
    more = f", ... {len(named) - limit} more" if len(named) > limit else ""
    return (shown + more) or "the model has no submodules"
