"""Resume a checkpoint made with a surgery algorithm, in a Trainer that was not given that algorithm.

Why this exists: Composer re-applies ``required_on_load`` algorithms on load by ``eval("algorithms." + repr)`` inside
the ``composer.algorithms`` namespace only, so a third-party algorithm is never found and loading fails with a
KeyError on the old weight names (and our ``Factorize`` would be mistaken for Composer's own ``Factorize``).

Instead of rebuilding the algorithm from its repr, a ``SurgeryAlgorithm`` checkpoint entry records the surgery itself:
each replaced module's name and a weightless (meta-device) copy of its replacement. Before Composer loads the weights,
we put those copies back into the model (``replace_modules``: the same swap and optimizer bookkeeping as the original
surgery), so the weights, optimizer state and RNG load into the architecture they were saved from. Replaying the
record also needs no calibration data and gives the same ranks / trees the original run picked.

The hook wraps ``State._apply_required_algorithms`` (mosaicml 0.32), where Composer does its own re-application.
Loading a checkpoint unpickles the recorded modules, whose classes live in ``algos``, so importing this module (and
with it the hook) happens even if the resuming script never imports ``algos`` itself.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import warnings

import torch
from composer.core import Algorithm, Event, State
from torch import nn

from algos.surgery.algorithm import RECORD_KEY, SurgeryAlgorithm
from algos.surgery.averaging import weight_averages_follow_replay
from algos.surgery.patching import check_signature
from algos.surgery.replace import replace_modules
from algos.surgery.skeleton import materialize, meta_copy
from algos.surgery.targets import SURGERY_MARKER, converted_by

log = logging.getLogger(__name__)

# Key of a checkpoint entry naming, as "module:qualname", a class with ``from_state_dict(entry)`` that rebuilds the
# algorithm (SelfDistillation: settings and teacher) when a resumed run was not given it again.
REBUILD_KEY = "algos_rebuild"


class ReplayedSurgery(Algorithm):
    """Stands in ``state.algorithms`` for a surgery replayed from a checkpoint, so later checkpoints record it too.

    Composer files algorithm states under the class name, so :meth:`named` makes a subclass carrying the original
    algorithm's name: later checkpoints list it as, and ``load_exclude_algorithms`` finds it by, that name.
    """

    @classmethod
    def named(cls, name: str, checkpoint_entry: dict) -> ReplayedSurgery:
        return type(name, (cls,), {"__qualname__": name})(checkpoint_entry)

    def __init__(self, checkpoint_entry: dict):
        self.checkpoint_entry = checkpoint_entry

    def match(self, event: Event, state: State) -> bool:
        return False

    def apply(self, event: Event, state: State, logger) -> None:
        pass

    @staticmethod
    def required_on_load() -> bool:
        return True

    def state_dict(self) -> dict:
        return self.checkpoint_entry

    def __repr__(self) -> str:
        return self.checkpoint_entry["repr"]


def is_surgery_entry(entry) -> bool:
    """A Composer checkpoint's ``(name, state)`` algorithm entry written by a SurgeryAlgorithm."""
    return isinstance(entry, (tuple, list)) and len(entry) == 2 and RECORD_KEY in (entry[1] or {})


def replay_recorded_surgery(state: State, entries: list, exclude_algorithms: list[str] | None = None) -> None:
    """Make ``state.model`` the architecture each recorded surgery produced; the record always wins.

    For each entry, the algorithm passed again under the same name (if any) is its owner:
    * it has not run yet (``apply_at`` or calibration at FIT_START): the record is replayed and the algorithm is
      marked done, so it never recomputes ranks or trees from the resumed model's weights;
    * it ran at INIT and produced the recorded modules: nothing to do;
    * it ran at INIT and produced something else (e.g. ``energy=`` ranks from other initial weights): its modules
      are swapped back for the originals, then the record is replayed.
    Without an owner, the record is replayed and a ``ReplayedSurgery`` stands in for the algorithm.
    """
    owners = [a for a in state.algorithms if isinstance(a, SurgeryAlgorithm)]
    for name, entry in entries:
        if (exclude_algorithms and name in exclude_algorithms) or not entry[RECORD_KEY]:
            continue  # excluded, or an algorithm that changed nothing (e.g. passed again to a resumed run)
        owner = next((a for a in owners if a.name == name), None)
        if owner is not None:
            owners.remove(owner)
            if owner.applied and _same_modules(state.model, owner, entry[RECORD_KEY]):
                continue
            if owner.applied:
                warnings.warn(f"{owner!r} rewrote the model differently from the checkpoint's {entry['repr']}; "
                              f"the checkpoint's surgery is used", stacklevel=2)
                replace_modules(state.model, {fqn: materialize(original, _device_of(state.model.get_submodule(fqn)))
                                              for fqn, original in owner._originals}, state.optimizers)
            owner.adopt(entry[RECORD_KEY])
        replay_record(state.model, entry[RECORD_KEY], entry["repr"], state.optimizers)
        if owner is None:
            state.algorithms.append(ReplayedSurgery.named(name, entry))
        log.info("Replayed %s from the checkpoint on %d modules", entry["repr"], len(entry[RECORD_KEY]))


def replay_record(model: nn.Module, record: list, algorithm: str, optimizers=None, prefix: str = "") -> None:
    """Put each recorded module (fqn, weightless copy) into ``model``, unless the same algorithm's module is
    already there; ``prefix`` is stripped from the recorded names (a record of a Composer model, loaded into the
    network it wraps)."""
    replacements = {}
    for fqn, skeleton in record:
        if not fqn.startswith(prefix):
            continue
        fqn = fqn[len(prefix):]
        module = _get_submodule(model, fqn, algorithm)
        if converted_by(module) != getattr(skeleton, SURGERY_MARKER, None):
            replacements[fqn] = materialize(skeleton, _device_of(module))
    replace_modules(model, replacements, optimizers)


def _same_modules(model: nn.Module, owner: SurgeryAlgorithm, record: list) -> bool:
    """Did ``owner``'s own surgery put exactly the recorded modules (names, types, tensor shapes) in ``model``?"""
    if [fqn for fqn, _ in owner._record] != [fqn for fqn, _ in record]:
        return False
    current = {fqn: model.get_submodule(fqn) for fqn, _ in record}
    return all(type(current[fqn]) is type(skeleton) and _shapes(current[fqn]) == _shapes(skeleton)
               for fqn, skeleton in record)


def _shapes(module: nn.Module) -> dict[str, tuple]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def _get_submodule(model: nn.Module, fqn: str, algorithm: str) -> nn.Module:
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        raise KeyError(f"checkpoint was saved after {algorithm} replaced {fqn!r}, but this model has no module "
                       "of that name; start from the model the checkpointed run started from") from None


def _device_of(module: nn.Module):
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else "cpu"


def load_model(model: nn.Module, checkpoint: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load a Composer checkpoint of a run with surgery into ``model``, outside any Trainer (for serving).

    ``model`` is built as the run's model was before surgery: the Composer model, or the network it wraps (the
    checkpoint's names then carry a prefix such as ``module.`` or ``model.``, found from the names). The recorded
    surgeries are replayed (the same record resume uses: ranks / trees exactly as trained, no calibration), then
    the trained weights load. Returns ``model``, rewritten in place.

    What would load is worked out on a weightless copy first: a file that is not a checkpoint, a checkpoint with none
    of the model's weights, or (``strict=True``) one whose names differ, is a one-line error naming the file, with
    ``model`` unchanged; ``strict=False`` loads what matches and warns, with counts and examples, about the rest.

    The checkpoint holds pickled module skeletons, so it is read with ``torch.load(weights_only=False)``: load only
    files you trust (torch's default ``weights_only=True`` refuses them).
    """
    where = repr(os.fspath(checkpoint))
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"load_model: no checkpoint file {where}") from None
    except Exception as error:  # noqa: BLE001 (torch raises RuntimeError, EOFError, UnpicklingError, ...)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"load_model: {where} is not a readable checkpoint (empty, truncated or not written by "
                         f"torch.save: {reason})") from None
    state = saved.get("state", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"load_model: {where} is not a Composer checkpoint (no state.model)")
    weights = state["model"]
    entries = [entry for entry in state.get("algorithms") or [] if is_surgery_entry(entry)]
    prefix = _checkpoint_prefix(model, weights.keys(), [fqn for _, entry in entries for fqn, _ in entry[RECORD_KEY]])
    weights = {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)}

    skeleton = meta_copy(model)  # the surgery replayed on a weightless copy: what the model will expect
    for _, entry in entries:
        replay_record(skeleton, entry[RECORD_KEY], entry["repr"], prefix=prefix)
    expected = set(skeleton.state_dict())
    missing, unused = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if expected and len(missing) == len(expected):
        raise ValueError(f"load_model: {where} holds none of this model's weights (it has e.g. {unused[0]!r}, the "
                         f"model e.g. {missing[0]!r}); load it into the model its run started from")
    if strict and (missing or unused):
        what = filter(None, [_some(missing, "of the model missing"), _some(unused, "in the checkpoint unused")])
        raise ValueError(f"load_model: {where} does not match this model: {'; '.join(what)}; pass strict=False to "
                         f"load the rest")
    if missing or unused:
        what = filter(None, [_some(missing, "of the model not in the checkpoint"),
                             _some(unused, "in the checkpoint unused")])
        warnings.warn(f"load_model({where}, strict=False) loaded {len(expected) - len(missing)} of {len(expected)} "
                      f"tensors: {'; '.join(what)}", stacklevel=2)
    for _, entry in entries:
        replay_record(model, entry[RECORD_KEY], entry["repr"], prefix=prefix)
    model.load_state_dict(weights, strict=strict)
    return model


def _some(names: list[str], what: str, shown: int = 3) -> str:
    """``'2 tensors of the model missing (a, b)'``, at most ``shown`` names; empty for no names."""
    if not names:
        return ""
    more = f", ... {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)} tensor(s) {what} ({', '.join(names[:shown])}{more})"


def _checkpoint_prefix(model: nn.Module, saved_keys, recorded: list[str]) -> str:
    """The prefix of the checkpoint's names that ``model``'s own names lack ("" for the Composer model itself)."""
    own = set(model.state_dict())
    modules = {fqn for fqn, _ in model.named_modules()}
    candidates = {""} | {key.split(".", 1)[0] + "." for key in saved_keys if "." in key}

    def fit(prefix: str) -> tuple[int, int]:  # recorded modules found first (the model before surgery), then names
        found = sum(fqn.startswith(prefix) and fqn[len(prefix):] in modules for fqn in recorded)
        return found, sum(key.startswith(prefix) and key[len(prefix):] in own for key in saved_keys)

    return max(sorted(candidates), key=fit)


def rebuild_missing_algorithms(state: State, entries: list, exclude_algorithms: list[str] | None = None) -> None:
    """Append to ``state.algorithms`` each checkpointed algorithm with a ``REBUILD_KEY`` that the resumed run was
    not given again (by class name); Composer then loads its state into it like any other algorithm's."""
    present = {type(algorithm).__qualname__ for algorithm in state.algorithms}
    for name, entry in entries:
        if not isinstance(entry, dict) or REBUILD_KEY not in entry or name in present:
            continue
        if exclude_algorithms and name in exclude_algorithms:
            continue
        module, qualname = entry[REBUILD_KEY].split(":")
        algorithm = getattr(importlib.import_module(module), qualname).from_state_dict(entry)
        state.algorithms.append(algorithm)
        present.add(name)
        log.info("Rebuilt %s from the checkpoint", entry["repr"])


def install() -> None:
    """Wrap Composer's re-application of required algorithms so it replays our recorded surgeries first."""
    original = State._apply_required_algorithms
    if getattr(original, "replays_surgery", False):
        return
    check_signature(original, "State._apply_required_algorithms",
                    ("self", "state_dict", "logger", "exclude_algorithms", "algorithm_passes"))

    def _apply_required_algorithms(self, state_dict, logger, exclude_algorithms=None, algorithm_passes=None):
        entries = state_dict.get("algorithms")
        if isinstance(entries, list):
            rebuild_missing_algorithms(self, entries, exclude_algorithms)
        if isinstance(entries, list) and any(is_surgery_entry(entry) for entry in entries):
            replay_recorded_surgery(self, [e for e in entries if is_surgery_entry(e)], exclude_algorithms)
            weight_averages_follow_replay(self)  # EMA / SWA copies made at INIT take the replayed architecture
            # Composer must not try its eval-by-name on our entries.
            state_dict = {**state_dict, "algorithms": [e for e in entries if not is_surgery_entry(e)]}
        return original(self, state_dict, logger, exclude_algorithms, algorithm_passes)

    _apply_required_algorithms.replays_surgery = True
    State._apply_required_algorithms = _apply_required_algorithms


install()
