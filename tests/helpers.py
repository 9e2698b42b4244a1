"""Small models and data the algorithm tests share: a tiny HF BERT config and masked-LM model with a batch, a
ViT / TransformerEncoderLayer classifier with a batch, a loader that repeats one batch (so the loss must fall if
the model learns at all), and the helpers more than one test module uses (each marked with the module it came from)."""

import socket

import torch
import torch.nn.functional as F
import torchvision
from composer import Trainer
from composer.models import ComposerClassifier, HuggingFaceModel
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
)

import algos
from algos import FFF


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


# (moved from tests/surgery/test_composer.py)
def assert_same(a, b):
    weights_a, optim_a = a
    weights_b, optim_b = b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert len(optim_a) == len(optim_b)
    assert all(all(torch.equal(sa[k], sb[k]) for k in sa) for sa, sb in zip(optim_a, optim_b, strict=True))


# (moved from tests/surgery/test_composer.py)
def final_state(trainer):
    model = trainer.state.model
    optimizer = trainer.state.optimizers[0]
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [{k: v.clone() for k, v in optimizer.state[p].items()} for p in optimizer.param_groups[0]["params"]])


# (moved from tests/surgery/test_composer.py)
def make_trainer(model, dataloader, tmp_path, algorithms=(), load_path=None, logger=None, max_duration="4ba",
                 **kwargs):
    return Trainer(
        model=model,
        train_dataloader=dataloader,
        optimizers=torch.optim.Adam(model.parameters(), lr=1e-2),
        algorithms=list(algorithms),
        max_duration=max_duration,
        save_folder=str(tmp_path / "checkpoints"),
        save_interval="2ba",
        save_overwrite=True,
        load_path=load_path,
        loggers=[logger] if logger else [],
        device="cpu",
        seed=17,
        progress_bar=False,
        log_to_console=False,
        **kwargs,
    )


# (moved from tests/fnet/test_seq2seq.py)
def tiny_gpt2(layers=3):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)).eval()


# (moved from tests/fnet/test_seq2seq.py)
def tiny_bart(**overrides):
    torch.manual_seed(0)
    config = BartConfig(vocab_size=64, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                        dropout=0.0, attention_dropout=0.0, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                        decoder_start_token_id=2, forced_eos_token_id=None, **overrides)
    return BartForConditionalGeneration(config).eval()


# (moved from tests/surgery/test_copies.py)
def tiny_mlm_batch(seed: int = 1) -> dict:
    ids = torch.randint(5, 100, (4, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# (moved from tests/surgery/test_copies.py)
def tiny_bert_mlm() -> BertForMaskedLM:
    torch.manual_seed(0)
    return BertForMaskedLM(tiny_bert_config()).eval()


# (moved from tests/surgery/test_copies.py)
COPY_SURGERIES = {  # every surgery and the three-surgery combination, on tiny_bert_mlm()
    "factorize": lambda m: algos.apply_factorization(m, rank=0.5, min_features=1),
    "fff_neuron": lambda m: algos.apply_fff(m, depth=2, min_width=0),
    "fff_leaf": lambda m: algos.apply_fff(m, depth=2, form="leaf", leaf_width=8, min_width=0),
    "fnet": lambda m: algos.apply_fnet_mixing(m),
    "fnet_hybrid+fff+factorize": lambda m: (algos.apply_fnet_mixing(m, keep_attention_layers=[-1]),
                                            algos.apply_fff(m, depth=2, min_width=0),
                                            algos.apply_factorization(m, rank=0.25, min_features=1,
                                                                      target_modules=["query", "value"])),
}


# (moved from tests/fff/test_apply.py)
def two_blocks_one_easy(width=32, hidden=128):
    """Two MLP blocks of the same shape: in the first only 8 hidden neurons reach the output (a narrow leaf holds
    it), in the second every neuron does."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)) for _ in range(2)]
    with torch.no_grad():
        blocks[0][2].weight[:, 8:] = 0
    return nn.Sequential(*blocks)


# (moved from tests/fff/test_apply.py)
def trained_digits_mlp(hidden=64, steps=150):
    """A 64-hidden-64-10 MLP trained on the scikit-learn digits; returns it with its inputs."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return nn.Sequential(model), x, y


# (moved from tests/fff/test_tree.py)
def random_tree(form, depth, node="mirrored", seed=0, d_in=24, d_out=12):
    torch.manual_seed(seed)
    fff = FFF(d_in, d_out, depth, form=form, leaf_width=8, node=node)
    with torch.no_grad():
        fff.node_bias.normal_(0, 0.3)  # routing not through the origin, so the fast path's offsets are exercised
    return fff


# (moved from tests/factorize/test_apply.py)
def layers_that_stay_dense(**more: nn.Module) -> nn.ModuleDict:
    """One layer for each data-free rule (small, grouped, thin conv, tied head) and a "big" Linear, plus ``more``."""
    embedding = nn.Embedding(300, 300)
    head = nn.Linear(300, 300, bias=False)
    head.weight = embedding.weight
    return nn.ModuleDict({"small": nn.Linear(300, 16), "grouped": nn.Conv2d(300, 300, 3, groups=3),
                          "thin": nn.Conv2d(16, 300, 3), "embedding": embedding, "head": head,
                          "big": nn.Linear(300, 300), **more})


# (moved from tests/run/test_runner.py)
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# (moved from tests/surgery/test_composer.py: also run for Factorize with fitting)
def check_resume_is_bit_exact(composer_model_factory, train_dataloader, tmp_path, algorithm_class,
                              pass_algorithm_again):
    """Train 4 batches straight; resume from the batch-2 checkpoint (with ``algorithm_class()`` passed again or not)
    and from the resumed run's own checkpoint: the same architecture, weights and optimizer state, bit for bit."""
    straight = make_trainer(composer_model_factory(), train_dataloader, tmp_path, [algorithm_class()])
    straight.fit()
    expected = final_state(straight)
    expected_types = [type(m) for m in straight.state.model.module]

    again = [algorithm_class()] if pass_algorithm_again else []
    resumed = make_trainer(composer_model_factory(), train_dataloader, tmp_path / "resumed", again,
                           load_path=str(tmp_path / "checkpoints" / "ep0-ba2-rank0.pt"))
    assert [type(m) for m in resumed.state.model.module] == expected_types
    assert int(resumed.state.timestamp.batch) == 2
    resumed.fit()
    assert int(resumed.state.timestamp.batch) == 4
    assert_same(final_state(resumed), expected)
    # A checkpoint written by the resumed run records the surgery too: resume from it once more.
    twice = make_trainer(composer_model_factory(), train_dataloader, tmp_path / "twice",
                         load_path=str(tmp_path / "resumed" / "checkpoints" / "ep0-ba4-rank0.pt"), max_duration="4ba")
    assert [type(m) for m in twice.state.model.module] == expected_types
    assert_same(final_state(twice), expected)
