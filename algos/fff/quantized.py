"""Dynamic int8 for FFF trees (``algos.quantize_dynamic``): a leaf-form tree keeps its leaves in raw tensors, which
torch's ``quantize_dynamic`` does not see. ``QuantizedFFF`` holds each leaf as two of torch's dynamic int8 Linear
modules (int8 weights, the activations quantized per call) and routes in float:

    leaf(x) = hard descent through the 2^depth - 1 float node logits  z_i = w_i . x + b_i,
    y = Q(W2_leaf) act(Q(W1_leaf) x + b1_leaf) + b2_leaf         (Q: int8 weights, scales per tensor or per row)

The routing stays float: it is depth dot products per token (a small share of the work), and a node logit near 0
that int8 rounding flips would send the token to another leaf, a far larger error than the GEMMs' rounding.

The neuron form stays float (``from_float`` returns it unchanged): its forward is a walk of single-neuron nodes,
gathered rows and an embedding bag, no GEMM for int8 kernels to speed up. Inference only: nothing here trains.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from algos.fff.tree import FFF, by_leaf
from algos.surgery.quantize import register_quantized


class QuantizedFFF(nn.Module):
    """A leaf-form FFF for inference with int8 leaf GEMMs; built by ``from_float`` (``algos.quantize_dynamic``)."""

    def __init__(self, tree: FFF, qconfig, linear_class: type[DynamicLinear] = DynamicLinear):
        super().__init__()
        self.in_features, self.out_features, self.depth = tree.in_features, tree.out_features, tree.depth
        self.register_buffer("node_weight", tree.node_weight.detach().clone())
        self.register_buffer("node_bias", tree.node_bias.detach().clone())
        self.activation = tree.activation
        self.leaves = nn.ModuleList(
            nn.Sequential(_int8(tree.leaf_in[leaf].T, tree.leaf_in_bias[leaf], qconfig, linear_class), tree.activation,
                          _int8(tree.leaf_out[leaf].T, tree.leaf_out_bias[leaf], qconfig, linear_class))
            for leaf in range(2**tree.depth))

    @classmethod
    def from_float(cls, module: FFF, use_precomputed_fake_quant: bool = False) -> nn.Module:
        """The int8 tree of a leaf-form ``module`` (with the ``qconfig`` torch's ``quantize_dynamic`` set on it);
        a neuron-form tree as it is (see the module docstring)."""
        linear_class = module.__dict__.pop("int8_linear", DynamicLinear)
        return module if module.form != "leaf" else cls(module, module.qconfig, linear_class)

    hard_leaves = FFF.hard_leaves  # the float tree's routing: it reads node_weight, node_bias and depth only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if not rows.shape[0]:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        y = by_leaf(rows, self.hard_leaves(rows), len(self.leaves), lambda leaf, tokens: self.leaves[leaf](tokens))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, depth={self.depth}, form='leaf', int8 leaves"


def _int8(weight: torch.Tensor, bias: torch.Tensor, qconfig, linear_class: type[DynamicLinear]) -> DynamicLinear:
    """A dynamic int8 Linear (``linear_class``) for y = weight x + bias (weight (out, in)), quantized as ``qconfig``
    says."""
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    linear.qconfig = qconfig
    return linear_class.from_float(linear)


register_quantized(FFF, QuantizedFFF)
