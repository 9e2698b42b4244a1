"""FFFReplace in a Composer Trainer: training on BERT / ViT / TransformerEncoderLayer models, the hardening loss
and its ramp, the hard-training switch, usage logging, dense init from the train dataloader, passing it again to a
model it converted (directly and through a checkpoint)."""

import copy
from types import SimpleNamespace

import pytest
import torch
from composer.core import Event, Timestamp
from composer.loggers import InMemoryLogger
from torch.utils.data import DataLoader, TensorDataset

import algos
from algos import FFF, FFFReplace
from algos.fff import FFFTraining
from tests.helpers import (
    assert_same,
    classifier_and_batch,
    final_state,
    fixed_batches,
    losses_of,
    make_trainer,
    tiny_mlm_and_batch,
)


def test_tiny_bert_mlm_trains_with_leaf_trees_and_hardening(tmp_path):
    model, batch = tiny_mlm_and_batch()
    logger = InMemoryLogger()
    algorithm = FFFReplace(min_width=0, depth=2, form="leaf", leaf_width=16, hardening=0.1, log_interval=4)
    trainer = make_trainer(model, fixed_batches(batch), tmp_path, [algorithm], logger=logger, max_duration="8ba")
    trainer.fit()
    assert sum(isinstance(layer.intermediate, FFF) for layer in model.model.bert.encoder.layer) == 4
    losses = losses_of(logger)
    assert losses[-1] < 0.8 * losses[0]
    for key in ("fff/leaf_usage_entropy", "fff/load_balance", "fff/decision_entropy"):
        assert len(logger.data[key]) == 2  # batches 4 and 8
    assert 0 < logger.data["fff/leaf_usage_entropy"][-1][1] <= 1


@pytest.mark.parametrize("kind", ["vit", "encoder_layer"])
def test_vit_and_encoder_layer_models_train_with_neuron_trees(kind, tmp_path):
    model, batch = classifier_and_batch(kind)
    logger = InMemoryLogger()
    algorithm = FFFReplace(min_width=0, depth=3)
    trainer = make_trainer(model, fixed_batches(batch), tmp_path, [algorithm], logger=logger, max_duration="8ba")
    trainer.fit()
    assert len(algorithm.reports[0].replaced) == 2
    losses = losses_of(logger)
    assert losses[-1] < 0.8 * losses[0]


def fake_state(model, loss, **time):
    return SimpleNamespace(model=model, loss=loss, timestamp=Timestamp(**time), get_elapsed_duration=lambda: None)


def soft_tree_model():
    tree = FFF(8, 4, 2, form="leaf", leaf_width=4).train()
    tree(torch.randn(16, 8))
    return torch.nn.Sequential(tree), tree.last_entropy


def test_hardening_loss_is_added_after_the_loss_with_its_ramp():
    model, entropy = soft_tree_model()
    algorithm = FFFReplace(min_width=0, depth=2, form="leaf", hardening=0.5, hardening_ramp="100ba")
    loss = torch.tensor(1.0)
    state = fake_state(model, loss, batch=50)
    assert algorithm.match(Event.AFTER_LOSS, state)
    algorithm.apply(Event.AFTER_LOSS, state, None)
    torch.testing.assert_close(state.loss, loss + 0.25 * entropy)  # halfway up the ramp
    state = fake_state(model, {"ce": loss}, batch=500)
    algorithm.apply(Event.AFTER_LOSS, state, None)
    torch.testing.assert_close(state.loss["fff_hardening"], 0.5 * entropy)  # Composer sums a dict's values
    model[0].eval()  # nothing is added outside soft training
    state = fake_state(model, loss, batch=500)
    algorithm.apply(Event.AFTER_LOSS, state, None)
    assert state.loss is loss


def test_training_aids_work_on_their_own_on_trees_built_by_hand():
    model, entropy = soft_tree_model()
    aids = FFFTraining(hardening=0.5, hardening_ramp="100ba", log_interval=2)
    assert aids.find_unused_parameters and repr(aids) == "FFFTraining(hardening=0.5, hardening_ramp='100ba', " \
                                                         "log_interval=2)"
    loss = torch.tensor(1.0)
    state = fake_state(model, loss, batch=50)
    assert aids.match(Event.AFTER_LOSS, state)
    aids.apply(Event.AFTER_LOSS, state, None)
    torch.testing.assert_close(state.loss, loss + 0.25 * entropy)
    assert not aids.match(Event.AFTER_LOSS, fake_state(torch.nn.Linear(2, 2), loss, batch=50))  # no trees
    with pytest.raises(ValueError, match=r"^FFFTraining: log_interval=0 must be an int >= 1\.$"):
        FFFTraining(log_interval=0)


def test_hard_training_switch_and_ddp_flag(composer_model_factory, train_dataloader, tmp_path):
    algorithm = FFFReplace(min_width=0, depth=2, form="leaf", leaf_width=4, target_modules=["0"],
                           hard_training_at="2ba")
    assert algorithm.find_unused_parameters  # DDP must tolerate parameters hard routing leaves without gradient
    trainer = make_trainer(composer_model_factory(), train_dataloader, tmp_path, [algorithm], max_duration="1ba")
    tree = trainer.state.model.module[0]
    trainer.fit()
    assert not tree.hard_training
    trainer.fit(duration="1ba")
    assert tree.hard_training


def test_dense_init_calibrates_on_the_train_dataloader(composer_model_factory, train_dataloader, tmp_path):
    algorithm = FFFReplace(min_width=0, depth=1, form="leaf", leaf_width=32, init="dense", calibration_batches=2)
    model = composer_model_factory()
    trainer = make_trainer(model, train_dataloader, tmp_path, [algorithm], max_duration="2ba")
    assert isinstance(model.module[0], torch.nn.Linear)  # waits for the dataloader (FIT_START)
    trainer.fit()
    assert isinstance(model.module[0], FFF)  # the whole MLP, its output dropout after it
    assert algorithm.reports[0].replaced[0].notes["rel_error"] < 1e-4  # leaves as wide as the MLP: exact


def test_resume_with_the_training_aids_is_bit_exact(composer_model_factory, train_dataloader, tmp_path):
    """The hardening loss lives in the algorithm: a resumed run that should keep it passes FFFReplace again."""
    def algorithm():
        return FFFReplace(min_width=0, depth=2, form="leaf", leaf_width=4, hardening=0.5, hardening_ramp="3ba",
                          log_interval=1,
                          target_modules=["0"])

    straight = make_trainer(composer_model_factory(), train_dataloader, tmp_path, [algorithm()])
    straight.fit()
    resumed = make_trainer(composer_model_factory(), train_dataloader, tmp_path / "resumed", [algorithm()],
                           load_path=str(tmp_path / "checkpoints" / "ep0-ba2-rank0.pt"))
    resumed.fit()
    assert_same(final_state(resumed), final_state(straight))


def dense_fff_in_mid_training():
    return FFFReplace(min_width=0, depth=2, init="dense", calibration_batches=1, apply_at="1ba")


def test_passed_again_to_a_model_it_converted_it_is_a_clean_no_op(tmp_path):
    """Issue 14: the second FFFReplace used to read the converted encoder layer as a dense block and fail at fit
    with "'DenseMLP' object has no attribute 'in_features'"."""
    model, batch = classifier_and_batch("encoder_layer")
    make_trainer(model, fixed_batches(batch), tmp_path, [dense_fff_in_mid_training()], max_duration="2ba").fit()
    modules = [(name, type(module)) for name, module in model.named_modules()]
    again = dense_fff_in_mid_training()
    make_trainer(model, fixed_batches(batch), tmp_path / "again", [again], max_duration="2ba").fit()
    (report,) = again.reports
    assert report.replaced == [] and len(report.skipped) == 4  # linear1 and linear2 of both layers
    assert {skip.reason for skip in report.skipped} == {"already converted by FFFReplace"}
    assert [(name, type(module)) for name, module in model.named_modules()] == modules


def test_resume_with_dense_fff_in_mid_training_passed_again_is_bit_exact(tmp_path):
    """Issue 14's reproduction: encoder layers converted at batch 1 with init="dense", resumed at batch 2 from the
    original model with FFFReplace passed again."""
    model, batch = classifier_and_batch("encoder_layer")
    loader = DataLoader(TensorDataset(*batch), batch_size=4)
    straight = make_trainer(model, loader, tmp_path, [dense_fff_in_mid_training()])
    straight.fit()
    resumed = make_trainer(classifier_and_batch("encoder_layer")[0], loader, tmp_path / "resumed",
                           [dense_fff_in_mid_training()], load_path=str(tmp_path / "checkpoints" / "ep0-ba2-rank0.pt"))
    resumed.fit()
    assert_same(final_state(resumed), final_state(straight))


def test_bad_arguments_fail_at_construction_and_repr_round_trips():
    with pytest.raises(ValueError, match="hardening_ramp='soon' is not a Composer time"):
        FFFReplace(min_width=0, depth=2, hardening_ramp="soon")
    with pytest.raises(ValueError, match="hardening=-1 must be a number >= 0"):
        FFFReplace(min_width=0, depth=2, hardening=-1)
    algorithm = FFFReplace(min_width=0, depth=4, form="leaf", leaf_width=16, hardening=0.1, hardening_ramp="0.5dur")
    assert repr(eval(repr(algorithm), vars(algos))) == repr(algorithm)
    assert copy.deepcopy(algorithm).config.leaf_width == 16
