"""FFF-replace: the surgery (``FFFSurgery``), the functional ``apply_fff`` and the Composer algorithm ``FFFReplace``
(the surgery plus the training aids of ``algos.fff.training``). The settings are ``FFFConfig`` (config.py); the block
blocks it rewrites are the core's (``algos.surgery.blocks``), what it does with each family is in ``handlers``."""

from __future__ import annotations

import copy
import dataclasses
import inspect

import psutil
import torch
import torch.nn.functional as F
from composer.core import Event, State
from composer.loggers import Logger
from torch import nn

from algos.fff.config import FFFConfig
from algos.fff.dense_init import init_from_dense, relative_error, split_top_down
from algos.fff.handlers import already_converted, rewrite, tree_goes_inside
from algos.fff.training import TRAINING_SETTINGS, FFFTraining, FFFTrainingConfig
from algos.fff.tree import ACTIVATIONS, DEFAULT_ACTIVATION, FFF, activation_name
from algos.surgery.algorithm import SurgeryAlgorithm
from algos.surgery.blocks import BLOCK_CLASSES, BLOCKS, Block, NotADenseBlock
from algos.surgery.budget import BudgetTooSmall, BudgetUnit, allocate_budget
from algos.surgery.calibration import CalibrationError, keep_rows, run_calibration, token_rows
from algos.surgery.config import Selection
from algos.surgery.errors import NothingToRewrite
from algos.surgery.fit import fit_to_outputs
from algos.surgery.replace import SkipModule
from algos.surgery.report import SurgeryReport
from algos.surgery.surgery import Surgery, Targets, settings_signature
from algos.surgery.targets import converted_by, name_matches
from algos.surgery.yaml_names import yaml_name

_FUNCTIONAL_ACTIVATIONS = {F.gelu: "gelu", F.relu: "relu", F.silu: "silu", torch.tanh: "tanh"}


class ModelIsTheBlock(NothingToRewrite):
    """The model itself is a dense block, and the root module cannot be replaced in place (the message says what to
    do instead): a ``NoEffectWarning`` unless ``strict``."""


class FFFSurgery(Surgery):
    """Dense MLP blocks (``algos.surgery.blocks.BLOCKS``) -> FFF trees of the same input/output width."""

    config_class = FFFConfig
    config: FFFConfig

    def __init__(self, model: nn.Module, config: FFFConfig, selection: Selection | None = None):
        super().__init__(model, config, selection)
        self.found: dict[str, Block] = {}  # every dense block met at selection, found once
        self.not_dense: dict[str, str] = {}  # named candidates that are no dense block: what each is instead
        self.targets: dict[str, Block] = {}  # the blocks to convert
        self.calibrated = False  # calibration was given (so a target it never reached says so)
        self.inputs: dict[str, torch.Tensor] = {}  # calibration rows reaching each target, at most calibration_tokens
        self.generator = torch.Generator().manual_seed(0)  # which rows are kept when more come
        self.widths: dict[str, int | None] = {}  # mac_budget: each target's leaf width (None: it stays dense)

    @property
    def named(self) -> bool:
        return self.selection.target_modules is not None

    @property
    def classes(self) -> tuple[type[nn.Module], ...]:
        return BLOCKS.classes if self.named else BLOCK_CLASSES

    def check_model(self) -> None:
        """A module named in ``target_modules`` (outermost match) must be a block or a Linear; a model that is itself
        the block (the core never selects the root) is ``ModelIsTheBlock``, saying what to do."""
        if self.named:
            self._check_named_targets()
        elif isinstance(self.model, BLOCK_CLASSES):
            try:
                block = BLOCKS.find(self.model).find(self.model, "", self.model)
            except NotADenseBlock:
                return
            raise ModelIsTheBlock(self.name, f"the model itself is the MLP block (a {type(self.model).__name__}), "
                                             f"and the root module cannot be replaced in place; "
                                             f"{self._how_to_convert_root(block)}.")

    def is_candidate(self, module: nn.Module, fqn: str) -> bool:
        """A dense block; with ``target_modules``, any module of the block classes, so that ``skip_reason`` can say
        what a named one lacks. A Transformer layer converted before is no candidate: the search goes inside, where
        the core skips its tree as already converted (so applying twice is applying once)."""
        if already_converted(module):
            return False
        family = BLOCKS.find(module)
        try:
            self.found[fqn] = family.find(module, fqn, self.model)
        except NotADenseBlock as what:
            self.not_dense[fqn] = str(what)
            return self.named
        return True

    def skip_reason(self, module: nn.Module, fqn: str) -> str | None:
        """The data-free refusals (errors, not skips), at selection so that ``FFFReplace.plan`` raises them too."""
        if fqn in self.not_dense:
            raise self.config.error(f"target {fqn!r} is {self.not_dense[fqn]}; target_modules must name dense MLP "
                                    f"blocks or nn.Linear layers.")
        block = self.found[fqn]
        width = min(block.dense.in_features, block.dense.out_features)
        if width < self.config.min_width:
            return (f"min(in, out) = {width} below min_width {self.config.min_width} (a tree this narrow is slower "
                    f"than the dense block at batch 1)")
        if self.config.init == "dense" and block.dense.is_lone_linear:
            raise self.config.error(f"init='dense' needs an MLP block (Linear, activation, Linear), but {fqn!r} is a "
                                    f"lone nn.Linear; use init='scratch' for it.")
        self.check_size({fqn: block})
        return None

    def prepare(self, targets: Targets, calibration) -> None:
        if self.config.init == "dense" and calibration is None:
            raise self.config.error("init='dense' needs calibration= batches (or, in a Trainer, a train_dataloader).")
        if self.config.fit_steps > 0 and calibration is None:
            raise self.config.error(f"fit_steps={self.config.fit_steps} needs calibration= batches (or, in a "
                                    f"Trainer, a train_dataloader).")
        self.targets = {fqn: self.found[fqn] for fqn, _ in targets}
        self.check_size(self.targets)  # all trees together
        if calibration is not None:
            self.calibrated = True
            run_calibration(self.model, {fqn: block.dense.fc1 for fqn, block in self.targets.items()}, calibration,
                            self.collect_input, max_batches=self.config.calibration_batches)
        if self.config.mac_budget is not None:
            self.widths = self.choose_widths()
            self.check_size(self.targets)  # now with each tree's own width

    def recalibrate(self, module: nn.Module, fqn: str, calibration) -> None:
        """``sequential``: the block's calibration tokens again, as they reach it through the trees made so far
        (``mac_budget``'s widths stay those chosen on the original model)."""
        self.inputs.pop(fqn, None)
        run_calibration(self.model, {fqn: self.targets[fqn].dense.fc1}, calibration, self.collect_input,
                        max_batches=self.config.calibration_batches)

    def collect_input(self, fqn: str, module: nn.Module, x: torch.Tensor, real: torch.Tensor | None) -> None:
        """Calibration callback: keeps up to ``calibration_tokens`` input rows per block, padding left out (a
        fixed-seed random subset when more come)."""
        width = self.targets[fqn].dense.in_features
        if x.shape[-1] != width:
            raise CalibrationError(f"{self.name}: calibration input of width {x.shape[-1]} reached {fqn!r} "
                                   f"(expecting {width}).")
        self.inputs[fqn] = keep_rows(self.inputs.get(fqn), token_rows(x, real), self.config.calibration_tokens,
                                     self.generator)

    def choose_widths(self) -> dict[str, int | None]:
        """mac_budget: each target's leaf width, or None where it stays dense (``algos.surgery.budget``). Per token,
        a leaf tree costs  depth d_in + w (d_in + d_out)  MACs (the decisions, then one leaf of width w) and the
        dense block  h (d_in + d_out); a width's error is ||FFF(x) - block(x)||^2 / ||block(x)||^2 of the tree built
        from the block at that width (hard routing) on the block's calibration tokens."""
        config, units = self.config, []
        for fqn, block in self.targets.items():
            if fqn not in self.inputs:
                raise config.error(f"calibration never reached {fqn!r}, so its error at each leaf width for "
                                   f"mac_budget is unknown; exclude it with exclude_modules.")
            inputs = self.inputs[fqn]
            d_in, d_out, hidden = block.dense.in_features, block.dense.out_features, block.dense.fc1.out_features
            split = split_top_down(inputs.float(), config.depth)  # the routing: the same at every width

            def error(width: int, block=block, inputs=inputs, split=split) -> float:
                tree = self.build(block, width)
                init_from_dense(tree, block.dense, inputs, split)
                return relative_error(tree, block.dense, inputs) ** 2

            units.append(BudgetUnit(sizes=range(config.leaf_width, hidden, config.leaf_width),
                                    cost=lambda w, d_in=d_in, d_out=d_out: config.depth * d_in + w * (d_in + d_out),
                                    dense_cost=hidden * (d_in + d_out), error=error))
        try:
            widths = allocate_budget(units, config.mac_budget)
        except BudgetTooSmall as small:
            raise config.error(f"mac_budget={config.mac_budget} cannot be met: leaf width {config.leaf_width} in "
                               f"every converted block already keeps {small.smallest_share:.1%} of their MACs per "
                               f"token; raise mac_budget or lower leaf_width.") from None
        return dict(zip(self.targets, widths, strict=True))

    def build(self, block: Block, leaf_width: int | None = None) -> FFF:
        """A fresh tree for ``block``, built where the block is (the memory check_size checked)."""
        with torch.device(block.dense.fc1.weight.device):
            return self.config.tree(block.dense.in_features, block.dense.out_features, self.activation_for(block),
                                    leaf_width)

    def convert(self, module: nn.Module, fqn: str):
        block = self.targets[fqn]
        notes = {"depth": self.config.depth, "form": self.config.form}
        if self.config.mac_budget is not None:
            if self.widths[fqn] is None:
                raise SkipModule(f"mac_budget={self.config.mac_budget} keeps it dense")
            notes["leaf_width"] = self.widths[fqn]
        fff = self.build(block, self.widths.get(fqn))
        if fqn in self.inputs:
            if self.config.init == "dense":
                init_from_dense(fff, block.dense, self.inputs[fqn])
            notes["rel_error"] = round(relative_error(fff, block.dense, self.inputs[fqn]), 4)
            if self.config.fit_steps > 0:
                notes.update(self.fit(fff, block, self.inputs[fqn]))
        elif self.calibrated:
            notes["init"] = "scratch (calibration never reached it)"
        return rewrite(block, fff, fqn, notes)

    def fit(self, fff: FFF, block: Block, inputs: torch.Tensor) -> dict[str, float | str]:
        """Train ``fff`` to reproduce ``block.dense`` on ``inputs`` (``algos.surgery.fit``); the held-out relative
        errors before and after, for the report."""
        with torch.no_grad():
            targets = block.dense(inputs.to(block.dense.fc1.weight.dtype))
        return fit_to_outputs(fff, inputs, targets, steps=self.config.fit_steps, lr=self.config.fit_lr).notes()

    def activation_for(self, block: Block) -> str | nn.Module:
        """The tree's activation: ``activation``, else the block's own (GELU for a lone Linear)."""
        act = self.config.activation or block.dense.activation
        if act is None:
            return DEFAULT_ACTIVATION
        if isinstance(act, nn.Module):
            return copy.deepcopy(act)
        if isinstance(act, str):
            return act
        if act in _FUNCTIONAL_ACTIVATIONS:
            return _FUNCTIONAL_ACTIVATIONS[act]
        raise self.config.error(f"cannot reuse the block's activation {act!r}; pass activation= one of "
                                f"{', '.join(map(repr, ACTIVATIONS))}.")

    def check_size(self, blocks: dict[str, Block]) -> None:
        """Refuse, before anything is allocated, a tree over ``max_params`` or trees that together need more memory
        than is available where they are built; both errors name the deepest depth that fits."""
        depth, max_params = self.config.depth, self.config.max_params

        def params(fqn: str, d: int) -> int:  # with mac_budget, once widths are chosen, each tree's own width
            return self.config.tree_params(blocks[fqn], d, self.widths.get(fqn))

        def deepest(fits) -> str:
            fitting = [d for d in range(depth) if fits(d)]
            return f"depth <= {fitting[-1]} fits" if fitting else "no depth fits"

        def tree_bytes(fqn: str, d: int) -> int:  # parameters in the default dtype, and the int64 usage counter
            return params(fqn, d) * torch.get_default_dtype().itemsize + 2**d * 8

        if max_params is not None:
            for fqn, block in blocks.items():
                dense = sum(p.numel() for p in block.dense.parameters())
                limit = max_params if isinstance(max_params, int) else max_params * dense
                if params(fqn, depth) > limit:
                    hint = deepest(lambda d, fqn=fqn, limit=limit: params(fqn, d) <= limit)
                    raise self.config.error(f"depth={depth} gives {fqn!r} a tree of {params(fqn, depth):,} "
                                            f"parameters, more than max_params={max_params!r} allows ({int(limit):,}; "
                                            f"the dense block has {dense:,}); {hint}.")
        largest = max(blocks, key=lambda fqn: params(fqn, depth))
        memory = available_memory(blocks[largest].dense.fc1.weight.device)
        if memory is None:
            return
        available, source = memory

        def needed(d: int) -> int:
            return sum(tree_bytes(fqn, d) for fqn in blocks)

        if needed(depth) > available:
            together = f"; {len(blocks)} trees, {_bytes(needed(depth))} together" if len(blocks) > 1 else ""
            raise self.config.error(f"depth={depth} gives {largest!r} a tree of {params(largest, depth):,} "
                                    f"parameters ({_bytes(tree_bytes(largest, depth))}{together}), more than the "
                                    f"{_bytes(available)} of memory available ({source}); "
                                    f"{deepest(lambda d: needed(d) <= available)}.")

    def _check_named_targets(self) -> None:
        matched: list[str] = []
        for fqn, module in self.model.named_modules():
            if (not fqn or not name_matches(fqn, self.selection.target_modules)
                    or any(fqn.startswith(m + ".") for m in matched)):
                continue
            matched.append(fqn)
            if converted_by(module) is None and BLOCKS.find(module) is None:
                raise self.config.error(f"target {fqn!r} is a {type(module).__name__}, not a dense MLP block; "
                                        f"target_modules must name dense MLP blocks or nn.Linear layers.")

    def _how_to_convert_root(self, block: Block) -> str:
        if tree_goes_inside(block):
            return "put it inside a parent module: apply_fff(nn.Sequential(layer), ...) converts the layer in place"
        c, act = self.config, self.activation_for(block)
        if isinstance(act, nn.Module):
            act = activation_name(act) or act  # "gelu" rather than nn.GELU() where a name says it
        defaults = {name: p.default for name, p in inspect.signature(FFF).parameters.items()}
        shown = {"form": c.form, "leaf_width": c.leaf_width, "node": c.node, "region_leak": c.region_leak,
                 "activation": act}
        extra = "".join(f", {k}={'nn.' if isinstance(v, nn.Module) else ''}{v!r}"
                        for k, v in shown.items() if v != defaults[k])
        return (f"wrap it (model = nn.Sequential(mlp); apply_fff(model, ...) puts the tree at model[0]) or, for a "
                f"tree from scratch, build it: FFF({block.dense.in_features}, {block.dense.out_features}, "
                f"depth={c.depth}{extra})")


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """Free bytes where a tree on ``device`` is allocated, and where that number comes from (None: not known)."""
    if device.type == "cpu":
        return psutil.virtual_memory().available, "psutil.virtual_memory().available"
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], "torch.cuda.mem_get_info"
    return None  # meta (nothing is allocated) and other accelerators: not checked


def _bytes(count: int) -> str:
    return f"{count / 1e9:,.1f} GB" if count >= 1e8 else f"{count / 1e6:,.1f} MB"


def apply_fff(model: nn.Module, *, calibration=None, optimizers=None, example_inputs=None,
              **settings) -> SurgeryReport:
    return FFFSurgery.apply(model, calibration=calibration, optimizers=optimizers, example_inputs=example_inputs,
                            **settings)


settings_signature(apply_fff, FFFConfig, doc="""Replace dense feed-forward blocks of ``model`` by Fast FeedForward
    trees of the same input/output width, in place; returns the report.

    Targets by default: HF BERT-family intermediate/output pairs, ``nn.Sequential`` MLPs (torchvision ViT's
    ``MLPBlock`` included) and ``nn.Transformer{Encoder,Decoder}Layer`` feed-forwards. Naming modules in
    ``target_modules`` may also pick plain ``nn.Linear`` layers; a named module that is neither is an error.

    ``calibration``: batches the model can be called with (a tensor, a dict, or an iterable of them), needed by
    ``init='dense'``. With it, each row of the report notes ``rel_error`` = ||FFF(x) - block(x)|| / ||block(x)|| on
    those inputs; with ``fit_steps`` > 0 each tree is then trained to reproduce its block on them
    (``algos.surgery.fit``), and the row adds ``fit_error_before`` / ``fit_error_after``, the same error on held-out
    calibration rows before and after. ``optimizers`` are kept consistent with the new parameters;
    ``example_inputs`` run once after surgery to fill in the report's MACs.

    Applying it twice is applying it once. A ``model`` that is itself the block cannot be converted in place (the
    warning, or with ``strict`` the error, says how to wrap it or build the ``FFF`` directly).""")


@yaml_name("fff")
class FFFReplace(SurgeryAlgorithm):
    """Composer form of :func:`apply_fff`, plus the training aids trees need (``hardening``, ``hardening_ramp``,
    ``hard_training_at``, ``log_interval``: see :class:`algos.fff.training.FFFTraining`, which this delegates to).
    ``find_unused_parameters`` is True, so DDP tolerates the parameters hard routing leaves without gradient.

    Surgery runs at ``Event.INIT``; with ``init="dense"`` or ``fit_steps`` the first ``calibration_batches`` train
    batches are the calibration, so at ``Event.FIT_START``; or at ``apply_at``.
    """

    surgery_class = FFFSurgery

    def __init__(self, **settings):
        aids = {key: settings.pop(key) for key in TRAINING_SETTINGS if key in settings}
        super().__init__(**settings)
        self.training_aids = FFFTraining(name=self.name, **aids)

    def _own_arguments(self) -> dict:
        return self.training_aids.config.changed()  # the training aids' settings, in repr

    @property
    def find_unused_parameters(self) -> bool:
        return self.training_aids.find_unused_parameters

    def match(self, event: Event, state: State) -> bool:
        return super().match(event, state) or self.training_aids.match(event, state)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if super().match(event, state):
            super().apply(event, state, logger)
        if self.training_aids.match(event, state):  # after the surgery, which may just have made the trees
            self.training_aids.apply(event, state, logger)


# The training aids' settings come first in the signature, as they did when FFFReplace listed them by hand; their
# defaults and help are FFFTrainingConfig's (declared once).
FFFReplace.__signature__ = FFFReplace.__signature__.replace(parameters=[
    *(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
      for f in dataclasses.fields(FFFTrainingConfig)),
    *FFFReplace.__signature__.parameters.values()])
