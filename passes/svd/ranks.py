"""Which rank each layer keeps: the (whitened) SVD and its error curves, a rank per layer from
the mode, or per-layer ranks under one parameter budget (param_ratio)."""

from __future__ import annotations

import heapq
import math

import numpy as np

from .collect import _Layer
from .options import DEFAULT_ENERGY, SvdOptions


def _decompose(l: _Layer, opts: SvdOptions) -> None:
    """W = Σ σ_i p_i v_iᵀ (plain: p = u; aware: p = L⁻ᵀu from the SVD of LᵀW) and error curves."""
    w = l.w
    total_w = float(np.sum(w * w))
    if opts.aware and l.gram is not None:
        gram = l.gram
        scale = float(np.mean(np.diag(gram))) or 1.0
        damp = max(opts.damp, 1e-10)
        for _ in range(8):
            try:
                chol = np.linalg.cholesky(gram + damp * scale * np.eye(l.k))
                break
            except np.linalg.LinAlgError:
                damp *= 10.0
        else:  # pragma: no cover - a damped Gram is positive definite
            chol = np.eye(l.k)
        u, s, vt = np.linalg.svd(chol.T @ w, full_matrices=False)
        p = np.linalg.solve(chol.T, u)
    else:
        p, s, vt = np.linalg.svd(w, full_matrices=False)
    l.sigma, l.p, l.vt = s, p, vt
    s2 = s * s
    l.energy_cum = np.concatenate([[0.0], np.cumsum(s2)]) / max(float(s2.sum()), 1e-300)
    # ‖Σ_{i≥r} σ_i p_i v_iᵀ‖² in a metric M is Σ_{i≥r} σ_i² p_iᵀ M p_i (the v_i are orthonormal)
    tail = lambda q: np.concatenate([np.cumsum((s2 * q)[::-1])[::-1], [0.0]])  # noqa: E731
    l.werr = tail(np.sum(p * p, axis=0)) / max(total_w, 1e-300)
    if l.gram is not None:
        out = float(np.sum(w * (l.gram @ w)))
        l.oerr = tail(np.sum(p * (l.gram @ p), axis=0)) / max(out, 1e-300)


def _round_up(r: int, step: int, cap: int) -> int:
    return min(int(math.ceil(max(r, 1) / step) * step), cap)


def _pick_rank(l: _Layer, opts: SvdOptions) -> int:
    m = len(l.sigma)
    mode = opts.mode
    if mode == "rank":
        r = opts.rank
    elif mode == "rank_ratio":
        r = int(math.ceil(opts.rank_ratio * m - 1e-9))
    elif mode == "energy":
        target = opts.energy if opts.energy is not None else DEFAULT_ENERGY
        r = int(np.searchsorted(l.energy_cum, target - 1e-12))
    else:  # tolerance
        curve = l.oerr if l.oerr is not None else l.werr
        r = int(np.argmax(curve <= opts.tolerance)) if np.any(curve <= opts.tolerance) else m
    return _round_up(min(r, m), opts.round_to, m)


def _budget(layers: list[_Layer], opts: SvdOptions) -> float:
    """Greedy: every layer starts at the smallest rank; the step that lowers the cost most
    per parameter is taken until the parameter budget is spent. A layer's cost at rank r
    is -log(1 - e(r)), e its relative output error: about e when small (the errors of a
    stack add up), unbounded as e nears 1 (a layer that loses most of its output ruins
    everything after it, whatever the others keep). A layer's last step is back to
    dense (rank None). Returns the planned ratio."""
    total = sum(l.k * l.n for l in layers)
    if not total:
        return 1.0
    budget = opts.param_ratio * total
    options = []  # per layer: [(params, error, rank)] in increasing params
    for l in layers:
        m, step = len(l.sigma), opts.round_to
        curve = l.oerr if l.oerr is not None else l.werr
        opts_l = []
        r = step if step <= m else m
        while r < m and r * (l.k + l.n) < l.k * l.n:
            opts_l.append((r * (l.k + l.n), -math.log(max(1.0 - float(curve[r]), 1e-9)), r))
            r += step
        opts_l.append((l.k * l.n, 0.0, None))
        options.append(opts_l)
    level = [0] * len(layers)
    spent = sum(o[0][0] for o in options)
    heap = []

    def push(i: int) -> None:
        j = level[i]
        best = None
        for nxt in range(j + 1, len(options[i])):  # best slope to any later option (convex hull step)
            dp = options[i][nxt][0] - options[i][j][0]
            de = options[i][j][1] - options[i][nxt][1]
            slope = de / max(dp, 1)
            if best is None or slope > best[0]:
                best = (slope, nxt)
        if best is not None:
            heapq.heappush(heap, (-best[0], i, best[1], j))

    for i in range(len(layers)):
        push(i)
    while heap:
        _, i, nxt, frm = heapq.heappop(heap)
        if level[i] != frm:
            continue
        cost = options[i][nxt][0] - options[i][frm][0]
        if spent + cost > budget:
            if nxt > frm + 1:  # the hull step does not fit: offer the next single step instead
                dp = options[i][frm + 1][0] - options[i][frm][0]
                de = options[i][frm][1] - options[i][frm + 1][1]
                heapq.heappush(heap, (-de / max(dp, 1), i, frm + 1, frm))
            continue
        spent += cost
        level[i] = nxt
        push(i)
    for l, o, j in zip(layers, options, level):
        l.rank = o[j][2]
        if l.rank is None:
            l.status = "dense_by_budget"
    return spent / total
