"""A resume that starts from the last whole checkpoint (checkpoints are written whole or not at all:
``algos.surgery.checkpoint_files``).

:func:`tidy_for_resume` makes a run directory resumable after any interruption: leftover temporary files go, a
truncated checkpoint from before this fix is moved aside, and ``latest`` points at the newest whole checkpoint (an
interruption between the rename and Composer's update of the link leaves it one behind, or missing).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from composer.utils import format_name_with_dist

from algos.surgery.checkpoint_files import PARTIAL_PREFIX, is_whole

DEFAULT_FILENAME = "ep{epoch}-ba{batch}-rank{rank}.pt"  # Composer's default save_filename
DEFAULT_LATEST = "latest-rank{rank}.pt"


def latest_link(folder: Path, run_name: str, latest_filename: str | None) -> Path:
    """Where Composer keeps (a link to) the latest checkpoint of rank 0."""
    return folder / format_name_with_dist(latest_filename or DEFAULT_LATEST, run_name)


def tidy_for_resume(folder: Path, run_name: str, filename: str | None, latest_filename: str | None) -> list[str]:
    """Make ``folder`` resume from its newest whole checkpoint of rank 0; returns what was changed, one line each.

    Only for the file names the runner can read back (Composer's ``ep{epoch}-ba{batch}-rank{rank}`` template or
    another with ``{epoch}`` / ``{batch}`` and nothing else to fill in); other templates are left alone.
    """
    if not folder.is_dir():
        return []
    done = []
    for leftover in folder.glob(f"{PARTIAL_PREFIX}*"):
        leftover.unlink()
        done.append(f"removed {leftover.name}, a checkpoint whose writing was interrupted")
    pattern = _name_pattern(filename or DEFAULT_FILENAME)
    if pattern is None:
        return done
    saved = sorted((tuple(int(v) for v in match.groups()), path) for path in folder.iterdir()
                   if (match := pattern.fullmatch(path.name)) and path.is_file() and not path.is_symlink())
    while saved and not is_whole(saved[-1][1]):
        _, broken = saved.pop()
        aside = broken.with_name(f".incomplete-{broken.name}")
        broken.rename(aside)
        done.append(f"moved the truncated checkpoint {broken.name} aside to {aside.name}")
    link = latest_link(folder, run_name, latest_filename)
    if saved and (not link.exists() or link.resolve() != saved[-1][1].resolve()):
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(saved[-1][1], link.parent))
        done.append(f"{link.name} now points to {saved[-1][1].name}, the newest whole checkpoint")
    return done


def _name_pattern(template: str) -> re.Pattern | None:
    """A regex with one group per time unit for rank 0's files of ``template``, or None if it cannot be read back."""
    template = template.replace("{rank}", "0")
    units = re.findall(r"\{(\w+)\}", template)
    if not units or not set(units) <= {"epoch", "batch"}:
        return None
    parts = re.split(r"\{(epoch|batch)\}", template)  # text, unit, text, unit, ..., text
    return re.compile("".join(r"(\d+)" if index % 2 else re.escape(part) for index, part in enumerate(parts)))
