"""The dense feed-forward blocks FFF-replace recognises, seen through one view (``DenseMLP``), and how an FFF of the
same input/output width is put in each one's place.

* HF BERT family: ``BertIntermediate`` (dense d -> 4d + activation) with the ``BertOutput`` beside it. The FFF takes
  the intermediate's place and yields d features; ``output.dense`` becomes an identity, so ``BertOutput`` still
  applies its dropout, the residual and the pretrained LayerNorm.
* ``nn.Sequential`` of (Linear, activation, [Dropout], Linear, [Dropout]), torchvision's ViT ``MLPBlock`` included:
  the whole Sequential is replaced (by the FFF, followed by the block's dropout if it had one).
* ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``: ``linear1`` becomes the FFF and ``linear2`` an
  identity; the layer's activation and inner dropout (which would now act on the FFF's output) become identities
  too, and PyTorch's fused encoder fast path, which reads ``linear1.weight``, is turned off.
* A lone ``nn.Linear`` (only when named in ``target_modules``): replaced by an FFF from in to out features.

A block whose dense layers a surgery already rewrote is not a dense block. Only a Transformer layer survives its own
conversion (``rewritten_in_place``); every other block is replaced whole, and the core never selects a module a
surgery made, so applying FFF twice is applying it once.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from algos.surgery.replace import Rewrite
from algos.surgery.targets import converted_by

ALGORITHM = "FFFReplace"  # the name new modules are marked with (``algos.surgery.targets.converted_by``)
ACTIVATION_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Mish, nn.ELU)


def _hf_intermediate_classes() -> tuple[type[nn.Module], ...]:
    classes = []
    for model in ("bert", "roberta"):
        try:
            module = __import__(f"transformers.models.{model}.modeling_{model}", fromlist=["x"])
            classes.append(getattr(module, f"{model.capitalize()}Intermediate"))
        except (ImportError, AttributeError):  # pragma: no cover - transformers (the nlp extra) not installed
            continue
    return tuple(classes)


HF_INTERMEDIATE = _hf_intermediate_classes()
TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
BLOCK_CLASSES = HF_INTERMEDIATE + TRANSFORMER_LAYERS + (nn.Sequential,)


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

    def forward(self, x):
        hidden = self.fc1(x)
        return hidden if self.fc2 is None else self.fc2(self.activation(hidden))


@dataclass
class Block:
    """A recognised dense block: its ``DenseMLP`` view, the dropout on its output, and where things go."""

    dense: DenseMLP
    kind: str
    dropout: float = 0.0

    def rewrite(self, fff: nn.Module, fqn: str, notes: dict) -> Rewrite:
        """Where the FFF goes and what else changes with it, for ``apply_surgery``."""
        if self.kind == "bert":  # BertIntermediate -> FFF; the sibling BertOutput keeps dropout/residual/LayerNorm
            parent = fqn.rpartition(".")[0]
            return Rewrite(fff, notes, companions={f"{parent}.output.dense": nn.Identity()}, counted_as=self.dense)
        if self.kind == "transformer_layer":
            return Rewrite(TransformerLayerFFF(fff), notes, at=f"{fqn}.linear1",
                           companions={f"{fqn}.linear2": nn.Identity()}, counted_as=self.dense)
        if self.kind == "sequential" and self.dropout > 0:
            return Rewrite(nn.Sequential(fff, nn.Dropout(self.dropout)), notes, counted_as=self.dense)
        return Rewrite(fff, notes, counted_as=self.dense)


class TransformerLayerFFF(nn.Module):
    """The FFF in ``linear1``'s place inside an ``nn.Transformer{Encoder,Decoder}Layer``, whose feed-forward is
    ``dropout2(linear2(dropout(activation(linear1(x)))))``. Installed, it makes the layer's activation and inner
    dropout identities (``linear2`` is one already) and turns off the fused encoder fast path."""

    def __init__(self, fff: nn.Module):
        super().__init__()
        self.fff = fff

    def forward(self, x):
        return self.fff(x)

    def on_install(self, layer: nn.Module) -> None:
        layer.activation = nn.Identity()
        layer.dropout = nn.Identity()
        layer.activation_relu_or_gelu = 0  # read by the fast-path check, which would then use linear1.weight


def find_block(module: nn.Module, fqn: str, model: nn.Module) -> Block | str:
    """The ``Block`` for a selected module, or a short reason it is not a dense MLP block."""
    block = _recognise(module, fqn, model)
    if isinstance(block, str):
        return block
    for layer in (block.dense.fc1, block.dense.fc2):
        if layer is not None and (converted_by(layer) or not isinstance(layer, nn.Linear)):
            made = f" from {converted_by(layer)}" if converted_by(layer) else ""
            return f"a {type(module).__name__} whose dense layer was replaced ({type(layer).__name__}{made})"
    return block


def _recognise(module: nn.Module, fqn: str, model: nn.Module) -> Block | str:
    if isinstance(module, HF_INTERMEDIATE):
        parent = model.get_submodule(fqn.rpartition(".")[0]) if "." in fqn else model
        output = getattr(parent, "output", None)
        if not all(isinstance(getattr(output, name, None), nn.Module) for name in ("dense", "dropout", "LayerNorm")):
            return "a BERT intermediate layer without the BertOutput (dense, dropout, LayerNorm) beside it"
        return Block(DenseMLP(module.dense, module.intermediate_act_fn, output.dense), "bert")
    if isinstance(module, TRANSFORMER_LAYERS):
        return Block(DenseMLP(module.linear1, module.activation, module.linear2), "transformer_layer")
    if isinstance(module, nn.Sequential):
        layers = [layer for layer in module if not isinstance(layer, nn.Dropout)]
        dropouts = [layer.p for layer in module if isinstance(layer, nn.Dropout)]
        if (len(layers) == 3 and isinstance(layers[0], nn.Linear) and isinstance(layers[1], ACTIVATION_MODULES)
                and isinstance(layers[2], nn.Linear) and layers[0].out_features == layers[2].in_features):
            return Block(DenseMLP(layers[0], layers[1], layers[2]), "sequential", max(dropouts, default=0.0))
        kinds = ", ".join(type(layer).__name__ for layer in module)
        return f"an nn.Sequential of ({kinds}), not (Linear, activation, [Dropout], Linear, [Dropout])"
    if isinstance(module, nn.Linear):
        return Block(DenseMLP(module), "linear")
    return f"a {type(module).__name__}, not a dense MLP block"


def is_block(module: nn.Module, fqn: str, model: nn.Module) -> bool:
    return isinstance(find_block(module, fqn, model), Block)


def rewritten_in_place(module: nn.Module) -> bool:
    """A Transformer layer FFFReplace already converted: it keeps its class, with the tree in ``linear1``."""
    return isinstance(module, TRANSFORMER_LAYERS) and converted_by(module.linear1) == ALGORITHM
