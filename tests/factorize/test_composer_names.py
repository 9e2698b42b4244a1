"""Composer's Factorize arguments with Composer's meaning: the ranks match Composer's own implementation, and its
method card's two examples run with ``algos`` in place of ``composer`` (keeping the trained function, which
Composer's re-initialised factors do not)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from composer.algorithms.factorize import FactorizedConv2d as ComposerConv2d
from composer.algorithms.factorize import FactorizedLinear as ComposerLinear
from composer.algorithms.factorize import apply_factorization as composer_apply_factorization
from composer.models import ComposerClassifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import algos
from algos import FactorizedConv2d, FactorizedLinear

CARD_FUNCTIONAL = dict(factorize_convs=True, factorize_linears=True, min_channels=512, latent_channels=0.25,
                       min_features=512, latent_features=0.25)
CARD_TRAINER = dict(factorize_convs=True, factorize_linears=True, min_channels=256, latent_channels=0.25,
                    min_features=256, latent_features=128)


def varied_layers() -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict({
        "conv": nn.Conv2d(256, 256, 3),
        "conv_narrow_in": nn.Conv2d(96, 512, 3),  # Composer's fraction is of min(C_in, C_out) = 96, not of 512
        "pointwise": nn.Conv2d(300, 300, 1),  # break-even 150
        "grouped": nn.Conv2d(256, 256, 3, groups=2),
        "linear": nn.Linear(512, 1024),
        "square": nn.Linear(256, 256),  # break-even 128: latent_features=128 leaves it dense
        "odd": nn.Linear(300, 700),
        "small": nn.Linear(64, 64),
    })


@pytest.mark.parametrize("kwargs", [
    CARD_FUNCTIONAL,
    CARD_TRAINER,
    dict(min_channels=64, latent_channels=0.3, min_features=64, latent_features=0.3),  # fractions rounded down
    dict(min_channels=1, latent_channels=100, min_features=1, latent_features=100),  # absolute ranks
    dict(CARD_TRAINER, factorize_convs=False),
    dict(CARD_TRAINER, factorize_linears=False),
], ids=["card-functional", "card-trainer", "fractions", "ints", "no-convs", "no-linears"])
def test_ranks_are_composers(kwargs):
    composer_model, ours = varied_layers(), varied_layers()
    composer_apply_factorization(composer_model, **kwargs)
    expected = {fqn: module.latent_size for fqn, module in composer_model.named_modules()
                if isinstance(module, (ComposerConv2d, ComposerLinear))}
    report = algos.apply_factorization(ours, **kwargs)
    assert expected and {row.fqn: row.notes["rank"] for row in report.replaced} == expected


def test_one_latent_name_gives_the_other_composers_default():
    model = varied_layers()
    report = algos.apply_factorization(model, latent_features=64, min_features=256, min_channels=256)
    # latent_channels takes Composer's 0.25: 64 for the 256-channel conv, 75 for the 300-channel pointwise one
    assert {row.fqn: row.notes["rank"] for row in report.replaced} == {"conv": 64, "pointwise": 75, "linear": 64,
                                                                      "square": 64, "odd": 64}


class CardNet(nn.Module):
    """A conv net with an MLP head, wide enough for the card's settings."""

    def __init__(self, width: int):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = F.relu(self.conv(F.relu(self.stem(x))))
        return self.fc2(F.relu(self.fc1(x.mean((2, 3)))))


def card_net(width: int, ranks: dict[str, int]) -> CardNet:
    """A CardNet whose layers in ``ranks`` have weights of that rank (a trained net's spectra fall off; here they
    stop), so a factorization at that rank keeps the function exactly."""
    torch.manual_seed(0)
    net = CardNet(width)
    with torch.no_grad():
        for name, rank in ranks.items():
            weight = getattr(net, name).weight
            left, values, right = torch.linalg.svd(weight.flatten(1), full_matrices=False)
            weight.copy_(((left[:, :rank] * values[:rank]) @ right[:rank]).reshape(weight.shape))
    return net


def relative_change(model, reference, x) -> float:
    with torch.no_grad():
        return ((model(x) - reference).norm() / reference.norm()).item()


def loader(n=16) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, 4, 4, generator=generator),
                                    torch.randint(0, 10, (n,), generator=generator)), batch_size=8)


def test_card_functional_example():
    model, train_loader = card_net(512, {"conv": 128, "fc1": 128}), loader()
    x = next(iter(train_loader))[0]
    with torch.no_grad():
        reference = model(x)
    composers = copy.deepcopy(model)

    # The card's code, with algos for composer.functional (cf):
    opt = torch.optim.Adam(model.parameters())

    # only need to pass in opt if apply_factorization is used after optimizer
    # creation; otherwise, only the model needs to be passed in.
    report = algos.apply_factorization(
        model,
        factorize_convs=True,
        factorize_linears=True,
        min_channels=512,
        latent_channels=0.25,
        min_features=512,
        latent_features=0.25,
        optimizers=opt
    )
    # 0.25 * 512 = 128 for both; the stem (3 channels in) and fc2 (10 features out) are too narrow
    assert {row.fqn: row.notes["rank"] for row in report.replaced} == {"conv": 128, "fc1": 128}
    assert isinstance(model.conv, FactorizedConv2d) and isinstance(model.fc1, FactorizedLinear)
    assert relative_change(model, reference, x) < 1e-4  # the function is kept
    composer_apply_factorization(composers, **CARD_FUNCTIONAL)
    assert composers.conv.latent_size == 128 and relative_change(composers, reference, x) > 0.5  # Composer's is not

    loss_fn = F.cross_entropy
    model.train()

    for epoch in range(1):  # noqa: B007
        for X, y in train_loader:
            y_hat = model(X)
            loss = loss_fn(y_hat, y)
            loss.backward()
            opt.step()
            opt.zero_grad()

    in_optimizer = {id(p) for group in opt.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters()} and all(p in opt.state for p in model.parameters())


def test_card_trainer_example():
    net = card_net(256, {"conv": 64, "fc1": 128})
    model = ComposerClassifier(net, num_classes=10)
    train_dataloader, eval_dataloader = loader(), loader(8)
    x = next(iter(train_dataloader))[0]
    with torch.no_grad():
        reference = net(x)

    # The card's code, with algos for composer.algorithms:
    from composer.trainer import Trainer

    from algos import Factorize

    factorize = Factorize(
        factorize_convs=True,
        factorize_linears=True,
        min_channels=256,
        latent_channels=0.25,
        min_features=256,
        latent_features=128
    )

    trainer = Trainer(
        model=model,
        train_dataloader=train_dataloader,
        eval_dataloader=eval_dataloader,
        max_duration='10ep',
        algorithms=[factorize]
    )

    # at INIT: 0.25 * 256 = 64 channels for the conv, 128 features for fc1 (256 -> 512, break-even 170.7)
    assert {row.fqn: row.notes["rank"] for row in factorize.reports[0].replaced} == {"module.conv": 64,
                                                                                     "module.fc1": 128}
    net.eval()
    assert relative_change(net, reference, x) < 1e-4

    trainer.fit()

    assert int(trainer.state.timestamp.epoch) == 10
    assert isinstance(net.conv, FactorizedConv2d) and net.fc1.rank == 128


def test_repr_with_composers_names_round_trips():
    algorithm = algos.Factorize(factorize_convs=False, latent_features=128, min_features=512)
    assert repr(algorithm) == "Factorize(min_features=512, factorize_convs=False, latent_features=128)"
    assert repr(eval(repr(algorithm), vars(algos))) == repr(algorithm)
