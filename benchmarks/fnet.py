"""FNet-mixing benchmark: Fourier mixing vs the BERT attention it replaces, side by side in one process, plus HF's
FNetModel as the peer, and accuracy of attention / FNet / hybrid on a small real dataset. Prints markdown.

    .venv/bin/python benchmarks/fnet.py                     # all parts
    .venv/bin/python benchmarks/fnet.py --parts sublayer --lengths 128,512

(a) sublayer: HF BertAttention (BERT-base width, 12 heads, sdpa) vs our FourierBertAttention (fft / rfft / dft) at
    batch 8 x d 768 and the given lengths.
(b) encoder: BERT-base-size BertModel (random init) dense vs all-FNet vs FNet-Hybrid (last 2 layers attention) vs HF
    FNetModel of the same size, batch 8 x 512.
(c) accuracy: a 4-layer transformer on scikit-learn's digits read as 8 rows of 8 pixels, trained the same way with
    attention, FNet mixing, and hybrid.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from algos import apply_fnet_mixing  # noqa: E402
from algos.bench import markdown_table, run_parts, time_forward  # noqa: E402
from algos.surgery.report import count_params  # noqa: E402


def timed_table(models: dict[str, nn.Module], inputs, repeats: int, baseline: str) -> list[list[str]]:
    seconds = time_forward(models, inputs, repeats=repeats)
    return [[name, f"{count_params(model) / 1e6:.2f} M", f"{seconds[name] * 1e3:.1f} ms",
             f"{seconds[baseline] / seconds[name]:.2f}x"] for name, model in models.items()]


def sublayer(lengths: list[int], repeats: int) -> str:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    attention = BertModel(BertConfig(num_hidden_layers=1)).encoder.layer[0].attention
    out = ["### Mixing sublayer vs BERT attention sublayer (batch 8, d 768, 12 heads, sdpa)\n"]
    for length in lengths:
        models = {"BertAttention (sdpa)": attention}
        for impl in ("fft", "rfft", "dft"):
            fourier = copy.deepcopy(nn.Sequential(attention))
            apply_fnet_mixing(fourier, impl=impl)
            models[f"FourierBertAttention impl={impl}"] = fourier[0]
        x = torch.randn(8, length, 768)
        rows = timed_table(models, x, repeats, "BertAttention (sdpa)")
        out.append(f"seq {length}:\n\n" + markdown_table(["sublayer", "params", "median forward", "speed-up"], rows))
    return "\n\n".join(out) + "\n"


def encoder(length: int, repeats: int) -> str:
    from transformers import BertConfig, BertModel, FNetConfig, FNetModel

    torch.manual_seed(0)
    dense = BertModel(BertConfig(max_position_embeddings=max(512, length)), add_pooling_layer=False)
    fnet, fnet_rfft, hybrid = copy.deepcopy(dense), copy.deepcopy(dense), copy.deepcopy(dense)
    apply_fnet_mixing(fnet)
    apply_fnet_mixing(fnet_rfft, impl="rfft")
    apply_fnet_mixing(hybrid, impl="rfft", keep_attention_layers=[-2, -1])
    peer = FNetModel(FNetConfig(vocab_size=30522, max_position_embeddings=max(512, length),
                                use_tpu_fourier_optimizations=False), add_pooling_layer=False)
    models = {"BERT-base (sdpa attention)": dense, "ours: all-FNet (fft)": fnet, "ours: all-FNet (rfft)": fnet_rfft,
              "ours: FNet-Hybrid (rfft, last 2 attention)": hybrid, "HF FNetModel (peer)": peer}
    tokens = torch.randint(0, 30522, (8, length))
    rows = timed_table(models, {"input_ids": tokens}, repeats, "BERT-base (sdpa attention)")
    fnet_time = min(float(rows[1][2].split()[0]), float(rows[2][2].split()[0]))
    peer_time = float(rows[4][2].split()[0])
    title = f"### BERT-base-size encoder, batch 8 x {length}, random init"
    return (f"{title}\n\n" + markdown_table(["model", "params", "median forward", "speed-up vs BERT"], rows)
            + f"\n\nours all-FNet (faster impl) vs HF FNetModel: {peer_time / fnet_time:.2f}x\n")


def accuracy(steps: int) -> str:
    from algos.run.data import digits_dataloaders

    class RowTransformer(nn.Module):
        """8 rows of 8 pixels -> tokens with learned positions -> 4 encoder layers -> mean-pool -> 10 classes."""

        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, 64)
            self.position = nn.Parameter(torch.zeros(8, 64))
            layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
            self.head = nn.Linear(64, 10)

        def forward(self, images):
            return self.head(self.encoder(self.embed(images.squeeze(1)) + self.position).mean(1))

    def make(seed=0):
        torch.manual_seed(seed)
        return RowTransformer()

    train, val = digits_dataloaders(batch_size=64)
    variants = {"attention": lambda m: None, "FNet (all 4 layers)": lambda m: apply_fnet_mixing(m),
                "FNet-Hybrid (last layer attention)": lambda m: apply_fnet_mixing(m, keep_attention_layers=[-1])}
    rows = []
    for name, surgery in variants.items():
        model = make()
        surgery(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        step = 0
        while step < steps:
            for images, labels in train:  # images (B, 1, 8, 8) -> 8 tokens of 8 pixels
                model.train()
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(images), labels).backward()
                optimizer.step()
                step += 1
                if step == steps:
                    break
        model.eval()
        with torch.no_grad():
            correct = sum((model(x).argmax(1) == y).sum().item() for x, y in val)
        rows.append([name, f"{count_params(model) / 1e3:.0f} K", f"{correct / len(val.dataset):.3f}"])
    title = (f"### Accuracy: 4-layer transformer (d 64) on scikit-learn digits as 8 tokens of 8 pixels, {steps} Adam "
             f"steps each, 360 held-out images")
    return f"{title}\n\n" + markdown_table(["mixing", "params", "val accuracy"], rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="128,512,2048", help="sequence lengths for the sublayer part")
    parser.add_argument("--encoder-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=600, help="training steps for the accuracy part")
    run_parts(parser, {
        "sublayer": lambda args: sublayer([int(n) for n in args.lengths.split(",")], args.repeats),
        "encoder": lambda args: encoder(args.encoder_length, args.repeats),
        "accuracy": lambda args: accuracy(args.steps),
    })


if __name__ == "__main__":
    main()
