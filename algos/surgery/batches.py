"""Batches and module modes: run a batch through any model, cut a batch to one sample, eval mode that restores
every submodule's own flag. Shared by calibration, MAC counting and the runner."""

from __future__ import annotations

import torch
from composer.models import ComposerModel
from torch import nn


class eval_mode:
    """Context manager: put a module tree in eval mode and restore every submodule's own flag afterwards."""

    def __init__(self, module: nn.Module):
        self.flags = [(m, m.training) for m in module.modules()]
        self.module = module

    def __enter__(self):
        self.module.eval()
        return self.module

    def __exit__(self, *exc):
        for module, training in self.flags:
            module.training = training


def real_tokens(batch, x: torch.Tensor, *, encoder_decoder: bool = False) -> torch.Tensor | None:
    """Which (sample, position) rows of ``x`` (batch, position, features) are real tokens, not padding: the batch's
    ``attention_mask`` where it has x's first two dimensions, else None (every row counts). Padding positions carry
    hidden states nothing reads (attention and pooling mask them out). An encoder-decoder model gets None: its
    decoder positions are not the mask's."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if encoder_decoder or not isinstance(mask, torch.Tensor) or x.dim() != 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return None
    return mask.to(x.device) != 0


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` holds a Hugging Face encoder-decoder (T5, BART): its config says so."""
    return any(getattr(getattr(m, "config", None), "is_encoder_decoder", False) is True for m in model.modules())


def call_model(model: nn.Module, batch):
    """Run a batch through a model: a ComposerModel takes the batch whole, a plain module takes a tensor, a tuple
    of positional arguments, or a dict of keyword arguments (HF style). Gradients as the caller's context says."""
    if isinstance(model, ComposerModel) or isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise TypeError(f"cannot call the model with a batch of type {type(batch).__name__}; "
                    "pass a tensor, a tuple of tensors, or a dict of keyword arguments")


def first_sample(tree):
    """Cut every tensor that shares the batch dimension (dim 0 of the first tensor) down to its first row."""
    batch = first_tensor(tree)
    if batch is None or batch.dim() == 0:
        return tree
    size = batch.shape[0]
    return map_tensors(tree, lambda t: t[:1] if t.dim() > 0 and t.shape[0] == size else t)


def without_state(tree):
    """None in place of every object that is not a tensor or a plain value: the measuring calls must not touch the
    caller's state (an HF KV cache would otherwise get the measured keys appended)."""
    if isinstance(tree, dict):
        return {key: without_state(value) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(without_state(value) for value in tree)
    plain = isinstance(tree, (torch.Tensor, int, float, complex, str, bytes, torch.dtype, torch.device, type(None)))
    return tree if plain else None


def to_meta(tree):
    return map_tensors(tree, lambda t: torch.empty_like(t, device="meta"))


def first_tensor(tree):
    if isinstance(tree, torch.Tensor):
        return tree
    values = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (tuple, list)) else ()
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None


def map_tensors(tree, fn):
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {key: map_tensors(value, fn) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(map_tensors(value, fn) for value in tree)
    return tree
