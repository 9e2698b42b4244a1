"""The math: truncated SVD, activation-aware (whitened) SVD, and the rank policies.

Plain SVD (Eckart-Young): W = P diag(s) Q^T, and the best rank-r approximation in Frobenius norm is
    W_r = P_r diag(s_r) Q_r^T,    ||W - W_r||_F^2 = sum_{i>r} s_i^2.
We split the singular values evenly between the factors: U = P_r diag(sqrt(s_r)), V = diag(sqrt(s_r)) Q_r^T.

Activation-aware (SVD-LLM, Wang et al. 2024; ASVD, Yuan et al. 2023 scale by activations in the same spirit):
what matters is the error on real inputs x, E||(W - W') x||^2 = ||(W - W') L||_F^2 where C = E[x x^T] = L L^T
(Cholesky). So take the SVD of the whitened weight, W L = P diag(s) Q^T, truncate it, and undo the whitening:
    U = P_r diag(sqrt(s_r)),   V = diag(sqrt(s_r)) Q_r^T L^{-1},
which is the optimal rank-r W' for those inputs; the relative output error is sqrt(sum_{i>r} s_i^2 / sum_i s_i^2).
C gets damping * mean(diag C) added to its diagonal, so directions the calibration never excited stay close to W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from algos.surgery.budget import BudgetTooSmall, BudgetUnit, allocate_budget


@dataclass
class Decomposition:
    """SVD of W (or of the whitened W L): ``left`` P (d_out x k), ``singular_values`` s (k,), ``right`` Q^T (k x d_in),
    with the whitening already undone in ``right`` (Q^T L^{-1})."""

    left: torch.Tensor
    singular_values: torch.Tensor
    right: torch.Tensor
    whitened: bool = False

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) with U V the rank-``rank`` approximation; singular values split as sqrt between the two."""
        root = self.singular_values[:rank].sqrt()
        return self.left[:, :rank] * root, root[:, None] * self.right[:rank]

    def relative_error(self, rank: int) -> float:
        """||W - U V|| / ||W|| (on the calibration inputs when whitened), from the discarded singular values."""
        energy = self.singular_values.double().square()
        total = energy.sum().item()
        return math.sqrt(energy[rank:].sum().item() / total) if total > 0 else 0.0


def decompose(weight: torch.Tensor, covariance: torch.Tensor | None = None, damping: float = 0.01) -> Decomposition:
    """Decompose a d_out x d_in ``weight``; with the input second moment ``covariance`` (d_in x d_in), whitened."""
    if covariance is None:
        left, values, right = torch.linalg.svd(weight.float(), full_matrices=False)
        return Decomposition(left, values, right)
    weight64 = weight.double()
    covariance = covariance.double()
    covariance = covariance + damping * covariance.diagonal().mean() * torch.eye(len(covariance), dtype=torch.float64,
                                                                                device=covariance.device)
    cholesky = torch.linalg.cholesky(covariance)  # C = L L^T
    left, values, right = torch.linalg.svd(weight64 @ cholesky, full_matrices=False)
    unwhitened = torch.linalg.solve_triangular(cholesky, right, upper=False, left=False)  # Q^T L^{-1}
    return Decomposition(left.float(), values.float(), unwhitened.float(), whitened=True)


# ---------------------------------------------------------------------------------------------------------------------
# Rank policies. Every layer is described by its matrix shape (d_in, d_out), its spectrum, and how many output
# positions one sample produces (tokens for a Linear, H_out * W_out for a Conv2d), which is what MACs scale with.


def break_even_rank(d_in: int, d_out: int) -> float:
    """Above this rank, r (d_in + d_out) >= d_in d_out: the factorized layer costs at least the dense one."""
    return d_in * d_out / (d_in + d_out)


def round_rank(rank: int, multiple: int, limit: int) -> int:
    """Round up to a multiple of ``multiple`` (tensor-core friendly), never above ``limit`` = min(d_in, d_out)."""
    return min(math.ceil(rank / multiple) * multiple, limit)


def latent_rank(latent: int | float, size_in: int, size_out: int) -> int:
    """Composer's ``latent_features`` / ``latent_channels``: an int is the rank; a float in (0, 1) is a fraction of
    min(in, out) features (channels, for a convolution: not C_in k_h k_w), rounded down, at least 1."""
    if isinstance(latent, float):
        return max(1, int(latent * min(size_in, size_out)))  # r = max(1, floor(f min(in, out)))
    return latent


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r with sum_{i<=r} s_i^2 >= energy * sum_i s_i^2."""
    squares = singular_values.double().square()
    cumulative = squares.cumsum(0) / squares.sum()
    return min(int((cumulative < energy - 1e-12).sum().item()) + 1, len(singular_values))


@dataclass
class BudgetLayer:
    d_in: int
    d_out: int
    positions: int
    singular_values: torch.Tensor


def allocate_mac_budget(layers: list[BudgetLayer], budget: float, multiple: int) -> list[int | None]:
    """Ranks keeping at most ``budget`` of the layers' dense MACs, spent where they cut the truncation error most
    (``algos.surgery.budget``): ranks grow from ``multiple`` in steps of ``multiple``, a rank's error is the relative
    squared truncation error sum_{i>r} s_i^2 / sum_i s_i^2, its cost r (d_in + d_out) MACs per output position; a
    layer whose next step reaches break-even stays dense (None). ``BudgetTooSmall`` says what rank ``multiple``
    everywhere keeps."""
    units = []
    for layer in layers:
        squares = layer.singular_values.double().square()
        tail = (squares.flip(0).cumsum(0).flip(0) / squares.sum()).tolist() + [0.0]  # tail[r]: error^2 at rank r
        limit = min(layer.d_in, layer.d_out)
        sizes = sorted({min(rank, limit) for rank in range(multiple, limit + multiple, multiple)})
        per_rank = (layer.d_in + layer.d_out) * layer.positions
        units.append(BudgetUnit(sizes=sizes, cost=lambda r, per_rank=per_rank: r * per_rank,
                                dense_cost=layer.d_in * layer.d_out * layer.positions,
                                error=lambda r, tail=tail: tail[r]))
    try:
        return allocate_budget(units, budget)
    except BudgetTooSmall as error:
        raise BudgetTooSmall(error.smallest_share, f"mac_budget={budget} cannot be met: rank {multiple} in every "
                             f"targeted layer already keeps {error.smallest_share:.1%} of their MACs; raise "
                             f"mac_budget or lower rank_multiple.") from None
