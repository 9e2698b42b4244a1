"""FFF-replace's fit_steps / fit_lr: each tree trained to reproduce its dense block on the calibration tokens."""

import copy

import pytest
import torch

from algos import FFF, apply_fff
from algos.fff.config import FFFConfig
from algos.surgery import SurgeryError
from tests.helpers import trained_digits_mlp


@pytest.mark.parametrize("form,init", [("neuron", "dense"), ("leaf", "dense"), ("neuron", "scratch")])
def test_fitting_lowers_the_block_error_on_held_out_tokens(form, init):
    model, x, _ = trained_digits_mlp()
    report = apply_fff(model, min_width=0, depth=3, form=form, leaf_width=16, init=init, fit_steps=200, fit_lr=1e-2,
                       calibration=x)
    notes = report.replaced[0].notes
    assert notes["fit_error_after"] < 0.85 * notes["fit_error_before"], notes
    # the tree in the model is the fitted one: its error on the held-out tokens is the one reported
    tree, dense = model[0], trained_digits_mlp()[0][0]
    assert isinstance(tree, FFF)
    held_out = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:round(0.1 * len(x))]
    tree.eval()
    with torch.no_grad():
        target = dense(x[held_out])
        error = ((tree(x[held_out]) - target).norm() / target.norm()).item()
    assert error == pytest.approx(notes["fit_error_after"], abs=1e-4)


def test_zero_fit_steps_is_bit_exact_with_no_fitting():
    trained, x, _ = trained_digits_mlp(steps=20)
    results = []
    for settings in ({}, {"fit_steps": 0, "fit_lr": 0.5}):
        model = copy.deepcopy(trained)
        report = apply_fff(model, min_width=0, depth=2, form="leaf", leaf_width=8, init="dense", calibration=x,
                           **settings)
        results.append((report.replaced[0].notes, model.state_dict()))
    (notes, state), (notes_zero, state_zero) = results
    assert notes == notes_zero and "fit_error_after" not in notes
    assert all(torch.equal(value, state_zero[key]) for key, value in state.items())


def test_fitting_is_deterministic():
    trained, x, _ = trained_digits_mlp(steps=20)
    states = []
    for _ in range(2):
        model = copy.deepcopy(trained)
        apply_fff(model, min_width=0, depth=2, form="leaf", leaf_width=8, region_leak=0.1, init="dense", fit_steps=20,
                  calibration=x)
        states.append(model.state_dict())
    assert all(torch.equal(value, states[1][key]) for key, value in states[0].items())


def test_fit_steps_needs_calibration_and_counts_it():
    assert FFFConfig(depth=2).calibration_needed == 0
    assert FFFConfig(depth=2, fit_steps=5, calibration_batches=3).calibration_needed == 3


@pytest.mark.parametrize("kwargs,message", [
    (dict(fit_steps=-1), "^FFFReplace: fit_steps=-1 must be an int >= 0"),
    (dict(fit_steps=2.0), "^FFFReplace: fit_steps=2.0 must be an int >= 0"),
    (dict(fit_steps=5, fit_lr=-1.0), "^FFFReplace: fit_lr=-1.0 must be a finite number > 0"),
    (dict(fit_steps=5), "^FFFReplace: fit_steps=5 needs calibration= batches"),
])
def test_bad_fit_settings_are_one_line_errors_and_the_model_is_untouched(kwargs, message):
    model, _, _ = trained_digits_mlp(steps=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SurgeryError, match=message) as error:
        apply_fff(model, min_width=0, depth=2, **kwargs)
    assert "\n" not in str(error.value)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
