"""FNet-mixing's per-class handlers: the attention families it rewrites, one handler each, found by type in
``FAMILIES``.

A handler knows, for a module of its family: its ``Role`` in the model (cross-attention, decoder self-attention or
encoder self-attention), the default ``norm`` (``"ortho"`` where the attention sits in a pre-LN residual branch,
the paper's ``"backward"`` in post-LN blocks), what it cannot honour, and how to build its Fourier replacement.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum

from torch import nn

from algos.fnet.adapters import (
    BartConvention,
    CallConvention,
    FourierBertAttention,
    FourierSelfAttention,
    FourierSeqAttention,
    GPT2Convention,
    T5Convention,
)
from algos.fnet.mixing import FourierMixing
from algos.surgery.handlers import Handlers, hf_classes

# Where HF layers hold their cross-attention: BERT and GPT-2, BART, T5.
HF_CROSS_SLOTS = ("crossattention", "encoder_attn", "EncDecAttention")


class Role(Enum):
    """What an attention module does in its model. Only self-attention can become Fourier mixing."""

    ENCODER = "encoder"  # bidirectional self-attention
    DECODER = "decoder"  # causal self-attention of a decoder
    CROSS = "cross"  # encoder-decoder attention: stays attention


class AttentionFamily(ABC):
    """How one family of attention modules is read and replaced."""

    def role(self, module: nn.Module, parent: nn.Module) -> Role:
        if self.is_cross(module, parent):
            return Role.CROSS
        return Role.DECODER if self.is_decoder(module, parent) else Role.ENCODER

    @abstractmethod
    def is_cross(self, module: nn.Module, parent: nn.Module) -> bool: ...

    @abstractmethod
    def is_decoder(self, module: nn.Module, parent: nn.Module) -> bool: ...

    @abstractmethod
    def default_norm(self, module: nn.Module, parent: nn.Module) -> str:
        """The ``norm`` used when the settings leave it to the target (``norm=None``)."""

    def unsupported(self, module: nn.Module) -> str | None:
        """Why mixing cannot stand in for this module (the surgery then refuses the model), or None."""
        return None

    @abstractmethod
    def build(self, module: nn.Module, mixing: FourierMixing) -> nn.Module:
        """The module that stands where ``module`` stood and calls ``mixing``."""

    @abstractmethod
    def width(self, module: nn.Module) -> int:
        """The width of what the attention adds to the residual stream."""

    def output_projection(self, module: nn.Module) -> nn.Module | None:
        """The affine module, called as a module, whose output is what the attention adds to the residual stream
        (its mean output is its output at its mean input: what a gated mixing's shift starts from), or None."""
        return None


@dataclass(frozen=True)
class HFFamily(AttentionFamily):
    """An HF family: its layers hold cross-attention under ``cross_slot``; ``pre_ln`` says where the layer norm is."""

    cross_slot: str
    pre_ln: bool

    def is_cross(self, module, parent):
        return getattr(parent, self.cross_slot, None) is module

    def default_norm(self, module, parent):
        return "ortho" if self.pre_ln else "backward"


@dataclass(frozen=True)
class BertFamily(HFFamily):
    """HF BERT / RoBERTa: the whole ``BertAttention`` sublayer (self-attention + ``BertSelfOutput``) is replaced,
    keeping its pretrained LayerNorm; the attention flags live on ``.self``."""

    def is_decoder(self, module, parent=None):
        return bool(getattr(module.self, "is_decoder", False))

    def unsupported(self, module):
        kind = getattr(module.self, "position_embedding_type", "absolute")
        if kind != "absolute":
            return f"uses {kind!r} relative position scores, which Fourier mixing cannot honour"
        return None

    def build(self, module, mixing):
        # the sublayer's own hidden dropout (BertSelfOutput.dropout) stays where it was, after the mixing
        return FourierBertAttention(mixing, module.output.LayerNorm, module.output.dropout.p,
                                    is_decoder=self.is_decoder(module))

    def width(self, module):
        return module.output.dense.out_features

    def output_projection(self, module):
        return module.output.dense


@dataclass(frozen=True)
class SeqFamily(HFFamily):
    """HF T5 / BART / GPT-2: only the attention module is replaced (the layer keeps its norms and residual), and
    answers in the tuple its layer unpacks (``convention``). ``decoder_only``: every self-attention is causal."""

    convention: CallConvention
    decoder_only: bool = False
    projection: str = "o"  # the attribute holding the output projection (T5 "o", BART "out_proj", GPT-2 "c_proj")

    def is_cross(self, module, parent):
        return super().is_cross(module, parent) or bool(getattr(module, "is_cross_attention", False))

    def is_decoder(self, module, parent):
        return self.decoder_only or bool(getattr(module, "is_decoder", False))

    def build(self, module, mixing):
        return FourierSeqAttention(mixing, self.convention, getattr(module, "layer_idx", None))

    def width(self, module):
        projection = self.output_projection(module)  # an nn.Linear, or GPT-2's Conv1D with weight (in, out)
        return projection.out_features if isinstance(projection, nn.Linear) else projection.weight.shape[-1]

    def output_projection(self, module):
        return getattr(module, self.projection)


class MultiheadFamily(AttentionFamily):
    """``nn.MultiheadAttention`` as self-attention (torchvision ViT, ``nn.TransformerEncoderLayer``); in an
    ``nn.TransformerDecoderLayer`` its ``self_attn`` is decoder self-attention and ``multihead_attn`` cross."""

    def is_cross(self, module, parent):
        if isinstance(parent, nn.TransformerDecoderLayer):
            return parent.multihead_attn is module
        return any(getattr(parent, slot, None) is module for slot in HF_CROSS_SLOTS)  # custom blocks named as HF's

    def is_decoder(self, module, parent):
        return isinstance(parent, nn.TransformerDecoderLayer)

    def default_norm(self, module, parent):
        # pre-LN blocks (ViT, norm_first=True) need the scale-keeping "ortho"; post-LN ones take the paper's
        return "backward" if getattr(parent, "norm_first", True) is False else "ortho"

    def build(self, module, mixing):
        return FourierSelfAttention(mixing, batch_first=module.batch_first, embed_dim=module.embed_dim)

    def width(self, module):  # (its out_proj is applied functionally, never called: no output projection to read)
        return module.embed_dim


FAMILIES: Handlers[AttentionFamily] = Handlers()
FAMILIES.register(BertFamily(cross_slot="crossattention", pre_ln=False),
                  *hf_classes(("bert", "BertAttention"), ("roberta", "RobertaAttention")))
FAMILIES.register(SeqFamily(cross_slot="EncDecAttention", pre_ln=True, convention=T5Convention()),
                  *hf_classes(("t5", "T5Attention"), ("mt5", "MT5Attention")))
FAMILIES.register(SeqFamily(cross_slot="encoder_attn", pre_ln=False, convention=BartConvention(),
                            projection="out_proj"),
                  *hf_classes(("bart", "BartAttention"), ("mbart", "MBartAttention")))
FAMILIES.register(SeqFamily(cross_slot="crossattention", pre_ln=True, convention=GPT2Convention(),
                            decoder_only=True, projection="c_proj"), *hf_classes(("gpt2", "GPT2Attention")))
FAMILIES.register(MultiheadFamily(), nn.MultiheadAttention)
