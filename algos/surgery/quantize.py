"""Dynamic int8 quantization of a surgered model: torch's ``quantize_dynamic`` for every ``nn.Linear`` (a Factorize
pair is two of them; FNet's mixing has no weights), plus the modules a surgery put in that keep their weights
outside ``nn.Linear`` and register an int8 counterpart here (FFF's leaf trees: ``algos/fff/quantized.py``).

    quantized = algos.quantize_dynamic(model)                      # in place, like torch's with inplace=True
    quantized = algos.quantize_dynamic(model, per_channel=True, activation_bits=8, inplace=False)

torch's one line, ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)``, works on every
surgered model too; it leaves those modules in float. ``per_channel=True`` gives each output row its own scale
(torch's ``per_channel_dynamic_qconfig``): the same int8 GEMMs, measurably closer to the float model
(docs/BENCHMARKS.md, the frontier).

``activation_bits``: torch's dynamic int8 Linear quantizes each input to 7 bits (``reduce_range=True``), because on
x86 CPUs without VNNI fbgemm sums pairs of u8 x s8 products in int16, which 8-bit inputs can overflow
(2 x 255 x 127 > 32767). CPUs with VNNI (``avx512_vnni``, ``avx_vnni`` or ``amx_int8`` in /proc/cpuinfo) accumulate
in int32, so ``activation_bits=8`` (``Int8Linear``: the same int8 GEMMs, the input's full 8-bit range) halves the
input rounding error at no cost; it is refused, in one line, on a CPU without them. On all-MiniLM-L6-v2 the inputs'
rounding, not the weights', is most of int8's error (docs/BENCHMARKS.md, the frontier).

Why not only torch's function: its mapping knows torch's classes alone; this one call passes ours to it
(``mapping``), so the rest stays torch's code.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig
from torch.ao.quantization import quantize_dynamic as _torch
from torch.ao.quantization.quantization_mappings import get_default_dynamic_quant_module_mappings

# float module class -> its dynamic-int8 class, which has ``from_float(module)`` as torch's quantized modules have
QUANTIZED: dict[type[nn.Module], type[nn.Module]] = {}


ACTIVATION_BITS = (7, 8)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


class Int8Linear(DynamicLinear):
    """torch's dynamic int8 Linear with 8-bit inputs (``reduce_range=False``): for CPUs with VNNI (module docstring).

        y = s_x s_w (q_x - z_x) q_w^T + b,   q_x = clamp(round(x / s_x) + z_x, 0, 255),  s_x = (max x - min x) / 255
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=False).to(x.dtype)

    def _get_name(self) -> str:
        return "DynamicQuantizedLinear8"


def int8_linear_class(activation_bits: int) -> type[DynamicLinear]:
    """The dynamic int8 Linear class for ``activation_bits`` (7: torch's; 8: ``Int8Linear``), checked on this CPU."""
    if activation_bits not in ACTIVATION_BITS:
        raise ValueError(f"quantize_dynamic: activation_bits={activation_bits!r} is not one of {ACTIVATION_BITS}.")
    if activation_bits == 8 and not has_vnni():
        raise ValueError("quantize_dynamic: activation_bits=8 needs a CPU with VNNI (one of the flags "
                         f"{', '.join(VNNI_FLAGS)}), and this one has none: its int16 sums could overflow; use "
                         "activation_bits=7.")
    return Int8Linear if activation_bits == 8 else DynamicLinear


def has_vnni() -> bool:
    """Whether this CPU multiplies u8 x s8 with int32 accumulation (VNNI), from /proc/cpuinfo's flags (Linux x86)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in VNNI_FLAGS)


def register_quantized(float_class: type[nn.Module], quantized_class: type[nn.Module]) -> None:
    """Make ``quantize_dynamic`` turn ``float_class`` modules into ``quantized_class.from_float(module)`` (with
    ``module.qconfig`` set and ``module.int8_linear`` the dynamic int8 Linear class to build its GEMMs from)."""
    QUANTIZED[float_class] = quantized_class


def quantize_dynamic(model: nn.Module, *, per_channel: bool = False, activation_bits: int = 7,
                     inplace: bool = True) -> nn.Module:
    """``model`` with int8 weights in every ``nn.Linear`` and every registered surgery module (``QUANTIZED``),
    inputs quantized on the fly to ``activation_bits`` (torch's dynamic quantization: no calibration data).
    Returns the model (``inplace=True``: the same object) for inference on CPU. Bad arguments raise before anything
    is changed."""
    linear_class = int8_linear_class(activation_bits)
    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    if not inplace:
        model = copy.deepcopy(model)
    ours = [module for module in model.modules() if type(module) in QUANTIZED]
    for module in ours:  # read (and removed) by its from_float
        module.int8_linear = linear_class
    mapping = {**get_default_dynamic_quant_module_mappings(), nn.Linear: linear_class, **QUANTIZED}
    try:
        return _torch(model, {cls: qconfig for cls in (nn.Linear, *QUANTIZED)}, dtype=torch.qint8, mapping=mapping,
                      inplace=True)
    finally:
        for module in ours:
            module.__dict__.pop("int8_linear", None)


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the quantized modules in ``model`` (torch's ``torch.ao.nn.quantized`` ones and ours)."""
    ours = (DynamicLinear, *QUANTIZED.values())
    return [(name, module) for name, module in model.named_modules()
            if type(module).__module__.startswith("torch.ao.nn.quantized") or isinstance(module, ours)]
