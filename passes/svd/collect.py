"""The layers svd factors (MatMul/Gemm from onnxopt.layers, weight as float64 W[K, N]) and their
inputs' XᵀX (calibrate.layer_grams)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt import layers as L
from onnxopt.calibrate import gram_request, layer_grams
from onnxopt.pipeline import PassContext

from .options import SvdOptions


def _round(x: float) -> float:
    return float(f"{x:.4g}")


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
    found = L.find_layers(graph, ops=ops, exclude=opts.exclude, check_input=True, only=opts.only)
    for node, scope, reason in found.skipped:
        skips["in_function" if _in_function(scope) else _AS_SVD.get(reason, reason)] += 1
    if opset < 7:  # Gemm before opset 7 (broadcast attribute) is left alone
        for g in G.iter_graphs(graph, functions=False):
            for node in g.nodes:
                if node.op == "Gemm" and (node.domain or "") in ("", "ai.onnx") and len(node.inputs) >= 2:
                    excluded = L.left_out([node.name or ""], opts.exclude, opts.only)
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
