import pytest
import torch
from torch import nn

from algos import apply_swap_linear
from algos.surgery import apply_surgery, replace_modules
from algos.surgery.example import SwappedLinear


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))


def trained_adam(model):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    return optimizer


def optimizer_params(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def test_optimizer_swaps_params_and_keeps_untouched_state():
    model = net()
    optimizer = trained_adam(model)
    old_first = list(model[0].parameters())
    kept = list(model[2].parameters()) + list(model[4].parameters())
    kept_state = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in kept}

    apply_swap_linear(model, target_modules=["0"], optimizers=optimizer)

    params = optimizer_params(optimizer)
    assert len(params) == len({id(p) for p in params}) == 6  # no duplicates, same count
    assert all(all(p is not q for q in params) for p in old_first)  # old params gone from groups
    assert all(p not in optimizer.state for p in old_first)  # and from the state
    assert all(any(p is q for q in params) for p in model[0].parameters())  # new ones present
    # with fresh state: zeros, as Adam creates on a first step (so torch.distributed.checkpoint can save/load it)
    assert all(not value.any() for p in model[0].parameters() for value in optimizer.state[p].values())
    for p in kept:
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in kept_state[p].items())
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()  # the rewritten optimizer still steps
    assert set(optimizer.state[model[0].weight]) == {"step", "exp_avg", "exp_avg_sq"}


def test_function_kept_and_second_application_is_a_noop():
    model = net()
    x = torch.randn(5, 6)
    expected = model(x)
    first = apply_swap_linear(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    second = apply_swap_linear(model)
    assert torch.equal(model(x), expected)
    assert [type(m) for m in model if isinstance(m, nn.Linear)] == [SwappedLinear] * 3
    assert len(first.replaced) == 3 and second.replaced == []
    assert [s.reason for s in second.skipped] == ["already converted by SwapLinear"] * 3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_new_module_follows_old_device_and_dtype():
    model = net().to(torch.float64)
    apply_surgery(model, lambda m, fqn: nn.Linear(m.in_features, m.out_features), algorithm="T", classes=(nn.Linear,))
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    meta_model = nn.Sequential(nn.Linear(2, 2, device="meta"))
    apply_surgery(meta_model, lambda m, fqn: nn.Linear(2, 2), algorithm="T", classes=(nn.Linear,))
    assert meta_model[0].weight.is_meta


def test_skip_module_reason_and_converter_error_leaves_model_untouched():
    model = net()
    report = apply_swap_linear(model, min_features=10)
    assert [row.fqn for row in report.replaced] == ["2"]
    assert {s.fqn: s.reason for s in report.skipped} == {
        "0": "min(in, out) = 6 below min_features 10", "4": "min(in, out) = 3 below min_features 10"}

    def failing(module, fqn):
        if fqn == "4":
            raise RuntimeError("boom")
        return SwappedLinear(module.in_features, module.out_features)

    fresh = net()
    with pytest.raises(RuntimeError, match="boom"):
        apply_surgery(fresh, failing, algorithm="T", classes=(nn.Linear,))
    assert [type(m) for m in fresh if isinstance(m, nn.Linear)] == [nn.Linear] * 3


def test_shared_module_is_replaced_in_every_parent():
    shared = nn.Linear(3, 3)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared)})
    apply_swap_linear(model)
    assert isinstance(model["a"][0], SwappedLinear) and model["a"][0] is model["b"][0]


def test_replace_modules_names_a_missing_module():
    with pytest.raises(KeyError, match="'nope': the model has no such module"):
        replace_modules(net(), {"nope": nn.Linear(1, 1)})


def test_new_modules_take_the_train_or_eval_mode_of_the_module_they_replace():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model.eval()
    model[1].train()  # a mixed tree: each replacement follows its own predecessor
    apply_swap_linear(model)
    assert [m.training for m in model] == [False, True]
