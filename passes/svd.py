"""Low-rank factorization of MatMul/Gemm weights by truncated SVD."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import heapq
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt import layers as L
from onnxopt.calibrate import gram_request, layer_grams
from onnxopt.options import option
from onnxopt.pipeline import BN_FOLDED, Pass, PassContext, PassResult, Tolerance, register_pass

_MODES = ("rank", "rank_ratio", "energy", "tolerance", "param_ratio")
DEFAULT_ENERGY = 0.99
_SKIPS = ("excluded", "no_constant_weight", "constant_input", "weight_not_2d", "unsupported_dtype", "shared_weight",
          "in_function", "uncalibrated", "not_beneficial", "slower", "old_opset")


@dataclass
class SvdOptions:
    rank: Optional[int] = option(None, help="keep this many singular values in every layer")
    rank_ratio: Optional[float] = option(None, help="keep ceil(rank_ratio * min(K, N)) singular values")
    energy: Optional[float] = option(None, help="keep the fewest singular values holding this fraction of sum(s^2); 0.99 when no mode is set")
    tolerance: Optional[float] = option(None, help="per layer: the smallest rank whose relative output error |X(W-W')|^2/|XW|^2 stays under this (calibration)")
    param_ratio: Optional[float] = option(None, help="whole model: per-layer ranks that minimise summed -log(1 - output error) at this ratio of the factorable layers' parameters (calibration)")
    aware: Union[bool, Literal["auto"]] = option("auto", help="whiten by the Cholesky factor of X^T X before truncating (SVD-LLM style; calibration); auto: when calibration data gives every layer at least as many rows as input channels")
    round_to: int = option(8, help="ranks rounded up to a multiple of this")
    latency_gate: bool = option(True, help="time each factorized layer against the original in ORT; keep it only when faster")
    latency_margin: float = option(0.05, help="latency_gate keeps a layer only when faster by at least this fraction")
    damp: float = option(0.01, help="added to the diagonal of X^T X, times its mean, before the Cholesky factorization")
    samples: int = option(512, help="calibration samples read at most")
    exclude: list[str] = option(factory=list, help="node names (globs) left alone")

    def validate(self) -> None:
        chosen = [m for m in _MODES if getattr(self, m) is not None]
        if len(chosen) > 1:
            raise ValueError(f"give at most one of {', '.join(_MODES)}; got {', '.join(chosen)}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        for name in ("rank_ratio", "energy", "param_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.tolerance is not None and not 0.0 < self.tolerance < 1.0:
            raise ValueError(f"tolerance must be in (0, 1), got {self.tolerance}")
        if self.round_to < 1:
            raise ValueError(f"round_to must be at least 1, got {self.round_to}")
        if not 0.0 <= self.latency_margin < 1.0:
            raise ValueError(f"latency_margin must be in [0, 1), got {self.latency_margin}")
        if self.damp < 0.0:
            raise ValueError(f"damp must be non-negative, got {self.damp}")
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1, got {self.samples}")

    @property
    def mode(self) -> str:
        return next((m for m in _MODES if getattr(self, m) is not None), "energy")

    @property
    def needs_calibration(self) -> bool:
        return self.aware is True or self.mode in ("tolerance", "param_ratio")


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
        for l in layers:
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
            for l in chosen:
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


def _round(x: float) -> float:
    return float(f"{x:.4g}")


# ----------------------------------------------------------------- layers

@dataclass(eq=False)
class _Layer:
    layer: L.Layer            # the MatMul/Gemm (onnxopt.layers)
    w: np.ndarray             # float64 [K, N]: op(B) for Gemm, alpha not applied
    gram: Optional[np.ndarray] = None     # XᵀX / rows (undamped), float64 [K, K]
    x_shape: Optional[tuple] = None       # a calibration batch's shape of X
    rows: int = 0                         # activation rows the calibration gave
    # from _decompose: W = Σ σ_i p_i v_iᵀ with v orthonormal
    sigma: Optional[np.ndarray] = None
    p: Optional[np.ndarray] = None        # [K, m]
    vt: Optional[np.ndarray] = None       # [m, N]
    energy_cum: Optional[np.ndarray] = None   # fraction of the (whitened when aware) Σσ² kept at rank r, r = 0..m
    werr: Optional[np.ndarray] = None     # relative ‖W−Ŵ_r‖²/‖W‖², r = 0..m
    oerr: Optional[np.ndarray] = None     # relative ‖X(W−Ŵ_r)‖²/‖XW‖², r = 0..m (with calibration)
    rank: Optional[int] = None
    t_orig: Optional[float] = None
    t_fact: Optional[float] = None
    timing_rows: Optional[int] = None
    status: str = ""

    @property
    def node(self) -> gs.Node:
        return self.layer.node

    @property
    def kind(self) -> str:
        return self.layer.kind

    @property
    def x(self) -> gs.Tensor:
        return self.layer.x

    @property
    def dtype(self) -> np.dtype:
        return self.layer.weight.dtype

    @property
    def top(self) -> bool:
        return self.layer.top

    @property
    def trans_a(self) -> bool:
        return self.layer.trans_a

    @property
    def k(self) -> int:
        return self.w.shape[0]

    @property
    def n(self) -> int:
        return self.w.shape[1]

    def weight_error(self, r: Optional[int]) -> float:
        return float(self.werr[min(r, len(self.werr) - 1)]) if r is not None and self.werr is not None else 0.0

    def output_error(self, r: Optional[int]) -> float:
        return float(self.oerr[min(r, len(self.oerr) - 1)]) if r is not None and self.oerr is not None else 0.0

    def faster(self, margin: float) -> bool:
        return self.t_orig is not None and self.t_fact is not None and self.t_fact <= self.t_orig * (1.0 - margin)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"node": self.node.name, "op": "Gemm" if self.kind == "gemm" else "MatMul",
                             "k": self.k, "n": self.n, "rank": self.rank, "status": self.status}
        if self.rank is not None:
            d["weight_error"] = _round(self.weight_error(self.rank))
            if self.oerr is not None:
                d["output_error"] = _round(self.output_error(self.rank))
        if self.t_orig is not None:
            d["ms_original"] = round(self.t_orig, 4)
            d["ms_factorized"] = round(self.t_fact, 4)
            d["timing_rows"] = self.timing_rows
        return d


_AS_SVD = {"overridable_weight": "no_constant_weight", "dynamic_weight": "no_constant_weight",
           "weight_not_folded": "no_constant_weight", "weight_dtype": "unsupported_dtype",
           "weight_rank": "weight_not_2d"}  # layers' reasons under the names svd's stats have always used


def _collect(graph: gs.Graph, opts: SvdOptions, skips: Counter, opset: int) -> list[_Layer]:
    ops = ("MatMul", "Gemm") if opset >= 7 else ("MatMul",)
    found = L.find_layers(graph, ops=ops, exclude=opts.exclude, check_input=True)
    for node, scope, reason in found.skipped:
        skips["in_function" if _in_function(scope) else _AS_SVD.get(reason, reason)] += 1
    if opset < 7:  # Gemm before opset 7 (broadcast attribute) is left alone
        for g in G.iter_graphs(graph, functions=False):
            for node in g.nodes:
                if node.op == "Gemm" and (node.domain or "") in ("", "ai.onnx") and len(node.inputs) >= 2:
                    excluded = any(fnmatch.fnmatchcase(node.name or "", pat) for pat in opts.exclude)
                    skips["excluded" if excluded else "old_opset"] += 1
        for func in getattr(graph, "functions", []):
            for g in G.iter_graphs(func, functions=False):
                skips["in_function"] += sum(1 for n in g.nodes if n.op == "Gemm" and (n.domain or "") in ("", "ai.onnx"))
    layers = []
    for layer in found.layers:
        if layer.in_function:
            skips["in_function"] += 1
            continue
        if not layer.weight.single_use:
            skips["shared_weight"] += 1
            continue
        w = layer.weight.value().astype(np.float64)
        if layer.kind == "gemm" and layer.trans_b:
            w = w.T
        layers.append(_Layer(layer, np.ascontiguousarray(w)))
    return layers


def _in_function(scope: str) -> bool:
    return scope.startswith("function ")


# ----------------------------------------------------------------- calibration

def _calibrate(graph: gs.Graph, layers: list[_Layer], ctx: PassContext, opts: SvdOptions, warn: bool = True) -> None:
    """XᵀX per distinct layer input (transposed for Gemm transA), from calibrate's shared statistics."""
    model = ctx.export(graph)
    requests = {id(l): gram_request(l.layer) for l in layers}
    grams = layer_grams(ctx, model, requests.values(), samples=opts.samples)
    stats = {id(l): grams.stats[requests[id(l)]][0] for l in layers}
    thin = [f"{l.node.name or l.x.name} ({stats[id(l)].rows} < {l.k})" for l in layers if stats[id(l)].rows < l.k]
    if thin and warn:
        ctx.log.warning("svd: calibration gave fewer activation rows than input channels for %d layer(s), e.g. %s: "
                        "their output-error estimates and whitening fit those rows only; give more calibration data",
                        len(thin), ", ".join(thin[:3]))
    for l in layers:
        g = stats[id(l)]
        l.gram = g.covariance()
        l.rows = g.rows
        l.x_shape = grams.shapes.get(l.x.name)
        if l.x_shape is not None and l.trans_a:
            l.x_shape = tuple(reversed(l.x_shape))


# ----------------------------------------------------------------- ranks

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


# ----------------------------------------------------------------- latency gate

def _inferred_shapes(graph: gs.Graph, ctx: PassContext, layers: list[_Layer]) -> dict[str, list]:
    """Shapes of layer inputs from onnx shape inference, for layers without a known shape."""
    if all(l.x_shape is not None or (l.x.shape is not None and len(l.x.shape) > 0) for l in layers):
        return {}
    try:
        model = onnx.shape_inference.infer_shapes(ctx.export(graph))
    except Exception:
        return {}
    found = {}
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            found[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    return found


def _rows(l: _Layer, ctx: PassContext, shapes: dict[str, list]) -> int:
    if l.x_shape is not None:
        shape = list(l.x_shape)
    else:
        shape = list(l.x.shape) if l.x.shape is not None and len(l.x.shape) else shapes.get(l.x.name, [l.k])
    shape = shape[:-1]
    rows = 1
    for d in shape:
        rows *= d if isinstance(d, int) and d > 0 else int(ctx.dims.get(str(d), 1))
    return max(rows, 1)


def _time_layer(l: _Layer, ctx: PassContext, shapes: dict[str, list]) -> None:
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    rows = _rows(l, ctx, shapes)
    try:
        _time_pair(l, ctx, rows, l.dtype, ort, helper, numpy_helper)
    except Exception:  # no kernel for this dtype on CPU: time the float32 equivalent
        _time_pair(l, ctx, rows, np.dtype(np.float32), ort, helper, numpy_helper)


def _time_pair(l: _Layer, ctx: PassContext, rows: int, xdtype: np.dtype, ort: Any, helper: Any, numpy_helper: Any) -> None:
    elem = helper.np_dtype_to_tensor_dtype(xdtype)
    r = l.rank
    w = l.w.astype(xdtype)
    a = np.asarray(l.p[:, :r], xdtype)
    b = np.asarray(l.vt[:r], xdtype)

    def build(nodes, inits):
        g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", elem, [rows, l.k])],
                              [helper.make_tensor_value_info("y", elem, [rows, l.n])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        so = ort.SessionOptions()
        so.log_severity_level = 4  # errors come back as exceptions; no raw ORT lines
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

    orig = build([helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": w})
    fact = build([helper.make_node("MatMul", ["x", "a"], ["t"]), helper.make_node("MatMul", ["t", "b"], ["y"])],
                 {"a": a, "b": b})
    feed = {"x": np.random.default_rng(ctx.seed).standard_normal((rows, l.k)).astype(xdtype)}
    for sess in (orig, fact):
        for _ in range(3):
            sess.run(None, feed)
    times: tuple[list, list] = ([], [])
    start = time.perf_counter()
    runs = 0
    while runs < 15 or (runs < 400 and time.perf_counter() - start < 0.15):
        for which, sess in enumerate((orig, fact) if runs % 2 == 0 else (fact, orig)):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times[which if runs % 2 == 0 else 1 - which].append(time.perf_counter() - t0)
        runs += 1
    l.t_orig = statistics.median(times[0]) * 1000.0
    l.t_fact = statistics.median(times[1]) * 1000.0
    l.timing_rows = rows


# ----------------------------------------------------------------- rewrite

def _rewrite(l: _Layer, names: G.Names, opset: int) -> None:
    r = l.rank
    root = np.sqrt(l.sigma[:r])
    a = l.p[:, :r] * root[None, :] * l.layer.alpha
    b = root[:, None] * l.vt[:r]
    l.layer.factor(a.astype(l.dtype), b.astype(l.dtype), names, opset)
