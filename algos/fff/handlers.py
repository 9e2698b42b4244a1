"""FFF-replace's per-class handlers: the dense feed-forward block families it recognises, one handler per family in
``BLOCKS`` (found by type). Each sees its blocks through one view (``algos.fff.blocks.DenseMLP``) and knows how an FFF
of the same input/output width takes their place.

* HF BERT family (``BertFeedForward``): ``BertIntermediate`` (dense d -> 4d + activation) with the ``BertOutput``
  beside it. The FFF takes the intermediate's place and yields d features; ``output.dense`` becomes an identity, so
  ``BertOutput`` still applies its dropout, the residual and the pretrained LayerNorm.
* ``SequentialMLP``: an ``nn.Sequential`` of (Linear, activation, [Dropout], Linear, [Dropout]), torchvision's ViT
  ``MLPBlock`` included: the whole Sequential is replaced (by the FFF, followed by the block's dropout if it had one).
* ``TransformerLayerFeedForward``: ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``: ``linear1``
  becomes the FFF and ``linear2`` an identity; the layer's activation and inner dropout (which would now act on the
  FFF's output) become identities too, and PyTorch's fused encoder fast path, which reads ``linear1.weight``, is
  turned off.
* ``LoneLinear``: an ``nn.Linear`` (only when named in ``target_modules``), replaced by an FFF from in to out features.

A block whose dense layers a surgery already rewrote is not a dense block. Only a Transformer layer survives its own
conversion (``already_converted``); every other block is replaced whole, and the core never selects a module a
surgery made, so applying FFF twice is applying it once.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from algos.fff.blocks import DenseMLP, TransformerLayerFFF
from algos.fff.config import FFFConfig
from algos.surgery.handlers import Handlers, hf_classes
from algos.surgery.replace import Rewrite
from algos.surgery.targets import converted_by

ACTIVATION_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Mish, nn.ELU)


class NotADenseBlock(Exception):
    """A module of a block family that is not shaped as a dense MLP block; the message says what it is instead."""


@dataclass
class Block:
    """A recognised dense block: its ``DenseMLP`` view, the family that found it, the dropout on its output."""

    dense: DenseMLP
    family: BlockFamily
    dropout: float = 0.0

    def rewrite(self, fff: nn.Module, fqn: str, notes: dict) -> Rewrite:
        """Where the FFF goes and what else changes with it."""
        return self.family.rewrite(self, fff, fqn, notes)


class BlockFamily:
    """How FFF-replace finds the dense MLP in one family of blocks, and puts a tree in its place."""

    tree_goes_inside = False  # the block keeps its class, with the tree inside it (so a root block could stay)

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

    def rewrite(self, block: Block, fff: nn.Module, fqn: str, notes: dict) -> Rewrite:
        """By default the tree replaces the block whole."""
        return Rewrite(fff, notes, counted_as=block.dense)

    def already_converted(self, module: nn.Module) -> bool:
        """A block that survives its conversion (the tree inside it), so that it is no candidate again."""
        return False


class BertFeedForward(BlockFamily):
    def view(self, intermediate: nn.Module, fqn: str, model: nn.Module) -> Block:
        output = getattr(model.get_submodule(fqn.rpartition(".")[0]), "output", None)
        if not all(isinstance(getattr(output, name, None), nn.Module) for name in ("dense", "dropout", "LayerNorm")):
            raise NotADenseBlock("a BERT intermediate layer without the BertOutput (dense, dropout, LayerNorm) "
                                 "beside it")
        return Block(DenseMLP(intermediate.dense, intermediate.intermediate_act_fn, output.dense), self)

    def rewrite(self, block: Block, fff: nn.Module, fqn: str, notes: dict) -> Rewrite:
        """BertIntermediate -> FFF; the sibling BertOutput keeps its dropout, residual and LayerNorm."""
        output_dense = _sibling(fqn, "output.dense")
        return Rewrite(fff, notes, companions={output_dense: nn.Identity()}, counted_as=block.dense)


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

    def rewrite(self, block: Block, fff: nn.Module, fqn: str, notes: dict) -> Rewrite:
        if block.dropout > 0:
            return Rewrite(nn.Sequential(fff, nn.Dropout(block.dropout)), notes, counted_as=block.dense)
        return super().rewrite(block, fff, fqn, notes)


class TransformerLayerFeedForward(BlockFamily):
    tree_goes_inside = True

    def view(self, layer: nn.Module, fqn: str, model: nn.Module) -> Block:
        return Block(DenseMLP(layer.linear1, layer.activation, layer.linear2), self)

    def rewrite(self, block: Block, fff: nn.Module, fqn: str, notes: dict) -> Rewrite:
        return Rewrite(TransformerLayerFFF(fff), notes, at=f"{fqn}.linear1",
                       companions={f"{fqn}.linear2": nn.Identity()}, counted_as=block.dense)

    def already_converted(self, layer: nn.Module) -> bool:
        return converted_by(layer.linear1) == FFFConfig.algorithm


class LoneLinear(BlockFamily):
    def view(self, linear: nn.Linear, fqn: str, model: nn.Module) -> Block:
        return Block(DenseMLP(linear), self)


def _sibling(fqn: str, name: str) -> str:
    """The module ``name`` beside ``fqn`` (in the same parent; the model's own attribute at the root)."""
    parent = fqn.rpartition(".")[0]
    return f"{parent}.{name}" if parent else name


BLOCKS: Handlers[BlockFamily] = Handlers()
BLOCKS.register(BertFeedForward(), *hf_classes(("bert", "BertIntermediate"), ("roberta", "RobertaIntermediate")))
BLOCKS.register(SequentialMLP(), nn.Sequential)
BLOCKS.register(TransformerLayerFeedForward(), nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
BLOCKS.register(LoneLinear(), nn.Linear)
# Found without a name; a lone nn.Linear is a block only where target_modules names it.
BLOCK_CLASSES = tuple(cls for cls in BLOCKS.classes if cls is not nn.Linear)
