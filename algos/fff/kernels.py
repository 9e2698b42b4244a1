"""Compiled CPU kernels: the neuron form's pass per token down the tree, forward and backward, and the leaf form's
hard routing.

Why by hand: PyTorch has no op that walks a tree. Composed from ``index_select`` / ``embedding_bag`` (the fallback
in ``tree.py``), a level costs about ten tensor ops, which is dispatch overhead at small batches, and (tokens, d)
temporaries (gathered rows, products, per-level scatter buffers), which is memory traffic at large ones. A token
needs only its depth + 1 node rows and output rows; these loops read exactly those, once. numba compiles them to
vectorised machine code at first use (a few seconds, then cached on disk where a folder is writable: ``_compiled``)
and needs no C compiler on the machine; without numba, or for what the kernels do not cover (CUDA, half precision,
an activation outside ``CODES``), the PyTorch path runs. Both are tested against ``FFF.forward_reference``, values
and gradients.

Notation (one token x, levels l = 0 .. L-1, node i_l on its path, i_{l+1} = 2 i_l + 1 + [z_l > 0]):
    z_l = w_{i_l} . x + b_{i_l},      m_l = |z_l| (mirrored) or z_l,      a_l = act(m_l)
    y   = sum_l a_l v_{r_l} + b_out,   r_l = 2 i_l + [z_l > 0] (mirrored: an output row per branch) or i_l
Backward, from g = dL/dy:
    dL/da_l = g . v_{r_l},   dL/dz_l = dL/da_l act'(m_l) (sign(z_l) if mirrored),
    dL/dx = sum_l dL/dz_l w_{i_l},   dL/dw_{i_l} += dL/dz_l x,   dL/db_{i_l} += dL/dz_l,   dL/dv_{r_l} += a_l g.
"""

from __future__ import annotations

import math
import warnings

import numpy
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from algos.surgery.tracing import recording_graph

try:
    import numba
    from numba import njit, prange
except ImportError:  # the PyTorch path runs instead
    numba = None

# The activations the kernels know, by code; "identity" is the linear node's.
CODES = {"gelu": 0, "relu": 1, "silu": 2, "tanh": 3, "identity": 4}
ENABLED = numba is not None  # set False to force the PyTorch path (the tests run both)

_UNCACHED_WARNED = False


def _compiled(function):
    """``njit(parallel=True, fastmath=True)``, compiled at first call and cached on disk where numba finds a writable
    folder (``NUMBA_CACHE_DIR``, the package's ``__pycache__``, the user cache). A read-only install with no writable
    HOME has none, and numba refuses ``cache=True`` at decoration, i.e. on ``import algos``: then compile without the
    cache (again each process), with one warning, so the kernels (and Factorize, FNet, ...) still import."""
    global _UNCACHED_WARNED
    try:
        return njit(parallel=True, fastmath=True, cache=True)(function)
    except RuntimeError as error:
        if "no locator available" not in str(error):
            raise
        if not _UNCACHED_WARNED:
            _UNCACHED_WARNED = True
            warnings.warn(f"FFF kernels: numba has no writable cache directory ({error}); compiling without an "
                          "on-disk cache each process; set NUMBA_CACHE_DIR to a writable folder to keep the compiled "
                          "kernels", stacklevel=2)
        return njit(parallel=True, fastmath=True, cache=False)(function)


if numba is not None:
    _SQRT_HALF = 1 / math.sqrt(2)
    _INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)

    @njit(inline="always")
    def _act(m, code):
        if code == 0:  # GELU: m Phi(m)
            return 0.5 * m * (1.0 + math.erf(m * _SQRT_HALF))
        if code == 1:
            return max(m, 0.0)
        if code == 2:  # SiLU: m sigma(m)
            return m / (1.0 + math.exp(-m)) if m > -700.0 else 0.0
        if code == 3:
            return math.tanh(m)
        return m

    @njit(inline="always")
    def _act_grad(m, code):
        if code == 0:  # Phi(m) + m phi(m)
            return 0.5 * (1.0 + math.erf(m * _SQRT_HALF)) + m * _INV_SQRT_2PI * math.exp(-0.5 * m * m)
        if code == 1:
            return 1.0 if m > 0 else 0.0
        if code == 2:  # sigma(m) (1 + m (1 - sigma(m)))
            s = 1.0 / (1.0 + math.exp(-m)) if m > -700.0 else 0.0
            return s * (1.0 + m * (1.0 - s))
        if code == 3:
            t = math.tanh(m)
            return 1.0 - t * t
        return 1.0

    @_compiled
    def _forward(x, weight, bias, out, out_bias, levels, mirrored, code, y, path, logit):
        """y (tokens, d_out), and each token's visited nodes ``path`` and their logits ``logit`` (tokens, levels)."""
        for t in prange(x.shape[0]):
            y[t, :] = out_bias
            node = 0
            for level in range(levels):
                z = bias[node]
                for k in range(x.shape[1]):
                    z += weight[node, k] * x[t, k]
                right = 1 if z > 0 else 0
                a = _act(abs(z) if mirrored else z, code)
                row = 2 * node + right if mirrored else node
                for k in range(y.shape[1]):
                    y[t, k] += a * out[row, k]
                path[t, level], logit[t, level] = node, z
                node = 2 * node + 1 + right

    @_compiled
    def _route(x, weight, bias, depth, leaf):
        """The leaf form's hard routing: the leaf (0 .. 2^depth - 1) each token reaches."""
        for t in prange(x.shape[0]):
            node = 0
            for _ in range(depth):
                z = bias[node]
                for k in range(x.shape[1]):
                    z += weight[node, k] * x[t, k]
                node = 2 * node + 1 + (1 if z > 0 else 0)
            leaf[t] = node - (2**depth - 1)

    @_compiled
    def _backward_tokens(grad_y, weight, out, path, logit, mirrored, code, grad_x, grad_logit, coefficient):
        """Per token: dL/dz_l and a_l (tokens, levels), and dL/dx when ``grad_x`` has rows."""
        for t in prange(path.shape[0]):
            for level in range(path.shape[1]):
                node, z = path[t, level], logit[t, level]
                m = abs(z) if mirrored else z
                row = 2 * node + (1 if z > 0 else 0) if mirrored else node
                grad_a = 0.0
                for k in range(grad_y.shape[1]):
                    grad_a += grad_y[t, k] * out[row, k]
                g = grad_a * _act_grad(m, code)
                if mirrored:
                    g = g if z > 0 else (-g if z < 0 else 0.0)
                grad_logit[t, level], coefficient[t, level] = g, _act(m, code)
                if grad_x.shape[0]:
                    for k in range(weight.shape[1]):
                        grad_x[t, k] += g * weight[node, k]

    @_compiled
    def _backward_params(x, grad_y, path, logit, grad_logit, coefficient, mirrored, chunks,
                         grad_weight, grad_bias, grad_out):
        """dL/dw, dL/db, dL/dv: scatter-adds, split over column chunks so no two threads write one element."""
        d_in, d_out = x.shape[1], grad_y.shape[1]
        for c in prange(chunks):
            lo_in, hi_in = c * d_in // chunks, (c + 1) * d_in // chunks
            lo_out, hi_out = c * d_out // chunks, (c + 1) * d_out // chunks
            for t in range(path.shape[0]):
                for level in range(path.shape[1]):
                    node, z, g = path[t, level], logit[t, level], grad_logit[t, level]
                    row = 2 * node + (1 if z > 0 else 0) if mirrored else node
                    a = coefficient[t, level]
                    for k in range(lo_in, hi_in):
                        grad_weight[node, k] += g * x[t, k]
                    for k in range(lo_out, hi_out):
                        grad_out[row, k] += a * grad_y[t, k]
                    if c == 0:
                        grad_bias[node] += g


_REFERENCES = {"gelu": torch.nn.functional.gelu, "relu": torch.relu, "silu": torch.nn.functional.silu,
               "tanh": torch.tanh}


def activation_code(activation) -> int | None:
    """The code in ``CODES`` of the function ``activation`` computes, found by evaluating it on a grid (float64),
    so any module computing it matches (nn.GELU, HF's GELUActivation, ...); None if it is none of them."""
    z = torch.linspace(-8, 8, 161, dtype=torch.float64)
    try:
        with torch.no_grad():
            values = activation(z.clone())
    except Exception:  # an activation that cannot take a float64 vector is not one of ours
        return None
    for name, reference in _REFERENCES.items():
        if torch.allclose(values, reference(z), rtol=1e-9, atol=1e-9):
            return CODES[name]
    return None


def available(tree, x: torch.Tensor, activation: bool = True) -> bool:
    """Whether the kernels cover this call: numba present and enabled, plain CPU tensors of float32/float64
    throughout, an activation in ``CODES`` (if ``activation``: the routing needs none), and nothing watching the
    ops (a ``torch.compile`` / ``torch.export`` / ``torch.jit.trace`` recording, a dispatch mode such as the report's
    FLOP counter: they see the PyTorch path)."""
    return (ENABLED and type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and tree.node_weight.dtype == x.dtype and tree.node_weight.device.type == "cpu"
            and (not activation or tree.activation_code is not None)
            and not torch.compiler.is_compiling() and not recording_graph()
            and _get_current_dispatch_mode() is None)


def _numpy(tensor: torch.Tensor) -> numpy.ndarray:
    return tensor.detach().contiguous().numpy()


def _set_threads() -> None:
    """numba's threads follow PyTorch's thread count (``torch.set_num_threads``)."""
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)


def neuron_forward(x, weight, bias, out, out_bias, levels: int, mirrored: bool, code: int):
    """y (tokens, d_out) and the path (tokens, levels) as tensors, plus the logits (for the backward)."""
    _set_threads()
    tokens = x.shape[0]
    y = numpy.empty((tokens, out.shape[-1]), dtype=_numpy(x).dtype)
    path = numpy.empty((tokens, levels), dtype=numpy.int64)
    logit = numpy.empty((tokens, levels), dtype=y.dtype)
    _forward(_numpy(x), _numpy(weight), _numpy(bias), _numpy(out.flatten(0, 1)), _numpy(out_bias), levels,
             mirrored, code, y, path, logit)
    return torch.from_numpy(y), torch.from_numpy(path), torch.from_numpy(logit)


def leaf_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, depth: int) -> torch.Tensor:
    """The leaf each token (row of x) reaches on the hard path, as a tensor of int64 (no gradient: hard routing
    has none)."""
    _set_threads()
    leaf = numpy.empty(x.shape[0], dtype=numpy.int64)
    _route(_numpy(x), _numpy(weight), _numpy(bias), depth, leaf)
    return torch.from_numpy(leaf)


class NeuronTree(torch.autograd.Function):
    """The neuron form's forward and backward through the kernels (``tree.FFF._neuron_fast`` calls it)."""

    @staticmethod
    def forward(ctx, x, weight, bias, out, out_bias, levels: int, mirrored: bool, code: int):
        y, path, logit = neuron_forward(x, weight, bias, out, out_bias, levels, mirrored, code)
        ctx.save_for_backward(x, weight, out, path, logit)
        ctx.mirrored, ctx.code = mirrored, code
        ctx.mark_non_differentiable(path)
        return y, path

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _grad_path):
        x, weight, out, path, logit = ctx.saved_tensors
        _set_threads()
        tokens, levels = path.shape
        gy, np_path, np_logit = _numpy(grad_y.to(x.dtype)), path.numpy(), logit.numpy()
        need_x = ctx.needs_input_grad[0]
        grad_x = numpy.zeros(x.shape if need_x else (0, x.shape[1]), dtype=gy.dtype)
        grad_logit = numpy.empty((tokens, levels), dtype=gy.dtype)
        coefficient = numpy.empty((tokens, levels), dtype=gy.dtype)
        flat_out = _numpy(out.flatten(0, 1))
        _backward_tokens(gy, _numpy(weight), flat_out, np_path, np_logit, ctx.mirrored, ctx.code, grad_x,
                         grad_logit, coefficient)
        grad_weight = numpy.zeros(weight.shape, dtype=gy.dtype)
        grad_bias = numpy.zeros(weight.shape[0], dtype=gy.dtype)
        grad_out = numpy.zeros(flat_out.shape, dtype=gy.dtype)
        chunks = max(1, min(numba.get_num_threads() * 4, x.shape[1] // 16))
        _backward_params(_numpy(x), gy, np_path, np_logit, grad_logit, coefficient, ctx.mirrored, chunks,
                         grad_weight, grad_bias, grad_out)
        return (torch.from_numpy(grad_x) if need_x else None, torch.from_numpy(grad_weight),
                torch.from_numpy(grad_bias), torch.from_numpy(grad_out).view(out.shape),
                grad_y.sum(0), None, None, None)
