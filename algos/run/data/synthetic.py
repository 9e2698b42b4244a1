"""``synthetic``: random batches shaped for any registered model (smoke runs, CI)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from algos.run.data.common import DATA, DictDataset, make_loaders
from algos.run.spec import InputSpec


@DATA.register("synthetic")
def synthetic(*, spec: InputSpec, batch_size: int = 8, num_samples: int = 64, seq_len: int = 128,
              seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Random batches shaped for the model (smoke runs, CI): images with labels, or token ids with masked-LM /
    class labels (none for a sentence encoder). Learns nothing; its metrics mean nothing."""
    generator = torch.Generator().manual_seed(seed)
    if spec.kind == "image":
        def make(n):
            return TensorDataset(torch.rand(n, *spec.shape, generator=generator),
                                 torch.randint(spec.num_classes, (n,), generator=generator))
        return make_loaders(make(num_samples), make(max(batch_size, num_samples // 4)), batch_size)
    length = min(seq_len, spec.max_length)

    def make_tokens(n):
        ids = torch.randint(5, spec.vocab_size, (n, length), generator=generator)
        if spec.task == "embedding":  # a sentence encoder: no labels
            return DictDataset(input_ids=ids, attention_mask=torch.ones_like(ids))
        if spec.task == "seq2seq":
            labels = ids[:, : max(1, length // 4)].clone()
        elif spec.task == "causal_lm":
            labels = torch.where(torch.arange(length) < length // 2, -100, ids)  # the first half is the prefix
        elif spec.task == "mlm":
            labels = torch.where(torch.rand(n, length, generator=generator) < 0.15, ids, -100)
            labels[:, 0] = ids[:, 0]  # at least one label per row
        else:
            labels = torch.randint(spec.num_classes, (n,), generator=generator)
        return DictDataset(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    return make_loaders(make_tokens(num_samples), make_tokens(max(batch_size, num_samples // 4)), batch_size)
