"""Factorized layers: a dense layer y = W x + b (W is d_out x d_in) replaced by y = U (V x) + b with U d_out x r and
V r x d_in, which costs r (d_in + d_out) instead of d_in d_out multiply-accumulates per output position.

For a convolution, d_in = C_in * prod(kernel): V is a k x k convolution from C_in to r channels (carrying the
stride, padding and dilation) and U a 1 x 1 convolution from r to C_out channels (Jaderberg et al. 2014's scheme 2,
Zhang et al. 2015).

How Factorize reads and rebuilds each dense class is its handler, in ``algos.factorize.handlers``.
"""

from __future__ import annotations

import torch
from torch import nn

from algos.surgery.pretrained import SPECS


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


def factorized_product(module: nn.Module) -> torch.Tensor:
    """U V of a factorized layer, as a d_out x d_in matrix."""
    return module.second.weight.flatten(1) @ module.first.weight.flatten(1)


def _conv_spec(module: _FactorizedConv, spec) -> dict:
    first = module.first
    return {"in_channels": module.in_channels, "out_channels": module.out_channels, "rank": module.rank,
            "kernel_size": list(first.kernel_size), "stride": list(first.stride),
            "padding": first.padding if isinstance(first.padding, str) else list(first.padding),
            "dilation": list(first.dilation), "bias": module.second.bias is not None,
            "padding_mode": first.padding_mode}


def _conv_from_spec(cls: type[_FactorizedConv]):
    def build(s: dict, child) -> _FactorizedConv:
        padding = s["padding"] if isinstance(s["padding"], str) else tuple(s["padding"])
        return cls(s["in_channels"], s["out_channels"], s["rank"], tuple(s["kernel_size"]), stride=tuple(s["stride"]),
                   padding=padding, dilation=tuple(s["dilation"]), bias=s["bias"], padding_mode=s["padding_mode"])
    return build


SPECS.register("FactorizedLinear", FactorizedLinear,
               lambda m, spec: {"in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
                                "bias": m.second.bias is not None},
               lambda s, child: FactorizedLinear(s["in_features"], s["out_features"], s["rank"], bias=s["bias"]))
for _cls in (FactorizedConv1d, FactorizedConv2d):
    SPECS.register(_cls.__name__, _cls, _conv_spec, _conv_from_spec(_cls))
