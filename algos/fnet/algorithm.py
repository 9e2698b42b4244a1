"""FNet-mixing: the functional ``apply_fnet_mixing`` and the Composer algorithm ``FNetMixing``."""

from __future__ import annotations

import math

from torch import nn

from algos.fnet.adapters import FourierBertAttention, FourierSelfAttention
from algos.fnet.mixing import FourierMixing, check_mixing_arguments
from algos.surgery.algorithm import SurgeryAlgorithm
from algos.surgery.replace import SkipModule, apply_surgery
from algos.surgery.report import SurgeryReport


def _hf_attention_classes() -> tuple[type[nn.Module], ...]:
    """HF BERT-family attention sublayers (``.self`` attention + ``.output`` dense/LayerNorm), where installed."""
    classes = []
    for module_name, class_name in (("bert", "BertAttention"), ("roberta", "RobertaAttention")):
        try:
            module = __import__(f"transformers.models.{module_name}.modeling_{module_name}", fromlist=[class_name])
            classes.append(getattr(module, class_name))
        except (ImportError, AttributeError):  # pragma: no cover - transformers (the nlp extra) not installed
            continue
    return tuple(classes)


HF_ATTENTION = _hf_attention_classes()
ATTENTION_CLASSES = HF_ATTENTION + (nn.MultiheadAttention,)


def check_arguments(*, impl, causal, padding, norm, keep_attention_layers, max_length, dropout) -> None:
    check_mixing_arguments(impl=impl, causal=causal, norm=norm, padding=padding, max_length=max_length)
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
    and ``nn.MultiheadAttention`` used as self-attention (torchvision ViT, ``nn.TransformerEncoderLayer``).

    Args:
        impl: ``"fft"`` (paper), ``"rfft"`` (half spectrum, same result), ``"dft"`` (two real GEMMs; needed for causal).
        causal: output t depends on inputs up to t only (masked DFT); for decoders and prefix-LMs.
        padding: ``"ignore"`` (paper) or ``"mask"``: padded positions zeroed, mixing at the fixed ``max_length``.
        norm: ``"backward"`` (paper) or ``"ortho"``; None picks per target: ``"backward"`` for post-LN blocks (BERT,
            ``norm_first=False``), ``"ortho"`` for pre-LN ones (ViT, ``norm_first=True``).
        keep_attention_layers: indices among the targeted layers to keep as attention (negative count from the
            end; ``[-2, -1]`` is FNet-Hybrid), or a float: that share of the last layers.
        max_length: the fixed mixing length for ``padding="mask"`` and ``causal``; default: the HF config's
            ``max_position_embeddings``.
        dropout: dropout on the mixing output (default 0, as FNet).
    """
    check_arguments(impl=impl, causal=causal, padding=padding, norm=norm, keep_attention_layers=keep_attention_layers,
                    max_length=max_length, dropout=dropout)
    options = dict(impl=impl, causal=causal, padding=padding, norm=norm, dropout=dropout,
                   max_length=max_length or _config_max_length(model))
    kept: set[str] = set()

    def prepare(targets):
        kept.update(_kept_layers([fqn for fqn, _ in targets], keep_attention_layers))

    def convert(module: nn.Module, fqn: str):
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
        if fqn.endswith("crossattention") or getattr(attention, "is_cross_attention", False):
            raise ValueError(f"FNetMixing: {fqn!r} is cross-attention, which Fourier mixing cannot replace; "
                             f"exclude it with exclude_modules.")
        if getattr(attention, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"FNetMixing: {fqn!r} uses {attention.position_embedding_type!r} relative position "
                             f"scores, which Fourier mixing cannot honour.")
        if getattr(attention, "is_decoder", False) and not causal:
            raise ValueError(f"FNetMixing: {fqn!r} is decoder self-attention (causal, with a KV cache); pass "
                             f"causal=True.")
        norm = norm or "backward"  # BERT is post-LN
        mixing = FourierMixing(impl, causal=causal, norm=norm, padding=padding, max_length=max_length,
                               dropout=dropout)
        # the sublayer's own hidden dropout (BertSelfOutput.dropout) stays where it was, after the mixing
        new = FourierBertAttention(mixing, module.output.LayerNorm, module.output.dropout.p,
                                   is_decoder=getattr(attention, "is_decoder", False))
    else:
        if isinstance(parent, nn.TransformerDecoderLayer):
            if fqn.endswith("multihead_attn"):
                raise ValueError(f"FNetMixing: {fqn!r} is cross-attention, which Fourier mixing cannot replace; "
                                 f"exclude it with exclude_modules.")
            if not causal:
                raise ValueError(f"FNetMixing: {fqn!r} is decoder self-attention (causal); pass causal=True.")
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

    def __init__(self, *, impl: str = "fft", causal: bool = False, padding: str = "ignore", norm: str | None = None,
                 keep_attention_layers=None, max_length: int | None = None, dropout: float = 0.0, apply_at=None,
                 target_modules=None, exclude_modules=None, filter_fn=None, strict: bool = False):
        check_arguments(impl=impl, causal=causal, padding=padding, norm=norm,
                        keep_attention_layers=keep_attention_layers, max_length=max_length, dropout=dropout)
        self.impl, self.causal, self.padding, self.norm = impl, causal, padding, norm
        self.keep_attention_layers, self.max_length, self.dropout = keep_attention_layers, max_length, dropout
        super().__init__(apply_at=apply_at, target_modules=target_modules, exclude_modules=exclude_modules,
                         filter_fn=filter_fn, strict=strict)

    def surgery(self, model: nn.Module, optimizers=None, calibration=None) -> SurgeryReport:
        return apply_fnet_mixing(
            model, impl=self.impl, causal=self.causal, padding=self.padding, norm=self.norm,
            keep_attention_layers=self.keep_attention_layers, max_length=self.max_length, dropout=self.dropout,
            target_modules=self.target_modules, exclude_modules=self.exclude_modules, filter_fn=self.filter_fn,
            optimizers=optimizers, strict=self.strict)
