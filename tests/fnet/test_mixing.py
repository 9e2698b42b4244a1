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


def mean_one_input():
    """(1, 128, 768), mean 1: Re(F_T x F_D) peaks at about T D = 98,304 in the DC bin, beyond float16's 65504."""
    return torch.rand(1, 128, 768, generator=torch.Generator().manual_seed(5)) * 2


@pytest.mark.parametrize("impl", ["fft", "rfft", "dft"])
def test_float16_overflow_is_an_error_naming_ortho(impl):
    x = mean_one_input()
    assert FourierMixing(impl)(x).abs().max() > torch.finfo(torch.float16).max  # float32: the true result
    with pytest.raises(OverflowError, match=r"norm='backward' output peaks at 9\d{4}, beyond float16's 65504; "
                                            r"use norm='ortho'"):
        FourierMixing(impl)(x.half())
    # norm="ortho" (1 / sqrt(T D)) keeps the scale: finite, and the float32 result to float16 precision
    y = FourierMixing(impl, norm="ortho")(x.half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), FourierMixing("fft", norm="ortho")(x.half().float()), rtol=1e-3, atol=2e-2)
    # small inputs pass with norm="backward", and a non-finite input is passed on (not this layer's overflow)
    assert torch.isfinite(FourierMixing(impl)(x[:, :8, :16].half())).all()
    x[0, 3, 5] = float("inf")
    assert not torch.isfinite(FourierMixing(impl, norm="ortho")(x.half())).all()


@pytest.mark.parametrize("impl", ["fft", "rfft", "dft"])
def test_mixing_stays_in_float32_under_float16_autocast(impl):
    """Autocast would run the dft GEMMs in float16, whose norm='backward' result overflows inside the mixing."""
    x = mean_one_input()
    with torch.autocast("cpu", dtype=torch.float16):
        y = FourierMixing(impl)(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, FourierMixing("fft")(x), rtol=1e-4, atol=0.5)


def test_causal_positions_count_real_tokens_from_each_rows_first():
    """Left padding and holes: row b's k-th real token is DFT position k; pads add nothing and get output 0."""
    generator = torch.Generator().manual_seed(7)
    mixing = FourierMixing("dft", causal=True, max_length=16)
    x = torch.randn(2, 7, 8, generator=generator)
    keep = torch.tensor([[0, 0, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 0, 0]]).bool()
    y = mixing(x, keep)
    for row in range(2):
        torch.testing.assert_close(y[row, keep[row]], mixing(x[row, keep[row]][None])[0])
        assert torch.all(y[row, ~keep[row]] == 0)
    # a batch that is real through max_length after its pads fits; one more real token does not
    assert mixing(torch.randn(1, 20, 8), torch.arange(20)[None] >= 4).shape == (1, 20, 8)
    with pytest.raises(ValueError, match="sequence length 17 exceeds max_length 16"):
        mixing(torch.randn(1, 20, 8), torch.arange(20)[None] >= 3)
    # with a cache, the mask must cover the cached positions too (their padding sets the new tokens' positions)
    past = mixing._project(x[:, :5])
    with pytest.raises(ValueError, match="the attention mask covers 2 positions but the mixing sees 7"):
        mixing(x[:, 5:], keep[:, 5:], history=lambda z: torch.cat([past, z], dim=1))
