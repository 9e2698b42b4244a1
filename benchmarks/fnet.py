"""FNet-mixing benchmark: Fourier mixing vs the BERT attention it replaces, side by side in one process, plus HF's
FNetModel as the peer, and accuracy of attention / FNet / hybrid on a small real dataset. Prints markdown.

    .venv/bin/python benchmarks/fnet.py                     # all parts (`make` installs the package into .venv)
    .venv/bin/python benchmarks/fnet.py --parts sublayer --lengths 128,512
    .venv/bin/python benchmarks/fnet.py --parts seq2seq,generation

(a) sublayer: HF BertAttention (BERT-base width, 12 heads, sdpa) vs our FourierBertAttention (fft / rfft / dft) at
    batch 8 x d 768 and the given lengths.
(b) encoder: BERT-base-size BertModel (random init) dense vs all-FNet vs FNet-Hybrid (last 2 layers attention) vs HF
    FNetModel of the same size, batch 8 x 512.
(c) accuracy: a 4-layer transformer on scikit-learn's digits read as 8 rows of 8 pixels, trained the same way with
    attention, FNet mixing, and hybrid.
(d) seq2seq: a BART-base-shape encoder (6 layers, d 768, 12 heads, sdpa) all-attention vs FNet encoder vs FNet encoder
    with its last layer attention, batch 2 at the given source lengths.
(e) generation: greedy generation of 32 new tokens (batch 1, KV cache) after a 512-token source: BART-base-shape
    seq2seq all-attention / FNet encoder / hybrid, and a GPT-2 prefix-LM of about the same size with attention and
    with causal Fourier mixing in all but its last two layers.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from algos import apply_fnet_mixing
from algos.bench import (
    loader_accuracy,
    markdown_table,
    median,
    run_parts,
    time_forward,
    time_interleaved,
    timed_rows,
    train_steps,
)
from algos.run.data import digits_dataloaders
from algos.surgery import count_params


def timed_table(models: dict[str, nn.Module], inputs, repeats: int, baseline: str) -> list[list[str]]:
    return timed_rows(models, time_forward(models, inputs, repeats=repeats), baseline, decimals=1)


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
        train_steps(model, train, steps)  # images (B, 1, 8, 8) -> 8 tokens of 8 pixels
        rows.append([name, f"{count_params(model) / 1e3:.0f} K", f"{loader_accuracy(model, val):.3f}"])
    title = (f"### Accuracy: 4-layer transformer (d 64) on scikit-learn digits as 8 tokens of 8 pixels, {steps} Adam "
             f"steps each, {len(val.dataset)} held-out images")
    return f"{title}\n\n" + markdown_table(["mixing", "params", "val accuracy"], rows) + "\n"


# facebook/bart-base's shape (BartConfig's defaults are bart-large's)
BART_BASE = dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                 decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072)


def seq2seq_encoder(lengths: list[int], repeats: int) -> str:
    from transformers import BartConfig, BartModel

    rows = []
    for length in lengths:
        torch.manual_seed(0)
        dense = BartModel(BartConfig(vocab_size=8192, max_position_embeddings=max(lengths), **BART_BASE)).get_encoder()
        fnet, hybrid = copy.deepcopy(dense), copy.deepcopy(dense)
        # padding="mask" at N = the source length: what recipes/fnet_encoder.yaml does for sources of that length
        apply_fnet_mixing(fnet, impl="rfft", padding="mask", max_length=length)
        apply_fnet_mixing(hybrid, impl="rfft", padding="mask", max_length=length, keep_attention_layers=[-1])
        models = {"attention": dense, "FNet encoder": fnet, "FNet encoder, last layer attention": hybrid}
        ids = torch.randint(4, 8192, (2, length))
        seconds = time_forward(models, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, repeats=repeats)
        rows += [[str(length), name, f"{seconds[name] * 1e3:.1f} ms", f"{seconds['attention'] / seconds[name]:.2f}x"]
                 for name in models]
    title = "### Seq2seq encoder forward: BART-base shape (6 layers, d 768, 12 heads, sdpa), batch 2, random init"
    return f"{title}\n\n" + markdown_table(["source length", "encoder", "median forward", "speed-up"], rows) + "\n"


def generation(source: int, new_tokens: int, repeats: int) -> str:
    from transformers import BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ids = dict(vocab_size=8192, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    bart = BartForConditionalGeneration(BartConfig(**ids, decoder_start_token_id=2, forced_eos_token_id=None,
                                                   max_position_embeddings=1024, **BART_BASE))
    bart_fnet, bart_hybrid = copy.deepcopy(bart), copy.deepcopy(bart)
    apply_fnet_mixing(bart_fnet, impl="rfft", padding="mask", max_length=source)
    apply_fnet_mixing(bart_hybrid, impl="rfft", padding="mask", max_length=source, keep_attention_layers=[-1])
    # 14 GPT-2 layers of d 768: about BART-base's parameter count at this vocabulary
    gpt = GPT2LMHeadModel(GPT2Config(**ids, n_layer=14, n_positions=1024))
    gpt_fnet = copy.deepcopy(gpt)
    apply_fnet_mixing(gpt_fnet, impl="dft", causal=True, scope="decoder", keep_attention_layers=[-2, -1])
    models = {"BART-base shape, attention": bart, "BART, FNet encoder": bart_fnet,
              "BART, FNet encoder + last layer attention": bart_hybrid, "GPT-2 prefix-LM, attention": gpt,
              "GPT-2 prefix-LM, causal mixing in 12 of 14 layers": gpt_fnet}
    prompt = torch.randint(4, 8192, (1, source))

    def generate(model):
        model.eval()

        def run():
            with torch.inference_mode():
                model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return run

    times = time_interleaved({name: generate(model) for name, model in models.items()}, repeats=repeats)
    seconds = {name: median(values) for name, values in times.items()}
    base = seconds["BART-base shape, attention"]
    rows = [[name, f"{count_params(models[name]) / 1e6:.1f} M", f"{seconds[name] * 1e3:.0f} ms",
             f"{seconds[name] * 1e3 / new_tokens:.2f} ms", f"{base / seconds[name]:.2f}x"] for name in models]
    title = (f"### Generation: {new_tokens} new tokens after a {source}-token source (greedy, batch 1, KV cache), "
             f"vocabulary 8192, random init")
    return f"{title}\n\n" + markdown_table(["model", "params", "median end to end", "per new token",
                                               "speed-up vs BART attention"], rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="128,512,2048", help="sequence lengths (sublayer and seq2seq parts)")
    parser.add_argument("--source", type=int, default=512, help="source length for the generation part")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens for the generation part")
    parser.add_argument("--encoder-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=600, help="training steps for the accuracy part")
    run_parts(parser, {
        "sublayer": lambda args: sublayer([int(n) for n in args.lengths.split(",")], args.repeats),
        "encoder": lambda args: encoder(args.encoder_length, args.repeats),
        "accuracy": lambda args: accuracy(args.steps),
        "seq2seq": lambda args: seq2seq_encoder([int(n) for n in args.lengths.split(",")], args.repeats),
        "generation": lambda args: generation(args.source, args.new_tokens, args.repeats),
    })


if __name__ == "__main__":
    main()
