"""The shared surgery core: target selection, replacement with optimizer bookkeeping, reports, the Composer base
class, and checkpoint resume. Every algorithm in ``algos`` is built on it: a ``SurgeryConfig`` (settings), a
``Surgery`` (which modules, how each is converted) and a ``SurgeryAlgorithm`` subclass naming it."""

from algos.surgery import checkpoint_files as _checkpoint_files
from algos.surgery import resume as _resume  # noqa: F401  (installs the checkpoint-resume hook)
from algos.surgery.algorithm import SurgeryAlgorithm, parse_time, time_reached
from algos.surgery.config import Selection, SurgeryConfig, setting
from algos.surgery.errors import SurgeryError
from algos.surgery.handlers import Handlers, hf_classes
from algos.surgery.macs import CountsOwnMacs, count_macs
from algos.surgery.pretrained import PretrainedError, from_pretrained, save_pretrained
from algos.surgery.quantize import quantize_dynamic, quantized_modules, register_quantized
from algos.surgery.replace import InstallsIntoParent, Rewrite, SkipModule, replace_modules
from algos.surgery.report import Replaced, SurgeryReport, count_params
from algos.surgery.resume import load_model
from algos.surgery.surgery import Surgery, apply_surgery, plan_surgery, run_surgery, settings_signature
from algos.surgery.targets import Skip, converted_by, name_matches, select_targets
from algos.surgery.yaml_names import yaml_name

__all__ = [
    "Surgery", "SurgeryConfig", "Selection", "setting", "SurgeryError", "SurgeryAlgorithm", "run_surgery",
    "plan_surgery", "settings_signature", "Handlers", "hf_classes",
    "SurgeryReport", "Replaced", "Skip", "SkipModule", "Rewrite", "InstallsIntoParent", "CountsOwnMacs",
    "apply_surgery", "replace_modules", "select_targets", "name_matches", "converted_by", "count_macs",
    "count_params", "load_model", "parse_time", "time_reached", "save_pretrained", "from_pretrained",
    "PretrainedError", "quantize_dynamic", "quantized_modules", "register_quantized", "yaml_name",
]

_checkpoint_files.install()  # every Composer checkpoint in this process appears whole or not at all
