"""The functional ``distill`` and its loss on a tiny HF BERT: zero at the teacher, gradients only to the student,
pure distillation without labels, and one-line errors before anything changes."""

import copy

import pytest
import torch
from torch import nn
from transformers import BertForMaskedLM

from algos import apply_fnet_mixing, distill
from algos.heal import DistillConfig, boundary_names, distillation_loss
from algos.heal.distill import HiddenCapture, call
from algos.surgery import SurgeryError
from tests.models import tiny_bert_config


def bert():
    torch.manual_seed(0)
    return BertForMaskedLM(tiny_bert_config())


def unlabeled(count=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(5, 100, (4, 16), generator=generator),
             "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(count)]


def fnet_student(teacher):
    student = copy.deepcopy(teacher)
    apply_fnet_mixing(student, keep_attention_layers=[-1])
    return student


def weights(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_default_boundaries_are_the_transformer_layers():
    assert boundary_names(bert()) == [f"bert.encoder.layer.{i}" for i in range(4)]
    assert boundary_names(bert(), layers=r"bert\.encoder\.layer\.[13]") == ["bert.encoder.layer.1",
                                                                           "bert.encoder.layer.3"]
    assert boundary_names(bert(), layers=["layer.0"]) == ["bert.encoder.layer.0"]  # a '.suffix', outermost only


def test_loss_and_gradients_are_zero_when_the_student_is_the_teacher():
    student = bert()
    teacher = copy.deepcopy(student).eval()
    student.eval()  # no dropout in the config either; eval keeps both paths identical
    names = boundary_names(student)
    captures = [HiddenCapture(names), HiddenCapture(names)]
    captures[0].attach(student)
    captures[1].attach(teacher)
    batch = unlabeled(1)[0]
    with torch.no_grad():
        teacher_output = call(teacher, batch)
    loss = distillation_loss(call(student, batch), teacher_output, captures[0].outputs, captures[1].outputs,
                             DistillConfig(logit_weight=1.0, temperature=2.0))
    assert len(captures[0].outputs) == 4
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() < 1e-6 for p in student.parameters())
    assert any(p.grad is not None for p in student.parameters())


def test_gradients_reach_only_the_student():
    teacher = bert()
    student = fnet_student(teacher)
    before_teacher, before_student = weights(teacher), weights(student)
    history = distill(student, teacher, unlabeled(2), steps=3, lr=1e-3)
    assert len(history) == 3
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(value, before_teacher[key]) for key, value in teacher.state_dict().items())
    assert any(not torch.equal(value, before_student[key]) for key, value in student.state_dict().items())


def test_pure_distillation_on_unlabeled_batches_trains():
    teacher = bert()
    student = fnet_student(teacher)
    batches = unlabeled(2)
    assert "labels" not in batches[0]
    history = distill(student, teacher, batches, steps=30, lr=3e-3, task_weight=0.0)
    assert history[0] > 0 and history[-1] < 0.5 * history[0]


def test_task_loss_is_added_when_weighted():
    teacher = bert()
    student = copy.deepcopy(teacher)
    batch = {**unlabeled(1)[0]}
    batch["labels"] = batch["input_ids"].clone()
    (pure,) = distill(copy.deepcopy(student), teacher, [batch], steps=1)
    (with_task,) = distill(student, teacher, [batch], steps=1, task_weight=1.0)
    assert pure == pytest.approx(0.0, abs=1e-6) and with_task > 1.0  # the MLM loss of a random model, about ln(100)


class Features(nn.Module):
    """No module list and no logits: nothing a distillation could match."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return {"features": self.linear(x)}


@pytest.mark.parametrize("case", ["teacher_without_the_boundaries", "no_hidden_states_or_logits", "layers_name_nothing",
                                  "student_without_the_boundaries", "no_labels_for_the_task_loss"])
def test_bad_input_is_a_one_line_error_with_nothing_changed(case):
    student, batches, kwargs = bert(), unlabeled(1), {}
    teacher = copy.deepcopy(student)
    if case == "teacher_without_the_boundaries":
        teacher, message = nn.Sequential(nn.Linear(4, 4)), "the teacher has no module 'bert.encoder.layer.0'"
    elif case == "no_hidden_states_or_logits":
        student, batches = Features(), [torch.randn(2, 8)]
        teacher, message = copy.deepcopy(student), "no hidden states at matched boundaries and no logits"
    elif case == "layers_name_nothing":
        kwargs, message = {"layers": ["nowhere"]}, "layers=\\['nowhere'\\] names no module"
    elif case == "student_without_the_boundaries":
        torch.manual_seed(0)
        student = BertForMaskedLM(tiny_bert_config(num_hidden_layers=2))
        message = "the student has no module 'bert.encoder.layer.2'"
    else:
        kwargs, message = {"task_weight": 1.0}, "needs the model's own loss"
    before = weights(student)
    with pytest.raises(SurgeryError, match=message) as error:
        distill(student, teacher, batches, steps=2, **kwargs)
    assert "\n" not in str(error.value)
    assert all(torch.equal(value, before[key]) for key, value in student.state_dict().items())


@pytest.mark.parametrize(("kwargs", "message"), [({"temperature": 0}, "temperature=0 must be a number > 0"),
                                                 ({"hidden_weight": -1}, "hidden_weight=-1 must be"),
                                                 ({"hidden_weight": 0, "logit_weight": 0}, "nothing to distill"),
                                                 ({"steps": 0}, "steps=0 must be an int >= 1")])
def test_bad_settings_are_one_line_errors(kwargs, message):
    model = bert()
    with pytest.raises(SurgeryError, match=message):
        distill(model, copy.deepcopy(model), unlabeled(1), **{"steps": 1, **kwargs})
