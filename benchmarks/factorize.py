"""Factorize benchmark: forward throughput of factorized vs dense models, side by side in one process, and accuracy
right after surgery against Composer's own Factorize. Prints markdown for docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/factorize.py                 # all three parts (`make` installs the package into .venv)
    .venv/bin/python benchmarks/factorize.py --parts accuracy --repeats 3

(a) BERT-base encoder (HF BertModel from config) at batch 32 x 128, its Linears at 25% rank.
(b) torchvision ResNet-50 at batch 8 x 224^2, its convs with >= 256 channels at 25% rank.
(c) A 64-512-512-10 MLP trained on scikit-learn's digits, then factorized: accuracy right after surgery.
Composer's ``apply_factorization`` (same latent fraction, same minimum width) is the peer row in each.
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from torch import nn

from algos import apply_factorization
from algos.bench import loader_accuracy, markdown_table, run_parts, time_forward, train_steps
from algos.run.data import digits_dataloaders
from algos.surgery import count_macs, count_params


def composer_factorization(model: nn.Module, *, min_width: int, fraction: float, convs: bool, linears: bool):
    from composer.algorithms.factorize import apply_factorization as composer_apply

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        composer_apply(model, factorize_convs=convs, factorize_linears=linears, min_channels=min_width,
                       latent_channels=fraction, min_features=min_width, latent_features=fraction)
    return model


def speed_rows(title: str, dense: nn.Module, variants: dict[str, nn.Module], example, per_sample, batch: int,
               repeats: int) -> str:
    """Median forward time of each model on ``example``; ratios against dense; params and MACs per sample."""
    models = {"dense": dense, **variants}
    seconds = time_forward(models, example, repeats=repeats)
    rows = []
    for name, model in models.items():
        args = (per_sample,) if not isinstance(per_sample, dict) else ()
        kwargs = per_sample if isinstance(per_sample, dict) else {}
        rows.append([name, f"{count_params(model) / 1e6:.1f} M", f"{count_macs(model, args, kwargs) / 1e9:.2f} G",
                     f"{seconds[name] * 1e3:.0f} ms", f"{batch / seconds[name]:.1f}",
                     f"{seconds['dense'] / seconds[name]:.2f}x"])
    headers = ["model", "params", "MACs/sample", "median forward", "samples/s", "speed-up vs dense"]
    return f"### {title}\n\n" + markdown_table(headers, rows) + "\n"


def bert(repeats: int) -> str:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    dense = BertModel(BertConfig(), add_pooling_layer=False)  # BERT-base: 12 x 768, FFN 3072 (random weights)
    ours = copy.deepcopy(dense)
    report = apply_factorization(ours, rank=0.25, min_features=256)
    peer = composer_factorization(copy.deepcopy(dense), min_width=256, fraction=0.25, convs=False, linears=True)
    tokens = torch.randint(0, 30522, (32, 128))
    example = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    per_sample = {key: value[:1] for key, value in example.items()}
    title = (f"BERT-base encoder, batch 32 x 128, Linears at 25% rank ({len(report.replaced)} replaced, "
             f"{len(report.skipped)} skipped)")
    return speed_rows(title, dense, {"ours (svd, rank 0.25)": ours, "Composer apply_factorization (0.25)": peer},
                      example, per_sample, 32, repeats)


def resnet(repeats: int) -> str:
    import torchvision

    torch.manual_seed(0)
    dense = torchvision.models.resnet50()
    ours = copy.deepcopy(dense)
    report = apply_factorization(ours, rank=0.25, min_channels=256, exclude_modules=["fc"])
    peer = composer_factorization(copy.deepcopy(dense), min_width=256, fraction=0.25, convs=True, linears=False)
    images = torch.randn(8, 3, 224, 224)
    title = (f"ResNet-50, batch 8 x 224^2, convs with >= 256 channels at 25% rank ({len(report.replaced)} replaced, "
             f"{len(report.skipped)} skipped)")
    return speed_rows(title, dense, {"ours (svd, rank 0.25)": ours, "Composer apply_factorization (0.25)": peer},
                      images, images[:1], 8, repeats)


def accuracy(steps: int = 400) -> str:
    torch.manual_seed(0)
    train, val = digits_dataloaders(batch_size=64)
    dense = nn.Sequential(nn.Flatten(), nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10))
    train_steps(dense, train, steps)

    calibration = [images for images, _ in train][:8]
    rows = [["dense (trained)", "-", f"{loader_accuracy(dense, val):.3f}"]]
    for rank in (128, 32, 8):
        variants = {
            "ours, init=svd": lambda m, rank=rank: apply_factorization(m, rank=rank, min_features=256),
            "ours, init=activation": lambda m, rank=rank: apply_factorization(m, rank=rank, init="activation",
                                                                   calibration=calibration, min_features=256),
            "Composer apply_factorization": lambda m, rank=rank: composer_factorization(m, min_width=256, fraction=rank,
                                                                             convs=False, linears=True),
        }
        for name, surgery in variants.items():
            model = copy.deepcopy(dense)
            surgery(model)
            rows.append([name, f"{rank} of 512", f"{loader_accuracy(model, val):.3f}"])
    title = (f"Accuracy right after surgery: 64-512-512-10 MLP trained {steps} steps on scikit-learn digits "
             f"({len(val.dataset)} held-out images); the 512 x 512 layer is factorized")
    return f"### {title}\n\n" + markdown_table(["surgery", "rank", "val accuracy, no fine-tuning"], rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes per model (median reported)")
    run_parts(parser, {"bert": lambda args: bert(args.repeats), "resnet": lambda args: resnet(args.repeats),
                       "accuracy": lambda args: accuracy()})


if __name__ == "__main__":
    main()
