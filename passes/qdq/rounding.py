"""qdq's weight rounding: GPTQ int8 codes chosen on the calibration inputs. Lossy, as any rounding.

Round to nearest makes each weight's error as small as it can be, but a layer's output error is the
sum of many of them: X(W - Ŵ). GPTQ (Frantar et al., 2023) rounds one input channel at a time and
spreads each one's error over the channels not yet rounded, weighted by the inverse of H = XᵀX of the
layer's calibration inputs, so ‖X(W - Ŵ)‖² is what is kept small. The scales stay those of round to
nearest (max |w| / qmax per output channel, or per tensor), so the stored model has the same layout,
ops and size; only the int8 codes differ. On int8 weights this mostly matters for deep convolutional
stacks with folded BatchNorm, where thirty-odd layers of 30-40 dB weight error add up.

Gram matrices are collected in streaming runs over the calibration data, at most GRAM_BYTES of them
per run; a layer whose own matrix is larger, a ConvTranspose, a Conv past 2-D or a layer whose input
is a constant keeps round to nearest (the pass counts both kinds: ``rounding_gptq``,
``rounding_nearest``). The codes are kept in the
pipeline's cache (``ctx.cache``), keyed by the model, so mixed precision's rebuilds and tune's
evaluations of the same model round each weight once.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import layers as L
from onnxopt import progress
from onnxopt.calibrate import GramRequest, input_layout, layer_grams, shared
from ..woq.quantize import hessian, spread_errors

# float64 K×K matrices collected per streaming run over the calibration data
GRAM_BYTES = 256 << 20
# H += DAMP × mean(diag H): keeps the solve stable where calibration rows do not span every channel
DAMP = 0.01


def weight_key(node: gs.Node, axis: int) -> tuple[str, int]:
    """How the writer finds a weight's codes: the weight tensor's name and the scale axis."""
    return node.inputs[1].name, axis


def count_rounding(stats: dict, keys: list[tuple[str, int]], codes: dict) -> None:
    """``rounding_gptq`` / ``rounding_nearest``: how many of these weights got GPTQ codes."""
    stats["rounding_gptq"] = sum(1 for key in keys if key in codes)
    stats["rounding_nearest"] = len(keys) - stats["rounding_gptq"]


def gram_request(node: gs.Node, w: np.ndarray) -> Optional[GramRequest]:
    """XᵀX of the rows this node's input gives against the weight's [out, in] view, or None."""
    x = node.inputs[0]
    if not x.name or isinstance(x, gs.Constant) or node.op == "ConvTranspose":
        return None
    if node.op == "Conv":
        if w.ndim > 4 or w.ndim < 3:
            return None
        groups = int(node.attrs.get("group", 1))
        return GramRequest(x.name, input_layout(node, True, w.shape, groups), int(np.prod(w.shape[1:])), groups)
    if w.ndim != 2:
        return None
    k = w.shape[1] if _layout(node) == "nk" else w.shape[0]
    return GramRequest(x.name, input_layout(node, False, w.shape), int(k))


def _layout(node: gs.Node) -> str:
    if node.op == "Conv":
        return "conv"
    return "nk" if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else "kn"


def gptq_codes(ctx: Any, model: onnx.ModelProto, nodes: list[gs.Node], weights: dict[int, tuple[np.ndarray, int]],
               per_channel: bool, qmax: int, samples: int) -> dict[tuple[str, int], np.ndarray]:
    """int8 codes (in the weight's own shape) for every weighted node that GPTQ can take, keyed by
    :func:`weight_key`; the rest are left to the writer's round to nearest. Scales are the writer's
    (``weight_qparams`` with ``per_channel`` and ``qmax``)."""
    from .writer import weight_qparams

    cache = shared(ctx, model, ("gptq", samples, per_channel, qmax))
    todo: dict[GramRequest, list[gs.Node]] = {}
    done: dict[tuple[str, int], np.ndarray] = {}
    for node in nodes:
        if id(node) not in weights:
            continue
        w, axis = weights[id(node)]
        key = weight_key(node, axis)
        if key in cache:
            done[key] = cache[key]
            continue
        req = gram_request(node, w)
        if req is None or 8 * req.k * req.k * req.groups > GRAM_BYTES:
            continue
        todo.setdefault(req, []).append(node)
    for batch in _runs(list(todo)):
        grams = layer_grams(ctx, model, batch, samples=samples, keep=False)
        for req in progress.iterate(batch, desc="qdq: gptq rounding", unit="input"):
            parts = grams.stats[req]
            # a weight read by several inputs (an unrolled RNN's steps) is rounded once, on the first
            # input's Gram matrix: the others' Hessians (a Cholesky and an inverse each) are not needed
            pending = [n for n in todo[req] if weight_key(n, weights[id(n)][1]) not in done]
            if not pending or not all(p.rows for p in parts):
                continue
            hs = [hessian(p.gram, DAMP, act_order=True) for p in parts]
            for node in pending:
                w, axis = weights[id(node)]
                key = weight_key(node, axis)
                if key in done:
                    continue
                scale = np.asarray(weight_qparams(w, axis if per_channel else None, qmax)[0], np.float64)
                done[key] = cache[key] = _round(node, w, axis, scale, hs, qmax)
    return done


def _runs(requests: list[GramRequest]) -> list[list[GramRequest]]:
    """Requests grouped so that each streaming run holds at most GRAM_BYTES of matrices."""
    runs: list[list[GramRequest]] = []
    size = GRAM_BYTES + 1
    for r in requests:
        need = 8 * r.k * r.k * r.groups
        if size + need > GRAM_BYTES:
            runs.append([])
            size = 0
        runs[-1].append(r)
        size += need
    return runs


def _round(node: gs.Node, w: np.ndarray, axis: int, scale: np.ndarray, hs: list, qmax: int) -> np.ndarray:
    """GPTQ int8 codes of one weight, group by group, back in the weight's shape."""
    layout = _layout(node)
    groups = len(hs)
    m = L.as_matrix(np.asarray(w, np.float64), layout, groups)      # [out, in]
    n = m.shape[0]
    per_out = np.broadcast_to(scale.reshape(-1), (n,)) if scale.size in (1, n) else None
    if per_out is None:
        raise ValueError(f"{node.name}: {scale.size} scales for {n} output channels")
    codes = np.empty(m.shape, np.int8)
    step = n // groups
    for g, h in enumerate(hs):
        rows = slice(g * step, (g + 1) * step)
        codes[rows] = gptq_int8(m[rows], per_out[rows], h, qmax)
    return L.from_matrix(codes, layout, tuple(w.shape), groups)


def gptq_int8(m: np.ndarray, scale: np.ndarray, hess, qmax: int, lazy: int = 128) -> np.ndarray:
    """Symmetric int8 codes of ``m`` [out, in] at fixed per-row ``scale``, input channels in the
    Hessian's order, each one's rounding error spread over the channels still to come."""
    perm = hess.perm
    wt = np.array(m[:, perm], np.float64)
    s = scale.astype(np.float64)
    codes = np.zeros(m.shape, np.int8)

    def round_column(j: int, w1: np.ndarray, i: int) -> np.ndarray:
        q = np.clip(np.round(w1[:, i] / s), -qmax, qmax)
        codes[:, perm[j]] = q
        return q * s

    spread_errors(wt, hess.u, lazy, round_column)
    return codes
