"""Multiply-accumulates per sample: ``torch.utils.flop_counter`` with the formulas it lacks (FFT, weighted
embedding_bag), and the measuring of a report's new and old modules on the inputs they get in one call of the model."""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from algos.surgery.batches import call_model, eval_mode, first_sample, to_meta, without_state
from algos.surgery.report import SurgeryReport


@runtime_checkable
class CountsOwnMacs(Protocol):
    """A module computing with ops the flop counter does not see (FFF's gathered dot products: a multiply and a
    sum) declares how many MACs one call on ``x`` costs."""

    def uncounted_macs(self, x: torch.Tensor) -> int: ...


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


def count_macs(module: nn.Module, args: tuple, kwargs: dict) -> int:
    """Multiply-accumulates of one call, from ``torch.utils.flop_counter`` (which counts 2 FLOPs per MAC).

    The call runs with autograd on, so modules take their general path rather than a fused inference kernel the
    counter has no formula for (PyTorch's TransformerEncoderLayer fast path, FFF's single-token path). A module that
    computes with ops the counter does not see (an FFF's gathered dot products are a multiply and a sum) adds its
    own through an ``uncounted_macs(input)`` method."""
    extra: list[int] = []
    handles = [sub.register_forward_pre_hook(lambda sub, inputs: extra.append(sub.uncounted_macs(inputs[0])))
               for sub in module.modules() if isinstance(sub, CountsOwnMacs)]
    try:
        with FlopCounterMode(display=False) as counter, torch.enable_grad():
            module(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return counter.get_total_flops() // 2 + sum(extra)


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
            with eval_mode(model):
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
