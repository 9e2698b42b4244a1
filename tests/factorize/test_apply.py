"""apply_factorization: rank policies, skips, calibration, optimizer bookkeeping and bad input."""

import copy
import warnings

import pytest
import torch
from torch import nn

from algos import NoEffectWarning, apply_factorization
from algos.factorize import FactorizedConv2d, FactorizedLinear
from algos.surgery import SurgeryError
from tests.helpers import layers_that_stay_dense


def linear_with_spectrum(singular_values, seed=0) -> nn.Linear:
    """A square Linear whose weight has exactly these singular values."""
    generator = torch.Generator().manual_seed(seed)
    n = len(singular_values)
    left, _ = torch.linalg.qr(torch.randn(n, n, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(n, n, generator=generator))
    linear = nn.Linear(n, n)
    with torch.no_grad():
        linear.weight.copy_(left @ torch.diag(torch.tensor(singular_values)) @ right.T)
    return linear


def ranks(report):
    return {row.fqn: row.notes["rank"] for row in report.replaced}


def reasons(report):
    return {skip.fqn: skip.reason for skip in report.skipped}


STEEP = [10.0] * 8 + [0.01] * 56  # nearly all energy in the first 8 directions
FLAT = [1.0] * 64


def test_energy_on_constructed_spectra():
    model = nn.Sequential(linear_with_spectrum(STEEP), linear_with_spectrum([10.0] * 8 + [1.0] * 56, seed=1))
    report = apply_factorization(model, energy=0.95, min_features=1)
    # STEEP: 8 directions hold > 99.9%; second: 0.95 * 856 = 813.2 needs 8 + 14 = 22 directions, rounded up to 24
    assert ranks(report) == {"0": 8, "1": 24}
    # without rounding: exactly the smallest rank holding the share (0.9 * 856 = 770.4 -> 8 directions of 10)
    model = nn.Sequential(linear_with_spectrum([10.0] * 8 + [1.0] * 56), linear_with_spectrum(STEEP, seed=1))
    report = apply_factorization(model, energy=0.95, min_features=1, rank_multiple=1)
    assert ranks(report) == {"0": 22, "1": 8}
    model = nn.Sequential(linear_with_spectrum([10.0] * 8 + [1.0] * 56))
    assert ranks(apply_factorization(model, energy=0.9, min_features=1, rank_multiple=1)) == {"0": 8}
    model = nn.Sequential(linear_with_spectrum([10.0] * 8 + [1.0] * 56))
    with pytest.warns(NoEffectWarning):
        report = apply_factorization(model, energy=0.99, min_features=1, rank_multiple=1)
    assert "break-even" in reasons(report)["0"]


def test_mac_budget_spends_rank_where_the_error_is():
    model = nn.Sequential(linear_with_spectrum(STEEP), linear_with_spectrum(FLAT, seed=1))
    report = apply_factorization(model, mac_budget=0.5, min_features=1, example_inputs=torch.randn(2, 64))
    # dense: 2 x 4096 MACs, budget 4096; each rank costs 128. Both start at 8 (2048); the flat layer gains
    # 8/64 of its energy per step, the steep one almost nothing, so the flat one takes the other 2048: rank 24.
    assert ranks(report) == {"0": 8, "1": 24}
    totals = report.totals()
    assert totals["macs_after"] <= 0.5 * totals["macs_before"]


def test_mac_budget_counts_conv_macs_per_output_position():
    # Same weights, but the first conv produces 16x more output positions: the budget must favour it less.
    model = nn.Sequential(nn.Conv2d(64, 64, 1), nn.Conv2d(64, 64, 1, stride=4))
    torch.manual_seed(0)
    calibration = [torch.randn(2, 64, 16, 16)]
    report = apply_factorization(model, mac_budget=0.5, min_channels=1, calibration=calibration,
                                 example_inputs=calibration[0])
    totals = report.totals()
    assert totals["macs_after"] <= 0.5 * totals["macs_before"] + 1
    assert ranks(report).get("1", 64) >= ranks(report)["0"]
    with pytest.raises(ValueError, match="mac_budget on convolutions .*'0'.* needs calibration"):
        apply_factorization(nn.Sequential(nn.Conv2d(64, 64, 1)), mac_budget=0.5, min_channels=1)


def test_mac_budget_that_cannot_be_met_is_refused():
    model = nn.Sequential(linear_with_spectrum(FLAT))
    before = copy.deepcopy(model)
    with pytest.raises(SurgeryError, match=r"^Factorize: mac_budget=0.1 cannot be met: rank 8 .* keeps 25.0%"):
        apply_factorization(model, mac_budget=0.1, min_features=1)
    assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, before[0].weight)


def test_a_fraction_rounds_up_to_the_multiple_an_int_rank_is_exact_and_above_break_even_stays_dense():
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 100), nn.Linear(100, 100))
    report = apply_factorization(model, rank=0.1, min_features=1)
    # 0.1 * 256 = 25.6 -> 26 -> 32; 0.1 * 100 = 10 -> 16; 0.1 * 100 = 10 -> 16
    assert ranks(report) == {"0": 32, "1": 16, "2": 16}
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with pytest.warns(NoEffectWarning):
        report = apply_factorization(model, rank=33, min_features=1, rank_multiple=1, target_modules=["0"])
    assert "break-even rank 32.0" in reasons(report)["0"]
    report = apply_factorization(model, rank=31, min_features=1, rank_multiple=1)
    assert ranks(report) == {"0": 31, "1": 31}
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 20))
    report = apply_factorization(model, rank=4, min_features=1)  # the rank asked for, not rounded to 8
    assert ranks(report) == {"0": 4, "1": 4}


def test_small_grouped_and_tied_layers_stay_dense_with_reasons():
    model = layers_that_stay_dense()
    report = apply_factorization(model, min_features=64, min_channels=64)
    assert [row.fqn for row in report.replaced] == ["big"]
    why = reasons(report)
    assert why["small"] == "min(in, out) = 16 below min_features 64"
    assert why["grouped"] == "grouped convolution (groups=3) is not factorized"
    assert why["thin"] == "min(in, out) channels = 16 below min_channels 64"
    assert why["head"] == "its weight is shared with another module (tied weights)"


def test_activation_init_beats_svd_on_the_models_own_inputs():
    generator = torch.Generator().manual_seed(0)
    mixing = 3 * torch.randn(6, 64, generator=generator)

    def batch(n=256):
        return torch.randn(n, 6, generator=generator) @ mixing + 0.05 * torch.randn(n, 64, generator=generator)

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64))
    held_out = batch()
    errors = {}
    for init in ("svd", "activation"):
        model = copy.deepcopy(dense)
        report = apply_factorization(model, rank=8, init=init, calibration=[batch() for _ in range(4)],
                                     min_features=1, target_modules=["0"])
        assert isinstance(model[0], FactorizedLinear) and model[0].rank == 8
        errors[init] = (model(held_out) - dense(held_out)).square().mean().item()
        assert report.replaced[0].notes["rel_error"] < 1
    assert errors["activation"] < 0.2 * errors["svd"]


def test_random_init_keeps_only_the_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    bias = model[0].bias.clone()
    report = apply_factorization(model, rank=8, init="random", min_features=1)
    assert torch.equal(model[0].second.bias, bias)
    assert report.replaced[0].notes["rel_error"] > 0.9  # the trained function is gone, as with Composer's


def test_conv_activation_init_and_report_columns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, stride=2))
    x = torch.randn(4, 32, 12, 12)
    report = apply_factorization(model, rank=0.25, init="activation", calibration=[x], min_channels=1,
                                 example_inputs=x[:1])
    assert [type(m) for m in model if not isinstance(m, nn.ReLU)] == [FactorizedConv2d, FactorizedConv2d]
    assert model[2].first.stride == (2, 2) and model[2].second.kernel_size == (1, 1)
    # 0.25 * min(d_in, d_out): d_in = 32 * 9 = 288 for the first conv, 64 * 9 for the second; d_out = 64
    assert [row.notes["rank"] for row in report.replaced] == [16, 16]
    row = report.replaced[1]
    assert row.macs_before == 64 * 64 * 9 * 25 and row.macs_after == 16 * (64 * 9 + 64) * 25


def test_optimizer_swaps_old_parameters_for_new_ones_with_fresh_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    kept, kept_state = model[2].weight, {k: v.clone() for k, v in optimizer.state[model[2].weight].items()}
    apply_factorization(model, rank=8, min_features=1, target_modules=["0"], optimizers=optimizer)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters()}
    assert all(torch.equal(optimizer.state[kept][k], v) for k, v in kept_state.items())  # untouched
    new = model[0].first.weight
    assert all(not value.any() for value in optimizer.state[new].values())  # moments and step all zero
    # ... which is exactly a fresh Adam: the next step moves the new weight as a new optimizer would
    optimizer.zero_grad()
    model(torch.randn(2, 64)).sum().backward()
    twin = nn.Parameter(new.detach().clone())
    twin.grad = new.grad.clone()
    torch.optim.Adam([twin], lr=1e-3).step()
    optimizer.step()
    assert torch.equal(new, twin)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank=0 must be >= 1"),
        ({"rank": -3}, "rank=-3 must be >= 1"),
        ({"rank": 1.5}, r"rank=1.5 as a fraction of min\(in, out\) must be in \(0, 1\]"),
        ({"rank": "big"}, "rank='big' must be an int"),
        ({"energy": 0.0}, r"energy=0.0 must be in \(0, 1\]"),
        ({"energy": 1.2}, r"energy=1.2 must be in \(0, 1\]"),
        ({"mac_budget": 0}, r"mac_budget=0 must be in \(0, 1\]"),
        ({"mac_budget": 0.5, "energy": 0.9}, "pass energy= or mac_budget=, not both"),
        ({"init": "pca"}, "init='pca' is not one of 'svd', 'activation', 'random'"),
        ({"init": "activation"}, "init='activation' needs calibration="),
        ({"rank_multiple": 0}, "rank_multiple=0 must be an int >= 1"),
        ({"calibration_batches": 0}, "calibration_batches=0 must be an int >= 1"),
        ({"min_features": -1}, "min_features=-1 must be an int >= 0"),
        ({"damping": -0.1}, "damping=-0.1 must be a number >= 0"),
        ({"rank": 64, "latent_features": 128}, "rank=64 and Composer's latent_features=128 both set the ranks"),
        ({"energy": 0.9, "latent_channels": 0.25}, "energy=0.9 and Composer's latent_channels=0.25 both set"),
        ({"latent_features": 0}, r"latent_features=0 must be an int >= 1 \(the rank\) or a float in \(0, 1\)"),
        ({"latent_channels": 1.0}, r"latent_channels=1.0 must be an int >= 1"),
        ({"latent_features": True}, r"latent_features=True must be an int >= 1"),
        ({"factorize_convs": False, "factorize_linears": False}, "leave no layer to factorize"),
        ({"factorize_linears": "yes"}, "factorize_linears='yes' must be True or False"),
    ],
)
def test_bad_arguments_are_one_line_errors_and_leave_the_model_alone(kwargs, message):
    model = nn.Sequential(nn.Linear(64, 64))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SurgeryError, match=message) as error:
        apply_factorization(model, **{"min_features": 1, **kwargs})
    assert "\n" not in str(error.value) and error.value.algorithm == "Factorize"
    assert type(model[0]) is nn.Linear and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_calibration_of_the_wrong_width_names_the_module():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"calibration input of width 32 reached '0' \(Linear expecting 64\)"):
        apply_factorization(model, init="activation", calibration=[torch.randn(4, 32)], min_features=1)
    assert type(model[0]) is nn.Linear
    with pytest.raises(ValueError, match="calibration: batch 0 could not be run through the model"):
        apply_factorization(model, init="activation", calibration=[torch.randn(4, 32)], min_features=1,
                            target_modules=["2"])


def test_nothing_to_factorize_warns_or_raises_when_strict():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    too_small = r"all 1 candidates skipped, e\.g\. 0: min\(in, out\) = 8 below min_features 256"
    with pytest.warns(NoEffectWarning, match=too_small):
        apply_factorization(model)
    with pytest.raises(ValueError, match=too_small):
        apply_factorization(model, strict=True)
    # a rule that needs the spectrum (energy) skips at conversion instead
    with pytest.warns(NoEffectWarning, match="all 1 selected modules were skipped .*break-even"):
        apply_factorization(nn.Sequential(linear_with_spectrum(FLAT)), energy=0.99, min_features=1)
    with pytest.warns(NoEffectWarning, match="no Linear/Conv1d/Conv2d/Conv1D module selected"):
        apply_factorization(nn.Sequential(nn.ReLU()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_factorization(nn.Sequential(nn.Linear(64, 64)), min_features=1)


def assert_unchanged(model, before):
    """Same module types and bit-identical tensors (NaN included) as the ``before`` copy."""
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]
    for (name, value), expected in zip(model.state_dict().items(), before.state_dict().values(), strict=True):
        assert torch.equal(value.nan_to_num(), expected.nan_to_num()), name


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_a_one_line_error_naming_the_module(bad):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with torch.no_grad():
        model[2].weight[3, 5] = bad
    before = copy.deepcopy(model)
    for init in ("svd", "activation"):
        with pytest.raises(ValueError, match=r"^Factorize: the weight of '2' is not finite \(NaN or inf\)") as error:
            apply_factorization(model, rank=8, min_features=1, init=init, calibration=[torch.randn(4, 64)])
        assert "\n" not in str(error.value)
        assert_unchanged(model, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_calibration_inputs_are_a_one_line_error_naming_the_module(bad):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    before = copy.deepcopy(model)
    batch = torch.randn(8, 64)
    batch[2, 7] = bad
    with pytest.raises(ValueError, match=r"^Factorize: the calibration inputs of '0' are not finite \(NaN or inf\)") \
            as error:
        apply_factorization(model, rank=8, min_features=1, init="activation", calibration=[torch.randn(8, 64), batch])
    assert "\n" not in str(error.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("settings, expected", [({}, 8), ({"calibration_batches": 3}, 3)])  # 8, as in the Trainer
def test_calibration_uses_at_most_calibration_batches(settings, expected):
    model, seen = nn.Sequential(nn.Linear(64, 64)), []
    model[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    apply_factorization(model, rank=8, min_features=1, init="activation",
                        calibration=[torch.randn(4, 64) for _ in range(20)], **settings)
    assert len(seen) == expected and isinstance(model[0], FactorizedLinear)


def test_all_zero_calibration_inputs_fall_back_to_the_plain_svd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    plain = copy.deepcopy(model)
    report = apply_factorization(model, rank=8, min_features=1, init="activation", calibration=[torch.zeros(4, 64)])
    assert report.replaced[0].notes["init"] == "svd (its calibration inputs were all zero)"
    apply_factorization(plain, rank=8, min_features=1)
    assert torch.equal(model[0].first.weight, plain[0].first.weight)
