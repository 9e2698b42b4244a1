"""Image data: the scikit-learn digits (offline), CIFAR-10 (torchvision), ImageNet (an image folder)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from algos.run.data.common import DATA, make_loaders
from algos.run.registry import ConfigError
from algos.run.spec import InputSpec


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
    return make_loaders(TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val]),
                        batch_size)


def digits_dataloaders(batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0):
    """(train, val) digits loaders of ``(image (1, 8, 8) in [0, 1], label)`` (used by ``algos demo``)."""
    return digits(batch_size=batch_size, val_fraction=val_fraction, seed=seed)


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
    return make_loaders(train, val, batch_size, eval_batch_size, num_workers)


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
    return make_loaders(splits["train"], splits["val"], batch_size, eval_batch_size, num_workers)
