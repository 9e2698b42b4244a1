"""``glue``: a GLUE classification task via HF datasets (needs the network, or the HF cache)."""

from __future__ import annotations

from torch.utils.data import DataLoader

from algos.run.data.common import DATA, make_loaders
from algos.run.data.text import check_text_spec, hf_dataset, hf_tokenizer
from algos.run.registry import ConfigError
from algos.run.spec import InputSpec

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

    check_text_spec(spec, "classification", "glue")
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
    return make_loaders(encoded["train"], encoded[val_split], batch_size, eval_batch_size,
                    collate_fn=DataCollatorWithPadding(tok), tokenizer=tok)
