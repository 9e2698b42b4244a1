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


def test_failure_after_the_first_swap_rolls_back_every_module_and_the_optimizer(monkeypatch):
    import algos.surgery.replace as replace

    model = net()
    optimizer = trained_adam(model)
    modules_before = list(model)
    groups_before = [list(group["params"]) for group in optimizer.param_groups]
    state_before = {p: dict(state) for p, state in optimizer.state.items()}
    real = replace.replace_module_classes
    swaps = []

    def fail_on_second_swap(model, policies, optimizers=None):
        (policy,) = policies.values()

        def counting(module, index):
            new = policy(module, index)
            if new is not None:
                swaps.append(module)
                if len(swaps) == 2:  # the first swap has already happened in the model
                    assert isinstance(model[0], SwappedLinear)
                    raise RuntimeError("injected")
            return new

        return real(model, {nn.Module: counting}, optimizers)

    monkeypatch.setattr(replace, "replace_module_classes", fail_on_second_swap)
    with pytest.raises(RuntimeError, match="injected"):
        apply_swap_linear(model, optimizers=optimizer)
    assert all(a is b for a, b in zip(model, modules_before, strict=True))
    assert [list(group["params"]) for group in optimizer.param_groups] == groups_before
    assert set(optimizer.state) == set(state_before)
    assert all(optimizer.state[p][k] is v for p, s in state_before.items() for k, v in s.items())
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()  # still a working model and optimizer


def test_failing_optimizer_update_rolls_back_too(monkeypatch):
    import composer.utils.module_surgery as composer_surgery

    model = net()
    optimizer = trained_adam(model)
    before = list(model)
    monkeypatch.setattr(composer_surgery, "update_params_in_optimizer",
                        lambda **kwargs: (_ for _ in ()).throw(RuntimeError("optimizer broke")))
    with pytest.raises(RuntimeError, match="optimizer broke"):
        apply_swap_linear(model, optimizers=optimizer)
    assert all(a is b for a, b in zip(model, before, strict=True))
    assert len(optimizer_params(optimizer)) == 6


def test_multihead_attention_out_proj_is_skipped_with_a_reason_and_the_rest_swapped():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    optimizer = torch.optim.Adam(layer.parameters())
    x = torch.randn(3, 5, 16)
    expected = layer(x)
    report = apply_swap_linear(layer, optimizers=optimizer)
    assert sorted(row.fqn for row in report.replaced) == ["linear1", "linear2"]
    (skip,) = report.skipped
    assert skip.fqn == "self_attn.out_proj" and "reads out_proj.weight directly" in skip.reason
    assert type(layer.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert torch.allclose(layer(x), expected)
    assert len(optimizer_params(optimizer)) == len(list(layer.parameters()))


def test_strict_error_names_why_every_candidate_was_skipped():
    with pytest.raises(ValueError, match=r"all 3 candidates skipped, e.g. 0: min\(in, out\) = 6 below"):
        apply_swap_linear(net(), min_features=100, strict=True)
