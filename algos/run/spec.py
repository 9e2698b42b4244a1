"""The data contract between the model and data registries: ``InputSpec`` (what a model eats, carried by every model
the runner builds), the special token ids the text builders and generative models share, and the tokens a batch
counts for Composer's tokens/s."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InputSpec:
    """What the model eats. ``kind="image"``: ``(image (C, H, W), label)`` pairs; ``kind="tokens"``: dicts of
    ``input_ids`` / ``attention_mask`` / ``labels`` with ids below ``vocab_size`` and at most ``max_length`` tokens;
    ``task`` is ``"classification"`` (one label per sample), ``"mlm"`` (masked-token labels), ``"seq2seq"``
    (``labels`` are the target sequence), ``"causal_lm"`` (``labels`` are the input ids, -100 on the prefix) or
    ``"embedding"`` (no labels: a sentence encoder). The two generative tasks use the special token ids of
    ``TEXT_SPECIAL_TOKENS``. ``tokenizer``: the HF tokenizer (name or folder) that goes with pretrained weights, for
    the text builders; None: they train one on the text."""

    kind: str
    task: str = "classification"
    shape: tuple[int, ...] = ()
    num_classes: int = 0
    vocab_size: int = 0
    max_length: int = 0
    tokenizer: str | None = None


GENERATIVE_TASKS = ("seq2seq", "causal_lm")
# The tokenizer the text builders train puts these first, so a model built from a config knows their ids.
TEXT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, BOS_ID, EOS_ID = 0, 2, 3


def token_counter(spec: InputSpec):
    """Real (unpadded) tokens a batch makes the model read, for Composer's tokens/s: the input ids, plus the target
    for seq2seq, so seq2seq and prefix-LM runs over the same text count the same tokens."""

    def count(batch) -> int:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            return 0
        mask = batch.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        if spec.task == "seq2seq":
            tokens += int((batch["labels"] != -100).sum())
        return tokens

    return count


def needs_network(key: str, name: str, what: str, error: Exception) -> str:
    """The one-line error for an HF hub name that could not be loaded (offline, not in the HF cache, or unknown)."""
    return (f"{key}={name!r}: could not load this {what} ({type(error).__name__}: {str(error).splitlines()[0]}); a "
            f"hub name needs the network (or the HF cache): offline, point {key}=PATH at a local copy")
