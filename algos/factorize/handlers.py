"""Factorize's per-class handlers, one per dense class in ``HANDLERS`` (found by type): how to read the layer's
weight as a d_out x d_in matrix W, its inputs as rows of W's input space (im2col patches for convolutions), which
data-free rules leave it dense, and how to build its factorized replacement (``algos.factorize.layers``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from algos.factorize.config import FactorizeConfig
from algos.factorize.layers import FactorizedConv1d, FactorizedConv2d, FactorizedLinear
from algos.factorize.lowrank import latent_rank
from algos.surgery.handlers import Handlers, hf_classes


class DenseHandler(ABC):
    """How Factorize reads and rebuilds one class of dense layer y = W x + b."""

    positions_need_calibration = False  # whether MACs per sample (output positions) are known only from real inputs
    rows_are_tokens = False  # whether input_rows gives one row per (sample, position) of a (batch, position, d) input

    @abstractmethod
    def weight_matrix(self, layer: nn.Module) -> torch.Tensor:
        """The layer's weight as a d_out x d_in matrix W (a view, no copy)."""

    def dense_shape(self, layer: nn.Module) -> tuple[int, int]:
        """(d_in, d_out) of W."""
        d_out, d_in = self.weight_matrix(layer).shape
        return d_in, d_out

    @abstractmethod
    def input_rows(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The layer's input as rows in W's input space, so that W @ row is one output position."""

    @abstractmethod
    def input_width(self, layer: nn.Module, x: torch.Tensor) -> tuple[int | None, int]:
        """(the width of input ``x``, the width the layer expects): features, or channels for a convolution."""

    @abstractmethod
    def stays_dense(self, layer: nn.Module, config: FactorizeConfig) -> str | None:
        """Why the layer's shape leaves it dense (too narrow, grouped), or None."""

    @abstractmethod
    def latent_rank(self, layer: nn.Module, config: FactorizeConfig) -> int:
        """The rank Composer's ``latent_features`` / ``latent_channels`` give the layer."""

    @abstractmethod
    def empty_factorized(self, layer: nn.Module, rank: int) -> nn.Module:
        """A freshly initialised factorized layer shaped like ``layer``, on its device and dtype."""

    def build(self, layer: nn.Module, rank: int, factors: tuple[torch.Tensor, torch.Tensor] | None) -> nn.Module:
        """The factorized layer with ``factors = (U, V)`` as weights (None: default random init); the bias copied
        exactly."""
        new = self.empty_factorized(layer, rank)
        with torch.no_grad():
            if factors is not None:
                left, right = factors
                new.first.weight.copy_(right.reshape(new.first.weight.shape))
                new.second.weight.copy_(left.reshape(new.second.weight.shape))
            if layer.bias is not None:
                new.second.bias.copy_(layer.bias)
        return new


class LinearHandler(DenseHandler):
    """``nn.Linear``: W is its weight; inputs are rows of their last dimension."""

    rows_are_tokens = True

    def weight_matrix(self, linear):
        return linear.weight

    def input_rows(self, linear, x):
        return x.reshape(-1, self.dense_shape(linear)[0])

    def input_width(self, linear, x):
        return x.shape[-1], self.dense_shape(linear)[0]

    def stays_dense(self, linear, config):
        smallest = min(self.dense_shape(linear))
        if smallest < config.min_features:
            return f"min(in, out) = {smallest} below min_features {config.min_features}"
        return None

    def latent_rank(self, linear, config):
        return latent_rank(config.composer_latent.features, *self.dense_shape(linear))

    def empty_factorized(self, linear, rank):
        d_in, d_out = self.dense_shape(linear)
        return FactorizedLinear(d_in, d_out, rank, bias=linear.bias is not None, device=linear.weight.device,
                                dtype=linear.weight.dtype)


class TransposedLinearHandler(LinearHandler):
    """HF GPT-2's ``Conv1D``: a linear layer computing x @ weight + b, its weight stored d_in x d_out."""

    def weight_matrix(self, conv1d):
        return conv1d.weight.t()


class ConvHandler(DenseHandler):
    """``nn.Conv2d``: W is its weight flattened to C_out x (C_in k_h k_w); inputs are im2col patches."""

    factorized_class: type[FactorizedConv1d | FactorizedConv2d] = FactorizedConv2d
    positions_need_calibration = True  # H_out W_out per sample depends on the input size

    def weight_matrix(self, conv):
        return conv.weight.flatten(1)

    def input_rows(self, conv, x):
        x, kernel, stride, dilation, pad = self._as_2d(conv, x)
        x = F.pad(x, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
        patches = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (N, C_in * prod(kernel), positions)
        return patches.transpose(1, 2).reshape(-1, self.dense_shape(conv)[0])

    def _as_2d(self, conv, x):
        """(input, kernel, stride, dilation, F.pad amounts) as for a Conv2d. The conv pads with its own
        padding_mode; ``_reversed_padding_repeated_twice`` is how nn.Conv stores the amounts (also for
        padding="same") in F.pad's order."""
        return x, conv.kernel_size, conv.stride, conv.dilation, list(conv._reversed_padding_repeated_twice)

    def input_width(self, conv, x):
        return (x.shape[1] if x.dim() > 1 else None), conv.in_channels

    def stays_dense(self, conv, config):
        if conv.groups != 1:
            return f"grouped convolution (groups={conv.groups}) is not factorized"
        smallest = min(conv.in_channels, conv.out_channels)
        if smallest < config.min_channels:
            return f"min(in, out) channels = {smallest} below min_channels {config.min_channels}"
        return None

    def latent_rank(self, conv, config):
        return latent_rank(config.composer_latent.channels, conv.in_channels, conv.out_channels)

    def empty_factorized(self, conv, rank):
        return self.factorized_class(
            conv.in_channels, conv.out_channels, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype)


class Conv1dHandler(ConvHandler):
    """``nn.Conv1d``, read as a Conv2d of height 1."""

    factorized_class = FactorizedConv1d

    def _as_2d(self, conv, x):
        x, kernel, stride, dilation, pad = super()._as_2d(conv, x.unsqueeze(2))
        return x, (1, *kernel), (1, *stride), (1, *dilation), pad + [0, 0]


HF_CONV1D = hf_classes(("gpt2", "Conv1D"))  # none without the nlp extra

HANDLERS: Handlers[DenseHandler] = Handlers()
HANDLERS.register(LinearHandler(), nn.Linear)
HANDLERS.register(Conv1dHandler(), nn.Conv1d)
HANDLERS.register(ConvHandler(), nn.Conv2d)
HANDLERS.register(TransposedLinearHandler(), *HF_CONV1D)

LINEAR_CLASSES = (nn.Linear, *HF_CONV1D)  # candidates when factorize_linears
CONV_CLASSES = (nn.Conv1d, nn.Conv2d)  # candidates when factorize_convs
