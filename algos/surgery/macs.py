"""Multiply-accumulates: ``torch.utils.flop_counter`` with the formulas it lacks (FFT, weighted embedding_bag), and
modules that count their own (``CountsOwnMacs``). A report's rows are measured with it in ``algos.surgery.report``."""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


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
