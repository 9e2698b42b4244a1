"""A merged config -> a Composer Trainer -> a run directory with the resolved config, checkpoints, logs, the surgery
reports and a summary (``algos run``); the same build without training prints the surgery reports (``algos inspect``).

Everything a config names is built and checked (registries, algorithm targets, Composer time strings, the run
directory) before anything is written. The run directory is locked for the whole run and holds the marker file
``.algos-run``; ``run.overwrite=true`` replaces only such a directory, and a run that ends before its first checkpoint
(a failed start, an error, Ctrl-C) leaves nothing behind: the directory it made goes, the run it replaced comes back
(``algos.run.rundir``). Checkpoints appear whole or not at all, and ``run.resume=true`` continues the run in
``run.dir`` from its newest whole checkpoint (``algos.run.checkpoints``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import resource
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from composer import Trainer
from composer.core import Callback, DataSpec, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist, reproducibility
from omegaconf import DictConfig, OmegaConf
from tabulate import tabulate

from algos.run import checkpoints, rundir
from algos.run.components import ALGORITHMS, CALLBACKS, LOGGERS, OPTIMIZERS, SCHEDULERS
from algos.run.data import DATA
from algos.run.models import GENERATIVE_TASKS, MODELS, PAD_ID, token_counter
from algos.run.registry import ConfigError, check_kwargs
from algos.surgery import SurgeryAlgorithm, SurgeryError
from algos.surgery.checkpoint_files import is_whole
from algos.surgery.report import measure_macs

RUN_KEYS = {"name": "run name (default: the YAML file names joined by '+')",
            "dir": "run directory (default: runs/<name>)",
            "overwrite": "replace an existing run directory made by algos run (default: false)",
            "resume": "continue the run in run.dir from its latest checkpoint (default: false)",
            "seed": "random seed for model init, data order and training (default: 0)",
            "device": "cpu, gpu or auto (default: auto)",
            "generate_tokens": "generative models: new tokens per timed generate call after training, for the "
                               "summary's generation latency per token (default: 32; 0: skip)"}
# Trainer arguments the runner fills in from the other sections.
RUNNER_OWNS = ("model", "train_dataloader", "eval_dataloader", "optimizers", "schedulers", "algorithms", "loggers",
               "callbacks", "run_name", "seed", "device", "save_folder", "save_overwrite")
MARKER = rundir.MARKER


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
    generate_tokens: int = 32
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
    generate_tokens = run.get("generate_tokens", 32)
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


# ----------------------------------------------------------------------------------------------------- run
class RunStats(Callback):
    """Training throughput of the final architecture (batches after every surgery in ``algorithms`` has happened,
    the first of them left out as warm-up), the train loss per batch, and the eval metrics after every
    evaluation, for the summary and the ``compare`` plot."""

    def __init__(self, algorithms=()):
        self.surgeries = [a for a in algorithms if isinstance(a, SurgeryAlgorithm)]
        self.warm = False
        self.counting = False
        self.batch_seconds = 0.0
        self.samples = 0
        self.tokens = 0
        self.losses: list[tuple[int, float]] = []
        self.evals: list[tuple[int, dict[str, float]]] = []
        # training wall-clock seconds (Composer's total_wct: evaluation excluded) at each loss and each eval
        self.loss_seconds: list[float] = []
        self.eval_seconds: list[float] = []
        self._started = 0.0
        self._counts = (0, 0)
        self._restored_reports: list[list[tuple[str, dict]]] = [[] for _ in self.surgeries]

    def batch_start(self, state: State, logger: Logger) -> None:
        final = all(a.applied for a in self.surgeries)
        self.counting, self.warm = final and self.warm, final
        self._started = time.perf_counter()
        self._counts = (int(state.timestamp.sample), int(state.timestamp.token))

    def batch_end(self, state: State, logger: Logger) -> None:
        batch = int(state.timestamp.batch)
        loss = state.loss
        if isinstance(loss, dict):
            loss = loss.get("total", sum(loss.values()))
        elif isinstance(loss, (tuple, list)):
            loss = sum(loss)
        if loss is not None:
            self.losses.append((batch, float(loss)))
            self.loss_seconds.append(state.timestamp.total_wct.total_seconds())
        if self.counting:
            self.batch_seconds += time.perf_counter() - self._started
            self.samples += int(state.timestamp.sample) - self._counts[0]
            self.tokens += int(state.timestamp.token) - self._counts[1]

    def eval_end(self, state: State, logger: Logger) -> None:
        metrics = {name: float(metric.compute()) for name, metric in state.eval_metrics.get("eval", {}).items()}
        self.evals.append((int(state.timestamp.batch), metrics))
        self.eval_seconds.append(state.timestamp.total_wct.total_seconds())

    def reports(self) -> list[list[tuple[str, dict]]]:
        """Each surgery algorithm's reports as (table, dict): this process's, or else those restored from the
        checkpoint (a surgery made before the run was interrupted and resumed)."""
        return [[(str(r), r.to_dict()) for r in algorithm.reports] or self._restored_reports[index]
                for index, algorithm in enumerate(self.surgeries)]

    # In every checkpoint, so that the summary of a resumed run covers the whole run.
    _SAVED = ("batch_seconds", "samples", "tokens", "losses", "evals", "loss_seconds", "eval_seconds")

    def state_dict(self) -> dict:
        return {**{key: getattr(self, key) for key in self._SAVED}, "reports": self.reports()}

    def load_state_dict(self, state: dict) -> None:
        for key in self._SAVED:
            setattr(self, key, state.get(key, getattr(self, key)))
        if len(state.get("reports", ())) == len(self.surgeries):
            self._restored_reports = state["reports"]


def latest_checkpoint(built: Built) -> Path:
    """Where Composer keeps (a link to) the run's latest checkpoint of rank 0, which ``run.resume=true`` loads."""
    return checkpoints.latest_link(built.run_dir / "checkpoints", built.name,
                                   built.trainer_kwargs.get("save_latest_filename"))


def check_run_dir(built: Built) -> None:
    """May this run use its run.dir? (``algos.run.rundir.check_run_dir``; before anything is written.)"""
    rundir.check_run_dir(built.run_dir, overwrite=built.overwrite, resume=built.resume,
                         latest=latest_checkpoint(built), load_path=built.trainer_kwargs.get("load_path"))


class ClosingTrainer(Trainer):
    """Composer's Trainer, closed at once when its construction fails part-way. Otherwise what Event.INIT started
    stays open until the garbage collector reaches the half-built Trainer: its wandb run stays the process's current
    run (the next ``wandb.init`` returns it instead of starting one), and its late close finishes whichever wandb run
    is current by then."""

    def __init__(self, **kwargs):
        try:
            super().__init__(**kwargs)
        except BaseException:
            if hasattr(self, "engine"):
                with contextlib.suppress(Exception):
                    self.close()
            raise


def _raised_by_composer(error: BaseException) -> bool:
    """Did Composer itself raise ``error`` (its checks of Trainer arguments), rather than code it called?"""
    traceback = error.__traceback__
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback.tb_frame.f_globals.get("__name__", "").startswith("composer.")


def build_trainer(built: Built, kwargs: dict) -> Trainer:
    """The Trainer; a surgery's ``SurgeryError`` at INIT and Composer's own argument checks become one-line
    ConfigErrors naming the key, and a resumed run with nothing left to train is refused. Any other exception (a
    bug, in a converter or anywhere) keeps its traceback."""
    try:
        trainer = ClosingTrainer(**kwargs)
    except SurgeryError as error:
        where = next((f"algorithms.{key}" for key, algorithm in zip(built.algorithm_keys, built.algorithms, strict=True)
                      if getattr(algorithm, "name", None) == error.algorithm), "algorithms")
        raise ConfigError(f"{where}: {str(error).splitlines()[0]}") from None
    except (ValueError, TypeError) as error:
        if not _raised_by_composer(error):
            raise
        raise ConfigError(f"trainer: {str(error).splitlines()[0]}") from None
    state = trainer.state
    end = state.max_duration
    if built.resume and end is not None and state.timestamp.get(end.unit) >= end:
        trainer.close()
        raise ConfigError(f"run.resume=true: {built.name!r} has already trained for its max_duration "
                          f"({end.value}{end.unit.value}); set a longer trainer.max_duration to train on")
    return trainer


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
    if not saved and isinstance(error, (ValueError, TypeError)) and _raised_by_composer(error):
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


def summarize(built: Built, trainer: Trainer, stats: RunStats) -> dict:
    model = trainer.state.model
    reports = [report for per_algorithm in stats.reports() for report in per_algorithm]
    checkpoint = built.run_dir / "checkpoints" / "latest-rank0.pt"
    if torch.cuda.is_available() and str(trainer.state.device.name) == "gpu":
        peak, peak_kind = torch.cuda.max_memory_allocated(), "peak GPU memory allocated"
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the process"
    seconds = stats.batch_seconds or float("nan")
    return {
        "name": built.name,
        "run_dir": str(built.run_dir),
        "metrics": stats.evals[-1][1] if stats.evals else {},
        "final_train_loss": stats.losses[-1][1] if stats.losses else None,
        "samples_per_s": stats.samples / seconds,
        "tokens_per_s": stats.tokens / seconds if stats.tokens else None,
        "generate_ms_per_token": generation_latency(model, built.eval, built.generate_tokens),
        "parameters": sum(p.numel() for p in model.parameters()),
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "checkpoint_bytes": checkpoint.resolve().stat().st_size if checkpoint.exists() else None,
        "batches": int(trainer.state.timestamp.batch),
        "samples": int(trainer.state.timestamp.sample),  # over all processes
        "world_size": dist.get_world_size(),
        "surgery": [as_dict for _, as_dict in reports],
        "surgery_tables": [table for table, _ in reports],
        "history": {"train_loss": stats.losses, "eval": stats.evals},
        "training_seconds": {"train_loss": stats.loss_seconds, "eval": stats.eval_seconds},  # aligned with history
    }


def generation_latency(model: torch.nn.Module, loader, new_tokens: int, samples: int = 3) -> float | None:
    """Median milliseconds per new token of ``generate`` (greedy, exactly ``new_tokens`` tokens, batch of one, the
    model's own KV cache), end to end: the encoder pass or the prefix's prefill is included. Prompts are the
    first ``samples`` validation rows: the source for seq2seq, the prefix (labels -100) for a prefix-LM. None for
    models that do not generate."""
    spec = getattr(model, "input_spec", None)
    if new_tokens <= 0 or spec is None or spec.task not in GENERATIVE_TASKS:
        return None
    net = model.model  # the HF model inside Composer's HuggingFaceModel
    batch = next(iter(loader))
    device = next(net.parameters()).device
    prompt = batch["attention_mask"].bool() & (batch["labels"] == -100 if spec.task == "causal_lm" else True)
    was_training, timings = net.training, []
    net.eval()
    with torch.no_grad():
        for index in range(-1, min(samples, len(prompt))):  # index -1: an untimed warm-up on the first row
            ids = batch["input_ids"][max(index, 0)][prompt[max(index, 0)]][None].to(device)
            start = time.perf_counter()
            net.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD_ID)
            if index >= 0:
                timings.append((time.perf_counter() - start) * 1000 / new_tokens)
    net.train(was_training)
    return sorted(timings)[len(timings) // 2]


def format_summary(summary: dict) -> str:
    rows = [[name, f"{value:.4f}"] for name, value in summary["metrics"].items()]
    rows += [["train samples/s", f"{summary['samples_per_s']:.1f}"]]
    if summary["tokens_per_s"]:
        rows += [["train tokens/s", f"{summary['tokens_per_s']:.0f}"]]
    if summary.get("generate_ms_per_token"):
        rows += [["generate ms/token", f"{summary['generate_ms_per_token']:.2f}"]]
    rows += [["parameters", f"{summary['parameters']:,}"],
             [summary["peak_memory_kind"], f"{summary['peak_memory_bytes'] / 2**20:,.0f} MiB"]]
    if summary["checkpoint_bytes"]:
        rows += [["checkpoint on disk", f"{summary['checkpoint_bytes'] / 2**20:,.2f} MiB"]]
    text = f"\nsummary of {summary['name']!r} ({summary['batches']} batches)\n" + tabulate(rows, tablefmt="plain")
    return "\n\n".join([text, *summary["surgery_tables"]])


# ------------------------------------------------------------------------------------------------- inspect
def inspect_config(config: DictConfig) -> str:
    """Apply the configured surgeries to the freshly built model without training and describe the result: each
    report (what is replaced, parameters and MACs per sample before and after, what is skipped and why) and the
    model's parameter count. Calibration batches come from the train data, MACs from one eval batch."""
    built = build(config, for_training=False)
    model = built.model
    before = sum(p.numel() for p in model.parameters())
    reports, others = [], []
    for algorithm in built.algorithms:
        if not isinstance(algorithm, SurgeryAlgorithm):
            others.append(repr(algorithm))
            continue
        calibration = list(_take(built.train, algorithm.calibration_needed)) if algorithm.calibration_needed else None
        reports.append(algorithm.surgery(model, calibration=calibration))
    model.eval()
    measure_macs(reports, model, next(iter(built.eval)))  # the reports' MACs per sample
    after = sum(p.numel() for p in model.parameters())
    parts = [str(report) for report in reports] or ["no surgery algorithm in this config"]
    parts.append(f"model {built.name!r}: {before:,} -> {after:,} parameters")
    if others:
        parts.append(f"not surgeries (Composer applies them while training): {', '.join(others)}")
    return "\n\n".join(parts)


def _take(loader, count: int):
    for index, batch in enumerate(loader):
        if index >= count:
            return
        yield batch


def default_name(paths: list[str]) -> str:
    """``yamls/digits_mlp.yaml recipes/fff.yaml`` -> ``digits_mlp+fff``."""
    return "+".join(Path(p).stem for p in paths)
