import pytest
import torch
from composer.algorithms.warnings import NoEffectWarning
from torch import nn

from algos.surgery import name_matches, select_targets
from algos.surgery.targets import SURGERY_MARKER


def model() -> nn.Module:
    def block():
        return nn.ModuleDict({"query": nn.Linear(4, 4), "value": nn.Linear(4, 4), "out": nn.Linear(4, 8)})

    layers = nn.ModuleList([block(), block()])
    return nn.ModuleDict({"layers": layers, "head": nn.Linear(8, 2), "conv": nn.Conv1d(2, 2, 3)})


ALL_LINEARS = ["layers.0.query", "layers.0.value", "layers.0.out", "layers.1.query", "layers.1.value",
               "layers.1.out", "head"]


@pytest.mark.parametrize(
    "target_modules, exclude_modules, filter_fn, expected",
    [
        (None, None, None, ALL_LINEARS),
        (["head"], None, None, ["head"]),  # exact name
        (["query"], None, None, ["layers.0.query", "layers.1.query"]),  # suffix
        ([".value"], None, None, ["layers.0.value", "layers.1.value"]),  # suffix with a dot
        (["layers.1.out"], None, None, ["layers.1.out"]),  # dotted exact name
        (["uery"], None, None, []),  # a suffix must start at a name boundary
        (r"layers\.\d\.(query|value)", None, None,
         ["layers.0.query", "layers.0.value", "layers.1.query", "layers.1.value"]),  # regex, fullmatch
        ("query", None, None, []),  # regex does not search, it fullmatches
        (None, ["head", "out"], None, ["layers.0.query", "layers.0.value", "layers.1.query", "layers.1.value"]),
        (None, r"layers\.0\..*", None, ["layers.1.query", "layers.1.value", "layers.1.out", "head"]),
        (None, None, lambda m, fqn: m.out_features == 8, ["layers.0.out", "layers.1.out"]),
        (["query", "head"], ["layers.1.query"], lambda m, fqn: True, ["layers.0.query", "head"]),
        (["conv"], None, None, []),  # named, but not of the algorithm's classes
    ],
)
def test_selection_table(target_modules, exclude_modules, filter_fn, expected):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoEffectWarning)
        targets, _ = select_targets(model(), (nn.Linear,), algorithm="T", target_modules=target_modules,
                                    exclude_modules=exclude_modules, filter_fn=filter_fn)
    assert [fqn for fqn, _ in targets] == expected


def test_skipped_rows_carry_reasons():
    _, skipped = select_targets(model(), (nn.Linear,), algorithm="T", exclude_modules=["head"],
                                filter_fn=lambda m, fqn: "query" not in fqn)
    reasons = {skip.fqn: skip.reason for skip in skipped}
    assert reasons["head"] == "excluded by exclude_modules"
    assert reasons["layers.0.query"] == "filter_fn returned False"
    assert len(reasons) == 3


def test_no_match_warns_and_strict_lists_candidates():
    with pytest.warns(NoEffectWarning, match="no Linear module selected"):
        targets, _ = select_targets(model(), (nn.Linear,), algorithm="T", target_modules=["nothing"])
    assert targets == []
    with pytest.raises(ValueError, match=r"candidates: layers\.0\.query \(Linear\)"):
        select_targets(model(), (nn.Linear,), algorithm="T", target_modules=["nothing"], strict=True)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="target_modules='\\(' is not a valid regular expression"):
        select_targets(model(), (nn.Linear,), algorithm="T", target_modules="(")
    with pytest.raises(TypeError, match="exclude_modules must be a list"):
        select_targets(model(), (nn.Linear,), algorithm="T", exclude_modules=[3])
    with pytest.raises(TypeError, match="filter_fn must be a callable"):
        select_targets(model(), (nn.Linear,), algorithm="T", filter_fn="head")


def test_converted_modules_and_their_insides_are_not_candidates():
    m = model()
    setattr(m["layers"][0], SURGERY_MARKER, "T")  # as if a surgery had produced layer 0
    setattr(m["head"], SURGERY_MARKER, "Other")
    targets, skipped = select_targets(m, (nn.Linear,), algorithm="T")
    assert [fqn for fqn, _ in targets] == ["layers.1.query", "layers.1.value", "layers.1.out"]
    assert [(s.fqn, s.reason) for s in skipped] == [("layers.0", "already converted by T")]


def test_targets_never_nest():
    nested = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2))
    targets, _ = select_targets(nested, (nn.Sequential, nn.Linear), algorithm="T")
    assert [fqn for fqn, _ in targets] == ["0", "1"]


def test_name_matches_rules():
    assert name_matches("a.b.query", ["query"]) and name_matches("query", ["query"])
    assert not name_matches("a.bquery", ["query"])
    assert name_matches("a.b", r"a\.\w") and not name_matches("a.bc.d", r"a\.\w+")
    assert not name_matches("anything", None)


def test_plan_names_the_targets_without_touching_the_model():
    """SurgeryAlgorithm.plan: what surgery() would select, with no calibration and no change (the runner's check)."""
    from algos import FFFReplace, FNetMixing
    from tests.helpers import classifier_and_batch

    model, _ = classifier_and_batch("vit")
    before = {name: p.clone() for name, p in model.named_parameters()}
    targets, skipped = FFFReplace(min_width=0, depth=3, init="dense",
                                  target_modules=["encoder_layer_1.mlp"]).plan(model)
    assert targets == ["module.encoder.layers.encoder_layer_1.mlp"] and skipped == []
    targets, _ = FNetMixing(keep_attention_layers=[-1]).plan(model)
    assert len(targets) == 2  # selection only: keeping the last layer is the converter's decision
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
