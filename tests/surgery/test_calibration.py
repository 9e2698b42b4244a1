"""Calibration reads real tokens only: padding positions carry hidden states nothing reads, so a surgery calibrated on
a padded batch must give the same model as one calibrated on the same sentences unpadded."""

import copy

import pytest
import torch
from transformers import BertModel

from algos import apply_factorization, apply_fff
from tests.helpers import tiny_bert_config


def padded_and_unpadded(lengths=(11, 4, 7), width=12):
    """The same sentences as one padded batch (pad id 0, attention mask) and as one unpadded batch each."""
    torch.manual_seed(0)
    sentences = [torch.randint(5, 100, (length,)) for length in lengths]
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sentence in enumerate(sentences):
        ids[row, :len(sentence)], mask[row, :len(sentence)] = sentence, 1
    alone = [{"input_ids": s[None], "attention_mask": torch.ones(1, len(s), dtype=torch.long)} for s in sentences]
    return {"input_ids": ids, "attention_mask": mask}, alone


@pytest.mark.parametrize(("apply", "settings"), [
    (apply_fff, dict(form="leaf", depth=1, leaf_width=16, init="dense", min_width=0)),
    (apply_fff, dict(form="leaf", depth=1, leaf_width=16, init="dense", min_width=0, sequential=True)),
    (apply_factorization, dict(rank=8, init="activation", min_features=0)),
    (apply_factorization, dict(rank=8, init="svd", min_features=0, fit_steps=5)),
], ids=["fff", "fff-sequential", "factorize-activation", "factorize-fit"])
def test_a_padded_batch_calibrates_as_its_sentences_do_unpadded(apply, settings):
    torch.manual_seed(0)
    # float64: the fits make discrete choices (FFF's split of the neurons, the hold-out check) that float32's
    # summation order, which differs between a padded batch and its sentences alone and between CPUs, can flip
    original = BertModel(tiny_bert_config()).double().eval()
    padded, alone = padded_and_unpadded()
    models = []
    for calibration in ([padded], alone):
        model = copy.deepcopy(original)
        apply(model, calibration=calibration, **settings)
        models.append(model.eval())
    with torch.no_grad():
        outputs = [model(**padded).last_hidden_state[padded["attention_mask"].bool()] for model in models]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-3, atol=1e-4)
    with torch.no_grad():  # and the surgery changed the model (the comparison is not between two originals)
        before = original(**padded).last_hidden_state[padded["attention_mask"].bool()]
    assert (outputs[0] - before).abs().max() > 1e-4
