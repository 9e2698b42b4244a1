"""A merged config -> a Composer Trainer -> a run directory with the resolved config, checkpoints, logs, the surgery
reports and a summary (``algos run``); the same build without training prints the surgery reports (``algos inspect``).

Everything a config names is built and checked (registries, algorithm targets, the run directory) before any
training starts, and an existing run directory is never written into unless ``run.overwrite=true``.
"""

from __future__ import annotations

import inspect
import json
import resource
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from composer import Trainer
from composer.core import Callback, DataSpec, State
from composer.loggers import Logger
from composer.utils import dist, reproducibility
from omegaconf import DictConfig, OmegaConf
from tabulate import tabulate

from algos.run.components import ALGORITHMS, CALLBACKS, LOGGERS, OPTIMIZERS, SCHEDULERS
from algos.run.data import DATA
from algos.run.models import GENERATIVE_TASKS, MODELS, PAD_ID, token_counter
from algos.run.registry import ConfigError, check_kwargs
from algos.surgery import SurgeryAlgorithm, SurgeryReport
from algos.surgery.report import call_model

RUN_KEYS = {"name": "run name (default: the YAML file names joined by '+')",
            "dir": "run directory (default: runs/<name>)",
            "overwrite": "replace an existing run directory (default: false)",
            "seed": "random seed for model init, data order and training (default: 0)",
            "device": "cpu, gpu or auto (default: auto)",
            "generate_tokens": "generative models: new tokens per timed generate call after training, for the "
                               "summary's generation latency per token (default: 32; 0: skip)"}
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
    generate_tokens: int = 32


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
    run_dir = Path(run.get("dir") or Path("runs") / name)
    seed = run.get("seed", 0)
    device = run.get("device", "auto")
    if device not in ("cpu", "gpu", "auto"):
        raise ConfigError(f"run.device={device!r}; valid: cpu, gpu, auto")
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
        algorithms.append(algorithm)

    trainer = _section(plain, "trainer")
    owned = [key for key in trainer if key in RUNNER_OWNS]
    if owned:
        raise ConfigError(f"trainer: {', '.join(owned)} set by the runner from the other sections (run, model, "
                          f"data, optimizer, scheduler, algorithms, loggers, callbacks)")
    check_kwargs(Trainer.__init__, trainer, "trainer", reserved=RUNNER_OWNS)
    built = Built(name, run_dir, bool(run.get("overwrite", False)), model, train, evaluation, algorithms,
                  algorithm_keys=list(_section(plain, "algorithms")), plans=plans)
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


def _plan(algorithm: SurgeryAlgorithm, model: torch.nn.Module, key: str, model_name: str) -> list[str]:
    """The modules ``algorithm`` will rewrite; an error when there are none (a recipe that does not fit the model)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-target warning: we raise instead
        try:
            targets, skipped = algorithm.plan(model)
        except ValueError as error:
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
        self._started = 0.0
        self._counts = (0, 0)

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
        if self.counting:
            self.batch_seconds += time.perf_counter() - self._started
            self.samples += int(state.timestamp.sample) - self._counts[0]
            self.tokens += int(state.timestamp.token) - self._counts[1]

    def eval_end(self, state: State, logger: Logger) -> None:
        metrics = {name: float(metric.compute()) for name, metric in state.eval_metrics.get("eval", {}).items()}
        self.evals.append((int(state.timestamp.batch), metrics))


def prepare_run_dir(built: Built) -> None:
    """Refuse an existing, non-empty run directory unless overwrite was asked for (then empty it)."""
    run_dir = built.run_dir
    if dist.get_global_rank() != 0:
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not built.overwrite:
            raise ConfigError(f"run.dir {str(run_dir)!r} already exists; set run.overwrite=true to replace it, or "
                              f"pick another run.name / run.dir")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def run(config: DictConfig, *, quiet: bool = False, show_config: bool = False) -> dict:
    """Train the configured run; returns (and writes to ``<run dir>/summary.json``) the summary. ``show_config``
    prints the resolved config first."""
    built = build(config)
    prepare_run_dir(built)
    stats = RunStats(built.algorithms)
    kwargs = dict(built.trainer_kwargs)
    kwargs["callbacks"] = [*kwargs["callbacks"], stats]
    kwargs.setdefault("save_folder", str(built.run_dir / "checkpoints"))
    kwargs["save_overwrite"] = built.overwrite
    if dist.get_global_rank() == 0:
        OmegaConf.save(config, built.run_dir / "config.yaml", resolve=True)
        if show_config:
            print(OmegaConf.to_yaml(config, resolve=True))
        if not quiet:
            print(f"run {built.name!r} -> {built.run_dir}/ (resolved config in config.yaml)")
    try:
        trainer = Trainer(**kwargs)
    except (ValueError, TypeError) as error:  # Composer's checks of trainer keys, surgery at INIT: one line
        if dist.get_global_rank() == 0:
            shutil.rmtree(built.run_dir, ignore_errors=True)  # nothing left behind
        message = str(error).splitlines()[0]
        where = next((f"algorithms.{key}" for key, algorithm in zip(built.algorithm_keys, built.algorithms, strict=True)
                      if message.startswith(f"{type(algorithm).__name__}:")), "trainer")
        raise ConfigError(f"{where}: {message}") from None
    trainer.fit()
    summary = summarize(built, trainer, stats)
    trainer.close()  # loggers finish writing (the wandb run directory) before anyone reads them
    if dist.get_global_rank() == 0:
        (built.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        (built.run_dir / "surgery_report.txt").write_text("\n\n".join(summary["surgery_tables"]) + "\n")
        if not quiet:
            print(format_summary(summary))
    return summary


def summarize(built: Built, trainer: Trainer, stats: RunStats) -> dict:
    model = trainer.state.model
    reports: list[SurgeryReport] = [r for a in built.algorithms if isinstance(a, SurgeryAlgorithm) for r in a.reports]
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
        "surgery": [report.to_dict() for report in reports],
        "surgery_tables": [str(report) for report in reports],
        "history": {"train_loss": stats.losses, "eval": stats.evals},
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
    call_model(model, next(iter(built.eval)))  # fills in the reports' MACs per sample
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
