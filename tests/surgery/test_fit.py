"""algos.surgery.fit: fitting a module to given outputs, measured on held-out rows, deterministic, side-effect free."""

import pytest
import torch
from torch import nn

from algos.surgery import SurgeryError
from algos.surgery.fit import check_fit_settings, fit_to_outputs


def teacher_and_rows(rows=400, seed=0):
    """Rows x and the outputs y of a random two-layer teacher; a student Linear cannot start close to it."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 8, generator=generator)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    with torch.no_grad():
        y = teacher(x)
    return x, y


def student(seed=1):
    torch.manual_seed(seed)
    return nn.Linear(8, 4)


def test_fitting_lowers_the_held_out_error():
    x, y = teacher_and_rows()
    module = student()
    result = fit_to_outputs(module, x, y, steps=200, lr=1e-2)
    assert result.after < 0.7 * result.before, result
    # The errors are measured on the held-out rows (10%: the first 40 of the seeded order), in eval mode.
    held_out = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:40]
    with torch.no_grad():
        error = ((module(x[held_out]) - y[held_out]).norm() / y[held_out].norm()).item()
    assert error == pytest.approx(result.after, rel=1e-5)


def test_zero_steps_changes_nothing():
    x, y = teacher_and_rows()
    module = student()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    result = fit_to_outputs(module, x, y, steps=0, lr=1e-2)
    assert result.before == result.after
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_fitting_is_deterministic_and_leaves_the_global_rng_mode_and_gradients_alone():
    x, y = teacher_and_rows()
    first, second = student(), student()
    first.eval()
    state = torch.get_rng_state()
    results = [fit_to_outputs(m, x, y, steps=30, lr=1e-2, batch_tokens=32) for m in (first, second)]
    assert torch.equal(torch.get_rng_state(), state)
    assert results[0] == results[1]
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))
    assert not first.training and second.training  # each left in the mode it came in
    assert all(p.grad is None for p in first.parameters())


def test_a_forward_function_is_fitted_through_the_modules_parameters():
    x, y = teacher_and_rows()
    module = student()
    result = fit_to_outputs(module, x, y[:, :2], steps=100, lr=1e-2, forward=lambda rows: module(rows)[:, :2])
    assert result.after < 0.7 * result.before


@pytest.mark.parametrize("steps,lr,message", [
    (-1, 1e-3, "fit_steps=-1 must be an int >= 0"),
    (1.5, 1e-3, "fit_steps=1.5 must be an int >= 0"),
    (True, 1e-3, "fit_steps=True must be an int >= 0"),
    (10, 0, "fit_lr=0 must be a finite number > 0"),
    (10, "fast", "fit_lr='fast' must be a finite number > 0"),
    (10, float("inf"), "fit_lr=inf must be a finite number > 0"),
])
def test_bad_settings_are_one_line_errors(steps, lr, message):
    with pytest.raises(SurgeryError, match=f"^Fit: {message}") as error:
        check_fit_settings(steps, lr, lambda text: SurgeryError("Fit", text))
    assert "\n" not in str(error.value)


def test_fitted_in_train_mode_measured_in_eval_mode():
    x, y = teacher_and_rows()

    class Recording(nn.Linear):
        modes: list

        def forward(self, rows):
            self.modes.append(self.training)
            return super().forward(rows)

    torch.manual_seed(1)
    module = Recording(8, 4)
    module.modes = []
    module.eval()
    fit_to_outputs(module, x, y, steps=3, lr=1e-2)
    assert module.modes == [False, True, True, True, False]


def test_a_fit_that_raises_the_held_out_error_is_undone():
    x, y = teacher_and_rows()
    module = student()
    before = [p.detach().clone() for p in module.parameters()]
    result = fit_to_outputs(module, x, y, steps=20, lr=100.0)
    assert result.after > result.before and not result.kept
    assert all(torch.equal(p, b) for p, b in zip(module.parameters(), before, strict=True))
    assert result.notes()["fit_undone"].startswith("the held-out error rose")
    kept = fit_to_outputs(student(), x, y, steps=20, lr=1e-2)
    assert kept.kept and "fit_undone" not in kept.notes() and set(kept.notes("block_")) == {
        "block_error_before", "block_error_after"}


def test_buffers_are_left_as_they_were():
    x, y = teacher_and_rows()

    class Counting(nn.Linear):
        def forward(self, rows):
            if self.training:
                self.calls += 1
            return super().forward(rows)

    torch.manual_seed(1)
    module = Counting(8, 4)
    module.register_buffer("calls", torch.zeros((), dtype=torch.long))
    result = fit_to_outputs(module, x, y, steps=10, lr=1e-2)
    assert result.kept and int(module.calls) == 0
