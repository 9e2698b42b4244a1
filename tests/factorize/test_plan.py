"""Factorize's rules that need no data (size, grouped, tied, a fixed rank past break-even) run at selection, so the
dry run (``plan``, used by ``algos run`` / ``inspect`` before training) lists them and ``strict`` fails up front."""

import copy
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from algos import Factorize, NoEffectWarning, apply_factorization
from algos.run.build import build
from algos.run.config import load_config
from algos.run.models import MODELS
from algos.run.registry import ConfigError
from tests.helpers import layers_that_stay_dense

ROOT = Path(__file__).resolve().parents[2]


class NeverIterated:
    """A calibration source that fails the test if the surgery ever draws a batch from it."""

    def __iter__(self):
        raise AssertionError("calibration was iterated")


def narrow_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def test_plan_lists_layers_below_min_features_as_skipped():
    with pytest.warns(NoEffectWarning, match="all 2 candidates skipped"):
        targets, skipped = Factorize(init="activation").plan(narrow_mlp())
    assert targets == []
    assert {skip.fqn: skip.reason for skip in skipped} == {
        "0": "min(in, out) = 64 below min_features 256", "2": "min(in, out) = 10 below min_features 256"}


def test_plan_applies_every_data_free_rule():
    model = layers_that_stay_dense(wide=nn.Linear(300, 600))
    # rank 152 >= break-even 300 * 300 / 600 = 150 for "big"; 300 * 600 / 900 = 200 for "wide"
    targets, skipped = Factorize(rank=152, min_features=64, min_channels=64).plan(model)
    assert targets == ["wide"]
    assert {skip.fqn: skip.reason for skip in skipped} == {
        "small": "min(in, out) = 16 below min_features 64",
        "grouped": "grouped convolution (groups=3) is not factorized",
        "thin": "min(in, out) channels = 16 below min_channels 64",
        "head": "its weight is shared with another module (tied weights)",
        "big": "rank 152 would not cut MACs (break-even rank 150.0 for 300 -> 300)"}
    # a fraction too: 0.55 * 300 = 165 -> 168 (a multiple of 8) >= 150; Composer's latent_features the same way
    assert Factorize(rank=0.55, min_features=64).plan(model)[0] == ["wide"]
    assert Factorize(latent_features=0.5, min_features=64).plan(model)[0] == ["wide"]  # 150 >= 150; 150 < 200
    # energy and mac_budget ranks need the spectrum: break-even is judged at surgery, not in the plan
    assert Factorize(energy=0.99, min_features=64, min_channels=64).plan(model)[0] == ["big", "wide"]


def test_strict_fails_in_one_line_before_calibrating_and_leaves_the_model_alone():
    model = narrow_mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"^Factorize: no Linear/Conv1d/Conv2d/Conv1D module selected .*all 2 "
                                         r"candidates skipped, e\.g\. 0: min\(in, out\) = 64 below min_features 256"
                       ) as error:
        apply_factorization(model, init="activation", calibration=NeverIterated(), strict=True)
    assert "\n" not in str(error.value)
    assert type(model[0]) is nn.Linear and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_runner_refuses_factorize_on_digits_vit_before_training(tmp_path):
    config = load_config([str(ROOT / "yamls/digits_vit.yaml"), str(ROOT / "recipes/factorize.yaml")],
                         [f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"^algorithms\.factorize: Factorize: no Linear/Conv1d/Conv2d/Conv1D "
                                          r"module selected") as error:
        build(config, for_training=False)
    assert "\n" not in str(error.value)
    # Why: every Linear and Conv2d of that ViT is left dense by a rule the plan applies.
    model_kwargs = OmegaConf.to_container(config.model)
    model = MODELS.build(model_kwargs.pop("name"), model_kwargs, "model")
    recipe = OmegaConf.to_container(config.algorithms.factorize)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoEffectWarning)
        targets, skipped = Factorize(**recipe).plan(model)
    dense = {fqn for fqn, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert targets == [] and {skip.fqn for skip in skipped} == dense
    reasons = {skip.fqn: skip.reason for skip in skipped}
    assert reasons["module.encoder.layers.encoder_layer_0.mlp.0"] == "min(in, out) = 64 below min_features 128"
    assert "MultiheadAttention" in reasons["module.encoder.layers.encoder_layer_0.self_attention.out_proj"]
    assert reasons["module.conv_proj"] == "min(in, out) channels = 3 below min_channels 64"
