"""FNet-mixing: the surgery (``FNetSurgery``), the functional ``apply_fnet_mixing`` and the Composer algorithm
``FNetMixing``. The settings are ``FNetConfig`` (config.py); the attention families it rewrites are handlers in
``handlers.FAMILIES``."""

from __future__ import annotations

import math

import torch
from torch import nn

from algos.fnet.config import FNetConfig
from algos.fnet.handlers import FAMILIES, Role
from algos.fnet.mixing import FourierMixing
from algos.surgery.algorithm import SurgeryAlgorithm
from algos.surgery.calibration import run_calibration, token_rows
from algos.surgery.replace import SkipModule
from algos.surgery.report import SurgeryReport
from algos.surgery.surgery import Surgery, settings_signature
from algos.surgery.yaml_names import yaml_name


class FNetSurgery(Surgery):
    """Every attention module of a known family is a candidate; ``prepare`` reads each one's role and picks the
    layers kept as attention; ``convert`` skips cross-attention, out-of-scope and kept layers, and builds the rest."""

    config_class = FNetConfig
    classes = FAMILIES.classes
    config: FNetConfig
    max_length: int | None  # the config's, or the HF config's max_position_embeddings
    roles: dict[str, Role]  # target fqn -> its role
    kept: set[str]  # in-scope targets kept as attention
    shifts: dict[str, torch.Tensor]  # gate=True: target fqn -> the attention's mean output over the calibration

    def prepare(self, targets, calibration) -> None:
        self.max_length = self.config.max_length or _config_max_length(self.model)
        self.roles = {fqn: FAMILIES.find(module).role(module, self._parent(fqn)) for fqn, module in targets}
        in_scope = [fqn for fqn, _ in targets if self.roles[fqn] in self.config.mixed_roles]
        self.kept = self._kept_layers(in_scope)
        mixed = {fqn: module for fqn, module in targets if fqn in in_scope and fqn not in self.kept}
        self.shifts = mean_outputs(self.model, mixed, calibration) if self.config.gate and calibration else {}

    def convert(self, module: nn.Module, fqn: str):
        config, role = self.config, self.roles[fqn]
        if role is Role.CROSS:
            raise SkipModule("cross-attention stays attention (Fourier mixing has no cross-attention form)")
        if role not in config.mixed_roles:
            raise SkipModule(f"{role.value} self-attention, outside scope={config.scope!r}")
        if fqn in self.kept:
            raise SkipModule("kept as attention (keep_attention_layers)")
        if config.fixed_length and self.max_length is None:
            raise config.error(f"{fqn!r}: causal=True and padding='mask' need max_length= (no HF config with "
                               f"max_position_embeddings was found).")
        family = FAMILIES.find(module)
        problem = family.unsupported(module)
        if problem is not None:
            raise config.error(f"{fqn!r} {problem}.")
        norm = config.norm or family.default_norm(module, self._parent(fqn))
        mixing = FourierMixing(config.impl, causal=config.causal, norm=norm, padding=config.padding,
                               max_length=self.max_length, dropout=config.dropout,
                               gate_width=family.width(module) if config.gate else None)
        if fqn in self.shifts:
            with torch.no_grad():
                mixing.shift.copy_(self.shifts[fqn])
        notes = {"impl": config.impl, "norm": norm, **({"gate": True} if config.gate else {})}
        return family.build(module, mixing), notes

    def _kept_layers(self, fqns: list[str]) -> set[str]:
        keep = self.config.keep_attention_layers
        if keep is None:
            return set()
        if isinstance(keep, float):  # the share of the last layers, rounded half up
            count = math.floor(keep * len(fqns) + 0.5)
            return set(fqns[len(fqns) - count:]) if count else set()
        bad = [index for index in keep if not -len(fqns) <= index < len(fqns)]
        if bad:
            raise self.config.error(f"keep_attention_layers={list(keep)} has indices {bad} outside the {len(fqns)} "
                                    f"targeted attention layers.")
        return {fqns[index] for index in keep}

    def _parent(self, fqn: str) -> nn.Module:
        return self.model.get_submodule(fqn.rpartition(".")[0])


@torch.no_grad()
def mean_outputs(model: nn.Module, targets: dict[str, nn.Module], calibration) -> dict[str, torch.Tensor]:
    """For each attention target with an output projection: the mean of what it adds to the residual stream over
    the calibration's real tokens, mean_t P(c_t) = P(mean_t c_t) for the affine projection P and its inputs c_t."""
    projections = {fqn: p for fqn, module in targets.items()
                   if (p := FAMILIES.find(module).output_projection(module)) is not None}
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(projections, 0)

    def on_input(fqn, module, x, real):
        rows = token_rows(x, real).double()
        sums[fqn] = sums.get(fqn, 0) + rows.sum(0)
        counts[fqn] += rows.shape[0]

    if projections:
        run_calibration(model, projections, calibration, on_input)
    return {fqn: projections[fqn]((sums[fqn] / counts[fqn]).to(projections[fqn].weight.dtype)[None])[0].float()
            for fqn in projections if counts[fqn]}


def _config_max_length(model: nn.Module) -> int | None:
    """The first HF config's ``max_position_embeddings`` found in ``model``."""
    for module in model.modules():
        length = getattr(getattr(module, "config", None), "max_position_embeddings", None)
        if isinstance(length, int):
            return length
    return None


def apply_fnet_mixing(model: nn.Module, *, optimizers=None, example_inputs=None, **settings) -> SurgeryReport:
    return FNetSurgery.apply(model, optimizers=optimizers, example_inputs=example_inputs, **settings)


settings_signature(apply_fnet_mixing, FNetConfig, doc="""Swap self-attention in ``model`` for Fourier mixing, in place.

    Targets: HF BERT-family ``BertAttention`` / ``RobertaAttention`` (the whole sublayer, pretrained LayerNorm kept),
    HF T5 / BART / GPT-2 attention (the attention module; the layer keeps its norm and residual), and
    ``nn.MultiheadAttention`` used as self-attention (torchvision ViT, ``nn.TransformerEncoderLayer``).
    Cross-attention always stays attention (skipped, with the reason in the report).""")


@yaml_name("fnet")
class FNetMixing(SurgeryAlgorithm):
    """Composer form of :func:`apply_fnet_mixing` (at ``Event.INIT``, or at ``apply_at``)."""

    surgery_class = FNetSurgery
