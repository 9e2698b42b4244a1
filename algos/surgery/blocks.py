"""Dense MLP blocks: what one looks like in each family the suite knows, shared by every algorithm that works on
blocks (FFF-replace puts a tree in a block's place, Factorize fits a block's two layers together). Each family is a
handler in ``BLOCKS`` (found by type) that sees its blocks through one view, ``DenseMLP``; what an algorithm does
with a block stays in that algorithm's folder.

* HF BERT family (``BertFeedForward``): ``BertIntermediate`` (dense d -> 4d + activation) with ``BertOutput.dense``
  beside it (its dropout, residual and LayerNorm are not part of the block).
* ``SequentialMLP``: an ``nn.Sequential`` of (Linear, activation, [Dropout], Linear, [Dropout]), torchvision's ViT
  ``MLPBlock`` included.
* ``TransformerLayerFeedForward``: the ``linear1`` / ``linear2`` of an ``nn.TransformerEncoderLayer`` /
  ``nn.TransformerDecoderLayer``.
* ``LoneLinear``: an ``nn.Linear`` (a block only where an algorithm's ``target_modules`` names it).

A block whose dense layers a surgery already rewrote is not a dense block (``NotADenseBlock`` says what it is).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from algos.surgery.handlers import Handlers, hf_classes
from algos.surgery.targets import converted_by

ACTIVATION_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Mish, nn.ELU)


class DenseMLP(nn.Module):
    """``fc2(act(fc1(x)))`` (or just ``fc1(x)`` for a lone Linear): a dense block seen as one module. It is what
    FFF's dense initialisation reads and what a surgery report counts as "before"; it wraps the model's own layers."""

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


class NotADenseBlock(Exception):
    """A module of a block family that is not shaped as a dense MLP block; the message says what it is instead."""


@dataclass
class Block:
    """A recognised dense block: its ``DenseMLP`` view, the family that found it, the dropout on its output."""

    dense: DenseMLP
    family: BlockFamily
    dropout: float = 0.0


class BlockFamily:
    """How to find the dense MLP in one family of blocks."""

    def find(self, module: nn.Module, fqn: str, model: nn.Module) -> Block:
        """The ``Block`` at ``fqn``, or ``NotADenseBlock`` saying what the module is instead."""
        block = self.view(module, fqn, model)
        for layer in (block.dense.fc1, block.dense.fc2):
            if layer is not None and (converted_by(layer) or not isinstance(layer, nn.Linear)):
                made = f" from {converted_by(layer)}" if converted_by(layer) else ""
                raise NotADenseBlock(f"a {type(module).__name__} whose dense layer was replaced "
                                     f"({type(layer).__name__}{made})")
        return block

    def view(self, module: nn.Module, fqn: str, model: nn.Module) -> Block:
        raise NotImplementedError


class BertFeedForward(BlockFamily):
    def view(self, intermediate: nn.Module, fqn: str, model: nn.Module) -> Block:
        output = getattr(model.get_submodule(fqn.rpartition(".")[0]), "output", None)
        if not all(isinstance(getattr(output, name, None), nn.Module) for name in ("dense", "dropout", "LayerNorm")):
            raise NotADenseBlock("a BERT intermediate layer without the BertOutput (dense, dropout, LayerNorm) "
                                 "beside it")
        return Block(DenseMLP(intermediate.dense, intermediate.intermediate_act_fn, output.dense), self)


class SequentialMLP(BlockFamily):
    def view(self, sequential: nn.Sequential, fqn: str, model: nn.Module) -> Block:
        layers = [layer for layer in sequential if not isinstance(layer, nn.Dropout)]
        dropouts = [layer.p for layer in sequential if isinstance(layer, nn.Dropout)]
        if (len(layers) == 3 and isinstance(layers[0], nn.Linear) and isinstance(layers[1], ACTIVATION_MODULES)
                and isinstance(layers[2], nn.Linear) and layers[0].out_features == layers[2].in_features):
            return Block(DenseMLP(*layers), self, max(dropouts, default=0.0))
        kinds = ", ".join(type(layer).__name__ for layer in sequential)
        raise NotADenseBlock(f"an nn.Sequential of ({kinds}), not (Linear, activation, [Dropout], Linear, "
                             f"[Dropout])")


class TransformerLayerFeedForward(BlockFamily):
    def view(self, layer: nn.Module, fqn: str, model: nn.Module) -> Block:
        return Block(DenseMLP(layer.linear1, layer.activation, layer.linear2), self)


class LoneLinear(BlockFamily):
    def view(self, linear: nn.Linear, fqn: str, model: nn.Module) -> Block:
        return Block(DenseMLP(linear), self)


BLOCKS: Handlers[BlockFamily] = Handlers()
BLOCKS.register(BertFeedForward(), *hf_classes(("bert", "BertIntermediate"), ("roberta", "RobertaIntermediate")))
BLOCKS.register(SequentialMLP(), nn.Sequential)
BLOCKS.register(TransformerLayerFeedForward(), nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
BLOCKS.register(LoneLinear(), nn.Linear)
# Found without a name; a lone nn.Linear is a block only where target_modules names it.
BLOCK_CLASSES = tuple(cls for cls in BLOCKS.classes if cls is not nn.Linear)
