"""``span_corruption``: T5-style denoising pairs over text, for seq2seq models and prefix-LMs."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from algos.run.data.common import DATA, make_loaders, pad_collate, split_rows
from algos.run.data.text import check_text_spec, read_texts, word_piece_tokenizer
from algos.run.registry import ConfigError
from algos.run.spec import EOS_ID, InputSpec


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
    check_text_spec(spec, ("seq2seq", "causal_lm"), "span_corruption")
    if not 0 < noise_density < 1 or mean_span_length < 1 or seq_len < 2:
        raise ConfigError(f"data: need 0 < noise_density < 1 (got {noise_density}), mean_span_length >= 1 (got "
                          f"{mean_span_length}), seq_len >= 2 (got {seq_len})")
    texts = read_texts(files, dataset, dataset_config, text_column, max_documents)
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
    train, val = split_rows(rows, val_fraction, batch_size, "rows")
    return make_loaders(train, val, batch_size, collate_fn=pad_collate, tokenizer=tok)
