"""What every data builder shares: the registry, Composer-ready loaders, the seeded train / val split, dict rows and
their padding collate."""

from __future__ import annotations

import torch
from composer.utils import dist
from torch.utils.data import DataLoader, Dataset

from algos.run.registry import ConfigError, Registry
from algos.run.spec import PAD_ID

DATA = Registry("data")


def make_loaders(train: Dataset, val: Dataset, batch_size: int, eval_batch_size: int | None = None,
                 num_workers: int = 0, collate_fn=None, eval_collate_fn="same",
                 tokenizer=None) -> tuple[DataLoader, DataLoader]:
    """Composer-ready loaders: a distributed sampler each (so DDP splits the data), shuffled for training.
    ``eval_collate_fn``: the val loader's, by default ``collate_fn``. ``tokenizer``: the HF tokenizer that made
    the rows, kept as both loaders' ``tokenizer`` (the runner hands it to the model, so checkpoints keep it)."""
    common = dict(num_workers=num_workers, persistent_workers=num_workers > 0)
    eval_collate_fn = collate_fn if eval_collate_fn == "same" else eval_collate_fn
    loaders = (DataLoader(train, batch_size=batch_size, sampler=dist.get_sampler(train, shuffle=True),
                          drop_last=True, collate_fn=collate_fn, **common),
               DataLoader(val, batch_size=eval_batch_size or batch_size, sampler=dist.get_sampler(val, shuffle=False),
                          collate_fn=eval_collate_fn, **common))
    for loader in loaders:
        loader.tokenizer = tokenizer
    return loaders


class DictDataset(Dataset):
    """Rows of equally long tensors as dicts (what HF models take)."""

    def __init__(self, **columns: torch.Tensor):
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index: int) -> dict:
        return {key: column[index] for key, column in self.columns.items()}


def split_rows(rows: list, val_fraction: float, batch_size: int, what: str) -> tuple[list, list]:
    """(train, val): a seeded shuffle, at least one val row, and enough train rows for one batch."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    n_val = max(1, int(len(rows) * val_fraction))
    if len(rows) - n_val < batch_size:
        raise ConfigError(f"data: only {len(rows)} {what} in the text; lower data.seq_len or data.batch_size "
                          f"({batch_size}), or give more text")
    return [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]]


def pad_collate(rows: list[dict]) -> dict:
    """Right-pad ``input_ids`` (PAD, with an attention mask) and ``labels`` (-100, if rows have them) to the batch's
    longest row."""
    batch = {}
    for key, fill in (("input_ids", PAD_ID), ("labels", -100)):
        if key not in rows[0]:
            continue
        longest = max(len(row[key]) for row in rows)
        batch[key] = torch.tensor([row[key] + [fill] * (longest - len(row[key])) for row in rows])
    batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1]) <
                               torch.tensor([len(row["input_ids"]) for row in rows])[:, None]).long()
    return batch
