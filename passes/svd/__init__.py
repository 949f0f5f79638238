"""Low-rank factorization of MatMul/Gemm weights by truncated SVD.

In parts: ``options``; ``collect`` (the layers, from onnxopt.layers, and their inputs' XᵀX from
calibrate); ``ranks`` (decomposition, error curves, rank per layer or under a budget);
``latency`` (the gate that keeps only faster layers). This module runs them and rewrites.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from typing import Any, Iterator, Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt import progress
from onnxopt.pipeline import BN_FOLDED, Pass, PassContext, PassResult, Tolerance, register_pass

from .collect import _calibrate, _collect, _Layer, _round
from .latency import _inferred_shapes, _time_layer
from .options import SvdOptions
from .ranks import _budget, _decompose, _pick_rank

__all__ = ["LowRankSvd", "SvdOptions"]

_SKIPS = ("excluded", "no_constant_weight", "constant_input", "weight_not_2d", "unsupported_dtype", "shared_weight",
          "in_function", "uncalibrated", "not_beneficial", "slower", "old_opset")


@register_pass
class LowRankSvd(Pass):
    """Factor MatMul/Gemm weights W[K,N] into A[K,r]·B[r,N] by truncated SVD. Lossy.

    Y = X·W (+ b) becomes Y = (X·A)·B (+ b), with A = U_r·√S_r and B = √S_r·V_rᵀ, as two
    MatMul (or two Gemm) nodes; the second keeps the original node and its output.
    Gemm: transA, transB and alpha go into the first node / A, beta and C stay on the
    second. MatMul: any batched X with a 2-D constant W (initializer or Constant node).
    fp16 weights stay fp16 (factors computed in float64).

    Rank, one mode at most: ``rank``, ``rank_ratio`` (of min(K, N)), ``energy`` (fraction
    of Σσ² kept, of LᵀW when aware; the default, 0.99), ``tolerance`` (per layer, the smallest rank whose
    relative output error ‖X(W−Ŵ)‖²/‖XW‖², estimated from calibration XᵀX, stays
    under it) or ``param_ratio`` (whole model: greedy over per-layer error curves for
    the ranks that minimise Σ −log(1 − e_layer), e the relative output error, at that
    fraction of the factorable layers' parameters). Ranks are rounded up to a multiple of ``round_to``. A layer is
    factored only when r·(K+N) < K·N, so parameters and FLOPs fall.

    ``aware=true`` whitens W by the Cholesky factor L of the calibration XᵀX (diagonal
    damped): it truncates the SVD of LᵀW and folds L⁻ᵀ back into A, so the truncation
    minimises the output error rather than the weight error (SVD-LLM). The default,
    ``auto``, is aware when calibration data is given, with at least as many activation
    rows as input channels in every layer it reads (fewer leave XᵀX singular: the
    whitening would fit those rows only; a note says so), and plain otherwise; the
    pass's canonical string records which one ran (``aware=true`` or ``aware=false``).

    ``latency_gate`` (on by default) times each factorized layer against the original in
    ORT on a representative input (shape from calibration data, else the graph's shape
    with symbolic dims bound from ``--dim`` or to 1) and keeps it only when faster by
    ``latency_margin``. ``stats["layers"]`` lists every considered layer: K, N, rank,
    estimated errors, timings and whether it was kept.

    The weight may also be read through a 2-D Transpose of a constant (exports without
    constant folding); the Transpose then goes with the automatic ``dce``.

    Left alone and counted (``skipped_<reason>``): excluded names, no constant 2-D
    right-hand weight (activation×activation MatMuls, weights that are overridable
    graph inputs), non-float weights, weights read by several nodes, layers inside
    model-local functions, layers in If/Loop bodies when calibration is needed,
    ranks that would not reduce parameters, and layers the latency gate found slower.
    """

    name = "svd"
    Options = SvdOptions
    exact = False
    tolerance = Tolerance(min_cosine=0.99)
    leaves_dangling = True  # Constant and Transpose nodes that held factored weights
    requires = (BN_FOLDED,)  # factor the weight the layer really applies

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opts: SvdOptions = self.options
        skips: Counter = Counter()
        notes: list[str] = []
        layers = _collect(graph, opts, skips, ctx.opset or 17)
        if opts.aware == "auto":
            opts = _resolve_aware(graph, ctx, opts, layers, notes)
        self.resolved = opts
        if opts.needs_calibration and layers:
            calibrated = [l for l in layers if l.top]
            for l in layers:
                if not l.top:
                    skips["uncalibrated"] += 1
            layers = calibrated
            if layers and any(l.gram is None for l in layers):
                _calibrate(graph, layers, ctx, opts)
        for l in progress.iterate(layers, "svd: decomposing", unit="layer"):
            with _blas_threads(1 if l.k * l.n <= 1 << 22 else None):
                _decompose(l, opts)
        if opts.mode == "param_ratio":
            achieved = _budget(layers, opts)
        else:
            for l in layers:
                l.rank = _pick_rank(l, opts)
        chosen = []
        dense_by_budget = 0
        for l in layers:
            if l.status == "dense_by_budget":
                dense_by_budget += 1
                continue
            if l.rank is None or l.rank * (l.k + l.n) >= l.k * l.n:
                skips["not_beneficial"] += 1
                l.status = "skipped_not_beneficial"
                continue
            chosen.append(l)
        if opts.latency_gate and chosen:
            shapes = _inferred_shapes(graph, ctx, chosen)
            for l in progress.iterate(chosen, "svd: timing layers", unit="layer"):
                _time_layer(l, ctx, shapes)
        names = G.Names(graph)
        factored = []
        for l in chosen:
            if opts.latency_gate and not l.faster(opts.latency_margin):
                skips["slower"] += 1
                l.status = "skipped_slower"
                continue
            _rewrite(l, names, ctx.opset or 17)
            l.status = "factorized"
            factored.append(l)
        stats: dict[str, Any] = {
            "layers_factorized": len(factored),
            "params_before": int(sum(l.k * l.n for l in factored)),
            "params_after": int(sum(l.rank * (l.k + l.n) for l in factored)),
        }
        stats.update({f"skipped_{k}": skips[k] for k in _SKIPS})
        stats["max_weight_error"] = _round(max((l.weight_error(l.rank) for l in factored), default=0.0))
        if opts.needs_calibration:
            stats["max_output_error"] = _round(max((l.output_error(l.rank) for l in factored), default=0.0))
        if opts.mode == "param_ratio":
            total = sum(l.k * l.n for l in layers)
            kept = sum(l.k * l.n for l in layers if l.status != "factorized")
            stats["dense_by_budget"] = dense_by_budget
            stats["param_ratio_planned"] = _round(achieved)
            stats["param_ratio_achieved"] = _round((stats["params_after"] + kept) / total if total else 1.0)
        stats["layers"] = [l.describe() for l in layers]
        return PassResult(bool(factored), stats, notes)


def _resolve_aware(graph: gs.Graph, ctx: PassContext, opts: SvdOptions, layers: list, notes: list) -> SvdOptions:
    """aware=auto: whitened when calibration data gives every layer it can read at least as many
    activation rows as input channels; plain otherwise (with fewer rows XᵀX is singular, and the
    whitened truncation would fit those rows only)."""
    top = [l for l in layers if l.top]
    if ctx.calibration is None or not top:
        return dataclasses.replace(opts, aware=False)
    _calibrate(graph, top, ctx, opts, warn=False)
    thin = [l for l in top if l.rows < l.k]
    if not thin:
        return dataclasses.replace(opts, aware=True)
    plain = dataclasses.replace(opts, aware=False)
    if not plain.needs_calibration:  # as a plain run would: no statistics, timing shapes from the graph
        for l in top:
            l.gram = l.x_shape = None
    notes.append(f"aware=auto -> false: calibration gave fewer activation rows than input channels in {len(thin)} "
                 f"layer(s) (e.g. {thin[0].node.name}: {thin[0].rows} < {thin[0].k}); whitening would fit those rows only")
    return plain


@contextlib.contextmanager
def _blas_threads(limit: Optional[int]) -> Iterator[None]:
    """Single-threaded LAPACK for small layers when threadpoolctl is there: OpenBLAS's threaded
    SVD of a 1024x256 matrix took 2-4 s on a loaded 2-core machine against 0.05 s on one thread."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if limit is None or threadpool_limits is None:
        yield
        return
    with threadpool_limits(limits=limit, user_api="blas"):
        yield


def _rewrite(l: _Layer, names: G.Names, opset: int) -> None:
    r = l.rank
    root = np.sqrt(l.sigma[:r])
    a = l.p[:, :r] * root[None, :] * l.layer.alpha
    b = root[:, None] * l.vt[:r]
    l.layer.factor(a.astype(l.dtype), b.astype(l.dtype), names, opset)
