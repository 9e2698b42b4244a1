"""The run directory: who may use it (a lock for the whole run), whether this run may use it (checked before
anything is written), and a transaction around the run (undone when the run ends with nothing to resume).

A run directory holds the marker file ``.algos-run``; ``run.overwrite=true`` replaces only such a directory, and
the run it replaces is put back if the new run ends before its first checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from composer.utils import dist

from algos.run.registry import ConfigError

# Written into every run directory algos run creates: run.overwrite=true replaces no directory without it.
MARKER = ".algos-run"


@contextlib.contextmanager
def run_lock(run_dir: Path, label: str = "run.dir") -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` for the block: a second ``algos run`` (or ``compare``) into the same
    directory is refused in one line naming the holder, instead of both writing into it.

    Why by hand: no library in our dependencies locks a path for the life of a process. The lock is ``flock`` on a
    hidden file beside the directory (the directory itself is renamed by ``run.overwrite=true``); the kernel
    releases it when the holder exits, even on a kill. The holder deletes the file when done, so an acquirer checks
    that the file it locked is still the one at the path, and tries again if not. Only rank 0 takes it.
    """
    if dist.get_global_rank() != 0:
        yield
        return
    path = run_dir.absolute().parent / f".{run_dir.name}.lock"
    created = _topmost_missing(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(descriptor)
            other = "another --out" if label == "--out" else "another run.name / run.dir"
            raise ConfigError(f"{label} {str(run_dir)!r} is in use by another algos run ({holder}); wait for it to "
                              f"finish or pick {other}") from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(descriptor).st_ino == os.stat(path).st_ino:
                break
        os.close(descriptor)  # its holder removed the file as we opened it: lock the new one
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}".encode())
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(descriptor)
        if created:  # parents made only for the lock go with it, unless the run put something there
            for folder in [path.parent, *path.parent.parents]:
                if folder == created.parent or any(folder.iterdir()):
                    break
                folder.rmdir()


def check_run_dir(run_dir: Path, *, overwrite: bool, resume: bool, latest: Path, load_path: str | None) -> None:
    """Refuse, before anything is written, a run.dir this run may not use: a new run needs it missing or empty (or
    run.overwrite=true, which replaces only a directory holding MARKER, never one holding the checkpoint to load);
    run.resume=true needs the ``latest`` checkpoint."""
    where = f"run.dir {str(run_dir)!r}"
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{where} is a file, not a directory")
    if resume:
        if not run_dir.is_dir():
            raise ConfigError(f"run.resume=true: {where} does not exist; nothing to resume")
        if not latest.exists():
            raise ConfigError(f"run.resume=true: no checkpoint to resume from ({str(latest)!r} does not exist; "
                              f"a run saves one every trainer.save_interval)")
        return
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"{where} already exists; set run.overwrite=true to replace it or run.resume=true to "
                          f"continue it, or pick another run.name / run.dir")
    if not (run_dir / MARKER).is_file():
        raise ConfigError(f"{where} was not made by algos run (it has no {MARKER} file), so run.overwrite=true will "
                          f"not delete it; pick another run.name / run.dir")
    if load_path and "://" not in load_path and Path(load_path).resolve().is_relative_to(run_dir.resolve()):
        raise ConfigError(f"trainer.load_path={load_path!r} is inside {where}, which run.overwrite=true would "
                          f"replace; to continue that run use run.resume=true instead")


@contextlib.contextmanager
def run_directory(run_dir: Path, *, name: str, overwrite: bool, resume: bool,
                  keep: Callable[[], bool]) -> Iterator[Callable[[], bool]]:
    """Make run.dir ready for the block (creating it with MARKER, or moving the run it replaces aside). If the block
    raises and ``keep()`` is false (nothing to resume from), remove what this call created and put the replaced run
    back; else the new run stays and the replaced one is deleted. Yields ``intact()``: is run.dir still the
    directory this call prepared (not removed or replaced behind the lock's back)? Only rank 0 touches the disk."""
    if dist.get_global_rank() != 0:
        yield lambda: True
        return
    aside = None
    if overwrite and run_dir.is_dir() and any(run_dir.iterdir()):  # check_run_dir: made by algos run
        aside = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.replaced-", dir=run_dir.parent))
        run_dir.rename(aside / run_dir.name)
    created = _topmost_missing(run_dir)
    before = set() if created else set(run_dir.rglob("*"))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            (run_dir / MARKER).write_text(f"{name}\n")
        identity = _identity(run_dir)
        yield lambda: run_dir.is_dir() and _identity(run_dir) == identity and (run_dir / MARKER).is_file()
    except BaseException:
        if not keep():
            if created:
                shutil.rmtree(created, ignore_errors=True)
            else:
                _remove_new(run_dir, before)
            if aside:
                (aside / run_dir.name).rename(run_dir)
                aside.rmdir()
                aside = None
        raise
    finally:
        if aside:
            shutil.rmtree(aside)


def _identity(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino


def _topmost_missing(path: Path) -> Path | None:
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


def _remove_new(folder: Path, before: set[Path]) -> None:
    """Delete what is in ``folder`` now but was not ``before``."""
    new = set(folder.rglob("*")) - before
    for path in sorted(new):
        if path.parent in new:
            continue  # went with its folder
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
