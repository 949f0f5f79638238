"""Block-wise weight quantization in numpy: round to nearest, HQQ and GPTQ.

Every function takes a float weight W [K, N] (the MatMul's right-hand side: K input
channels, N outputs) and returns a :class:`Blocks`: codes [N, n_blocks, block_size]
(the last block padded), one scale per block and a zero point per block (uint8,
float for HQQ, or none when symmetric), the layout of com.microsoft.MatMulNBits
before bit packing. Each block holds ``block_size`` consecutive input channels of
one output column, so dequantization is ``(code - zero) * scale`` per block.

Symmetric blocks use the signed range [-2^(b-1), 2^(b-1) - 1] around the default
zero point 2^(b-1) (the zero-point input is then left out): the value of largest
magnitude maps to -2^(b-1) exactly, so its scale may be negative, as in ONNX
Runtime's own quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class Blocks:
    codes: np.ndarray            # uint8 [N, n_blocks, block_size], values in [0, 2^bits - 1]
    scales: np.ndarray           # float32 [N, n_blocks]
    zeros: Optional[np.ndarray]  # uint8 or float32 [N, n_blocks]; None: symmetric (zero point 2^(bits-1))
    k: int
    bits: int

    @property
    def block_size(self) -> int:
        return self.codes.shape[2]

    def dequantize(self) -> np.ndarray:
        """The float weight [K, N] these blocks stand for."""
        zero = np.float32(2 ** (self.bits - 1)) if self.zeros is None else self.zeros.astype(np.float32)[..., None]
        w = (self.codes.astype(np.float32) - zero) * self.scales.astype(np.float32)[..., None]
        return np.ascontiguousarray(w.reshape(w.shape[0], -1)[:, :self.k].T)


def to_blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """W [K, N] as float32 blocks [N, n_blocks, block_size]; the last block padded with its own
    last value, so padding changes no block's range (MatMulNBits never reads it)."""
    k, n = w.shape
    blocks = -(-k // block_size)
    wt = np.asarray(w, np.float32).T
    if blocks * block_size != k:
        wt = np.pad(wt, ((0, 0), (0, blocks * block_size - k)), mode="edge")
    return wt.reshape(n, blocks, block_size)


# Range search: each block's min and max (or largest magnitude) shrunk by the factor, from these,
# with the least squared error (the GPTQ reference's ``mse`` option and ORT RTN's clip ratios, by a grid).
SHRINKS = np.linspace(1.0, 0.8, 21)


def _minmax_params(b: np.ndarray, bits: int, symmetric: bool,
                   search: bool = False) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Scale and uint8 zero point (None when symmetric) of each block of ``b`` [..., block_size]; with
    ``search`` the range shrink of least squared error per block (never worse than no shrink)."""
    if symmetric:
        idx = np.argmax(np.abs(b), axis=-1)[..., None]
        lo = hi = np.take_along_axis(b, idx, axis=-1)[..., 0]   # the signed value of largest magnitude
    else:
        lo = np.minimum(b.min(axis=-1), 0.0)   # the range holds 0, so the zero point is a code
        hi = np.maximum(b.max(axis=-1), 0.0)
    best = _range_params(lo, hi, bits, symmetric, 1.0)
    if not search:
        return best
    work = np.empty_like(b, dtype=np.float32)
    best_err = _sq_error(b, *best, bits, work)
    for shrink in SHRINKS[1:]:
        scale, zero = _range_params(lo, hi, bits, symmetric, float(shrink))
        err = _sq_error(b, scale, zero, bits, work)
        better = err < best_err
        if better.any():
            best_err = np.where(better, err, best_err)
            best = (np.where(better, scale, best[0]),
                    None if zero is None else np.where(better, zero, best[1]))
    return best


def _range_params(lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool,
                  shrink: float) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Scale and zero point of blocks whose range is [lo, hi] shrunk by ``shrink`` (symmetric: ``lo`` is
    the signed value of largest magnitude, mapped to -2^(bits-1))."""
    qmax = 2 ** bits - 1
    if symmetric:
        scale = (lo * shrink / -(2 ** (bits - 1))).astype(np.float32)
        scale[scale == 0] = 1.0
        return scale, None
    scale = ((hi - lo) * shrink / qmax).astype(np.float32)
    scale[scale == 0] = 1.0
    zero = np.clip(np.round(-lo * shrink / scale), 0, qmax)
    return scale, zero.astype(np.uint8)


def _sq_error(b: np.ndarray, scale: np.ndarray, zero: Optional[np.ndarray], bits: int,
              work: Optional[np.ndarray] = None) -> np.ndarray:
    """Squared error of each block quantized with ``scale`` and ``zero`` (in place in ``work``)."""
    z = np.float32(2 ** (bits - 1)) if zero is None else zero.astype(np.float32)[..., None]
    s = scale[..., None]
    d = np.divide(b, s, out=work) if work is not None else b / s
    np.round(d, out=d)
    d += z
    np.clip(d, 0, 2 ** bits - 1, out=d)
    d -= z
    d *= s
    d -= b
    return np.einsum("...i,...i->...", d, d)


def _codes(b: np.ndarray, scale: np.ndarray, zero: Optional[np.ndarray], bits: int) -> np.ndarray:
    qmax = 2 ** bits - 1
    z = np.float32(2 ** (bits - 1)) if zero is None else zero.astype(np.float32)[..., None]
    return np.clip(np.round(b / scale[..., None]) + z, 0, qmax).astype(np.uint8)


def rtn(w: np.ndarray, bits: int, block_size: int, symmetric: bool = False, search: bool = True) -> Blocks:
    """Round to nearest: each block's scale from its min and max (or its largest magnitude); with
    ``search``, shrunk where that lowers the block's squared error, then refitted by least squares
    given the codes (:func:`_refit_scale`)."""
    b = to_blocks(w, block_size)
    scale, zero = _minmax_params(b, bits, symmetric, search)
    if search:
        scale = _refit_scale(b, scale, zero, bits)
    return Blocks(_codes(b, scale, zero, bits), scale, zero, w.shape[0], bits)


def _refit_scale(b: np.ndarray, scale: np.ndarray, zero: Optional[np.ndarray], bits: int,
                 rounds: int = 3) -> np.ndarray:
    """Each block's least-squares scale given its codes and (integer) zero point, w ≈ scale * (code - zero),
    then the codes again; kept per block only where the squared error falls."""
    z = np.float32(2 ** (bits - 1)) if zero is None else zero.astype(np.float32)[..., None]
    err = _sq_error(b, scale, zero, bits)
    for _ in range(rounds):
        c = _codes(b, scale, zero, bits) - z
        den = np.einsum("...i,...i->...", c, c)
        num = np.einsum("...i,...i->...", c, b)
        ok = (den > 0) & (num != 0)
        fitted = np.where(ok, num / np.where(ok, den, 1.0), scale).astype(np.float32)
        new_err = _sq_error(b, fitted, zero, bits)
        better = new_err < err
        if not better.any():
            break
        scale, err = np.where(better, fitted, scale), np.where(better, new_err, err)
    return scale


HQQ_SHRINKS = (1.0, 0.95, 0.9, 0.85)  # the min-max range scaled about its middle, for hqq's scale search


def hqq(w: np.ndarray, bits: int, block_size: int, iters: int = 20, lp_norm: float = 0.7,
        beta: float = 10.0, kappa: float = 1.01) -> Blocks:
    """Half-quadratic quantization (Badri & Shaji, 2023): the zero point of each block minimises
    the lp norm (p < 1) of the weight error by alternating a generalized soft-threshold of the
    error with a closed-form zero update, from a scale that is the block's min-max range, or that
    range narrowed about its middle (HQQ_SHRINKS: a block's one or two extreme weights then clip a
    little while every other weight gets finer steps). The zero points stay float (MatMulNBits
    takes them in A's type). For each start, each block keeps the zero point of its lowest mean
    absolute error over the iterations, then scale and zero are refitted by least squares given the
    codes (``_refit``); each block keeps the start with the least squared error."""
    qmax = float(2 ** bits - 1)
    b = to_blocks(w, block_size).astype(np.float32)
    lo, hi = b.min(axis=-1, keepdims=True), b.max(axis=-1, keepdims=True)
    mid = (lo + hi) / 2
    best = None
    for shrink in HQQ_SHRINKS:
        scale, zero = _hqq_zero(b, mid - (mid - lo) * shrink, mid + (hi - mid) * shrink, qmax, iters, lp_norm, beta,
                                kappa)
        scale, zero = _refit(b, scale, zero, qmax)
        err = _squared_error(b, scale, zero, qmax)
        if best is None:
            best = [scale, zero, err]
            continue
        better = err < best[2]
        best = [np.where(better, scale, best[0]), np.where(better, zero, best[1]), np.where(better, err, best[2])]
    scale, zero, _ = best
    codes = np.clip(np.round(b / scale + zero), 0, qmax).astype(np.uint8)
    return Blocks(codes, scale[..., 0].astype(np.float32), zero[..., 0].astype(np.float32), w.shape[0], bits)


def _hqq_zero(b: np.ndarray, lo: np.ndarray, hi: np.ndarray, qmax: float, iters: int, lp_norm: float, beta: float,
              kappa: float) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero) of each block: the scale of the range [lo, hi], the zero point HQQ's iterations find."""
    span = hi - lo
    span[span == 0] = qmax
    inv = np.minimum(qmax / span, 2e4)      # the inverse scale (HQQ's form: q = w * inv + zero)
    zero = np.round(-lo * inv)
    best_zero = zero.copy()
    best_err = np.full(zero.shape, np.inf, np.float32)
    for _ in range(iters):
        q = np.clip(np.round(b * inv + zero), 0, qmax)
        r = (q - zero) / inv
        e = b - r
        err = np.abs(e).mean(axis=-1, keepdims=True)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_zero = np.where(better, zero, best_zero)
        if not better.any():
            break
        shrunk = np.sign(e) * np.maximum(np.abs(e) - (1.0 / beta) * np.power(np.abs(e) + 1e-8, lp_norm - 1.0), 0.0)
        zero = np.mean(q - (b - shrunk) * inv, axis=-1, keepdims=True)
        beta *= kappa
    return 1.0 / inv, best_zero


def _squared_error(b: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmax: float) -> np.ndarray:
    d = (np.clip(np.round(b / scale + zero), 0, qmax) - zero) * scale - b
    return np.einsum("...i,...i->...", d, d)[..., None]


def _refit(b: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmax: float,
           rounds: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares scale and zero of each block given its codes (w ≈ scale * (code - zero)), then
    the codes again; kept per block only where the squared error falls."""
    def error(s: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.clip(np.round(b / s + z), 0, qmax), _squared_error(b, s, z, qmax)

    q, err = error(scale, zero)
    for _ in range(rounds):
        qc = q - q.mean(axis=-1, keepdims=True)
        var = np.einsum("...i,...i->...", qc, qc)[..., None]
        cov = np.einsum("...i,...i->...", qc, b - b.mean(axis=-1, keepdims=True))[..., None]
        ok = (var > 0) & (cov > 0)
        s = np.where(ok, cov / np.where(ok, var, 1.0), scale)
        z = np.where(ok, q.mean(axis=-1, keepdims=True) - b.mean(axis=-1, keepdims=True) / s, zero)
        q_new, err_new = error(s, z)
        better = err_new < err
        if not better.any():
            break
        scale, zero, err = np.where(better, s, scale), np.where(better, z, zero), np.where(better, err_new, err)
        q = np.where(better, q_new, q)
    return scale, zero


@dataclass
class Hessian:
    """What GPTQ needs of a layer input's XᵀX, computed once and shared by the layers reading it
    (Q/K/V) and by every chunk of a layer: the channel order, the upper Cholesky factor U of the
    damped inverse (H⁻¹ = UᵀU, in that order) and the channels that never see input."""

    perm: np.ndarray
    u: np.ndarray
    dead: np.ndarray
    act_order: bool


def hessian(gram: np.ndarray, damp: float = 0.01, act_order: bool = False) -> Hessian:
    h = np.array(gram, np.float64, copy=True)
    k = len(h)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    h = h[np.ix_(perm, perm)]
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    return Hessian(perm, _inverse_cholesky_upper(h), dead, act_order)


def gptq(w: np.ndarray, gram: "np.ndarray | Hessian", bits: int, block_size: int, symmetric: bool = False,
         damp: float = 0.01, act_order: bool = False, search: bool = True, lazy: int = 128) -> Blocks:
    """GPTQ (Frantar et al., 2023): quantize the input channels one at a time and spread each
    one's error over the channels not yet quantized, weighted by the inverse Hessian H = XᵀX of
    the layer's input (``gram``, K×K), so the output error ‖X(W - Ŵ)‖² is what is kept small.

    ``damp`` times the mean diagonal is added to H; channels that never see input are set to 0.
    Updates are lazy in batches of ``lazy`` channels. Each quantization block takes its
    parameters from the (error-updated) weights when its first channel is reached; with
    ``act_order`` channels go in order of decreasing H diagonal, and the block parameters are
    fixed beforehand from the original weights (MatMulNBits has no channel permutation).
    ``search``: block ranges by the least-squared-error shrink, as :func:`rtn`. ``gram`` may be
    a :class:`Hessian` already prepared (``damp`` and ``act_order`` are then its own).
    """
    hess = gram if isinstance(gram, Hessian) else hessian(gram, damp, act_order)
    act_order, perm, u = hess.act_order, hess.perm, hess.u
    k, n = w.shape
    qmax = 2 ** bits - 1
    lazy = block_size * max(1, lazy // block_size)       # a quantization block never straddles two batches
    wt = np.array(np.asarray(w, np.float64).T)           # [N, K]: a row per output
    wt[:, hess.dead] = 0.0
    nblocks = -(-k // block_size)
    scales = np.zeros((n, nblocks), np.float32)
    zeros = None if symmetric else np.zeros((n, nblocks), np.uint8)
    if act_order:
        s, z = _minmax_params(to_blocks(wt.T, block_size), bits, symmetric, search)
        scales[:], zeros = s, z
    wt = wt[:, perm]
    codes = np.zeros((n, k), np.uint8)
    zero_of = np.float64(2 ** (bits - 1))

    def round_column(j: int, w1: np.ndarray, i: int) -> np.ndarray:
        col = perm[j]
        blk = col // block_size
        if not act_order and col % block_size == 0:   # channels come in order: a new block starts here
            s, z = _minmax_params(w1[:, i:i + block_size].astype(np.float32)[:, None, :], bits, symmetric, search)
            scales[:, blk] = s[:, 0]
            if zeros is not None:
                zeros[:, blk] = z[:, 0]
        scale = scales[:, blk].astype(np.float64)
        zero = zero_of if zeros is None else zeros[:, blk].astype(np.float64)
        q = np.clip(np.round(w1[:, i] / scale) + zero, 0, qmax)
        codes[:, col] = q
        return (q - zero) * scale

    spread_errors(wt, u, lazy, round_column)
    padded = np.zeros((n, nblocks * block_size), np.uint8)
    padded[:, :k] = codes
    if nblocks * block_size != k:  # padding: the code of zero, never read
        padded[:, k:] = (2 ** (bits - 1)) if zeros is None else zeros[:, -1:]
    return Blocks(padded.reshape(n, nblocks, block_size), scales, zeros, k, bits)


def spread_errors(wt: np.ndarray, u: np.ndarray, lazy: int, round_column) -> None:
    """GPTQ's sweep over the columns of ``wt`` [N, K] (already in the Hessian's order), in lazy
    batches of ``lazy``: ``round_column(j, w1, i)`` rounds column i of the current batch ``w1``
    (column j overall) and returns its dequantized values; its error over U's diagonal is spread
    over the columns after it (H⁻¹ = UᵀU)."""
    k = wt.shape[1]
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1 = wt[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            e = (w1[:, i] - round_column(i1 + i, w1, i)) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err1[:, i] = e
        wt[:, i2:] -= err1 @ u[i1:i2, i2:]


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """U upper triangular with H⁻¹ = UᵀU; the damping grows until H is positive definite."""
    k = len(h)
    extra = 0.0
    scale = float(np.mean(np.diag(h))) or 1.0
    for _ in range(8):
        try:
            lower = np.linalg.cholesky(h + extra * np.eye(k))
            inv = np.linalg.inv(lower)           # L⁻¹
            hinv = inv.T @ inv                   # H⁻¹ = L⁻ᵀ L⁻¹
            return np.linalg.cholesky(hinv).T
        except np.linalg.LinAlgError:
            extra = max(extra * 10.0, 1e-6 * scale)
    raise np.linalg.LinAlgError("the Hessian stays singular after damping")
