"""Start an FFF from a trained dense MLP y = W2 act(W1 x + b1) + b2, using the inputs it sees on calibration data.

This is the MoEfication idea (Zhang et al. 2022: split a trained FFN's neurons into experts by the tokens that use
them) carried to a tree:

1. Routing, top-down: at each node, centre the tokens that reach it, take their first principal direction u and
   split at the median projection, so both children get half the tokens and the tree starts balanced:
       z = (x - mu) . u - median,  scaled by 1 / std of the projection  (w = u / s, b = -(mu . u + median) / s).
2. Leaf form: each leaf keeps the ``leaf_width`` dense neurons that matter most on its tokens
   (score_j = mean |act(h_j)| * ||W2[:, j]||), and the mean contribution of the dropped ones on those tokens is folded
   into the leaf's output bias:  b_leaf = b2 + W2[:, dropped] mean_t act(h_t)[dropped].
3. Neuron form: a path has depth + 1 neurons, far too few to hold the dense neurons, so with the routing fixed the
   output vectors are fitted by least squares on the dense outputs, level by level on the residual (two
   backfitting sweeps), each (node, branch) independently:  v = sum_t a_t r_t / (sum_t a_t^2 + ridge).

Written here because no library converts a dense MLP into a tree (MoEfication's code clusters neurons for a flat
mixture of experts, with no routing tree and no FFF).
"""

from __future__ import annotations

import torch

from algos.fff.tree import FFF
from algos.surgery.blocks import DenseMLP

MIN_TOKENS = 8  # a node with fewer calibration tokens keeps its scratch values
# Leaf form: logits scaled to ~4 per standard deviation of the projection (sigma(4) = 0.98), so the soft mixture
# starts close to the hard routing the converted leaves were chosen for (measured on digits: soft fine-tuning after
# conversion reached 0.63 held-out accuracy at scale 1, 0.89 at 3, 0.96 at 6; see docs/BENCHMARKS.md).
LEAF_ROUTING_SHARPNESS = 4.0


@torch.no_grad()
def init_from_dense(fff: FFF, dense: DenseMLP, inputs: torch.Tensor, split: tuple | None = None) -> None:
    """Overwrite ``fff``'s parameters from ``dense`` and its calibration ``inputs`` (tokens, in_features).
    ``split``: ``split_top_down``'s result for these inputs and this tree's levels, when trees of several leaf widths
    are built for one block (the routing does not depend on the width)."""
    x = inputs.float()
    weight, bias, path, right = split if split is not None else split_top_down(x, routing_levels(fff))
    if fff.form == "leaf":
        weight, bias = weight * LEAF_ROUTING_SHARPNESS, bias * LEAF_ROUTING_SHARPNESS
    fff.node_weight.copy_(torch.where(weight.isnan(), fff.node_weight.float(), weight))
    fff.node_bias.copy_(torch.where(bias.isnan(), fff.node_bias.float(), bias))
    if fff.form == "leaf":
        leaf = (2 * path[:, -1] + 1 + right[:, -1].long() - (2**fff.depth - 1) if fff.depth
                else torch.zeros(len(x), dtype=torch.long, device=x.device))
        _fill_leaves(fff, dense, x, leaf)
    else:
        _fit_node_outputs(fff, dense(x.to(dense.fc1.weight.dtype)).float(), x, path, right)


def routing_levels(fff: FFF) -> int:
    """Levels of decisions ``split_top_down`` makes for ``fff``: depth + 1 visited neurons, or depth for leaves."""
    return fff.depth + 1 if fff.form == "neuron" else fff.depth


def split_top_down(x: torch.Tensor, levels: int):
    """Median splits along principal directions, breadth-first over 2^levels - 1 nodes. Returns the node weights
    (nodes, d) and biases (nodes,) (NaN for nodes with too few tokens), and each token's path: node per level
    (tokens, levels) and whether it went right."""
    nodes = 2**levels - 1
    weight = x.new_full((nodes, x.shape[1]), float("nan"))
    bias = x.new_full((nodes,), float("nan"))
    index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    path, right = [], []
    for level in range(levels):
        went_right = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for node in range(2**level - 1, 2 ** (level + 1) - 1):
            members = (index == node).nonzero().squeeze(1)
            if len(members) < MIN_TOKENS:
                continue
            tokens = x[members]
            mean = tokens.mean(0)
            direction = torch.linalg.svd(tokens - mean, full_matrices=False).Vh[0]
            projection = (tokens - mean) @ direction
            median = projection.median()
            scale = projection.std().clamp_min(1e-6)
            weight[node] = direction / scale
            bias[node] = -(mean @ direction + median) / scale
            went_right[members] = projection > median
        path.append(index)
        right.append(went_right)
        index = 2 * index + 1 + went_right.long()
    if not path:  # depth-0 leaf form: no decisions
        return weight, bias, torch.zeros(len(x), 0, dtype=torch.long), torch.zeros(len(x), 0, dtype=torch.bool)
    return weight, bias, torch.stack(path, 1), torch.stack(right, 1)


def _fill_leaves(fff: FFF, dense: DenseMLP, x: torch.Tensor, leaf: torch.Tensor) -> None:
    w1, b1 = dense.fc1.weight.float(), _bias(dense.fc1)
    w2, b2 = dense.fc2.weight.float(), _bias(dense.fc2)
    hidden = dense.activation(x @ w1.T + b1)  # (tokens, h)
    importance_out = w2.norm(dim=0)  # ||W2[:, j]||
    width = min(fff.leaf_width, w1.shape[0])
    for number in range(2**fff.depth):
        mine = hidden[leaf == number]
        if len(mine) == 0:
            mine = hidden  # a leaf no calibration token reaches: the neurons that matter overall
        score = mine.abs().mean(0) * importance_out
        keep = score.topk(width).indices
        dropped = torch.ones(w1.shape[0], dtype=torch.bool, device=x.device)
        dropped[keep] = False
        fff.leaf_in[number].zero_()
        fff.leaf_in_bias[number].zero_()
        fff.leaf_out[number].zero_()
        fff.leaf_in[number, :, :width] = w1[keep].T
        fff.leaf_in_bias[number, :width] = b1[keep]
        fff.leaf_out[number, :width] = w2[:, keep].T
        # b_leaf = b2 + W2[:, dropped] mean_t act(h_t)[dropped]
        fff.leaf_out_bias[number] = b2 + w2[:, dropped] @ mine[:, dropped].mean(0)


def _fit_node_outputs(fff: FFF, y: torch.Tensor, x: torch.Tensor, path: torch.Tensor, right: torch.Tensor,
                      sweeps: int = 2, ridge: float = 1e-3) -> None:
    z = torch.einsum("td,tld->tl", x, fff.node_weight.float()[path]) + fff.node_bias.float()[path]
    a = fff.node_coefficient(z)  # (tokens, levels): each visited node's coefficient
    rows = 2 * path + right.long() if fff.mirrored else path  # row of node_out viewed as (nodes * branches, d_out)
    values = x.new_zeros(fff.node_out.shape[0] * fff.node_out.shape[1], fff.out_features)
    mean = y.mean(0)
    residual = y - mean
    for _ in range(sweeps):
        for level in range(path.shape[1]):
            row, coefficient = rows[:, level], a[:, level]
            residual += coefficient[:, None] * values[row]  # take this level's current fit back out
            numerator = torch.zeros_like(values).index_add_(0, row, coefficient[:, None] * residual)
            denominator = x.new_zeros(len(values)).index_add_(0, row, coefficient**2)
            count = x.new_zeros(len(values)).index_add_(0, row, torch.ones_like(coefficient))
            fitted = count >= MIN_TOKENS
            values[fitted] = numerator[fitted] / (denominator[fitted] + ridge * count[fitted])[:, None]
            residual -= coefficient[:, None] * values[row]
    fff.node_out.copy_(values.view_as(fff.node_out))
    fff.out_bias.copy_(mean)


def _bias(linear) -> torch.Tensor:
    return linear.bias.float() if linear.bias is not None else linear.weight.new_zeros(linear.out_features).float()


@torch.no_grad()
def relative_error(fff: FFF, dense: DenseMLP, inputs: torch.Tensor) -> float:
    """||FFF(x) - dense(x)|| / ||dense(x)|| on the calibration inputs, with the FFF's hard (inference) path."""
    was_training = fff.training
    fff.eval()
    try:
        x = inputs.to(fff.node_weight.dtype)
        target = dense(x.to(dense.fc1.weight.dtype)).float()
        return ((fff(x).float() - target).norm() / target.norm().clamp_min(1e-12)).item()
    finally:
        fff.train(was_training)
