"""``sequential``: each target converted from the inputs it gets with the targets before it already converted.

The reference is the loop a user would write by hand: one surgery call per target, in model order."""

import copy

import pytest
import torch
from torch import nn

from algos import apply_factorization, apply_fff
from algos.fff.algorithm import FFFSurgery
from algos.surgery import SurgeryError
from tests.helpers import two_blocks_one_easy

FFF_SETTINGS = dict(form="leaf", depth=1, leaf_width=16, init="dense", min_width=0)
FACTORIZE_SETTINGS = dict(rank=8, init="activation", min_features=0)


def mlp_blocks(count=2, width=32, hidden=128):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
                           for _ in range(count)])


def stack_of_linears(width=32, layers=3):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def one_call_per_target(model, apply, names, x, **settings):
    """The hand-written reference: convert the targets one at a time, in order, each call calibrating afresh."""
    model = copy.deepcopy(model)
    for name in names:
        apply(model, target_modules=name, calibration=x, **settings)  # a regex: the module itself, not ".0"s
    return model


@pytest.mark.parametrize(("make", "apply", "settings", "names"), [
    (mlp_blocks, apply_fff, FFF_SETTINGS, ["0", "1"]),
    (mlp_blocks, apply_fff, {**FFF_SETTINGS, "fit_steps": 20}, ["0", "1"]),
    (stack_of_linears, apply_factorization, FACTORIZE_SETTINGS, ["0", "1", "2"]),
    (stack_of_linears, apply_factorization, {**FACTORIZE_SETTINGS, "init": "svd", "fit_steps": 20}, ["0", "1", "2"]),
], ids=["fff-dense", "fff-fit", "factorize-activation", "factorize-fit"])
def test_sequential_equals_one_call_per_target_in_order_and_differs_from_the_joint_fit(make, apply, settings, names):
    x = torch.randn(256, 32)  # fewer tokens than kept per target: no random subset, so the two ways match exactly
    model = make()
    reference = one_call_per_target(model, apply, names, x, **settings)
    joint = copy.deepcopy(model)
    apply(joint, calibration=x, **settings)
    report = apply(model, calibration=x, sequential=True, **settings)
    assert [row.fqn for row in report.replaced] == names
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
        # the first target sees the original inputs either way; the later ones do not
        assert (model(x) - joint(x)).abs().max() > 1e-4


def test_sequential_lowers_the_output_error_where_errors_compound():
    model = mlp_blocks(4)
    x, held_out = torch.randn(1024, 32), torch.randn(512, 32)
    with torch.no_grad():
        target = model(held_out)
    errors = {}
    for sequential in (False, True):
        converted = copy.deepcopy(model)
        apply_fff(converted, form="leaf", depth=2, leaf_width=16, init="dense", min_width=0, calibration=x,
                  sequential=sequential)
        with torch.no_grad():
            errors[sequential] = ((converted.eval()(held_out) - target).norm() / target.norm()).item()
    assert errors[True] < errors[False], errors


def test_a_failure_after_sequential_passes_leaves_the_model_as_it_was(monkeypatch):
    model, x = two_blocks_one_easy(), torch.randn(128, 32)
    before = {name: module for name, module in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    convert = FFFSurgery.convert

    def fails_on_the_second(self, module, fqn):
        if fqn == "1":
            raise RuntimeError("converter failed")
        return convert(self, module, fqn)

    monkeypatch.setattr(FFFSurgery, "convert", fails_on_the_second)
    with pytest.raises(RuntimeError, match="converter failed"):
        apply_fff(model, calibration=x, sequential=True, **FFF_SETTINGS)
    assert dict(model.named_modules()) == before  # the first tree, swapped in for the second pass, is gone again
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name])


@pytest.mark.parametrize(("apply", "settings", "message"), [
    (apply_fff, dict(depth=1, init="scratch"), r"sequential=True needs init='dense' or fit_steps > 0"),
    (apply_fff, dict(depth=1, init="dense", sequential="yes"), r"sequential='yes' must be True or False"),
    (apply_factorization, dict(init="svd"), r"sequential=True needs init='activation' or fit_steps > 0"),
])
def test_sequential_without_inputs_to_read_is_a_one_line_error(apply, settings, message):
    model = two_blocks_one_easy()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SurgeryError, match=message):
        apply(model, calibration=torch.randn(8, 32), **{"sequential": True, **settings})
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
