"""FFF-replace's module besides the tree (``algos.fff.tree.FFF``): ``TransformerLayerFFF``, the tree's seat inside a
PyTorch Transformer layer. Which blocks are dense: ``algos.surgery.blocks``; how each family is rewired:
``algos.fff.handlers``.
"""

from __future__ import annotations

from torch import nn

from algos.surgery.pretrained import SPECS


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


SPECS.register("TransformerLayerFFF", TransformerLayerFFF, lambda m, spec: {"fff": spec(m.fff)},
               lambda s, child: TransformerLayerFFF(child(s["fff"])))
