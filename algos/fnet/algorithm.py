"""FNet-mixing: its settings (``FNetConfig``), the surgery (``FNetSurgery``), the functional ``apply_fnet_mixing``
and the Composer algorithm ``FNetMixing``. The attention families it rewrites are handlers in ``families.py``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from algos.fnet.families import FAMILIES, Role
from algos.fnet.mixing import FourierMixing, mixing_argument_problem
from algos.surgery.algorithm import SurgeryAlgorithm
from algos.surgery.config import SurgeryConfig, setting
from algos.surgery.replace import SkipModule
from algos.surgery.report import SurgeryReport
from algos.surgery.surgery import Surgery, settings_signature

# scope -> the roles of the self-attention it mixes (cross-attention never)
SCOPES = {"encoder": frozenset({Role.ENCODER}), "decoder": frozenset({Role.DECODER}),
          "all": frozenset({Role.ENCODER, Role.DECODER})}


@dataclass(frozen=True)
class FNetConfig(SurgeryConfig):
    algorithm = "FNetMixing"

    impl: str = setting("fft", "'fft' (paper), 'rfft' (half spectrum, same result), 'dft' (two real GEMMs; needed "
                               "for causal)")
    causal: bool = setting(False, "output t depends on inputs up to t only (masked DFT); for decoders and prefix-LMs")
    scope: str = setting("encoder", "which self-attention is mixed: 'encoder' (an encoder-decoder keeps its "
                                    "decoder), 'decoder' or 'all' (both need causal=True); out-of-scope ones are "
                                    "skipped")
    padding: str = setting("ignore", "'ignore' (paper) or 'mask': padded positions zeroed, mixing at the fixed "
                                     "max_length")
    norm: str | None = setting(None, "'backward' (paper) or 'ortho'; None: 'backward' for post-LN blocks (BERT, "
                                     "BART, norm_first=False), 'ortho' for pre-LN ones (ViT, T5, GPT-2)")
    keep_attention_layers: list[int] | float | None = setting(
        None, "indices among the in-scope self-attention layers kept as attention (negative from the end; [-2, -1] "
              "is FNet-Hybrid), or a float: that share of the last layers")
    max_length: int | None = setting(None, "the fixed mixing length for padding='mask' and causal; default: the HF "
                                           "config's max_position_embeddings")
    dropout: float = setting(0.0, "dropout on the mixing output (0, as FNet)")

    def check(self) -> None:
        problem = mixing_argument_problem(impl=self.impl, causal=self.causal, norm=self.norm, padding=self.padding,
                                          max_length=self.max_length)
        if problem is not None:
            raise self.error(problem)
        if self.scope not in SCOPES:
            raise self.error(f"scope={self.scope!r} is not one of {', '.join(map(repr, SCOPES))}.")
        if Role.DECODER in self.mixed_roles and not self.causal:
            raise self.error(f"scope={self.scope!r} mixes decoder self-attention, which must not look ahead; pass "
                             f"causal=True (with impl='dft'), or scope='encoder'.")
        keep = self.keep_attention_layers
        if keep is not None and not (isinstance(keep, float) and 0 <= keep < 1) and not (
                isinstance(keep, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in keep)):
            raise self.error(f"keep_attention_layers={keep!r} must be a list of layer indices (negative count from "
                             f"the last) or a float in [0, 1) (the share of last layers kept).")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise self.error(f"dropout={self.dropout!r} must be in [0, 1).")

    @property
    def mixed_roles(self) -> frozenset[Role]:
        return SCOPES[self.scope]

    @property
    def fixed_length(self) -> bool:
        """Mixing at a fixed length (``max_length``)."""
        return self.causal or self.padding == "mask"


class FNetSurgery(Surgery):
    """Every attention module of a known family is a candidate; ``prepare`` reads each one's role and picks the
    layers kept as attention; ``convert`` skips cross-attention, out-of-scope and kept layers, and builds the rest."""

    config_class = FNetConfig
    classes = FAMILIES.classes
    config: FNetConfig
    max_length: int | None  # the config's, or the HF config's max_position_embeddings
    roles: dict[str, Role]  # target fqn -> its role
    kept: set[str]  # in-scope targets kept as attention

    def prepare(self, targets, calibration) -> None:
        self.max_length = self.config.max_length or _config_max_length(self.model)
        self.roles = {fqn: FAMILIES.find(module).role(module, self._parent(fqn)) for fqn, module in targets}
        in_scope = [fqn for fqn, _ in targets if self.roles[fqn] in self.config.mixed_roles]
        self.kept = self._kept_layers(in_scope)

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
                               max_length=self.max_length, dropout=config.dropout)
        return family.build(module, mixing), {"impl": config.impl, "norm": norm}

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


class FNetMixing(SurgeryAlgorithm):
    """Composer form of :func:`apply_fnet_mixing` (at ``Event.INIT``, or at ``apply_at``)."""

    surgery_class = FNetSurgery
