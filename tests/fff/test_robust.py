"""Edges of the FFF module (issue 22): importing where numba cannot cache, empty batches, input dtypes."""

import subprocess
import sys

import pytest
import torch

from tests.helpers import random_tree

NO_CACHE_SCRIPT = """
import numba.core.caching as caching

def read_only(locator):  # what each cache folder numba tries gives on a read-only install with no writable HOME
    raise PermissionError(30, "Read-only file system", locator.get_cache_path())

caching._CacheLocator.ensure_cache_path = read_only

import torch

import algos  # numba used to refuse cache=True here: "cannot cache function '_forward': no locator available"
from algos.fff import kernels
from tests.helpers import random_tree

fff = random_tree("neuron", 4).eval()
x = torch.randn(40, 24)
assert kernels.available(fff, x)
with torch.no_grad():
    torch.testing.assert_close(fff(x), fff.forward_reference(x), rtol=1e-5, atol=1e-5)
print("kernels ran")
"""


@pytest.mark.slow
def test_import_and_kernels_work_where_numba_has_no_writable_cache_folder():
    """A subprocess, since the kernels are decorated (and numba looks for a cache folder) once, on import."""
    result = subprocess.run([sys.executable, "-c", NO_CACHE_SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "kernels ran" in result.stdout
    assert result.stderr.count("FFF kernels: numba has no writable cache directory") == 1, result.stderr
    assert "set NUMBA_CACHE_DIR to a writable folder" in result.stderr


@pytest.mark.parametrize("form,mode", [("neuron", "eval"), ("neuron", "train"), ("leaf", "eval"),
                                       ("leaf", "train"), ("leaf", "hard_training")])
@pytest.mark.parametrize("shape", [(0, 24), (2, 0, 24)])
def test_empty_batch_gives_an_empty_output_and_zero_gradients(form, mode, shape, backend):
    """As nn.Linear: output (..., 0 tokens, out_features) in the graph, every gradient the reference gives zero;
    the leaf form's hardening loss 0 (not NaN) and no token counted."""
    fff = random_tree(form, 3).train(mode != "eval")
    fff.hard_training = mode == "hard_training"
    x = torch.randn(*shape, requires_grad=True)
    grads = []
    for forward in (fff.forward, fff.forward_reference):
        fff.zero_grad()
        x.grad = None
        y = forward(x)
        assert y.shape == (*shape[:-1], 12)
        y.sum().backward()
        grads.append({"x": x.grad, **{name: p.grad for name, p in fff.named_parameters() if p.grad is not None}})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 1
    for name, grad in grads[0].items():
        assert grad.shape == (x if name == "x" else fff.get_parameter(name)).shape and not grad.any()
    assert fff.last_entropy is None if mode != "train" or form == "neuron" else fff.last_entropy == 0
    assert int(fff.leaf_usage.sum()) == 0


@pytest.mark.parametrize("form", ["neuron", "leaf"])
def test_input_dtype_is_checked_as_nn_linear_checks_it(form, backend):
    """An input whose dtype is not the parameters' raises where nn.Linear raises (the neuron form returned the
    parameters' dtype), with FFF and both dtypes named; under CPU autocast float32 / float16 / bfloat16 inputs keep
    running, as Linear's do."""
    for tree_dtype in (torch.float32, torch.float64):
        fff, linear = random_tree(form, 3).to(tree_dtype), torch.nn.Linear(24, 12).to(tree_dtype)
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            for autocast in (False, True):
                x = torch.randn(5, 24, dtype=dtype)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    try:
                        linear(x)
                    except RuntimeError:
                        for training in (True, False):
                            with pytest.raises(RuntimeError, match=rf"^FFF: input dtype {dtype} does not match the "
                                                                   rf"tree's parameters \({tree_dtype}\); convert"):
                                fff.train(training)(x)
                    else:
                        assert fff.train()(x).shape == fff.eval()(x).shape == (5, 12)
