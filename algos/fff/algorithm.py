"""FFF-replace: the functional ``apply_fff`` and the Composer algorithm ``FFFReplace``."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from composer.core import Event, State, TimeUnit
from composer.loggers import Logger
from torch import nn

from algos.fff.blocks import BLOCK_CLASSES, Block, find_block, is_block
from algos.fff.init import init_from_dense, relative_error
from algos.fff.tree import ACTIVATIONS, FFF, check_tree_arguments, fff_param_count
from algos.surgery.algorithm import SurgeryAlgorithm, parse_time, time_reached
from algos.surgery.calibration import CalibrationError, run_calibration
from algos.surgery.replace import apply_surgery
from algos.surgery.report import SurgeryReport
from algos.surgery.targets import converted_by, name_matches

INITS = ("scratch", "dense")
_FUNCTIONAL_ACTIVATIONS = {F.gelu: "gelu", F.relu: "relu", F.silu: "silu", torch.tanh: "tanh"}


def check_arguments(*, depth, form, leaf_width, init, activation, region_leak, max_params) -> None:
    """One-line errors for bad arguments, shared by the functional and the Composer form."""
    check_tree_arguments(depth=depth, form=form, leaf_width=leaf_width, activation=activation or "gelu",
                         region_leak=region_leak, who="FFFReplace")
    if init not in INITS:
        raise ValueError(f"FFFReplace: init={init!r} is not one of {', '.join(map(repr, INITS))}.")
    if max_params is not None and (isinstance(max_params, bool) or not isinstance(max_params, (int, float))
                                   or max_params <= 0):
        raise ValueError(f"FFFReplace: max_params={max_params!r} must be None, an int (parameters per tree) or a "
                         f"float (multiple of the replaced block's parameters), > 0.")


def apply_fff(
    model: nn.Module,
    *,
    depth: int,
    form: str = "neuron",
    leaf_width: int = 32,
    init: str = "scratch",
    calibration=None,
    mirrored: bool = True,
    region_leak: float = 0.0,
    activation: str | None = None,
    max_params: int | float | None = None,
    calibration_batches: int | None = None,
    calibration_tokens: int = 4096,
    target_modules=None,
    exclude_modules=None,
    filter_fn=None,
    optimizers=None,
    strict: bool = False,
    example_inputs=None,
) -> SurgeryReport:
    """Replace dense feed-forward blocks of ``model`` by Fast FeedForward trees of the same input/output width.

    Targets by default: HF BERT-family intermediate/output pairs, ``nn.Sequential`` MLPs (torchvision ViT's
    ``MLPBlock`` included) and ``nn.Transformer{Encoder,Decoder}Layer`` feed-forwards. Naming modules in
    ``target_modules`` may also pick plain ``nn.Linear`` layers; a named module that is neither is an error.

    Args:
        depth: tree depth: a token visits depth + 1 neurons (neuron form) or depth decisions and one leaf.
        form: ``"neuron"`` (UltraFastBERT, hard routing in training too) or ``"leaf"`` (FFF paper, soft mixture
            of ``leaf_width``-wide leaf MLPs in training, hard in eval).
        init: ``"scratch"`` (fresh weights) or ``"dense"`` (from the trained block: median splits along principal
            directions, then the dense neurons that matter per leaf / least-squares node outputs), which needs
            ``calibration``.
        calibration: batches the model can be called with (a tensor, a dict, or an iterable of them). With it, each
            row of the report notes ``rel_error`` = ||FFF(x) - block(x)|| / ||block(x)|| on those inputs.
        mirrored: neuron form: routing and contribution decoupled (see ``algos.fff.tree``); False is UltraFastBERT's.
        region_leak: leaf form: probability of flipping each soft decision in training.
        activation: ``"gelu"``, ``"relu"``, ... ; None takes the block's own (GELU for a lone Linear).
        max_params: refuse trees bigger than this: an int (parameters), or a float (times the block's parameters).
        calibration_batches, calibration_tokens: use at most this many batches, and keep at most this many tokens
            per block (a random subset).
        target_modules, exclude_modules, filter_fn, strict: module selection (see ``algos.surgery.targets``).
        optimizers: kept consistent with the new parameters.
        example_inputs: run once after surgery to fill in the report's MACs.
    """
    check_arguments(depth=depth, form=form, leaf_width=leaf_width, init=init, activation=activation,
                    region_leak=region_leak, max_params=max_params)
    if init == "dense" and calibration is None:
        raise ValueError("FFFReplace: init='dense' needs calibration= batches (or, in a Trainer, a train_dataloader).")
    options = dict(depth=depth, form=form, leaf_width=leaf_width, mirrored=mirrored, region_leak=region_leak)
    blocks: dict[str, Block] = {}
    inputs: dict[str, torch.Tensor] = {}

    def prepare(targets):
        for fqn, module in targets:
            block = find_block(module, fqn, model)
            if isinstance(block, str):
                raise ValueError(f"FFFReplace: target {fqn!r} is {block}; target_modules must name dense MLP blocks "
                                 f"or nn.Linear layers.")
            if init == "dense" and block.kind == "linear":
                raise ValueError(f"FFFReplace: init='dense' needs an MLP block (Linear, activation, Linear), but "
                                 f"{fqn!r} is a lone nn.Linear; use init='scratch' for it.")
            _check_size(fqn, block, max_params, **options)
            blocks[fqn] = block
        if calibration is not None:
            collector = _TokenCollector(inputs, blocks, calibration_tokens)
            run_calibration(model, {fqn: block.dense.fc1 for fqn, block in blocks.items()}, calibration,
                            collector, max_batches=calibration_batches)

    def convert(module: nn.Module, fqn: str):
        block = blocks[fqn]
        weight = block.dense.fc1.weight
        fff = FFF(block.dense.in_features, block.dense.out_features,
                  activation=activation or _activation_of(block), **options).to(weight.device)
        notes = {"depth": depth, "form": form}
        if fqn in inputs:
            if init == "dense":
                init_from_dense(fff, block.dense, inputs[fqn])
            notes["rel_error"] = round(relative_error(fff, block.dense, inputs[fqn]), 4)
        elif calibration is not None:
            notes["init"] = "scratch (calibration never reached it)"
        return block.rewrite(fff, fqn, notes)

    named = target_modules is not None
    if named:
        _check_named_targets(model, target_modules)
    return apply_surgery(model, convert, algorithm="FFFReplace",
                         classes=BLOCK_CLASSES + ((nn.Linear,) if named else ()),
                         candidate_fn=None if named else (lambda module, fqn: is_block(module, fqn, model)),
                         target_modules=target_modules, exclude_modules=exclude_modules, filter_fn=filter_fn,
                         optimizers=optimizers, strict=strict, example_inputs=example_inputs, prepare=prepare)


def _check_named_targets(model: nn.Module, target_modules) -> None:
    """A module named in ``target_modules`` (outermost match) must be a block or a Linear: else a one-line error."""
    matched: list[str] = []
    for fqn, module in model.named_modules():
        if not fqn or not name_matches(fqn, target_modules) or any(fqn.startswith(m + ".") for m in matched):
            continue
        matched.append(fqn)
        if converted_by(module) is None and not isinstance(module, BLOCK_CLASSES + (nn.Linear,)):
            raise ValueError(f"FFFReplace: target {fqn!r} is a {type(module).__name__}, not a dense MLP block; "
                             f"target_modules must name dense MLP blocks or nn.Linear layers.")


def _check_size(fqn: str, block: Block, max_params, *, depth, form, leaf_width, mirrored, **_) -> None:
    if max_params is None:
        return
    dense = sum(p.numel() for p in block.dense.parameters())
    limit = max_params if isinstance(max_params, int) else max_params * dense
    d_in, d_out = block.dense.in_features, block.dense.out_features
    size = fff_param_count(d_in, d_out, depth, form, leaf_width, mirrored)
    if size > limit:
        fitting = [d for d in range(depth) if fff_param_count(d_in, d_out, d, form, leaf_width, mirrored) <= limit]
        hint = f"depth <= {fitting[-1]} fits" if fitting else "no depth fits"
        raise ValueError(f"FFFReplace: depth={depth} gives {fqn!r} a tree of {size:,} parameters, more than "
                         f"max_params={max_params!r} allows ({int(limit):,}; the dense block has {dense:,}); {hint}.")


def _activation_of(block: Block) -> str | nn.Module:
    act = block.dense.activation
    if act is None:
        return "gelu"
    if isinstance(act, nn.Module):
        return copy.deepcopy(act)
    if act in _FUNCTIONAL_ACTIVATIONS:
        return _FUNCTIONAL_ACTIVATIONS[act]
    raise ValueError(f"FFFReplace: cannot reuse the block's activation {act!r}; pass activation= one of "
                     f"{', '.join(map(repr, ACTIVATIONS))}.")


class _TokenCollector:
    """Calibration callback: keeps up to ``cap`` input rows per block (a fixed-seed random subset when more come)."""

    def __init__(self, inputs: dict[str, torch.Tensor], blocks: dict[str, Block], cap: int):
        self.inputs, self.blocks, self.cap = inputs, blocks, cap
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, fqn: str, module: nn.Module, x: torch.Tensor) -> None:
        expected = self.blocks[fqn].dense.in_features
        if x.shape[-1] != expected:
            raise CalibrationError(f"FFFReplace: calibration input of width {x.shape[-1]} reached {fqn!r} "
                                   f"(expecting {expected}).")
        rows = torch.cat([self.inputs[fqn], x.reshape(-1, expected)]) if fqn in self.inputs else x.reshape(-1, expected)
        if len(rows) > self.cap:
            rows = rows[torch.randperm(len(rows), generator=self.generator)[: self.cap].to(rows.device)]
        self.inputs[fqn] = rows


class FFFReplace(SurgeryAlgorithm):
    """Composer form of :func:`apply_fff`, plus the training aids trees need.

    * ``hardening``: weight of the leaf form's hardening loss (mean decision entropy), added to the loss at
      ``Event.AFTER_LOSS``; ``hardening_ramp`` (a Composer time, e.g. ``"200ba"`` or ``"0.5dur"``) ramps the weight
      linearly from 0 to ``hardening`` over that span.
    * ``hard_training_at``: from this time on, leaf-form trees train on their hard path (leaves only).
    * Every ``log_interval`` batches: ``fff/leaf_usage_entropy`` (entropy of the leaf/bottom-node usage over the
      interval, divided by its maximum: 1 = even use), ``fff/load_balance`` (busiest over mean usage: 1 = even) and,
      for the leaf form, ``fff/decision_entropy``.
    * ``find_unused_parameters`` is True, so DDP tolerates the parameters hard routing leaves without gradient.

    Surgery runs at ``Event.INIT``; with ``init="dense"`` the first ``calibration_batches`` train batches are the
    calibration, so at ``Event.FIT_START``; or at ``apply_at``.
    """

    def __init__(self, *, depth: int, form: str = "neuron", leaf_width: int = 32, init: str = "scratch",
                 mirrored: bool = True, region_leak: float = 0.0, activation: str | None = None,
                 max_params: int | float | None = None, calibration_batches: int = 8, calibration_tokens: int = 4096,
                 hardening: float = 0.0, hardening_ramp: str | None = None, hard_training_at: str | None = None,
                 log_interval: int = 50, apply_at=None, target_modules=None, exclude_modules=None, filter_fn=None,
                 strict: bool = False):
        check_arguments(depth=depth, form=form, leaf_width=leaf_width, init=init, activation=activation,
                        region_leak=region_leak, max_params=max_params)
        if not (isinstance(hardening, (int, float)) and hardening >= 0):
            raise ValueError(f"FFFReplace: hardening={hardening!r} must be a number >= 0.")
        if isinstance(log_interval, bool) or not isinstance(log_interval, int) or log_interval < 1:
            raise ValueError(f"FFFReplace: log_interval={log_interval!r} must be an int >= 1.")
        self.depth, self.form, self.leaf_width, self.init = depth, form, leaf_width, init
        self.mirrored, self.region_leak, self.activation = mirrored, region_leak, activation
        self.max_params = max_params
        self.calibration_batches, self.calibration_tokens = calibration_batches, calibration_tokens
        self.hardening, self.hardening_ramp, self.hard_training_at = hardening, hardening_ramp, hard_training_at
        self.log_interval = log_interval
        self._ramp = parse_time(hardening_ramp, "FFFReplace", "hardening_ramp")
        self._hard_at = parse_time(hard_training_at, "FFFReplace", "hard_training_at")
        super().__init__(apply_at=apply_at, target_modules=target_modules, exclude_modules=exclude_modules,
                         filter_fn=filter_fn, strict=strict)

    @property
    def calibration_needed(self) -> int:
        return self.calibration_batches if self.init == "dense" else 0

    @property
    def find_unused_parameters(self) -> bool:
        return True

    def surgery(self, model: nn.Module, optimizers=None, calibration=None) -> SurgeryReport:
        return apply_fff(
            model, depth=self.depth, form=self.form, leaf_width=self.leaf_width, init=self.init,
            calibration=calibration, mirrored=self.mirrored, region_leak=self.region_leak, activation=self.activation,
            max_params=self.max_params, calibration_batches=self.calibration_batches,
            calibration_tokens=self.calibration_tokens, target_modules=self.target_modules,
            exclude_modules=self.exclude_modules, filter_fn=self.filter_fn, optimizers=optimizers, strict=self.strict)

    def match(self, event: Event, state: State) -> bool:
        aids = (event == Event.AFTER_LOSS and self.hardening > 0) or event == Event.BATCH_END
        return super().match(event, state) or (aids and bool(trees(state.model)))

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.AFTER_LOSS:
            self._add_hardening_loss(state)
            return
        super().apply(event, state, logger)
        if self._hard_at is not None and time_reached(state, self._hard_at):  # "0ba": hard from the surgery on
            for tree in trees(state.model):
                tree.hard_training = True
        if event == Event.BATCH_END:
            if int(state.timestamp.batch) % self.log_interval == 0:
                logger.log_metrics(usage_metrics(trees(state.model)))

    def hardening_weight(self, state: State) -> float:
        if self._ramp is None:
            return self.hardening
        if self._ramp.unit == TimeUnit.DURATION:
            progress = float(state.get_elapsed_duration() or 0) / self._ramp.value
        else:
            progress = int(state.timestamp.get(self._ramp.unit)) / max(self._ramp.value, 1)
        return self.hardening * min(1.0, progress)

    def _add_hardening_loss(self, state: State) -> None:
        entropies = [tree.last_entropy for tree in trees(state.model) if tree.soft and tree.last_entropy is not None]
        if not entropies:
            return
        extra = self.hardening_weight(state) * torch.stack(entropies).mean()
        loss = state.loss
        if isinstance(loss, torch.Tensor):
            state.loss = loss + extra
        elif isinstance(loss, dict):  # Composer sums the values, or uses "total" when there is one
            state.loss = {**loss, "fff_hardening": extra}
            if "total" in loss:
                state.loss["total"] = loss["total"] + extra
        else:
            state.loss = (*loss, extra)


def trees(model: nn.Module) -> list[FFF]:
    return [module for module in model.modules() if isinstance(module, FFF)]


def usage_metrics(fffs: list[FFF]) -> dict[str, float]:
    """Usage statistics since the last call, averaged over trees; resets the counters."""
    entropies, balances, decisions = [], [], []
    for tree in fffs:
        usage = tree.leaf_usage.float()
        total = usage.sum()
        if total > 0 and usage.numel() > 1:
            p = usage / total
            entropies.append(float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(usage.numel())))
            balances.append(float(usage.max() / usage.mean()))
        if tree.form == "leaf" and tree.last_entropy is not None:
            decisions.append(float(tree.last_entropy) / math.log(2))
        tree.leaf_usage.zero_()
    metrics = {}
    if entropies:
        metrics["fff/leaf_usage_entropy"] = sum(entropies) / len(entropies)
        metrics["fff/load_balance"] = sum(balances) / len(balances)
    if decisions:
        metrics["fff/decision_entropy"] = sum(decisions) / len(decisions)
    return metrics
