"""apply_fnet_mixing / FNetMixing on HF BERT, torchvision ViT and nn.TransformerEncoderLayer models."""

import copy
import math

import pytest
import torch
import torchvision
from composer.loggers import InMemoryLogger
from torch import nn
from transformers import BertModel
from transformers.models.bert.modeling_bert import BertAttention

import algos
from algos import FNetMixing, apply_fnet_mixing
from algos.fnet import FourierBertAttention, FourierSelfAttention
from algos.surgery import SurgeryError
from tests.helpers import (
    assert_same,
    classifier_and_batch,
    final_state,
    fixed_batches,
    losses_of,
    make_trainer,
    tiny_bert_config,
    tiny_mlm_and_batch,
)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_mask_mode_makes_hf_bert_outputs_independent_of_padding(attn_implementation):
    torch.manual_seed(0)
    model = BertModel(tiny_bert_config(attn_implementation=attn_implementation)).eval()
    report = apply_fnet_mixing(model, padding="mask")
    assert len(report.replaced) == 4
    ids = torch.randint(1, 100, (2, 10))
    ones = torch.ones(2, 10, dtype=torch.long)
    short = model(input_ids=ids, attention_mask=ones).last_hidden_state
    padded_ids = torch.cat([ids, torch.randint(1, 100, (2, 7))], dim=1)
    mask = torch.cat([ones, torch.zeros(2, 7, dtype=torch.long)], dim=1)
    padded = model(input_ids=padded_ids, attention_mask=mask).last_hidden_state[:, :10]
    torch.testing.assert_close(padded, short, rtol=1e-4, atol=1e-4)


def test_bert_attention_sublayer_is_replaced_with_its_layernorm_and_qkvo_removed():
    torch.manual_seed(0)
    model = BertModel(tiny_bert_config())
    layer_norm = model.encoder.layer[0].attention.output.LayerNorm
    report = apply_fnet_mixing(model, example_inputs={"input_ids": torch.randint(0, 100, (1, 12))})
    new = model.encoder.layer[0].attention
    assert isinstance(new, FourierBertAttention) and new.LayerNorm is layer_norm
    row = report.replaced[0]
    assert row.params_before == 4 * (32 * 32 + 32) + 2 * 32 and row.params_after == 2 * 32  # Q, K, V, O gone
    assert row.notes == {"impl": "fft", "norm": "backward"}
    # FFT MACs counted with the 5 n log2 n convention (torch.fft.fft2 of real input runs one complex 2-D FFT)
    assert row.macs_after == int(5 * 12 * 32 * (math.log2(12) + math.log2(32))) // 2
    assert row.macs_before > 5 * row.macs_after  # at width 32 and 12 tokens; the gap grows with both
    x = torch.randn(2, 12, 32)
    expected = layer_norm(x + torch.fft.fft2(x).real)  # FNet's encoder sublayer, post-LN
    torch.testing.assert_close(new(x)[0], expected)
    assert len(new(x, output_attentions=True)) == 2  # (output, attention weights = None), as HF indexes it


@pytest.mark.parametrize("keep, expected_kept", [([-1], [3]), ([0, -2], [0, 2]), (0.5, [2, 3]), (0.0, [])])
def test_hybrid_keeps_exactly_the_requested_layers(keep, expected_kept):
    model = BertModel(tiny_bert_config())
    apply_fnet_mixing(model, keep_attention_layers=keep)
    kept = [i for i, layer in enumerate(model.encoder.layer) if not isinstance(layer.attention, FourierBertAttention)]
    assert kept == expected_kept


def test_vit_and_transformer_encoder_layers_get_the_right_norm():
    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                               mlp_dim=32, num_classes=3)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), num_layers=2,
                                    enable_nested_tensor=False)
    pre_ln = nn.TransformerEncoderLayer(16, 2, 32, batch_first=False, norm_first=True)
    assert {row.notes["norm"] for row in apply_fnet_mixing(vit).replaced} == {"ortho"}  # pre-LN
    assert {row.notes["norm"] for row in apply_fnet_mixing(encoder).replaced} == {"backward"}  # post-LN
    assert {row.notes["norm"] for row in apply_fnet_mixing(pre_ln).replaced} == {"ortho"}
    assert isinstance(vit.encoder.layers[0].self_attention, FourierSelfAttention)
    x = torch.randn(2, 5, 16)
    encoder.eval()  # eval + no grad is where PyTorch's fused fast path would kick in; ours must keep it off
    with torch.no_grad():
        out = encoder(x, src_key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    assert out.shape == x.shape
    seq_first = torch.randn(5, 2, 16)  # batch_first=False layer: (T, B, D) in and out
    torch.testing.assert_close(pre_ln.self_attn(seq_first, seq_first, seq_first)[0].transpose(0, 1),
                               torch.fft.fft2(seq_first.transpose(0, 1), norm="ortho").real)


def test_scope_keeps_decoder_and_cross_attention_unless_asked():
    decoder = BertModel(tiny_bert_config(is_decoder=True, add_cross_attention=True))
    with pytest.raises(ValueError, match=r"all 8 selected modules were skipped .*: cross-attention stays attention"):
        apply_fnet_mixing(decoder, strict=True)  # scope="encoder": a decoder has nothing to mix
    with pytest.raises(ValueError, match=r"scope='decoder' mixes decoder self-attention.*pass causal=True"):
        apply_fnet_mixing(decoder, scope="decoder")
    report = apply_fnet_mixing(decoder, impl="dft", causal=True, scope="decoder")
    assert [row.fqn for row in report.replaced] == [f"encoder.layer.{i}.attention" for i in range(4)]
    assert {skip.fqn: skip.reason for skip in report.skipped}["encoder.layer.0.crossattention"].startswith(
        "cross-attention stays attention")
    assert isinstance(decoder.encoder.layer[0].crossattention, BertAttention)


def test_refusals_name_the_module():
    relative = BertModel(tiny_bert_config(position_embedding_type="relative_key"))
    with pytest.raises(ValueError, match=r"'encoder.layer.0.attention' uses 'relative_key' relative position"):
        apply_fnet_mixing(relative)
    layer = nn.TransformerDecoderLayer(16, 2, 32, batch_first=True)
    with pytest.raises(ValueError, match=r"multihead_attn: cross-attention stays attention"):
        apply_fnet_mixing(layer, exclude_modules=["self_attn"], impl="dft", causal=True, scope="all", strict=True)
    with pytest.raises(ValueError, match=r"self_attn: decoder self-attention, outside scope='encoder'"):
        apply_fnet_mixing(layer, exclude_modules=["multihead_attn"], strict=True)
    with pytest.raises(ValueError, match=r"keep_attention_layers=\[5\] has indices \[5\] outside the 4 targeted"):
        apply_fnet_mixing(BertModel(tiny_bert_config()), keep_attention_layers=[5])
    mha = nn.Sequential(nn.MultiheadAttention(16, 2, batch_first=True))
    apply_fnet_mixing(mha)
    q = torch.randn(1, 3, 16)
    with pytest.raises(ValueError, match="cross-attention"):
        mha[0](q, torch.randn(1, 3, 16), torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="attn_mask / is_causal, which non-causal mixing cannot honour"):
        mha[0](q, q, q, attn_mask=torch.ones(3, 3, dtype=torch.bool))


def test_bad_arguments_are_one_line_errors():
    for kwargs, message in [({"impl": "fast"}, "impl='fast' is not one of"), ({"padding": "zero"}, "padding='zero'"),
                            ({"norm": "forward"}, "norm='forward' is not one of"),
                            ({"causal": True}, "causal=True runs on impl='dft'"),
                            ({"keep_attention_layers": 2}, "keep_attention_layers=2 must be a list")]:
        with pytest.raises(SurgeryError, match=message) as error:
            FNetMixing(**kwargs)
        assert error.value.algorithm == "FNetMixing"
        with pytest.raises(SurgeryError, match=message):
            apply_fnet_mixing(nn.MultiheadAttention(16, 2), **kwargs)


def test_tiny_bert_mlm_trains_in_composer_with_fnet_hybrid(tmp_path):
    model, batch = tiny_mlm_and_batch()
    logger = InMemoryLogger()
    algorithm = FNetMixing(keep_attention_layers=[-1], padding="mask")
    trainer = make_trainer(model, fixed_batches(batch), tmp_path, [algorithm], logger=logger, max_duration="8ba")
    trainer.fit()
    losses = losses_of(logger)
    assert sum(isinstance(layer.attention, FourierBertAttention) for layer in model.model.bert.encoder.layer) == 3
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("kind", ["vit", "encoder_layer"])
def test_vit_and_encoder_layer_models_train_in_composer(kind, tmp_path):
    model, batch = classifier_and_batch(kind)
    logger = InMemoryLogger()
    algorithm = FNetMixing()
    trainer = make_trainer(model, fixed_batches(batch), tmp_path, [algorithm], logger=logger, max_duration="8ba")
    trainer.fit()
    assert len(algorithm.reports[0].replaced) == 2
    losses = losses_of(logger)
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("pass_algorithm_again", [False, True])
def test_resume_is_bit_exact(tmp_path, pass_algorithm_again):
    def fresh():
        return classifier_and_batch("encoder_layer")

    model, batch = fresh()
    straight = make_trainer(model, fixed_batches(batch), tmp_path, [FNetMixing(keep_attention_layers=[0])])
    straight.fit()
    resumed_model, _ = fresh()
    again = [FNetMixing(keep_attention_layers=[0])] if pass_algorithm_again else []
    resumed = make_trainer(resumed_model, fixed_batches(batch), tmp_path / "resumed", again,
                           load_path=str(tmp_path / "checkpoints" / "ep1-ba2-rank0.pt"))
    layers = resumed_model.module[1].layers
    assert isinstance(layers[1].self_attn, FourierSelfAttention) and isinstance(layers[0].self_attn,
                                                                                nn.MultiheadAttention)
    resumed.fit()
    assert_same(final_state(resumed), final_state(straight))


def test_repr_round_trips():
    algorithm = FNetMixing(impl="dft", causal=True, keep_attention_layers=[-2, -1], max_length=128)
    assert repr(eval(repr(algorithm), vars(algos))) == repr(algorithm)
    assert copy.deepcopy(algorithm).config.keep_attention_layers == [-2, -1]


def test_roberta_attention_is_swapped_too():
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    model = RobertaModel(RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=40)).eval()
    report = apply_fnet_mixing(model, padding="mask")
    assert [row.old_type for row in report.replaced] == ["RobertaAttention"] * 2
    ids = torch.randint(3, 100, (1, 9))
    short = model(input_ids=ids).last_hidden_state
    padded = model(input_ids=torch.cat([ids, torch.ones(1, 4, dtype=torch.long)], 1),
                   attention_mask=torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], 1).long()).last_hidden_state
    torch.testing.assert_close(padded[:, :9], short, rtol=1e-4, atol=1e-4)
