"""Factorize's settings: one frozen dataclass, checked once on construction.

Composer's own argument names (``factorize_convs``, ``factorize_linears``, ``latent_channels``, ``latent_features``)
are settings too, with Composer's meaning, so calls written for ``composer.algorithms.Factorize`` run unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from algos.surgery.calibration import check_sequential, kept_rows_setting, sequential_setting
from algos.surgery.config import SurgeryConfig, setting
from algos.surgery.fit import check_fit_settings

INITS = ("svd", "activation", "random")
DEFAULT_RANK = 0.25


class ComposerLatent(NamedTuple):
    """Composer's rank rule: ``channels`` for convolutions, ``features`` for linear layers (an int is the rank, a float
    a fraction of min(in, out)); the one not given takes Composer's ``Factorize`` default."""

    channels: int | float = 0.25
    features: int | float = 128


@dataclass(frozen=True)
class FactorizeConfig(SurgeryConfig):
    algorithm = "Factorize"

    rank: int | float | None = setting(None, "per-layer rank: an int is the rank of every layer, as given (at most "
                                             "min(d_in, d_out)); a float in (0, 1] a fraction of min(d_in, d_out), "
                                             "rounded up to a multiple of rank_multiple; None: 0.25, unless "
                                             "Composer's latent_* are given")
    init: str = setting("svd", "'svd' (truncated SVD of the weight), 'activation' (SVD whitened by the input second "
                               "moment on calibration: the best rank-r layer for those inputs), or 'random' (fresh "
                               "init, as Composer)")
    energy: float | None = setting(None, "instead of rank: the smallest rank keeping this share of the (whitened) "
                                         "squared spectrum")
    mac_budget: float | None = setting(None, "instead of rank: keep this share of the targeted layers' MACs, spending "
                                             "ranks where they cut the truncation error most")
    rank_multiple: int = setting(8, "the ranks the suite chooses (a float rank, energy, mac_budget) are rounded up "
                                    "to a multiple of this (8: tensor-core friendly); an int rank is used as given")
    min_features: int = setting(256, "linear layers with min(in, out) features below this stay dense")
    min_channels: int = setting(256, "convolutions with min(in, out) channels below this stay dense")
    factorize_convs: bool = setting(True, "Composer's: whether Conv1d / Conv2d layers are candidates at all")
    factorize_linears: bool = setting(True, "Composer's: whether Linear / HF Conv1D layers are candidates at all")
    latent_channels: int | float | None = setting(None, "Composer's rank rule for convolutions instead of rank: an int "
                                                        "is the rank, a float in (0, 1) a fraction of min(in, out) "
                                                        "channels, rounded down, at least 1 (default 0.25 when "
                                                        "latent_features is given)")
    latent_features: int | float | None = setting(None, "the same for linear layers, of min(in, out) features "
                                                        "(default 128 when latent_channels is given)")
    calibration_batches: int = setting(8, "calibration batches used for init='activation' and mac_budget")
    damping: float = setting(0.01, "added to the input second moment's diagonal, relative to its mean, before "
                                   "whitening")
    fit_steps: int = setting(0, "after init, train each factorized layer for this many Adam steps to reproduce the "
                                "dense layer's outputs on its calibration inputs (90% of the kept rows; the rest "
                                "measure the error), then each MLP block whose two layers are both factorized as a "
                                "block; needs calibration; 0: no fitting")
    fit_lr: float = setting(1e-3, "Adam's learning rate for fit_steps")
    fit_tokens: int = kept_rows_setting("layer for fit_steps (for a convolution, a row is one im2col patch)")
    sequential: bool = sequential_setting("init='activation' or fit_steps > 0")

    def check(self) -> None:
        self._check_composer_names()
        if self.init not in INITS:
            raise self.error(f"init={self.init!r} is not one of {', '.join(map(repr, INITS))}.")
        if self.energy is not None and self.mac_budget is not None:
            raise self.error("pass energy= or mac_budget=, not both (each one is a whole rank policy).")
        if self.energy is not None and not (_is_number(self.energy) and 0 < self.energy <= 1):
            raise self.error(f"energy={self.energy!r} must be in (0, 1] (the share of the spectrum to keep).")
        if self.mac_budget is not None and not (_is_number(self.mac_budget) and 0 < self.mac_budget <= 1):
            raise self.error(f"mac_budget={self.mac_budget!r} must be in (0, 1] (the share of the targeted layers' "
                             f"MACs to keep).")
        rank = self.rank
        if rank is not None:
            if not _is_number(rank):
                raise self.error(f"rank={rank!r} must be an int >= 1 or a float in (0, 1] (fraction of "
                                 f"min(in, out)).")
            if isinstance(rank, int) and rank < 1:
                raise self.error(f"rank={rank} must be >= 1.")
            if isinstance(rank, float) and not 0 < rank <= 1:
                raise self.error(f"rank={rank} as a fraction of min(in, out) must be in (0, 1]; pass an int for an "
                                 f"absolute rank.")
        self.require_int("rank_multiple", "calibration_batches", "fit_tokens", least=1)
        self.require_int("min_features", "min_channels", least=0)
        self.require_number("damping")
        check_fit_settings(self.fit_steps, self.fit_lr, self.error)
        check_sequential(self.sequential, self.init == "activation" or self.fit_steps > 0,
                         "init='activation' or fit_steps > 0", self.error)

    def _check_composer_names(self) -> None:
        for name in ("factorize_convs", "factorize_linears"):
            if not isinstance(getattr(self, name), bool):
                raise self.error(f"{name}={getattr(self, name)!r} must be True or False.")
        if not (self.factorize_convs or self.factorize_linears):
            raise self.error("factorize_convs=False and factorize_linears=False leave no layer to factorize.")
        for name in ("latent_channels", "latent_features"):
            value = getattr(self, name)
            if value is None:
                continue
            if not _is_number(value) or (isinstance(value, int) and value < 1) or \
                    (isinstance(value, float) and not 0 < value < 1):
                raise self.error(f"{name}={value!r} must be an int >= 1 (the rank) or a float in (0, 1) (fraction "
                                 f"of min(in, out), as in Composer).")
            rival = next((f"{other}={getattr(self, other)!r}" for other in ("rank", "energy", "mac_budget")
                          if getattr(self, other) is not None), None)
            if rival is not None:
                raise self.error(f"{rival} and Composer's {name}={value!r} both set the ranks; pass one "
                                 f"(latent_channels / latent_features: Composer's rule for conv / linear layers).")

    @property
    def composer_latent(self) -> ComposerLatent | None:
        """Composer's rank rule when either ``latent_*`` is given (the other at its default); else None."""
        if self.latent_channels is None and self.latent_features is None:
            return None
        default = ComposerLatent()
        return ComposerLatent(default.channels if self.latent_channels is None else self.latent_channels,
                              default.features if self.latent_features is None else self.latent_features)

    @property
    def rank_or_default(self) -> int | float:
        return DEFAULT_RANK if self.rank is None else self.rank

    @property
    def ranks_from_spectra(self) -> bool:
        """Whether ``energy`` or ``mac_budget`` chooses the ranks (from the spectra, so only at surgery)."""
        return self.energy is not None or self.mac_budget is not None

    @property
    def calibration_needed(self) -> int:
        wanted = self.init == "activation" or self.mac_budget is not None or self.fit_steps > 0
        return self.calibration_batches if wanted else 0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
