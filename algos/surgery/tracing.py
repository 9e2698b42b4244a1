"""Whether a graph of the model is being recorded, for the branches that must then take their traceable path.

Three recorders see a surgered model's forward: ``torch.export`` (and ``torch.onnx.export(..., dynamo=True)``, built
on it), TorchScript tracing (``torch.jit.trace`` and ``torch.onnx.export``'s default exporter in torch 2.7) and
``torch.compile``. None of them may branch on a tensor's values: a trace would record the branch the example input
took and replay it for every input (an FFF leaf tree's split of the tokens, the causal mixing's left-padding check),
a silent wrong result. torch has one query per recorder; this names their union once.
"""

from __future__ import annotations

import torch


def recording_graph() -> bool:
    """True inside ``torch.export`` / ``torch.onnx.export`` (either exporter) / ``torch.jit.trace``: take the path
    whose ops do not depend on the values (``torch.compile`` graph-breaks instead and is not included)."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def onnx_tracing() -> bool:
    """True inside ``torch.onnx.export``'s TorchScript exporter (``dynamo=False``), which has no FFT operators."""
    return torch.jit.is_tracing() and torch.onnx.is_in_onnx_export()
