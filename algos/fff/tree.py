"""Fast FeedForward (FFF) trees: a binary tree routes each token down one path, so only O(depth) of the tree's
weights touch it (Belcak & Wattenhofer 2023, "Fast Feedforward Networks"; UltraFastBERT, Belcak & Wattenhofer 2023).

Nodes are numbered breadth-first: the children of node i are 2i+1 (left) and 2i+2 (right), so a token's next node
is ``2i + 1 + [z_i > 0]`` with z_i = w_i . x + b_i its logit at node i.

Two forms, chosen by ``form``:

* ``"neuron"`` (UltraFastBERT): the tree has 2^(depth+1) - 1 nodes, each one neuron; a token visits depth + 1 of
  them, in training too, and
      y = sum over visited nodes i of  a_i v_i  + b_out.
  The node's coefficient a_i is chosen by ``node``:
  - ``"ultrafastbert"``: a_i = act(z_i), one output vector v_i. GELU both routes and contributes: a token sent
    left has z_i < 0 and act(z_i) ~ 0, so about half of every path contributes nothing.
  - ``"linear"``: a_i = z_i, one output vector (the proposed fix: no activation, so a left turn contributes
    z_i v_i too; the tree is then linear within each region).
  - ``"mirrored"`` (ours, the default): the sign of z_i routes, the magnitude contributes, through an output vector
    for each branch,  a_i = act(|z_i|),  v_i = v_i^right if z_i > 0 else v_i^left,  i.e. every node is a pair of
    neurons with input weights +w_i and -w_i of which routing picks the active one (for ReLU exactly the sum of
    both). Every visited node contributes, at the same FLOPs; the price is d_out more parameters per node.
* ``"leaf"`` (FFF paper): 2^depth - 1 internal nodes with sigmoid decisions c_i = sigma(z_i) and 2^depth leaves, each
  a small MLP of ``leaf_width``. Training mixes all leaves softly,
      y = sum_l p_l(x) leaf_l(x),  p_l = product over the path to l of c_i (went right) or 1 - c_i (went left),
  and the hardening loss (mean binary entropy of the decisions a token makes, weighted by how likely it reaches
  them) pushes the decisions to 0/1; evaluation, and the optional hard-training phase, follow the hard path and
  run one leaf. ``region_leak`` flips each soft decision with that probability in training (the paper's remedy
  for over-fragmented regions).

Fast paths (``forward``): on CPU the neuron form runs compiled kernels (``algos.fff.kernels``: each token walks
its path once, forward and backward). Elsewhere (CUDA, half precision, an activation the kernels do not know, numba
missing) it walks the tree one level at a time for all tokens at once, gathering the node rows it needs
(``node_weight[index]``, one row per token: vectors, never matrices) and summing the output vectors with one
``embedding_bag``. The leaf form sorts tokens by leaf and runs one GEMM pair per leaf. ``forward_reference``
computes the same function densely (every node's logit, a path mask; every leaf, then the mixture) and is what the
fast paths are tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from algos.fff import kernels
from algos.surgery.pretrained import SPECS
from algos.surgery.tracing import recording_graph

FORMS = ("neuron", "leaf")
NODES = ("mirrored", "ultrafastbert", "linear")
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
DEFAULT_ACTIVATION = "gelu"  # a tree's activation when nothing says otherwise (FFF, FFFReplace on a lone Linear)


def node_count(depth: int, form: str) -> int:
    """Nodes with a decision: every node of the neuron form (2^(depth+1) - 1), the internal ones of the leaf form."""
    return 2 ** (depth + 1) - 1 if form == "neuron" else 2**depth - 1


def fff_param_count(in_features: int, out_features: int, depth: int, form: str, leaf_width: int = 0,
                    node: str = "mirrored") -> int:
    """Parameters of an FFF, without building it (for the size check before surgery)."""
    nodes = node_count(depth, form)
    if form == "neuron":
        return nodes * (in_features + 1 + (2 if node == "mirrored" else 1) * out_features) + out_features
    leaves = 2**depth
    return nodes * (in_features + 1) + leaves * (leaf_width * (in_features + 1 + out_features) + out_features)


def check_tree_arguments(*, depth, form, leaf_width, activation, region_leak, node="mirrored",
                         error: Callable[[str], Exception] = lambda message: ValueError(f"FFF: {message}")) -> None:
    """One-line errors for bad tree arguments, shared by the module and the algorithm (whose ``error`` names it)."""
    if form not in FORMS:
        raise error(f"form={form!r} is not one of {', '.join(map(repr, FORMS))}.")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise error(f"depth={depth!r} must be an int >= 0.")
    if form == "leaf" and (isinstance(leaf_width, bool) or not isinstance(leaf_width, int) or leaf_width <= 0):
        raise error(f"leaf_width={leaf_width!r} must be an int >= 1 for form='leaf'.")
    if node not in NODES:
        raise error(f"node={node!r} is not one of {', '.join(map(repr, NODES))}.")
    if isinstance(activation, str) and activation not in ACTIVATIONS:
        raise error(f"activation={activation!r} is not one of {', '.join(map(repr, ACTIVATIONS))} (or an nn.Module).")
    if not (isinstance(region_leak, (int, float)) and 0 <= region_leak < 0.5):
        raise error(f"region_leak={region_leak!r} must be in [0, 0.5).")


class FFF(nn.Module):
    """A Fast FeedForward tree from ``in_features`` to ``out_features``; input (..., in_features)."""

    def __init__(self, in_features: int, out_features: int, depth: int, *, form: str = "neuron",
                 leaf_width: int = 32, activation: str | nn.Module = DEFAULT_ACTIVATION, node: str = "mirrored",
                 region_leak: float = 0.0, hard_training: bool = False):
        super().__init__()
        check_tree_arguments(depth=depth, form=form, leaf_width=leaf_width, activation=activation,
                             region_leak=region_leak, node=node)
        self.in_features, self.out_features, self.depth, self.form = in_features, out_features, depth, form
        self.leaf_width = leaf_width if form == "leaf" else None
        self.node = node if form == "neuron" else None
        self.region_leak = region_leak
        self.hard_training = hard_training
        self.activation = ACTIVATIONS[activation]() if isinstance(activation, str) else activation
        nodes = node_count(depth, form)
        self.node_weight = nn.Parameter(torch.empty(nodes, in_features))
        self.node_bias = nn.Parameter(torch.empty(nodes))
        if form == "neuron":
            self.node_out = nn.Parameter(torch.empty(nodes, 2 if self.mirrored else 1, out_features))
            self.out_bias = nn.Parameter(torch.empty(out_features))
        else:
            leaves = 2**depth
            self.leaf_in = nn.Parameter(torch.empty(leaves, in_features, leaf_width))
            self.leaf_in_bias = nn.Parameter(torch.empty(leaves, leaf_width))
            self.leaf_out = nn.Parameter(torch.empty(leaves, leaf_width, out_features))
            self.leaf_out_bias = nn.Parameter(torch.empty(leaves, out_features))
        # How many training tokens reached each bottom-level node (neuron form) or leaf (leaf form): monitoring
        # state, not learned, and not checkpointed.
        self.register_buffer("leaf_usage", torch.zeros(2**depth, dtype=torch.long), persistent=False)
        self.last_entropy: torch.Tensor | None = None  # hardening loss of the last soft training forward
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Scratch init, as nn.Linear's: uniform(+-1/sqrt(fan_in)); routing hyperplanes through the origin."""
        bound_in = 1 / math.sqrt(self.in_features)
        nn.init.uniform_(self.node_weight, -bound_in, bound_in)
        nn.init.zeros_(self.node_bias)
        if self.form == "neuron":
            # the output sums depth + 1 node contributions, as a dense layer sums its fan-in
            nn.init.uniform_(self.node_out, -1 / math.sqrt(self.depth + 1), 1 / math.sqrt(self.depth + 1))
            nn.init.zeros_(self.out_bias)
        else:
            nn.init.uniform_(self.leaf_in, -bound_in, bound_in)
            nn.init.uniform_(self.leaf_in_bias, -bound_in, bound_in)
            bound_leaf = 1 / math.sqrt(self.leaf_width)
            nn.init.uniform_(self.leaf_out, -bound_leaf, bound_leaf)
            nn.init.uniform_(self.leaf_out_bias, -bound_leaf, bound_leaf)

    def __getstate__(self) -> dict:
        """Copies and pickles leave out ``last_entropy``: a value of the last forward, part of its autograd graph
        (``copy.deepcopy`` refuses such tensors: deep-copying a leaf-form tree after a soft training forward, e.g.
        the surgery's weightless record after ``fit_steps``, failed)."""
        return {**super().__getstate__(), "last_entropy": None}

    def __setstate__(self, state: dict) -> None:
        """Trees pickled before ``node`` replaced ``mirrored`` (a bool) load as the same variant."""
        if "node" not in state:
            mirrored = state.pop("mirrored", True)
            state["node"] = None if state["form"] == "leaf" else "mirrored" if mirrored else "ultrafastbert"
        super().__setstate__(state)

    @property
    def mirrored(self) -> bool:
        """Neuron form with an output vector per branch (``node="mirrored"``)."""
        return self.node == "mirrored"

    def node_coefficient(self, z: torch.Tensor) -> torch.Tensor:
        """A visited node's coefficient from its logit: act(|z|) (mirrored), act(z) (ultrafastbert), z (linear)."""
        if self.node == "linear":
            return z
        return self.activation(z.abs() if self.mirrored else z)

    @property
    def activation_code(self) -> int | None:
        """The node's activation as a code in ``kernels.CODES`` (None: the compiled kernels do not cover it); probed
        once per activation module."""
        if self.node == "linear":
            return kernels.CODES["identity"]
        probed = self.__dict__.get("_probed_activation")
        if probed is None or probed[0] is not self.activation:
            probed = self.__dict__["_probed_activation"] = (self.activation, kernels.activation_code(self.activation))
        return probed[1]

    @property
    def soft(self) -> bool:
        """True when this forward mixes leaves softly (leaf form, training, not in the hard-training phase)."""
        return self.form == "leaf" and self.training and not self.hard_training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.node_weight.dtype:
            self._check_dtype(x)
        if self.form == "leaf" and not self.soft and recording_graph():
            # an exported or traced graph cannot hold how many tokens each leaf gets (data-dependent shapes; a trace
            # would replay the example's split for every input): it runs every leaf and keeps each token's own
            # (the one-hot path: the same values, 2^depth times the compute)
            return self.forward_reference(x)
        rows = x.reshape(-1, self.in_features)
        if self.form == "neuron":
            y, bottom = self._neuron_fast(rows)
        elif self.soft:
            y, bottom = self._leaf_soft(rows)
        else:
            y, bottom = self._leaf_hard(rows)
        self._count(bottom)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _check_dtype(self, x: torch.Tensor) -> None:
        """An input whose dtype is not the parameters' is an error, as for nn.Linear (the neuron form's gathers would
        otherwise promote silently, returning the parameters' dtype), except where autocast would cast both for a
        Linear: float32 / float16 / bfloat16 under autocast on the input's device keep running."""
        low = (torch.float32, torch.float16, torch.bfloat16)
        if not (x.dtype in low and self.node_weight.dtype in low and torch.is_autocast_enabled(x.device.type)):
            raise RuntimeError(f"FFF: input dtype {x.dtype} does not match the tree's parameters "
                               f"({self.node_weight.dtype}); convert one of them (model.to({x.dtype}) or "
                               f"x.to({self.node_weight.dtype})), as nn.Linear requires")

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same function computed densely: all node logits and a path mask (neuron form); every leaf, mixed
        by the soft weights or the one-hot hard path (leaf form). Slow; the fast paths are tested against it."""
        rows = x.reshape(-1, self.in_features)
        logits = F.linear(rows, self.node_weight, self.node_bias)
        if self.form == "neuron":
            path, right = descend(logits, self.depth + 1)
            coefficient = self.node_coefficient(logits)
            y = self.out_bias.expand(rows.shape[0], -1)
            for branch in range(self.node_out.shape[1]):  # 0: left (or the only one), 1: right
                taken = right if self.mirrored and branch == 1 else ~right if self.mirrored else torch.ones_like(right)
                mask = torch.zeros_like(logits).scatter(1, path, taken.to(logits.dtype))
                y = y + (coefficient * mask) @ self.node_out[:, branch]
        else:
            if self.soft:
                weights, _ = mixture_weights(torch.sigmoid(logits), self.depth)
            else:
                weights = F.one_hot(hard_leaf(logits, self.depth), 2**self.depth).to(rows.dtype)
            hidden = self.activation(torch.einsum("bd,ldw->blw", rows, self.leaf_in) + self.leaf_in_bias)
            every_leaf = torch.einsum("blw,lwo->blo", hidden, self.leaf_out) + self.leaf_out_bias
            y = torch.einsum("bl,blo->bo", weights, every_leaf)
        return y.reshape(*x.shape[:-1], self.out_features)

    # -- neuron form ---------------------------------------------------------------------------------------------

    def _neuron_fast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not kernels.available(self, x):
            return self._neuron_fast_batched(x)
        args = (x, self.node_weight, self.node_bias, self.node_out, self.out_bias, self.depth + 1, self.mirrored,
                self.activation_code)
        if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in args[:5]):
            y, path = kernels.NeuronTree.apply(*args)
        else:
            y, path, _ = kernels.neuron_forward(*args)
        # the bottom node reached, for the usage counter (training only: a few microseconds a single token can save)
        return y, path[:, -1] - (2**self.depth - 1) if self.training else None

    def _neuron_fast_batched(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        coefficients, outputs = [], []
        for _ in range(self.depth + 1):
            # z = w_index . x + b_index: one gathered row per token (index_select: several times faster than
            # advanced indexing on CPU, and a multiply-sum beats a batched 1 x d @ d x 1 matmul)
            z = (self.node_weight.index_select(0, index) * x).sum(-1) + self.node_bias.index_select(0, index)
            right = (z > 0).long()
            coefficients.append(self.node_coefficient(z))
            outputs.append(2 * index + right if self.mirrored else index)  # row of node_out viewed as (nodes*2, d)
            bottom = index
            index = 2 * index + 1 + right
        # y = sum_levels a_level * node_out[row_level] + b_out, in one fused gather-and-sum
        y = F.embedding_bag(torch.stack(outputs, 1), self.node_out.flatten(0, 1),
                            per_sample_weights=torch.stack(coefficients, 1).to(self.node_out.dtype), mode="sum")
        return y + self.out_bias, bottom - (2**self.depth - 1)

    # -- leaf form -----------------------------------------------------------------------------------------------

    def _leaf_soft(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.node_weight, self.node_bias)
        decisions = torch.sigmoid(logits)
        if self.region_leak > 0:
            flip = torch.rand_like(decisions) < self.region_leak
            decisions = torch.where(flip, 1 - decisions, decisions)
        weights, reach = mixture_weights(decisions, self.depth)
        if self.depth:
            # binary entropy from the logit, stably: H(sigma(z)) = softplus(z) - z sigma(z); averaged over the
            # depth decisions a token makes (reach sums to 1 per level), so it lies in [0, ln 2]
            entropy = F.softplus(logits) - logits * torch.sigmoid(logits)
            # (an empty batch: 0, not the NaN of an empty mean, which would poison the loss it is added to)
            self.last_entropy = (reach * entropy).sum() / (max(x.shape[0], 1) * self.depth)
        # y = sum_l p_l (act(x W1_l + b1_l) W2_l + b2_l); p folded into the hidden units so no (tokens, leaves,
        # out_features) tensor is built
        hidden = self.activation(torch.einsum("bd,ldw->blw", x, self.leaf_in) + self.leaf_in_bias)
        y = torch.einsum("blw,lwo->bo", weights.unsqueeze(-1) * hidden, self.leaf_out) + weights @ self.leaf_out_bias
        return y, weights.argmax(1)

    def _leaf_hard(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = self.hard_leaves(x)
        if x.shape[0] == 1:  # one token: its leaf's two matrix-vector products, nothing to group
            number = int(leaf)
            hidden = self.activation(torch.addmv(self.leaf_in_bias[number], self.leaf_in[number].T, x[0]))
            return torch.addmv(self.leaf_out_bias[number], self.leaf_out[number].T, hidden).unsqueeze(0), leaf

        def run_leaf(number: int, tokens: torch.Tensor) -> torch.Tensor:
            hidden = self.activation(torch.addmm(self.leaf_in_bias[number], tokens, self.leaf_in[number]))
            return torch.addmm(self.leaf_out_bias[number], hidden, self.leaf_out[number])
        return by_leaf(x, leaf, 2**self.depth, run_leaf), leaf

    def hard_leaves(self, x: torch.Tensor) -> torch.Tensor:
        """The leaf (0 .. 2^depth - 1) each row of ``x`` reaches on the hard path (leaf form)."""
        if kernels.available(self, x, activation=False):
            return kernels.leaf_route(x, self.node_weight, self.node_bias, self.depth)
        return hard_leaf(F.linear(x, self.node_weight, self.node_bias), self.depth)

    # ------------------------------------------------------------------------------------------------------------

    def uncounted_macs(self, x: torch.Tensor) -> int:
        """MACs torch.utils.flop_counter misses: the neuron form's per-level dot products (multiply + sum)."""
        tokens = x.numel() // self.in_features
        return tokens * (self.depth + 1) * self.in_features if self.form == "neuron" else 0

    @torch.no_grad()
    def _count(self, bottom: torch.Tensor | None) -> None:
        if self.training:
            self.leaf_usage += torch.bincount(bottom.reshape(-1), minlength=self.leaf_usage.numel())

    def extra_repr(self) -> str:
        shape = (f"{self.in_features}, {self.out_features}, depth={self.depth}, form={self.form!r}")
        if self.form == "leaf":
            return shape + f", leaf_width={self.leaf_width}, region_leak={self.region_leak}"
        return shape + f", node={self.node!r}"


def activation_name(activation: nn.Module) -> str | None:
    """The key in ``ACTIVATIONS`` that builds ``activation`` as it is, or None."""
    if type(activation) is nn.GELU:
        return "gelu" if activation.approximate == "none" else None
    return {nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh"}.get(type(activation))


def descend(logits: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard descent through ``levels`` levels given every node's logit (tokens, nodes): the visited node of each
    level (tokens, levels) and whether the token went right there."""
    index = torch.zeros(logits.shape[0], 1, dtype=torch.long, device=logits.device)
    path, right = [], []
    for _ in range(levels):
        went_right = logits.gather(1, index) > 0
        path.append(index)
        right.append(went_right)
        index = 2 * index + 1 + went_right.long()
    return torch.cat(path, 1), torch.cat(right, 1)


def hard_leaf(logits: torch.Tensor, depth: int) -> torch.Tensor:
    """The leaf (0 .. 2^depth - 1) each token reaches, from the internal nodes' logits (tokens, 2^depth - 1)."""
    if depth == 0:
        return torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    path, right = descend(logits, depth)
    return 2 * path[:, -1] + 1 + right[:, -1].long() - (2**depth - 1)


def by_leaf(x: torch.Tensor, leaf: torch.Tensor, leaves: int,
            run_leaf: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``run_leaf(l, tokens)`` for the rows of ``x`` that reach each leaf l, as one batch per leaf (tokens sorted by
    leaf: one GEMM pair per leaf that has tokens, never a per-token weight matrix), back in the rows' order. An
    empty batch: leaf 0's on no tokens, so the output is (0, out_features) and part of the graph, its gradients
    zero, as nn.Linear's."""
    order = torch.argsort(leaf, stable=True)
    counts = torch.bincount(leaf, minlength=leaves).tolist()
    pieces = [run_leaf(number, tokens) for number, tokens in enumerate(x[order].split(counts))
              if tokens.shape[0] or (number == 0 and not x.shape[0])]
    return torch.cat(pieces).index_select(0, torch.argsort(order))


def mixture_weights(decisions: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft leaf weights from each internal node's probability of going right (tokens, 2^depth - 1): returns
    p (tokens, 2^depth), rows summing to 1, and each node's reach probability (tokens, 2^depth - 1)."""
    p = decisions.new_ones(decisions.shape[0], 1)
    reach = []
    for level in range(depth):
        reach.append(p)
        right = decisions[:, 2**level - 1: 2 ** (level + 1) - 1]
        # children of the j-th node of a level are the (2j)-th and (2j+1)-th of the next: interleave left/right
        p = torch.stack([p * (1 - right), p * right], dim=-1).flatten(1)
    return p, (torch.cat(reach, 1) if reach else decisions.new_zeros(decisions.shape[0], 0))


def _tree_spec(tree: FFF, spec) -> dict:
    """The constructor's arguments; the activation by the name of the function it computes (any module computing
    GELU, HF's GELUActivation included, is saved as "gelu" and rebuilt as nn.GELU: the same values)."""
    code = kernels.activation_code(tree.activation)
    names = {number: name for name, number in kernels.CODES.items()}
    if code is None:
        raise ValueError(f"FFF: cannot save activation {type(tree.activation).__name__}: it computes none of "
                         f"{', '.join(kernels.CODES)}")
    return {"in_features": tree.in_features, "out_features": tree.out_features, "depth": tree.depth,
            "form": tree.form, "leaf_width": tree.leaf_width, "node": tree.node, "region_leak": tree.region_leak,
            "hard_training": tree.hard_training, "activation": names[code]}


def _tree_from_spec(s: dict, child) -> FFF:
    activation = nn.Identity() if s["activation"] == "identity" else s["activation"]
    optional = {key: s[key] for key in ("leaf_width", "node") if s[key] is not None}
    return FFF(s["in_features"], s["out_features"], s["depth"], form=s["form"], activation=activation,
               region_leak=s["region_leak"], hard_training=s["hard_training"], **optional)


SPECS.register("FFF", FFF, _tree_spec, _tree_from_spec)
