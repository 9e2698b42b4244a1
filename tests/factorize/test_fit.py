"""Factorize's fit_steps / fit_lr / fit_tokens: each factorized layer trained to reproduce the dense one on its
calibration inputs."""

import copy

import pytest
import torch
from torch import nn

from algos import apply_factorization
from algos.factorize.config import FactorizeConfig
from algos.surgery import SurgeryError
from tests.helpers import trained_digits_mlp


def fit_errors(report):
    return {row.fqn: (row.notes["fit_error_before"], row.notes["fit_error_after"]) for row in report.replaced}


@pytest.mark.parametrize("init", ["svd", "random"])
def test_fitting_lowers_each_layers_error_on_held_out_rows(init):
    model, x, y = trained_digits_mlp()
    report = apply_factorization(model, rank=8, min_features=1, init=init, fit_steps=200, fit_lr=1e-2,
                                 calibration=x)
    errors = fit_errors(report)
    assert set(errors) == {"0.0", "0.2"}
    for before, after in errors.values():
        assert after < 0.7 * before, errors
    assert (model(x).argmax(1) == y).float().mean() > 0.9  # the fitted layers are the ones in the model


def test_fitting_a_convolution_on_its_patches():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    model = nn.Sequential(conv)
    images = torch.randn(4, 8, 6, 6)
    report = apply_factorization(model, rank=8, min_channels=1, init="random", fit_steps=100, fit_lr=1e-2,
                                 calibration=images)
    (before, after), = fit_errors(report).values()
    assert after < 0.7 * before
    with torch.no_grad():  # the reported held-out error is the conv's error on some of those positions
        error = ((model(images) - conv(images)).norm() / conv(images).norm()).item()
    assert error < 0.9 * before


def test_zero_fit_steps_is_bit_exact_with_no_fitting():
    trained, x, _ = trained_digits_mlp(steps=20)
    results = []
    for settings in ({}, {"fit_steps": 0, "fit_lr": 0.5, "fit_tokens": 3}):
        model = copy.deepcopy(trained)
        report = apply_factorization(model, rank=8, min_features=1, init="activation", calibration=x, **settings)
        results.append(([row.notes for row in report.replaced], model.state_dict()))
    (notes, state), (notes_zero, state_zero) = results
    assert notes == notes_zero and "fit_error_after" not in notes[0]
    assert all(torch.equal(value, state_zero[key]) for key, value in state.items())


def test_fit_tokens_caps_the_rows_kept(monkeypatch):
    from algos.factorize import algorithm

    seen = []
    original = algorithm.fit_to_outputs
    monkeypatch.setattr(algorithm, "fit_to_outputs", lambda module, rows, *args, **kwargs: (
        seen.append(len(rows)), original(module, rows, *args, **kwargs))[1])
    model, x, _ = trained_digits_mlp(steps=1)
    apply_factorization(model, rank=8, min_features=1, fit_steps=1, fit_tokens=100, calibration=x.split(500))
    assert seen == [100, 100, 100]  # each layer, then the block on the first layer's rows


def test_fit_steps_needs_calibration_and_counts_it():
    assert FactorizeConfig().calibration_needed == 0
    assert FactorizeConfig(fit_steps=5, calibration_batches=3).calibration_needed == 3


@pytest.mark.parametrize("kwargs,message", [
    (dict(fit_steps=-1), "^Factorize: fit_steps=-1 must be an int >= 0"),
    (dict(fit_steps=5, fit_lr=0.0), "^Factorize: fit_lr=0.0 must be a finite number > 0"),
    (dict(fit_steps=5, fit_tokens=0), "^Factorize: fit_tokens=0 must be an int >= 1"),
    (dict(fit_steps=5), "^Factorize: fit_steps=5 needs calibration= batches"),
])
def test_bad_fit_settings_are_one_line_errors_and_the_model_is_untouched(kwargs, message):
    model, _, _ = trained_digits_mlp(steps=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SurgeryError, match=message) as error:
        apply_factorization(model, rank=8, min_features=1, **kwargs)
    assert "\n" not in str(error.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_mlp_block_is_fitted_as_a_block_where_per_layer_fitting_gains_nothing():
    model, x, _ = trained_digits_mlp()
    dense = copy.deepcopy(model[0])
    report = apply_factorization(model, rank=8, min_features=1, init="activation", fit_steps=200, fit_lr=1e-2,
                                 calibration=x)
    first, second = (row.notes for row in report.replaced)
    assert "block_fit_error_after" not in first
    assert abs(first["fit_error_after"] - first["fit_error_before"]) < 0.01  # whitened SVD: already optimal alone
    assert second["block"] == "0"
    assert second["block_fit_error_after"] < 0.85 * second["block_fit_error_before"], second
    held_out = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:round(0.1 * len(x))]
    with torch.no_grad():
        target = dense(x[held_out])
        error = ((model[0](x[held_out]) - target).norm() / target.norm()).item()
    assert error == pytest.approx(second["block_fit_error_after"], abs=1e-4)


def test_bert_feed_forward_pairs_are_fitted_as_blocks():
    from transformers import BertModel

    from tests.helpers import tiny_bert_config

    torch.manual_seed(0)
    model = BertModel(tiny_bert_config(num_hidden_layers=2)).eval()
    ids = torch.randint(5, 100, (16, 16))
    report = apply_factorization(model, rank=8, min_features=1, fit_steps=100, fit_lr=1e-2,
                                 target_modules=[".intermediate.dense", ".output.dense"], calibration=ids)
    blocks = {row.notes["block"]: row.notes for row in report.replaced if "block" in row.notes}
    assert set(blocks) == {f"encoder.layer.{i}.intermediate" for i in range(2)}
    for notes in blocks.values():
        assert notes["block_fit_error_after"] < 0.85 * notes["block_fit_error_before"], notes


@pytest.mark.parametrize("pass_algorithm_again", [False, True])
def test_resume_with_fitting_is_bit_exact(composer_model_factory, train_dataloader, tmp_path, pass_algorithm_again):
    from algos import Factorize
    from tests.helpers import check_resume_is_bit_exact

    check_resume_is_bit_exact(composer_model_factory, train_dataloader, tmp_path,
                              lambda: Factorize(rank=4, min_features=1, fit_steps=50), pass_algorithm_again)
