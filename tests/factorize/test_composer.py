"""Factorize inside a Composer Trainer: INIT, FIT_START calibration from the dataloader, a later time, DDP refusal,
resume."""

import copy

import pytest
import torch
from composer import Trainer
from composer.core import Algorithm, Event
from composer.utils import dist

import algos
from algos import Factorize, FactorizedLinear, apply_factorization
from algos.factorize import FactorizeConfig
from algos.surgery import SurgeryError
from tests.helpers import assert_same, final_state, make_trainer


class OptimizerWatch(Algorithm):
    """Snapshots the optimizer state of every parameter at each batch end; placed before and after Factorize in
    ``algorithms`` (Composer runs them in order), it sees the state right before and right after the surgery."""

    def __init__(self):
        self.snapshots = []

    def match(self, event, state):
        return event == Event.BATCH_END

    def apply(self, event, state, logger):
        optimizer = state.optimizers[0]
        in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.snapshots.append({id(p): {k: v.clone() for k, v in optimizer.state[p].items()} if p in optimizer.state
                               else None for p in state.model.parameters() if id(p) in in_groups})


def test_at_init_factorizes_before_fit_and_trains(composer_model_factory, train_dataloader, tmp_path):
    algorithm = Factorize(rank=8, min_features=1)
    trainer = make_trainer(composer_model_factory(), train_dataloader, tmp_path, [algorithm], max_duration="2ba")
    assert isinstance(trainer.state.model.module[0], FactorizedLinear)
    trainer.fit()
    (report,) = algorithm.reports
    assert [row.fqn for row in report.replaced] == ["module.0"] and report.replaced[0].notes["rank"] == 8
    assert "break-even" in report.skipped[0].reason  # module.3: 32 -> 4


def test_activation_init_calibrates_on_the_train_dataloader_at_fit_start(composer_model_factory, train_dataloader,
                                                                         tmp_path):
    algorithm = Factorize(rank=8, init="activation", calibration_batches=3, min_features=1)
    trainer = make_trainer(composer_model_factory(), train_dataloader, tmp_path, [algorithm], max_duration="2ba")
    assert type(trainer.state.model.module[0]) is torch.nn.Linear  # no dataloader at INIT yet
    trainer.fit()
    assert isinstance(trainer.state.model.module[0], FactorizedLinear)
    (report,) = algorithm.reports
    assert "init" not in report.replaced[0].notes  # calibration reached the layer: whitened, not the SVD fallback


def test_later_time_keeps_optimizer_state_for_untouched_params_and_starts_new_ones_fresh(
        composer_model_factory, train_dataloader, tmp_path):
    watch_before, watch_after = OptimizerWatch(), OptimizerWatch()
    algorithm = Factorize(rank=8, min_features=1, apply_at="2ba")
    model = composer_model_factory()
    old_ids = {id(p) for p in model.module[0].parameters()}
    trainer = make_trainer(model, train_dataloader, tmp_path, [watch_before, algorithm, watch_after],
                           max_duration="3ba")
    trainer.fit()
    assert isinstance(model.module[0], FactorizedLinear)
    before, after = watch_before.snapshots[1], watch_after.snapshots[1]  # batch 2's end, around the surgery
    assert old_ids <= set(before) and not old_ids & set(after)  # the dense weights left the optimizer
    kept = [id(p) for p in model.module[3].parameters()]
    for key in kept:  # the untouched layer keeps its Adam moments and step count exactly
        assert before[key].keys() == after[key].keys() and before[key]
        assert all(torch.equal(before[key][name], after[key][name]) for name in before[key])
    new_ids = {id(p) for p in model.module[0].parameters()}
    # in the optimizer with fresh (zero) state, so that a checkpoint saved before their first step loads
    assert new_ids <= set(after) and all(not value.any() for key in new_ids for value in after[key].values())
    assert all(watch_after.snapshots[2][key]["exp_avg"].any() for key in new_ids)  # their first step
    assert int(trainer.state.timestamp.batch) == 3


def test_later_time_as_epochs_and_duration(composer_model_factory, train_dataloader, tmp_path):
    for apply_at, duration in (("1ep", "10ba"), ("0.5dur", "4ba")):
        algorithm = Factorize(rank=8, min_features=1, apply_at=apply_at)
        trainer = make_trainer(composer_model_factory(), train_dataloader, tmp_path / apply_at, [algorithm],
                               max_duration=duration)
        trainer.fit()
        assert isinstance(trainer.state.model.module[0], FactorizedLinear)
        assert len(algorithm.reports) == 1


def test_refuses_surgery_after_ddp_wrapping_when_multi_process(monkeypatch):
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    Factorize()  # at INIT: fine under DDP
    with pytest.raises(ValueError, match="apply_at='2ep' rewrites the model after DDP wraps it.*2 processes"):
        Factorize(apply_at="2ep")
    with pytest.raises(ValueError, match="calibration from the train dataloader rewrites the model after DDP"):
        Factorize(init="activation")


@pytest.mark.parametrize("settings, when", [({"apply_at": "1ba"}, "apply_at='1ba'"),
                                             ({"init": "activation"}, "calibration from the train data")])
def test_refuses_surgery_after_fsdp_wrapping_at_init(composer_model_factory, train_dataloader, settings, when):
    """FSDP wraps the model right after INIT: a later surgery is refused there, in one line, before the wrap (which
    on this CPU-only machine would fail for want of CUDA: Composer's FSDP needs a GPU)."""
    algorithm = Factorize(rank=8, min_features=1, **settings)
    with pytest.raises(SurgeryError, match=rf"^Factorize: {when} rewrites the model after FSDP wraps it \(the "
                                           r"Trainer's parallelism_config has fsdp\), which is not supported; apply "
                                           r"it at INIT \(apply_at=None\) without calibration, or train without "
                                           r"FSDP.$"):
        Trainer(model=composer_model_factory(), train_dataloader=train_dataloader, max_duration="2ba", device="cpu",
                parallelism_config={"fsdp": {}}, algorithms=[algorithm])


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="apply_at='2epochs' is not a Composer time"):
        Factorize(apply_at="2epochs")
    with pytest.raises(SurgeryError, match=r"^Factorize: energy=2 must be in \(0, 1\]"):
        Factorize(energy=2)


def test_settings_are_the_config_and_calibration_is_asked_for():
    algorithm = Factorize(rank=8, init="activation", calibration_batches=3, min_features=1)
    assert algorithm.config == FactorizeConfig(rank=8, init="activation", calibration_batches=3, min_features=1)
    assert algorithm.calibration_needed == 3 and Factorize(mac_budget=0.5).calibration_needed == 8
    assert Factorize(rank=8).calibration_needed == 0
    with pytest.raises(SurgeryError, match="^Factorize: init='activation' needs calibration="):
        algorithm.surgery(torch.nn.Sequential(torch.nn.Linear(64, 64)))  # called by hand, without batches


def test_repr_round_trips():
    algorithm = Factorize(rank=64, init="activation", apply_at="1ep", target_modules=["query", "value"])
    assert repr(algorithm) == "Factorize(rank=64, init='activation', target_modules=['query', 'value'], apply_at='1ep')"
    assert repr(eval(repr(algorithm), vars(algos))) == repr(algorithm)


@pytest.mark.parametrize("pass_again", [False, True])
def test_resume_with_composers_names(composer_model_factory, train_dataloader, tmp_path, pass_again):
    def algorithm():
        return Factorize(latent_features=8, min_features=1)  # module.0 (16 -> 32) at rank 8; module.3 stays dense

    straight = make_trainer(composer_model_factory(), train_dataloader, tmp_path, [algorithm()])
    straight.fit()
    assert straight.state.model.module[0].rank == 8
    resumed = make_trainer(composer_model_factory(), train_dataloader, tmp_path / "resumed",
                           [algorithm()] if pass_again else [],
                           load_path=str(tmp_path / "checkpoints" / "ep0-ba2-rank0.pt"))
    resumed.fit()
    assert_same(final_state(resumed), final_state(straight))


def test_resume_with_energy_passed_again_keeps_the_checkpoints_ranks(composer_model_factory, train_dataloader,
                                                                      tmp_path):
    """``energy=`` ranks come from the weights at INIT. A resumed Trainer is built from a fresh model, whose weights
    (here: another seed) give other ranks; the checkpoint's surgery must win, or its weights do not fit (before the
    core's fix in 66df0eb: a size mismatch, rank 5 in the checkpoint against 4 in the model)."""
    def algorithm():
        return Factorize(energy=0.5, rank_multiple=1, min_features=1)

    straight = make_trainer(composer_model_factory(0), train_dataloader, tmp_path, [algorithm()])
    straight.fit()
    assert straight.state.model.module[0].rank == 5
    fresh = composer_model_factory(1)
    report = apply_factorization(copy.deepcopy(fresh.module), energy=0.5, rank_multiple=1, min_features=1)
    assert report.replaced[0].notes["rank"] == 4  # what the algorithm passed again picks on its own
    resumed = make_trainer(fresh, train_dataloader, tmp_path / "resumed", [algorithm()],
                           load_path=str(tmp_path / "checkpoints" / "ep0-ba2-rank0.pt"))
    assert resumed.state.model.module[0].rank == 5
    resumed.fit()
    assert_same(final_state(resumed), final_state(straight))
