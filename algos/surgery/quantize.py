"""Dynamic int8 quantization of a surgered model: torch's ``quantize_dynamic`` for every ``nn.Linear`` (a Factorize
pair is two of them; FNet's mixing has no weights), plus the modules a surgery put in that keep their weights
outside ``nn.Linear`` and register an int8 counterpart here (FFF's leaf trees: ``algos/fff/quantized.py``).

    quantized = algos.quantize_dynamic(model)                      # in place, like torch's with inplace=True
    quantized = algos.quantize_dynamic(model, per_channel=True, inplace=False)

torch's one line, ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)``, works on every
surgered model too; it leaves those modules in float. ``per_channel=True`` gives each output row its own scale
(torch's ``per_channel_dynamic_qconfig``): the same int8 GEMMs, measurably closer to the float model
(docs/BENCHMARKS.md, the frontier). Why not only torch's: its mapping knows torch's classes alone; this one call
passes ours to it (``mapping``), so the rest stays torch's code.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig
from torch.ao.quantization import quantize_dynamic as _torch
from torch.ao.quantization.quantization_mappings import get_default_dynamic_quant_module_mappings

# float module class -> its dynamic-int8 class, which has ``from_float(module)`` as torch's quantized modules have
QUANTIZED: dict[type[nn.Module], type[nn.Module]] = {}


def register_quantized(float_class: type[nn.Module], quantized_class: type[nn.Module]) -> None:
    """Make ``quantize_dynamic`` turn ``float_class`` modules into ``quantized_class.from_float(module)``."""
    QUANTIZED[float_class] = quantized_class


def quantize_dynamic(model: nn.Module, *, per_channel: bool = False, inplace: bool = True) -> nn.Module:
    """``model`` with int8 weights in every ``nn.Linear`` and every registered surgery module (``QUANTIZED``),
    activations quantized on the fly (torch's dynamic quantization: no calibration data). Returns the model
    (``inplace=True``: the same object) for inference on CPU."""
    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    if not inplace:
        model = copy.deepcopy(model)
    mapping = {**get_default_dynamic_quant_module_mappings(), **QUANTIZED}
    return _torch(model, {cls: qconfig for cls in (nn.Linear, *QUANTIZED)}, dtype=torch.qint8, mapping=mapping,
                  inplace=True)


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the quantized modules in ``model`` (torch's ``torch.ao.nn.quantized`` ones and ours)."""
    ours = tuple(QUANTIZED.values())
    return [(name, module) for name, module in model.named_modules()
            if type(module).__module__.startswith("torch.ao.nn.quantized") or isinstance(module, ours)]
