"""Fourier token mixing (FNet, Lee-Thorp et al. 2021): y = Re(FFT_seq(FFT_hidden(x))), no parameters.

For x of shape (batch, T, D), with F_N the N-point DFT matrix F_N[t, s] = exp(-2 pi i t s / N) = C_N - i S_N
(C = cos, S = sin), the mixing is Re(F_T x F_D) = C_T x C_D - S_T x S_D. Three implementations compute it:

* ``fft``:  torch.fft.fft2 and the real part (the paper).
* ``rfft``: x is real, so its spectrum is Hermitian and half of it is enough: torch.fft.rfft2 gives the columns
  k <= D/2, and Re Y[t, k] = Re Y[-t mod T, D - k] fills in the rest with a flip and a roll (no complex output of
  full size is ever built).
* ``dft``:  GEMMs, z = x @ [C_D | S_D] then C_T z_C - S_T z_S: real arithmetic only, any length and
  dtype, so it traces for torch.compile / ONNX, and it becomes causal by masking C_T and S_T to lower triangles
  (output t then depends on inputs s <= t only; FNetAR-style).

Padding: with ``padding="mask"`` the padded positions are zeroed and the sequence axis is transformed at a fixed
length N = ``max_length`` (zero-extended; the output is cropped back to T), so a real token's output does not depend
on how much padding its batch carries. Causal mixing also uses the fixed N, so a prefix's outputs never change as
the sequence grows, and it always honours the mask, as the causal attention it replaces does: pads are zeroed and
each row's positions are counted over its real tokens (position p is DFT row cumsum(keep)[p] - 1, as HF derives
``position_ids`` from the mask), so a left-padded prompt mixes exactly as it does unpadded.

``norm="ortho"`` scales by 1 / sqrt(N D), which keeps the output's scale that of the input (pre-LN blocks need it);
``"backward"`` (no scaling) is the paper's.

torch.fft has no fp16/bf16 on CPU and only power-of-two lengths in fp16 on CUDA, so every implementation computes
in float32 (autocast off: it would run the ``dft`` GEMMs in fp16) and casts back. float16 tops out at 65504, and the
unscaled ``norm="backward"`` peak is T D mean(x) (98,304 for a mean-1 input of 128 x 768): a float16 output that
would overflow raises an OverflowError naming ``norm="ortho"`` instead of returning inf (bfloat16 has float32's range).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from algos.surgery.pretrained import SPECS
from algos.surgery.tracing import onnx_tracing, recording_graph

IMPLS = ("fft", "rfft", "dft")
NORMS = ("backward", "ortho")
PADDINGS = ("ignore", "mask")
FP16_MAX = torch.finfo(torch.float16).max  # 65504


def mixing_argument_problem(*, impl: str, causal: bool, norm: str | None, padding: str,
                            max_length: int | None) -> str | None:
    """What is wrong with these mixing arguments, in one line, or None (``norm=None`` means: chosen per target)."""
    if impl not in IMPLS:
        return f"impl={impl!r} is not one of {', '.join(map(repr, IMPLS))}."
    if norm is not None and norm not in NORMS:
        return f"norm={norm!r} is not one of {', '.join(map(repr, NORMS))} (or None: per target)."
    if padding not in PADDINGS:
        return f"padding={padding!r} is not one of {', '.join(map(repr, PADDINGS))}."
    if causal and impl != "dft":
        return f"causal=True runs on impl='dft' (lower-triangular DFT matrices); got impl={impl!r}."
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        return f"max_length={max_length!r} must be an int >= 1."
    return None


class FourierMixing(nn.Module):
    """Parameter-free token mixing; ``forward(x, keep=None)`` with x (batch, T, D) and ``keep`` (batch, T) bool,
    True for real tokens (used with ``padding="mask"``).

    ``gate_width=D`` adds the only parameters: a per-channel gate g and shift b on the output,
        y = g * Re(F_T x F_D) + b,   g = 0 and b = 0 at construction (the surgery sets b),
    so a pretrained layer starts from what it had, less the attention's variation around its mean, rather than from
    a Fourier mix its next layers never saw; training grows g (FNetConfig's ``gate``)."""

    def __init__(self, impl: str = "fft", *, causal: bool = False, norm: str = "backward", padding: str = "ignore",
                 max_length: int | None = None, dropout: float = 0.0, gate_width: int | None = None):
        super().__init__()
        problem = mixing_argument_problem(impl=impl, causal=causal, norm=norm, padding=padding, max_length=max_length)
        if problem is not None:
            raise ValueError(f"FourierMixing: {problem}")
        self.impl, self.causal, self.norm, self.padding, self.max_length = impl, causal, norm, padding, max_length
        if self.fixed_length and max_length is None:
            raise ValueError("FourierMixing: causal=True and padding='mask' mix at a fixed length; pass max_length.")
        self.dropout = nn.Dropout(dropout)
        self.gate = self.shift = None
        if gate_width is not None:
            self.gate, self.shift = nn.Parameter(torch.zeros(gate_width)), nn.Parameter(torch.zeros(gate_width))
        self._matrices: dict = {}  # DFT matrices for impl="dft", per size and device; rebuilt on demand, not saved

    @property
    def fixed_length(self) -> bool:
        """Mixing at the fixed length ``max_length`` (causal, or ``padding="mask"``), reading the padding mask."""
        return self.causal or self.padding == "mask"

    def extra_repr(self) -> str:
        return (f"impl={self.impl!r}, causal={self.causal}, norm={self.norm!r}, padding={self.padding!r}, "
                f"max_length={self.max_length}" + ("" if self.gate is None else f", gate_width={len(self.gate)}"))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, history=None) -> torch.Tensor:
        """Mix x (batch, T, D). ``history`` (causal decoding only): a callable that appends this step's projected
        inputs z = [x C_D | x S_D] of shape (batch, T, 2D) to those of the earlier steps and returns them all; x is
        then the newest T positions and only their outputs are computed (the KV cache of a Fourier layer).

        ``keep`` (batch, T) bool, True for real tokens, is used with ``padding="mask"`` and always when causal; a
        causal call may pass it for the whole sequence so far, (batch, past + T), as its left padding sets the
        positions of the new tokens."""
        if history is not None and not self.causal:
            raise ValueError("FourierMixing: cached (incremental) mixing needs causal=True.")
        if self.impl != "dft" and onnx_tracing():
            raise RuntimeError(f"FourierMixing(impl={self.impl!r}): torch.onnx.export's TorchScript exporter has no "
                               "FFT; export with torch.onnx.export(..., dynamo=True) (ONNX's DFT operator, opset "
                               "18) or apply the mixing with impl='dft' (the same result, as GEMMs).")
        if x.numel() == 0:  # an empty batch mixes to an empty output (MKL's FFT refuses zero-sized transforms)
            return x.clone()
        length = x.shape[-2]
        period = self.max_length if self.fixed_length else length
        exporting = recording_graph()  # no value-dependent checks in an exported or traced graph
        masked = keep is not None and self.fixed_length
        with _autocast_off(x.device):
            h = x.float()
            if masked:
                _check_mask_covers(keep, length)
                h = h * keep[:, -length:, None].to(h.dtype)
            if self.impl == "dft":
                z = self._project(h)
                if history is not None:
                    z = history(z)
                positions = _positions(keep, z.shape[-2]) if masked and self.causal else None
                span = z.shape[-2] if positions is None or exporting else int(positions.max()) + 1
                if span > period:
                    raise ValueError(f"FourierMixing: sequence length {span} exceeds max_length {period}.")
                y = self._combine(z, start=z.shape[-2] - length, period=period, positions=positions)
                if masked and self.causal:  # pads (left, inside or right) get no DFT row of their own: output 0
                    y = y * keep[:, -length:, None].to(y.dtype)
            else:
                if length > period:
                    raise ValueError(f"FourierMixing: sequence length {length} exceeds max_length {period}.")
                padded = F.pad(h, (0, 0, 0, period - length)) if period > length else h
                y = (_fft_mix(padded, self.norm) if self.impl == "fft" else _rfft_mix(padded, self.norm))
                y = y[..., :length, :]
        y = _cast_back(y, x.dtype, self.norm)
        if self.gate is not None:  # y = g * mix + b, in the input's dtype
            y = torch.addcmul(self.shift.to(y.dtype), y, self.gate.to(y.dtype))
        return self.dropout(y)

    def _project(self, h: torch.Tensor) -> torch.Tensor:
        """z = x @ [C_D | S_D], (B, T, 2D): the hidden-axis DFT, one GEMM."""
        return h @ self._matrix(("hidden", h.shape[-1], h.device), lambda: _hidden_matrix(h.shape[-1], h.device))

    def _matrix(self, key: tuple, build):
        """The DFT matrices for ``key``, built once per size and device. Not kept while a graph is recorded
        (torch.export, ONNX, torch.compile): the tensors there are the recorder's placeholders, which an eager call
        after the export would otherwise read."""
        matrix = self._matrices.get(key)
        if matrix is None:
            matrix = build()
            if not (recording_graph() or torch.compiler.is_compiling()):
                self._matrices[key] = matrix
        return matrix

    def _combine(self, z: torch.Tensor, start: int, period: int, positions: torch.Tensor | None = None):
        """Rows start .. T-1 of C_T (x C_D) - S_T (x S_D) for the T positions in z: the sequence-axis DFT.

        With a fixed period (causal or padding="mask") the (N, N) matrices are built once and sliced, so position t
        always gets the same row whatever the length; otherwise they are built for N = T. ``positions`` (batch, T):
        the DFT index of each position, per row (causal mixing of a left-padded batch)."""
        total, width = z.shape[-2], z.shape[-1] // 2
        size = period if self.fixed_length else total
        matrices = self._matrix(("sequence", size, width, z.device),
                                lambda: _sequence_matrices(size, width, self.causal, self.norm, z.device))
        if positions is None:
            cos_t, sin_t = (m[start:total, :total] for m in matrices)
        else:
            # per row b, with q = positions[b]: y[b, p] = sum_s C[q_p, q_s] z_C[b, s] - S[q_p, q_s] z_S[b, s]
            # (pads have z = 0, so they add nothing; (batch, T_new, T) matrices, as attention's scores)
            rows, columns = positions[:, start:, None], positions[:, None, :]
            cos_t, sin_t = (m[rows, columns] for m in matrices)
        return cos_t @ z[..., :width] - sin_t @ z[..., width:]


def _positions(keep: torch.Tensor, total: int) -> torch.Tensor | None:
    """The DFT index of each of the last ``total`` positions, q = cumsum(keep) - 1 (real tokens counted from each
    row's first one, as HF's position_ids), or None when it is 0 .. T-1 for every real token (no real token after a
    pad: unpadded or right-padded)."""
    _check_mask_covers(keep, total)
    keep = keep[:, -total:]
    if not recording_graph() and not (keep[:, 1:] & ~keep[:, :-1]).any():
        return None  # (a recorded graph cannot branch on values: there, every batch takes the general path)
    return (keep.long().cumsum(-1) - 1).clamp(min=0)


def _check_mask_covers(keep: torch.Tensor, total: int) -> None:
    if keep.shape[-1] < total:
        raise ValueError(f"FourierMixing: the attention mask covers {keep.shape[-1]} positions but the mixing sees "
                         f"{total} (cache included); pass the mask of the whole sequence, as generate does.")


def _autocast_off(device: torch.device):
    """Autocast would run the dft GEMMs in float16 (overflowing for norm="backward"): mixing stays in float32."""
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else nullcontext()


def _cast_back(y: torch.Tensor, dtype: torch.dtype, norm: str) -> torch.Tensor:
    """y (float32) in the input's dtype, or an OverflowError naming the fix where float16 cannot hold it (inf is
    what the cast would silently give). A non-finite peak came in with the input: passed on, as any layer would."""
    if dtype == torch.float16 and y.numel():
        low, high = torch.aminmax(y.detach())  # one pass, no |y| temporary
        peak = float(torch.maximum(-low, high))
        if FP16_MAX < peak < math.inf:
            fix = ("use norm='ortho', which scales by 1/sqrt(N D)" if norm == "backward"
                   else "run the model in bfloat16 or float32")
            raise OverflowError(f"FourierMixing: norm={norm!r} output peaks at {peak:.0f}, beyond float16's "
                                f"{FP16_MAX:.0f}; {fix}.")
    return y.to(dtype)


def _fft_mix(h: torch.Tensor, norm: str) -> torch.Tensor:
    return torch.fft.fft2(h, dim=(-2, -1), norm=norm).real


def _rfft_mix(h: torch.Tensor, norm: str) -> torch.Tensor:
    width = h.shape[-1]
    half = torch.fft.rfft2(h, dim=(-2, -1), norm=norm).real  # columns k = 0 .. D // 2
    # Re Y[t, k] = Re Y[-t mod T, D - k] for the columns k = D//2 + 1 .. D - 1: source columns D//2 - ... 1
    # reversed, rows t -> -t mod T (flip, then roll by one)
    rest = torch.roll(half[..., 1:width - width // 2].flip(-1).flip(-2), 1, dims=-2)
    return torch.cat([half, rest], dim=-1)


def _angles(points: int, size: int | None = None) -> torch.Tensor:
    """2 pi (t s mod N) / N for t, s < size, in float64: t * s is reduced mod N first, so long sequences keep
    full precision."""
    index = torch.arange(size or points)
    return 2 * math.pi * (torch.outer(index, index) % points).double() / points


def _hidden_matrix(width: int, device) -> torch.Tensor:
    """[C_D | S_D], (D, 2D) float32."""
    angle = _angles(width)
    return torch.cat([angle.cos(), angle.sin()], dim=1).float().to(device)


def _sequence_matrices(points: int, width: int, causal: bool, norm: str, device):
    """(C_N, S_N), (N, N) float32, lower-triangular when causal, with the ``norm`` scale 1 / sqrt(N D) folded in."""
    angle = _angles(points)
    cos_t, sin_t = angle.cos(), angle.sin()
    if causal:
        cos_t, sin_t = cos_t.tril(), sin_t.tril()
    scale = 1 / math.sqrt(points * width) if norm == "ortho" else 1.0
    return (cos_t * scale).float().to(device), (sin_t * scale).float().to(device)


SPECS.register("FourierMixing", FourierMixing,
               lambda m, spec: {"impl": m.impl, "causal": m.causal, "norm": m.norm, "padding": m.padding,
                                "max_length": m.max_length, "dropout": m.dropout.p,
                                "gate_width": None if m.gate is None else len(m.gate)},
               lambda s, child: FourierMixing(s["impl"], causal=s["causal"], norm=s["norm"], padding=s["padding"],
                                              max_length=s["max_length"], dropout=s["dropout"],
                                              gate_width=s.get("gate_width")))
