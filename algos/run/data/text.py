"""Text data: the offline corpus (Python's reference documentation), WordPiece tokenizers trained on it, HF
tokenizers and datasets (network), and the masked-LM (``text_mlm``) and sentence (``sentences``) builders."""

from __future__ import annotations

import hashlib
import re
import textwrap
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from algos.run.data.common import DATA, DictDataset, make_loaders, pad_collate, split_rows
from algos.run.registry import ConfigError
from algos.run.spec import TEXT_SPECIAL_TOKENS, InputSpec, needs_network


def python_docs_corpus() -> list[str]:
    """The default offline text: Python's reference documentation topics (``pydoc_data.topics``, about 0.8 MB of
    English prose and code, shipped with CPython), one document per topic."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


# Trained tokenizers of this process, by (text fingerprint, vocab_size, extra special tokens). The tokenizers
# library's WordPiece trainer is not deterministic (huggingface/tokenizers#1794: hash-map order breaks ties
# between merges), so two trainings on the same text can give different vocabularies; the runs of one process
# (one ``algos compare``, one benchmark) share one tokenizer and so see the same token rows.
_TRAINED: dict[tuple[str, int, tuple[str, ...]], object] = {}


def word_piece_tokenizer(texts: list[str], vocab_size: int, extra_special_tokens: tuple[str, ...] = ()):
    """A BERT-style WordPiece tokenizer trained on ``texts`` (offline; a second or two on the default corpus),
    wrapped as an HF fast tokenizer with BERT's special tokens (ids 0-4, ``TEXT_SPECIAL_TOKENS``), then
    ``extra_special_tokens``. Trained once per process for the same arguments (see ``_TRAINED``)."""
    fingerprint = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    key = (fingerprint, vocab_size, tuple(extra_special_tokens))
    if key not in _TRAINED:
        _TRAINED[key] = _train_word_piece(texts, vocab_size, extra_special_tokens)
    return _TRAINED[key]


def _train_word_piece(texts: list[str], vocab_size: int, extra_special_tokens: tuple[str, ...]):
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


def check_text_spec(spec: InputSpec, task: str | tuple[str, ...], name: str) -> None:
    tasks = (task,) if isinstance(task, str) else task
    if spec.kind != "tokens" or spec.task not in tasks:
        raise ConfigError(f"data.name={name!r} gives {' or '.join(tasks)} token batches; the model wants "
                          f"{spec.kind} ({spec.task})")


def read_texts(files, dataset, dataset_config, text_column, max_documents) -> list[str]:
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


VAL_MASK_SEED = 1234  # non-zero: transformers' collator ignores seed=0


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

    check_text_spec(spec, "mlm", "text_mlm")
    texts = read_texts(files, dataset, dataset_config, text_column, max_documents)
    tok = _tokenizer(tokenizer, texts, spec)
    length = min(seq_len, spec.max_length) - 2
    ids = [i for text in texts for i in tok(text, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]]
    rows = torch.tensor(ids[: len(ids) // length * length]).view(-1, length)
    rows = torch.cat([torch.full((len(rows), 1), tok.cls_token_id), rows,
                      torch.full((len(rows), 1), tok.sep_token_id)], dim=1)
    train, val = split_rows(list(rows), val_fraction, batch_size, f"rows of {length + 2} tokens")
    collate = DataCollatorForLanguageModeling(tok, mlm_probability=mlm_probability)
    # Training draws fresh masks every batch; the held-out rows are masked once, with a fixed seed, so that every
    # evaluation of every run scores the same masked tokens and two curves differ by the model only.
    val_masked = DataCollatorForLanguageModeling(tok, mlm_probability=mlm_probability, seed=VAL_MASK_SEED)(
        [{"input_ids": row} for row in val])
    return make_loaders([{"input_ids": row} for row in train], DictDataset(**val_masked), batch_size,
                        collate_fn=collate, eval_collate_fn=None, tokenizer=tok)


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
    check_text_spec(spec, "embedding", "sentences")
    if min_words < 1 or max_words < min_words or seq_len < 3:
        raise ConfigError(f"data: need 1 <= min_words <= max_words (got {min_words}, {max_words}) and seq_len >= 3 "
                          f"(got {seq_len})")
    texts = read_texts(files, dataset, dataset_config, text_column, max_documents)
    tok = _tokenizer(tokenizer or spec.tokenizer, texts, spec)
    length = min(seq_len, spec.max_length) - 2
    found = split_sentences(texts, min_words, max_words)
    ids = tok(found, add_special_tokens=False)["input_ids"] if found else []
    # each token row once, so no held-out row is a training row (two sentences can tokenize or truncate alike)
    rows = list(dict.fromkeys((tok.cls_token_id, *row[:length], tok.sep_token_id) for row in ids))
    train, val = split_rows(rows, val_fraction, batch_size, "sentences")
    train, val = ([{"input_ids": list(row)} for row in split] for split in (train, val))
    return make_loaders(train, val, batch_size, eval_batch_size, collate_fn=pad_collate, tokenizer=tok)
