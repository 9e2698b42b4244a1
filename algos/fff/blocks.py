"""FFF-replace's modules besides the tree (``algos.fff.tree.FFF``): ``DenseMLP``, the view of a dense block, and
``TransformerLayerFFF``, the tree's seat inside a PyTorch Transformer layer. Which blocks are dense and how each family
is rewired: ``algos.fff.handlers``.
"""

from __future__ import annotations

from torch import nn


class DenseMLP(nn.Module):
    """``fc2(act(fc1(x)))`` (or just ``fc1(x)`` for a lone Linear): a dense block seen as one module. It is what
    dense initialisation reads and what the surgery report counts as "before"; it wraps the model's own layers."""

    def __init__(self, fc1: nn.Linear, activation=None, fc2: nn.Linear | None = None):
        super().__init__()
        self.fc1, self.activation, self.fc2 = fc1, activation, fc2

    @property
    def in_features(self) -> int:
        return self.fc1.in_features

    @property
    def out_features(self) -> int:
        return (self.fc2 or self.fc1).out_features

    @property
    def is_lone_linear(self) -> bool:
        return self.fc2 is None

    def forward(self, x):
        hidden = self.fc1(x)
        return hidden if self.fc2 is None else self.fc2(self.activation(hidden))


class TransformerLayerFFF(nn.Module):
    """The FFF in ``linear1``'s place inside an ``nn.Transformer{Encoder,Decoder}Layer``, whose feed-forward is
    ``dropout2(linear2(dropout(activation(linear1(x)))))``. Installed (``InstallsIntoParent``), it makes the layer's
    activation and inner dropout identities (``linear2`` is one already) and turns off the fused encoder fast path."""

    def __init__(self, fff: nn.Module):
        super().__init__()
        self.fff = fff

    def forward(self, x):
        return self.fff(x)

    def on_install(self, layer: nn.Module) -> None:
        layer.activation = nn.Identity()
        layer.dropout = nn.Identity()
        layer.activation_relu_or_gelu = 0  # read by the fast-path check, which would then use linear1.weight
