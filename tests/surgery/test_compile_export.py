"""A surgered model compiles and exports (issue 23, part 4): ``torch.compile`` (AOT autograd, no code generation: the
graph capture and its numerics), ``torch.export`` and ONNX (``torch.onnx.export``, both exporters, run in
onnxruntime) of every surgery on a tiny HF model match eager. Under all of them the FFF trees take their PyTorch path
(the compiled CPU kernels are not traceable) and an exported or traced leaf-form tree runs every leaf with its
one-hot path (a graph cannot hold a data-dependent split of the tokens). An ONNX model is run on inputs other than
the example it was exported with (other tokens, other padding): a trace that recorded the example's branch would
pass on the example and fail there."""

import io

import pytest
import torch
from torch import nn

import algos
from tests.helpers import tiny_bert_mlm, tiny_gpt2

SURGERIES = {
    "factorize": (tiny_bert_mlm, lambda m: algos.apply_factorization(m, rank=0.5, min_features=1)),
    "fff neuron": (tiny_bert_mlm, lambda m: algos.apply_fff(m, depth=2, min_width=0)),
    "fff leaf": (tiny_bert_mlm, lambda m: algos.apply_fff(m, depth=2, form="leaf", leaf_width=8, min_width=0)),
    "fnet fft": (tiny_bert_mlm, lambda m: algos.apply_fnet_mixing(m)),
    "fnet rfft, hybrid": (tiny_bert_mlm, lambda m: algos.apply_fnet_mixing(m, impl="rfft", keep_attention_layers=[-1])),
    "fnet dft, padding mask": (tiny_bert_mlm, lambda m: algos.apply_fnet_mixing(m, impl="dft", padding="mask",
                                                                       max_length=16)),
    "gpt-2 causal fnet": (tiny_gpt2, lambda m: algos.apply_fnet_mixing(m, impl="dft", causal=True,
                                                                       scope="decoder", keep_attention_layers=[-1])),
}


class Logits(nn.Module):
    """The HF model as a function of tensors (what compile and export trace)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.options = {"use_cache": False} if "gpt2" in type(model).__module__ else {}  # no KV cache in the graph

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **self.options).logits


def surgered(case: str) -> tuple[nn.Module, tuple]:
    build, surgery = SURGERIES[case]
    model = build()
    surgery(model)
    ids = torch.randint(5, 60, (4, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # a padded row
    return Logits(model).eval(), (ids, mask)


@pytest.mark.slow
@pytest.mark.parametrize("case", SURGERIES)
def test_torch_compile_matches_eager(case):
    model, inputs = surgered(case)
    with torch.no_grad():
        expected = model(*inputs)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")(*inputs)
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", SURGERIES)
def test_torch_export_matches_eager(case):
    model, inputs = surgered(case)
    with torch.no_grad():
        expected = model(*inputs)
    exported = torch.export.export(model, inputs)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(*inputs), expected, atol=1e-5, rtol=1e-5)
        # and the model itself still runs eagerly: nothing the export traced (fake tensors) was kept in it
        torch.testing.assert_close(model(*inputs), expected, atol=0, rtol=0)


def other_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Not the export's example: other tokens (another split over the FFF leaves), a left-padded row (the causal
    mixing's general path) and a right-padded one."""
    ids = torch.randint(5, 60, (4, 16), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, 9:] = 0
    return ids, mask


def onnx_model(model: nn.Module, inputs: tuple, dynamo: bool) -> bytes:
    if dynamo:
        return torch.onnx.export(model, inputs, dynamo=True).model_proto.SerializeToString()
    buffer = io.BytesIO()
    torch.onnx.export(model, inputs, buffer, dynamo=False, opset_version=17, input_names=["ids", "mask"])
    return buffer.getvalue()


@pytest.mark.parametrize("dynamo", [pytest.param(True, marks=pytest.mark.slow), False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("case", SURGERIES)
def test_onnx_export_matches_eager_on_other_inputs(case, dynamo):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, inputs = surgered(case)
    if not dynamo and case.startswith("fnet") and "dft" not in case:  # TorchScript's exporter has no FFT operator
        with pytest.raises(RuntimeError, match=r"impl='r?fft'\): .*dynamo=True.*impl='dft'"):
            onnx_model(model, inputs, dynamo)
        return
    session = onnxruntime.InferenceSession(onnx_model(model, inputs, dynamo))
    other = other_inputs()
    with torch.no_grad():
        expected = model(*other)
    names = [i.name for i in session.get_inputs()]
    (got,) = session.run(None, {name: x.numpy() for name, x in zip(names, other, strict=True)})[:1]
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-5, rtol=1e-5)
