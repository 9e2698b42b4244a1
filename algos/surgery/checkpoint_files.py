"""Checkpoint files that appear whole or not at all.

Composer writes a checkpoint straight under its final name (``composer.utils.checkpoint._write_checkpoint_file``),
so a Ctrl-C or a kill during the write leaves a truncated file there, and a resumed run then stops in Composer's
``FileExistsError ... may conflict with a future checkpoint``. Composer has no setting for an atomic write, so
:func:`install` wraps that one function: the file is written under a hidden temporary name in the same folder and
renamed into place (``os.replace``: atomic on one file system) only once it is complete. ``import algos`` installs
it (next to the resume hook, ``algos.surgery.resume``), for every Trainer in the process.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from composer.utils import checkpoint as composer_checkpoint

from algos.surgery.patching import check_signature

PARTIAL_PREFIX = ".partial-"  # a checkpoint being written: hidden, and never matched by Composer's name patterns


def install() -> None:
    """Make Composer write every checkpoint file to a temporary name and rename it into place when complete."""
    original = composer_checkpoint._write_checkpoint_file
    if getattr(original, "atomic", False):
        return
    check_signature(original, "composer.utils.checkpoint._write_checkpoint_file", ("state_dict", "filename"))

    def _write_checkpoint_file(state_dict, filename: str) -> None:
        folder, name = os.path.split(filename)
        partial = os.path.join(folder, f"{PARTIAL_PREFIX}{os.getpid()}-{name}")  # same suffix: same compression
        try:
            original(state_dict, partial)
            os.replace(partial, filename)
        except BaseException as error:
            if os.path.exists(partial):
                os.remove(partial)
            if _interrupted(error):  # torch's zip writer turns a Ctrl-C inside torch.save into its own RuntimeError
                raise KeyboardInterrupt(f"interrupted while saving {name}; it was not written") from None
            raise

    _write_checkpoint_file.atomic = True
    composer_checkpoint._write_checkpoint_file = _write_checkpoint_file


def _interrupted(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return True
        error = error.__cause__ or error.__context__
    return False


def is_whole(path: Path) -> bool:
    """Is ``path`` a complete checkpoint? torch.save writes a zip archive whose directory comes last, so a truncated
    ``.pt`` file has none; other formats (``.tar``, compressed) are taken as whole."""
    if path.suffix != ".pt":
        return path.is_file()
    return path.is_file() and zipfile.is_zipfile(path)
