"""Training-step benchmark: what each surgery buys in training, side by side in one process. Prints markdown.

    .venv/bin/python benchmarks/train_step.py                         # all rows (`make` installs the package)
    .venv/bin/python benchmarks/train_step.py --layers 4 --batch 8 --length 512 --repeats 5

A BERT-base-width masked-LM (HF ``BertModel``, d 768, 12 heads, FFN 3072, vocabulary 30,522, random init; 4 layers by
default) with the MLM head applied to the masked positions only (15% of the tokens, as MosaicML's BERT recipe does:
the decoder over every position would cost as much as the encoder), AdamW (torch's default implementation), one
full step per call: zero_grad, forward, loss, backward, optimizer step. Each surgery is applied to a copy of the same
dense model before its optimizer is built; the rows run interleaved and report the median step.

Rows: dense; Factorize 25% rank (every Linear >= 256 wide); FFF neuron depth 11 (every FFN); FFF leaf depth 4 x 192
on its hard path (``hard_training=True``: one leaf per token, as in the FFF paper's hard-training phase) and in its
soft training form (every leaf, mixed); FNet rfft (every attention); and no FFN at all (both FFN Linears made
identities), the bound for any FFN replacement.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from algos import FFF, apply_factorization, apply_fff, apply_fnet_mixing
from algos.bench import markdown_table, run_parts, time_train_step, timed_rows


class MaskedLM(nn.Module):
    """An HF encoder and its MLM head, the head run on the masked positions only; returns the loss."""

    def __init__(self, layers: int):
        super().__init__()
        from transformers import BertConfig, BertModel
        from transformers.models.bert.modeling_bert import BertOnlyMLMHead

        config = BertConfig(num_hidden_layers=layers)
        self.encoder = BertModel(config, add_pooling_layer=False)
        self.head = BertOnlyMLMHead(config)
        self.head.predictions.decoder.weight = self.encoder.embeddings.word_embeddings.weight  # tied, as in BERT

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids).last_hidden_state
        masked = labels != -100
        return nn.functional.cross_entropy(self.head(hidden[masked]), labels[masked])


def hard_leaves(model: nn.Module) -> None:
    """Every FFF tree in ``model`` trains on its hard path."""
    for tree in model.modules():
        if isinstance(tree, FFF):
            tree.hard_training = True


def drop_ffn(encoder: nn.Module) -> None:
    """Every FFN's two Linears become identities (768 -> 768, no weights): the step with the FFN's cost gone, which
    bounds what any FFN replacement can reach."""
    for layer in encoder.encoder.layer:
        layer.intermediate.dense = layer.output.dense = nn.Identity()


SURGERIES = {  # --rows key: (row name, surgery applied in place)
    "dense": ("dense", lambda model: None),
    "factorize": ("Factorize rank 25%", lambda model: apply_factorization(model, rank=0.25)),
    "fff-neuron": ("FFF neuron depth 11", lambda model: apply_fff(model, depth=11)),
    "fff-leaf": ("FFF leaf 4 x 192, hard path",
                 lambda model: (apply_fff(model, depth=4, form="leaf", leaf_width=192), hard_leaves(model))),
    "fff-leaf-soft": ("FFF leaf 4 x 192, soft (every leaf)",
                      lambda model: apply_fff(model, depth=4, form="leaf", leaf_width=192)),
    "fnet": ("FNet rfft (every attention)", lambda model: apply_fnet_mixing(model, impl="rfft")),
    "no-ffn": ("no FFN at all (the bound for FFF)", lambda model: drop_ffn(model)),
}


def train_step(layers: int, batch: int, length: int, repeats: int, rows: list[str]) -> str:
    torch.manual_seed(0)
    dense = MaskedLM(layers)
    input_ids = torch.randint(0, 30522, (batch, length))
    labels = torch.where(torch.rand(batch, length) < 0.15, input_ids, -100)
    models = {}
    for key in rows:
        name, surgery = SURGERIES[key]
        model = copy.deepcopy(dense)
        surgery(model.encoder)  # the encoder's layers; the tied embedding / decoder stays as it is
        models[name] = model
    seconds = time_train_step(models, dict(input_ids=input_ids, labels=labels), repeats=repeats)
    table = timed_rows(models, seconds, "dense")
    return (f"### Training step: BERT-base-width masked LM, {layers} layers, batch {batch} x {length}, AdamW\n\n"
            + markdown_table(["surgery", "params", "median step", "speed-up"], table) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", default=",".join(SURGERIES), help=f"comma-separated, from: {', '.join(SURGERIES)} "
                                                                     "(dense, the baseline, always runs)")
    run_parts(parser, {"step": lambda args: train_step(args.layers, args.batch, args.length, args.repeats,
                                                       ["dense"] + [r for r in args.rows.split(",") if r != "dense"])})


if __name__ == "__main__":
    main()
