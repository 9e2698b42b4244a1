"""Surgery algorithms for MosaicML Composer.

Public API: each algorithm as a Composer ``Algorithm`` and as a functional ``apply_*`` call, both built on the shared
core in ``algos.surgery`` (``SwapLinear`` is the core's worked example).
"""

from composer.algorithms.warnings import NoEffectWarning

from algos.factorize import Factorize, FactorizedConv1d, FactorizedConv2d, FactorizedLinear, apply_factorization
from algos.fff import FFF, FFFReplace, FFFTraining, apply_fff
from algos.fnet import FNetMixing, FourierMixing, apply_fnet_mixing
from algos.heal import SelfDistillation, distill
from algos.surgery import (
    SkipModule,
    SurgeryAlgorithm,
    SurgeryReport,
    apply_surgery,
    from_pretrained,
    load_model,
    quantize_dynamic,
    save_pretrained,
    select_targets,
)
from algos.surgery.example import SwapLinear, apply_swap_linear

__all__ = [
    "NoEffectWarning", "load_model", "save_pretrained", "from_pretrained", "quantize_dynamic",
    "SkipModule", "SurgeryAlgorithm", "SurgeryReport", "apply_surgery", "select_targets",
    "SwapLinear", "apply_swap_linear",
    "Factorize", "apply_factorization", "FactorizedLinear", "FactorizedConv1d", "FactorizedConv2d",
    "FFFReplace", "apply_fff", "FFF", "FFFTraining",
    "FNetMixing", "apply_fnet_mixing", "FourierMixing",
    "SelfDistillation", "distill",
]
