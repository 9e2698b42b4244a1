"""``algos run``: a merged config -> a Composer Trainer -> a run directory with the resolved config, checkpoints,
logs, the surgery reports and a summary. One job per module: ``build`` (config -> checked components), ``trainer``
(the Trainer and its errors), ``stats`` (the throughput callback), ``summary``, ``rundir`` / ``checkpoints`` (the
directory transaction); ``inspection`` is ``algos inspect``.

Everything a config names is built and checked (registries, algorithm targets, Composer time strings, the run
directory) before anything is written. The run directory is locked for the whole run and holds the marker file
``.algos-run``; ``run.overwrite=true`` replaces only such a directory, and a run that ends before its first checkpoint
(a failed start, an error, Ctrl-C) leaves nothing behind: the directory it made goes, the run it replaced comes back
(``algos.run.rundir``). Checkpoints appear whole or not at all, and ``run.resume=true`` continues the run in
``run.dir`` from its newest whole checkpoint (``algos.run.checkpoints``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from composer import Trainer
from composer.utils import dist
from omegaconf import DictConfig, OmegaConf

from algos.run import checkpoints, rundir
from algos.run.build import Built, build
from algos.run.registry import ConfigError
from algos.run.stats import RunStats
from algos.run.summary import format_summary, summarize
from algos.run.trainer import build_trainer, raised_by_composer

MARKER = rundir.MARKER


def latest_checkpoint(built: Built) -> Path:
    """Where Composer keeps (a link to) the run's latest checkpoint of rank 0, which ``run.resume=true`` loads."""
    return checkpoints.latest_link(built.run_dir / "checkpoints", built.name,
                                   built.trainer_kwargs.get("save_latest_filename"))


def check_run_dir(built: Built) -> None:
    """May this run use its run.dir? (``algos.run.rundir.check_run_dir``; before anything is written.)"""
    rundir.check_run_dir(built.run_dir, overwrite=built.overwrite, resume=built.resume,
                         latest=latest_checkpoint(built), load_path=built.trainer_kwargs.get("load_path"))


def run(config: DictConfig, *, quiet: bool = False, show_config: bool = False) -> dict:
    """Train the configured run (or, ``run.resume=true``, continue it); returns (and writes to
    ``<run dir>/summary.json``) the summary. ``show_config`` prints the resolved config first."""
    built = build(config)
    rank_zero = dist.get_global_rank() == 0
    stats = RunStats(built.algorithms)
    kwargs = {**built.trainer_kwargs, "callbacks": [*built.trainer_kwargs["callbacks"], stats],
              "save_folder": str(built.run_dir / "checkpoints"), "save_overwrite": built.overwrite,
              "autoresume": built.resume}
    with rundir.run_lock(built.run_dir):
        if rank_zero:
            if built.resume:
                for change in checkpoints.tidy_for_resume(built.run_dir / "checkpoints", built.name,
                                                          kwargs.get("save_filename"),
                                                          kwargs.get("save_latest_filename")):
                    print(f"run.resume=true: {change}", file=sys.stderr)
            check_run_dir(built)
        if rank_zero and show_config:
            print(OmegaConf.to_yaml(config, resolve=True))
        if rank_zero and not quiet:
            what = f"resuming {built.name!r} from {latest_checkpoint(built)}" if built.resume else f"run {built.name!r}"
            print(f"{what} -> {built.run_dir}/ (resolved config in config.yaml)")
        saved = _checkpoint_saved(built)
        with rundir.run_directory(built.run_dir, name=built.name, overwrite=built.overwrite, resume=built.resume,
                                  keep=saved) as intact:
            trainer = build_trainer(built, kwargs)
            if rank_zero:
                OmegaConf.save(config, built.run_dir / "config.yaml", resolve=True)
            try:
                trainer.fit()
            except BaseException as error:  # Ctrl-C, an error: kept if there is a checkpoint to resume from
                trainer.close()
                _stopped(built, trainer, error, saved() if rank_zero else True, quiet)
                raise
            summary = summarize(built, trainer, stats)
            trainer.close()  # loggers finish writing (the wandb run directory) before anyone reads them
            if rank_zero:
                if not intact():
                    raise RuntimeError(f"run {built.name!r}: {built.run_dir} was removed or replaced during the run "
                                       f"(not by algos run, which locks it); this run's output is lost")
                (built.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
                (built.run_dir / "surgery_report.txt").write_text("\n\n".join(summary["surgery_tables"]) + "\n")
    if rank_zero and not quiet:
        print(format_summary(summary))
    return summary


def _checkpoint_saved(built: Built):
    """A function telling whether this run has saved a checkpoint since now (the latest one changed)."""
    latest = latest_checkpoint(built)
    start = latest.resolve() if latest.exists() else None
    return lambda: latest.exists() and latest.resolve() != start


def _stopped(built: Built, trainer: Trainer, error: BaseException, saved: bool, quiet: bool) -> None:
    """Say how the run ended early: how to continue it from its latest checkpoint, or, with none saved by this run,
    that nothing of it is kept (and a Composer check that only fires once training starts becomes a one-line
    ConfigError naming the trainer key, without the resume hint)."""
    batch = int(trainer.state.timestamp.batch)
    if built.resume:
        kept = "the run is as it was before this attempt"
    else:
        kept = "the run it was to replace is back" if built.overwrite else "its run directory is removed"
    if not saved and isinstance(error, (ValueError, TypeError)) and raised_by_composer(error):
        raise ConfigError(f"trainer: {str(error).splitlines()[0]} (found at batch {batch}, before a checkpoint: "
                          f"{kept})") from None
    if dist.get_global_rank() != 0 or quiet:
        return
    if saved or built.resume:
        print(f"\nrun {built.name!r} stopped at batch {batch}; to continue it from its latest checkpoint, run the "
              f"same command with run.resume=true", file=sys.stderr)
    else:
        print(f"\nrun {built.name!r} stopped at batch {batch}, before its first checkpoint: nothing to resume, "
              f"{kept}", file=sys.stderr)
