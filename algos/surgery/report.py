"""SurgeryReport: what a surgery changed, module by module, with parameters and MACs per sample before and after, and
how those MACs are measured (``measure_macs``: one call of the model, hooks that live only for it)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from tabulate import tabulate
from torch import nn

from algos.surgery.batches import call_model, eval_mode, first_sample, to_meta, without_state
from algos.surgery.macs import count_macs
from algos.surgery.skeleton import meta_copy
from algos.surgery.targets import Skip


@dataclass
class Replaced:
    """One replaced module. MACs are per sample (the module's input cut to one row of dim 0); None until measured."""

    fqn: str
    old_type: str
    new_type: str
    params_before: int
    params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    notes: dict = field(default_factory=dict)
    companions: list[str] = field(default_factory=list)  # other modules replaced with this one (see Rewrite)


@dataclass
class SurgeryReport:
    """Rows for replaced and skipped modules; prints as a table, converts to dict / JSON, sums totals."""

    algorithm: str
    replaced: list[Replaced] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    # fqn -> (weightless copy of the old module, new module): kept only until their MACs are measured.
    _unmeasured: dict[str, tuple[nn.Module, nn.Module]] = field(default_factory=dict, repr=False, compare=False)

    def add(self, fqn: str, old: nn.Module, new: nn.Module, notes: dict | None = None,
            companions: list[str] | None = None, old_type: str | None = None) -> None:
        self.replaced.append(
            Replaced(fqn, old_type or type(old).__name__, type(new).__name__, count_params(old), count_params(new),
                     notes=dict(notes or {}), companions=list(companions or [])),
        )
        self._unmeasured[fqn] = (meta_copy(old), new)

    @property
    def measured(self) -> bool:
        """True once every replaced module's MACs were measured (or could not be, for want of an input)."""
        return not self._unmeasured

    def measure(self, model: nn.Module, inputs) -> SurgeryReport:
        """Fill in the MACs per sample: run ``model`` (the whole model the surgery rewrote) once on ``inputs`` (a
        batch it can be called with), in eval mode without gradients. Returns the report. Surgeries given
        ``example_inputs`` do this themselves, and a Composer surgery does it on the first batch it trains on."""
        measure_macs([self], model, inputs)
        return self

    def totals(self) -> dict:
        """Sums over replaced modules; a MAC total is None unless every row was measured."""
        macs_before = [row.macs_before for row in self.replaced]
        macs_after = [row.macs_after for row in self.replaced]
        return {
            "replaced": len(self.replaced),
            "skipped": len(self.skipped),
            "params_before": sum(row.params_before for row in self.replaced),
            "params_after": sum(row.params_after for row in self.replaced),
            "macs_before": None if None in macs_before else sum(macs_before),
            "macs_after": None if None in macs_after else sum(macs_after),
        }

    def to_dict(self) -> dict:
        return {
            "algorithm": self.algorithm,
            "replaced": [asdict(row) for row in self.replaced],
            "skipped": [asdict(row) for row in self.skipped],
            "totals": self.totals(),
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    columns = ["module", "old -> new", "params before -> after", "MACs/sample before -> after", "notes"]

    def table_rows(self) -> list[list[str]]:
        rows = [
            [row.fqn, f"{row.old_type} -> {row.new_type}", _arrow(row.params_before, row.params_after),
             _arrow(row.macs_before, row.macs_after), _notes(row.notes)]
            for row in self.replaced
        ]
        rows += [[skip.fqn, skip.module_type, "", "", f"skipped: {skip.reason}"] for skip in self.skipped]
        totals = self.totals()
        rows.append([f"total ({totals['replaced']} replaced, {totals['skipped']} skipped)", "",
                     _arrow(totals["params_before"], totals["params_after"]),
                     _arrow(totals["macs_before"], totals["macs_after"]), ""])
        return rows

    def __str__(self) -> str:
        return f"{self.algorithm} surgery\n" + tabulate(self.table_rows(), headers=self.columns, disable_numparse=True)

    def log_to(self, logger) -> None:
        """Counts and totals as hyperparameters, the rows as a table (for loggers that keep tables)."""
        logger.log_hyperparameters({f"surgery/{self.algorithm}/{key}": value for key, value in self.totals().items()})
        logger.log_table(self.columns, self.table_rows(), name=f"surgery/{self.algorithm}")


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())



def _arrow(before, after) -> str:
    if before is None or after is None:
        return "-"
    return f"{before:,} -> {after:,}"


def _notes(notes: dict) -> str:
    return ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in notes.items())


def measure_macs(reports: list[SurgeryReport], model: nn.Module, inputs) -> None:
    """Fill in the MACs per sample of every row of ``reports`` not measured yet: ``model`` runs once on ``inputs``
    (eval mode, no grad), and each new module is measured on the input it gets there; the old one on a weightless
    copy with a meta-device input of the same shape, so it costs no memory and no time.

    The measuring hooks live only for this call: nothing is left on the model, so a surgered model copies, pickles,
    quantizes and exports like any other (a hook left for "the next forward" broke all four). Rows whose module the
    call does not reach stay unmeasured (MACs None), and are not tried again.
    """
    handles = [new_module.register_forward_pre_hook(_measure_hook(report, fqn, old_skeleton), with_kwargs=True)
               for report in reports for fqn, (old_skeleton, new_module) in report._unmeasured.items()]
    try:
        if handles:
            with eval_mode(model), torch.no_grad():
                call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
        for report in reports:
            report._unmeasured.clear()


def _measure_hook(report: SurgeryReport, fqn: str, old_skeleton: nn.Module):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if fqn not in report._unmeasured:  # measured already (a module called twice, or the measuring call itself)
            return
        del report._unmeasured[fqn]
        args, kwargs = first_sample(without_state((args, kwargs)))
        row = next(row for row in report.replaced if row.fqn == fqn)
        with eval_mode(module):
            row.macs_after = count_macs(module, args, kwargs)
        try:
            meta_args, meta_kwargs = to_meta((args, kwargs))
            with eval_mode(old_skeleton):
                row.macs_before = count_macs(old_skeleton, meta_args, meta_kwargs)
        except Exception:  # an old module whose forward needs real values (data-dependent control flow)
            row.macs_before = None

    return hook
