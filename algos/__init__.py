"""Surgery algorithms for MosaicML Composer.

Public API. The algorithms themselves (Factorize, FFFReplace, FNetMixing) land on top of the shared core in
``algos.surgery``; ``SwapLinear`` is the core's worked example.
"""

from composer.algorithms.warnings import NoEffectWarning

from algos.surgery import SkipModule, SurgeryAlgorithm, SurgeryReport, apply_surgery, select_targets
from algos.surgery.example import SwapLinear, apply_swap_linear

__all__ = [
    "NoEffectWarning", "SkipModule", "SurgeryAlgorithm", "SurgeryReport", "apply_surgery", "select_targets",
    "SwapLinear", "apply_swap_linear",
]
