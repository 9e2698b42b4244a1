"""FourierMixing against HF's FNet and against itself: implementations, causality, padding, dtypes, gradients."""

import pytest
import torch
from transformers import FNetConfig
from transformers.models.fnet.modeling_fnet import FNetBasicFourierTransform

from algos.fnet import FourierMixing

SHAPES = [(3, 7, 10), (2, 8, 16), (2, 5, 9), (1, 1, 4)]


@pytest.mark.parametrize("shape", SHAPES)
def test_fft_matches_hf_fnet(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    reference = FNetBasicFourierTransform(FNetConfig(use_tpu_fourier_optimizations=False))(x)[0]
    torch.testing.assert_close(FourierMixing("fft")(x), reference)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", ["rfft", "dft"])
@pytest.mark.parametrize("norm", ["backward", "ortho"])
def test_rfft_and_dft_match_fft(shape, impl, norm):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    expected = FourierMixing("fft", norm=norm)(x)
    torch.testing.assert_close(FourierMixing(impl, norm=norm)(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["fft", "rfft", "dft"])
def test_mask_mode_outputs_do_not_depend_on_padding(impl):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 8, generator=generator)
    mixing = FourierMixing(impl, padding="mask", max_length=16)
    short = mixing(x, torch.ones(2, 6, dtype=torch.bool))
    padded = torch.cat([x, torch.randn(2, 5, 8, generator=generator)], dim=1)  # garbage in the padding
    keep = torch.cat([torch.ones(2, 6), torch.zeros(2, 5)], dim=1).bool()
    torch.testing.assert_close(mixing(padded, keep)[:, :6], short, rtol=1e-4, atol=1e-4)
    # while the paper's behaviour does depend on it
    ignore = FourierMixing(impl)
    assert not torch.allclose(ignore(padded)[:, :6], ignore(x), atol=1e-3)


def test_causal_output_never_depends_on_later_positions():
    generator = torch.Generator().manual_seed(3)
    mixing = FourierMixing("dft", causal=True, max_length=32)
    x = torch.randn(2, 12, 8, generator=generator)
    y = mixing(x)
    perturbed = x.clone()
    perturbed[:, 7:] += torch.randn(2, 5, 8, generator=generator)
    torch.testing.assert_close(mixing(perturbed)[:, :7], y[:, :7])
    assert not torch.allclose(mixing(perturbed)[:, 7:], y[:, 7:])
    # gradient check: d y[t] / d x[s] is zero for every s > t, and not for s <= t
    x.requires_grad_(True)
    for t in (0, 5, 11):
        (grad,) = torch.autograd.grad(mixing(x)[:, t].sum(), x)
        assert torch.all(grad[:, t + 1:] == 0) and grad[:, : t + 1].abs().sum() > 0
    # a prefix's outputs do not change as the sequence grows (fixed basis length)
    torch.testing.assert_close(mixing(x[:, :4]), mixing(x)[:, :4], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["fft", "rfft", "dft"])
def test_half_precision_inputs_are_mixed_in_float32_and_cast_back(dtype, impl):
    x = torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(4))  # odd length: no power-of-two shortcut
    y = FourierMixing(impl, norm="ortho")(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), FourierMixing("fft", norm="ortho")(x.to(dtype).float()), rtol=1e-2,
                               atol=1e-2)


@pytest.mark.parametrize("impl", ["fft", "rfft", "dft"])
def test_gradients_flow(impl):
    x = torch.randn(2, 5, 6, requires_grad=True)
    FourierMixing(impl, norm="ortho")(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="causal=True runs on impl='dft'"):
        FourierMixing("fft", causal=True, max_length=8)
    with pytest.raises(ValueError, match="pass max_length"):
        FourierMixing("fft", padding="mask")
    with pytest.raises(ValueError, match="impl='fast' is not one of 'fft', 'rfft', 'dft'"):
        FourierMixing("fast")
    with pytest.raises(ValueError, match="sequence length 9 exceeds max_length 8"):
        FourierMixing("dft", causal=True, max_length=8)(torch.randn(1, 9, 4))
