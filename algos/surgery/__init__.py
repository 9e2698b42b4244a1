"""The shared surgery core: target selection, replacement with optimizer bookkeeping, reports, the Composer base
class, and checkpoint resume. Every algorithm in ``algos`` is built on it."""

from algos.surgery import resume as _resume  # noqa: F401  (installs the checkpoint-resume hook)
from algos.surgery.algorithm import SurgeryAlgorithm
from algos.surgery.macs import count_macs
from algos.surgery.replace import Rewrite, SkipModule, apply_surgery, replace_modules
from algos.surgery.report import Replaced, SurgeryReport, count_params
from algos.surgery.resume import load_model
from algos.surgery.targets import Skip, name_matches, select_targets

__all__ = [
    "SurgeryAlgorithm", "SurgeryReport", "Replaced", "Skip", "SkipModule", "Rewrite", "apply_surgery",
    "replace_modules", "select_targets", "name_matches", "count_macs", "count_params", "load_model",
]
