"""Composer's weight averages (EMA, SWA) across a surgery in mid-training: they follow the new modules."""

import warnings

import pytest
import torch
from composer import Callback
from composer.algorithms import EMA, SWA
from composer.core import Algorithm
from composer.models import ComposerClassifier
from torch import nn

from algos import Factorize, FactorizedLinear
from tests.helpers import assert_same, final_state, make_trainer

# module.0 (16 -> 32) is factorized, module.1 (BatchNorm: parameters and buffers) and module.3 (32 -> 4) are not.
NEW = {"module.0.first.weight", "module.0.second.weight", "module.0.second.bias"}


def model_with_norm(seed: int = 0) -> ComposerClassifier:
    torch.manual_seed(seed)
    return ComposerClassifier(nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)),
                              num_classes=4)


def factorize(apply_at=None):
    return Factorize(rank=4, min_features=1, apply_at=apply_at)


def clone(tensors) -> dict:
    return {name: tensor.detach().clone() for name, tensor in dict(tensors).items()}


def shapes(tensors) -> dict:
    return {name: tuple(tensor.shape) for name, tensor in dict(tensors).items()}


def trainable(model) -> dict:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class BeforeSurgeryProbe(Algorithm):
    """Called by every SurgeryAlgorithm right before its surgery (``BeforeSurgery``): what the model and EMA hold."""

    def __init__(self, ema: EMA):
        self.ema, self.model, self.averages = ema, None, None

    def match(self, event, state):
        return False

    def apply(self, event, state, logger):
        pass

    def before_surgery(self, state):
        self.model = clone(state.model.state_dict())
        self.averages = clone(self.ema.ema_model.named_parameters_dict)


class Snapshot(Callback):
    """What the model and EMA hold at one event (callbacks run after all algorithms)."""

    def __init__(self, ema: EMA, event: str, batch: int | None = None):
        self.ema, self.event, self.batch, self.taken = ema, event, batch, None

    def run_event(self, event, state, logger):
        if event.value == self.event and (self.batch is None or int(state.timestamp.batch) == self.batch):
            self.taken = {"model": clone(state.model.state_dict()), "active": self.ema.ema_weights_active,
                          "averages": clone(self.ema.ema_model.named_parameters_dict),
                          "buffers": clone(self.ema.ema_model.named_buffers_dict)}


def test_ema_tracks_every_tensor_of_the_surgered_model_like_a_surgery_at_init(train_dataloader, tmp_path):
    emas = {}
    for apply_at in ["2ba", None]:
        emas[apply_at] = ema = EMA(half_life="2ba")
        trainer = make_trainer(model_with_norm(), train_dataloader, tmp_path / str(apply_at),
                               [factorize(apply_at), ema])
        trainer.fit()
        assert isinstance(trainer.state.model.module[0], FactorizedLinear)
        assert shapes(ema.ema_model.named_parameters_dict) == shapes(trainable(trainer.state.model))
        assert shapes(ema.ema_model.named_buffers_dict) == shapes(trainer.state.model.named_buffers())
    assert shapes(emas["2ba"].ema_model.named_parameters_dict) == shapes(emas[None].ema_model.named_parameters_dict)
    assert shapes(emas["2ba"].ema_model.named_buffers_dict) == shapes(emas[None].ema_model.named_buffers_dict)


def test_ema_keeps_untouched_averages_and_starts_new_parameters_at_their_converted_values(train_dataloader,
                                                                                         tmp_path):
    ema = EMA(half_life="2ba")
    probe, after = BeforeSurgeryProbe(ema), Snapshot(ema, "batch_end", batch=2)
    # EMA updates at batch 2's end before the surgery (Composer runs algorithms in order): `probe` sees that average.
    trainer = make_trainer(model_with_norm(), train_dataloader, tmp_path, [ema, probe, factorize("2ba")],
                           callbacks=[after])
    trainer.fit()
    assert not after.taken["active"]
    averages, model = after.taken["averages"], after.taken["model"]
    assert set(averages) == set(probe.averages) - {"module.0.weight", "module.0.bias"} | NEW
    for name in set(averages) - NEW:  # untouched: the running average from before the surgery, unchanged
        assert torch.equal(averages[name], probe.averages[name]), name
    for name in NEW:  # new: starts at the surgery's converted weights, as EMA does when it starts averaging
        assert torch.equal(averages[name], model[name]), name


def test_eval_and_checkpoints_swap_ema_weights_into_every_module(train_dataloader, tmp_path):
    ema = EMA(half_life="2ba")
    during_eval = Snapshot(ema, "eval_start")
    trainer = make_trainer(model_with_norm(), train_dataloader, tmp_path, [factorize("2ba"), ema],
                           callbacks=[during_eval], eval_dataloader=train_dataloader, eval_interval="4ba")
    trainer.fit()
    # eval at batch 4 swapped the averages in (and out again); the checkpoint after it swapped them in to be saved
    assert during_eval.taken["active"] and ema.ema_weights_active
    averages, training = clone(trainer.state.model.state_dict()), ema.ema_model.named_parameters_dict
    assert set(training) == set(trainable(trainer.state.model))
    saved = torch.load(tmp_path / "checkpoints" / "ep0-ba4-rank0.pt", weights_only=False)["state"]["model"]
    for name in training:
        assert torch.equal(during_eval.taken["model"][name], averages[name]), name
        assert torch.equal(saved[name], averages[name]), name
        assert not torch.equal(training[name], averages[name]), name  # averaged, not the raw training weights


def test_surgery_while_ema_weights_are_swapped_in_converts_the_training_weights(train_dataloader, tmp_path):
    """A batch checkpoint swaps EMA's weights into the model until the next batch starts; a surgery at the epoch's
    end comes in between. It must convert the training weights and leave the averages swapped in after it."""
    ema = EMA(half_life="2ba")
    probe, last_batch, after = BeforeSurgeryProbe(ema), Snapshot(ema, "batch_end", batch=8), Snapshot(ema, "epoch_end")
    trainer = make_trainer(model_with_norm(), train_dataloader, tmp_path, [ema, probe, factorize("1ep")],
                           callbacks=[last_batch, after], max_duration="10ba")
    trainer.fit()
    assert not last_batch.taken["active"]
    for name, weight in last_batch.taken["model"].items():  # the surgery sees the training weights of batch 8
        assert torch.equal(probe.model[name], weight), name
    assert after.taken["active"]  # the averages are swapped in again after the surgery
    swapped_in, training = after.taken["model"], after.taken["averages"]  # swapped: EMA's store holds training
    for name in set(swapped_in) & set(last_batch.taken["averages"]) - NEW:
        assert torch.equal(swapped_in[name], last_batch.taken["averages"][name]), name
        assert torch.equal(training[name], last_batch.taken["model"][name]), name
    for name in NEW:
        assert torch.equal(swapped_in[name], training[name]), name
    assert shapes(ema.ema_model.named_parameters_dict) == shapes(trainable(trainer.state.model))


def make_swa():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SWA warns about multi-GPU resume on construction
        return SWA(swa_start="1ep", swa_end="3ep", update_interval="1ba")


class SwaCount(Callback):
    def __init__(self, swa: SWA):
        self.swa, self.counts = swa, {}

    def batch_end(self, state, logger):
        if self.swa.swa_started:
            self.counts[int(state.timestamp.batch)] = int(self.swa.swa_model.n_averaged)


def test_swa_started_before_the_surgery_restarts_on_the_new_architecture(train_dataloader, tmp_path):
    swa = make_swa()
    count = SwaCount(swa)
    # 8 batches an epoch: SWA averages from batch 9 on, the surgery comes at the end of batch 12.
    trainer = make_trainer(model_with_norm(), train_dataloader, tmp_path, [factorize("12ba"), swa],
                           callbacks=[count], max_duration="4ep")
    trainer.fit()
    assert swa.swa_completed
    model, averaged = trainer.state.model, swa.swa_model.module
    assert isinstance(averaged.module[0], FactorizedLinear)
    assert [type(m) for m in averaged.modules()] == [type(m) for m in model.modules()]
    assert shapes(averaged.state_dict()) == shapes(model.state_dict())
    assert [count.counts[b] for b in range(9, 14)] == [1, 2, 3, 1, 2]  # averaging restarts at the surgery
    x, y = next(iter(train_dataloader))
    assert swa.swa_model((x, y)).shape == model((x, y)).shape == (8, 4)


@pytest.mark.parametrize("pass_again", [False, True], ids=["ema-only", "both-again"])
def test_checkpoint_after_the_surgery_with_ema_resumes(train_dataloader, tmp_path, pass_again):
    straight_ema = EMA(half_life="2ba")
    straight = make_trainer(model_with_norm(), train_dataloader, tmp_path, [factorize("2ba"), straight_ema],
                            max_duration="6ba")
    straight.fit()
    ema = EMA(half_life="2ba")
    resumed = make_trainer(model_with_norm(), train_dataloader, tmp_path / "resumed",
                           [factorize("2ba"), ema] if pass_again else [ema], max_duration="6ba",
                           load_path=str(tmp_path / "checkpoints" / "ep0-ba4-rank0.pt"))
    assert int(resumed.state.timestamp.batch) == 4
    resumed.fit()
    assert shapes(ema.ema_model.named_parameters_dict) == shapes(trainable(resumed.state.model))
    assert_same(final_state(resumed), final_state(straight))
    for name, average in straight_ema.ema_model.named_parameters_dict.items():
        assert torch.equal(ema.ema_model.named_parameters_dict[name], average), name


def test_checkpoint_after_the_surgery_with_swa_resumes(train_dataloader, tmp_path):
    """SWA's AveragedModel is built at INIT from the model before the replay; resume rebuilds it on the replayed
    architecture before the checkpoint's SWA state loads (strictly), so the run continues."""
    make_trainer(model_with_norm(), train_dataloader, tmp_path, [factorize("12ba"), make_swa()],
                 max_duration="2ep").fit()
    swa = make_swa()
    resumed = make_trainer(model_with_norm(), train_dataloader, tmp_path / "resumed", [swa], max_duration="3ep",
                           load_path=str(tmp_path / "checkpoints" / "ep1-ba14-rank0.pt"))
    resumed.fit()
    assert shapes(swa.swa_model.module.state_dict()) == shapes(resumed.state.model.state_dict())
