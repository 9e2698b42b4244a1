"""SurgeryReport: what a surgery changed, module by module, with parameters and MACs per sample before and after."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch
from composer.models import ComposerModel
from tabulate import tabulate
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.hooks import RemovableHandle

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


def _register_fft_flop_formulas() -> None:
    """torch.utils.flop_counter has no formula for FFTs, so Fourier mixing would count as free. We add one with the
    usual convention (FFTW's): a complex FFT of length n costs 5 n log2(n) flops, a real-input or real-output one
    half of that; a multi-dimensional transform sums over its dimensions. Skipped if torch ever ships its own."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    aten = torch.ops.aten
    if any(op in flop_registry for op in (aten._fft_r2c, aten._fft_c2c, aten._fft_c2r)):
        return

    def fft_flops(numel: int, shape, dims, factor: float) -> int:
        return int(factor * numel * sum(math.log2(shape[d]) for d in dims if shape[d] > 1))

    @register_flop_formula(aten._fft_c2c)
    def _c2c(x_shape, dim, *args, out_shape=None, **kwargs) -> int:
        return fft_flops(math.prod(x_shape), x_shape, dim, 5.0)

    @register_flop_formula([aten._fft_r2c, aten._fft_c2r])
    def _real(x_shape, dim, *args, out_shape=None, **kwargs) -> int:
        real_shape = out_shape if math.prod(out_shape) >= math.prod(x_shape) else x_shape  # the real side
        return fft_flops(math.prod(real_shape), real_shape, dim, 2.5)


_register_fft_flop_formulas()


def _register_embedding_bag_flop_formula() -> None:
    """A weighted ``embedding_bag`` (what FFF trees sum their output vectors with) gathers and scales one row per
    index: one MAC per element. torch.utils.flop_counter has no formula for it (and counts lookups as free)."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    aten = torch.ops.aten
    ops = [aten._embedding_bag, aten._embedding_bag_forward_only]
    if any(op in flop_registry for op in ops):
        return

    @register_flop_formula(ops)
    def _bag(weight_shape, indices_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(indices_shape) * weight_shape[-1]


_register_embedding_bag_flop_formula()


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(module: nn.Module, args: tuple, kwargs: dict) -> int:
    """Multiply-accumulates of one call, from ``torch.utils.flop_counter`` (which counts 2 FLOPs per MAC).

    The call runs with autograd on, so modules take their general path rather than a fused inference kernel the
    counter has no formula for (PyTorch's TransformerEncoderLayer fast path, FFF's single-token path). A module that
    computes with ops the counter does not see (an FFF's gathered dot products are a multiply and a sum) adds its
    own through an ``uncounted_macs(input)`` method."""
    extra: list[int] = []
    handles = [sub.register_forward_pre_hook(lambda sub, inputs: extra.append(sub.uncounted_macs(inputs[0])))
               for sub in module.modules() if hasattr(sub, "uncounted_macs")]
    try:
        with FlopCounterMode(display=False) as counter, torch.enable_grad():
            module(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return counter.get_total_flops() // 2 + sum(extra)


def measure_macs_on_first_call(report: SurgeryReport, *, example_inputs=None, model: nn.Module | None = None) -> None:
    """Fill in each row's MACs the first time its new module runs, on the input it actually gets.

    The new module is measured on that input in eval mode (the inference cost); the old one on a weightless copy
    with a meta-device input of the same shape, so it costs no memory and no time. With ``example_inputs`` the model
    runs once right away (eval mode, no grad); otherwise the model's next forward pass does it.
    """
    handles: dict[str, RemovableHandle] = {}
    for fqn, (old_skeleton, new_module) in report._unmeasured.items():
        hook = _measure_hook(report, fqn, old_skeleton, handles)
        handles[fqn] = new_module.register_forward_pre_hook(hook, with_kwargs=True)
    if example_inputs is not None and model is not None and handles:
        with eval_mode(model):
            call_model(model, example_inputs)
        for handle in handles.values():  # modules the example did not reach stay unmeasured
            handle.remove()
        report._unmeasured.clear()


def _measure_hook(report: SurgeryReport, fqn: str, old_skeleton: nn.Module, handles: dict[str, RemovableHandle]):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        # First call only: unhooking first also keeps the measuring call below from recursing.
        handles.pop(fqn).remove()
        del report._unmeasured[fqn]
        args, kwargs = _first_sample(_without_state((args, kwargs)))
        row = next(row for row in report.replaced if row.fqn == fqn)
        with eval_mode(module):
            row.macs_after = count_macs(module, args, kwargs)
        try:
            meta_args, meta_kwargs = _to_meta((args, kwargs))
            with eval_mode(old_skeleton):
                row.macs_before = count_macs(old_skeleton, meta_args, meta_kwargs)
        except Exception:  # an old module whose forward needs real values (data-dependent control flow)
            row.macs_before = None

    return hook


class eval_mode:
    """Context manager: put a module tree in eval mode and restore every submodule's own flag afterwards."""

    def __init__(self, module: nn.Module):
        self.flags = [(m, m.training) for m in module.modules()]
        self.module = module

    def __enter__(self):
        self.module.eval()
        return self.module

    def __exit__(self, *exc):
        for module, training in self.flags:
            module.training = training


def call_model(model: nn.Module, batch):
    """Run a batch through a model: a ComposerModel takes the batch whole, a plain module takes a tensor, a tuple
    of positional arguments, or a dict of keyword arguments (HF style)."""
    with torch.no_grad():
        if isinstance(model, ComposerModel) or isinstance(batch, torch.Tensor):
            return model(batch)
        if isinstance(batch, dict):
            return model(**batch)
        if isinstance(batch, (tuple, list)):
            return model(*batch)
    raise TypeError(f"cannot call the model with a batch of type {type(batch).__name__}; "
                    "pass a tensor, a tuple of tensors, or a dict of keyword arguments")


def _first_sample(tree):
    """Cut every tensor that shares the batch dimension (dim 0 of the first tensor) down to its first row."""
    batch = _first_tensor(tree)
    if batch is None or batch.dim() == 0:
        return tree
    size = batch.shape[0]
    return _map_tensors(tree, lambda t: t[:1] if t.dim() > 0 and t.shape[0] == size else t)


def _without_state(tree):
    """None in place of every object that is not a tensor or a plain value: the measuring calls must not touch the
    caller's state (an HF KV cache would otherwise get the measured keys appended)."""
    if isinstance(tree, dict):
        return {key: _without_state(value) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_without_state(value) for value in tree)
    plain = isinstance(tree, (torch.Tensor, int, float, complex, str, bytes, torch.dtype, torch.device, type(None)))
    return tree if plain else None


def _to_meta(tree):
    return _map_tensors(tree, lambda t: torch.empty_like(t, device="meta"))


def _first_tensor(tree):
    if isinstance(tree, torch.Tensor):
        return tree
    values = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (tuple, list)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def _map_tensors(tree, fn):
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {key: _map_tensors(value, fn) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map_tensors(value, fn) for value in tree)
    return tree


def _arrow(before, after) -> str:
    if before is None or after is None:
        return "-"
    return f"{before:,} -> {after:,}"


def _notes(notes: dict) -> str:
    return ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in notes.items())
