"""Factorize: the functional ``apply_factorization`` and the Composer algorithm ``Factorize``.

Per call: select the dense layers (shared core) minus those the data-free rules leave dense (too small, grouped, tied,
or a fixed rank at or above break-even: the ``skip_fn``, so a dry run sees them), optionally run calibration batches
to learn what each layer sees, decompose every weight, choose ranks (one policy for all layers, or a MAC budget
shared across them), then swap in factorized layers that start from the trained weights.

Composer's own argument names (``factorize_convs``, ``factorize_linears``, ``latent_channels``, ``latent_features``)
are accepted with Composer's meaning, so calls written for ``composer.algorithms.Factorize`` run unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from algos.factorize.layers import (
    build_factorized,
    dense_classes,
    dense_shape,
    factorized_product,
    input_rows,
    is_linear,
    weight_matrix,
)
from algos.factorize.lowrank import (
    BudgetLayer,
    Decomposition,
    allocate_mac_budget,
    break_even_rank,
    decompose,
    energy_rank,
    latent_rank,
    round_rank,
)
from algos.surgery.algorithm import SurgeryAlgorithm
from algos.surgery.calibration import CalibrationError, run_calibration
from algos.surgery.replace import SkipModule
from algos.surgery.report import SurgeryReport
from algos.surgery.surgery import apply_surgery

INITS = ("svd", "activation", "random")
DEFAULT_RANK = 0.25
# Composer's Factorize defaults: the one of latent_channels / latent_features not given takes its default here.
COMPOSER_LATENT = {"latent_channels": 0.25, "latent_features": 128}


def check_arguments(*, rank, init, energy, mac_budget, rank_multiple, damping=0.01, factorize_convs=True,
                    factorize_linears=True, latent_channels=None, latent_features=None) -> None:
    """One-line errors for bad arguments, shared by the functional and the Composer form."""
    _check_composer_arguments(rank=rank, energy=energy, mac_budget=mac_budget, factorize_convs=factorize_convs,
                              factorize_linears=factorize_linears, latent_channels=latent_channels,
                              latent_features=latent_features)
    if init not in INITS:
        raise ValueError(f"Factorize: init={init!r} is not one of {', '.join(map(repr, INITS))}.")
    if energy is not None and mac_budget is not None:
        raise ValueError("Factorize: pass energy= or mac_budget=, not both (each one is a whole rank policy).")
    if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise ValueError(f"Factorize: energy={energy!r} must be in (0, 1] (the share of the spectrum to keep).")
    if mac_budget is not None and not (isinstance(mac_budget, (int, float)) and 0 < mac_budget <= 1):
        raise ValueError(f"Factorize: mac_budget={mac_budget!r} must be in (0, 1] (the share of the targeted layers' "
                         f"MACs to keep).")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, (int, float)):
            raise ValueError(f"Factorize: rank={rank!r} must be an int >= 1 or a float in (0, 1] (fraction of "
                             f"min(in, out)).")
        if isinstance(rank, int) and rank < 1:
            raise ValueError(f"Factorize: rank={rank} must be >= 1.")
        if isinstance(rank, float) and not 0 < rank <= 1:
            raise ValueError(f"Factorize: rank={rank} as a fraction of min(in, out) must be in (0, 1]; pass an int "
                             f"for an absolute rank.")
    if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise ValueError(f"Factorize: rank_multiple={rank_multiple!r} must be an int >= 1.")
    if not (isinstance(damping, (int, float)) and damping >= 0):
        raise ValueError(f"Factorize: damping={damping!r} must be a number >= 0.")


def _check_composer_arguments(*, rank, energy, mac_budget, factorize_convs, factorize_linears, latent_channels,
                              latent_features) -> None:
    for name, value in (("factorize_convs", factorize_convs), ("factorize_linears", factorize_linears)):
        if not isinstance(value, bool):
            raise ValueError(f"Factorize: {name}={value!r} must be True or False.")
    if not (factorize_convs or factorize_linears):
        raise ValueError("Factorize: factorize_convs=False and factorize_linears=False leave no layer to factorize.")
    latent = {"latent_channels": latent_channels, "latent_features": latent_features}
    for name, value in latent.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (isinstance(value, int) and value < 1) or (isinstance(value, float) and not 0 < value < 1):
            raise ValueError(f"Factorize: {name}={value!r} must be an int >= 1 (the rank) or a float in (0, 1) "
                             f"(fraction of min(in, out), as in Composer).")
        rival = next((f"{other}={given!r}" for other, given in
                      (("rank", rank), ("energy", energy), ("mac_budget", mac_budget)) if given is not None), None)
        if rival is not None:
            raise ValueError(f"Factorize: {rival} and Composer's {name}={value!r} both set the ranks; pass one "
                             f"(latent_channels / latent_features: Composer's rule for conv / linear layers).")


def apply_factorization(
    model: nn.Module,
    *,
    rank: int | float | None = None,
    init: str = "svd",
    calibration=None,
    energy: float | None = None,
    mac_budget: float | None = None,
    rank_multiple: int = 8,
    min_features: int = 256,
    min_channels: int = 256,
    factorize_convs: bool = True,
    factorize_linears: bool = True,
    latent_channels: int | float | None = None,
    latent_features: int | float | None = None,
    calibration_batches: int | None = None,
    damping: float = 0.01,
    target_modules=None,
    exclude_modules=None,
    filter_fn=None,
    optimizers=None,
    strict: bool = False,
    example_inputs=None,
) -> SurgeryReport:
    """Replace Linear / Conv1d / Conv2d / HF Conv1D layers of ``model`` by low-rank factorized ones, in place.

    Args:
        rank: per-layer rank: an int, or a float in (0, 1] as a fraction of min(d_in, d_out), rounded up to
            ``rank_multiple``; None: 0.25, unless Composer's ``latent_*`` are given.
        init: ``"svd"`` (truncated SVD of the weight), ``"activation"`` (SVD whitened by the input second moment
            on ``calibration``: the best rank-r layer for those inputs), or ``"random"`` (fresh init, as Composer).
        calibration: batches the model can be called with (a tensor, a dict of keyword arguments, or an iterable
            of them); needed by ``init="activation"`` and by ``mac_budget`` on convolutions.
        energy: instead of ``rank``: the smallest rank keeping this share of the (whitened) squared spectrum.
        mac_budget: instead of ``rank``: keep this share of the targeted layers' MACs, spending ranks where they
            cut the truncation error most.
        rank_multiple: ranks are rounded up to a multiple of this (8: tensor-core friendly).
        min_features, min_channels: layers with min(in, out) features / channels below these stay dense.
        factorize_convs, factorize_linears: Composer's: whether Conv1d / Conv2d, and Linear / HF Conv1D, layers are
            candidates at all.
        latent_channels, latent_features: Composer's rank rule for conv / linear layers instead of ``rank``: an int
            is the rank, a float in (0, 1) a fraction of min(in, out) features or channels, rounded down, at least 1
            (not rounded to ``rank_multiple``). Giving one gives the other Composer's default (0.25 / 128).
        calibration_batches: use at most this many calibration batches.
        damping: added to the input second moment's diagonal, relative to its mean, before whitening.
        target_modules, exclude_modules, filter_fn, strict: module selection (see ``algos.surgery.targets``).
        optimizers: kept consistent with the new parameters.
        example_inputs: run once after surgery to fill in the report's MACs.

    Returns the report; each row's notes hold the rank and ``rel_error`` = ||W - UV|| / ||W|| (for
    ``init="activation"``: the relative output error on the calibration inputs).
    """
    check_arguments(rank=rank, init=init, energy=energy, mac_budget=mac_budget, rank_multiple=rank_multiple,
                    damping=damping, factorize_convs=factorize_convs, factorize_linears=factorize_linears,
                    latent_channels=latent_channels, latent_features=latent_features)
    if init == "activation" and calibration is None:
        raise ValueError("Factorize: init='activation' needs calibration= batches (or, in a Trainer, a "
                         "train_dataloader).")
    latent = {"latent_channels": latent_channels, "latent_features": latent_features}
    if any(value is not None for value in latent.values()):  # Composer's rule for both kinds of layer
        latent = {name: COMPOSER_LATENT[name] if value is None else value for name, value in latent.items()}
    elif rank is None:
        rank = DEFAULT_RANK
    planner = _Planner(model, rank=rank, init=init, calibration=calibration, energy=energy, mac_budget=mac_budget,
                       rank_multiple=rank_multiple, min_features=min_features, min_channels=min_channels,
                       calibration_batches=calibration_batches, damping=damping, **latent)
    return apply_surgery(model, planner.convert, algorithm="Factorize",
                         classes=dense_classes(linears=factorize_linears, convs=factorize_convs),
                         target_modules=target_modules, exclude_modules=exclude_modules, filter_fn=filter_fn,
                         optimizers=optimizers, strict=strict, example_inputs=example_inputs, prepare=planner.prepare,
                         skip_fn=planner.skip)


@dataclass
class _LayerPlan:
    decomposition: Decomposition | None = None
    positions: int | None = None  # output positions per sample, once calibration saw the layer
    rank: int | None = None
    skip: str | None = None
    note: str | None = None  # why init="activation" fell back to the plain SVD


class _Planner:
    """Holds the data-free rules (``skip``, the ``skip_fn``) and what ``prepare`` learns about all targets (spectra,
    calibration, ranks) for ``convert`` to use."""

    def __init__(self, model: nn.Module, **options):
        self.model = model
        self.options = options
        self.plans: dict[str, _LayerPlan] = {}
        self._shared = _shared_parameters(model)
        self._covariance: dict[str, torch.Tensor] = {}
        self._rows: dict[str, int] = {}

    def skip(self, module: nn.Module, fqn: str) -> str | None:
        """Why ``module`` stays dense whatever the data: too small, grouped, tied, or a fixed rank past break-even."""
        opts = self.options
        reason = _ineligible(module, opts["min_features"], opts["min_channels"], self._shared)
        if reason is None and (rank := self.fixed_rank(module)) is not None:
            reason = _above_break_even(module, rank)
        return reason

    def fixed_rank(self, module: nn.Module) -> int | None:
        """The rank ``rank`` or Composer's ``latent_*`` give ``module``; None when energy or mac_budget decide."""
        opts = self.options
        if opts["energy"] is not None or opts["mac_budget"] is not None:
            return None
        d_in, d_out = dense_shape(module)
        if opts["latent_features"] is not None:  # Composer's rule (both latent_* are set then)
            if is_linear(module):
                return latent_rank(opts["latent_features"], d_in, d_out)
            return latent_rank(opts["latent_channels"], module.in_channels, module.out_channels)
        limit, rank = min(d_in, d_out), opts["rank"]
        wanted = math.ceil(rank * limit) if isinstance(rank, float) else rank  # r = ceil(f min(d_in, d_out))
        return round_rank(min(wanted, limit), opts["rank_multiple"], limit)

    def prepare(self, targets: list[tuple[str, nn.Module]]) -> None:
        opts = self.options
        eligible = dict(targets)
        for fqn, module in eligible.items():
            if not torch.isfinite(weight_matrix(module)).all():
                raise ValueError(f"Factorize: the weight of {fqn!r} is not finite (NaN or inf); the model is "
                                 f"unchanged.")
            self.plans[fqn] = _LayerPlan()
        needs_positions = opts["mac_budget"] is not None and not all(map(is_linear, eligible.values()))
        if opts["calibration"] is not None and (opts["init"] == "activation" or opts["mac_budget"] is not None):
            run_calibration(self.model, eligible, opts["calibration"], self._record_input,
                            max_batches=opts["calibration_batches"])
        elif needs_positions:
            conv = next(fqn for fqn, module in eligible.items() if not is_linear(module))
            raise ValueError(f"Factorize: mac_budget on convolutions (e.g. {conv!r}) needs calibration= batches to "
                             f"count their MACs per sample.")
        for fqn, module in eligible.items():
            plan = self.plans[fqn]
            covariance = self._whitening(fqn)
            with torch.no_grad():
                plan.decomposition = decompose(weight_matrix(module), covariance, opts["damping"])
            if needs_positions and plan.positions is None:
                raise ValueError(f"Factorize: calibration never reached {fqn!r}, so its MACs for mac_budget are "
                                 f"unknown; exclude it with exclude_modules.")
        self._choose_ranks(eligible)

    def _whitening(self, fqn: str) -> torch.Tensor | None:
        """C = E[x x^T] of the layer's calibration inputs for init="activation"; None (plain SVD, with a note in
        the plan) when there is none or it is zero."""
        if self.options["init"] != "activation":
            return None
        covariance = self._covariance.pop(fqn, None)
        if covariance is None:
            self.plans[fqn].note = "svd (calibration never reached it)"
        elif not covariance.diagonal().any():  # sum of x_i^2 = 0: every input was zero, nothing to whiten by
            self.plans[fqn].note = "svd (its calibration inputs were all zero)"
            covariance = None
        return None if covariance is None else covariance / self._rows[fqn]

    def _record_input(self, fqn: str, module: nn.Module, x: torch.Tensor) -> None:
        d_in, _ = dense_shape(module)
        width = x.shape[-1] if is_linear(module) else x.shape[1] if x.dim() > 1 else None
        expected = d_in if is_linear(module) else module.in_channels
        if width != expected:
            raise CalibrationError(f"Factorize: calibration input of width {width} reached {fqn!r} "
                                   f"({type(module).__name__} expecting {expected}).")
        rows = input_rows(module, x).float()
        self.plans[fqn].positions = rows.shape[0] // max(x.shape[0], 1) if x.dim() > 1 else rows.shape[0]
        if self.options["init"] == "activation":
            if not torch.isfinite(rows).all():
                raise CalibrationError(f"Factorize: the calibration inputs of {fqn!r} are not finite (NaN or inf); "
                                       f"the model is unchanged.")
            self._covariance[fqn] = self._covariance.get(fqn, 0) + rows.T @ rows  # sum of x x^T
            self._rows[fqn] = self._rows.get(fqn, 0) + rows.shape[0]

    def _choose_ranks(self, eligible: dict[str, nn.Module]) -> None:
        opts = self.options
        multiple = opts["rank_multiple"]
        if opts["mac_budget"] is not None:
            layers = [BudgetLayer(*dense_shape(module), self.plans[fqn].positions or 1,
                                  self.plans[fqn].decomposition.singular_values) for fqn, module in eligible.items()]
            for fqn, rank in zip(eligible, allocate_mac_budget(layers, opts["mac_budget"], multiple), strict=True):
                self.plans[fqn].rank = rank
                if rank is None:
                    self.plans[fqn].skip = f"mac_budget={opts['mac_budget']} keeps it dense"
            return
        for fqn, module in eligible.items():
            plan = self.plans[fqn]
            plan.rank = self.fixed_rank(module)  # past break-even, skip() already left it out
            if plan.rank is None:  # energy: from the spectrum
                wanted = energy_rank(plan.decomposition.singular_values, opts["energy"])
                plan.rank = round_rank(wanted, multiple, min(dense_shape(module)))
                plan.skip = _above_break_even(module, plan.rank)

    def convert(self, module: nn.Module, fqn: str):
        plan = self.plans[fqn]
        if plan.skip is not None:
            raise SkipModule(plan.skip)
        init = self.options["init"]
        notes = {"rank": plan.rank}
        if init == "random":
            new = build_factorized(module, plan.rank, None)
            with torch.no_grad():
                dense = weight_matrix(module).float()
                notes["rel_error"] = (torch.linalg.matrix_norm(dense - factorized_product(new).float())
                                      / dense.norm()).item()
        else:
            new = build_factorized(module, plan.rank, plan.decomposition.factors(plan.rank))
            notes["rel_error"] = plan.decomposition.relative_error(plan.rank)
            if plan.note is not None:
                notes["init"] = plan.note
        return new, notes


def _ineligible(module: nn.Module, min_features: int, min_channels: int, shared: set[int]) -> str | None:
    """Why a selected layer stays dense before any math is done, or None."""
    if any(id(p) in shared for p in module.parameters(recurse=False)):
        return "its weight is shared with another module (tied weights)"
    if is_linear(module):
        d_in, d_out = dense_shape(module)
        if min(d_in, d_out) < min_features:
            return f"min(in, out) = {min(d_in, d_out)} below min_features {min_features}"
        return None
    if module.groups != 1:
        return f"grouped convolution (groups={module.groups}) is not factorized"
    smallest = min(module.in_channels, module.out_channels)
    if smallest < min_channels:
        return f"min(in, out) channels = {smallest} below min_channels {min_channels}"
    return None


def _above_break_even(module: nn.Module, rank: int) -> str | None:
    """Why ``rank`` would not pay off: r (d_in + d_out) >= d_in d_out MACs per output position; else None."""
    d_in, d_out = dense_shape(module)
    break_even = break_even_rank(d_in, d_out)
    if rank >= break_even:
        return f"rank {rank} would not cut MACs (break-even rank {break_even:.1f} for {d_in} -> {d_out})"
    return None


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of parameters owned by more than one module (e.g. an LM head tied to the embeddings)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    return {key for key, count in owners.items() if count > 1}


class Factorize(SurgeryAlgorithm):
    """Composer form of :func:`apply_factorization`; takes Composer's ``Factorize`` arguments too (keywords only).

    Runs at ``Event.INIT`` by default, or at ``apply_at`` (e.g. ``"2ep"``) on the model trained so far. With
    ``init="activation"`` or ``mac_budget``, the first ``calibration_batches`` batches of the train dataloader are
    the calibration, so the surgery runs at ``Event.FIT_START`` at the earliest.
    """

    def __init__(self, *, rank: int | float | None = None, init: str = "svd", energy: float | None = None,
                 mac_budget: float | None = None, rank_multiple: int = 8, min_features: int = 256,
                 min_channels: int = 256, factorize_convs: bool = True, factorize_linears: bool = True,
                 latent_channels: int | float | None = None, latent_features: int | float | None = None,
                 calibration_batches: int = 8, damping: float = 0.01, apply_at=None, target_modules=None,
                 exclude_modules=None, filter_fn=None, strict: bool = False):
        check_arguments(rank=rank, init=init, energy=energy, mac_budget=mac_budget, rank_multiple=rank_multiple,
                        damping=damping, factorize_convs=factorize_convs, factorize_linears=factorize_linears,
                        latent_channels=latent_channels, latent_features=latent_features)
        self.rank, self.init, self.energy, self.mac_budget = rank, init, energy, mac_budget
        self.rank_multiple, self.min_features, self.min_channels = rank_multiple, min_features, min_channels
        self.factorize_convs, self.factorize_linears = factorize_convs, factorize_linears
        self.latent_channels, self.latent_features = latent_channels, latent_features
        self.calibration_batches, self.damping = calibration_batches, damping
        super().__init__(apply_at=apply_at, target_modules=target_modules, exclude_modules=exclude_modules,
                         filter_fn=filter_fn, strict=strict)

    @property
    def calibration_needed(self) -> int:
        return self.calibration_batches if self.init == "activation" or self.mac_budget is not None else 0

    def surgery(self, model: nn.Module, optimizers=None, calibration=None) -> SurgeryReport:
        return apply_factorization(
            model, rank=self.rank, init=self.init, calibration=calibration, energy=self.energy,
            mac_budget=self.mac_budget, rank_multiple=self.rank_multiple, min_features=self.min_features,
            min_channels=self.min_channels, factorize_convs=self.factorize_convs,
            factorize_linears=self.factorize_linears, latent_channels=self.latent_channels,
            latent_features=self.latent_features, calibration_batches=self.calibration_batches, damping=self.damping,
            target_modules=self.target_modules, exclude_modules=self.exclude_modules, filter_fn=self.filter_fn,
            optimizers=optimizers, strict=self.strict)
