"""FNet-mixing: the functional ``apply_fnet_mixing`` and the Composer algorithm ``FNetMixing``."""

from __future__ import annotations

import math

from torch import nn

from algos.fnet.adapters import FourierBertAttention, FourierSelfAttention, FourierSeqAttention
from algos.fnet.mixing import FourierMixing, check_mixing_arguments
from algos.surgery.algorithm import SurgeryAlgorithm
from algos.surgery.replace import SkipModule
from algos.surgery.report import SurgeryReport
from algos.surgery.surgery import apply_surgery


def _hf_classes(names: tuple[tuple[str, str], ...]) -> tuple[type[nn.Module], ...]:
    """The named HF modeling classes that the installed transformers has (none without the nlp extra)."""
    classes = []
    for module_name, class_name in names:
        try:
            module = __import__(f"transformers.models.{module_name}.modeling_{module_name}", fromlist=[class_name])
            classes.append(getattr(module, class_name))
        except (ImportError, AttributeError):  # pragma: no cover - transformers (the nlp extra) not installed
            continue
    return tuple(classes)


# BERT family: the whole sublayer (self-attention + .output dense/LayerNorm) is replaced.
HF_ATTENTION = _hf_classes((("bert", "BertAttention"), ("roberta", "RobertaAttention")))
# Seq2seq and decoder families: the attention module alone (the layer keeps its norm and residual).
HF_SEQ_ATTENTION = {cls: family for family, names in (
    ("t5", (("t5", "T5Attention"), ("mt5", "MT5Attention"))),
    ("bart", (("bart", "BartAttention"), ("mbart", "MBartAttention"))),
    ("gpt2", (("gpt2", "GPT2Attention"),)),
) for cls in _hf_classes(names)}
ATTENTION_CLASSES = HF_ATTENTION + tuple(HF_SEQ_ATTENTION) + (nn.MultiheadAttention,)
SCOPES = ("encoder", "decoder", "all")
PRE_LN_FAMILIES = ("t5", "gpt2")  # their attention sits after a norm, inside the residual branch


def attention_role(module: nn.Module, fqn: str, parent: nn.Module | None) -> str:
    """"cross" (encoder-decoder attention), "decoder" (causal self-attention of a decoder) or "encoder"."""
    inner = getattr(module, "self", module)  # BERT keeps the attention flags on .self
    name = fqn.rpartition(".")[2]
    if (name in ("crossattention", "encoder_attn", "EncDecAttention")
            or getattr(inner, "is_cross_attention", False)
            or (isinstance(parent, nn.TransformerDecoderLayer) and name == "multihead_attn")):
        return "cross"
    if (HF_SEQ_ATTENTION.get(type(module)) == "gpt2" or getattr(inner, "is_decoder", False)
            or isinstance(parent, nn.TransformerDecoderLayer)):
        return "decoder"
    return "encoder"


def check_arguments(*, impl, causal, padding, norm, scope, keep_attention_layers, max_length, dropout) -> None:
    check_mixing_arguments(impl=impl, causal=causal, norm=norm, padding=padding, max_length=max_length)
    if scope not in SCOPES:
        raise ValueError(f"FNetMixing: scope={scope!r} is not one of {', '.join(map(repr, SCOPES))}.")
    if scope != "encoder" and not causal:
        raise ValueError(f"FNetMixing: scope={scope!r} mixes decoder self-attention, which must not look ahead; "
                         f"pass causal=True (with impl='dft'), or scope='encoder'.")
    keep = keep_attention_layers
    if keep is not None and not (isinstance(keep, float) and 0 <= keep < 1) and not (
            isinstance(keep, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in keep)):
        raise ValueError(f"FNetMixing: keep_attention_layers={keep!r} must be a list of layer indices (negative "
                         f"count from the last) or a float in [0, 1) (the share of last layers kept).")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ValueError(f"FNetMixing: dropout={dropout!r} must be in [0, 1).")


def apply_fnet_mixing(
    model: nn.Module,
    *,
    impl: str = "fft",
    causal: bool = False,
    scope: str = "encoder",
    padding: str = "ignore",
    norm: str | None = None,
    keep_attention_layers=None,
    max_length: int | None = None,
    dropout: float = 0.0,
    target_modules=None,
    exclude_modules=None,
    filter_fn=None,
    optimizers=None,
    strict: bool = False,
    example_inputs=None,
) -> SurgeryReport:
    """Replace self-attention sublayers by parameter-free Fourier mixing, in place.

    Targets: HF BERT-family ``BertAttention`` / ``RobertaAttention`` (the whole sublayer, pretrained LayerNorm kept),
    HF T5 / BART / GPT-2 attention (the attention module; the layer keeps its norm and residual), and
    ``nn.MultiheadAttention`` used as self-attention (torchvision ViT, ``nn.TransformerEncoderLayer``).
    Cross-attention always stays attention (skipped, with the reason in the report).

    Args:
        impl: ``"fft"`` (paper), ``"rfft"`` (half spectrum, same result), ``"dft"`` (two real GEMMs; needed for causal).
        causal: output t depends on inputs up to t only (masked DFT); for decoders and prefix-LMs.
        scope: which self-attention is mixed: ``"encoder"`` (default; an encoder-decoder keeps its decoder),
            ``"decoder"`` (decoder self-attention, e.g. GPT-2 layers; needs ``causal=True``) or ``"all"`` (both; needs
            ``causal=True``, which then applies to the encoder too). Out-of-scope layers are skipped.
        padding: ``"ignore"`` (paper) or ``"mask"``: padded positions zeroed, mixing at the fixed ``max_length``.
        norm: ``"backward"`` (paper) or ``"ortho"``; None picks per target: ``"backward"`` for post-LN blocks (BERT,
            BART, ``norm_first=False``), ``"ortho"`` for pre-LN ones (ViT, T5, GPT-2, ``norm_first=True``).
        keep_attention_layers: indices among the in-scope self-attention layers to keep as attention (negative count
            from the end; ``[-2, -1]`` is FNet-Hybrid), or a float: that share of the last layers.
        max_length: the fixed mixing length for ``padding="mask"`` and ``causal``; default: the HF config's
            ``max_position_embeddings``.
        dropout: dropout on the mixing output (default 0, as FNet).
    """
    check_arguments(impl=impl, causal=causal, padding=padding, norm=norm, scope=scope,
                    keep_attention_layers=keep_attention_layers, max_length=max_length, dropout=dropout)
    options = dict(impl=impl, causal=causal, padding=padding, norm=norm, dropout=dropout,
                   max_length=max_length or _config_max_length(model))
    kept: set[str] = set()
    roles: dict[str, str] = {}

    def prepare(targets):
        roles.update({fqn: attention_role(module, fqn, _parent(model, fqn)) for fqn, module in targets})
        in_scope = [fqn for fqn, _ in targets if roles[fqn] != "cross" and scope in ("all", roles[fqn])]
        kept.update(_kept_layers(in_scope, keep_attention_layers))

    def convert(module: nn.Module, fqn: str):
        role = roles[fqn]
        if role == "cross":
            raise SkipModule("cross-attention stays attention (Fourier mixing has no cross-attention form)")
        if scope not in ("all", role):
            raise SkipModule(f"{role} self-attention, outside scope={scope!r}")
        if fqn in kept:
            raise SkipModule("kept as attention (keep_attention_layers)")
        return to_fourier(module, fqn, _parent(model, fqn), **options)

    return apply_surgery(model, convert, algorithm="FNetMixing", classes=ATTENTION_CLASSES,
                         target_modules=target_modules, exclude_modules=exclude_modules, filter_fn=filter_fn,
                         optimizers=optimizers, strict=strict, example_inputs=example_inputs, prepare=prepare)


def to_fourier(module: nn.Module, fqn: str, parent: nn.Module | None, *, impl, causal, padding, norm, dropout,
               max_length):
    """The Fourier module for one attention module, or a one-line ValueError naming it when mixing cannot stand in."""
    if (causal or padding == "mask") and max_length is None:
        raise ValueError(f"FNetMixing: {fqn!r}: causal=True and padding='mask' need max_length= (no HF config "
                         f"with max_position_embeddings was found).")
    if isinstance(module, HF_ATTENTION):
        attention = module.self
        if getattr(attention, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"FNetMixing: {fqn!r} uses {attention.position_embedding_type!r} relative position "
                             f"scores, which Fourier mixing cannot honour.")
        norm = norm or "backward"  # BERT is post-LN
        mixing = FourierMixing(impl, causal=causal, norm=norm, padding=padding, max_length=max_length,
                               dropout=dropout)
        # the sublayer's own hidden dropout (BertSelfOutput.dropout) stays where it was, after the mixing
        new = FourierBertAttention(mixing, module.output.LayerNorm, module.output.dropout.p,
                                   is_decoder=getattr(attention, "is_decoder", False))
    elif type(module) in HF_SEQ_ATTENTION:
        family = HF_SEQ_ATTENTION[type(module)]
        norm = norm or ("ortho" if family in PRE_LN_FAMILIES else "backward")  # BART is post-LN
        mixing = FourierMixing(impl, causal=causal, norm=norm, padding=padding, max_length=max_length,
                               dropout=dropout)
        new = FourierSeqAttention(mixing, family, getattr(module, "layer_idx", None))
    else:
        # pre-LN blocks (ViT, norm_first=True) need the scale-keeping "ortho"; post-LN ones take the paper's
        norm = norm or ("backward" if getattr(parent, "norm_first", True) is False else "ortho")
        mixing = FourierMixing(impl, causal=causal, norm=norm, padding=padding, max_length=max_length,
                               dropout=dropout)
        new = FourierSelfAttention(mixing, batch_first=module.batch_first, embed_dim=module.embed_dim)
    return new, {"impl": impl, "norm": norm}


def _kept_layers(fqns: list[str], keep) -> set[str]:
    if keep is None:
        return set()
    if isinstance(keep, float):
        count = math.floor(keep * len(fqns) + 0.5)
        return set(fqns[len(fqns) - count:]) if count else set()
    bad = [index for index in keep if not -len(fqns) <= index < len(fqns)]
    if bad:
        raise ValueError(f"FNetMixing: keep_attention_layers={list(keep)} has indices {bad} outside the "
                         f"{len(fqns)} targeted attention layers.")
    return {fqns[index] for index in keep}


def _parent(model: nn.Module, fqn: str) -> nn.Module | None:
    return model.get_submodule(fqn.rpartition(".")[0]) if "." in fqn else model


def _config_max_length(model: nn.Module) -> int | None:
    for module in model.modules():
        length = getattr(getattr(module, "config", None), "max_position_embeddings", None)
        if isinstance(length, int):
            return length
    return None


class FNetMixing(SurgeryAlgorithm):
    """Composer form of :func:`apply_fnet_mixing` (at ``Event.INIT``, or at ``apply_at``)."""

    def __init__(self, *, impl: str = "fft", causal: bool = False, scope: str = "encoder",
                 padding: str = "ignore", norm: str | None = None,
                 keep_attention_layers=None, max_length: int | None = None, dropout: float = 0.0, apply_at=None,
                 target_modules=None, exclude_modules=None, filter_fn=None, strict: bool = False):
        check_arguments(impl=impl, causal=causal, padding=padding, norm=norm, scope=scope,
                        keep_attention_layers=keep_attention_layers, max_length=max_length, dropout=dropout)
        self.impl, self.causal, self.scope, self.padding, self.norm = impl, causal, scope, padding, norm
        self.keep_attention_layers, self.max_length, self.dropout = keep_attention_layers, max_length, dropout
        super().__init__(apply_at=apply_at, target_modules=target_modules, exclude_modules=exclude_modules,
                         filter_fn=filter_fn, strict=strict)

    def surgery(self, model: nn.Module, optimizers=None, calibration=None) -> SurgeryReport:
        return apply_fnet_mixing(
            model, impl=self.impl, causal=self.causal, scope=self.scope, padding=self.padding, norm=self.norm,
            keep_attention_layers=self.keep_attention_layers, max_length=self.max_length, dropout=self.dropout,
            target_modules=self.target_modules, exclude_modules=self.exclude_modules, filter_fn=self.filter_fn,
            optimizers=optimizers, strict=self.strict)
