"""A tiny HF BERT built from a config (no download) through the core."""

import pytest
import torch
from torch import nn

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
