"""A merged config -> everything a run needs (``Built``), checked before anything is written or trained: the run
section, the registries' components, the algorithms' targets in the model (their plans), the Trainer keys and
Composer time strings."""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from composer import Trainer
from composer.core import DataSpec, Time, TimeUnit
from composer.models import HuggingFaceModel
from composer.utils import reproducibility
from omegaconf import DictConfig, OmegaConf

from algos.run.components import ALGORITHMS, CALLBACKS, LOGGERS, OPTIMIZERS, SCHEDULERS
from algos.run.data import DATA
from algos.run.models import MODELS, token_counter
from algos.run.registry import ConfigError, check_kwargs
from algos.surgery import SurgeryAlgorithm, SurgeryError
from algos.surgery.checkpoint_files import is_whole

GENERATE_TOKENS = 32  # run.generate_tokens' default
RUN_KEYS = {"name": "run name (default: the YAML file names joined by '+')",
            "dir": "run directory (default: runs/<name>)",
            "overwrite": "replace an existing run directory made by algos run (default: false)",
            "resume": "continue the run in run.dir from its latest checkpoint (default: false)",
            "seed": "random seed for model init, data order and training (default: 0)",
            "device": "cpu, gpu or auto (default: auto)",
            "generate_tokens": "generative models: new tokens per timed generate call after training, for the "
                               f"summary's generation latency per token (default: {GENERATE_TOKENS}; 0: skip)"}
# Trainer arguments the runner fills in from the other sections.
RUNNER_OWNS = ("model", "train_dataloader", "eval_dataloader", "optimizers", "schedulers", "algorithms", "loggers",
               "callbacks", "run_name", "seed", "device", "save_folder", "save_overwrite")


@dataclass
class Built:
    """Everything a run needs, built from a config and checked, before the Trainer exists."""

    name: str
    run_dir: Path
    overwrite: bool
    model: torch.nn.Module
    train: torch.utils.data.DataLoader
    eval: torch.utils.data.DataLoader
    algorithms: list
    algorithm_keys: list = field(default_factory=list)  # their config keys, in the same order
    trainer_kwargs: dict = field(default_factory=dict)
    plans: dict = field(default_factory=dict)  # algorithm config key -> names of the modules it will rewrite
    generate_tokens: int = GENERATE_TOKENS
    resume: bool = False


def _section(config: dict, key: str) -> dict:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return dict(value)


def _named(config: dict, key: str, required: bool = True) -> tuple[str | None, dict]:
    spec = _section(config, key)
    if "name" not in spec:
        if required:
            raise ConfigError(f"{key}.name is missing: say which {key} to build")
        if spec:
            raise ConfigError(f"{key}: keys {', '.join(spec)} given without {key}.name")
        return None, {}
    return spec.pop("name"), spec


def build(config: DictConfig, *, for_training: bool = True) -> Built:
    """Build model, data, optimizer, scheduler, algorithms (and, ``for_training``, loggers and callbacks) from the
    config; check the algorithms' targets in the model and the Trainer keys. Nothing is trained or written."""
    plain = OmegaConf.to_container(config, resolve=True)
    run = _section(plain, "run")
    unknown = [key for key in run if key not in RUN_KEYS]
    if unknown:
        raise ConfigError(f"run: unknown key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(RUN_KEYS)}")
    name = str(run.get("name") or "run")
    if not run.get("dir") and (name in (".", "..") or "/" in name or "\\" in name):
        raise ConfigError(f"run.name={name!r}: a run name is a folder inside runs/, without '/' or '..'; to write "
                          f"the run elsewhere set run.dir")
    run_dir = Path(run.get("dir") or Path("runs") / name)
    seed = run.get("seed", 0)
    device = run.get("device", "auto")
    if device not in ("cpu", "gpu", "auto"):
        raise ConfigError(f"run.device={device!r}; valid: cpu, gpu, auto")
    overwrite, resume = (_flag(run, key) for key in ("overwrite", "resume"))
    if overwrite and resume:
        raise ConfigError("run.overwrite and run.resume are alternatives: overwrite replaces run.dir with a new run, "
                          "resume continues the run in it")
    reproducibility.seed_all(seed)

    model_name, model_kwargs = _named(plain, "model")
    model = MODELS.build(model_name, model_kwargs, "model")
    data_name, data_kwargs = _named(plain, "data")
    train, evaluation = DATA.build(data_name, data_kwargs, "data", spec=model.input_spec)
    tokenizer = getattr(train, "tokenizer", None)
    if tokenizer is not None and isinstance(model, HuggingFaceModel) and model.tokenizer is None:
        # the tokenizer the data made the rows with (for text_mlm and friends, one trained on the text) is part of
        # what the run learns: Composer saves a HuggingFaceModel's tokenizer in every checkpoint, export writes it
        model.tokenizer = tokenizer
    optimizer_name, optimizer_kwargs = _named(plain, "optimizer")
    optimizer = OPTIMIZERS.build(optimizer_name, optimizer_kwargs, "optimizer", params=model.parameters())
    scheduler_name, scheduler_kwargs = _named(plain, "scheduler", required=False)
    schedulers = [SCHEDULERS.build(scheduler_name, scheduler_kwargs, "scheduler")] if scheduler_name else []

    algorithms, plans = [], {}
    for key, kwargs in _section(plain, "algorithms").items():
        kwargs = dict(kwargs or {})
        if "strict" in inspect.signature(ALGORITHMS.get(key, "algorithms")).parameters:
            kwargs.setdefault("strict", True)  # a recipe that rewrites nothing is an error, not a warning
        algorithm = ALGORITHMS.build(key, kwargs, f"algorithms.{key}")
        if isinstance(algorithm, SurgeryAlgorithm):
            plans[key] = _plan(algorithm, model, key, model_name)
        elif hasattr(algorithm, "check_model"):  # SelfDistillation: its layers= against the model before surgery
            try:
                algorithm.check_model(model)
            except ValueError as error:
                raise ConfigError(f"algorithms.{key}: {str(error).splitlines()[0]}") from None
        algorithms.append(algorithm)

    trainer = _section(plain, "trainer")
    owned = [key for key in trainer if key in RUNNER_OWNS]
    if owned:
        raise ConfigError(f"trainer: {', '.join(owned)} set by the runner from the other sections (run, model, "
                          f"data, optimizer, scheduler, algorithms, loggers, callbacks)")
    if "autoresume" in trainer:
        raise ConfigError("trainer.autoresume: the runner resumes with run.resume=true (Composer's autoresume from "
                          "run.dir's latest checkpoint); remove trainer.autoresume")
    check_kwargs(Trainer.__init__, trainer, "trainer", reserved=RUNNER_OWNS)  # with the time strings
    _check_duration(trainer)
    load_path = trainer.get("load_path")
    if load_path and "://" not in load_path and not Path(load_path).is_file():
        raise ConfigError(f"trainer.load_path={load_path!r}: no such checkpoint file")
    if load_path and "://" not in load_path and not is_whole(Path(load_path)):
        raise ConfigError(f"trainer.load_path={load_path!r} is truncated or not a checkpoint (no complete torch file)")
    built = Built(name, run_dir, overwrite, model, train, evaluation, algorithms,
                  algorithm_keys=list(_section(plain, "algorithms")), plans=plans, resume=resume)
    generate_tokens = run.get("generate_tokens", GENERATE_TOKENS)
    if isinstance(generate_tokens, bool) or not isinstance(generate_tokens, int) or generate_tokens < 0:
        raise ConfigError(f"run.generate_tokens={generate_tokens!r}; expected an int >= 0")
    built.generate_tokens = generate_tokens
    built.trainer_kwargs = dict(
        model=model, train_dataloader=DataSpec(train, get_num_tokens_in_batch=token_counter(model.input_spec)),
        eval_dataloader=evaluation, optimizers=optimizer,
        schedulers=schedulers, algorithms=algorithms, run_name=name, seed=seed,
        device=None if device == "auto" else device, **trainer)
    if for_training:
        built.trainer_kwargs["loggers"] = [
            LOGGERS.build(key, kwargs or {}, f"loggers.{key}", run_dir=str(run_dir), run_name=name)
            for key, kwargs in _section(plain, "loggers").items()]
        built.trainer_kwargs["callbacks"] = [
            CALLBACKS.build(key, kwargs or {}, f"callbacks.{key}") for key, kwargs in
            _section(plain, "callbacks").items()]
    return built


def _check_duration(trainer: dict) -> None:
    """trainer.max_duration must be more than nothing (Composer finds out only when training starts)."""
    duration = trainer.get("max_duration")
    if duration is None or isinstance(duration, bool):
        return
    value = Time.from_input(duration, TimeUnit.EPOCH).value  # check_kwargs: a valid time
    if value <= 0:
        raise ConfigError(f"trainer.max_duration={duration!r}: no training would happen; give a duration above 0, "
                          f"e.g. 2ep or 100ba")


def _flag(run: dict, key: str) -> bool:
    value = run.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"run.{key}={value!r}; expected true or false")
    return value


def _plan(algorithm: SurgeryAlgorithm, model: torch.nn.Module, key: str, model_name: str) -> list[str]:
    """The modules ``algorithm`` will rewrite; an error when there are none (a recipe that does not fit the model)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-target warning: we raise instead
        try:
            targets, skipped = algorithm.plan(model)
        except SurgeryError as error:
            raise ConfigError(f"algorithms.{key}: {str(error).splitlines()[0]}") from None
    if not targets:
        why = f"; skipped: {skipped[0].fqn} ({skipped[0].reason})" if skipped else ""
        raise ConfigError(f"algorithms.{key}: {algorithm.name} finds nothing to rewrite in model {model_name!r}"
                          f"{why}; remove it or change its target_modules")
    return targets


def default_name(paths: list[str]) -> str:
    """``yamls/digits_mlp.yaml recipes/fff.yaml`` -> ``digits_mlp+fff``."""
    return "+".join(Path(p).stem for p in paths)
