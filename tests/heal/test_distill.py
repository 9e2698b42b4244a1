"""The functional ``distill`` and its loss on a tiny HF BERT: zero at the teacher, gradients only to the student,
pure distillation without labels, and one-line errors before anything changes."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertForMaskedLM, BertModel

from algos import apply_fnet_mixing, distill
from algos.heal import DistillConfig, DistillError, DistillLoop, boundary_names, distillation_loss
from algos.heal.capture import HiddenCapture
from algos.heal.distill import learning_rate_schedule
from algos.heal.loss import sentence_embeddings
from algos.surgery.batches import call_model as call
from tests.helpers import tiny_bert_config


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


def test_embedding_term_is_one_minus_the_cosine_of_mean_pooled_sentence_embeddings():
    torch.manual_seed(0)
    teacher = BertModel(tiny_bert_config()).eval()
    student = fnet_student(teacher).eval()
    batch = unlabeled(1)[0]
    batch["attention_mask"][:, 11:] = 0  # padded rows: the pads must not count
    batch["attention_mask"][0, 5:] = 0
    with torch.no_grad():
        student_output, teacher_output = call(student, batch), call(teacher, batch)
        loss = distillation_loss(student_output, teacher_output, {}, {},
                                 DistillConfig(hidden_weight=0, logit_weight=0, embedding_weight=2.0), batch)
    # reference: sentence-transformers' pooling, one sentence at a time (the mean of its real tokens' states), then
    # the cosine of the unit vectors
    def pooled(hidden):
        rows = zip(hidden, batch["attention_mask"], strict=True)
        return torch.stack([F.normalize(h[m.bool()].mean(0), dim=0) for h, m in rows])
    cosine = (pooled(student_output.last_hidden_state) * pooled(teacher_output.last_hidden_state)).sum(-1)
    assert loss.item() == pytest.approx(2.0 * (1 - cosine).mean().item(), rel=1e-5)
    assert loss.item() > 1e-3
    pads_changed = {**batch, "input_ids": batch["input_ids"].clone()}
    pads_changed["input_ids"][:, 11:] = 7  # the pads do not count: BERT's embeddings of the real tokens are unchanged
    with torch.no_grad():
        assert torch.allclose(sentence_embeddings(call(teacher, pads_changed), pads_changed),
                              sentence_embeddings(teacher_output, batch), atol=1e-5)


def test_similarity_term_is_the_mse_of_the_pairwise_cosines_of_sentence_embeddings():
    torch.manual_seed(0)
    teacher = BertModel(tiny_bert_config()).eval()
    student = fnet_student(teacher).eval()
    batch = unlabeled(1)[0]
    batch["attention_mask"][1, 6:] = 0
    config = DistillConfig(hidden_weight=0, logit_weight=0, embedding_weight=0, similarity_weight=3.0)
    with torch.no_grad():
        student_output, teacher_output = call(student, batch), call(teacher, batch)
        loss = distillation_loss(student_output, teacher_output, {}, {}, config, batch)
        same = distillation_loss(teacher_output, teacher_output, {}, {}, config, batch)
        one = {key: value[:1] for key, value in batch.items()}
        single = distillation_loss(call(student, one), call(teacher, one), {}, {}, config, one)

    # reference: the full matrix of cosines between the mean-pooled sentences, its strictly upper triangle
    def similarities(output):
        e = sentence_embeddings(output, batch)
        return F.cosine_similarity(e[:, None], e[None], dim=-1)[tuple(torch.triu_indices(4, 4, offset=1))]
    expected = 3.0 * (similarities(student_output) - similarities(teacher_output)).square().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and loss.item() > 1e-5
    assert same.item() == 0 and single.item() == 0  # the teacher's own geometry; a single sentence has no pair
    # the term reads directions only: scaling one sentence's states leaves it unchanged
    scaled = copy.copy(student_output)
    scaled.last_hidden_state = student_output.last_hidden_state * torch.tensor([1.0, 5.0, 1.0, 0.5])[:, None, None]
    assert distillation_loss(scaled, teacher_output, {}, {}, config, batch).item() == pytest.approx(loss.item(),
                                                                                                   rel=1e-5)


def test_similarity_only_distillation_trains():
    torch.manual_seed(0)
    teacher = BertModel(tiny_bert_config())
    student = fnet_student(teacher)
    history = distill(student, teacher, unlabeled(2), steps=30, lr=3e-3, hidden_weight=0, embedding_weight=0,
                      similarity_weight=10.0)
    assert history[0] > 0 and history[-1] < 0.5 * history[0]


def test_embedding_only_distillation_trains():
    torch.manual_seed(0)
    teacher = BertModel(tiny_bert_config())
    student = fnet_student(teacher)
    history = distill(student, teacher, unlabeled(2), steps=30, lr=3e-3, hidden_weight=0, embedding_weight=1.0)
    assert history[0] > 0 and history[-1] < 0.5 * history[0]


@pytest.mark.filterwarnings("ignore:The epoch parameter")  # SequentialLR warns inside torch
@pytest.mark.parametrize("warmup", [0, 1, 5])
@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rate_schedule_is_warm_up_then_decay(schedule, warmup):
    """torch's schedulers as chained by distill, against the equation in learning_rate_schedule's docstring."""
    steps, lr = 20, 0.5
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = learning_rate_schedule(optimizer, DistillLoop(steps=steps, schedule=schedule, warmup_steps=warmup))
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / (steps - warmup)
        return {"constant": 1.0, "linear": 1 - progress, "cosine": (1 + math.cos(math.pi * progress)) / 2}[schedule]
    assert seen == pytest.approx([lr * factor(step) for step in range(steps)], abs=1e-6)


def test_callback_sees_every_step_and_schedule_is_applied():
    teacher = bert()
    student = fnet_student(teacher)
    seen = []
    history = distill(student, teacher, unlabeled(2), steps=4, lr=1e-3, schedule="linear", warmup_steps=1,
                      callback=lambda step, loss: seen.append((step, loss)))
    assert seen == list(enumerate(history, start=1))


class Features(nn.Module):
    """No module list and no logits: nothing a distillation could match."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return {"features": self.linear(x)}


@pytest.mark.parametrize("case", ["teacher_without_the_boundaries", "no_hidden_states_or_logits", "layers_name_nothing",
                                  "student_without_the_boundaries", "no_labels_for_the_task_loss",
                                  "embedding_without_a_final_hidden_state", "similarity_without_embeddings"])
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
    elif case == "embedding_without_a_final_hidden_state":
        student, batches = Features(), [torch.randn(2, 8)]
        teacher = copy.deepcopy(student)
        kwargs, message = {"embedding_weight": 1.0}, "embedding_weight=1.0 needs a final hidden state"
    elif case == "similarity_without_embeddings":
        student, batches = Features(), [torch.randn(2, 8)]
        teacher = copy.deepcopy(student)
        kwargs, message = {"similarity_weight": 1.0}, "similarity_weight > 0 needs sentence embeddings"
    else:
        kwargs, message = {"task_weight": 1.0}, "needs the model's own loss"
    before = weights(student)
    with pytest.raises(DistillError, match=message) as error:
        distill(student, teacher, batches, steps=2, **kwargs)
    assert "\n" not in str(error.value)
    assert all(torch.equal(value, before[key]) for key, value in student.state_dict().items())


@pytest.mark.parametrize(("kwargs", "message"), [({"temperature": 0}, "temperature=0 must be a number > 0"),
                                                 ({"hidden_weight": -1}, "hidden_weight=-1 must be"),
                                                 ({"similarity_weight": -1}, "similarity_weight=-1 must be"),
                                                 ({"hidden_weight": 0, "logit_weight": 0, "embedding_weight": 0},
                                                  "nothing to distill"),
                                                 ({"hidden_weight": 0, "layers": ["bert.encoder.layer.0"]},
                                                  r"layers=\['bert.encoder.layer.0'\] has no effect with "
                                                  r"hidden_weight=0"),
                                                 ({"steps": 0}, "steps=0 must be an int >= 1"),
                                                 ({"schedule": "step"}, "schedule='step' is not one of 'constant'"),
                                                 ({"warmup_steps": 1}, r"warmup_steps=1 must be an int in \[0, "
                                                                       r"steps=1\)")])
def test_bad_settings_are_one_line_errors(kwargs, message):
    model = bert()
    with pytest.raises(DistillError, match=message):
        distill(model, copy.deepcopy(model), unlabeled(1), **{"steps": 1, **kwargs})


def test_the_defaults_are_the_measured_recipe_with_the_embedding_term_for_an_encoder():
    """distill(student, teacher, batches, steps=N) alone is lr 7e-4, cosine decay after a 5% warm-up, and for an
    encoder (an output with last_hidden_state, no logits) the sentence-embedding term on: the same losses, step for
    step, as those settings spelled out; a model with logits (MLM) keeps the term off."""
    torch.manual_seed(0)
    encoder = BertModel(tiny_bert_config())
    student = fnet_student(encoder)
    spelled = distill(copy.deepcopy(student), encoder, unlabeled(2), steps=40, lr=7e-4, schedule="cosine",
                      warmup_steps=2, embedding_weight=1.0)
    assert distill(copy.deepcopy(student), encoder, unlabeled(2), steps=40) == pytest.approx(spelled, rel=1e-6)
    without = distill(copy.deepcopy(student), encoder, unlabeled(2), steps=40, lr=7e-4, schedule="cosine",
                      warmup_steps=2, embedding_weight=0.0)
    assert without[0] < spelled[0] - 1e-4  # the term adds to the loss: it was on
    teacher = bert()
    student = fnet_student(teacher)
    spelled = distill(copy.deepcopy(student), teacher, unlabeled(2), steps=3, lr=7e-4, schedule="cosine",
                      warmup_steps=0, embedding_weight=0.0)
    assert distill(student, teacher, unlabeled(2), steps=3) == pytest.approx(spelled, rel=1e-6)


def test_embedding_weight_none_on_a_model_with_logits_and_no_other_weight_says_why_nothing_is_distilled():
    model = bert()
    with pytest.raises(DistillError, match=r"embedding_weight=None leaves the embedding term off .*nothing to "
                                           r"distill; set embedding_weight or another weight > 0\.$"):
        distill(model, copy.deepcopy(model), unlabeled(1), steps=1, hidden_weight=0, logit_weight=0)


def test_hidden_and_logit_terms_count_real_tokens_only():
    torch.manual_seed(0)
    teacher = bert().eval()
    student = fnet_student(teacher).eval()
    names = boundary_names(student)
    captures = [HiddenCapture(names), HiddenCapture(names)]
    captures[0].attach(student)
    captures[1].attach(teacher)
    batch = unlabeled(1)[0]
    batch["attention_mask"][:, 9:] = 0
    batch["attention_mask"][0, 4:] = 0
    real = batch["attention_mask"].bool()
    config = DistillConfig(hidden_weight=1.0, logit_weight=0.0, embedding_weight=0.0)
    with torch.no_grad():
        student_output, teacher_output = call(student, batch), call(teacher, batch)
        loss = distillation_loss(student_output, teacher_output, captures[0].outputs, captures[1].outputs, config,
                                 batch)
        # reference: the MSE over the real tokens' rows of each boundary, averaged over the boundaries
        mse = [((captures[0].outputs[n][real] - captures[1].outputs[n][real]) ** 2).mean() for n in names]
        assert loss.item() == pytest.approx(torch.stack(mse).mean().item(), rel=1e-5)
        everywhere = [((captures[0].outputs[n] - captures[1].outputs[n]) ** 2).mean() for n in names]
        assert abs(loss.item() - torch.stack(everywhere).mean().item()) > 1e-3 * loss.item()
        logits_only = DistillConfig(hidden_weight=0.0, logit_weight=1.0, embedding_weight=0.0, temperature=1.0)
        kl = distillation_loss(student_output, teacher_output, {}, {}, logits_only, batch)
        s = torch.log_softmax(student_output.logits[real], -1)
        t = torch.log_softmax(teacher_output.logits[real], -1)
        assert kl.item() == pytest.approx((t.exp() * (t - s)).sum(-1).mean().item(), rel=1e-4)
