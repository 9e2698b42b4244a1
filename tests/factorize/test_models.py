"""Real architectures through apply_factorization: tiny HF BERT and GPT-2 (from configs) and a torchvision ResNet."""

import copy

import torch
import torchvision
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from algos import FactorizedConv2d, FactorizedLinear, apply_factorization


def train_steps(model, loss_fn, steps=12, lr=3e-3):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_tiny_bert_factorized_keeps_its_outputs_best_with_activation_init_and_trains():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=64, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    dense = BertForSequenceClassification(config).eval()
    batches = [{"input_ids": torch.randint(0, 100, (4, 24)), "attention_mask": torch.ones(4, 24, dtype=torch.long)}
               for _ in range(3)]
    with torch.no_grad():
        reference = dense(**batches[0]).logits
    change, models = {}, {}
    for init in ("random", "svd", "activation"):
        model = models[init] = copy.deepcopy(dense)
        report = apply_factorization(model, rank=0.25, init=init, calibration=batches, min_features=32,
                                     exclude_modules=["classifier", "pooler.dense"], example_inputs=batches[0])
        with torch.no_grad():
            change[init] = ((model(**batches[0]).logits - reference).norm() / reference.norm()).item()
    assert change["activation"] < change["svd"] < change["random"], change
    replaced = {row.fqn.rsplit(".", 1)[-1] for row in report.replaced}
    assert replaced == {"query", "key", "value", "dense"}  # attention output and both FFN layers are all "dense"
    assert len(report.replaced) == 2 * 6 and {row.notes["rank"] for row in report.replaced} == {16}
    assert isinstance(model.bert.encoder.layer[0].intermediate.dense, FactorizedLinear)
    totals = report.totals()
    assert totals["macs_after"] < 0.75 * totals["macs_before"]
    labels = torch.tensor([0, 1, 2, 1])
    losses = train_steps(model, lambda m: m(**batches[0], labels=labels).loss)
    assert losses[-1] < 0.5 * losses[0]


def test_gpt2_conv1d_is_factorized_as_a_linear_and_the_tied_head_is_left_alone():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    report = apply_factorization(model, rank=16, min_features=32)
    kinds = {row.old_type for row in report.replaced}
    assert kinds == {"Conv1D"} and len(report.replaced) == 2 * 4  # c_attn, c_proj, mlp.c_fc, mlp.c_proj
    assert not any(isinstance(m, Conv1D) for m in model.transformer.h.modules())
    assert {skip.fqn: skip.reason for skip in report.skipped}["lm_head"] == \
        "its weight is shared with another module (tied weights)"
    tokens = torch.randint(0, 100, (2, 16))
    losses = train_steps(model, lambda m: m(input_ids=tokens, labels=tokens).loss)
    assert losses[-1] < 0.5 * losses[0]


def test_torchvision_resnet_factorizes_its_wide_convs_and_trains():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    report = apply_factorization(model, rank=0.25, min_channels=128, exclude_modules=["fc"],
                                 calibration=[images], mac_budget=None, example_inputs=images)
    factorized = [fqn for fqn, m in model.named_modules() if isinstance(m, FactorizedConv2d)]
    assert factorized and all(fqn.startswith(("layer2", "layer3", "layer4")) for fqn in factorized)
    assert model.layer3[0].conv1.first.stride == (2, 2)
    assert report.totals()["macs_after"] < report.totals()["macs_before"]
    losses = train_steps(model, lambda m: nn.functional.cross_entropy(m(images), labels))
    assert losses[-1] < 0.5 * losses[0]
