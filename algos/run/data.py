"""The data registry: a name in ``data.name`` -> ``(train_dataloader, eval_dataloader)`` for the model built.

Each builder gets the model's ``InputSpec`` (``spec``) besides its config keys. Offline: ``digits`` (images
shipped with scikit-learn), ``text_mlm``, ``span_corruption`` and ``sentences`` with their default corpus (Python's
own reference documentation, shipped with every Python), ``synthetic``. Needing the network or a local copy: ``cifar10``
(torchvision), ``imagenet`` (an image folder), ``glue`` and the text builders with ``dataset=`` (HF datasets).
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import torch
from composer.utils import dist
from torch.utils.data import DataLoader, Dataset, TensorDataset

from algos.run.models import EOS_ID, PAD_ID, TEXT_SPECIAL_TOKENS, InputSpec, needs_network
from algos.run.registry import ConfigError, Registry

DATA = Registry("data")


def _loaders(train: Dataset, val: Dataset, batch_size: int, eval_batch_size: int | None = None,
             num_workers: int = 0, collate_fn=None) -> tuple[DataLoader, DataLoader]:
    """Composer-ready loaders: a distributed sampler each (so DDP splits the data), shuffled for training."""
    common = dict(num_workers=num_workers, collate_fn=collate_fn, persistent_workers=num_workers > 0)
    return (DataLoader(train, batch_size=batch_size, sampler=dist.get_sampler(train, shuffle=True), drop_last=True,
                       **common),
            DataLoader(val, batch_size=eval_batch_size or batch_size, sampler=dist.get_sampler(val, shuffle=False),
                       **common))


def _check_image_spec(spec: InputSpec, shape: tuple[int, ...], num_classes: int, name: str) -> None:
    if spec.kind != "image":
        raise ConfigError(f"data.name={name!r} gives images; the model wants {spec.kind} ({spec.task})")
    if tuple(spec.shape) != tuple(shape) or spec.num_classes != num_classes:
        raise ConfigError(f"data.name={name!r} gives {num_classes} classes of {tuple(shape)} images; the model "
                          f"takes {spec.num_classes} classes of {tuple(spec.shape)} (set the model's keys to match)")


@DATA.register("digits")
def digits(*, spec: InputSpec | None = None, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0,
           channels: int = 1) -> tuple[DataLoader, DataLoader]:
    """UCI handwritten digits (1,797 8x8 grey images, 10 classes), shipped inside scikit-learn: real data, no
    network. A fixed ``seed`` split; ``channels=3`` repeats the grey channel (for RGB-only models)."""
    from sklearn.datasets import load_digits

    if spec is not None:
        _check_image_spec(spec, (channels, 8, 8), 10, "digits")
    loaded = load_digits()
    images = torch.tensor(loaded.images, dtype=torch.float32).unsqueeze(1).repeat(1, channels, 1, 1) / 16.0
    labels = torch.tensor(loaded.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(labels) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return _loaders(TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val]), batch_size)


def digits_dataloaders(batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0):
    """(train, val) digits loaders of ``(image (1, 8, 8) in [0, 1], label)`` (used by ``algos demo``)."""
    return digits(batch_size=batch_size, val_fraction=val_fraction, seed=seed)


@DATA.register("synthetic")
def synthetic(*, spec: InputSpec, batch_size: int = 8, num_samples: int = 64, seq_len: int = 128,
              seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Random batches shaped for the model (smoke runs, CI): images with labels, or token ids with masked-LM /
    class labels (none for a sentence encoder). Learns nothing; its metrics mean nothing."""
    generator = torch.Generator().manual_seed(seed)
    if spec.kind == "image":
        def make(n):
            return TensorDataset(torch.rand(n, *spec.shape, generator=generator),
                                 torch.randint(spec.num_classes, (n,), generator=generator))
        return _loaders(make(num_samples), make(max(batch_size, num_samples // 4)), batch_size)
    length = min(seq_len, spec.max_length)

    def make_tokens(n):
        ids = torch.randint(5, spec.vocab_size, (n, length), generator=generator)
        if spec.task == "embedding":  # a sentence encoder: no labels
            return _DictDataset(input_ids=ids, attention_mask=torch.ones_like(ids))
        if spec.task == "seq2seq":
            labels = ids[:, : max(1, length // 4)].clone()
        elif spec.task == "causal_lm":
            labels = torch.where(torch.arange(length) < length // 2, -100, ids)  # the first half is the prefix
        elif spec.task == "mlm":
            labels = torch.where(torch.rand(n, length, generator=generator) < 0.15, ids, -100)
            labels[:, 0] = ids[:, 0]  # at least one label per row
        else:
            labels = torch.randint(spec.num_classes, (n,), generator=generator)
        return _DictDataset(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    return _loaders(make_tokens(num_samples), make_tokens(max(batch_size, num_samples // 4)), batch_size)


class _DictDataset(Dataset):
    """Rows of equally long tensors as dicts (what HF models take)."""

    def __init__(self, **columns: torch.Tensor):
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index: int) -> dict:
        return {key: column[index] for key, column in self.columns.items()}


@DATA.register("cifar10")
def cifar10(*, spec: InputSpec, root: str = "data/cifar10", download: bool = False, batch_size: int = 128,
            eval_batch_size: int = 512, augment: bool = True, num_workers: int = 2) -> tuple[DataLoader, DataLoader]:
    """CIFAR-10 via torchvision (random crop + flip for training, per-channel normalisation)."""
    import torchvision
    from torchvision import transforms as T

    _check_image_spec(spec, (3, 32, 32), 10, "cifar10")
    normalize = T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    train_tf = T.Compose(([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else [])
                         + [T.ToTensor(), normalize])
    try:
        train = torchvision.datasets.CIFAR10(root, train=True, download=download, transform=train_tf)
        val = torchvision.datasets.CIFAR10(root, train=False, download=download,
                                           transform=T.Compose([T.ToTensor(), normalize]))
    except RuntimeError as error:
        raise ConfigError(f"data.root={root!r}: CIFAR-10 not found there ({error}); set data.download=true "
                          f"(needs the network) or point data.root at a folder holding cifar-10-batches-py") from None
    return _loaders(train, val, batch_size, eval_batch_size, num_workers)


@DATA.register("imagenet")
def imagenet(*, spec: InputSpec, path: str, batch_size: int = 64, eval_batch_size: int = 128,
             num_workers: int = 8) -> tuple[DataLoader, DataLoader]:
    """ImageNet as an image folder: ``path/train/<class>/*.JPEG`` and ``path/val/<class>/*.JPEG``."""
    import torchvision
    from torchvision import transforms as T

    for split in ("train", "val"):
        if not (Path(path) / split).is_dir():
            raise ConfigError(f"data.path={path!r}: no {split}/ folder of class subfolders there (ImageNet is not "
                              f"downloadable; prepare it as an image folder)")
    size = spec.shape[-1]
    normalize = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    transforms = {"train": [T.RandomResizedCrop(size), T.RandomHorizontalFlip()],
                  "val": [T.Resize(int(size * 256 / 224)), T.CenterCrop(size)]}
    splits = {}
    for split, augment in transforms.items():
        try:
            splits[split] = torchvision.datasets.ImageFolder(Path(path) / split,
                                                             T.Compose([*augment, T.ToTensor(), normalize]))
        except FileNotFoundError:  # no class folder, or class folders without images
            raise ConfigError(f"data.path={path!r}: {split}/ has no class subfolders with images (expected "
                              f"{split}/<class>/*.JPEG)") from None
    return _loaders(splits["train"], splits["val"], batch_size, eval_batch_size, num_workers)


# -------------------------------------------------------------------------------------------------------- text
def python_docs_corpus() -> list[str]:
    """The default offline text: Python's reference documentation topics (``pydoc_data.topics``, about 0.8 MB of
    English prose and code, shipped with CPython), one document per topic."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def word_piece_tokenizer(texts: list[str], vocab_size: int, extra_special_tokens: tuple[str, ...] = ()):
    """A BERT-style WordPiece tokenizer trained on ``texts`` (offline; a second or two on the default corpus),
    wrapped as an HF fast tokenizer with BERT's special tokens (ids 0-4, ``TEXT_SPECIAL_TOKENS``), then
    ``extra_special_tokens``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = [*TEXT_SPECIAL_TOKENS, *extra_special_tokens]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def _tokenizer(name: str | None, texts: list[str], spec: InputSpec):
    if name is None:
        return word_piece_tokenizer(texts, spec.vocab_size)
    tokenizer = hf_tokenizer(name, "data.tokenizer")
    if len(tokenizer) > spec.vocab_size:
        raise ConfigError(f"data.tokenizer={name!r} has {len(tokenizer)} tokens; the model's vocab_size is "
                          f"{spec.vocab_size}")
    return tokenizer


def hf_tokenizer(name: str, key: str):
    """``AutoTokenizer.from_pretrained(name)``; offline and not cached (or no such name): one line naming ``key``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as error:
        raise ConfigError(needs_network(key, name, "tokenizer", error)) from None
    except ValueError as error:  # a folder without a tokenizer (HF's message goes on to list every model type)
        reason = textwrap.shorten(str(error).split(". ")[0], 120, placeholder=" ...")
        raise ConfigError(f"{key}={name!r}: no tokenizer there ({reason})") from None


def hf_dataset(key: str, *args, **kwargs):
    """``datasets.load_dataset(*args, **kwargs)``; offline and not cached (or no such dataset): one line naming
    ``key``."""
    from datasets import load_dataset

    try:
        return load_dataset(*args, **kwargs)
    except OSError as error:  # offline: ConnectionError; no such dataset: DatasetNotFoundError (both OSErrors)
        name = "/".join(str(a) for a in args if a)
        raise ConfigError(f"{key}: could not load the HF dataset {name!r} ({type(error).__name__}: "
                          f"{str(error).splitlines()[0]}); it needs the network (or the HF datasets cache)") from None


def _check_text_spec(spec: InputSpec, task: str | tuple[str, ...], name: str) -> None:
    tasks = (task,) if isinstance(task, str) else task
    if spec.kind != "tokens" or spec.task not in tasks:
        raise ConfigError(f"data.name={name!r} gives {' or '.join(tasks)} token batches; the model wants "
                          f"{spec.kind} ({spec.task})")


def _read_texts(files, dataset, dataset_config, text_column, max_documents) -> list[str]:
    """Documents from local ``files`` (one each), an HF ``dataset`` (needs the network), or by default Python's
    reference documentation (offline)."""
    if files and dataset:
        raise ConfigError("data.files and data.dataset are alternatives; give one")
    if files:
        folders = [f for f in files if Path(f).is_dir()]
        if folders:
            raise ConfigError(f"data.files: {folders[0]!r} is a folder; list the text files in it (one document "
                              f"each), e.g. data.files='[{Path(folders[0]) / 'a.txt'}]'")
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise ConfigError(f"data.files: {', '.join(missing)} not found")
        texts = [Path(f).read_text(encoding="utf-8") for f in files]
    elif dataset:
        texts = list(hf_dataset("data.dataset", dataset, dataset_config, split="train")[text_column])
    else:
        texts = python_docs_corpus()
    return texts[:max_documents] if max_documents else texts


def _split(rows: list, val_fraction: float, batch_size: int, what: str) -> tuple[list, list]:
    """(train, val): a seeded shuffle, at least one val row, and enough train rows for one batch."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    n_val = max(1, int(len(rows) * val_fraction))
    if len(rows) - n_val < batch_size:
        raise ConfigError(f"data: only {len(rows)} {what} in the text; lower data.seq_len or data.batch_size "
                          f"({batch_size}), or give more text")
    return [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]]


@DATA.register("text_mlm")
def text_mlm(*, spec: InputSpec, files: list[str] | None = None, dataset: str | None = None,
             dataset_config: str | None = None, text_column: str = "text", tokenizer: str | None = None,
             seq_len: int = 128, mlm_probability: float = 0.15, val_fraction: float = 0.05, batch_size: int = 32,
             max_documents: int | None = None) -> tuple[DataLoader, DataLoader]:
    """Masked-LM batches from text: local ``files`` (one document each), an HF ``dataset`` (needs the network),
    or by default Python's reference documentation (offline). Documents are tokenized, joined and cut into
    ``seq_len``-token rows; ``mlm_probability`` of tokens become masked-LM labels (BERT's 80/10/10 rule).
    ``tokenizer``: an HF tokenizer name or folder; by default a WordPiece tokenizer trained on the text itself."""
    from transformers import DataCollatorForLanguageModeling

    _check_text_spec(spec, "mlm", "text_mlm")
    texts = _read_texts(files, dataset, dataset_config, text_column, max_documents)
    tok = _tokenizer(tokenizer, texts, spec)
    length = min(seq_len, spec.max_length) - 2
    ids = [i for text in texts for i in tok(text, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]]
    rows = torch.tensor(ids[: len(ids) // length * length]).view(-1, length)
    rows = torch.cat([torch.full((len(rows), 1), tok.cls_token_id), rows,
                      torch.full((len(rows), 1), tok.sep_token_id)], dim=1)
    train, val = _split(list(rows), val_fraction, batch_size, f"rows of {length + 2} tokens")
    split = {"train": train, "val": val}
    sets = {key: [{"input_ids": row} for row in value] for key, value in split.items()}
    collate = DataCollatorForLanguageModeling(tok, mlm_probability=mlm_probability)
    return _loaders(sets["train"], sets["val"], batch_size, collate_fn=collate)


def corrupt_spans(tokens: list[int], sentinels: list[int], noise_density: float, mean_span_length: float,
                  generator: torch.Generator) -> tuple[list[int], list[int]]:
    """T5's span corruption of one row: about ``noise_density`` of the tokens, in spans of about
    ``mean_span_length``, are cut out. Source: the row with span i replaced by sentinel i; target: sentinel i then
    span i's tokens, for each span. Both end with EOS."""
    length = len(tokens)
    noise = min(length - 1, max(1, round(length * noise_density)))
    spans = max(1, min(len(sentinels), noise, length - noise, round(noise / mean_span_length)))

    def partition(total: int) -> list[int]:  # ``spans`` positive parts summing to total, at random
        cuts = (torch.randperm(total - 1, generator=generator)[: spans - 1] + 1).sort().values.tolist()
        return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]

    source, target, start = [], [], 0
    for sentinel, keep, drop in zip(sentinels, partition(length - noise), partition(noise), strict=False):
        source += [*tokens[start:start + keep], sentinel]
        target += [sentinel, *tokens[start + keep:start + keep + drop]]
        start += keep + drop
    return source + [EOS_ID], target + [EOS_ID]


def _pad_collate(rows: list[dict]) -> dict:
    """Right-pad ``input_ids`` (PAD, with an attention mask) and ``labels`` (-100, if rows have them) to the batch's
    longest row."""
    batch = {}
    for key, fill in (("input_ids", PAD_ID), ("labels", -100)):
        if key not in rows[0]:
            continue
        longest = max(len(row[key]) for row in rows)
        batch[key] = torch.tensor([row[key] + [fill] * (longest - len(row[key])) for row in rows])
    batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1]) <
                               torch.tensor([len(row["input_ids"]) for row in rows])[:, None]).long()
    return batch


@DATA.register("span_corruption")
def span_corruption(*, spec: InputSpec, files: list[str] | None = None, dataset: str | None = None,
                    dataset_config: str | None = None, text_column: str = "text", seq_len: int = 128,
                    noise_density: float = 0.15, mean_span_length: float = 3.0, min_length: int = 16,
                    val_fraction: float = 0.05, batch_size: int = 32, max_documents: int | None = None,
                    seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """T5-style span corruption (denoising) over text, for seq2seq models and prefix-LMs alike.

    Each document is tokenized (a WordPiece tokenizer trained on the text, with sentinel tokens) and cut into rows of
    ``seq_len`` tokens (a document's last, shorter row is kept if it has ``min_length``): rows differ in length, so
    batches carry padding. Each row becomes a (source, target) pair (``corrupt_spans``). A ``seq2seq`` model gets
    ``input_ids`` = source and ``labels`` = target; a ``causal_lm`` (prefix-LM) gets source + target as one
    sequence, with ``labels`` -100 over the source: both are scored on the same target tokens. Offline by default
    (Python's reference documentation); ``files`` or an HF ``dataset`` for other text."""
    _check_text_spec(spec, ("seq2seq", "causal_lm"), "span_corruption")
    if not 0 < noise_density < 1 or mean_span_length < 1 or seq_len < 2:
        raise ConfigError(f"data: need 0 < noise_density < 1 (got {noise_density}), mean_span_length >= 1 (got "
                          f"{mean_span_length}), seq_len >= 2 (got {seq_len})")
    texts = _read_texts(files, dataset, dataset_config, text_column, max_documents)
    sentinel_count = max(1, round(seq_len * noise_density / mean_span_length))
    tok = word_piece_tokenizer(texts, spec.vocab_size, tuple(f"[S{i}]" for i in range(sentinel_count)))
    sentinels = tok.convert_tokens_to_ids([f"[S{i}]" for i in range(sentinel_count)])
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), seq_len):
            row = ids[start:start + seq_len]
            if len(row) >= max(min_length, 2):
                pairs.append(corrupt_spans(row, sentinels, noise_density, mean_span_length, generator))
    longest = max(len(s) + len(t) if spec.task == "causal_lm" else max(len(s), len(t)) for s, t in pairs)
    if longest > spec.max_length:
        raise ConfigError(f"data.seq_len={seq_len} makes sequences of up to {longest} tokens; the model takes "
                          f"{spec.max_length}")
    if spec.task == "seq2seq":
        rows = [{"input_ids": source, "labels": target} for source, target in pairs]
    else:
        rows = [{"input_ids": source + target, "labels": [-100] * len(source) + target} for source, target in pairs]
    train, val = _split(rows, val_fraction, batch_size, "rows")
    return _loaders(train, val, batch_size, collate_fn=_pad_collate)


# A sentence ends at . ! or ? followed by white space (a simple rule: abbreviations such as "e.g. x" split too).
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(texts: list[str], min_words: int = 5, max_words: int = 64) -> list[str]:
    """The sentences of ``texts`` (white space collapsed) of at most ``max_words`` words, ``min_words`` of them with a
    letter (no table rules or bare symbols), each once (first occurrence order)."""
    sentences = (" ".join(piece.split()) for text in texts for piece in SENTENCE_END.split(text))
    return list(dict.fromkeys(s for s in sentences if len(s.split()) <= max_words
                              and sum(any(c.isalpha() for c in word) for word in s.split()) >= min_words))


@DATA.register("sentences")
def sentences(*, spec: InputSpec, files: list[str] | None = None, dataset: str | None = None,
              dataset_config: str | None = None, text_column: str = "text", tokenizer: str | None = None,
              seq_len: int = 64, min_words: int = 5, max_words: int = 64, val_fraction: float = 0.05,
              batch_size: int = 32, eval_batch_size: int | None = None,
              max_documents: int | None = None) -> tuple[DataLoader, DataLoader]:
    """Unlabeled English sentences for sentence encoders: the text (local ``files``, an HF ``dataset`` (needs the
    network), or by default Python's reference documentation, offline) split into sentences (``split_sentences``:
    ``min_words`` to ``max_words`` words), each token row kept once; a seeded ``val_fraction`` of them held out (no
    row is in both splits). Tokenized with ``tokenizer`` (default: the pretrained model's own; for a model built
    from a config, a WordPiece tokenizer trained on the text) as ``[CLS] sentence [SEP]``, cut to ``seq_len``
    tokens, padded per batch. The eval loader is not shuffled."""
    _check_text_spec(spec, "embedding", "sentences")
    if min_words < 1 or max_words < min_words or seq_len < 3:
        raise ConfigError(f"data: need 1 <= min_words <= max_words (got {min_words}, {max_words}) and seq_len >= 3 "
                          f"(got {seq_len})")
    texts = _read_texts(files, dataset, dataset_config, text_column, max_documents)
    tok = _tokenizer(tokenizer or spec.tokenizer, texts, spec)
    length = min(seq_len, spec.max_length) - 2
    found = split_sentences(texts, min_words, max_words)
    ids = tok(found, add_special_tokens=False)["input_ids"] if found else []
    # each token row once, so no held-out row is a training row (two sentences can tokenize or truncate alike)
    rows = list(dict.fromkeys((tok.cls_token_id, *row[:length], tok.sep_token_id) for row in ids))
    train, val = _split(rows, val_fraction, batch_size, "sentences")
    train, val = ([{"input_ids": list(row)} for row in split] for split in (train, val))
    return _loaders(train, val, batch_size, eval_batch_size, collate_fn=_pad_collate)


GLUE_TEXT_KEYS = {"cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
                  "qqp": ("question1", "question2"), "mnli": ("premise", "hypothesis"),
                  "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"),
                  "wnli": ("sentence1", "sentence2")}


@DATA.register("glue")
def glue(*, spec: InputSpec, task: str = "sst2", tokenizer: str = "bert-base-uncased", max_length: int = 128,
         batch_size: int = 32, eval_batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    """A GLUE classification task via HF datasets (needs the network, or the HF cache), tokenized with an HF
    tokenizer (the one the pretrained model was trained with)."""
    from transformers import DataCollatorWithPadding

    _check_text_spec(spec, "classification", "glue")
    if task not in GLUE_TEXT_KEYS:
        raise ConfigError(f"data.task={task!r}; valid: {', '.join(GLUE_TEXT_KEYS)}")
    first, second = GLUE_TEXT_KEYS[task]
    tok = hf_tokenizer(tokenizer, "data.tokenizer")
    raw = hf_dataset("data.task", "glue", task)

    def encode(rows):
        return tok(rows[first], rows[second] if second else None, truncation=True, max_length=max_length)

    encoded = raw.map(encode, batched=True, remove_columns=[c for c in raw["train"].column_names if c != "label"])
    encoded = encoded.rename_column("label", "labels")
    val_split = "validation_matched" if task == "mnli" else "validation"
    return _loaders(encoded["train"], encoded[val_split], batch_size, eval_batch_size,
                    collate_fn=DataCollatorWithPadding(tok))
