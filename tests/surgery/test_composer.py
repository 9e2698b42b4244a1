"""The core inside a real Composer Trainer: surgery at INIT, logging, and bit-exact checkpoint resume."""

import contextlib
from dataclasses import dataclass

import pytest
import torch
from composer.loggers import InMemoryLogger
from torch import nn

import algos
from algos import Factorize, FFFReplace, SwapLinear
from algos.surgery import Surgery, SurgeryAlgorithm, SurgeryConfig
from algos.surgery.example import SwappedLinear
from tests.helpers import assert_same, check_resume_is_bit_exact, final_state, make_trainer


class Wrapped(nn.Module):
    """Holds a Linear one level deeper, so its weight names differ from the original (``inner.weight``)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.inner = linear

    def forward(self, x):
        return self.inner(x)


@dataclass(frozen=True)
class WrapConfig(SurgeryConfig):
    algorithm = "WrapLinear"


class WrapSurgery(Surgery):
    config_class, classes = WrapConfig, (nn.Linear,)

    def convert(self, module, fqn):
        return Wrapped(module)


class WrapLinear(SurgeryAlgorithm):
    """A third-party algorithm on the core whose checkpoints cannot load into the original architecture."""

    surgery_class = WrapSurgery


def test_fit_runs_surgery_at_init_and_logs_report(composer_model_factory, train_dataloader, tmp_path):
    logger = InMemoryLogger()
    algorithm = SwapLinear(target_modules=["0"])
    trainer = make_trainer(composer_model_factory(), train_dataloader, tmp_path, [algorithm], logger=logger,
                           max_duration="2ba")
    assert isinstance(trainer.state.model.module[0], SwappedLinear)  # at INIT, before fit
    assert isinstance(trainer.state.model.module[3], nn.Linear) and not isinstance(trainer.state.model.module[3],
                                                                                    SwappedLinear)
    optimizer_params = trainer.state.optimizers[0].param_groups[0]["params"]
    assert any(p is trainer.state.model.module[0].weight for p in optimizer_params)
    trainer.fit()
    (report,) = algorithm.reports
    assert report.measured and report.replaced[0].macs_before == 16 * 32
    assert logger.hyperparameters["surgery/SwapLinear/macs_after"] == 16 * 32
    assert logger.hyperparameters["surgery/SwapLinear/params_before"] == 16 * 32 + 32
    assert int(trainer.state.timestamp.batch) == 2


ALGORITHMS = {
    "SwapLinear": SwapLinear,
    "WrapLinear": WrapLinear,
    "SwapLinear-at-1ba": lambda: SwapLinear(apply_at="1ba"),
    "Factorize": lambda: Factorize(rank=4, min_features=1),
    "Factorize-activation": lambda: Factorize(init="activation", calibration_batches=2, min_features=1),
    "Factorize-at-1ba": lambda: Factorize(rank=4, min_features=1, apply_at="1ba"),
    # surgery at the very batch end the checkpoint is saved: new parameters not stepped yet
    "Factorize-at-2ba": lambda: Factorize(rank=4, min_features=1, apply_at="2ba"),
    "FFF-neuron": lambda: FFFReplace(min_width=0, depth=2, target_modules=["0"]),
    # soft training with region leak draws random numbers: Composer's checkpointed RNG state must replay them
    "FFF-leaf-leak": lambda: FFFReplace(min_width=0, depth=2, form="leaf", leaf_width=4, region_leak=0.1,
                                        target_modules=["0"]),
    "FFF-at-1ba": lambda: FFFReplace(min_width=0, depth=2, target_modules=["0"], apply_at="1ba"),
    "FFF-dense-fit": lambda: FFFReplace(min_width=0, depth=2, init="dense", fit_steps=50),
}


@pytest.mark.parametrize("algorithm_class", ALGORITHMS.values(), ids=ALGORITHMS.keys())
@pytest.mark.parametrize("pass_algorithm_again", [False, True])
def test_resume_is_bit_exact(composer_model_factory, train_dataloader, tmp_path, algorithm_class,
                             pass_algorithm_again):
    check_resume_is_bit_exact(composer_model_factory, train_dataloader, tmp_path, algorithm_class,
                              pass_algorithm_again)


def test_excluding_the_algorithm_on_load_leaves_the_original_architecture(composer_model_factory, train_dataloader,
                                                                         tmp_path):
    make_trainer(composer_model_factory(), train_dataloader, tmp_path, [WrapLinear()]).fit()
    with pytest.raises(KeyError, match="module.0.weight"):  # what any third-party surgery hits without the replay
        make_trainer(composer_model_factory(), train_dataloader, tmp_path / "excluded",
                     load_path=str(tmp_path / "checkpoints" / "ep0-ba2-rank0.pt"),
                     load_exclude_algorithms=["WrapLinear"])


def test_repr_is_evaluable_and_required_on_load():
    algorithm = SwapLinear(min_features=8, target_modules=["0", "3"], exclude_modules=r"head\..*")
    assert repr(algorithm) == "SwapLinear(min_features=8, target_modules=['0', '3'], exclude_modules='head\\\\..*')"
    assert repr(eval(repr(algorithm), vars(algos))) == repr(algorithm)
    assert repr(SwapLinear()) == "SwapLinear()"
    assert SwapLinear.required_on_load()
    assert "filter_fn=tests.surgery.test_composer.test_repr_is_evaluable_and_required_on_load.<locals>.<lambda>" \
        in repr(SwapLinear(filter_fn=lambda m, fqn: True))


@pytest.mark.slow
def test_resume_in_a_process_that_never_imports_algos(composer_model_factory, train_dataloader, tmp_path):
    """Loading the checkpoint unpickles the recorded modules, which imports algos and with it the replay hook."""
    import subprocess
    import sys
    import textwrap

    make_trainer(composer_model_factory(), train_dataloader, tmp_path, [SwapLinear()]).fit()
    script = textwrap.dedent(f"""
        import sys, torch
        from torch import nn
        from composer import Trainer
        from composer.models import ComposerClassifier
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))
        assert "algos" not in sys.modules
        trainer = Trainer(model=ComposerClassifier(net, num_classes=4), device="cpu", progress_bar=False,
                          load_path={str(tmp_path / "checkpoints" / "ep0-ba4-rank0.pt")!r})
        print([type(m).__name__ for m in trainer.state.model.module])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "['SwappedLinear', 'ReLU', 'Dropout', 'SwappedLinear']" in result.stdout


@pytest.mark.parametrize("apply_at", [None, "1ba"], ids=["at-INIT", "at-1ba"])
def test_recorded_surgery_wins_over_recomputing_it_on_resume(composer_model_factory, train_dataloader, tmp_path,
                                                             apply_at):
    """Ranks chosen from the weights (energy=) differ on a fresh model with other weights; the checkpoint's win."""
    def algorithm():
        return Factorize(energy=0.5, rank_multiple=1, min_features=1, apply_at=apply_at)

    straight = make_trainer(composer_model_factory(), train_dataloader, tmp_path, [algorithm()])
    straight.fit()
    expected = final_state(straight)
    recorded_rank = straight.state.model.module[0].rank

    fresh = composer_model_factory(seed=1)
    with torch.no_grad():  # a rank-1 first layer: energy=0.5 picks rank 1 here, more in the checkpointed run
        fresh.module[0].weight.copy_(torch.outer(torch.randn(32), torch.randn(16)))
    again = algorithm()
    with pytest.warns(UserWarning, match="differently") if apply_at is None else contextlib.nullcontext():
        resumed = make_trainer(fresh, train_dataloader, tmp_path / "resumed", [again],
                               load_path=str(tmp_path / "checkpoints" / "ep0-ba2-rank0.pt"))
    assert recorded_rank > 1 and resumed.state.model.module[0].rank == recorded_rank
    assert again.applied and not any(type(a).__name__ == "Factorize" and a is not again
                                     for a in resumed.state.algorithms)
    resumed.fit()
    assert_same(final_state(resumed), expected)
    entries = dict(resumed.state.algorithms[0].state_dict()["algos_surgery_record"])
    assert entries["module.0"].rank == recorded_rank  # the next checkpoint records the same surgery


@pytest.mark.parametrize("into", ["composer_model", "network"])
def test_load_model_gives_the_trained_surgered_model_back_outside_a_trainer(composer_model_factory, train_dataloader,
                                                                           tmp_path, into):
    algorithms = [Factorize(energy=0.5, rank_multiple=1, min_features=1, target_modules=["0"]),
                  FFFReplace(min_width=0, depth=2, target_modules=["3"], apply_at="1ba")]
    trainer = make_trainer(composer_model_factory(), train_dataloader, tmp_path, algorithms)
    trainer.fit()
    trained = trainer.state.model.eval()
    checkpoint = tmp_path / "checkpoints" / "ep0-ba4-rank0.pt"
    with pytest.raises(Exception, match="Weights only load failed"):  # why the README says weights_only=False
        torch.load(checkpoint)

    fresh = composer_model_factory(seed=3)  # other initial weights: ranks are not recomputed from them
    target = fresh if into == "composer_model" else fresh.module
    assert algos.load_model(target, checkpoint) is target
    assert [type(m) for m in fresh.module] == [type(m) for m in trained.module]
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values(),
                                                 strict=True))
    x = torch.randn(5, 16)
    assert torch.equal(fresh.module.eval()(x), trained.module(x))


def test_load_model_names_a_model_that_does_not_fit(composer_model_factory, train_dataloader, tmp_path):
    make_trainer(composer_model_factory(), train_dataloader, tmp_path, [SwapLinear()]).fit()
    with pytest.raises(KeyError, match="replaced '3', but this model has no module of that name"):
        algos.load_model(nn.Sequential(nn.Linear(16, 4)), tmp_path / "checkpoints" / "ep0-ba4-rank0.pt")
    with pytest.raises(ValueError, match="not a Composer checkpoint"):
        torch.save({"weights": 1}, tmp_path / "other.pt")
        algos.load_model(nn.Linear(1, 1), tmp_path / "other.pt")


def test_load_model_loads_all_or_says_what_it_did_not(composer_model_factory, train_dataloader, tmp_path):
    """Another model's checkpoint loads nothing: an error, the model untouched (also with strict=False); a partial
    match with strict=False says what was left out; a truncated or empty file is an error naming it."""
    make_trainer(composer_model_factory(), train_dataloader, tmp_path, [SwapLinear(target_modules=["3"])]).fit()
    checkpoint = tmp_path / "checkpoints" / "ep0-ba4-rank0.pt"

    def untouched(model: nn.Module, before: dict, types: list):
        assert [type(m) for m in model.modules()] == types
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    plain = make_trainer(composer_model_factory(), train_dataloader, tmp_path / "plain", max_duration="2ba")
    plain.fit()
    stranger = nn.ModuleDict({"encoder": nn.Linear(16, 32), "head": nn.Linear(32, 4)})
    before, types = {k: v.clone() for k, v in stranger.state_dict().items()}, [type(m) for m in stranger.modules()]
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"^load_model: '.*plain/checkpoints/ep0-ba2-rank0.pt' holds none of "
                                             r"this model's weights \(it has e.g. 'module.0.bias', the model e.g. "
                                             r"'encoder.bias'\); load it into the model its run started from$"):
            algos.load_model(stranger, tmp_path / "plain" / "checkpoints" / "ep0-ba2-rank0.pt", strict=strict)
        untouched(stranger, before, types)

    other = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))
    other.add_module("extra", nn.Linear(4, 4))

    before, types = {k: v.clone() for k, v in other.state_dict().items()}, [type(m) for m in other.modules()]
    with pytest.raises(ValueError, match=r"does not match this model: 2 tensor\(s\) of the model missing "
                                         r"\(extra.bias, extra.weight\); pass strict=False"):
        algos.load_model(other, checkpoint)
    untouched(other, before, types)  # the surgery is not replayed either
    with pytest.warns(UserWarning, match=r"strict=False\) loaded 4 of 6 tensors: 2 tensor\(s\) of the model not "
                                         r"in the checkpoint \(extra.bias, extra.weight\)$"):
        algos.load_model(other, checkpoint, strict=False)
    assert isinstance(other[3], SwappedLinear) and torch.equal(other.extra.weight, before["extra.weight"])
    assert not torch.equal(other[0].weight, before["0.weight"])

    data = checkpoint.read_bytes()
    for name, content in [("truncated.pt", data[: len(data) // 2]), ("empty.pt", b"")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"^load_model: '{tmp_path / name}' is not a readable checkpoint "
                                             r"\(empty, truncated or not written by torch.save: "):
            algos.load_model(composer_model_factory(), tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        algos.load_model(composer_model_factory(), tmp_path / "missing.pt")


def test_load_model_into_a_hugging_face_network_with_several_surgeries(tmp_path):
    from tests.helpers import fixed_batches, tiny_mlm_and_batch

    model, batch = tiny_mlm_and_batch()
    algorithms = [algos.FNetMixing(keep_attention_layers=[-1]), FFFReplace(min_width=0, depth=2, form="leaf",
                                                                           leaf_width=8)]
    trainer = make_trainer(model, fixed_batches(batch), tmp_path, algorithms, max_duration="2ba")
    trainer.fit()
    network = tiny_mlm_and_batch()[0].model  # the BertForMaskedLM itself; the checkpoint's names start "model."
    algos.load_model(network, tmp_path / "checkpoints" / "latest-rank0.pt")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    expected = model.model.eval()(**inputs).logits
    assert torch.equal(network.eval()(**inputs).logits, expected)
