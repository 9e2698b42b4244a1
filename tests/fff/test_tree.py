"""The FFF module: soft mixture, hard descent against a per-token reference, fast paths against the dense
reference path (the compiled kernels and the PyTorch path, values and gradients), the node variants, hardening,
counters."""

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from algos.fff.tree import FFF, hard_leaf, mixture_weights
from tests.helpers import random_tree


def naive_forward(fff: FFF, token: torch.Tensor) -> torch.Tensor:
    """The hard descent written out for one token, straight from the definitions."""
    node, y = 0, None
    if fff.form == "neuron":
        y = fff.out_bias.clone()
        for _ in range(fff.depth + 1):
            z = token @ fff.node_weight[node] + fff.node_bias[node]
            went_right = bool(z > 0)
            if fff.node == "mirrored":
                y = y + fff.activation(z.abs()) * fff.node_out[node, int(went_right)]
            elif fff.node == "ultrafastbert":
                y = y + fff.activation(z) * fff.node_out[node, 0]
            else:  # linear
                y = y + z * fff.node_out[node, 0]
            node = 2 * node + 1 + int(went_right)
        return y
    for _ in range(fff.depth):
        node = 2 * node + 1 + int(bool(token @ fff.node_weight[node] + fff.node_bias[node] > 0))
    leaf = node - (2**fff.depth - 1)
    hidden = fff.activation(token @ fff.leaf_in[leaf] + fff.leaf_in_bias[leaf])
    return hidden @ fff.leaf_out[leaf] + fff.leaf_out_bias[leaf]


def trained_tree(form, depth, node="mirrored"):
    """A tree fitted for a few steps to a nonlinear target, so weights are no longer i.i.d."""
    fff = random_tree(form, depth, node)
    x = torch.randn(512, 24)
    target = torch.sin(x[:, :12] * 2) + x[:, 12:] ** 2
    optimizer = torch.optim.Adam(fff.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        F.mse_loss(fff(x), target).backward()
        optimizer.step()
    return fff


TREES = [("neuron", 0, "mirrored"), ("neuron", 3, "mirrored"), ("neuron", 9, "mirrored"),
         ("neuron", 5, "ultrafastbert"), ("neuron", 4, "linear"),
         ("leaf", 0, None), ("leaf", 2, None), ("leaf", 4, None)]


@pytest.mark.parametrize("form,depth,node", TREES)
@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("batch", [1, 7, 2048])
def test_fast_path_equals_reference_path_and_per_token_descent(form, depth, node, trained, batch, backend):
    fff = (trained_tree if trained else random_tree)(form, depth, node or "mirrored").eval()
    x = torch.randn(batch, 24, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        fast = fff(x)
        reference = fff.forward_reference(x)
        naive = torch.stack([naive_forward(fff, token) for token in x[:16]])
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[:16], naive, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "silu", "tanh", torch.nn.GELU(approximate="tanh")])
@pytest.mark.parametrize("batch", [1, 33])
def test_each_activation_values_and_gradients(activation, batch, backend):
    """The kernels have each activation and its derivative written out (GELU's tanh form is not among them: the
    PyTorch path runs it); float64, so the comparison is tight."""
    torch.manual_seed(0)
    fff = FFF(24, 12, 4, activation=activation).double()
    x = torch.randn(batch, 24, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(batch, 12, dtype=torch.float64)
    results = [(y, torch.autograd.grad(y, [x, *fff.parameters()], grad)) for y in (fff(x), fff.forward_reference(x))]
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-9)


def test_leading_dimensions_are_kept():
    fff = random_tree("leaf", 2).eval()
    x = torch.randn(3, 5, 24)
    assert fff(x).shape == (3, 5, 12)
    torch.testing.assert_close(fff(x)[1], fff(x[1]))


def fast_and_reference_gradients(fff: FFF, batch: int) -> tuple[dict, dict]:
    """Gradients of sum(y^2) for the input ("x") and every parameter that gets one, through ``fff.forward`` and
    through ``fff.forward_reference``, on the same random batch."""
    x = torch.randn(batch, 24, requires_grad=True)
    grads = []
    for forward in (fff.forward, fff.forward_reference):
        fff.zero_grad()
        x.grad = None
        forward(x).pow(2).sum().backward()
        grads.append({"x": x.grad.clone(), **{name: p.grad.clone() for name, p in fff.named_parameters()
                                              if p.grad is not None}})
    return grads[0], grads[1]


@pytest.mark.parametrize("node", ["mirrored", "ultrafastbert", "linear"])
@pytest.mark.parametrize("depth,batch", [(0, 1), (3, 64), (8, 700)])
def test_neuron_training_path_has_the_reference_gradients(node, depth, batch, backend):
    fff = trained_tree("neuron", depth, node) if depth == 3 else random_tree("neuron", depth, node)
    fast, reference = fast_and_reference_gradients(fff.train(), batch)
    assert fast.keys() == reference.keys() == {"x", *dict(fff.named_parameters())}
    for name in fast:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-4, atol=1e-5)


def test_only_what_needs_a_gradient_gets_one(backend):
    """A frozen tree still passes the reference gradient to its input; a tree on a fixed input gets its own."""
    fff = random_tree("neuron", 3)
    x = torch.randn(20, 24, requires_grad=True)
    fff.requires_grad_(False)
    fff(x).sum().backward()
    reference = x.detach().requires_grad_()
    fff.forward_reference(reference).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-4, atol=1e-5)
    assert fff.node_weight.grad is None
    fff.requires_grad_(True)
    fff(x.detach()).sum().backward()
    assert fff.node_weight.grad.abs().sum() > 0 and fff.out_bias.grad.abs().sum() > 0


def test_soft_mixture_weights_sum_to_one_and_are_path_products():
    decisions = torch.rand(50, 2**3 - 1)
    weights, reach = mixture_weights(decisions, 3)
    torch.testing.assert_close(weights.sum(1), torch.ones(50))
    # leaf 5 = path right (node 0), left (node 2), right (node 5)
    torch.testing.assert_close(weights[:, 5], decisions[:, 0] * (1 - decisions[:, 2]) * decisions[:, 5])
    torch.testing.assert_close(reach[:, 4], decisions[:, 0] * 0 + (1 - decisions[:, 0]) * decisions[:, 1])
    for level in range(3):  # each level's reach probabilities sum to 1
        torch.testing.assert_close(reach[:, 2**level - 1: 2 ** (level + 1) - 1].sum(1), torch.ones(50))


def test_soft_training_forward_is_the_mixture_of_all_leaves():
    fff = random_tree("leaf", 3).train()
    x = torch.randn(40, 24)
    torch.testing.assert_close(fff(x), fff.forward_reference(x), rtol=1e-5, atol=1e-5)
    fff.hard_training = True  # the hard-training phase runs the inference path, with gradients to leaves
    with torch.no_grad():
        expected = fff.eval().forward_reference(x)
    fff.train()
    out = fff(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert fff.node_weight.grad is None and fff.leaf_in.grad.abs().sum() > 0


def test_region_leak_flips_decisions_only_in_soft_training():
    fff = random_tree("leaf", 3)
    fff.region_leak = 0.4
    x = torch.randn(200, 24)
    torch.manual_seed(1)
    leaky = fff.train()(x)
    fff.region_leak = 0.0
    assert not torch.allclose(leaky, fff(x))
    fff.region_leak = 0.4
    with torch.no_grad():
        torch.testing.assert_close(fff.eval()(x), fff.forward_reference(x))


def decision_entropy(fff, x):
    with torch.no_grad():
        fff.train()(x)
    return float(fff.last_entropy)


@pytest.mark.parametrize("seed", [0, 1])
def test_hardening_loss_lowers_decision_entropy(seed):
    torch.manual_seed(seed)
    x = torch.randn(256, 8)
    target = torch.stack([x[:, 0].sign() * x[:, 1], x[:, 2].abs()], 1)
    entropies = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(seed)
        fff = FFF(8, 2, 3, form="leaf", leaf_width=4)
        optimizer = torch.optim.Adam(fff.parameters(), lr=2e-2)
        for _ in range(150):
            optimizer.zero_grad()
            loss = F.mse_loss(fff(x), target)
            (loss + weight * fff.last_entropy).backward()
            optimizer.step()
        entropies[weight] = decision_entropy(fff, x)
    assert entropies[1.0] < 0.5 * entropies[0.0]
    assert 0 <= entropies[1.0] <= math.log(2)


@pytest.mark.parametrize("node", ["mirrored", "linear", "ultrafastbert"])
def test_left_turns_contribute_except_in_the_ultrafastbert_form(node, backend):
    """The defect and the two fixes, with ReLU where all are exact. UltraFastBERT: act(z) both routes and
    contributes, so a node that sends the token left (z <= 0) adds nothing. Mirrored: act(|z|) through the taken
    branch's vector, which is relu(z) v_right + relu(-z) v_left: two neurons +-w, both live. Linear: z v."""
    torch.manual_seed(0)
    x = torch.randn(512, 24)
    fff = FFF(24, 12, 0, activation="relu", node=node)  # one node
    with torch.no_grad():
        fff.node_out.normal_()
        fff.out_bias.normal_()
        z = x @ fff.node_weight[0] + fff.node_bias[0]
        contribution = fff(x) - fff.out_bias
        v = fff.node_out[0]
    expected = {"mirrored": lambda: F.relu(z)[:, None] * v[1] + F.relu(-z)[:, None] * v[0],
                "linear": lambda: z[:, None] * v[0], "ultrafastbert": lambda: F.relu(z)[:, None] * v[0]}[node]()
    torch.testing.assert_close(contribution, expected)
    left, right = contribution[z < 0].abs().mean(), contribution[z > 0].abs().mean()
    assert left == 0 if node == "ultrafastbert" else left > 0.3 * right


def test_counters_are_buffers_not_parameters_and_count_training_tokens():
    fff = random_tree("neuron", 2)
    assert "leaf_usage" not in dict(fff.named_parameters()) and "leaf_usage" not in fff.state_dict()
    fff.train()(torch.randn(30, 24))
    assert int(fff.leaf_usage.sum()) == 30 and fff.leaf_usage.numel() == 4
    with torch.no_grad():
        fff.eval()(torch.randn(10, 24))
    assert int(fff.leaf_usage.sum()) == 30  # evaluation is not counted


@pytest.mark.parametrize("form", ["neuron", "leaf"])
def test_bfloat16(form):
    fff = random_tree(form, 3).eval()
    x = torch.randn(33, 24)
    with torch.no_grad():
        reference = fff(x)
        low = fff.to(torch.bfloat16)(x.bfloat16())
    assert low.dtype == torch.bfloat16
    # a token near a split may take the other branch in bf16; most must agree closely
    close = ((low.float() - reference).norm(dim=1) < 0.05 * reference.norm(dim=1) + 0.05).float().mean()
    assert close > 0.8


def test_leaf_form_matches_the_fastfeedforward_package():
    """The FFF paper authors' implementation, same weight layout: soft training output equal; its eval path drops
    the leaf output bias b2 (fastfeedforward 0.2.1), so ours equals theirs plus b2 of the chosen leaf."""
    from fastfeedforward import FFF as PeerFFF

    torch.manual_seed(0)
    peer = PeerFFF(24, 8, 12, 3, activation=torch.nn.GELU())
    ours = FFF(24, 12, 3, form="leaf", leaf_width=8)
    with torch.no_grad():
        for mine, theirs in [(ours.node_weight, peer.node_weights), (ours.node_bias, peer.node_biases[:, 0]),
                             (ours.leaf_in, peer.w1s), (ours.leaf_in_bias, peer.b1s), (ours.leaf_out, peer.w2s),
                             (ours.leaf_out_bias, peer.b2s)]:
            mine.copy_(theirs)
    x = torch.randn(64, 24)
    torch.testing.assert_close(ours.train()(x), peer.train()(x))
    with torch.no_grad():
        leaf = hard_leaf(F.linear(x, ours.node_weight, ours.node_bias), 3)
        torch.testing.assert_close(ours.eval()(x), peer.eval()(x) + peer.b2s[leaf])


@pytest.mark.parametrize("kwargs,message", [
    (dict(depth=-1), "depth=-1 must be an int >= 0"),
    (dict(depth=2, form="leaf", leaf_width=0), "leaf_width=0 must be an int >= 1"),
    (dict(depth=2, form="tree"), "form='tree' is not one of 'neuron', 'leaf'"),
    (dict(depth=2, activation="swish"), "activation='swish' is not one of"),
    (dict(depth=2, region_leak=0.7), "region_leak=0.7 must be in"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FFF(8, 8, **kwargs)


def test_leaf_tree_copies_and_pickles_after_a_soft_training_forward():
    """``last_entropy`` holds part of the last forward's graph; copies leave it out (deepcopy refused it: a surgery
    record after fit_steps on leaf-form trees failed), the original keeps it for the hardening loss."""
    tree = FFF(8, 8, depth=2, form="leaf", leaf_width=4).train()
    x = torch.randn(5, 8)
    tree(x)
    kept = tree.last_entropy
    assert kept.requires_grad and kept.grad_fn is not None  # part of the forward's graph
    for twin in (copy.deepcopy(tree), pickle.loads(pickle.dumps(tree))):
        assert twin.last_entropy is None
        assert torch.equal(twin.eval()(x), tree.eval()(x))
        tree.train()
    assert tree.last_entropy is kept  # copying did not touch the original's


@pytest.mark.parametrize("mirrored, node", [(True, "mirrored"), (False, "ultrafastbert")])
def test_a_tree_pickled_with_the_old_mirrored_flag_loads_as_its_node_variant(mirrored, node):
    tree = random_tree("neuron", 2, node)
    state = tree.__getstate__()
    del state["node"]
    state["mirrored"] = mirrored  # what FFF.__dict__ held before the node argument
    old = FFF.__new__(FFF)
    old.__setstate__(state)
    x = torch.randn(5, 24)
    assert old.node == node and torch.equal(old(x), tree(x))


@pytest.mark.parametrize("depth,batch", [(0, 1), (3, 1), (3, 300), (5, 64)])
def test_leaf_hard_training_path_has_the_reference_gradients(depth, batch, backend):
    """The hard-training phase (kernel or PyTorch routing, one GEMM pair per leaf or two matrix-vector products for
    a single token): leaf and input gradients equal the dense reference's with one-hot leaf weights."""
    fff = random_tree("leaf", depth)
    fff.hard_training = True
    fast, reference = fast_and_reference_gradients(fff.train(), batch)
    assert "node_weight" not in fast and "node_bias" not in fast  # hard routing: no routing gradient
    assert fast.keys() == reference.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-4, atol=1e-5)
