"""``algos inspect``: the configured surgeries applied to the freshly built model, without training."""

from __future__ import annotations

from omegaconf import DictConfig

from algos.run.build import build
from algos.surgery import SurgeryAlgorithm
from algos.surgery.report import measure_macs


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
