"""Eval metrics for sentence encoders: how much of the original model's embedding space a rewritten model keeps.

Both take ``update(embeddings, original)``: the model's sentence embeddings and the original model's embeddings of
the same sentences (``(batch, dim)`` each; ``SentenceEncoder.eval_forward`` gives both). They are 1.0 for a model
that embeds exactly as the original does.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torchmetrics import Metric
from torchmetrics.functional import spearman_corrcoef
from torchmetrics.utilities import dim_zero_cat


class EmbeddingCosine(Metric):
    """Mean cosine similarity between each sentence's embedding and the original model's embedding of it."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, embeddings: torch.Tensor, original: torch.Tensor) -> None:
        self.total += F.cosine_similarity(embeddings.float(), original.float(), dim=-1).double().sum()
        self.count += embeddings.shape[0]

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float()


class SimilaritySpearman(Metric):
    """Spearman rank correlation between the pairwise cosine similarities of the model's embeddings and those of
    the original's, over all pairs of distinct sentences of the eval set (what retrieval and clustering use: the
    order of similarities, not the vectors). Keeps every embedding until ``compute``: n sentences make n(n-1)/2
    pairs, so keep eval sets to a few thousand sentences."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("original", default=[], dist_reduce_fx="cat")

    def update(self, embeddings: torch.Tensor, original: torch.Tensor) -> None:
        self.embeddings.append(embeddings.detach().float())
        self.original.append(original.detach().float())

    def compute(self) -> torch.Tensor:
        embeddings, original = dim_zero_cat(self.embeddings), dim_zero_cat(self.original)
        if embeddings.shape[0] < 3:
            return torch.tensor(float("nan"))
        rows, cols = torch.triu_indices(len(embeddings), len(embeddings), offset=1, device=embeddings.device)

        def pairwise(x: torch.Tensor) -> torch.Tensor:
            x = F.normalize(x, dim=-1)
            return (x @ x.T)[rows, cols]

        return spearman_corrcoef(pairwise(embeddings), pairwise(original))
