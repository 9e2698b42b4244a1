"""Factorized layers: a dense layer y = W x + b (W is d_out x d_in) replaced by y = U (V x) + b with U d_out x r and
V r x d_in, which costs r (d_in + d_out) instead of d_in d_out multiply-accumulates per output position.

For a convolution, d_in = C_in * prod(kernel): V is a k x k convolution from C_in to r channels (carrying the
stride, padding and dilation) and U a 1 x 1 convolution from r to C_out channels (Jaderberg et al. 2014's scheme 2,
Zhang et al. 2015).

This module also holds the dense side: which layers can be factorized, their weight as a d_out x d_in matrix, and
their inputs as rows of that matrix's input space (im2col patches for convolutions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # HF GPT-2 style Conv1D: a Linear whose weight is stored transposed (d_in x d_out). transformers is optional.
    from transformers.pytorch_utils import Conv1D as HFConv1D
except ImportError:  # pragma: no cover - the nlp extra is not installed
    HFConv1D = None

DENSE_CLASSES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d) + ((HFConv1D,) if HFConv1D else ())
CONV_CLASSES = (nn.Conv1d, nn.Conv2d)  # the rest of DENSE_CLASSES are linear layers


def dense_classes(linears: bool = True, convs: bool = True) -> tuple[type[nn.Module], ...]:
    """The candidate classes: Linear and HF Conv1D if ``linears``, Conv1d and Conv2d if ``convs``."""
    return tuple(cls for cls in DENSE_CLASSES if (convs if cls in CONV_CLASSES else linears))


class FactorizedLinear(nn.Module):
    """y = second(first(x)) = U (V x) + b: ``first`` is V (in -> rank, no bias), ``second`` is U (rank -> out)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    in_features = property(lambda self: self.first.in_features)
    out_features = property(lambda self: self.second.out_features)
    rank = property(lambda self: self.first.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class _FactorizedConv(nn.Module):
    """y = second(first(x)): ``first`` is a k x k convolution to ``rank`` channels (V), ``second`` 1 x 1 (U)."""

    conv_class: type[nn.Module]

    def __init__(self, in_channels: int, out_channels: int, rank: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__()
        self.first = self.conv_class(in_channels, rank, kernel_size, stride=stride, padding=padding,
                                     dilation=dilation, bias=False, padding_mode=padding_mode, device=device,
                                     dtype=dtype)
        self.second = self.conv_class(rank, out_channels, 1, bias=bias, device=device, dtype=dtype)

    in_channels = property(lambda self: self.first.in_channels)
    out_channels = property(lambda self: self.second.out_channels)
    rank = property(lambda self: self.first.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class FactorizedConv1d(_FactorizedConv):
    conv_class = nn.Conv1d


class FactorizedConv2d(_FactorizedConv):
    conv_class = nn.Conv2d


FACTORIZED = {nn.Conv1d: FactorizedConv1d, nn.Conv2d: FactorizedConv2d}


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (HFConv1D is not None and isinstance(module, HFConv1D))


def dense_shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of the weight matrix: for a convolution d_in = C_in * prod(kernel)."""
    if is_linear(module):
        d_out, d_in = weight_matrix(module).shape
        return d_in, d_out
    return module.weight[0].numel(), module.out_channels


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a d_out x d_in matrix W (a view, no copy)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if HFConv1D is not None and isinstance(module, HFConv1D):
        return module.weight.t()  # Conv1D computes x @ weight + bias
    return module.weight.flatten(1)


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows in W's input space, so that W @ row is one output position (im2col for convs)."""
    d_in, _ = dense_shape(module)
    if is_linear(module):
        return x.reshape(-1, d_in)
    if isinstance(module, nn.Conv1d):  # a Conv1d is a Conv2d of height 1
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation)
    else:
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    # The conv pads with its own padding_mode; _reversed_padding_repeated_twice is how nn.Conv stores the amounts
    # (also for padding="same") in F.pad's order.
    pad = list(module._reversed_padding_repeated_twice)
    if isinstance(module, nn.Conv1d):
        pad += [0, 0]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, pad, mode=mode)
    patches = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (N, C_in * prod(kernel), positions)
    return patches.transpose(1, 2).reshape(-1, d_in)


def build_factorized(dense: nn.Module, rank: int, factors: tuple[torch.Tensor, torch.Tensor] | None) -> nn.Module:
    """A factorized layer shaped like ``dense`` with ``factors = (U, V)`` as weights (None: default random init).
    The bias is copied exactly."""
    weight = dense.weight
    kwargs = {"device": weight.device, "dtype": weight.dtype}
    has_bias = dense.bias is not None
    d_in, d_out = dense_shape(dense)
    if is_linear(dense):
        new = FactorizedLinear(d_in, d_out, rank, bias=has_bias, **kwargs)
    else:
        new = FACTORIZED[type(dense)](
            dense.in_channels, dense.out_channels, rank, dense.kernel_size, stride=dense.stride,
            padding=dense.padding, dilation=dense.dilation, bias=has_bias, padding_mode=dense.padding_mode, **kwargs)
    with torch.no_grad():
        if factors is not None:
            left, right = factors
            new.first.weight.copy_(right.reshape(new.first.weight.shape))
            new.second.weight.copy_(left.reshape(new.second.weight.shape))
        if has_bias:
            new.second.bias.copy_(dense.bias)
    return new


def factorized_product(module: nn.Module) -> torch.Tensor:
    """U V of a factorized layer, as a d_out x d_in matrix."""
    return module.second.weight.flatten(1) @ module.first.weight.flatten(1)
