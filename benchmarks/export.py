"""Eager, compiled and ONNX (issue 23, part 4): each surgery's encoder forward under ``torch.compile`` (inductor) and
in onnxruntime (``torch.onnx.export(..., dynamo=True)``), against the dense model in eager PyTorch, side by side in
one process on a pool of different batches. Prints markdown.

    .venv/bin/python benchmarks/export.py                                  # all-MiniLM-L6-v2's shape, batch 32 x 128
    .venv/bin/python benchmarks/export.py --layers 2 --width 64 --batch 2 --length 16 --repeats 1   # smoke

The models are BERT encoders of all-MiniLM-L6-v2's shape (6 layers, d 384, 12 heads, FFN 1536; random init: speed
does not depend on the weights, except through FFF's routing, which a pool of random-token batches spreads) before
and after each surgery. onnxruntime runs with as many threads as torch. What each runtime does with a surgery: FFF
trees take their PyTorch path under compile and export (the numba kernels are not traceable), and an exported leaf
tree runs every leaf (its one-hot path: 2^depth times the leaf compute), because a graph cannot hold a data-dependent
split of the tokens; FNet's FFT becomes ONNX's DFT operator (opset 18).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from algos import apply_factorization, apply_fff, apply_fnet_mixing  # noqa: E402
from algos.bench import markdown_table, time_forward  # noqa: E402


class Encoder(nn.Module):
    """The HF encoder as a function of tensors (what compile and export trace): the last hidden state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class OnnxSession(nn.Module):
    """An onnxruntime session behind the module call ``time_forward`` makes."""

    def __init__(self, model: nn.Module, example: dict, threads: int):
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only (not its notes on unused initializers)
        program = torch.onnx.export(model, (), kwargs=example, dynamo=True)
        self.session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), options)
        self.names = [i.name for i in self.session.get_inputs()]

    def forward(self, input_ids, attention_mask):
        feeds = dict(zip(self.names, (input_ids.numpy(), attention_mask.numpy()), strict=True))
        return torch.from_numpy(self.session.run(None, feeds)[0])


def surgeries(args) -> dict:
    leaf = max(8, args.width)  # leaf width: all-MiniLM-L6-v2's 2 x 768 at d 384 (FFN 4d = 2 leaves of 2d)
    return {
        "dense": lambda m: None,
        "Factorize 50%": lambda m: apply_factorization(m, rank=0.5, min_features=1),
        f"FFF leaf 2 x {2 * leaf}": lambda m: apply_fff(m, form="leaf", depth=1, leaf_width=2 * leaf, min_width=0),
        "FFF neuron depth 8": lambda m: apply_fff(m, depth=8, min_width=0),
        "FNet-Hybrid rfft": lambda m: apply_fnet_mixing(m, impl="rfft", keep_attention_layers=[-2, -1]),
        "all-FNet rfft": lambda m: apply_fnet_mixing(m, impl="rfft"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--pool", type=int, default=8, help="different batches each model walks through")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--runtimes", default="eager,compile,onnx", type=lambda s: s.split(","))
    args = parser.parse_args()
    from transformers import BertConfig, BertModel

    from algos.bench.timing import cpu_model

    torch.set_num_threads(min(2, torch.get_num_threads()))
    threads = torch.get_num_threads()
    config = BertConfig(num_hidden_layers=args.layers, hidden_size=args.width, intermediate_size=4 * args.width,
                        num_attention_heads=max(1, args.width // 32), vocab_size=30522, max_position_embeddings=512)
    torch.manual_seed(0)
    dense = BertModel(config, add_pooling_layer=False).eval()
    generator = torch.Generator().manual_seed(1)
    pool = []
    for _ in range(args.pool):
        ids = torch.randint(1000, config.vocab_size, (args.batch, args.length), generator=generator)
        pool.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    models, errors = {}, {}
    for name, surgery in surgeries(args).items():
        model = copy.deepcopy(dense)
        surgery(model)
        encoder = Encoder(model).eval()
        with torch.inference_mode():
            reference = encoder(**pool[0])
        for runtime in args.runtimes:
            label = f"{name}, {runtime}"
            if runtime == "eager":
                models[label] = encoder
            elif runtime == "compile":
                torch._dynamo.reset()
                models[label] = torch.compile(encoder)
            else:
                models[label] = OnnxSession(encoder, pool[0], threads)
            with torch.inference_mode():
                errors[label] = float((models[label](**pool[0]) - reference).abs().max())
            print(f"built {label}", file=sys.stderr)
    seconds = time_forward(models, pool, repeats=args.repeats)
    base = seconds["dense, eager"]
    rows = [[label, f"{seconds[label] * 1e3:.1f} ms", f"{base / seconds[label]:.2f}x",
             f"{base / seconds[label] / (base / seconds[label.rsplit(', ', 1)[0] + ', eager']):.2f}x",
             f"{errors[label]:.1e}"] for label in models]
    print(f"{cpu_model()}, {threads} threads, torch {torch.__version__}\n")
    print(f"### Encoder forward by runtime: BERT {args.layers} x {args.width}, batch {args.batch} x {args.length}, "
          f"a pool of {args.pool} batches, median of {args.repeats}\n")
    print(markdown_table(["model, runtime", "time", "speed-up vs dense eager", "vs the same model eager",
                          "max abs difference to eager"], rows))


if __name__ == "__main__":
    main()
