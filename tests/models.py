"""Small models and data the algorithm tests share: a tiny HF BERT config and masked-LM model with a batch, a
ViT / TransformerEncoderLayer classifier with a batch, and a loader that repeats one batch (so the loss must fall if
the model learns at all)."""

import torch
import torchvision
from composer.models import ComposerClassifier, HuggingFaceModel
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForMaskedLM


def tiny_bert_config(**overrides):
    values = dict(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertConfig(**{**values, **overrides})


def tiny_mlm_and_batch():
    """A tiny HF BERT for masked LM (Composer-wrapped) and one batch with every third token as a label."""
    torch.manual_seed(0)
    model = HuggingFaceModel(BertForMaskedLM(tiny_bert_config()), use_logits=True)
    ids = torch.randint(5, 100, (8, 16))
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def losses_of(logger):
    return [value for _, value in logger.data["loss/train/total"]]


def fixed_batches(batch):
    """One batch per epoch, the same each time: the loss must go down when the model can learn at all."""
    if isinstance(batch, dict):
        size = len(next(iter(batch.values())))
        return DataLoader([{key: value[i] for key, value in batch.items()} for i in range(size)], batch_size=size)
    return DataLoader(TensorDataset(*batch), batch_size=len(batch[0]))


def classifier_and_batch(kind):
    torch.manual_seed(0)
    if kind == "vit":
        net = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2,
                                                   hidden_dim=32, mlp_dim=64, num_classes=4)
        inputs = torch.randn(16, 3, 16, 16)
    else:
        net = nn.Sequential(nn.Linear(8, 32), nn.TransformerEncoder(
            nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False),
            nn.Flatten(), nn.Linear(32 * 6, 4))
        inputs = torch.randn(16, 6, 8)
    return ComposerClassifier(net, num_classes=4), (inputs, torch.randint(0, 4, (16,)))
