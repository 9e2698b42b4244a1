"""FFF-replace: the functional ``apply_fff`` and the Composer algorithm ``FFFReplace``."""

from __future__ import annotations

import copy
import inspect
import math
import warnings

import psutil
import torch
import torch.nn.functional as F
from composer.algorithms.warnings import NoEffectWarning
from composer.core import Event, State, TimeUnit
from composer.loggers import Logger
from torch import nn

from algos.fff.blocks import ALGORITHM, BLOCK_CLASSES, Block, find_block, is_block, rewritten_in_place
from algos.fff.init import init_from_dense, relative_error
from algos.fff.tree import ACTIVATIONS, FFF, activation_name, check_tree_arguments, fff_param_count
from algos.surgery.algorithm import SurgeryAlgorithm, parse_time, time_reached
from algos.surgery.calibration import CalibrationError, run_calibration
from algos.surgery.report import SurgeryReport
from algos.surgery.surgery import apply_surgery
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
            Trees that together cannot fit in the memory available where they are built are always refused.
        calibration_batches, calibration_tokens: use at most this many batches, and keep at most this many tokens
            per block (a random subset).
        target_modules, exclude_modules, filter_fn, strict: module selection (see ``algos.surgery.targets``).
        optimizers: kept consistent with the new parameters.
        example_inputs: run once after surgery to fill in the report's MACs.

    Applying it twice is applying it once. A ``model`` that is itself the block cannot be converted in place (the
    warning, or with ``strict`` the error, says how to wrap it or build the ``FFF`` directly).
    """
    check_arguments(depth=depth, form=form, leaf_width=leaf_width, init=init, activation=activation,
                    region_leak=region_leak, max_params=max_params)
    if init == "dense" and calibration is None:
        raise ValueError("FFFReplace: init='dense' needs calibration= batches (or, in a Trainer, a train_dataloader).")
    options = dict(depth=depth, form=form, leaf_width=leaf_width, mirrored=mirrored, region_leak=region_leak)
    named = target_modules is not None
    blocks: dict[str, Block] = {}
    inputs: dict[str, torch.Tensor] = {}

    def candidate(module: nn.Module, fqn: str) -> bool:
        # A Transformer layer converted before is no candidate: the search goes inside, where the core skips its
        # tree as "already converted by FFFReplace" (so applying twice is applying once).
        return not rewritten_in_place(module) and (named or is_block(module, fqn, model))

    def refuse(module: nn.Module, fqn: str) -> None:
        """The data-free refusals, run at selection so that ``FFFReplace.plan`` raises them too."""
        block = find_block(module, fqn, model)
        if isinstance(block, str):
            raise ValueError(f"FFFReplace: target {fqn!r} is {block}; target_modules must name dense MLP blocks "
                             f"or nn.Linear layers.")
        if init == "dense" and block.kind == "linear":
            raise ValueError(f"FFFReplace: init='dense' needs an MLP block (Linear, activation, Linear), but "
                             f"{fqn!r} is a lone nn.Linear; use init='scratch' for it.")
        _check_size({fqn: block}, max_params, **options)

    def prepare(targets):
        blocks.update((fqn, find_block(module, fqn, model)) for fqn, module in targets)
        _check_size(blocks, max_params, **options)  # all trees together
        if calibration is not None:
            collector = _TokenCollector(inputs, blocks, calibration_tokens)
            run_calibration(model, {fqn: block.dense.fc1 for fqn, block in blocks.items()}, calibration,
                            collector, max_batches=calibration_batches)

    def convert(module: nn.Module, fqn: str):
        block = blocks[fqn]
        with torch.device(block.dense.fc1.weight.device):  # built where it goes: the memory _check_size checked
            fff = FFF(block.dense.in_features, block.dense.out_features,
                      activation=activation or _activation_of(block), **options)
        notes = {"depth": depth, "form": form}
        if fqn in inputs:
            if init == "dense":
                init_from_dense(fff, block.dense, inputs[fqn])
            notes["rel_error"] = round(relative_error(fff, block.dense, inputs[fqn]), 4)
        elif calibration is not None:
            notes["init"] = "scratch (calibration never reached it)"
        return block.rewrite(fff, fqn, notes)

    if named:
        _check_named_targets(model, target_modules)
    root = None if named else _root_block_refusal(model, activation, options)
    if root is not None and strict:
        raise ValueError(root)
    with warnings.catch_warnings():
        if root is not None:  # said instead of the core's "no Sequential selected"
            warnings.warn(NoEffectWarning(root), stacklevel=2)
            warnings.simplefilter("ignore", NoEffectWarning)
        return apply_surgery(model, convert, algorithm=ALGORITHM,
                             classes=BLOCK_CLASSES + ((nn.Linear,) if named else ()), candidate_fn=candidate,
                             skip_fn=refuse, target_modules=target_modules, exclude_modules=exclude_modules,
                             filter_fn=filter_fn, optimizers=optimizers, strict=strict, example_inputs=example_inputs,
                             prepare=prepare)


def _root_block_refusal(model: nn.Module, activation, options: dict) -> str | None:
    """Why nothing happens when ``model`` itself is the block (the core never selects the root), and what to do."""
    block = find_block(model, "", model) if isinstance(model, BLOCK_CLASSES) else None
    if not isinstance(block, Block):
        return None
    if block.kind == "transformer_layer":
        how = "put it inside a parent module: apply_fff(nn.Sequential(layer), ...) converts the layer in place"
    else:
        act = activation or _activation_of(block)
        if isinstance(act, nn.Module):
            act = activation_name(act) or act  # "gelu" rather than nn.GELU() where a name says it
        defaults = {name: p.default for name, p in inspect.signature(FFF).parameters.items()}
        shown = {**{k: v for k, v in options.items() if k != "depth"}, "activation": act}
        extra = "".join(f", {k}={'nn.' if isinstance(v, nn.Module) else ''}{v!r}"
                        for k, v in shown.items() if v != defaults[k])
        how = (f"wrap it (model = nn.Sequential(mlp); apply_fff(model, ...) puts the tree at model[0]) or, for a "
               f"tree from scratch, build it: FFF({block.dense.in_features}, {block.dense.out_features}, "
               f"depth={options['depth']}{extra})")
    return (f"FFFReplace: the model itself is the MLP block (a {type(model).__name__}), and the root module cannot "
            f"be replaced in place; {how}.")


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


def _check_size(blocks: dict[str, Block], max_params, *, depth, form, leaf_width, mirrored, **_) -> None:
    """Refuse, before anything is allocated, a tree over ``max_params`` or trees that together need more memory than
    is available where they are built; both errors name the deepest depth that fits."""
    def params(block: Block, d: int) -> int:
        return fff_param_count(block.dense.in_features, block.dense.out_features, d, form, leaf_width, mirrored)

    def deepest(fits) -> str:
        fitting = [d for d in range(depth) if fits(d)]
        return f"depth <= {fitting[-1]} fits" if fitting else "no depth fits"

    def tree_bytes(block: Block, d: int) -> int:  # parameters in the default dtype, and the int64 usage counter
        return params(block, d) * torch.get_default_dtype().itemsize + 2**d * 8

    if max_params is not None:
        for fqn, block in blocks.items():
            dense = sum(p.numel() for p in block.dense.parameters())
            limit = max_params if isinstance(max_params, int) else max_params * dense
            if params(block, depth) > limit:
                hint = deepest(lambda d, block=block, limit=limit: params(block, d) <= limit)
                raise ValueError(f"FFFReplace: depth={depth} gives {fqn!r} a tree of {params(block, depth):,} "
                                 f"parameters, more than max_params={max_params!r} allows ({int(limit):,}; the "
                                 f"dense block has {dense:,}); {hint}.")
    fqn, block = max(blocks.items(), key=lambda item: params(item[1], depth))
    memory = available_memory(block.dense.fc1.weight.device)
    if memory is None:
        return
    available, source = memory

    def needed(d: int) -> int:
        return sum(tree_bytes(b, d) for b in blocks.values())

    if needed(depth) > available:
        together = f"; {len(blocks)} trees, {_bytes(needed(depth))} together" if len(blocks) > 1 else ""
        raise ValueError(f"FFFReplace: depth={depth} gives {fqn!r} a tree of {params(block, depth):,} parameters "
                         f"({_bytes(tree_bytes(block, depth))}{together}), more than the {_bytes(available)} of "
                         f"memory available ({source}); {deepest(lambda d: needed(d) <= available)}.")


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """Free bytes where a tree on ``device`` is allocated, and where that number comes from (None: not known)."""
    if device.type == "cpu":
        return psutil.virtual_memory().available, "psutil.virtual_memory().available"
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], "torch.cuda.mem_get_info"
    return None  # meta (nothing is allocated) and other accelerators: not checked


def _bytes(count: int) -> str:
    return f"{count / 1e9:,.1f} GB" if count >= 1e8 else f"{count / 1e6:,.1f} MB"


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
