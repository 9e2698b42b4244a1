"""The private Composer functions ``algos`` wraps, checked before wrapping: ``State._apply_required_algorithms``
(checkpoint resume replays the recorded surgeries: ``algos.surgery.resume``) and
``composer.utils.checkpoint._write_checkpoint_file`` (checkpoints written whole or not at all:
``algos.surgery.checkpoint_files``). Composer offers no public hook for either. If a Composer release changes one,
``import algos`` fails in one line naming the version and the function, rather than misbehaving in a later run."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import composer


def check_signature(function: Callable, name: str, expected: tuple[str, ...]) -> None:
    """``function``'s parameters must be ``expected`` (those of mosaicml 0.32), or an ImportError says what changed."""
    found = tuple(inspect.signature(function).parameters)
    if found != expected:
        raise ImportError(f"algos wraps Composer's private {name}({', '.join(expected)}), but mosaicml "
                          f"{composer.__version__} has {name}({', '.join(found)}); install mosaicml>=0.32.1,<0.33, "
                          f"the versions algos is tested with")
