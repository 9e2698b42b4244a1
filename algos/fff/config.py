"""FFF-replace's settings: one frozen dataclass, checked once on construction."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from algos.fff.tree import DEFAULT_ACTIVATION, FFF, check_tree_arguments, fff_param_count
from algos.surgery.calibration import check_sequential, kept_rows_setting, sequential_setting
from algos.surgery.config import SurgeryConfig, setting
from algos.surgery.fit import check_fit_settings

if TYPE_CHECKING:
    from algos.surgery.blocks import Block

INITS = ("scratch", "dense")


def _tree_default(name: str):
    """The tree's own default for a setting that shapes it (declared once, on ``FFF``)."""
    return inspect.signature(FFF).parameters[name].default


@dataclass(frozen=True)
class FFFConfig(SurgeryConfig):
    algorithm = "FFFReplace"

    depth: int = setting(help="tree depth: a token visits depth + 1 neurons (neuron form) or depth decisions and one "
                              "leaf (leaf form)")
    form: str = setting(_tree_default("form"), "'neuron' (UltraFastBERT, hard routing in training too) or 'leaf' "
                                               "(FFF paper, soft mixture of leaf_width-wide leaf MLPs in training, "
                                               "hard in eval)")
    leaf_width: int = setting(_tree_default("leaf_width"), "leaf form: hidden width of each leaf MLP; with "
                                                           "mac_budget, the step (and smallest width) of the "
                                                           "per-block widths")
    mac_budget: float | None = setting(None, "leaf form with init='dense', instead of one leaf_width: keep this share "
                                             "of the converted blocks' dense MACs per token, giving each block the "
                                             "leaf width where its measured error on calibration falls most per MAC "
                                             "(a block may stay dense)")
    init: str = setting("scratch", "'scratch' (fresh weights) or 'dense' (from the trained block: median splits "
                                   "along principal directions, then the dense neurons that matter per leaf / "
                                   "least-squares node outputs), which needs calibration")
    node: str = setting(_tree_default("node"), "neuron form, what a visited node adds: 'mirrored' (act(|z|) "
                                               "through an output vector per branch: ours), 'ultrafastbert' (act(z), "
                                               "one vector: left turns add ~0), 'linear' (z, one vector); see "
                                               "algos.fff.tree")
    region_leak: float = setting(_tree_default("region_leak"), "leaf form: probability of flipping each soft "
                                                               "decision in training")
    activation: str | nn.Module | None = setting(None, "'gelu', 'relu', 'silu', 'tanh' or an nn.Module; None takes "
                                                       "the block's own (GELU for a lone Linear)")
    min_width: int = setting(128, "blocks with min(in, out) features below this stay dense: below about this width "
                                  "the tree is slower than the block it replaces at batch 1 on a CPU (measured: "
                                  "benchmarks/fff.py --parts width); 0 converts every block")
    max_params: int | float | None = setting(None, "refuse trees bigger than this: an int (parameters), or a float "
                                                   "(times the block's parameters); trees that together cannot fit "
                                                   "in the memory where they are built are always refused")
    calibration_batches: int = setting(8, "use at most this many calibration batches (in a Trainer: train batches "
                                          "drawn at FIT_START for init='dense')")
    calibration_tokens: int = kept_rows_setting("block (a row is a token)")
    fit_steps: int = setting(0, "after init, train each tree for this many Adam steps to reproduce its dense block's "
                                "outputs on the calibration tokens (90% of them; the rest measure the error), which "
                                "needs calibration; 0: no fitting")
    fit_lr: float = setting(1e-3, "Adam's learning rate for fit_steps")
    sequential: bool = sequential_setting("init='dense' or fit_steps > 0")

    def check(self) -> None:
        check_tree_arguments(depth=self.depth, form=self.form, leaf_width=self.leaf_width,
                             activation=self.activation or DEFAULT_ACTIVATION, region_leak=self.region_leak,
                             node=self.node, error=self.error)
        if self.init not in INITS:
            raise self.error(f"init={self.init!r} is not one of {', '.join(map(repr, INITS))}.")
        budget = self.mac_budget
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
                raise self.error(f"mac_budget={budget!r} must be in (0, 1] (the share of the converted blocks' MACs "
                                 f"to keep).")
            if self.form != "leaf" or self.init != "dense":
                raise self.error(f"mac_budget needs form='leaf' and init='dense' (it measures each block's error at "
                                 f"each leaf width), not form={self.form!r}, init={self.init!r}.")
        limit = self.max_params
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
            raise self.error(f"max_params={limit!r} must be None, an int (parameters per tree) or a float "
                             f"(multiple of the replaced block's parameters), > 0.")
        self.require_int("calibration_batches", "calibration_tokens", least=1)
        self.require_int("min_width", least=0)
        check_fit_settings(self.fit_steps, self.fit_lr, self.error)
        check_sequential(self.sequential, self.calibration_needed > 0, "init='dense' or fit_steps > 0", self.error)

    @property
    def calibration_needed(self) -> int:
        return self.calibration_batches if self.init == "dense" or self.fit_steps > 0 else 0

    def tree(self, in_features: int, out_features: int, activation: str | nn.Module,
             leaf_width: int | None = None) -> FFF:
        """The tree these settings give a block (``leaf_width``: mac_budget's width for it, else the setting)."""
        return FFF(in_features, out_features, self.depth, form=self.form, leaf_width=leaf_width or self.leaf_width,
                   activation=activation, node=self.node, region_leak=self.region_leak)

    def tree_params(self, block: Block, depth: int, leaf_width: int | None = None) -> int:
        """Parameters of the tree ``block`` would get at ``depth``, without building it."""
        return fff_param_count(block.dense.in_features, block.dense.out_features, depth, self.form,
                               leaf_width or self.leaf_width, self.node)
