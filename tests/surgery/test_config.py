"""Settings in one place: the config dataclass makes the functional call's and the Composer class's signatures,
their repr, and one-line errors; plan is a plain call."""

import dataclasses
import inspect

import pytest
from torch import nn

import algos
from algos import SwapLinear, apply_swap_linear
from algos.surgery import Selection, SurgeryError, plan_surgery
from algos.surgery.example import SwapLinearConfig, SwapLinearSurgery


def test_signatures_come_from_the_config_and_the_selection():
    settings = ["min_features", "target_modules", "exclude_modules", "filter_fn", "strict"]
    composer = inspect.signature(SwapLinear).parameters
    assert list(composer) == [*settings, "apply_at"]
    assert composer["min_features"].default == 0 and composer["strict"].default is False
    functional = inspect.signature(apply_swap_linear).parameters
    assert list(functional) == ["model", "optimizers", "example_inputs", *settings]
    assert "min_features (default 0): layers with min(in, out) below this" in apply_swap_linear.__doc__


def test_settings_are_checked_once_with_one_line_errors():
    with pytest.raises(SurgeryError, match=r"^SwapLinear: min_features=-1 must be an int >= 0\.$") as caught:
        SwapLinear(min_features=-1)
    assert caught.value.algorithm == "SwapLinear"
    with pytest.raises(TypeError, match=r"^SwapLinear: unexpected argument\(s\) 'min_feature'; valid: min_features$"):
        apply_swap_linear(nn.Linear(2, 2), min_feature=3)
    with pytest.raises(SurgeryError, match="apply_at='soon' is not a Composer time"):
        SwapLinear(apply_at="soon")
    config = SwapLinear(min_features=4).config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.min_features = 5


def test_repr_shows_changed_settings_and_evaluates_back():
    algorithm = SwapLinear(min_features=8, exclude_modules=["head"], apply_at="2ba")
    assert repr(algorithm) == "SwapLinear(min_features=8, exclude_modules=['head'], apply_at='2ba')"
    again = eval(repr(algorithm), vars(algos))
    assert again.config == algorithm.config and again.selection == algorithm.selection


def test_plan_is_a_plain_call_that_changes_nothing():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    surgery = SwapLinearSurgery(model, SwapLinearConfig(min_features=4), Selection())
    targets, skipped = plan_surgery(surgery)
    assert targets == ["0"] and [s.fqn for s in skipped] == ["1"]
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]
