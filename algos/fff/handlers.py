"""What FFF-replace does with each family of dense blocks (``algos.surgery.blocks``: which blocks are dense is the
core's knowledge): where an FFF of the same input/output width goes, and what else changes with it.

* HF BERT family: the FFF takes ``BertIntermediate``'s place and yields d features; ``output.dense`` becomes an
  identity, so ``BertOutput`` still applies its dropout, the residual and the pretrained LayerNorm.
* ``nn.Sequential`` MLP: the whole Sequential is replaced (by the FFF, followed by the block's dropout if it had one).
* ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``: ``linear1`` becomes the FFF (inside
  ``TransformerLayerFFF``) and ``linear2`` an identity; the layer's activation and inner dropout (which would now act
  on the FFF's output) become identities too, and PyTorch's fused encoder fast path, which reads
  ``linear1.weight``, is turned off.
* A lone ``nn.Linear`` (only when named in ``target_modules``): replaced by an FFF from in to out features.

Only a Transformer layer survives its own conversion (``already_converted``); every other block is replaced whole,
and the core never selects a module a surgery made, so applying FFF twice is applying it once.
"""

from __future__ import annotations

from torch import nn

from algos.fff.blocks import TransformerLayerFFF
from algos.fff.config import FFFConfig
from algos.surgery.blocks import BertFeedForward, Block, SequentialMLP, TransformerLayerFeedForward
from algos.surgery.replace import Rewrite
from algos.surgery.targets import converted_by


def rewrite(block: Block, fff: nn.Module, fqn: str, notes: dict) -> Rewrite:
    """Where the tree goes and what else changes with it (by default: the tree replaces the block whole)."""
    family = block.family
    if isinstance(family, BertFeedForward):  # BertIntermediate -> FFF; BertOutput keeps dropout, residual, LayerNorm
        return Rewrite(fff, notes, companions={_sibling(fqn, "output.dense"): nn.Identity()}, counted_as=block.dense)
    if isinstance(family, SequentialMLP) and block.dropout > 0:
        return Rewrite(nn.Sequential(fff, nn.Dropout(block.dropout)), notes, counted_as=block.dense)
    if tree_goes_inside(block):
        return Rewrite(TransformerLayerFFF(fff), notes, at=f"{fqn}.linear1",
                       companions={f"{fqn}.linear2": nn.Identity()}, counted_as=block.dense)
    return Rewrite(fff, notes, counted_as=block.dense)


def tree_goes_inside(block: Block) -> bool:
    """The block keeps its class, with the tree inside it (so a root block could stay): Transformer layers."""
    return isinstance(block.family, TransformerLayerFeedForward)


def already_converted(module: nn.Module) -> bool:
    """A block that survived its conversion (the tree inside it), so that it is no candidate again."""
    return (isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
            and converted_by(module.linear1) == FFFConfig.algorithm)


def _sibling(fqn: str, name: str) -> str:
    """The module ``name`` beside ``fqn`` (in the same parent; the model's own attribute at the root)."""
    parent = fqn.rpartition(".")[0]
    return f"{parent}.{name}" if parent else name
