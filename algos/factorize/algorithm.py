"""Factorize: ``FactorizeSurgery`` (how one model is rewritten), the functional ``apply_factorization`` and the
Composer algorithm ``Factorize``.

Per call: select the dense layers (shared core) minus those the data-free rules leave dense (tied, too narrow,
grouped, or a fixed rank at or above break-even: ``skip_reason``, so a dry run sees them), optionally run calibration
batches to learn what each layer sees, decompose every weight, choose ranks (one policy for all layers, or a MAC
budget shared across them), then swap in factorized layers that start from the trained weights. How each dense class
is read and rebuilt is its handler in ``handlers.HANDLERS``; the settings are ``FactorizeConfig`` (config.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from algos.factorize.config import FactorizeConfig
from algos.factorize.handlers import CONV_CLASSES, HANDLERS, LINEAR_CLASSES, DenseHandler
from algos.factorize.layers import factorized_product
from algos.factorize.lowrank import (
    BudgetLayer,
    BudgetTooSmall,
    Decomposition,
    allocate_mac_budget,
    break_even_rank,
    decompose,
    energy_rank,
    round_rank,
)
from algos.surgery.algorithm import SurgeryAlgorithm
from algos.surgery.blocks import BLOCK_CLASSES, BLOCKS, DenseMLP, NotADenseBlock
from algos.surgery.calibration import CalibrationError, keep_rows, run_calibration
from algos.surgery.fit import fit_to_outputs
from algos.surgery.replace import SkipModule
from algos.surgery.report import SurgeryReport
from algos.surgery.surgery import Surgery, Targets, run_surgery, settings_signature, split_settings
from algos.surgery.yaml_names import yaml_name


@dataclass
class LayerPlan:
    """What ``prepare`` learns about one target, for ``convert``."""

    handler: DenseHandler
    positions: int | None = None  # output positions per sample, once calibration saw the layer
    input_moment: torch.Tensor | None = None  # sum of x x^T over its calibration inputs (init="activation")
    rows_seen: int = 0  # how many input rows x that sum holds
    inputs: torch.Tensor | None = None  # fit_steps: up to fit_tokens calibration input rows (a random subset)
    decomposition: Decomposition | None = None
    rank: int | None = None
    skip: str | None = None  # why it stays dense after all (a rank from the spectrum past break-even)
    note: str | None = None  # why init="activation" fell back to the plain SVD


class FactorizeSurgery(Surgery):
    """Factorize on one model: the data-free rules at selection, then calibration, decompositions and ranks for all
    targets at once (``prepare``), then one factorized layer per target (``convert``)."""

    config_class = FactorizeConfig
    config: FactorizeConfig

    def __init__(self, model: nn.Module, config: FactorizeConfig, selection=None):
        super().__init__(model, config, selection)
        self.tied = tied_parameters(model)
        self.plans: dict[str, LayerPlan] = {}
        self.generator = torch.Generator().manual_seed(0)  # fit_steps: which input rows are kept when more come
        self.blocks: list[FittedBlock] = []  # fit_steps: MLP blocks whose two layers are both targets
        self.replacements: dict[str, nn.Module] = {}  # fit_steps: the factorized layers made so far

    @classmethod
    def apply(cls, model: nn.Module, *, calibration=None, optimizers=None, example_inputs=None,
              **settings) -> SurgeryReport:
        """The functional form; ``init="activation"`` without calibration fails before anything else runs."""
        selection, config = split_settings(cls.config_class, settings)
        surgery = cls(model, config, selection)
        surgery.require_calibration(calibration)
        return run_surgery(surgery, calibration=calibration, optimizers=optimizers, example_inputs=example_inputs)

    @property
    def classes(self) -> tuple[type[nn.Module], ...]:
        """Composer's switches: linear layers (Linear, HF Conv1D) and convolutions (Conv1d, Conv2d)."""
        enabled = ((LINEAR_CLASSES if self.config.factorize_linears else ())
                   + (CONV_CLASSES if self.config.factorize_convs else ()))
        return tuple(cls for cls in HANDLERS.classes if cls in enabled)

    def skip_reason(self, layer: nn.Module, fqn: str) -> str | None:
        """Why ``layer`` stays dense whatever the data: tied, too narrow, grouped, or a fixed rank past break-even."""
        if any(id(p) in self.tied for p in layer.parameters(recurse=False)):
            return "its weight is shared with another module (tied weights)"
        handler = HANDLERS.find(layer)
        reason = handler.stays_dense(layer, self.config)
        if reason is None and not self.config.ranks_from_spectra:
            reason = above_break_even(handler.dense_shape(layer), self.fixed_rank(handler, layer))
        return reason

    def fixed_rank(self, handler: DenseHandler, layer: nn.Module) -> int:
        """The rank that ``rank`` (or Composer's ``latent_*``) gives ``layer``; energy and mac_budget unset."""
        if self.config.composer_latent is not None:
            return handler.latent_rank(layer, self.config)
        limit, rank = min(handler.dense_shape(layer)), self.config.rank_or_default
        if isinstance(rank, int):  # the rank asked for, as given
            return min(rank, limit)
        # a fraction f: r = ceil(f min(d_in, d_out)), rounded up to a multiple of rank_multiple
        return round_rank(min(math.ceil(rank * limit), limit), self.config.rank_multiple, limit)

    def require_calibration(self, calibration) -> None:
        if self.config.init == "activation" and calibration is None:
            raise self.config.error("init='activation' needs calibration= batches (or, in a Trainer, a "
                                    "train_dataloader).")
        if self.config.fit_steps > 0 and calibration is None:
            raise self.config.error(f"fit_steps={self.config.fit_steps} needs calibration= batches (or, in a "
                                    f"Trainer, a train_dataloader).")

    def prepare(self, targets: Targets, calibration) -> None:
        self.require_calibration(calibration)
        config = self.config
        for fqn, layer in targets:
            handler = HANDLERS.find(layer)
            if not torch.isfinite(handler.weight_matrix(layer)).all():
                raise config.error(f"the weight of {fqn!r} is not finite (NaN or inf); the model is unchanged.")
            self.plans[fqn] = LayerPlan(handler)
        if config.fit_steps > 0:
            self.blocks = mlp_blocks(self.model, dict(targets))
        unmeasured = [fqn for fqn, plan in self.plans.items() if plan.handler.positions_need_calibration]
        needs_positions = config.mac_budget is not None and bool(unmeasured)
        if calibration is not None and config.calibration_needed:
            run_calibration(self.model, dict(targets), calibration, self._record_input,
                            max_batches=config.calibration_batches)
        elif needs_positions:
            raise config.error(f"mac_budget on convolutions (e.g. {unmeasured[0]!r}) needs calibration= batches to "
                               f"count their MACs per sample.")
        for fqn, layer in targets:
            plan = self.plans[fqn]
            self._decompose(plan, layer)
            if needs_positions and plan.positions is None:
                raise config.error(f"calibration never reached {fqn!r}, so its MACs for mac_budget are unknown; "
                                   f"exclude it with exclude_modules.")
        self._choose_ranks(targets)

    def recalibrate(self, layer: nn.Module, fqn: str, calibration) -> None:
        """``sequential``: the layer's calibration inputs again, as they reach it through the layers factorized so
        far, and (init="activation") its decomposition whitened by them; the rank stays the one ``prepare`` chose."""
        plan = self.plans[fqn]
        if plan.skip is not None:
            return
        plan.input_moment, plan.rows_seen, plan.inputs, plan.note = None, 0, None, None
        run_calibration(self.model, {fqn: layer}, calibration, self._record_input,
                        max_batches=self.config.calibration_batches)
        if self.config.init == "activation":
            self._decompose(plan, layer)

    def _decompose(self, plan: LayerPlan, layer: nn.Module) -> None:
        with torch.no_grad():
            plan.decomposition = decompose(plan.handler.weight_matrix(layer), self._whitening(plan),
                                           self.config.damping)

    def _record_input(self, fqn: str, layer: nn.Module, x: torch.Tensor, real: torch.Tensor | None) -> None:
        """Calibration's callback: the layer's output positions per sample, and (init="activation") sum x x^T and
        (fit_steps) the kept rows over its real tokens (``real``: padding is left out)."""
        plan = self.plans[fqn]
        width, expected = plan.handler.input_width(layer, x)
        if width != expected:
            raise CalibrationError(f"{self.name}: calibration input of width {width} reached {fqn!r} "
                                   f"({type(layer).__name__} expecting {expected}).")
        rows = plan.handler.input_rows(layer, x).float()
        plan.positions = rows.shape[0] // max(x.shape[0], 1) if x.dim() > 1 else rows.shape[0]
        if real is not None and plan.handler.rows_are_tokens:
            rows = rows[real.reshape(-1).to(rows.device)]
        if self.config.init == "activation":
            if not torch.isfinite(rows).all():
                raise CalibrationError(f"{self.name}: the calibration inputs of {fqn!r} are not finite (NaN or "
                                       f"inf); the model is unchanged.")
            moment = rows.T @ rows
            plan.input_moment = moment if plan.input_moment is None else plan.input_moment + moment
            plan.rows_seen += rows.shape[0]
        if self.config.fit_steps > 0:
            plan.inputs = keep_rows(plan.inputs, rows, self.config.fit_tokens, self.generator)

    def _whitening(self, plan: LayerPlan) -> torch.Tensor | None:
        """C = E[x x^T] of the layer's calibration inputs for init="activation" (released from the plan once read);
        None (plain SVD, with a note in the plan) when there is none or it is zero."""
        if self.config.init != "activation":
            return None
        moment, plan.input_moment = plan.input_moment, None
        if moment is None:
            plan.note = "svd (calibration never reached it)"
        elif not moment.diagonal().any():  # sum of x_i^2 = 0: every input was zero, nothing to whiten by
            plan.note = "svd (its calibration inputs were all zero)"
        else:
            return moment / plan.rows_seen
        return None

    def _choose_ranks(self, targets: Targets) -> None:
        config, plans = self.config, [(self.plans[fqn], layer) for fqn, layer in targets]
        if config.mac_budget is not None:
            layers = [BudgetLayer(*plan.handler.dense_shape(layer), plan.positions or 1,
                                  plan.decomposition.singular_values) for plan, layer in plans]
            try:
                ranks = allocate_mac_budget(layers, config.mac_budget, config.rank_multiple)
            except BudgetTooSmall as error:
                raise config.error(str(error)) from None
            for (plan, _), rank in zip(plans, ranks, strict=True):
                plan.rank = rank
                if rank is None:
                    plan.skip = f"mac_budget={config.mac_budget} keeps it dense"
            return
        for plan, layer in plans:
            if config.energy is None:
                plan.rank = self.fixed_rank(plan.handler, layer)  # past break-even, skip_reason left it out
            else:
                shape = plan.handler.dense_shape(layer)
                wanted = energy_rank(plan.decomposition.singular_values, config.energy)
                plan.rank = round_rank(wanted, config.rank_multiple, min(shape))
                plan.skip = above_break_even(shape, plan.rank)

    def convert(self, layer: nn.Module, fqn: str) -> tuple[nn.Module, dict]:
        plan = self.plans[fqn]
        if plan.skip is not None:
            raise SkipModule(plan.skip)
        notes = {"rank": plan.rank}
        if self.config.init == "random":
            new = plan.handler.build(layer, plan.rank, None)
            with torch.no_grad():
                dense = plan.handler.weight_matrix(layer).float()
                notes["rel_error"] = (torch.linalg.matrix_norm(dense - factorized_product(new).float())
                                      / dense.norm()).item()
        else:
            new = plan.handler.build(layer, plan.rank, plan.decomposition.factors(plan.rank))
            notes["rel_error"] = plan.decomposition.relative_error(plan.rank)
            if plan.note is not None:
                notes["init"] = plan.note
        if self.config.fit_steps > 0:
            if plan.inputs is None:
                notes["fit"] = "none (calibration never reached it)"
            else:
                notes.update(self.fit(plan, layer, new))
            self.replacements[fqn] = new
            notes.update(self.fit_blocks())
        return new, notes

    def fit_blocks(self) -> dict[str, float | str]:
        """Once both factorized layers of an MLP block exist, train them together to reproduce the dense block
        (fc2(act(fc1(x))) on fc1's kept calibration rows); the held-out errors of the block, for the row of the layer
        made second. Releases the rows no block still needs."""
        notes: dict[str, float | str] = {}
        for block in [b for b in self.blocks if b.first in self.replacements and b.second in self.replacements]:
            self.blocks.remove(block)
            rows = self.plans[block.first].inputs
            if rows is None:
                continue
            pair = nn.ModuleList([self.replacements[block.first], self.replacements[block.second]])
            with torch.no_grad():
                targets = block.dense(rows.to(block.dense.fc1.weight.dtype))
            result = fit_to_outputs(pair, rows, targets, steps=self.config.fit_steps, lr=self.config.fit_lr,
                                    forward=lambda x, pair=pair, act=block.dense.activation: pair[1](act(pair[0](x))))
            notes.update({"block": block.name, **result.notes("block_fit_")})
        waiting = {b.first for b in self.blocks}
        for fqn in self.replacements:
            if fqn not in waiting:
                self.plans[fqn].inputs = None
        return notes

    def fit(self, plan: LayerPlan, layer: nn.Module, new: nn.Module) -> dict[str, float | str]:
        """Train ``new`` to reproduce ``layer`` on its kept calibration rows (``algos.surgery.fit``), both read as
        matrices on rows of W's input space (im2col patches for a convolution); the held-out relative errors."""
        rows = plan.inputs
        with torch.no_grad():
            weight = plan.handler.weight_matrix(layer)
            targets = F.linear(rows.to(weight.dtype), weight.reshape(weight.shape[0], -1),
                               None if layer.bias is None else layer.bias.reshape(-1))

        def forward(x: torch.Tensor) -> torch.Tensor:
            bias = None if new.second.bias is None else new.second.bias.reshape(-1)
            return F.linear(F.linear(x, new.first.weight.flatten(1)), new.second.weight.flatten(1), bias)

        return fit_to_outputs(new, rows, targets, steps=self.config.fit_steps, lr=self.config.fit_lr,
                              forward=forward).notes()


@dataclass
class FittedBlock:
    """An MLP block (Linear, activation, Linear) whose two layers Factorize both targets: fitted together."""

    name: str  # where the block is: the Sequential, the BERT intermediate, the Transformer layer
    first: str
    second: str
    dense: DenseMLP


def mlp_blocks(model: nn.Module, targets: dict[str, nn.Module]) -> list[FittedBlock]:
    """The MLP blocks of the model (``algos.surgery.blocks.BLOCKS``: HF BERT intermediate/output pairs,
    ``nn.Sequential`` MLPs, Transformer layers' feed-forwards) whose fc1 and fc2 are both in ``targets``."""
    names = {id(layer): fqn for fqn, layer in targets.items()}
    found = []
    for fqn, module in model.named_modules():
        if not isinstance(module, BLOCK_CLASSES):
            continue
        try:
            dense = BLOCKS.find(module).find(module, fqn, model).dense
        except NotADenseBlock:
            continue
        first, second = names.get(id(dense.fc1)), names.get(id(dense.fc2))
        if first is not None and second is not None:
            found.append(FittedBlock(fqn, first, second, dense))
    return found


def above_break_even(shape: tuple[int, int], rank: int) -> str | None:
    """Why ``rank`` would not pay off: r (d_in + d_out) >= d_in d_out MACs per output position; else None."""
    d_in, d_out = shape
    break_even = break_even_rank(d_in, d_out)
    if rank >= break_even:
        return f"rank {rank} would not cut MACs (break-even rank {break_even:.1f} for {d_in} -> {d_out})"
    return None


def tied_parameters(model: nn.Module) -> set[int]:
    """ids of parameters owned by more than one module (e.g. an LM head tied to the embeddings)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    return {key for key, count in owners.items() if count > 1}


def apply_factorization(model: nn.Module, *, calibration=None, optimizers=None, example_inputs=None,
                        **settings) -> SurgeryReport:
    return FactorizeSurgery.apply(model, calibration=calibration, optimizers=optimizers,
                                  example_inputs=example_inputs, **settings)


settings_signature(apply_factorization, FactorizeConfig, doc="""\
Replace Linear / Conv1d / Conv2d / HF Conv1D layers of ``model`` by low-rank factorized ones, in place.

    ``calibration``: batches the model can be called with (a tensor, a dict of keyword arguments, or an iterable of
    them), needed by ``init="activation"`` and by ``mac_budget`` on convolutions. ``optimizers`` are kept consistent
    with the new parameters; ``example_inputs`` run once after surgery to fill in the report's MACs.

    Returns the report; each row's notes hold the rank and ``rel_error`` = ||W - UV|| / ||W|| (for
    ``init="activation"``: the relative output error on the calibration inputs). With ``fit_steps`` > 0 (which needs
    ``calibration``) each factorized layer is then trained to reproduce the dense one on its calibration inputs
    (``algos.surgery.fit``), and the notes add ``fit_error_before`` / ``fit_error_after``: the relative output error on
    held-out calibration rows before and after; an MLP block whose two layers are both factorized is then fitted as a
    block, its errors (``block_fit_error_before`` / ``_after``) on the row of its second layer.""")


@yaml_name("factorize")
class Factorize(SurgeryAlgorithm):
    """Composer form of :func:`apply_factorization`; takes Composer's ``Factorize`` arguments too (keywords only).

    Runs at ``Event.INIT`` by default, or at ``apply_at`` (e.g. ``"2ep"``) on the model trained so far. With
    ``init="activation"``, ``mac_budget`` or ``fit_steps``, the first ``calibration_batches`` batches of the train
    dataloader are the calibration, so the surgery runs at ``Event.FIT_START`` at the earliest.
    """

    surgery_class = FactorizeSurgery
