"""Multiply-accumulates per sample: ``torch.utils.flop_counter`` with the formulas it lacks (FFT, weighted
embedding_bag), and the hook that measures a report's new and old modules on the first input they get."""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.hooks import RemovableHandle

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
