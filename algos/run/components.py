"""Registries for the rest of a run: optimizers, schedulers, algorithms, loggers, callbacks.

Composer's own classes are registered by their snake_case names (``DecoupledAdamW`` -> ``decoupled_adamw``,
``CosineAnnealingWithWarmupScheduler`` -> ``cosine_annealing_with_warmup``, ``LabelSmoothing`` -> ``label_smoothing``),
so a YAML can name anything Composer ships; the YAML's keys are the class's keyword arguments.
"""

from __future__ import annotations

import os
import re

import composer.algorithms
import composer.callbacks
import composer.optim
import torch
from composer.core import Algorithm
from composer.loggers import ConsoleLogger, FileLogger, WandBLogger

import algos  # noqa: F401  (every algorithm of the suite registers its YAML name on import)
from algos.run.registry import Registry
from algos.surgery.yaml_names import YAML_NAMES

OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")
ALGORITHMS = Registry("algorithm")
LOGGERS = Registry("logger")
CALLBACKS = Registry("callback")


def snake_case(name: str) -> str:
    """``DecoupledAdamW`` -> ``decoupled_adamw``, ``EMA`` -> ``ema``, ``LRMonitor`` -> ``lr_monitor``."""
    name = name.replace("AdamW", "Adamw").replace("SGDW", "Sgdw")
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


for _name in ("DecoupledAdamW", "DecoupledSGDW"):
    OPTIMIZERS.register(snake_case(_name), getattr(composer.optim, _name))
for _name in ("Adam", "AdamW", "SGD"):
    OPTIMIZERS.register(_name.lower(), getattr(torch.optim, _name))

for _name in composer.optim.__all__:
    if _name.endswith("Scheduler") and _name != "ComposerScheduler":
        SCHEDULERS.register(snake_case(_name[: -len("Scheduler")]), getattr(composer.optim, _name))

# Ours first, under the names their packages declare (@yaml_name; importing algos imports them all); Composer's
# own Factorize (which re-initialises the factors) stays reachable as composer_factorize.
for _name, _class in YAML_NAMES.items():
    ALGORITHMS.register(_name, _class)
for _name in composer.algorithms.__all__:
    _class = getattr(composer.algorithms, _name)
    if isinstance(_class, type) and issubclass(_class, Algorithm):
        key = snake_case(_name)
        ALGORITHMS.register(f"composer_{key}" if key in ALGORITHMS else key, _class)

_CALLBACKS = ("SpeedMonitor", "MemoryMonitor", "LRMonitor", "OptimizerMonitor", "CheckpointSaver", "EarlyStopper",
              "ThresholdStopper", "RuntimeEstimator", "ActivationMonitor", "SystemMetricsMonitor")
for _name in _CALLBACKS:
    CALLBACKS.register(snake_case(_name), getattr(composer.callbacks, _name))


@LOGGERS.register("wandb")
def wandb_logger(*, run_dir: str, run_name: str, project: str = "composer-surgery-algos", entity: str | None = None,
                 group: str | None = None, tags: list[str] | None = None, mode: str | None = None) -> WandBLogger:
    """Weights & Biases, writing under the run directory. ``mode`` None: ``$WANDB_MODE`` if set, else online when
    an API key is configured (``$WANDB_API_KEY`` or ``wandb login``), else offline (sync later with
    ``wandb sync``)."""
    mode = mode or os.environ.get("WANDB_MODE") or ("online" if _wandb_api_key() else "offline")
    # absolute: wandb's service process resolves a relative dir against its own working directory, which is the
    # one its first run in this process had
    init = {"mode": mode, "dir": os.path.abspath(run_dir)}
    if mode == "offline":
        # wandb 0.18 otherwise asks the server for its version when a table (the surgery report) is logged
        # offline, and retries for minutes without a network.
        init["settings"] = {"allow_offline_artifacts": False}
    return WandBLogger(project=project, entity=entity, group=group, name=run_name, tags=list(tags or []),
                       init_kwargs=init)


def _wandb_api_key() -> str | None:
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    try:
        import wandb

        return wandb.Api().api_key if os.path.exists(os.path.expanduser("~/.netrc")) else None
    except Exception:  # no key configured, or wandb cannot read its settings: offline
        return None


@LOGGERS.register("file")
def file_logger(*, run_dir: str, run_name: str, filename: str = "logs-rank{rank}.txt",
                capture_stdout: bool = False) -> FileLogger:
    """Composer's FileLogger: every logged metric as text in the run directory. ``capture_stdout`` (off by default)
    copies the console too, by replacing ``sys.stdout.write`` process-wide without ever restoring it: after that
    run, later output in the same process (the next run of ``algos compare``) goes to a closed log file."""
    return FileLogger(filename=os.path.join(run_dir, filename), capture_stdout=capture_stdout,
                      capture_stderr=capture_stdout)


@LOGGERS.register("console")
def console_logger(*, run_dir: str, run_name: str, log_interval: str = "1ep") -> ConsoleLogger:
    """Composer's ConsoleLogger: metrics printed every ``log_interval``."""
    return ConsoleLogger(log_interval=log_interval)
