"""What the suite hands back carries nothing that breaks a copy (issue 23): after every surgery, functional or in a
Composer Trainer, and after healing, the model deep-copies, pickles and quantizes (torch's dynamic int8) like any
other, before and after its first forward, and the user's models keep their flags."""

import copy
import pickle

import pytest
import torch
from composer.models import HuggingFaceModel
from torch import nn
from transformers import BertForMaskedLM

import algos
from tests.helpers import COPY_SURGERIES, fixed_batches, make_trainer, tiny_bert_config, tiny_bert_mlm, tiny_mlm_batch


def hooks(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if m._forward_pre_hooks or m._forward_hooks or m._backward_hooks or m._backward_pre_hooks]


@pytest.mark.parametrize("surgery", COPY_SURGERIES)
def test_a_surgered_model_copies_and_pickles_before_and_after_its_first_forward(surgery):
    model = tiny_bert_mlm()
    COPY_SURGERIES[surgery](model)
    assert hooks(model) == []
    inputs = tiny_mlm_batch()
    before_first = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    expected = model(**inputs).logits
    for other in before_first:  # each copy runs on its own, in either order, and agrees
        assert torch.equal(other(**inputs).logits, expected)
    after_first = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    for other in reversed(after_first):
        assert torch.equal(other(**tiny_mlm_batch(2)).logits, model(**tiny_mlm_batch(2)).logits)
    assert hooks(model) == []


@pytest.mark.parametrize("surgery", COPY_SURGERIES)
def test_dynamic_int8_quantization_composes_with_every_surgery(surgery):
    """torch's one-line int8 (every nn.Linear, Factorize's pairs included) as a copy and in place: it runs, and stays
    close to the float surgered model (FFF trees and Fourier mixing stay float)."""
    model = tiny_bert_mlm()
    COPY_SURGERIES[surgery](model)
    inputs = tiny_mlm_batch()
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)  # a copy, first
    copy_output = quantized(**inputs).logits
    expected = model(**inputs).logits
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in quantized.modules())
    assert not any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())
    in_place = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    for result in (copy_output, in_place(**inputs).logits):
        cosine = nn.functional.cosine_similarity(result.flatten(1), expected.flatten(1)).min()
        assert cosine > 0.99, float(cosine)


def test_nothing_stays_on_the_model_after_a_composer_run_with_surgery_and_healing(tmp_path):
    """Surgery at INIT and mid-run (MACs measured on the next batch, then logged) and SelfDistillation from a
    teacher the user passes: the trained model holds no hook and pickles; the user's teacher keeps its flags."""
    torch.manual_seed(0)
    model = HuggingFaceModel(BertForMaskedLM(tiny_bert_config()), use_logits=True)
    ids = torch.randint(5, 100, (8, 16), generator=torch.Generator().manual_seed(3))
    labels = torch.where(torch.arange(16) % 3 == 0, ids, -100)
    teacher = copy.deepcopy(model).train()
    distillation = algos.SelfDistillation(teacher=teacher, task_weight=1.0)
    surgeries = [algos.FNetMixing(keep_attention_layers=[-1]), algos.FFFReplace(depth=2, min_width=0, apply_at="1ba")]
    trainer = make_trainer(model, fixed_batches({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                 "labels": labels}), tmp_path, [*surgeries, distillation],
                           max_duration="3ba")
    trainer.fit()
    assert all(report.measured and report.totals()["macs_after"] for s in surgeries for report in s.reports)
    assert hooks(trainer.state.model) == [] and hooks(teacher) == []
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    copied = pickle.loads(pickle.dumps(trainer.state.model.model)).eval()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert torch.equal(copied(**inputs).logits, trainer.state.model.model.eval()(**inputs).logits)
    trainer.close()


def test_distill_leaves_the_teacher_and_the_students_modes_as_they_were():
    teacher = tiny_bert_mlm().train()
    student = copy.deepcopy(teacher)
    algos.apply_fnet_mixing(student, keep_attention_layers=[-1])
    student.eval()
    weights = {key: value.clone() for key, value in teacher.state_dict().items()}
    algos.distill(student, teacher, [tiny_mlm_batch()], steps=2, lr=1e-3)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(value, weights[key]) for key, value in teacher.state_dict().items())
    assert not student.training and hooks(student) == [] and hooks(teacher) == []
    second = copy.deepcopy(teacher)  # the same teacher heals a second surgery (it failed: no parameter to train)
    algos.apply_factorization(second, rank=0.5, min_features=1)
    assert len(algos.distill(second, teacher, [tiny_mlm_batch()], steps=1, lr=1e-3)) == 1
    second.requires_grad_(False)
    with pytest.raises(algos.heal.DistillError, match=r"^SelfDistillation: the student has no parameter with "
                                                         r"requires_grad=True, so there is nothing to train"):
        algos.distill(second, teacher, [tiny_mlm_batch()], steps=1)
