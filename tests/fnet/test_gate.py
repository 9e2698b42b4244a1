"""FNet's ``gate``: a per-channel gate g (from 0) and shift b on the mixing output, y = g * mix(x) + b, b starting
at the replaced attention's mean output over the calibration's real tokens. Checked against the mean computed by
hand on the original model, for BERT (output.dense), BART (out_proj, every position: an encoder-decoder) and
GPT-2 (c_proj); the gated layer at
initialisation; the gate trains; save / load round trip; no calibration and nn.MultiheadAttention give b = 0."""

import copy

import pytest
import torch
from transformers import BertModel

from algos import FNetMixing, apply_fnet_mixing, from_pretrained, save_pretrained
from algos.fnet import FourierMixing
from algos.surgery import SurgeryError
from tests.helpers import (
    classifier_and_batch,
    fixed_batches,
    make_trainer,
    tiny_bart,
    tiny_bert_config,
    tiny_gpt2,
    tiny_mlm_and_batch,
)


def padded_batches(vocab: int, count: int = 3, length: int = 12) -> list[dict]:
    """Batches whose rows end in 0 to 8 padding positions (token 0, mask 0)."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        ids = torch.randint(4, vocab, (4, length), generator=generator)
        mask = torch.ones_like(ids)
        for row, pads in enumerate(torch.randint(0, 9, (4,), generator=generator).tolist()):
            if pads:
                ids[row, -pads:], mask[row, -pads:] = 0, 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@torch.no_grad()
def mean_real_output(model, module, batches) -> torch.Tensor:
    """The mean of ``module``'s output over the real tokens of ``batches`` (the reference for the shift)."""
    rows = []
    handle = module.register_forward_hook(lambda m, args, out: rows.append(out))
    model.eval()
    for batch in batches:
        model(**batch)
    handle.remove()
    return torch.cat([out[batch["attention_mask"].bool()] for out, batch in zip(rows, batches, strict=True)]).mean(0)


def gated_mixings(model) -> dict[str, FourierMixing]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FourierMixing) and m.gate is not None}


@pytest.mark.parametrize("make, attention, projection", [
    (lambda: BertModel(tiny_bert_config()), "encoder.layer.{}.attention", "output.dense"),
    (tiny_bart, "model.encoder.layers.{}.self_attn", "out_proj"),
    (tiny_gpt2, "transformer.h.{}.attn", "c_proj")], ids=["bert", "bart", "gpt2"])
def test_shift_starts_at_the_attention_mean_output_over_real_tokens(make, attention, projection):
    torch.manual_seed(0)
    model = make()
    original = copy.deepcopy(model)
    batches = padded_batches(model.config.vocab_size)
    settings = dict(causal=True, impl="dft", scope="all") if attention.startswith("transformer") else {}  # GPT-2
    apply_fnet_mixing(model, gate=True, calibration=batches, **settings)
    mixings = gated_mixings(model)
    assert mixings  # every replaced layer is gated
    for index in (0, 1):
        output = original.get_submodule(f"{attention.format(index)}.{projection}")
        real, everywhere = mean_real_output(original, output, batches), mean_over_all_positions(original, output,
                                                                                                batches)
        assert not torch.allclose(real, everywhere, atol=1e-4)  # the padding moves the mean
        mixing = next(m for name, m in mixings.items() if name.startswith(attention.format(index)))
        # an encoder-decoder model's calibration counts every position (algos.surgery.calibration: its decoder
        # positions are not the attention mask's), the others the real tokens only
        assert torch.allclose(mixing.shift, everywhere if attention.startswith("model.encoder")
                              else real, atol=1e-5)
        assert torch.equal(mixing.gate, torch.zeros_like(mixing.gate))


@torch.no_grad()
def mean_over_all_positions(model, module, batches) -> torch.Tensor:
    rows = []
    handle = module.register_forward_hook(lambda m, args, out: rows.append(out.reshape(-1, out.shape[-1])))
    for batch in batches:
        model(**batch)
    handle.remove()
    return torch.cat(rows).mean(0)


def test_gated_bert_layer_starts_as_layernorm_of_input_plus_mean_and_the_gate_trains():
    model = BertModel(tiny_bert_config())
    batches = padded_batches(100)
    apply_fnet_mixing(model, gate=True, calibration=batches, padding="mask")
    layer = model.encoder.layer[0].attention
    x = torch.randn(2, 12, 32)
    mask = torch.ones(2, 12, dtype=torch.long)
    out = layer(x, attention_mask=mask)[0]
    assert torch.allclose(out, layer.LayerNorm(x + layer.mixing.shift), atol=1e-6)  # g = 0: no mixing yet
    model.train()
    model(**batches[0]).last_hidden_state.pow(2).mean().backward()
    assert layer.mixing.gate.grad is not None and layer.mixing.gate.grad.abs().sum() > 0


def test_gated_model_saves_and_loads_back(tmp_path):
    torch.manual_seed(0)
    base = BertModel(tiny_bert_config()).eval()
    model = copy.deepcopy(base)
    batches = padded_batches(100)
    apply_fnet_mixing(model, gate=True, calibration=batches, keep_attention_layers=[-1])
    with torch.no_grad():
        for mixing in gated_mixings(model).values():
            mixing.gate.normal_()  # as after healing
    save_pretrained(model, tmp_path / "saved")
    loaded = from_pretrained(copy.deepcopy(base), tmp_path / "saved").eval()
    assert len(gated_mixings(loaded)) == 3
    with torch.no_grad():
        assert torch.equal(loaded(**batches[0]).last_hidden_state, model.eval()(**batches[0]).last_hidden_state)


def test_without_calibration_or_projection_the_shift_is_zero():
    model = BertModel(tiny_bert_config())
    apply_fnet_mixing(model, gate=True)
    assert all(not m.shift.any() for m in gated_mixings(model).values())
    classifier, (inputs, _) = classifier_and_batch("encoder_layer")  # nn.MultiheadAttention: out_proj is not called
    apply_fnet_mixing(classifier, gate=True, calibration=[(inputs, None)])
    mixings = gated_mixings(classifier)
    assert len(mixings) == 2 and all(not m.shift.any() and len(m.gate) == 32 for m in mixings.values())
    assert classifier((inputs, None)).shape == (16, 4)


def test_gate_must_be_a_bool():
    with pytest.raises(SurgeryError, match=r"gate='yes' must be True or False"):
        apply_fnet_mixing(BertModel(tiny_bert_config()), gate="yes")


def test_gated_fnet_in_a_trainer_calibrates_on_train_batches_and_trains_the_gate(tmp_path):
    model, batch = tiny_mlm_and_batch()
    reference = copy.deepcopy(model.model)
    apply_fnet_mixing(reference, keep_attention_layers=[-1], padding="mask", gate=True,
                      calibration=[{k: v for k, v in batch.items() if k != "labels"}])
    algorithm = FNetMixing(keep_attention_layers=[-1], padding="mask", gate=True)
    surgery, shifts = algorithm.surgery, {}

    def spy(net, optimizers=None, calibration=None):  # the shifts right after surgery, before any training step
        report = surgery(net, optimizers=optimizers, calibration=calibration)
        shifts.update({name: m.shift.detach().clone() for name, m in gated_mixings(net).items()})
        return report

    algorithm.surgery = spy
    make_trainer(model, fixed_batches(batch), tmp_path, [algorithm], max_duration="2ba").fit()
    expected = {name.removeprefix("model."): m.shift for name, m in gated_mixings(reference).items()}
    assert len(shifts) == 3 and {name.removeprefix("model."): s for name, s in shifts.items()}.keys() == expected.keys()
    assert all(torch.allclose(shifts[name], expected[name.removeprefix("model.")], atol=1e-5) for name in shifts)
    assert all(m.gate.abs().sum() > 0 for m in gated_mixings(model).values())  # the optimizer trained the gates
