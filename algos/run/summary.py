"""The summary of a finished run (``summary.json``): final metrics, training throughput, generation latency, size,
peak memory, the surgery reports and the history; and its printed table."""

from __future__ import annotations

import resource
import time

import torch
from composer import Trainer
from composer.utils import dist
from tabulate import tabulate

from algos.run.build import Built
from algos.run.models import GENERATIVE_TASKS, PAD_ID
from algos.run.stats import RunStats


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
