"""SelfDistillation in a Composer Trainer: the teacher is the model right before surgery whatever the algorithms'
order, the loss is added, the teacher stays frozen, and resume is bit-exact with or without the algorithms."""

import copy

import pytest
import torch
from composer.loggers import InMemoryLogger
from torch.utils.data import DataLoader
from transformers.models.bert.modeling_bert import BertAttention

from algos import FNetMixing, SelfDistillation
from algos.fnet import FourierBertAttention
from algos.heal import DistillError
from tests.helpers import make_trainer, tiny_mlm_and_batch


def loader(batch, batch_size=2):
    """Four batches per epoch, so a 4-batch run checkpoints at ep0-ba2."""
    size = len(batch["input_ids"])
    return DataLoader([{key: value[i] for key, value in batch.items()} for i in range(size)], batch_size=batch_size)


def final_state(trainer):
    """Weights and optimizer state by parameter name: FNet's BERT adapter keeps the pretrained LayerNorm, which a
    replayed surgery rebuilds, so the optimizer lists it at another position than the straight run does (the
    values match by name)."""
    optimizer = trainer.state.optimizers[0]
    return ({key: value.clone() for key, value in trainer.state.model.state_dict().items()},
            {name: {key: value.clone() for key, value in optimizer.state[p].items()}
             for name, p in trainer.state.model.named_parameters()})


def assert_same(a, b):
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1].keys() == b[1].keys()
    assert all(a[1][n].keys() == b[1][n].keys() and all(torch.equal(a[1][n][k], b[1][n][k]) for k in a[1][n])
               for n in a[1])
    assert all(a[1][n] for n in a[1])  # every parameter was stepped


def attention_types(model):
    return [type(layer.attention) for layer in model.model.bert.encoder.layer]


@pytest.mark.parametrize("distillation_first", [True, False])
def test_teacher_is_the_model_before_surgery_whatever_the_order(tmp_path, distillation_first):
    model, batch = tiny_mlm_and_batch()
    original = copy.deepcopy(model.state_dict())
    distillation = SelfDistillation(task_weight=1.0)
    surgery = FNetMixing(keep_attention_layers=[-1])
    algorithms = [distillation, surgery] if distillation_first else [surgery, distillation]
    logger = InMemoryLogger()
    trainer = make_trainer(model, loader(batch), tmp_path, algorithms, logger=logger, max_duration="2ba")
    assert attention_types(trainer.state.model)[:3] == [FourierBertAttention] * 3
    assert attention_types(distillation.teacher) == [BertAttention] * 4
    assert distillation.teacher is not trainer.state.model
    assert all(torch.equal(value, original[key]) for key, value in distillation.teacher.state_dict().items())
    trainer.fit()
    assert all(torch.equal(value, original[key]) for key, value in distillation.teacher.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in distillation.teacher.parameters())
    expected_bytes = sum(t.numel() * t.element_size() for t in [*distillation.teacher.parameters(),
                                                               *distillation.teacher.buffers()])
    assert logger.hyperparameters["distill/teacher_bytes"] == expected_bytes
    assert f"{expected_bytes:,} bytes" in distillation.report()


def test_distillation_loss_is_added_after_the_task_loss(tmp_path):
    def losses(algorithms):
        model, batch = tiny_mlm_and_batch()
        logger = InMemoryLogger()
        make_trainer(model, loader(batch), tmp_path / str(len(algorithms)), algorithms, logger=logger,
                     max_duration="2ba").fit()
        return [value for _, value in logger.data["loss/train/total"]]

    task = losses([FNetMixing(keep_attention_layers=[-1])])
    both = losses([FNetMixing(keep_attention_layers=[-1]), SelfDistillation(task_weight=1.0)])
    pure = losses([FNetMixing(keep_attention_layers=[-1]), SelfDistillation(task_weight=0.0)])
    assert both[0] > task[0]  # the same first batch, plus the distillation terms (> 0: the student was rewritten)
    assert 0 < pure[0] < task[0]


def test_no_surgery_takes_the_teacher_at_fit_start(tmp_path):
    model, batch = tiny_mlm_and_batch()
    distillation = SelfDistillation()
    trainer = make_trainer(model, loader(batch), tmp_path, [distillation], max_duration="1ba")
    assert distillation.teacher is None
    trainer.fit()
    assert attention_types(distillation.teacher) == [BertAttention] * 4


def test_teacher_is_taken_before_a_later_surgery(tmp_path):
    model, batch = tiny_mlm_and_batch()
    distillation = SelfDistillation(task_weight=1.0)
    trainer = make_trainer(model, loader(batch), tmp_path, [FNetMixing(keep_attention_layers=[-1], apply_at="1ba"),
                                                            distillation], max_duration="3ba")
    trainer.fit()
    assert attention_types(distillation.teacher) == [BertAttention] * 4
    assert attention_types(trainer.state.model)[0] is FourierBertAttention


@pytest.mark.parametrize("task_weight", [0.0, 1.0])
@pytest.mark.parametrize("pass_algorithms_again", [False, True])
def test_resume_is_bit_exact(tmp_path, task_weight, pass_algorithms_again):
    def algorithms():
        return [SelfDistillation(task_weight=task_weight), FNetMixing(keep_attention_layers=[-1])]

    model, batch = tiny_mlm_and_batch()
    straight = make_trainer(model, loader(batch), tmp_path, algorithms())
    straight.fit()
    expected = final_state(straight)
    teacher = straight.state.algorithms[0].teacher.state_dict()

    fresh, _ = tiny_mlm_and_batch()
    with torch.no_grad():  # other initial weights: the teacher must come from the checkpoint, not from this model
        for parameter in fresh.parameters():
            parameter.add_(0.5)
    resumed = make_trainer(fresh, loader(batch), tmp_path / "resumed", algorithms() if pass_algorithms_again else [],
                           load_path=str(tmp_path / "checkpoints" / "ep0-ba2-rank0.pt"))
    (distillation,) = [a for a in resumed.state.algorithms if isinstance(a, SelfDistillation)]
    assert distillation.config.task_weight == task_weight
    assert all(torch.equal(value, teacher[key]) for key, value in distillation.teacher.state_dict().items())
    resumed.fit()
    assert int(resumed.state.timestamp.batch) == 4
    assert_same(final_state(resumed), expected)


def test_a_checkpoint_teacher_loads_and_a_bad_one_is_a_one_line_error(tmp_path):
    model, batch = tiny_mlm_and_batch()
    make_trainer(model, loader(batch), tmp_path, [], max_duration="2ba").fit()
    trained = model.state_dict()
    checkpoint = tmp_path / "checkpoints" / "ep0-ba2-rank0.pt"

    fresh, _ = tiny_mlm_and_batch()
    distillation = SelfDistillation(teacher=str(checkpoint))
    make_trainer(fresh, loader(batch), tmp_path / "good", [FNetMixing(keep_attention_layers=[-1]), distillation],
                 max_duration="1ba")
    assert all(torch.equal(value, trained[key]) for key, value in distillation.teacher.state_dict().items())
    assert attention_types(distillation.teacher) == [BertAttention] * 4

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    fresh, _ = tiny_mlm_and_batch()
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(DistillError, match="does not load into this model") as error:
        make_trainer(fresh, loader(batch), tmp_path / "bad", [SelfDistillation(teacher=str(bad)),
                                                              FNetMixing(keep_attention_layers=[-1])])
    assert "\n" not in str(error.value)
    assert attention_types(fresh) == [BertAttention] * 4
    assert all(torch.equal(value, before[key]) for key, value in fresh.state_dict().items())
    with pytest.raises(DistillError, match="is no checkpoint file"):
        SelfDistillation(teacher=str(tmp_path / "missing.pt"))


def test_a_teacher_without_the_students_boundaries_fails_before_training(tmp_path):
    model, batch = tiny_mlm_and_batch()
    before = copy.deepcopy(model.state_dict())
    trainer = make_trainer(model, loader(batch), tmp_path, [SelfDistillation(teacher=torch.nn.Linear(2, 2))],
                           max_duration="2ba")
    with pytest.raises(DistillError, match="the teacher has no module 'model.bert.encoder.layer.0'"):
        trainer.fit()
    assert int(trainer.state.timestamp.batch) == 0
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
