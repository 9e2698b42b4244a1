"""A tiny HF BERT built from a config (no download) through the core."""

import pytest
import torch
from torch import nn

import algos
from algos import apply_swap_linear
from algos.surgery import select_targets
from algos.surgery.example import SwappedLinear

transformers = pytest.importorskip("transformers")


@pytest.fixture
def bert():
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def test_select_by_class_and_by_name(bert):
    by_class, _ = select_targets(bert, (nn.Linear,), algorithm="T")
    # per layer: query, key, value, attention output dense, intermediate dense, output dense; plus the pooler
    assert len(by_class) == 2 * 6 + 1
    by_name, _ = select_targets(bert, (nn.Linear,), algorithm="T", target_modules=["query", "value"])
    assert [fqn for fqn, _ in by_name] == [f"encoder.layer.{i}.attention.self.{p}" for i in (0, 1)
                                           for p in ("query", "value")]
    by_regex, _ = select_targets(bert, (nn.Linear,), algorithm="T", target_modules=r"encoder\.layer\.\d+\..*dense")
    assert len(by_regex) == 2 * 3
    by_attention_class, _ = select_targets(bert, (transformers.models.bert.modeling_bert.BertSelfAttention,),
                                           algorithm="T")
    assert [fqn for fqn, _ in by_attention_class] == ["encoder.layer.0.attention.self",
                                                      "encoder.layer.1.attention.self"]


def test_swap_keeps_outputs_and_reports_macs_per_sample(bert):
    batch = {"input_ids": torch.randint(0, 100, (3, 10)), "attention_mask": torch.ones(3, 10, dtype=torch.long)}
    expected = bert(**batch).last_hidden_state
    report = apply_swap_linear(bert, target_modules=["query", "value"], example_inputs=batch)
    assert torch.equal(bert(**batch).last_hidden_state, expected)
    assert isinstance(bert.encoder.layer[1].attention.self.value, SwappedLinear)
    assert [row.macs_before for row in report.replaced] == [10 * 32 * 32] * 4  # 10 tokens per sample
    assert not bert.training


SURGERIES = {
    "factorize": lambda m: algos.apply_factorization(m, rank=0.5, min_features=1),
    "fnet": lambda m: algos.apply_fnet_mixing(m),
    "fnet_hybrid_dft": lambda m: algos.apply_fnet_mixing(m, impl="dft", keep_attention_layers=[-1]),
    "fff_neuron": lambda m: algos.apply_fff(m, depth=2, min_width=0),
    "fff_leaf": lambda m: algos.apply_fff(m, depth=2, form="leaf", leaf_width=8, min_width=0),
}


@pytest.mark.parametrize("surgery", SURGERIES)
def test_an_empty_batch_gives_an_empty_output_after_every_surgery(bert, surgery):
    """As the dense model does: (0, T, D) in eval and in training, and a backward pass through it (MKL's FFT
    refused zero-sized transforms, the leaf form's hard path concatenated nothing)."""
    SURGERIES[surgery](bert)
    empty = {"input_ids": torch.zeros(0, 10, dtype=torch.long), "attention_mask": torch.ones(0, 10, dtype=torch.long)}
    assert bert.eval()(**empty).last_hidden_state.shape == (0, 10, 32)
    hidden = bert.train()(**empty).last_hidden_state
    assert hidden.shape == (0, 10, 32)
    hidden.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in bert.parameters())
