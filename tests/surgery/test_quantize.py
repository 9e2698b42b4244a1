"""Dynamic int8 composes with every surgery (issue 24): ``algos.quantize_dynamic`` quantizes every nn.Linear and the
FFF leaf trees (int8 leaf GEMMs, float routing), in place and as a copy, per tensor and per channel, healed or not;
the result stays close to the float surgered model; a quantized model given to a surgery is a one-line error."""

import copy

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

import algos
from algos import FFF
from algos.fff import QuantizedFFF
from algos.surgery import SurgeryError
from algos.surgery.quantize import Int8Linear, has_vnni
from tests.helpers import COPY_SURGERIES, tiny_bert_mlm, tiny_mlm_batch


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min())


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("surgery", COPY_SURGERIES)
def test_quantize_dynamic_after_every_surgery_in_place_and_as_a_copy(surgery, per_channel):
    model = tiny_bert_mlm()
    COPY_SURGERIES[surgery](model)
    inputs = tiny_mlm_batch()
    expected = model(**inputs).logits
    leaf_trees_before = sum(isinstance(m, FFF) and m.form == "leaf" for m in model.modules())
    copied = algos.quantize_dynamic(model, per_channel=per_channel, inplace=False)
    assert not any(isinstance(m, DynamicLinear) for m in model.modules())  # the copy left the model float
    in_place = algos.quantize_dynamic(model, per_channel=per_channel)
    assert in_place is model
    for quantized in (copied, in_place):
        assert not any(type(m) is nn.Linear for m in quantized.modules())  # every Linear is int8
        leaf_trees = [m for m in quantized.modules() if isinstance(m, FFF) and m.form == "leaf"]
        assert leaf_trees == []  # every leaf tree became a QuantizedFFF; neuron trees stay float
        scheme = torch.per_channel_affine if per_channel else torch.per_tensor_affine
        assert all(m.weight().qscheme() == scheme for m in quantized.modules() if isinstance(m, DynamicLinear))
        assert cosine(quantized(**inputs).logits, expected) > 0.99
    assert sum(isinstance(m, QuantizedFFF) for m in copied.modules()) == leaf_trees_before
    assert leaf_trees_before > 0 if surgery == "fff_leaf" else True


def test_a_healed_leaf_tree_model_quantizes_and_keeps_what_healing_bought():
    torch.manual_seed(0)
    teacher = tiny_bert_mlm()
    student = copy.deepcopy(teacher)
    COPY_SURGERIES["fff_leaf"](student)
    batches = [tiny_mlm_batch(seed) for seed in range(4)]
    before = cosine(student(**tiny_mlm_batch(9)).logits, teacher(**tiny_mlm_batch(9)).logits)
    algos.distill(student, teacher, batches, steps=30, lr=3e-3)
    student.eval()
    healed = student(**tiny_mlm_batch(9)).logits
    assert cosine(healed, teacher(**tiny_mlm_batch(9)).logits) > before
    quantized = algos.quantize_dynamic(student, inplace=False)
    assert cosine(quantized(**tiny_mlm_batch(9)).logits, healed) > 0.99


@pytest.mark.parametrize("per_channel", [False, True])
def test_quantized_tree_routes_like_the_float_tree_and_matches_its_int8_reference(per_channel):
    """Each token goes to the leaf the float tree sends it to, and its output is its leaf's two int8 GEMMs: equal to
    torch's dynamic int8 Linear pair built from that leaf's weights (the reference), close to the float tree."""
    torch.manual_seed(0)
    tree = FFF(24, 16, 2, form="leaf", leaf_width=8).eval()
    x = torch.randn(3, 40, 24)
    quantized = algos.quantize_dynamic(nn.Sequential(tree), per_channel=per_channel, inplace=False)[0]
    assert isinstance(quantized, QuantizedFFF)
    rows = x.reshape(-1, 24)
    leaf = tree.hard_leaves(rows)
    assert torch.equal(quantized.hard_leaves(rows), leaf)
    assert leaf.unique().numel() > 1
    y = quantized(x)
    assert y.shape == (3, 40, 16)
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig if per_channel else \
        torch.ao.quantization.default_dynamic_qconfig
    for number in leaf.unique().tolist():
        pair = []
        for weight, bias in ((tree.leaf_in[number].T, tree.leaf_in_bias[number]),
                             (tree.leaf_out[number].T, tree.leaf_out_bias[number])):
            linear = nn.Linear(weight.shape[1], weight.shape[0])
            linear.weight.data, linear.bias.data = weight.detach().clone(), bias.detach().clone()
            linear.qconfig = qconfig
            pair.append(DynamicLinear.from_float(linear))
        tokens = rows[leaf == number]
        expected = pair[1](tree.activation(pair[0](tokens)))
        torch.testing.assert_close(y.reshape(-1, 16)[leaf == number], expected)
    assert cosine(y.reshape(1, -1), tree(x).reshape(1, -1)) > 0.999
    assert quantized(x[:, :0]).shape == (3, 0, 16) and quantized(x[0, :1]).shape == (1, 16)


def test_a_neuron_tree_stays_float():
    tree = FFF(16, 16, 2, form="neuron")
    model = algos.quantize_dynamic(nn.Sequential(nn.Linear(16, 16), tree))
    assert model[1] is tree and isinstance(model[0], DynamicLinear)


@pytest.mark.parametrize("surgery", ["factorize", "fff_leaf", "fnet"])
def test_surgery_on_a_quantized_model_is_a_one_line_error_and_changes_nothing(surgery):
    model = algos.quantize_dynamic(tiny_bert_mlm())
    before = copy.deepcopy(model.state_dict())
    modules = dict(model.named_modules())
    with pytest.raises(SurgeryError, match=r"quantized module\(s\) \(e\.g\. bert\.encoder\.layer\.0\.attention\.self\."
                                           r"query: DynamicQuantizedLinear\); .*apply it to the float model") as error:
        COPY_SURGERIES[surgery](model)
    assert "\n" not in str(error.value)
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[name] for name, m in model.named_modules())
    assert model.state_dict().keys() == before.keys()


needs_vnni = pytest.mark.skipif(not has_vnni(), reason="8-bit inputs need a CPU with VNNI")


@needs_vnni
@pytest.mark.parametrize("per_channel", [False, True])
def test_8_bit_inputs_match_the_int8_reference_even_where_int16_pair_sums_would_overflow(per_channel):
    """y = s_x s_w (q_x - z_x) q_w^T + b with q_x the input's full 8-bit rounding (torch's qparams with
    reduce_range=False), on inputs and weights at the extremes of their ranges, where fbgemm's non-VNNI int16 pair
    sums (2 x 255 x 127) would overflow; and closer to the float Linear than torch's 7-bit inputs."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight.copy_(torch.sign(torch.randn(32, 64)) * 0.5)  # every weight at +-127 after rounding
    x = torch.rand(200, 64) * 4 - 0.01  # almost all positive: q_x near 255
    x[:, :32] = 3.99
    model = algos.quantize_dynamic(nn.Sequential(linear), per_channel=per_channel, activation_bits=8, inplace=False)
    assert isinstance(model[0], Int8Linear)
    scale, zero_point = torch._choose_qparams_per_tensor(x, False)
    q_x = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    q_w = model[0].weight()
    w = q_w.dequantize()
    expected = ((q_x - zero_point) * scale) @ w.T + linear.bias.detach()
    torch.testing.assert_close(model[0](x), expected, rtol=1e-5, atol=1e-4)
    plain, x = nn.Sequential(nn.Linear(64, 32)), torch.randn(200, 64)
    eight, seven = (algos.quantize_dynamic(plain, per_channel=per_channel, activation_bits=bits, inplace=False)
                    for bits in (8, 7))
    reference = plain(x).detach()
    assert (eight(x) - reference).abs().mean() < 0.75 * (seven(x) - reference).abs().mean()


def test_8_bit_inputs_are_refused_in_one_line_on_a_cpu_without_vnni(monkeypatch):
    import algos.surgery.quantize as quantize

    monkeypatch.setattr(quantize, "has_vnni", lambda: False)
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"activation_bits=8 needs a CPU with VNNI .*use activation_bits=7\.$"):
        algos.quantize_dynamic(model, activation_bits=8)
    with pytest.raises(ValueError, match=r"activation_bits=6 is not one of \(7, 8\)"):
        algos.quantize_dynamic(model, activation_bits=6)
    assert type(model[0]) is nn.Linear


@needs_vnni
def test_8_bit_inputs_after_every_surgery():
    for surgery in COPY_SURGERIES:
        model = tiny_bert_mlm()
        COPY_SURGERIES[surgery](model)
        expected = model(**tiny_mlm_batch()).logits
        quantized = algos.quantize_dynamic(model, per_channel=True, activation_bits=8, inplace=False)
        linears = [m for m in quantized.modules() if isinstance(m, DynamicLinear)]
        assert linears and all(type(m) is Int8Linear for m in linears)
        assert cosine(quantized(**tiny_mlm_batch()).logits, expected) > 0.995
