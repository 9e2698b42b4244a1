"""Which hidden states self-distillation matches (the boundary modules both models share, by name) and the forward
hooks that read them."""

from __future__ import annotations

import torch
from torch import nn

from algos.heal.config import DistillConfig
from algos.surgery.targets import name_matches


def boundary_names(model: nn.Module, layers=None) -> list[str]:
    """The modules whose outputs are matched: those ``layers`` names (a list of names or '.suffix'es, or a regex,
    PEFT's rule), or by default the children of the first ``nn.ModuleList`` in ``model`` (a transformer's layers:
    HF ``encoder.layer.N``, ``nn.TransformerEncoder``'s ``layers.N``). Outermost matches only."""
    if layers is None:
        for fqn, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module):
                return [f"{fqn}.{name}" if fqn else name for name, _ in module.named_children()]
        return []
    names = []
    for fqn, _ in model.named_modules():
        if fqn and name_matches(fqn, layers) and not any(fqn.startswith(outer + ".") for outer in names):
            names.append(fqn)
    return names


class HiddenCapture:
    """Forward hooks keeping the latest output tensor of each named module (the first element of a tuple or an HF
    output). ``attach`` (re)hooks the modules now at those names, so a module a surgery replaced is followed."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.outputs: dict[str, torch.Tensor] = {}
        self._hooked: dict[str, tuple[nn.Module, object]] = {}

    def attach(self, model: nn.Module) -> None:
        for name in self.names:
            module = model.get_submodule(name)
            hooked = self._hooked.get(name)
            if hooked is not None and hooked[0] is module:
                continue
            if hooked is not None:
                hooked[1].remove()
            self._hooked[name] = (module, module.register_forward_hook(self._keeper(name)))

    def detach(self) -> None:
        for _, handle in self._hooked.values():
            handle.remove()
        self._hooked.clear()
        self.outputs.clear()

    def _keeper(self, name: str):
        def hook(module, args, output):
            tensor = first_tensor_of(output)
            if tensor is not None:
                self.outputs[name] = tensor
        return hook


def first_tensor_of(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return first_tensor_of(output[0])
    if isinstance(output, dict) and output:  # HF ModelOutput is an OrderedDict
        return first_tensor_of(next(iter(output.values())))
    return None


def matched_boundaries(student: nn.Module, teacher: nn.Module, config: DistillConfig) -> list[str]:
    """The boundary names, found in the teacher (the architecture before surgery: a surgery may add module lists of
    its own to the student), each of which the student must have too. One-line errors, before any training:
    ``layers`` that name nothing, a teacher boundary the student lacks, a teacher sharing no module with the
    student."""
    if config.hidden_weight == 0:
        return []
    names = boundary_names(teacher, config.layers)
    if config.layers is not None and not names:
        raise config.error(f"layers={config.layers!r} names no module of the teacher.")
    student_modules = dict(student.named_modules())
    missing = [name for name in names if name not in student_modules]
    if missing:
        raise config.error(f"the student has no module {missing[0]!r} (a boundary of the teacher; {len(missing)} of "
                           f"{len(names)} missing); pass the student's own model before surgery as teacher, or "
                           f"layers= naming modules both have.")
    own = boundary_names(student, config.layers)
    if not names and own and not (set(student_modules) & {fqn for fqn, _ in teacher.named_modules() if fqn}):
        raise config.error(f"the teacher has no module {own[0]!r} (a student boundary) and shares no module name "
                           f"with the student; pass the student's own model before surgery as teacher.")
    return names
