"""Post-training pruning of Conv, ConvTranspose, MatMul and Gemm weights.

The pass in parts: ``options``; ``units`` (the weights it prunes, from onnxopt.layers, and
their calibration statistics, from onnxopt.calibrate); ``scores`` (magnitude, wanda, obs, LAMP);
``masks`` (the sparsity budget over layers, rows and N:M groups, and sparsity=auto); ``reconstruction``
(least-squares refits and bias correction); ``storage`` (dense or sparse constants); ``structured``
(removing whole channels along the regions onnxopt.channels traces). This module runs them in order.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt import progress
from onnxopt.pipeline import BN_FOLDED, Pass, PassContext, PassResult, Tolerance, register_pass

from . import masks as budget  # the sparsity budget
from .masks import Masking, _floor, _keep_lowest_out, _keep_lowest_per_row
from .options import PruneOptions
from .reconstruction import Reconstruction
from .scores import Scoring, _lamp
from .storage import Storage
from .structured import Structured
from .units import Units, _Unit

__all__ = ["Prune", "PruneOptions"]

_SKIPS = ("excluded", "first_last", "shared_weight", "overridable", "unsupported_dtype", "unsupported_shape",
          "nm_indivisible", "no_activations", "structured_unsupported_layer", "structured_branch",
          "structured_graph_output", "structured_reshape", "structured_residual", "structured_concat",
          "structured_split", "structured_unsupported_op", "structured_no_consumer", "structured_shared_param",
          "structured_too_small", "bias_correction", "reconstruct_unsupported", "sparse_storage_shared",
          "sequential_budget", "reconstruct_budget")
# Seconds the sequential refits may spend re-running the model (both models over the calibration data
# once per layer): past it, the remaining layers refit on the dense model's inputs (as sequential=false).
SEQUENTIAL_BUDGET_S = 60.0
# Seconds the least-squares refits may take in all; past it the remaining layers keep their pruned
# weights unrefit (a wide detector's hundred Conv refits ran for minutes).
RECONSTRUCT_BUDGET_S = 120.0


@register_pass
class Prune(Pass):
    """Zero (or, structured, remove) the least important weights of Conv, ConvTranspose, MatMul and Gemm. Lossy.

    ``sparsity`` counts over every weight the pass could prune, the layers it keeps
    dense included (first and last, ``exclude``, layers a pattern cannot take): their
    share goes to the layers it prunes, each up to ``max_layer_sparsity`` of its
    weights (never below ``sparsity``; passes/prune/masks.py). Stats:
    ``sparsity_requested``, ``sparsity_achieved`` (weights zeroed or removed over all
    prunable weights), ``target_reached``, and ``layers`` (per layer: weights, pruned,
    sparsity, why kept dense); a note says when the caps cannot hold the request.

    Patterns: ``unstructured`` zeroes exactly round(sparsity x prunable) weights:
    one ratio for every pruned layer (rounded by largest remainders), the same
    share of every output row (``scope=row``, rows differ by one at most), or
    (``scope=global``) under one
    threshold over layer-normalised scores (LAMP: s² over the sum of s² of the
    layer's weights at least as large; ``global_norm=none``: over the raw scores,
    the classic global magnitude pruning); ``2:4``/``4:8``
    keep the n largest of every m consecutive weights along the reduction axis
    (MatMul/Gemm: K; Conv: input channels at each kernel position, else the
    flattened channel x kernel axis), a fixed half of every pruned layer (``sparsity``
    does not apply; the overall figure is lower when layers stay dense);
    ``structured`` removes whole output channels
    (Conv) or output columns (MatMul/Gemm) chosen by L1/L2 norm, about one channel
    ratio for every layer it can follow, the removed weights (the producers' rows and
    the consumers' columns) closest to ``sparsity``, and physically
    shrinks the graph: the producer's weight and bias, BatchNormalization,
    per-channel Add/Mul/Sub/Div constants, depthwise Convs, activations and pooling in between, and
    the consumer's input channels (through Flatten after a global pool). With
    calibration data the consumer's kept input weights and bias are refit by least
    squares on its dense input (with an intercept); without, the removed channels'
    constant contribution (the bias pushed through the chain) is folded into the
    consumer's bias (``fold_removed``, default on). Paths that cannot be followed safely (fan-out,
    Reshape, residual Add, Concat, Split, a graph output) are skipped and counted.

    Scores: ``magnitude`` |W|; ``wanda`` |W|·‖X_j‖₂ with the L2 norms of the
    layer's input columns on the dense model over the calibration samples (at
    most ``samples``; stat ``calibration_samples``); ``obs`` the Optimal Brain
    Surgeon saliency SparseGPT (Frantar & Alistarh 2023) prunes by,
    w_ij²/[(XᵀX + λI)⁻¹]_jj from the same dense-model XᵀX and the same ridge λ
    as reconstruction (``damp``): the rise in the layer's squared output error
    when w_ij alone goes and the rest of its row is re-solved, which the refit
    then does (ranked by its square root, which scales like |W|). It reduces to
    Wanda's score when the inputs are uncorrelated. ``prune`` takes it once, on
    the dense weights, as a static mask; SparseGPT itself chooses its mask column
    block by column block (128 wide, one threshold per block shared by all rows;
    N:M per row) on weights its OBS updates of the blocks before have changed,
    and writes those updated weights, where ``prune`` refits the kept weights
    exactly. Scores are compared within
    ``scope``; by default (``auto``) wanda per output row, the group its paper
    (Sun et al. 2023) compares within, magnitude and obs per layer (obs scores
    are comparable across rows: each is a share of the layer's output error;
    SparseGPT's unstructured mask likewise shares its threshold across rows;
    on N:M groups it is per row like every score). An input that is zero on all the
    calibration data ranks its weights last, by magnitude among themselves.
    ``reconstruct`` (default: when calibration data is given) re-solves each output row's surviving weights by ridge-damped
    least squares on the layer's input XᵀX (``(G[S,S] + λI) w_S = G[S,:] w + λ w_S``:
    the ridge λ, ``damp`` times the mean diagonal of G, pulls towards the dense
    weights, so a row that loses nothing keeps its weights), the
    closed form SparseGPT approximates (direct solves, or batched conjugate
    gradients on large layers where the sum of |S|³ over rows exceeds 5e8). Masks and scores use the dense model's
    activations; with ``sequential`` (default) each layer is then refit on the
    inputs the already-pruned layers before it produce, towards the dense
    output (``G_pp[S,S] w_S = G_pd[S,:] w``, same ridge, one paired run of the pruned and
    dense models per layer); ``sequential=false`` refits every layer on the
    dense model's inputs in one streaming run (cheaper, less accurate). Layers whose inputs cannot be read (inside If/Loop bodies
    or functions, 3-D Conv, ConvTranspose) fall back to magnitude (wanda, obs) without
    reconstruction and are counted. ``sparsity=auto`` allocates per-layer ratios
    that reach ``target`` with the least estimated output error (diagonal XᵀX
    estimate), none above ``tolerance`` when given.

    The first and last weighted layers stay dense by default; ``exclude`` globs
    match node or weight names. A weight read by several targeted nodes of the
    same layout is pruned once for all (their XᵀX summed); a weight also read by
    anything else, or an initializer that is an overridable graph input, is
    skipped. A weight read through ``Transpose(W)`` (exports without constant
    folding) is pruned in W. fp16/fp64 weights are scored and solved in float64 and stored in
    their own dtype.

    Storage: each pruned tensor is written in the smallest form the checker and
    ORT both accept: dense, or a ``Constant`` node with a COO ``sparse_value``
    (int64 indices; at fp32 smaller only above ~67% sparsity), never bigger.
    Stats give dense bytes, bytes as written and gzip bytes of the pruned
    tensors. ORT densifies sparse constants at load: no memory or speed gain
    from unstructured sparsity on CPU.
    """

    name = "prune"
    Options = PruneOptions
    exact = False
    tolerance = Tolerance(min_cosine=0.95)
    leaves_dangling = True
    requires = (BN_FOLDED,)  # scores and removal act on the weight the layer really applies

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        return _Pruner(graph, ctx, self.options).run()


class _Pruner(Units, Scoring, Masking, Reconstruction, Storage, Structured):
    """One run of the pass: its options, the graph, and what it found and did."""

    def __init__(self, graph: gs.Graph, ctx: PassContext, options: PruneOptions) -> None:
        self.graph, self.ctx, self.o = graph, ctx, options
        self.skips: Counter = Counter()
        self.names = G.Names(graph)
        self.data_driven = options.score in ("wanda", "obs") or options.bias_correction or options.sparsity == "auto"
        self.reconstruct = (ctx.calibration is not None) if options.reconstruct == "auto" else bool(options.reconstruct)
        self.samples_read = 0  # calibration samples the statistics came from (the most any one run read)
        self.scope = options.scope if options.scope != "auto" else ("row" if options.score == "wanda" else "layer")
        self.slack = 0  # weights the allocation may miss the request by (rounding it cannot avoid)
        self.candidates: list[_Unit] = []  # every prunable weight, the ones kept dense included
        self.sizes: dict[int, int] = {}  # unit id -> its weights when found
        self.dense: dict[int, str] = {}  # unit id -> why it stays dense
        self.pruned: dict[int, int] = {}  # unit id -> weights zeroed or removed

    def fresh(self, base: str) -> str:
        return self.names.fresh(base)

    def run(self) -> PassResult:
        units = self.find_units()
        stats: dict[str, Any] = {"layers_pruned": 0, "weights_total": 0, "weights_zeroed": 0,
                                 "sparsity_requested": 0.0, "sparsity_achieved": 0.0, "target_reached": 0,
                                 "channels_removed": 0, "layers_reconstructed": 0, "biases_corrected": 0,
                                 "dense_bytes": 0, "written_bytes": 0, "gzip_bytes_dense": 0, "gzip_bytes": 0,
                                 "sparse_tensors": 0, "calibration_samples": 0}
        if self.o.pattern == "structured":
            modified = self.structured(units, stats)
        else:
            if units and (self.data_driven or self.reconstruct):
                self.collect(units)
            modified = self.zero(units, stats)
        notes = self.summarize(stats)
        if self.skips["reconstruct_budget"]:
            notes.append(f"least-squares refits stopped after {RECONSTRUCT_BUDGET_S:.0f} s: the last "
                         f"{self.skips['reconstruct_budget']} layer(s) keep their pruned weights unrefit")
        if self.skips["sequential_budget"]:
            notes.append(f"sequential refits stopped after {SEQUENTIAL_BUDGET_S:.0f} s: the last "
                         f"{self.skips['sequential_budget']} layer(s) refit on the dense model's inputs")
        stats["calibration_samples"] = self.samples_read
        stats.update({f"skipped_{k}": self.skips[k] for k in _SKIPS})
        stats["layers"] = self.layer_rows()
        return PassResult(modified, stats, notes)

    def requested(self) -> float:
        if self.o.pattern in ("2:4", "4:8"):
            return 0.5
        return float(self.o.target if self.o.sparsity == "auto" else self.o.sparsity)

    def cap(self) -> float:
        return budget.layer_cap(self.o.max_layer_sparsity, self.requested())

    def want(self) -> int:
        """Weights to zero (structured: remove): the requested share of every prunable weight."""
        return int(round(self.requested() * sum(self.sizes.values())))

    def summarize(self, stats: dict) -> list[str]:
        """Overall figures over every prunable weight, and a note when the request was not met."""
        prunable = sum(self.sizes.values())
        zeroed = sum(self.pruned.values())
        requested = self.requested()
        stats["weights_total"], stats["weights_zeroed"] = prunable, zeroed
        stats["sparsity_requested"] = requested
        stats["sparsity_achieved"] = budget.achieved(zeroed, prunable)
        if not prunable:  # nothing to prune is not a target reached (an int8 model, weights in other ops)
            stats["target_reached"] = 0
            return ["no prunable weight: prune zeroes float Conv, ConvTranspose, MatMul and Gemm weights"
                    + (f" (layers kept dense: {', '.join(sorted(set(self.dense.values())))})" if self.dense else "")]
        reached = zeroed >= self.want() - self.slack
        stats["target_reached"] = int(reached)
        if reached:
            return []
        kept = Counter(self.dense.values())
        dense = ", ".join(f"{why} {n}" for why, n in sorted(kept.items()))
        if self.o.pattern in ("2:4", "4:8"):
            why = f"pattern={self.o.pattern} zeroes half of each pruned layer"
        elif self.o.sparsity == "auto" and self.o.tolerance is not None:
            why = f"tolerance={self.o.tolerance:g} stops the layers first"
        elif self.o.pattern == "structured":
            followed = sum(1 for u in self.candidates if id(u) not in self.dense)
            why = f"{followed} layer(s) could be followed, each losing at most {self.cap():g} of its channels"
        else:
            why = f"{len(self.pruned)} pruned layer(s) take at most {self.cap():g} of their weights each"
        return [budget.unreached_note(requested, stats["sparsity_achieved"],
                                      why + (f"; layers kept dense: {dense}" if dense else ""))]

    def layer_rows(self) -> list[dict]:
        rows = []
        for u in self.candidates:
            n, size = self.pruned.get(id(u), 0), self.sizes[id(u)]
            row = {"layer": u.name, "weights": size, "pruned": n, "sparsity": budget.achieved(n, size)}
            if id(u) in self.dense:
                row["dense"] = self.dense[id(u)]
            rows.append(row)
        return rows

    def zero(self, units: list[_Unit], stats: dict) -> bool:
        weights = {id(u): u.matrix(u.const.values.astype(np.float64)) for u in units}
        scores = {id(u): self.scores(u, weights[id(u)])
                  for u in progress.iterate(units, "prune: scoring", unit="layer")}
        masks: dict[int, np.ndarray] = {}
        if self.o.pattern in ("2:4", "4:8"):
            for u in units:
                keep = self.nm_mask(u, scores[id(u)])
                if keep is None:
                    self.skips["nm_indivisible"] += 1
                    self.dense[id(u)] = "nm_indivisible"
                    continue
                masks[id(u)] = keep
        elif self.o.sparsity == "auto":
            ratios = self.allocate(units, weights, scores, stats)
            self.slack = len(units)  # each layer's count is its ratio rounded
            for u in units:
                masks[id(u)] = _keep_lowest_out(scores[id(u)], int(round(ratios[id(u)] * u.size)))
        elif self.scope == "global":
            norm = _lamp if self.o.global_norm == "lamp" else (lambda x: x)
            caps = [_floor(self.cap() * u.size) for u in units]
            pruned = budget.global_pruned([norm(scores[id(u)]).reshape(-1) for u in units], self.want(), caps)
            for u, gone in zip(units, pruned):
                masks[id(u)] = ~gone.reshape(scores[id(u)].shape)
        elif self.scope == "row":
            caps = [scores[id(u)].shape[0] * _floor(self.cap() * scores[id(u)].shape[1]) for u in units]
            counts = budget.spread([u.size for u in units], caps, self.want())
            for u, count in zip(units, counts):
                masks[id(u)] = _keep_lowest_per_row(scores[id(u)], budget.row_drops(scores[id(u)], count))
        else:
            counts = budget.spread([u.size for u in units], [_floor(self.cap() * u.size) for u in units], self.want())
            for u, count in zip(units, counts):
                masks[id(u)] = _keep_lowest_out(scores[id(u)], count)
        modified = False
        dense = self.ctx.export(self.graph) if self.o.sequential and (self.reconstruct or self.o.bias_correction) else None
        refit_seconds = solve_seconds = 0.0
        for u in progress.iterate(units, "prune: layers", unit="layer"):
            if id(u) not in masks:
                continue
            keep = masks[id(u)]
            w = weights[id(u)]
            new = np.where(keep, w, 0.0)
            zeros = int(np.count_nonzero(~keep))
            if zeros == 0 and not (modified and self.o.sequential and self.reconstruct):
                continue  # nothing pruned, nothing upstream to compensate
            if modified and self.o.sequential and (self.reconstruct or self.o.bias_correction) and u.grams:
                if refit_seconds < SEQUENTIAL_BUDGET_S:
                    start = time.perf_counter()
                    self.collect_cross(u, dense)  # inputs as the layers pruned so far now make them
                    refit_seconds += time.perf_counter() - start
                else:
                    self.skips["sequential_budget"] += 1
            if self.reconstruct:
                if u.grams and solve_seconds >= RECONSTRUCT_BUDGET_S:
                    self.skips["reconstruct_budget"] += 1
                elif u.grams:
                    start = time.perf_counter()
                    new = self.solve(u, w, keep)
                    solve_seconds += time.perf_counter() - start
                    stats["layers_reconstructed"] += 1
                else:
                    self.skips["reconstruct_unsupported"] += 1
            if self.o.bias_correction:
                if self.correct_bias(u, w, new):
                    stats["biases_corrected"] += 1
                else:
                    self.skips["bias_correction"] += 1
            self.pruned[id(u)] = zeros
            if zeros == 0 and not np.any(new != w):
                continue
            stats["layers_pruned"] += 1
            modified = True
            values = u.unmatrix(new).astype(u.const._values.dtype)
            values[u.unmatrix(~keep)] = 0  # exact zeros whatever the rounding
            self.store(u, values, stats)
        return modified
