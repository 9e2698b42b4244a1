"""Weightless copies of modules: what a checkpoint records of a surgery, and what MACs are counted on."""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and persistent buffers live on the meta device (no memory, no copy).

    Non-persistent buffers (lookup tables a module builds itself) keep their values: a checkpoint does not hold them.
    """
    memo: dict[int, torch.Tensor] = {}
    for submodule in module.modules():
        for param in submodule._parameters.values():
            if param is not None:
                memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), param.requires_grad)
        for name, buffer in submodule._buffers.items():
            if buffer is not None and name not in submodule._non_persistent_buffers_set:
                memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    skeleton = copy.deepcopy(module, memo)
    for submodule in skeleton.modules():  # forward/backward hooks are run-time wiring, not architecture
        for name, value in vars(submodule).items():
            if name.startswith(("_forward_", "_backward_")) and isinstance(value, dict):
                value.clear()
    return skeleton


def materialize(skeleton: nn.Module, device: torch.device | str) -> nn.Module:
    """Give a ``meta_copy`` real (uninitialised) storage on ``device``; the caller loads the values."""
    module = copy.deepcopy(skeleton)
    for submodule in module.modules():
        for name, tensor in itertools.chain(submodule._parameters.items(), submodule._buffers.items()):
            if tensor is None:
                continue
            real = torch.empty_like(tensor, device=device) if tensor.is_meta else tensor.to(device)
            if isinstance(tensor, nn.Parameter):
                submodule._parameters[name] = nn.Parameter(real, tensor.requires_grad)
            else:
                submodule._buffers[name] = real
    return module
