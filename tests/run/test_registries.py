"""Every registry entry builds, and what it builds fits together: models eat the batches the data registry makes
for their InputSpec; offline data is real and split; errors for data that is not there name the key."""

import pytest
import torch
from composer.core import Algorithm, Callback
from composer.loggers import LoggerDestination
from composer.optim import ComposerScheduler

from algos.run.components import ALGORITHMS, CALLBACKS, LOGGERS, OPTIMIZERS, SCHEDULERS, snake_case
from algos.run.data import DATA, corrupt_spans, python_docs_corpus
from algos.run.models import EOS_ID, MODELS, PAD_ID, InputSpec, token_counter
from algos.run.registry import ConfigError
from algos.surgery.yaml_names import YAML_NAMES, yaml_name

SMALL_MODELS = {
    "mlp": {"width": 32, "hidden": 64},
    "cifar_resnet": {"depth": 20},
    "resnet": {"arch": "resnet18", "num_classes": 10, "image_size": 64},
    "vit": {"num_layers": 1, "hidden_dim": 32, "mlp_dim": 64, "num_heads": 2},
    "bert_mlm": {"config": "tiny"},
    "bert_classifier": {"config": "tiny", "num_labels": 3},
    "seq2seq": {"arch": "t5", "config": "tiny", "vocab_size": 512},
    "prefix_lm": {"config": "tiny", "vocab_size": 512},
    "sentence_encoder": {"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                    "intermediate_size": 64, "vocab_size": 512}},
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
    elif spec.task in ("mlm", "causal_lm"):
        assert outputs.logits.shape == (4, 16, spec.vocab_size) and (batch["labels"] != -100).any()
    elif spec.task == "seq2seq":
        assert outputs.logits.shape == (4, 4, spec.vocab_size)
    elif spec.task == "embedding":  # no labels; the embeddings are unit vectors
        assert "labels" not in batch and outputs.last_hidden_state.shape == (4, 16, 32)
        torch.testing.assert_close(model.embeddings(outputs, batch).norm(dim=1), torch.ones(4))
    else:
        assert outputs.logits.shape == (4, 3)


def test_bad_model_keys_name_the_valid_choices():
    with pytest.raises(ConfigError, match="model.depth=21: a CIFAR ResNet has depth 6n"):
        MODELS.build("cifar_resnet", {"depth": 21}, "model")
    with pytest.raises(ConfigError, match=r"model.arch='resnet9' is not a torchvision ResNet; valid: resnet101, "):
        MODELS.build("resnet", {"arch": "resnet9"}, "model")
    with pytest.raises(ConfigError, match="model.config='huge'; valid: base, tiny"):
        MODELS.build("bert_mlm", {"config": "huge"}, "model")
    with pytest.raises(ConfigError, match="model.arch='gpt'; valid: bart, t5"):
        MODELS.build("seq2seq", {"arch": "gpt"}, "model")
    with pytest.raises(ConfigError, match="model.config='base'; valid: small, tiny or a mapping of GPT2Config fields"):
        MODELS.build("prefix_lm", {"config": "base"}, "model")


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
    # training masks are drawn afresh each batch; the held-out masks are fixed, across evaluations and builds
    row = train.dataset[0]
    assert not torch.equal(train.collate_fn([row])["labels"], train.collate_fn([row])["labels"])
    held_out = next(iter(val))
    assert 0.05 < (held_out["labels"] != -100).float().mean() < 0.3
    again = next(iter(DATA.build("text_mlm", {"seq_len": 64, "batch_size": 8}, "data", spec=spec)[1]))
    assert all(torch.equal(held_out[key], next(iter(val))[key]) and torch.equal(held_out[key], again[key])
               for key in ("input_ids", "labels"))
    with pytest.raises(ConfigError, match="data.name='text_mlm' gives mlm token batches; the model wants image"):
        DATA.build("text_mlm", {}, "data", spec=InputSpec("image", shape=(1, 8, 8), num_classes=10))


def test_span_corruption_pairs_rebuild_the_text():
    """Interleaving the source's kept runs with the target's spans, sentinel by sentinel, gives the row back."""
    generator = torch.Generator().manual_seed(1)
    sentinels = [1000, 1001, 1002, 1003]
    for length in (2, 9, 40, 128):
        row = list(range(10, 10 + length))
        source, target = corrupt_spans(row, sentinels, 0.15, 3.0, generator)
        assert source[-1] == target[-1] == EOS_ID
        used = [t for t in source if t in sentinels]
        assert used == sentinels[:len(used)] and [t for t in target if t in sentinels] == used
        rebuilt, spans, current = [], {}, None
        for token in target[:-1]:
            current = token if token in sentinels else current
            if token not in sentinels:
                spans.setdefault(current, []).append(token)
        for token in source[:-1]:
            rebuilt += spans.get(token, []) if token in sentinels else [token]
        assert rebuilt == row
        noise = len(target) - 1 - len(used)
        assert noise == min(length - 1, max(1, round(length * 0.15)))


@pytest.mark.parametrize("task", ["seq2seq", "causal_lm"])
def test_span_corruption_batches_for_both_model_kinds(task):
    spec = InputSpec("tokens", task=task, vocab_size=2000, max_length=256)
    train, val = DATA.build("span_corruption", {"seq_len": 64, "batch_size": 8}, "data", spec=spec)
    batch = next(iter(train))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.max() < 2000 and len(train.dataset) > 100 and len(val.dataset) >= 1
    assert (ids[mask == 0] == PAD_ID).all()
    assert any((b["attention_mask"] == 0).any() for b in train)  # documents' last rows are shorter: padding
    targets = labels != -100
    if task == "seq2seq":
        assert labels.shape[0] == 8 and 0.1 < targets.sum() / mask.sum() < 0.5  # 15% noise plus sentinels
        assert token_counter(spec)(batch) == int(mask.sum() + targets.sum())
    else:
        assert labels.shape == ids.shape and torch.equal(labels[targets], ids[targets])
        first_target = targets.int().argmax(1)
        assert (first_target > 0).all()  # a prefix (the source) before every target
        assert token_counter(spec)(batch) == int(mask.sum())
    with pytest.raises(ConfigError, match="data.seq_len=300 makes sequences of up to .* tokens; the model takes 256"):
        DATA.build("span_corruption", {"seq_len": 300}, "data", spec=spec)
    with pytest.raises(ConfigError, match="gives seq2seq or causal_lm token batches; the model wants tokens \\(mlm\\)"):
        DATA.build("span_corruption", {}, "data", spec=InputSpec("tokens", task="mlm", vocab_size=2000))


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
    with pytest.raises(ConfigError, match=rf"^data.files: '{tmp_path}' is a folder; list the text files in it"):
        DATA.build("text_mlm", {"files": [str(tmp_path)]}, "data",
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
    with pytest.raises(ConfigError,
                       match="algorithms.fff: unknown algorithm 'fft'; registered: .*fff, fff_training, fnet"):
        ALGORITHMS.build("fft", {}, "algorithms.fff")
    with pytest.raises(ConfigError, match=r"^scheduler: missing key\(s\) 't_warmup' \(no default\)$"):
        SCHEDULERS.build("linear_with_warmup", {}, "scheduler")
    with pytest.raises(ConfigError, match=r"^algorithms.fff \(fff\): FFFReplace: depth=-1"):
        ALGORITHMS.build("fff", {"depth": -1}, "algorithms.fff")


def test_each_algorithm_registers_its_yaml_name_from_its_own_package():
    import algos

    expected = {"factorize": algos.Factorize, "fff": algos.FFFReplace, "fff_training": algos.FFFTraining,
                "fnet": algos.FNetMixing, "swap_linear": algos.SwapLinear, "self_distillation": algos.SelfDistillation}
    assert YAML_NAMES == expected
    assert all(ALGORITHMS.get(name, "") is cls for name, cls in expected.items())
    with pytest.raises(ValueError, match="YAML name 'fff' is taken by algos.fff.algorithm.FFFReplace"):
        yaml_name("fff")(type("MyTree", (), {}))
    assert YAML_NAMES == expected


def test_empty_image_folders_and_unreachable_hub_names_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "train" / "n01440764").mkdir(parents=True)  # a class folder without images
    (tmp_path / "val").mkdir()
    with pytest.raises(ConfigError, match=r"^data.path='.*': train/ has no class subfolders with images \(expected "
                                          r"train/<class>/\*.JPEG\)$"):
        DATA.build("imagenet", {"path": str(tmp_path)}, "data", spec=InputSpec("image", shape=(3, 224, 224)))
    spec = InputSpec("tokens", vocab_size=30522, num_classes=2)
    with pytest.raises(ConfigError, match=r"^data.tokenizer='.*val': no tokenizer there \(.{20,130}\)$"):
        DATA.build("glue", {"tokenizer": str(tmp_path / "val")}, "data", spec=spec)  # a local folder, no tokenizer
    # What HF raises offline when the name is not in its cache (transformers: OSError; datasets: ConnectionError).
    import datasets
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in "
                      "the cached files.\nCheck your internet connection or see ...")

    def dataset_offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(transformers.BertForSequenceClassification, "from_pretrained", offline)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    monkeypatch.setattr(datasets, "load_dataset", dataset_offline)
    with pytest.raises(ConfigError, match=r"^model.pretrained='bert-base-uncased': could not load this model "
                                          r"\(OSError: We couldn't connect to 'https://huggingface.co' .*\); a hub "
                                          r"name needs the network \(or the HF cache\): offline, point "
                                          r"model.pretrained=PATH at a local copy$"):
        MODELS.build("bert_classifier", {"pretrained": "bert-base-uncased"}, "model")
    with pytest.raises(ConfigError, match=r"^data.tokenizer='bert-base-uncased': could not load this tokenizer .*; "
                                          r"a hub name needs the network .*point data.tokenizer=PATH at a local copy$"):
        DATA.build("glue", {}, "data", spec=spec)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: ["a tokenizer"])
    with pytest.raises(ConfigError, match=r"^data.task: could not load the HF dataset 'glue/sst2' \(ConnectionError: "
                                          r"Couldn't reach 'glue' on the Hub .*\); it needs the network \(or the HF "
                                          r"datasets cache\)$"):
        DATA.build("glue", {}, "data", spec=spec)


def test_wandb_logger_is_offline_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    logger = LOGGERS.build("wandb", {"project": "p"}, "loggers.wandb", run_dir=str(tmp_path), run_name="r")
    assert logger._init_kwargs["mode"] == "offline" and logger._init_kwargs["dir"] == str(tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    online = LOGGERS.build("wandb", {}, "loggers.wandb", run_dir=str(tmp_path), run_name="r")
    assert online._init_kwargs["mode"] == "online"
