"""Factorized layers against the dense layers they replace, and the two decompositions against their optima."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from algos.factorize.handlers import HANDLERS
from algos.factorize.lowrank import decompose


def weight_matrix(dense: nn.Module) -> torch.Tensor:
    return HANDLERS.find(dense).weight_matrix(dense)


def full_rank(dense: nn.Module) -> nn.Module:
    matrix = weight_matrix(dense).detach()
    rank = min(matrix.shape)
    return HANDLERS.find(dense).build(dense, rank, decompose(matrix).factors(rank))


@pytest.mark.parametrize(
    "dense, shape",
    [
        (nn.Linear(24, 40), (5, 7, 24)),
        (nn.Linear(40, 24, bias=False), (6, 40)),
        (Conv1D(40, 24), (3, 5, 24)),  # HF GPT-2 Conv1D(nf=out, nx=in)
        (nn.Conv1d(6, 10, 3, stride=2, padding=2, dilation=2), (4, 6, 29)),
        (nn.Conv1d(6, 10, 5, padding="same", padding_mode="circular"), (4, 6, 17)),
        (nn.Conv2d(5, 12, 3, stride=2, padding=1), (2, 5, 11, 13)),
        (nn.Conv2d(5, 12, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1), bias=False), (2, 5, 9, 10)),
        (nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (2, 4, 7, 7)),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, nn.Module) else None,
)
def test_full_rank_factorization_reproduces_the_dense_layer(dense, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    factorized = full_rank(dense)
    torch.testing.assert_close(factorized(x), dense(x), rtol=1e-4, atol=1e-4)
    # the im2col rows used for calibration are what the weight matrix multiplies
    rows = HANDLERS.find(dense).input_rows(dense, x)
    if isinstance(dense, (nn.Linear, Conv1D)):
        expected = (dense(x) - (dense.bias if dense.bias is not None else 0)).reshape(-1, weight_matrix(dense).shape[0])
    else:
        out = dense(x) - (dense.bias.reshape(1, -1, *[1] * (x.dim() - 2)) if dense.bias is not None else 0)
        expected = out.flatten(2).transpose(1, 2).reshape(-1, out.shape[1])
    torch.testing.assert_close(rows @ weight_matrix(dense).T, expected, rtol=1e-4, atol=1e-4)


def test_bias_is_copied_exactly_and_weights_are_not_shared():
    dense = nn.Linear(16, 8)
    factorized = HANDLERS.find(dense).build(dense, 4, decompose(dense.weight.detach()).factors(4))
    assert torch.equal(factorized.second.bias, dense.bias)
    assert factorized.second.bias.data_ptr() != dense.bias.data_ptr()


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_svd_error_is_the_eckart_young_optimum(rank):
    torch.manual_seed(1)
    weight = torch.randn(12, 20)
    decomposition = decompose(weight)
    left, right = decomposition.factors(rank)
    singular_values = torch.linalg.svdvals(weight)
    optimum = singular_values[rank:].square().sum().sqrt()
    torch.testing.assert_close(torch.linalg.matrix_norm(weight - left @ right), optimum, rtol=1e-4, atol=1e-5)
    assert decomposition.relative_error(rank) == pytest.approx((optimum / weight.norm()).item(), rel=1e-4)
    # singular values are split evenly: both factors carry sqrt(s)
    torch.testing.assert_close(left.norm(dim=0), right.norm(dim=1))


def correlated_inputs(n, mixing, generator):
    """Inputs living mostly in the few directions of ``mixing`` (as real activations do)."""
    return torch.randn(n, len(mixing), generator=generator) @ mixing + 0.05 * torch.randn(n, mixing.shape[1],
                                                                                            generator=generator)


def test_activation_aware_beats_plain_svd_on_correlated_inputs():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(32, 48, generator=generator)
    mixing = 3 * torch.randn(4, 48, generator=generator)
    calibration, held_out = correlated_inputs(2048, mixing, generator), correlated_inputs(512, mixing, generator)
    rank = 4
    plain = decompose(weight)
    whitened = decompose(weight, calibration.T @ calibration / len(calibration), damping=1e-4)

    def output_mse(decomposition):
        left, right = decomposition.factors(rank)
        return (held_out @ (weight - left @ right).T).square().mean().item()

    assert output_mse(whitened) < 0.05 * output_mse(plain)
    # without damping, the reported error is exactly the relative output error on the calibration inputs
    undamped = decompose(weight, calibration.T @ calibration / len(calibration), damping=0)
    left, right = undamped.factors(rank)
    measured = (calibration @ (weight - left @ right).T).norm() / (calibration @ weight.T).norm()
    assert undamped.relative_error(rank) == pytest.approx(measured.item(), rel=1e-3)


def test_whitened_decomposition_at_full_rank_is_exact():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(10, 16, generator=generator)
    x = correlated_inputs(256, torch.randn(4, 16, generator=generator), generator)
    decomposition = decompose(weight, x.T @ x / len(x))
    left, right = decomposition.factors(10)
    torch.testing.assert_close(left @ right, weight, rtol=1e-4, atol=1e-4)
