"""Modules that stand where an attention module stood and call FourierMixing with the signature its parent uses.

* HF BERT family: the whole ``BertAttention`` (self-attention + ``BertSelfOutput``) becomes
  ``LayerNorm(x + dropout(mix(x)))`` with the pretrained LayerNorm moved over. FNet has no output projection, so
  replacing the whole sublayer removes Q, K, V *and* O, and it is what FNet's encoder block is; keeping
  ``BertSelfOutput`` would keep an O projection FNet never had.
* ``nn.MultiheadAttention`` called as self-attention (torchvision ViT ``EncoderBlock``, ``nn.TransformerEncoderLayer``):
  returns ``(out, None)`` like ``need_weights=False``; it also disables PyTorch's fused encoder fast path, which
  would read the attention's projection weights.
* HF seq2seq and decoder attention (T5, BART, GPT-2 families): only the attention module itself is replaced (their
  layer norms and residuals sit in the enclosing layer); the module returns the tuple its family's layer unpacks.
  In a decoder, causal mixing keeps its own cache in the model's KV cache: the projected inputs z = [x C_D | x S_D]
  of every position so far (stored as the layer's "keys"), so ``generate`` with ``use_cache=True`` computes one new
  row per step, O(T D) like attention's cache, instead of re-mixing the whole prefix. Causal mixing reads the
  attention mask as causal attention does: a left-padded row is mixed from its first real token on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import partial
from typing import ClassVar

import torch
from torch import nn

from algos.fnet.mixing import FourierMixing
from algos.surgery.pretrained import SPECS


def keep_mask(mask: torch.Tensor | None, length: int | None, *, bool_true_means_pad: bool = False,
              causal: bool = False) -> torch.Tensor | None:
    """(batch, T) bool, True for real tokens, from the masks attention modules receive:
    an HF 0/1 integer mask; an additive float mask (0 keep, very negative drop) of shape (B, T), (B, 1, 1, T) or
    (B, 1, T, T) (eager and sdpa BERT); a bool mask (True = attend, or True = pad for ``key_padding_mask``).
    The last ``length`` keys, or all of them for ``length=None``."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        keep = ~mask if bool_true_means_pad else mask
    elif mask.is_floating_point():
        keep = mask > torch.finfo(mask.dtype).min / 2
    else:
        keep = mask != 0
    if keep.dim() == 4:  # (B, heads or 1, queries or 1, keys)
        # causal: the last query (the newest position) sees every real key; other rows may not be trusted, as HF's
        # sdpa on CUDA lets fully masked rows (a left pad's own) attend everywhere. Otherwise: a key is real if
        # any query may attend to it.
        keep = (keep[:, :, -1] if causal else keep.any(dim=-2)).any(dim=1)
    keep = keep.reshape(keep.shape[0], -1)
    return keep if length is None else keep[:, -length:]


class FourierBertAttention(nn.Module):
    """Replaces an HF ``BertAttention``: out = LayerNorm(x + dropout(mix(x))), returned as HF's tuple."""

    def __init__(self, mixing: FourierMixing, layer_norm: nn.LayerNorm, dropout: float, is_decoder: bool = False):
        super().__init__()
        self.mixing = mixing
        self.LayerNorm = layer_norm  # the pretrained one, under its HF name
        self.dropout = nn.Dropout(dropout)
        self.is_decoder = is_decoder

    def forward(self, hidden_states, attention_mask=None, head_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, past_key_value=None, output_attentions=False, **kwargs):
        keep = None
        if self.mixing.fixed_length:
            keep = keep_mask(attention_mask, hidden_states.shape[1], causal=self.mixing.causal)
        out = self.LayerNorm(hidden_states + self.dropout(self.mixing(hidden_states, keep)))
        outputs = (out,) + ((None,) if output_attentions else ())
        return outputs + ((None,) if self.is_decoder else ())  # a decoder layer reads a KV cache slot last: none


class FourierSelfAttention(nn.Module):
    """Replaces an ``nn.MultiheadAttention`` used as self-attention: ``forward(q, k, v, ...) -> (mix(q), None)``."""

    def __init__(self, mixing: FourierMixing, batch_first: bool, embed_dim: int):
        super().__init__()
        self.mixing = mixing
        self.batch_first = batch_first
        self.embed_dim = embed_dim
        # Read by nn.TransformerEncoder(Layer) to decide on the fused fast path: these keep it off.
        self._qkv_same_embed_dim = False
        self.in_proj_bias = None

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not (_same_tensor(key, query) and _same_tensor(value, query)):
            raise ValueError("FourierSelfAttention: called with key/value different from query (cross-attention); "
                             "Fourier mixing only replaces self-attention.")
        if (attn_mask is not None or is_causal) and not self.mixing.causal:
            raise ValueError("FourierSelfAttention: got an attn_mask / is_causal, which non-causal mixing cannot "
                             "honour; use causal=True for a causal mask.")
        x = query if self.batch_first or query.dim() == 2 else query.transpose(0, 1)
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0)
        keep = None
        if self.mixing.fixed_length and key_padding_mask is not None:
            keep = keep_mask(key_padding_mask.reshape(x.shape[0], -1), x.shape[1], bool_true_means_pad=True)
        out = self.mixing(x, keep)
        out = out.squeeze(0) if unbatched else out
        return (out if self.batch_first or unbatched else out.transpose(0, 1)), None


def _same_tensor(other: torch.Tensor | None, query: torch.Tensor) -> bool:
    """``other`` is the query itself (or an identical view of the same storage, e.g. both cut to one sample)."""
    return other is None or other is query or (
        other.shape == query.shape and other.stride() == query.stride() and other.data_ptr() == query.data_ptr())


class CallConvention(ABC):
    """How one HF family's layer calls its self-attention module (the keyword carrying the mask) and the tuple it
    unpacks from the answer. ``name`` is for messages only."""

    name: ClassVar[str]
    mask_keyword: ClassVar[str] = "attention_mask"

    @abstractmethod
    def outputs(self, out: torch.Tensor, cache, kwargs: dict) -> tuple:
        """The module's answer, given the mixed ``out``, the call's cache and its keyword arguments."""


class T5Convention(CallConvention):
    name, mask_keyword = "t5", "mask"

    def outputs(self, out, cache, kwargs):
        """(out, cache, position_bias[, None]): the first layer's relative position bias (if any) is passed on."""
        return (out, cache, kwargs.get("position_bias")) + ((None,) if kwargs.get("output_attentions") else ())


class BartConvention(CallConvention):
    name = "bart"

    def outputs(self, out, cache, kwargs):
        return out, None, cache


class GPT2Convention(CallConvention):
    name = "gpt2"

    def outputs(self, out, cache, kwargs):
        return out, None


# The conventions by the name checkpoints saved before ``CallConvention`` stored (``family="t5"``...).
SAVED_FAMILIES = {convention.name: convention for convention in (T5Convention, BartConvention, GPT2Convention)}


class FourierSeqAttention(nn.Module):
    """Replaces an HF T5 / BART / GPT-2 attention module used as self-attention: out = mix(x), in the tuple the
    family's layer unpacks (its ``CallConvention``)."""

    def __init__(self, mixing: FourierMixing, convention: CallConvention, layer_idx: int | None):
        super().__init__()
        self.mixing, self.convention, self.layer_idx = mixing, convention, layer_idx

    def __setstate__(self, state: dict) -> None:
        """Unpickling: a module saved with its family's name (``family``) gets that family's convention."""
        if "family" in state:
            state = dict(state)
            state["convention"] = SAVED_FAMILIES[state.pop("family")]()
        super().__setstate__(state)

    def extra_repr(self) -> str:
        return f"family={self.convention.name!r}, layer_idx={self.layer_idx}"

    def forward(self, hidden_states, *args, **kwargs):
        if any(kwargs.get(name) is not None for name in ("key_value_states", "encoder_hidden_states")):
            raise ValueError(f"FourierSeqAttention ({self.convention.name}): called as cross-attention; Fourier "
                             f"mixing only replaces self-attention.")
        mask = kwargs.get(self.convention.mask_keyword)
        keep = None
        if self.mixing.causal:  # the whole sequence so far: its left padding sets the new tokens' positions
            keep = keep_mask(mask, None, causal=True)
        elif self.mixing.padding == "mask":
            keep = keep_mask(mask, hidden_states.shape[1])
        cache = kwargs.get("past_key_value")
        history = self._history(cache) if cache is not None and self.mixing.causal else None
        return self.convention.outputs(self.mixing(hidden_states, keep, history=history), cache, kwargs)

    def _history(self, cache) -> Callable[[torch.Tensor], torch.Tensor]:
        """The mixing's ``history``: appends z to this layer's slot of an HF DynamicCache (z as keys, empty values)
        and returns all of it."""
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache
        if not isinstance(cache, DynamicCache) or self.layer_idx is None:
            raise ValueError(f"FourierSeqAttention ({self.convention.name}): causal mixing caches into a "
                             f"DynamicCache (the default cache), got {type(cache).__name__}; generate with the "
                             f"default cache or use_cache=False.")
        return partial(self._append_to_cache, cache)

    def _append_to_cache(self, cache, z: torch.Tensor) -> torch.Tensor:
        keys, _ = cache.update(z[:, None], z[:, None, :, :0], self.layer_idx)
        return keys[:, 0]


SPECS.register("FourierBertAttention", FourierBertAttention,
               lambda m, spec: {"mixing": spec(m.mixing), "layer_norm": spec(m.LayerNorm), "dropout": m.dropout.p,
                                "is_decoder": m.is_decoder},
               lambda s, child: FourierBertAttention(child(s["mixing"]), child(s["layer_norm"]), s["dropout"],
                                                     is_decoder=s["is_decoder"]))
SPECS.register("FourierSelfAttention", FourierSelfAttention,
               lambda m, spec: {"mixing": spec(m.mixing), "batch_first": m.batch_first, "embed_dim": m.embed_dim},
               lambda s, child: FourierSelfAttention(child(s["mixing"]), s["batch_first"], s["embed_dim"]))
SPECS.register("FourierSeqAttention", FourierSeqAttention,
               lambda m, spec: {"mixing": spec(m.mixing), "convention": m.convention.name,
                                "layer_idx": m.layer_idx},
               lambda s, child: FourierSeqAttention(child(s["mixing"]), SAVED_FAMILIES[s["convention"]](),
                                                    s["layer_idx"]))
