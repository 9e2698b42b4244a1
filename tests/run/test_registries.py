"""Every registry entry builds, and what it builds fits together: models eat the batches the data registry makes
for their InputSpec; offline data is real and split; errors for data that is not there name the key."""

import pytest
import torch
from composer.core import Algorithm, Callback
from composer.loggers import LoggerDestination
from composer.optim import ComposerScheduler

from algos.run.components import ALGORITHMS, CALLBACKS, LOGGERS, OPTIMIZERS, SCHEDULERS, snake_case
from algos.run.data import DATA, python_docs_corpus
from algos.run.models import MODELS, InputSpec
from algos.run.registry import ConfigError

SMALL_MODELS = {
    "mlp": {"width": 32, "hidden": 64},
    "cifar_resnet": {"depth": 20},
    "resnet": {"arch": "resnet18", "num_classes": 10, "image_size": 64},
    "vit": {"num_layers": 1, "hidden_dim": 32, "mlp_dim": 64, "num_heads": 2},
    "bert_mlm": {"config": "tiny"},
    "bert_classifier": {"config": "tiny", "num_labels": 3},
}


def test_model_registry_is_what_we_test():
    assert MODELS.names() == sorted(SMALL_MODELS)


@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
def test_every_model_trains_a_step_on_synthetic_batches_of_its_spec(name):
    model = MODELS.build(name, SMALL_MODELS[name], "model")
    spec = model.input_spec
    train, evaluation = DATA.build("synthetic", {"batch_size": 4, "num_samples": 8, "seq_len": 16}, "data", spec=spec)
    batch = next(iter(train))
    outputs = model(batch)
    loss = model.loss(outputs, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)
    if spec.kind == "image":
        assert batch[0].shape == (4, *spec.shape) and outputs.shape == (4, spec.num_classes)
    elif spec.task == "mlm":
        assert outputs.logits.shape == (4, 16, spec.vocab_size) and (batch["labels"] != -100).any()
    else:
        assert outputs.logits.shape == (4, 3)


def test_bad_model_keys_name_the_valid_choices():
    with pytest.raises(ConfigError, match="model.depth=21: a CIFAR ResNet has depth 6n"):
        MODELS.build("cifar_resnet", {"depth": 21}, "model")
    with pytest.raises(ConfigError, match=r"model.arch='resnet9' is not a torchvision ResNet; valid: resnet101, "):
        MODELS.build("resnet", {"arch": "resnet9"}, "model")
    with pytest.raises(ConfigError, match="model.config='huge'; valid: base, tiny"):
        MODELS.build("bert_mlm", {"config": "huge"}, "model")


def test_digits_are_real_and_split_without_overlap():
    train, val = DATA.build("digits", {"batch_size": 32}, "data",
                            spec=InputSpec("image", shape=(1, 8, 8), num_classes=10))
    assert len(train.dataset) + len(val.dataset) == 1797 and len(val.dataset) == 359
    images, labels = next(iter(train))
    assert images.shape == (32, 1, 8, 8) and 0 <= images.min() and images.max() <= 1 and labels.max() <= 9
    train_rows = {tuple(x.flatten().tolist()) for x, _ in train.dataset}
    assert sum(tuple(x.flatten().tolist()) in train_rows for x, _ in val.dataset) < 10  # a few digits repeat
    rgb, _ = DATA.build("digits", {"channels": 3}, "data", spec=InputSpec("image", shape=(3, 8, 8), num_classes=10))
    x = next(iter(rgb))[0]
    assert torch.equal(x[:, 0], x[:, 2])
    with pytest.raises(ConfigError, match=r"gives 10 classes of \(1, 8, 8\) images; the model takes 10 classes of "
                                          r"\(3, 32, 32\)"):
        DATA.build("digits", {}, "data", spec=InputSpec("image", shape=(3, 32, 32), num_classes=10))


def test_offline_text_mlm_default_corpus_tokenizer_and_masking():
    spec = InputSpec("tokens", task="mlm", vocab_size=2000, max_length=64)
    train, val = DATA.build("text_mlm", {"seq_len": 64, "batch_size": 8}, "data", spec=spec)
    batch = next(iter(train))
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == (8, 64) and ids.max() < 2000
    masked = labels != -100
    assert 0.05 < masked.float().mean() < 0.3  # about 15% of tokens carry a label
    assert len(train.dataset) > 100 and len(val.dataset) >= 1 and len(python_docs_corpus()) > 50
    with pytest.raises(ConfigError, match="data.name='text_mlm' gives mlm token batches; the model wants image"):
        DATA.build("text_mlm", {}, "data", spec=InputSpec("image", shape=(1, 8, 8), num_classes=10))


def test_missing_datasets_say_how_to_get_them(tmp_path):
    image = InputSpec("image", shape=(3, 32, 32), num_classes=10)
    with pytest.raises(ConfigError, match=r"data.root='.*': CIFAR-10 not found there .*set data.download=true"):
        DATA.build("cifar10", {"root": str(tmp_path)}, "data", spec=image)
    with pytest.raises(ConfigError, match=r"data.path='.*': no train/ folder of class subfolders there"):
        DATA.build("imagenet", {"path": str(tmp_path)}, "data", spec=InputSpec("image", shape=(3, 224, 224)))
    with pytest.raises(ConfigError, match=r"data.task='sst3'; valid: cola, sst2, "):
        DATA.build("glue", {"task": "sst3"}, "data", spec=InputSpec("tokens", vocab_size=10, num_classes=2))
    with pytest.raises(ConfigError, match=r"data.files: .*nope.txt not found"):
        DATA.build("text_mlm", {"files": [str(tmp_path / "nope.txt")]}, "data",
                   spec=InputSpec("tokens", task="mlm", vocab_size=100, max_length=16))


# Keys without defaults, for the entries that have some.
REQUIRED = {
    "decoupled_sgdw": {"lr": 0.1}, "sgd": {"lr": 0.1},
    "constant_with_warmup": {"t_warmup": "1ba"}, "cosine_annealing_warm_restarts": {"t_0": "1ep"},
    "cosine_annealing_with_warmup": {"t_warmup": "1ba"}, "exponential": {"gamma": 0.9},
    "linear_with_warmup": {"t_warmup": "1ba"}, "multi_step": {"milestones": ["1ep"]},
    "multi_step_with_warmup": {"t_warmup": "1ba", "milestones": ["1ep"]}, "polynomial": {"power": 2.0},
    "polynomial_with_warmup": {"t_warmup": "1ba"}, "step": {"step_size": "1ep"},
    "alibi": {"max_sequence_length": 64}, "fff": {"depth": 3},
    "gradient_clipping": {"clipping_type": "norm", "clipping_threshold": 1.0},
    "stochastic_depth": {"target_layer_name": "ResNetBottleneck"},
    "early_stopper": {"monitor": "MulticlassAccuracy", "dataloader_label": "eval"},
    "threshold_stopper": {"monitor": "MulticlassAccuracy", "dataloader_label": "eval", "threshold": 0.9},
}


@pytest.mark.parametrize("registry, kind", [(OPTIMIZERS, torch.optim.Optimizer), (SCHEDULERS, object),
                                            (ALGORITHMS, Algorithm), (CALLBACKS, Callback),
                                            (LOGGERS, LoggerDestination)], ids=lambda x: getattr(x, "kind", ""))
def test_every_component_builds(registry, kind, tmp_path):
    context = {OPTIMIZERS: {"params": [torch.nn.Parameter(torch.zeros(2))]},
               LOGGERS: {"run_dir": str(tmp_path), "run_name": "t"}}.get(registry, {})
    for name in registry.names():
        built = registry.build(name, REQUIRED.get(name, {}), registry.kind, **context)
        assert isinstance(built, kind), name
        if registry is SCHEDULERS:
            assert isinstance(built, ComposerScheduler) or callable(built)


def test_component_names_and_errors():
    assert snake_case("DecoupledAdamW") == "decoupled_adamw" and snake_case("LRMonitor") == "lr_monitor"
    assert ALGORITHMS.get("factorize", "").__module__.startswith("algos")
    assert ALGORITHMS.get("composer_factorize", "").__module__.startswith("composer")
    with pytest.raises(ConfigError, match="algorithms.fff: unknown algorithm 'fft'; registered: .*fff, fnet"):
        ALGORITHMS.build("fft", {}, "algorithms.fff")
    with pytest.raises(ConfigError, match=r"^scheduler: missing key\(s\) 't_warmup' \(no default\)$"):
        SCHEDULERS.build("linear_with_warmup", {}, "scheduler")
    with pytest.raises(ConfigError, match=r"^algorithms.fff \(fff\): FFFReplace: depth=-1"):
        ALGORITHMS.build("fff", {"depth": -1}, "algorithms.fff")


def test_wandb_logger_is_offline_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    logger = LOGGERS.build("wandb", {"project": "p"}, "loggers.wandb", run_dir=str(tmp_path), run_name="r")
    assert logger._init_kwargs["mode"] == "offline" and logger._init_kwargs["dir"] == str(tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    online = LOGGERS.build("wandb", {}, "loggers.wandb", run_dir=str(tmp_path), run_name="r")
    assert online._init_kwargs["mode"] == "online"
