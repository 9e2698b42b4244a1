"""apply_fff: which blocks are found and how each is rewired, applying twice, dense initialisation, bad input."""

import copy
import warnings

import pytest
import torch
import torchvision
from composer.algorithms.warnings import NoEffectWarning
from torch import nn
from transformers import BertModel

from algos import FFF, FFFReplace, apply_fff, from_pretrained, save_pretrained
from algos.fff import algorithm
from algos.fff.blocks import TransformerLayerFFF
from tests.helpers import tiny_bert_config, trained_digits_mlp, two_blocks_one_easy


def rel_errors(report):
    return [row.notes["rel_error"] for row in report.replaced]


def test_bert_intermediate_output_pair_becomes_fff_with_layernorm_residual_kept():
    torch.manual_seed(0)
    model = BertModel(tiny_bert_config(num_hidden_layers=2)).eval()
    layer_norm = model.encoder.layer[0].output.LayerNorm
    report = apply_fff(model, min_width=0, depth=2, example_inputs={"input_ids": torch.randint(0, 100, (2, 8))})
    layer = model.encoder.layer[0]
    assert isinstance(layer.intermediate, FFF) and isinstance(layer.output.dense, nn.Identity)
    assert layer.output.LayerNorm is layer_norm
    assert [row.fqn for row in report.replaced] == ["encoder.layer.0.intermediate", "encoder.layer.1.intermediate"]
    assert report.replaced[0].companions == ["encoder.layer.0.output.dense"]
    assert report.replaced[0].old_type == "BertIntermediate"
    # before: both dense layers (2 * 32 * 64 weights + biases); MACs per sample: 8 tokens * 2 * 32 * 64
    assert report.replaced[0].params_before == 2 * 32 * 64 + 64 + 32
    assert report.replaced[0].macs_before == 8 * 2 * 32 * 64
    # after: 3 levels, each a 32-wide dot product and a 32-wide output vector, per token
    assert report.replaced[0].macs_after == 8 * 3 * (32 + 32)
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        expected = layer_norm(layer.intermediate(x) + x)
        torch.testing.assert_close(layer.output(layer.intermediate(x), x), expected)


def test_vit_mlp_blocks_and_sequential_mlps_are_replaced_whole():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32,
                                               mlp_dim=64, num_classes=4, dropout=0.1)
    report = apply_fff(vit, min_width=0, depth=2, form="leaf", leaf_width=8)
    assert [row.fqn for row in report.replaced] == [f"encoder.layers.encoder_layer_{i}.mlp" for i in range(2)]
    block = vit.encoder.layers.encoder_layer_0.mlp
    assert isinstance(block[0], FFF) and isinstance(block[1], nn.Dropout) and block[1].p == 0.1
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    # heads (a Sequential of one Linear) and the encoder stack are not MLP blocks: never candidates
    assert report.skipped == []


def test_transformer_encoder_layer_feed_forward_and_fast_path():
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 48, batch_first=True), 2,
                                    enable_nested_tensor=False).eval()
    apply_fff(encoder, min_width=0, depth=2)
    layer = encoder.layers[0]
    assert isinstance(layer.linear1, TransformerLayerFFF) and isinstance(layer.linear2, nn.Identity)
    assert isinstance(layer.activation, nn.Identity) and isinstance(layer.dropout, nn.Identity)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():  # eval + no grad is where PyTorch would take its fused path, reading linear1.weight
        out = encoder(x)
        by_hand = layer.norm2((h := layer.norm1(x + layer.self_attn(x, x, x)[0])) + layer.linear1(h))
    torch.testing.assert_close(encoder.layers[0](x), by_hand)
    assert out.shape == x.shape


def test_transformer_decoder_layer_feed_forward():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 2, 48, dropout=0.0, batch_first=True).eval()
    x, memory = torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    report = apply_fff(layer_holder := nn.Sequential(layer), min_width=0, depth=2)
    assert [row.fqn for row in report.replaced] == ["0.linear1"]
    h = layer.norm2((h := layer.norm1(x + layer.self_attn(x, x, x)[0])) + layer.multihead_attn(h, memory, memory)[0])
    torch.testing.assert_close(layer_holder[0](x, memory), layer.norm3(h + layer.linear1.fff(h)))


def test_lone_linear_only_when_named_and_non_mlp_targets_are_refused():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 4))
    with pytest.warns(NoEffectWarning, match="no .* module selected"):  # not an MLP shape, no name: nothing to do
        apply_fff(model, min_width=0, depth=1)
    report = apply_fff(model, min_width=0, depth=1, target_modules=["3"])
    assert isinstance(model[3], FFF) and (model[3].in_features, model[3].out_features) == (16, 4)
    assert report.replaced[0].old_type == "Linear"
    with pytest.raises(ValueError, match=r"target '2' is a LayerNorm, not a dense MLP block"):
        apply_fff(model, min_width=0, depth=1, target_modules=["2"])
    outer = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    with pytest.raises(ValueError, match=r"'0' is an nn.Sequential of \(Linear, LayerNorm\)"):
        apply_fff(outer, min_width=0, depth=1, target_modules=["0"])
    with pytest.raises(ValueError, match="init='dense' needs an MLP block .* '0' is a lone nn.Linear"):
        apply_fff(nn.Sequential(nn.Linear(8, 8)), min_width=0, depth=1, target_modules=["0"], init="dense",
                  calibration=torch.randn(4, 8))


@pytest.mark.parametrize("form", ["neuron", "leaf"])
def test_dense_init_reproduces_the_trained_mlp_better_than_scratch(form):
    errors = {}
    trained, x, y = trained_digits_mlp()
    for init in ("scratch", "dense"):
        model = copy.deepcopy(trained)
        report = apply_fff(model, min_width=0, depth=3, form=form, leaf_width=16, init=init, calibration=x)
        errors[init] = rel_errors(report)[0]
        accuracy = (model(x).argmax(1) == y).float().mean()
        if init == "dense":
            assert accuracy > 0.5  # the converted tree still classifies, before any training
    assert errors["dense"] < 0.6 * errors["scratch"], errors


@pytest.mark.parametrize("depth", [0, 2])
def test_dense_init_with_leaves_as_wide_as_the_mlp_is_exact(depth):
    model, x, _ = trained_digits_mlp(hidden=32)
    dense = nn.Sequential(*model[0])
    report = apply_fff(model, min_width=0, depth=depth, form="leaf", leaf_width=32, init="dense", calibration=x)
    assert rel_errors(report)[0] < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), dense(x), rtol=1e-4, atol=1e-4)


def test_dense_init_splits_calibration_tokens_evenly():
    model, x, _ = trained_digits_mlp()
    apply_fff(model, min_width=0, depth=3, form="leaf", leaf_width=8, init="dense", calibration=x)
    tree = model[0]
    tree.train(), tree.leaf_usage.zero_()
    tree.hard_training = True
    tree(x)
    usage = tree.leaf_usage.float()
    assert usage.min() > 0.5 * usage.mean() and usage.max() < 1.5 * usage.mean()


def test_optimizer_holds_the_new_parameters_and_not_the_old():
    model, _, _ = trained_digits_mlp(steps=1)
    optimizer = torch.optim.Adam(model.parameters())
    old = {id(p) for p in model.parameters()}
    apply_fff(model, min_width=0, depth=2, optimizers=optimizer)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters()} and not in_optimizer & old


@pytest.mark.parametrize("kwargs,message", [
    (dict(depth=-1), "FFFReplace: depth=-1 must be an int >= 0"),
    (dict(depth=2, form="leaf", leaf_width=0), "FFFReplace: leaf_width=0 must be an int >= 1"),
    (dict(depth=2, init="pca"), "init='pca' is not one of 'scratch', 'dense'"),
    (dict(depth=2, init="dense"), "init='dense' needs calibration="),
    (dict(depth=2, max_params=-1), "max_params=-1 must be"),
    (dict(depth=8, max_params=1.0), r"depth=8 gives '0' a tree of 43,445 parameters, more than max_params=1.0 "
                                    r"allows \(4,810; the dense block has 4,810\); depth <= 4 fits"),
    (dict(depth=2, init="dense", calibration=torch.randn(4, 32)),
     r"calibration input of width 32 reached '0' \(expecting 64\)"),
    (dict(depth=1, form="leaf", init="dense", mac_budget=1.5), r"mac_budget=1.5 must be in \(0, 1\]"),
    (dict(depth=1, init="dense", mac_budget=0.5), "mac_budget needs form='leaf' and init='dense' .*not "
                                                  "form='neuron', init='dense'"),
    (dict(depth=1, form="leaf", mac_budget=0.5), "mac_budget needs form='leaf' and init='dense'"),
    # 64 -> 64 -> 10: (1 * 64 + 16 * (64 + 10)) / (64 * (64 + 10)) = 26.4% of the MACs per token
    (dict(depth=1, form="leaf", init="dense", leaf_width=16, mac_budget=0.1, calibration=torch.randn(64, 64)),
     r"^FFFReplace: mac_budget=0.1 cannot be met: leaf width 16 in every converted block already keeps 26.4% of "
     r"their MACs per token; raise mac_budget or lower leaf_width\.$"),
])
def test_bad_input_is_a_one_line_error_and_the_model_is_untouched(kwargs, message):
    model, _, _ = trained_digits_mlp(steps=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message) as error:
        apply_fff(model, min_width=0, **kwargs)
    assert "\n" not in str(error.value)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class DecoderOnItself(nn.Module):
    """An nn.TransformerDecoderLayer attending to its own input, so that one tensor calls it (for calibration)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(16, 2, 48, batch_first=True)

    def forward(self, x):
        return self.layer(x, x)


def model_of(kind):
    """A small eval-mode model holding blocks of ``kind``, an input for it, and apply_fff's selection arguments."""
    torch.manual_seed(0)
    if kind == "bert":
        return BertModel(tiny_bert_config(num_hidden_layers=2)).eval(), {"input_ids": torch.randint(0, 100, (2, 8))}, {}
    if kind == "vit":
        vit = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2,
                                                   hidden_dim=32, mlp_dim=64, num_classes=4, dropout=0.1)
        return vit.eval(), torch.randn(2, 3, 16, 16), {}
    tokens = torch.randn(2, 5, 16)
    if kind == "sequential":
        return nn.Sequential(nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 16)), nn.ReLU()), tokens, {}
    if kind == "encoder_layer":
        layer = nn.TransformerEncoderLayer(16, 2, 48, batch_first=True)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval(), tokens, {}
    if kind == "decoder_layer":
        return DecoderOnItself().eval(), tokens, {}
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), tokens, {"target_modules": ["2"]}


def call(model, inputs):
    with torch.no_grad():
        output = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output


def applied_recording_warnings(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = apply_fff(model, **{"min_width": 0, **kwargs})
    return report, {(w.category, str(w.message)) for w in caught}


@pytest.mark.parametrize("kind,init", [(kind, init) for kind in ("bert", "vit", "sequential", "encoder_layer",
                                                                 "decoder_layer", "linear") for init in
                                       ("scratch", "dense") if (kind, init) != ("linear", "dense")])
def test_applying_twice_is_applying_once(kind, init):
    model, inputs, selection = model_of(kind)
    kwargs = dict(depth=2, init=init, calibration=[inputs] if init == "dense" else None, **selection)
    once, warned_once = applied_recording_warnings(model, **kwargs)
    assert once.replaced
    modules = [(name, type(module)) for name, module in model.named_modules()]
    state = {key: value.clone() for key, value in model.state_dict().items()}
    output, params = call(model, inputs), sum(p.numel() for p in model.parameters())

    twice, warned_twice = applied_recording_warnings(model, **kwargs)
    assert twice.replaced == [] and twice.skipped
    assert {skip.reason for skip in twice.skipped} == {"already converted by FFFReplace"}
    assert warned_twice <= warned_once
    assert [(name, type(module)) for name, module in model.named_modules()] == modules
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert sum(p.numel() for p in model.parameters()) == params
    torch.testing.assert_close(call(model, inputs), output, rtol=0, atol=0)
    assert FFFReplace(min_width=0, depth=2, strict=True, **selection).plan(model) == ([], twice.skipped)


def test_a_block_whose_dense_layer_was_replaced_is_no_dense_block():
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 48), 1, enable_nested_tensor=False)
    apply_fff(encoder, min_width=0, depth=1, target_modules=["linear2"])
    with pytest.raises(ValueError, match=r"'layers.0' is a TransformerEncoderLayer whose dense layer was replaced "
                                         r"\(FFF from FFFReplace\); target_modules must name"):
        apply_fff(encoder, min_width=0, depth=2, target_modules=["layers.0"])
    assert [skip.reason for skip in apply_fff(encoder, min_width=0,
                                              depth=2).skipped] == ["already converted by FFFReplace"]


def test_a_model_that_is_the_mlp_says_how_to_convert_it():
    mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    _, warned = applied_recording_warnings(mlp, depth=2)
    ((category, message),) = warned
    assert category is NoEffectWarning and "\n" not in message
    assert message == ("FFFReplace: the model itself is the MLP block (a Sequential), and the root module cannot be "
                       "replaced in place; wrap it (model = nn.Sequential(mlp); apply_fff(model, ...) puts the tree "
                       "at model[0]) or, for a tree from scratch, build it: FFF(8, 8, depth=2); the model is "
                       "unchanged.")
    assert isinstance(mlp[0], nn.Linear)
    with pytest.warns(NoEffectWarning, match="the model itself is the MLP block"):  # the dry run says it too
        assert FFFReplace(min_width=0, depth=2).plan(mlp) == ([], [])
    with pytest.raises(ValueError, match=r"^FFFReplace: the model itself .* FFF\(8, 8, depth=3, form='leaf', "
                                         r"leaf_width=4, activation=nn.LeakyReLU\(negative_slope=0.2\)\)\.$"):
        apply_fff(nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 8)), min_width=0, depth=3,
                  form="leaf",
                  leaf_width=4, strict=True)
    with pytest.warns(NoEffectWarning, match=r"apply_fff\(nn.Sequential\(layer\), ...\) converts the layer in place"):
        apply_fff(nn.TransformerEncoderLayer(16, 2, 48), min_width=0, depth=2)
    wrapped = nn.Sequential(mlp)  # the advice works
    apply_fff(wrapped, min_width=0, depth=2)
    assert isinstance(wrapped[0], FFF)
    tree = FFF(8, 8, depth=2)  # and so does the call it shows
    assert tree(torch.randn(3, 8)).shape == (3, 8)


def test_a_tree_too_big_for_memory_is_refused_before_anything_is_allocated():
    model, _, _ = trained_digits_mlp(steps=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for attempt in (lambda: apply_fff(model, min_width=0, depth=30), lambda: FFFReplace(min_width=0,
                                                                                        depth=30).plan(model)):
        with pytest.raises(ValueError, match=r"^FFFReplace: depth=30 gives '0' a tree of 182,536,110,005 parameters "
                                             r"\(738\.7 GB\), more than the [\d,.]+ [GM]B of memory available "
                                             r"\(psutil\.virtual_memory\(\)\.available\); depth <= \d+ fits\.$"):
            attempt()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(model[0], nn.Sequential)


def test_memory_refusal_counts_every_tree_and_names_the_deepest_that_fits(monkeypatch):
    model = nn.Sequential(*(nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64)) for _ in range(2)))
    monkeypatch.setattr(algorithm, "available_memory", lambda device: (1_000_000, "a test's budget"))

    def tree_bytes(d):  # float32 parameters and the int64 usage counter
        return 4 * ((2 ** (d + 1) - 1) * (64 + 1 + 2 * 64) + 64) + 8 * 2**d

    assert 2 * tree_bytes(8) <= 1_000_000 < 2 * tree_bytes(9) and tree_bytes(9) <= 1_000_000  # each fits alone
    with pytest.raises(ValueError, match=r"depth=9 gives '0' a tree of 197,503 parameters \(0\.8 MB; 2 trees, "
                                         r"1\.6 MB together\), more than the 1\.0 MB of memory available \(a test's "
                                         r"budget\); depth <= 8 fits\.$"):
        apply_fff(model, min_width=0, depth=9)
    assert all(isinstance(block, nn.Sequential) for block in model)


def test_available_memory_is_read_where_the_trees_are_built(monkeypatch):
    assert algorithm.available_memory(torch.device("cpu"))[1] == "psutil.virtual_memory().available"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (5 * 2**30, 80 * 2**30))
    assert algorithm.available_memory(torch.device("cuda", 0)) == (5 * 2**30, "torch.cuda.mem_get_info")
    assert algorithm.available_memory(torch.device("meta")) is None  # nothing is allocated there


def test_blocks_narrower_than_min_width_stay_dense_with_the_reason():
    """Below about 128 features a tree is slower than its dense block at batch 1 (benchmarks/fff.py --parts width),
    so by default such blocks are skipped, as Factorize skips layers below min_features; min_width=0 converts all."""
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64)),
                             nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 128)))
    with pytest.warns(NoEffectWarning, match="all 2 candidates skipped"):
        report = apply_fff(model(), depth=2)
    assert [row.fqn for row in report.replaced] == [] and [skip.fqn for skip in report.skipped] == ["0", "1"]
    assert report.skipped[0].reason.startswith("min(in, out) = 64 below min_width 128")
    wide = nn.Sequential(nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128)), model()[1])
    report = apply_fff(wide, depth=2)
    assert [row.fqn for row in report.replaced] == ["0"] and [skip.fqn for skip in report.skipped] == ["1"]
    assert {row.fqn for row in apply_fff(model(), depth=2, min_width=0).replaced} == {"0", "1"}
    with pytest.raises(ValueError, match=r"min_width=-1 must be an int >= 0"):
        apply_fff(model(), depth=2, min_width=-1)


def test_mac_budget_is_spent_where_the_error_falls_most_and_met_to_within_one_step(tmp_path):
    model, x = two_blocks_one_easy(), torch.randn(512, 32)
    report = apply_fff(model, form="leaf", depth=1, init="dense", leaf_width=8, mac_budget=0.4, min_width=0,
                       calibration=x, example_inputs=x[:4])
    easy, hard = (row.notes["leaf_width"] for row in report.replaced)
    assert [model[0].leaf_width, model[1].leaf_width] == [easy, hard]
    assert easy == 8 and hard > 4 * easy  # the easy block's 8 neurons fit its narrowest leaf
    # per token: depth * d_in (the decision) + w (d_in + d_out) (one leaf) against h (d_in + d_out) dense
    spent = sum(1 * 32 + width * 64 for width in (easy, hard))
    allowed = 0.4 * 2 * 128 * 64
    assert allowed - 8 * 64 < spent <= allowed
    macs_after = sum(row.macs_after for row in report.replaced)  # the report counts the same trees on its own
    assert macs_after <= 0.4 * sum(row.macs_before for row in report.replaced) * 1.01
    assert report.replaced[0].notes["rel_error"] < 1e-4 < report.replaced[1].notes["rel_error"]
    save_pretrained(model, tmp_path / "saved")  # each tree's own width comes back
    loaded = from_pretrained(two_blocks_one_easy(), tmp_path / "saved").eval()
    assert [loaded[0].leaf_width, loaded[1].leaf_width] == [easy, hard]
    torch.testing.assert_close(call(loaded, x), call(model.eval(), x))


def test_mac_budget_keeps_a_block_dense_when_that_is_where_the_budget_helps_most():
    model, x = two_blocks_one_easy(), torch.randn(512, 32)
    report = apply_fff(model, form="leaf", depth=1, init="dense", leaf_width=8, mac_budget=0.7, min_width=0,
                       calibration=x)
    assert [row.fqn for row in report.replaced] == ["0"] and isinstance(model[1], nn.Sequential)
    assert [(row.fqn, row.reason) for row in report.skipped] == [("1", "mac_budget=0.7 keeps it dense")]
