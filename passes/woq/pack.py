"""Bit packing for com.microsoft.MatMulNBits and GatherBlockQuantized, and its inverse.

Codes of fewer than 8 bits are packed along the last axis, low-order bits first: for 4 bits
the first value sits in the low nibble of a byte, the second in the high nibble (ONNX
Runtime's contrib op schema). Zero points are packed the same way along the block axis.
"""

from __future__ import annotations

import numpy as np


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., L] -> bytes [..., ceil(L * bits / 8)] (the last byte zero-padded)."""
    codes = np.asarray(codes, np.uint8)
    if bits == 8:
        return np.ascontiguousarray(codes)
    per = 8 // bits
    length = codes.shape[-1]
    pad = (-length) % per
    if pad:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], pad), np.uint8)], axis=-1)
    grouped = codes.reshape(*codes.shape[:-1], -1, per).astype(np.uint8)
    out = np.zeros(grouped.shape[:-1], np.uint8)
    for j in range(per):
        out |= (grouped[..., j] & (2 ** bits - 1)) << (bits * j)
    return out


def unpack(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """The inverse of :func:`pack`: bytes [..., B] -> codes [..., length]."""
    packed = np.asarray(packed, np.uint8)
    if bits == 8:
        return packed[..., :length]
    per = 8 // bits
    parts = [(packed >> (bits * j)) & (2 ** bits - 1) for j in range(per)]
    codes = np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1)
    return codes[..., :length].astype(np.uint8)


def dequantize_matmulnbits(b: np.ndarray, scales: np.ndarray, zero_points, k: int, bits: int,
                           block_size: int) -> np.ndarray:
    """The float weight [K, N] a MatMulNBits node's B, scales and zero points stand for."""
    n, nblocks, _ = b.shape
    codes = unpack(b, bits, block_size).astype(np.float32)                   # [N, nblocks, block]
    if zero_points is None:
        zero = np.full((n, nblocks), 2 ** (bits - 1), np.float32)
    elif np.asarray(zero_points).dtype == np.uint8:
        zero = unpack(zero_points, bits, nblocks).astype(np.float32)
    else:
        zero = np.asarray(zero_points, np.float32).reshape(n, nblocks)
    w = (codes - zero[..., None]) * np.asarray(scales, np.float32).reshape(n, nblocks)[..., None]
    return np.ascontiguousarray(w.reshape(n, -1)[:, :k].T)
