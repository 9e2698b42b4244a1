"""A surgered model compiles and exports (issue 23, part 4): ``torch.compile`` (AOT autograd, no code generation: the
graph capture and its numerics) and ``torch.export`` of every surgery on a tiny HF model match eager. Under both, the
FFF trees take their PyTorch path (the compiled CPU kernels are not traceable) and an exported leaf-form tree runs
every leaf with its one-hot path (torch.export cannot trace a data-dependent split of the tokens)."""

import pytest
import torch
from torch import nn

import algos
from tests.fnet.test_seq2seq import tiny_gpt2
from tests.surgery.test_copies import bert

SURGERIES = {
    "factorize": (bert, lambda m: algos.apply_factorization(m, rank=0.5, min_features=1)),
    "fff neuron": (bert, lambda m: algos.apply_fff(m, depth=2, min_width=0)),
    "fff leaf": (bert, lambda m: algos.apply_fff(m, depth=2, form="leaf", leaf_width=8, min_width=0)),
    "fnet fft": (bert, lambda m: algos.apply_fnet_mixing(m)),
    "fnet rfft, hybrid": (bert, lambda m: algos.apply_fnet_mixing(m, impl="rfft", keep_attention_layers=[-1])),
    "fnet dft, padding mask": (bert, lambda m: algos.apply_fnet_mixing(m, impl="dft", padding="mask",
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
