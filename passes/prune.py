"""Post-training pruning of Conv, ConvTranspose, MatMul and Gemm weights."""

from __future__ import annotations

import fnmatch
import gzip
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt.options import option
from onnxopt.pipeline import BN_FOLDED, Pass, PassContext, PassResult, Tolerance, register_pass

from . import _prune_budget as budget

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_TARGETS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
_SKIPS = ("excluded", "first_last", "shared_weight", "overridable", "unsupported_dtype", "unsupported_shape",
          "nm_indivisible", "no_activations", "structured_unsupported_layer", "structured_branch",
          "structured_graph_output", "structured_reshape", "structured_residual", "structured_concat",
          "structured_split", "structured_unsupported_op", "structured_no_consumer", "structured_shared_param",
          "structured_too_small", "bias_correction", "reconstruct_unsupported", "sparse_storage_shared")

# ops a structured channel mask passes through unchanged (per-channel or elementwise on one input)
_UNARY = ("Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Clip", "Gelu", "Erf",
          "Softplus", "Identity", "Dropout", "Abs", "Neg", "Sqrt", "Exp", "Pow")
_POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool")
_BINARY = ("Add", "Mul", "Sub", "Div")


@dataclass
class PruneOptions:
    sparsity: Union[float, Literal["auto"]] = option(0.5, help="fraction of all prunable weights set to zero (structured: removed), layers kept dense included; auto: per-layer ratios from sensitivity")
    pattern: Literal["unstructured", "2:4", "4:8", "structured"] = option("unstructured", help="unstructured zeroes single weights; 2:4/4:8 keep n of every m along the reduction axis; structured removes whole output channels")
    scope: Literal["auto", "layer", "row", "global"] = option("auto", help="one ratio per layer, the same ratio in every output row, or one threshold over layer-normalised (LAMP) scores; auto: row for wanda (its paper's group), layer otherwise (obs: SparseGPT shares one threshold across rows)")
    global_norm: Literal["lamp", "none"] = option("lamp", help="scope=global ranks LAMP-normalised scores, or raw ones (none: Han et al. 2015's global magnitude)")
    score: Literal["magnitude", "wanda", "obs"] = option("magnitude", help="wanda: |W| times the input column norm on calibration data; obs: the OBS/SparseGPT saliency w²/[(XᵀX+λI)⁻¹]_jj")
    norm: Literal["l1", "l2"] = option("l2", help="channel norm for structured pruning")
    reconstruct: Union[bool, Literal["auto"]] = option("auto", help="least-squares update of surviving weights; auto: when calibration data is given")
    bias_correction: bool = option(False, help="shift biases by the mean output change on calibration data")
    target: float = option(0.5, help="overall sparsity sparsity=auto reaches (over all prunable weights)")
    max_layer_sparsity: float = option(0.95, help="the most of one layer's weights (structured: channels) the budget may take; never below sparsity")
    tolerance: Optional[float] = option(None, help="sparsity=auto: largest estimated relative output error a layer may take")
    exclude: list[str] = option(factory=list, help="node or weight names (globs) left dense")
    keep_first_last: bool = option(True, help="leave the first and last weighted layers dense")
    ops: list[str] = option(factory=lambda: list(_TARGETS), help="op types whose weights are pruned")
    damp: float = option(0.01, help="ridge damping of XᵀX, relative to its mean diagonal")
    samples: int = option(512, help="calibration samples read at most (the stat calibration_samples says how many were)")
    sequential: bool = option(True, help="refit each layer on the inputs the pruned layers before it make, aiming at the dense output")
    fold_removed: bool = option(True, help="structured, no calibration data: fold the removed channels' constant output (bias through the chain) into the consumer's bias")
    storage: Literal["auto", "dense"] = option("auto", help="how pruned tensors are written; auto: a Constant with a COO sparse_value where that is smaller, else dense")

    def validate(self) -> None:
        if self.sparsity != "auto" and not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1) or auto, got {self.sparsity}")
        if not 0.0 <= self.target < 1.0:
            raise ValueError(f"target must be in [0, 1), got {self.target}")
        if self.sparsity == "auto" and self.pattern != "unstructured":
            raise ValueError(f"sparsity=auto works with pattern=unstructured only, not {self.pattern}")
        if self.tolerance is not None and self.sparsity != "auto":
            raise ValueError("tolerance applies to sparsity=auto only")
        if self.tolerance is not None and self.tolerance <= 0:
            raise ValueError(f"tolerance must be positive, got {self.tolerance}")
        if not 0.0 < self.max_layer_sparsity < 1.0:
            raise ValueError(f"max_layer_sparsity must be in (0, 1), got {self.max_layer_sparsity}")
        if self.pattern in ("2:4", "4:8") and self.sparsity != "auto" and float(self.sparsity) != 0.5:
            raise ValueError(f"pattern={self.pattern} fixes the sparsity of every pruned layer at 0.5; "
                             f"sparsity={self.sparsity} does not apply (leave it out)")
        if self.pattern in ("2:4", "4:8") and self.scope not in ("auto", "layer"):
            raise ValueError(f"pattern={self.pattern} fixes the sparsity of every group; scope={self.scope} does not apply")
        if self.global_norm != "lamp" and self.scope != "global":
            raise ValueError(f"global_norm applies to scope=global only, not scope={self.scope}")
        bad = [op for op in self.ops if op not in _TARGETS]
        if bad:
            raise ValueError(f"ops: cannot prune {', '.join(bad)}; supported: {', '.join(_TARGETS)}")
        if self.damp < 0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")


@register_pass
class Prune(Pass):
    """Zero (or, structured, remove) the least important weights of Conv, ConvTranspose, MatMul and Gemm. Lossy.

    ``sparsity`` counts over every weight the pass could prune, the layers it keeps
    dense included (first and last, ``exclude``, layers a pattern cannot take): their
    share goes to the layers it prunes, each up to ``max_layer_sparsity`` of its
    weights (never below ``sparsity``; passes/_prune_budget.py). Stats:
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


# ----------------------------------------------------------------- layers

@dataclass
class _Use:
    node: gs.Node
    graph: gs.Graph
    top: bool  # in the top-level graph (activations can be read)


@dataclass
class _Unit:
    """One weight tensor and the targeted nodes that read it, seen as a matrix W[O, K]."""

    const: gs.Constant
    holder: Optional[gs.Node]  # Constant node holding the value, or None for an initializer
    tensor: gs.Tensor  # what the layer nodes read (the Constant, or the holder's output)
    uses: list[_Use]
    kind: str  # conv, convtranspose, matmul (W[K,N]), gemm_t (W[N,K])
    shape: tuple
    groups: int = 1
    order: int = 0
    name: str = ""
    grams: list = field(default_factory=list)  # per group: list of GramStats to sum
    ratio: float = 0.0
    via: Optional[gs.Node] = None  # a Transpose between the stored constant and the layers

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def matrix(self, w: np.ndarray) -> np.ndarray:
        if self.kind in ("conv",):
            return w.reshape(w.shape[0], -1)
        if self.kind == "convtranspose":  # W[C, O/g, k...]; group 1 only
            return np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)
        if self.kind == "matmul":
            return w.T
        return w

    def unmatrix(self, m: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            return m.reshape(self.shape)
        if self.kind == "convtranspose":
            s = self.shape
            return np.moveaxis(m.reshape(s[1], s[0], *s[2:]), 0, 1)
        if self.kind == "matmul":
            return m.T
        return m

    def cross(self, g: int) -> Optional[np.ndarray]:
        stats = self.grams[g] if g < len(self.grams) else None
        return getattr(stats[0], "cross", None) if stats and len(stats) == 1 else None

    def gram(self, g: int) -> Optional[Any]:
        stats = self.grams[g] if g < len(self.grams) else None
        if not stats:
            return None
        total = sum(s.gram for s in stats)
        rows = sum(s.rows for s in stats)
        mean = sum(s.mean * s.rows for s in stats) / max(rows, 1)
        return total, rows, mean


class _Pruner:
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

    # -------------------------------------------------------------- entry

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

    # -------------------------------------------------------------- finding layers

    def find_units(self) -> list[_Unit]:
        overridable = set(vars(self.graph).get("initializer_inputs", []))
        consumers: dict[int, list[tuple[gs.Node, gs.Graph]]] = {}
        for g in G.iter_graphs(self.graph):
            for n in g.nodes:
                for t in n.inputs:
                    consumers.setdefault(id(t), []).append((n, g))
        holders = {id(n.outputs[0]): n for g in G.iter_graphs(self.graph) for n in g.nodes
                   if n.op == "Constant" and len(n.outputs) == 1 and isinstance(n.attrs.get("value"), gs.Constant)}
        top_nodes = {id(n): i for i, n in enumerate(self.graph.nodes)}
        units: dict[int, _Unit] = {}
        for g in G.iter_graphs(self.graph):
            for n in g.nodes:
                if n.op not in self.o.ops or (n.domain or "") not in ("", "ai.onnx") or len(n.inputs) < 2:
                    continue
                w = n.inputs[1]
                if id(w) in units:
                    continue
                via = G.producer(w)
                if via is not None and via.op == "Transpose" and len(via.inputs) == 1 and \
                        list(via.attrs.get("perm", [1, 0])) == [1, 0] and len(via.inputs[0].outputs) == 1:
                    stored = via.inputs[0]  # a weight exported as Transpose(W) (constant folding off)
                else:
                    via, stored = None, w
                holder = holders.get(id(stored))
                const = holder.attrs["value"] if holder is not None else stored
                if not isinstance(const, gs.Constant):
                    continue
                if via is not None and (len(const.shape) != 2 or (holder is not None and len(stored.outputs) != 1)):
                    continue
                unit = self.make_unit(n, g, w, const, holder, consumers, overridable, via)
                if unit is None:
                    continue
                unit.order = min(top_nodes.get(id(u.node), 10**9) for u in unit.uses)
                units[id(w)] = unit
        found = sorted(units.values(), key=lambda u: u.order)
        self.candidates = found
        self.sizes = {id(u): u.size for u in found}
        kept = []
        top = [u for u in found if u.order < 10**9]
        edge = {id(top[0]), id(top[-1])} if self.o.keep_first_last and top else set()
        for u in found:
            names = [u.const.name, u.tensor.name, *(x.node.name for x in u.uses)]
            if any(fnmatch.fnmatchcase(nm or "", pat) for pat in self.o.exclude for nm in names):
                self.skips["excluded"] += 1
                self.dense[id(u)] = "excluded"
            elif id(u) in edge:
                self.skips["first_last"] += 1
                self.dense[id(u)] = "first_last"
            else:
                kept.append(u)
        return kept

    def make_unit(self, n, g, w, const, holder, consumers, overridable, via=None) -> Optional[_Unit]:
        if holder is None and const.name in overridable:
            self.skips["overridable"] += 1
            return None
        dtype = const._values.dtype
        shape = tuple(const._values.shape)
        if np.dtype(dtype) not in _FLOATS:
            self.skips["unsupported_dtype"] += 1
            return None
        uses, kinds = [], set()
        for node, gg in consumers.get(id(w), []):
            kind = self.kind_of(node, w, shape[::-1] if via is not None else shape)
            if kind is None:
                self.skips["shared_weight" if len(consumers[id(w)]) > 1 else "unsupported_shape"] += 1
                return None
            kinds.add(kind)
            uses.append(_Use(node, gg, gg is self.graph))
        if len(kinds) != 1 or (holder is not None and via is None and len(holder.outputs[0].outputs) != len(uses)):
            self.skips["shared_weight"] += 1
            return None
        if len(uses) > 1 and len({id(u.graph) for u in uses}) > 1:
            self.skips["shared_weight"] += 1
            return None
        kind, groups = kinds.pop()
        if kind == "convtranspose" and groups != 1:
            self.skips["unsupported_shape"] += 1
            return None
        name = n.name or const.name
        if via is not None:  # the stored constant is the transpose of what the layers read
            kind = {"matmul": "gemm_t", "gemm_t": "matmul"}[kind]
            return _Unit(const, holder, via.inputs[0], uses, kind, shape, groups, name=name, via=via)
        return _Unit(const, holder, w, uses, kind, shape, groups, name=name)

    def kind_of(self, node: gs.Node, w: gs.Tensor, shape: tuple) -> Optional[tuple[str, int]]:
        if node.op not in self.o.ops or (node.domain or "") not in ("", "ai.onnx"):
            return None
        slots = G.positions(node.inputs, w)
        if slots != [1]:
            return None
        if node.op == "Conv":
            return ("conv", int(node.attrs.get("group", 1))) if len(shape) >= 3 else None
        if node.op == "ConvTranspose":
            return ("convtranspose", int(node.attrs.get("group", 1))) if len(shape) >= 3 else None
        if len(shape) != 2:
            return None
        if node.op == "MatMul":
            return ("matmul", 1)
        return ("gemm_t", 1) if int(node.attrs.get("transB", 0)) else ("matmul", 1)

    # -------------------------------------------------------------- calibration

    def collect(self, units: list[_Unit], count: bool = True) -> None:
        from onnxopt.calibrate import GramStats, calibration_set, stream_tensors

        wanted: dict[tuple, tuple] = {}  # (activation name, layout) -> (GramStats per group, row function)
        for u in units:
            if not all(x.top for x in u.uses) or u.kind == "convtranspose" or (u.kind == "conv" and len(u.shape) > 4):
                self.skips["no_activations"] += count
                continue
            u.grams = [[] for _ in range(u.groups)]
            for use in u.uses:
                x = use.node.inputs[0]
                if isinstance(x, gs.Constant) or not x.name:
                    u.grams = []
                    break
                layout = self.layout(use.node, u)
                key = (x.name, layout)
                if key not in wanted:
                    k = int(np.prod(u.shape[1:])) if u.kind == "conv" else int(u.matrix(np.empty(u.shape, np.int8)).shape[1])
                    wanted[key] = ([GramStats(k) for _ in range(u.groups)], layout)
                for gi in range(u.groups):
                    u.grams[gi].append(wanted[key][0][gi])
            if not u.grams:
                self.skips["no_activations"] += count
        if not wanted:
            return
        model = self.ctx.export(self.graph)
        data = _Counted(calibration_set(self.ctx, model, samples=self.o.samples), self)
        names = sorted({key[0] for key in wanted})
        by_name: dict[str, list] = {}
        for (name, _), value in wanted.items():
            by_name.setdefault(name, []).append(value)

        def reduce(values: dict[str, np.ndarray]) -> None:
            for name, x in values.items():
                for stats, layout in by_name.get(name, []):
                    for gi in range(len(stats)):
                        for rows in _rows(x, layout, gi, stats[gi].k):
                            stats[gi].update(rows)

        stream_tensors(model, names, data, reduce)
        for u in units:
            if u.grams and any(s.rows == 0 for grp in u.grams for s in grp):
                u.grams = []
                self.skips["no_activations"] += count

    def collect_cross(self, u: _Unit, dense: onnx.ModelProto) -> bool:
        """XᵀX of the layer's input as the pruned layers before it now make it, and its cross product
        with the dense model's input (one run of both models side by side), so the refit aims at the
        dense output."""
        from onnxopt.calibrate import calibration_set, stream_tensors

        if not u.grams or len(u.uses) != 1:
            return False
        node = u.uses[0].node
        x = node.inputs[0]
        layout = self.layout(node, u)
        k = u.grams[0][0].k
        paired, twin = _paired(self.ctx.export(self.graph), dense, x.name)
        stats = [_Cross(k) for _ in range(u.groups)]

        def reduce(values: dict[str, np.ndarray]) -> None:
            for gi in range(u.groups):
                for rp, rd in zip(_rows(values[x.name], layout, gi, k), _rows(values[twin], layout, gi, k)):
                    stats[gi].update(rp, rd)

        data = _Counted(calibration_set(self.ctx, paired, samples=self.o.samples), self)
        stream_tensors(paired, [x.name, twin], data, reduce)
        if any(st.rows == 0 for st in stats):
            return False
        u.grams = [[st] for st in stats]
        return True

    def layout(self, node: gs.Node, u: _Unit) -> tuple:
        if u.kind == "conv":
            kernel = tuple(int(k) for k in u.shape[2:])
            nd = len(kernel)
            pads = tuple(node.attrs.get("pads", [0] * 2 * nd))
            strides = tuple(node.attrs.get("strides", [1] * nd))
            dil = tuple(node.attrs.get("dilations", [1] * nd))
            auto_pad = node.attrs.get("auto_pad", "NOTSET")
            auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
            if nd == 1:  # as 2-D with a unit height
                kernel, pads = (1, kernel[0]), (0, pads[0], 0, pads[1])
                strides, dil = (1, strides[0]), (1, dil[0])
            return ("conv", kernel, pads, strides, dil, auto_pad, u.groups)
        return ("rows", bool(node.op == "Gemm" and int(node.attrs.get("transA", 0))))

    # -------------------------------------------------------------- masks

    def scores(self, u: _Unit, w: np.ndarray) -> np.ndarray:
        s = np.abs(w)
        if self.o.score in ("wanda", "obs") and u.grams:
            o = w.shape[0]
            per = o // u.groups
            for gi in range(u.groups):
                gram = u.gram(gi)
                sl = slice(gi * per, (gi + 1) * per)
                if self.o.score == "wanda":
                    s[sl] *= _input_norms(np.diag(gram[0]))[None, :]
                else:
                    s[sl] = _obs_scores(w[sl], gram[0], self.o.damp)
        return s

    def nm_mask(self, u: _Unit, s: np.ndarray) -> Optional[np.ndarray]:
        n, m = (2, 4) if self.o.pattern == "2:4" else (4, 8)
        o, k = s.shape
        if u.kind == "conv" and (u.shape[1] % m == 0):
            c, kern = u.shape[1], int(np.prod(u.shape[2:]))
            view = s.reshape(o, c, kern).transpose(0, 2, 1)  # groups along input channels
            keep = _nm_keep(view.reshape(-1, m), n).reshape(o, kern, c).transpose(0, 2, 1).reshape(o, k)
            return keep
        if k % m:
            return None
        return _nm_keep(s.reshape(-1, m), n).reshape(o, k)

    # -------------------------------------------------------------- unstructured and n:m

    def zero(self, units: list[_Unit], stats: dict) -> bool:
        weights = {id(u): u.matrix(u.const.values.astype(np.float64)) for u in units}
        scores = {id(u): self.scores(u, weights[id(u)]) for u in units}
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
        for u in units:
            if id(u) not in masks:
                continue
            keep = masks[id(u)]
            w = weights[id(u)]
            new = np.where(keep, w, 0.0)
            zeros = int(np.count_nonzero(~keep))
            if zeros == 0 and not (modified and self.o.sequential and self.reconstruct):
                continue  # nothing pruned, nothing upstream to compensate
            if modified and self.o.sequential and (self.reconstruct or self.o.bias_correction) and u.grams:
                self.collect_cross(u, dense)  # inputs as the layers pruned so far now make them
            if self.reconstruct:
                if u.grams:
                    new = self.solve(u, w, keep)
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

    def allocate(self, units, weights, scores, stats) -> dict[int, float]:
        """Per-layer ratios reaching ``target`` overall with the least summed estimated output error."""
        top = self.cap()
        grid = np.unique(np.round(np.append(np.arange(0, top, 0.05), top), 4))
        curves = {}
        for u in units:
            w, s = weights[id(u)], scores[id(u)]
            energy = w * w
            if u.grams:
                per = w.shape[0] // u.groups
                diag = np.concatenate([np.repeat(np.diag(u.gram(gi)[0])[None, :], per, 0) for gi in range(u.groups)])
                energy = energy * diag
            order = np.argsort(s, axis=None, kind="stable")
            cum = np.concatenate([[0.0], np.cumsum(energy.ravel()[order])])
            total = max(cum[-1], 1e-30)
            curves[id(u)] = np.array([cum[int(round(r * u.size))] / total for r in grid])
        step = {id(u): 0 for u in units}
        sizes = {id(u): u.size for u in units}
        need = float(self.want())  # the target over every prunable weight, dense layers included
        pruned = 0.0
        limit = self.o.tolerance
        while pruned < need - 1e-9:
            best, best_cost = None, None
            for u in units:
                i = step[id(u)]
                if i + 1 >= len(grid):
                    continue
                err = curves[id(u)][i + 1]
                if limit is not None and err > limit:
                    continue
                cost = (err - curves[id(u)][i]) / (sizes[id(u)] * (grid[i + 1] - grid[i]))
                if best_cost is None or cost < best_cost:
                    best, best_cost = u, cost
            if best is None:
                break
            i = step[id(best)]
            gain = sizes[id(best)] * (grid[i + 1] - grid[i])
            if pruned + gain > need:  # the last step stops exactly at the target
                ratio = grid[i] + (need - pruned) / sizes[id(best)]
                best.ratio = float(ratio)
                pruned = need
                step[id(best)] = -1 - i  # marks a fractional ratio
                break
            step[id(best)] = i + 1
            pruned += gain
        ratios = {}
        for u in units:
            i = step[id(u)]
            ratios[id(u)] = u.ratio if i < 0 else float(grid[i])
        self.ctx.log.info("prune: sparsity=auto ratios: %s",
                          ", ".join(f"{u.name}={ratios[id(u)]:.3f}" for u in units))
        stats["auto_ratios"] = ";".join(f"{u.name}={ratios[id(u)]:.3f}" for u in units)
        return ratios

    def solve(self, u: _Unit, w: np.ndarray, keep: np.ndarray) -> np.ndarray:
        out = np.where(keep, w, 0.0)
        per = w.shape[0] // u.groups
        for gi in range(u.groups):
            gram, lam, _ = _damping(u.gram(gi)[0], self.o.damp)
            rows = np.arange(gi * per, (gi + 1) * per)
            cross = u.cross(gi)  # sequential: X_pᵀ X_dense, the refit aims at the dense output
            counts = keep[rows].sum(axis=1)
            if float(np.sum(counts.astype(np.float64) ** 3)) > _EXACT_FLOPS:
                out[rows] = _cg_solve(w[rows], keep[rows], gram, lam, gram if cross is None else cross.T)
                continue
            # row o of (G w_o + lam w_o): the ridge pulls towards the dense weights, not towards zero
            rhs_all = w[rows] @ (gram if cross is None else cross.T) + lam * w[rows]
            for s in np.unique(counts):
                if s == 0:
                    continue
                sel = rows[counts == s]
                rsel = sel - gi * per
                budget = max(1, int(2**25 // (s * s)))
                for start in range(0, len(sel), budget):
                    part, rpart = sel[start:start + budget], rsel[start:start + budget]
                    idx = np.nonzero(keep[part])[1].reshape(len(part), s)
                    a = gram[idx[:, :, None], idx[:, None, :]]
                    a[:, np.arange(s), np.arange(s)] += lam
                    b = np.take_along_axis(rhs_all[rpart], idx, axis=1)
                    try:
                        sol = np.linalg.solve(a, b[..., None])[..., 0]
                    except np.linalg.LinAlgError:
                        continue
                    vals = np.zeros((len(part), w.shape[1]))
                    np.put_along_axis(vals, idx, sol, axis=1)
                    out[part] = vals
        return out

    def correct_bias(self, u: _Unit, old: np.ndarray, new: np.ndarray) -> bool:
        if len(u.uses) != 1 or not u.grams:
            return False
        node = u.uses[0].node
        per = old.shape[0] // u.groups
        shift = np.zeros(old.shape[0])
        for gi in range(u.groups):
            mean = u.gram(gi)[2]
            dense_mean = getattr(u.grams[gi][0], "mean_dense", mean) if len(u.grams[gi]) == 1 else mean
            sl = slice(gi * per, (gi + 1) * per)
            shift[sl] = new[sl] @ mean - old[sl] @ dense_mean
        if node.op == "Conv":
            return self.add_to_bias(node, 2, -shift, (old.shape[0],))
        if node.op == "Gemm":
            beta = float(node.attrs.get("beta", 1.0))
            if beta == 0:
                return False
            return self.add_to_bias(node, 2, -shift / beta, (old.shape[0],))
        # MatMul: a following Add of a constant [N]
        y = node.outputs[0]
        if len(y.outputs) != 1 or y.outputs[0].op != "Add":
            return False
        add = y.outputs[0]
        other = [i for i, t in enumerate(add.inputs) if t is not y]
        if len(other) != 1:
            return False
        return self.add_to_bias(add, other[0], -shift, (old.shape[0],), required=True)

    def add_to_bias(self, node: gs.Node, slot: int, delta: np.ndarray, shape: tuple, required: bool = False) -> bool:
        if slot < len(node.inputs) and node.inputs[slot].name:
            b = node.inputs[slot]
            if not isinstance(b, gs.Constant) or len(b.outputs) != 1:
                return False
            vals = b.values
            if vals.size != delta.size and vals.size != 1:
                return False
            if vals.dtype not in _FLOATS:
                return False
            nv = (np.broadcast_to(vals.astype(np.float64).reshape(-1), delta.shape) + delta)
            if vals.size == 1 and vals.ndim:
                return False
            newshape = vals.shape if vals.size == delta.size else shape
            node.inputs[slot] = gs.Constant(self.fresh(b.name + "_corrected"), nv.reshape(newshape).astype(vals.dtype))
            return True
        if required:
            return False
        dtype = node.inputs[1].dtype if node.inputs[1].dtype is not None else np.float32
        const = gs.Constant(self.fresh(f"{node.name or 'layer'}_bias"), delta.astype(np.dtype(dtype)))
        while len(node.inputs) < slot:
            node.inputs.append(gs.Variable.empty())
        node.inputs.append(const)
        return True

    # -------------------------------------------------------------- storage

    def store(self, u: _Unit, values: np.ndarray, stats: dict) -> None:
        dense_bytes = int(values.nbytes)
        stats["dense_bytes"] += dense_bytes
        stats["gzip_bytes_dense"] += len(gzip.compress(np.ascontiguousarray(u.const.values).tobytes(), 6))
        sparse = _sparse_proto(values, u.const.name) if self.o.storage == "auto" else None
        if sparse is not None and sparse.ByteSize() >= dense_bytes:
            sparse = None
        readers = [u.via] if u.via is not None else [x.node for x in u.uses]
        if sparse is not None and len({id(x.graph) for x in u.uses}) != 1:
            self.skips["sparse_storage_shared"] += 1
            sparse = None
        if sparse is None:
            stats["written_bytes"] += dense_bytes
            stats["gzip_bytes"] += len(gzip.compress(values.tobytes(), 6))
            new = gs.Constant(self.fresh(f"{u.const.name}_pruned"), values)
            if u.holder is not None:
                u.holder.attrs["value"] = new
            else:
                for reader in readers:
                    G.rewire_input(reader, u.tensor, new)
            return
        stats["written_bytes"] += int(sparse.ByteSize())
        stats["gzip_bytes"] += len(gzip.compress(sparse.SerializeToString(), 6))
        stats["sparse_tensors"] += 1
        g = u.uses[0].graph
        if u.holder is not None:
            u.holder.attrs = {"sparse_value": sparse}
            return
        out = gs.Variable(self.fresh(f"{u.const.name}_sparse"), dtype=values.dtype, shape=list(values.shape))
        sparse.values.name = out.name
        g.nodes.append(gs.Node("Constant", name=self.fresh(f"{u.const.name}_sparse_const"),
                               attrs={"sparse_value": sparse}, outputs=[out]))
        for reader in readers:
            G.rewire_input(reader, u.tensor, out)
        # the new Constant node must come before its readers
        g.nodes.insert(0, g.nodes.pop())

    # -------------------------------------------------------------- structured

    def structured(self, units: list[_Unit], stats: dict) -> bool:
        plans = []
        for u in units:
            if u.kind not in ("conv", "matmul", "gemm_t") or len(u.uses) != 1 or u.groups != 1 \
                    or u.holder is not None or u.via is not None:
                self.skips["structured_unsupported_layer"] += 1
                continue
            plan = self.follow(u)
            if plan is not None:
                plans.append((u, plan))
        if self.reconstruct and plans:  # the consumers' inputs, for a least-squares refit of what they keep
            for u, plan in plans:
                cons = plan["consumer"]
                g = u.uses[0].graph
                plan["cunit"] = _Unit(cons.inputs[1], None, cons.inputs[1], [_Use(cons, g, g is self.graph)],
                                      plan["ckind"], tuple(cons.inputs[1].shape), name=cons.name)
            self.collect([plan["cunit"] for _, plan in plans], count=False)
        for u in units:
            if all(u is not p for p, _ in plans):
                self.dense[id(u)] = "not_followed"
        channel_plans = self.channel_budget(plans)
        originals = {id(u.tensor): u for u in self.candidates}  # before consumers' shrinking replaces them
        modified = False
        done = []
        for (u, plan), cp in zip(plans, channel_plans):
            current = u.uses[0].node.inputs[1]
            if isinstance(current, gs.Constant) and current is not u.tensor:  # shrunk as a consumer already
                u.const = u.tensor = current
                u.shape = tuple(current.shape)
            if self.shrink(u, plan, stats, cp.drop):
                modified = True
                done.append(cp)
        # what went, by the original tensors: the producers' rows, the consumers' (and depthwise) columns
        sizes = {k: self.sizes[id(u)] for k, u in originals.items()}
        gone = budget.removed_by_tensor(done, sizes, [cp.drop for cp in done])
        self.pruned = {id(originals[k]): n for k, n in gone.items() if n}
        return modified

    def channel_budget(self, plans: list) -> list:
        """Channels each followed layer loses: about one ratio for all, the removed weights closest to the request."""
        sizes = {id(u.tensor): self.sizes[id(u)] for u in self.candidates}
        out = []
        for u, plan in plans:
            o = u.shape[0] if u.kind == "conv" else u.matrix(np.empty(u.shape, np.int8)).shape[0]
            rows = [id(u.tensor)] + [id(n.inputs[1]) for n in plan["chain"] if n.op == "Conv"]
            out.append(budget.ChannelPlan(o, min(_floor(self.cap() * o), o - 1), rows, [id(plan["consumer"].inputs[1])]))
        for cp, drop in zip(out, budget.channel_drops(out, sizes, self.want())):
            cp.drop = drop
        self.slack = budget.channel_step(out, sizes)  # whole channels: the request is met to within one
        return out

    def follow(self, u: _Unit) -> Optional[dict]:
        """The per-channel region between a layer's output and the next weighted layer, or None (counted).

        The region may branch and re-merge (a decomposed GELU: x * 0.5 * (1 + erf(x / √2))) as
        long as every op in it is per-channel and all of it ends in one consumer.
        """
        node, g = u.uses[0].node, u.uses[0].graph
        outs = {id(t) for t in g.outputs}
        channels = u.shape[0] if u.kind == "conv" else u.matrix(np.empty(u.shape, np.int8)).shape[0]
        start = node.outputs[0]
        state = {id(start): (u.kind != "conv", False)}  # per tensor: (channel axis is last, spatial dims are 1)
        region: list[gs.Node] = []
        done: set[int] = set()
        pending: dict[int, gs.Node] = {}
        queue = [start]
        consumer, exit_tensor = None, None

        def fail(reason: str) -> None:
            self.skips[f"structured_{reason}"] += 1
            return None

        while queue:
            t = queue.pop(0)
            if id(t) in outs:
                return fail("graph_output")
            if not t.outputs:
                return fail("no_consumer")
            axis_last, spatial_one = state[id(t)]
            for n in list(t.outputs):
                if id(n) in done:
                    continue
                if (n.domain or "") not in ("", "ai.onnx") or G.subgraphs_of(n):
                    return fail("unsupported_op")
                if n.op in ("Conv", "MatMul", "Gemm") and G.positions(n.inputs, t) == [0] and len(n.inputs) > 1 \
                        and not _depthwise(n, t, channels if not axis_last else -1):
                    if len(n.inputs[1].outputs) != 1 or (len(n.inputs) > 2 and n.inputs[2].name
                                                          and len(n.inputs[2].outputs) != 1):
                        return fail("shared_param")
                    ckind = None
                    if n.op == "Conv" and isinstance(n.inputs[1], gs.Constant) and int(n.attrs.get("group", 1)) == 1 \
                            and not axis_last:
                        ckind = "conv"
                    elif n.op in ("MatMul", "Gemm") and isinstance(n.inputs[1], gs.Constant) and \
                            (axis_last or spatial_one) and len(n.inputs[1].shape) == 2 and \
                            not (n.op == "Gemm" and int(n.attrs.get("transA", 0))):
                        ckind = "gemm_t" if n.op == "Gemm" and int(n.attrs.get("transB", 0)) else "matmul"
                    if ckind is None:
                        return fail("unsupported_op")
                    if consumer is not None:
                        return fail("branch")
                    consumer, exit_tensor, plan_kind = n, t, ckind
                    done.add(id(n))
                    continue
                if _depthwise(n, t, channels) and not axis_last:
                    new_state = (axis_last, False)
                elif n.op in _UNARY or (n.op == "BatchNormalization" and not axis_last):
                    if n.op == "BatchNormalization" and (len(n.outputs) != 1 or not all(
                            isinstance(x, gs.Constant) and len(x.outputs) == 1 for x in n.inputs[1:])):
                        return fail("shared_param")
                    if n.op != "BatchNormalization" and any(G.const_value(x) is None for x in n.inputs[1:] if x.name):
                        return fail("unsupported_op")
                    if n.op in ("PRelu", "Pow") and G.const_value(n.inputs[1]).size != 1:
                        return fail("unsupported_op")
                    new_state = (axis_last, spatial_one)
                elif n.op in _POOLS and not axis_last:
                    new_state = (False, n.op.startswith("Global"))
                elif n.op == "Flatten" and not axis_last and spatial_one and int(n.attrs.get("axis", 1)) == 1:
                    new_state = (True, False)
                elif n.op in _BINARY and len(n.inputs) == 2:
                    others = [x for x in n.inputs if id(x) not in state]
                    if not others:  # both operands in the region: per-channel if they agree on the layout
                        if len({state[id(x)] for x in n.inputs}) != 1:
                            return fail("unsupported_op")
                        new_state = (axis_last, spatial_one)
                    else:
                        c = others[0]
                        value = G.const_value(c)
                        if value is None:
                            pending[id(n)] = n  # maybe both operands come from the region later
                            continue
                        if value.size != 1 and (not isinstance(c, gs.Constant) or len(c.outputs) != 1):
                            return fail("shared_param")
                        if not _per_channel(value, channels, axis_last):
                            return fail("unsupported_op")
                        new_state = (axis_last, spatial_one)
                elif n.op == "Reshape":
                    return fail("reshape")
                elif n.op == "Concat":
                    return fail("concat")
                elif n.op == "Split":
                    return fail("split")
                else:
                    return fail("unsupported_op")
                if len(n.outputs) != 1:
                    return fail("unsupported_op")
                pending.pop(id(n), None)
                done.add(id(n))
                region.append(n)
                state[id(n.outputs[0])] = new_state
                queue.append(n.outputs[0])
                # a deferred binary op whose other operand just joined the region
                for m in list(pending.values()):
                    if all(id(x) in state for x in m.inputs) and id(m) not in done:
                        pending.pop(id(m))
                        queue.append(next(x for x in m.inputs if id(x) in state))
        if pending:
            return fail("residual")
        if consumer is None:
            return fail("no_consumer")
        return {"chain": region, "consumer": consumer, "ckind": plan_kind, "state": state, "start": start}

    def shrink(self, u: _Unit, plan: dict, stats: dict, drop: int) -> bool:
        node = u.uses[0].node
        w = u.matrix(u.const.values.astype(np.float64))
        o = w.shape[0]
        if drop == 0 or drop >= o:
            self.skips["structured_too_small"] += 1 if drop >= o else 0
            return False
        norms = np.abs(w).sum(axis=1) if self.o.norm == "l1" else np.sqrt((w * w).sum(axis=1))
        # channels scaled by a following BatchNormalization count with that scale
        for n in plan["chain"]:
            if n.op == "BatchNormalization":
                scale, _, _, var = (x.values.astype(np.float64) for x in n.inputs[1:5])
                norms = norms * np.abs(scale / np.sqrt(var + float(n.attrs.get("epsilon", 1e-5))))
        order = np.argsort(norms, kind="stable")
        removed = np.sort(order[:drop])
        keep = np.sort(order[drop:])
        # the value the removed channels still carry: the producer bias pushed through the chain
        bias = None
        if node.op in ("Conv", "Gemm") and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
            b = node.inputs[2].values.astype(np.float64).reshape(-1)
            if node.op == "Gemm":
                b = b * float(node.attrs.get("beta", 1.0))
            bias = np.broadcast_to(b, (o,)).copy() if b.size in (1, o) else None
            if bias is None:
                self.skips["structured_unsupported_layer"] += 1
                return False
        values_of = {id(plan["start"]): np.zeros(o) if bias is None else bias.copy()}
        for n in plan["chain"]:
            out = _through(n, [values_of.get(id(x)) for x in n.inputs])
            if out is None:
                self.skips["structured_unsupported_op"] += 1
                return False
            values_of[id(n.outputs[0])] = out
        carried = values_of[id(plan["consumer"].inputs[0])]
        # rewrite: producer weight and bias
        values = u.const.values
        if u.kind == "conv":
            kept_w = values[keep]
        elif u.kind == "matmul":
            kept_w = values[:, keep]
        else:
            kept_w = values[keep]
        G.rewire_input(node, u.tensor, gs.Constant(self.fresh(f"{u.const.name}_pruned"), np.ascontiguousarray(kept_w)))
        if bias is not None:
            bt = node.inputs[2]
            bv = bt.values
            nb = bv.reshape(-1)[keep] if bv.size == o else bv
            node.inputs[2] = gs.Constant(self.fresh(f"{bt.name}_pruned"), np.ascontiguousarray(nb.reshape(-1) if bv.size == o else bv))
        # the region
        for n in plan["chain"]:
            axis_last = plan["state"][id(n.outputs[0])][0]
            if n.op == "Conv":  # depthwise
                for i in range(1, len(n.inputs)):
                    c = n.inputs[i]
                    n.inputs[i] = gs.Constant(self.fresh(f"{c.name}_pruned"), np.ascontiguousarray(c.values[keep]))
                n.attrs["group"] = len(keep)
            elif n.op == "BatchNormalization":
                for i in range(1, 5):
                    c = n.inputs[i]
                    n.inputs[i] = gs.Constant(self.fresh(f"{c.name}_pruned"), np.ascontiguousarray(c.values[keep]))
            elif n.op in _BINARY:
                for slot, c in enumerate(n.inputs):
                    if id(c) not in plan["state"] and isinstance(c, gs.Constant) and c.values.size > 1:
                        # the layout of the operand in the region
                        last = plan["state"][id(n.inputs[1 - slot])][0]
                        n.inputs[slot] = gs.Constant(self.fresh(f"{c.name}_pruned"), _slice_channels(c.values, keep, o, last))
        for key, t in [(id(plan["start"]), plan["start"])] + [(id(n.outputs[0]), n.outputs[0]) for n in plan["chain"]]:
            _set_channels(t, len(keep), plan["state"][key][0])
        # the consumer: its input channels, and the removed channels' constant contribution
        cons = plan["consumer"]
        cw = cons.inputs[1].values
        ckind = plan["ckind"]
        if ckind == "conv":
            contrib = np.einsum("ocij,c->o", cw[:, removed].astype(np.float64), carried[removed])
            new_cw = cw[:, keep]
        elif ckind == "matmul":
            contrib = carried[removed] @ cw[removed].astype(np.float64)
            new_cw = cw[keep]
        else:
            contrib = cw[:, removed].astype(np.float64) @ carried[removed]
            new_cw = cw[:, keep]
        cu = plan.get("cunit")
        if cu is not None and cu.grams:
            new_cw, contrib = self.refit(cu, cw, keep, ckind)
            stats["layers_reconstructed"] += 1
        elif not self.o.fold_removed:
            contrib = np.zeros_like(contrib)
        if cons.op == "Gemm":
            contrib = contrib * float(cons.attrs.get("alpha", 1.0))
        cname = cons.inputs[1].name
        cons.inputs[1] = gs.Constant(self.fresh(f"{cname}_pruned"), np.ascontiguousarray(new_cw))
        if np.any(contrib != 0):
            if cons.op == "Conv":
                if not self.add_to_bias(cons, 2, contrib, (contrib.size,)):
                    self.skips["bias_correction"] += 1
            elif cons.op == "Gemm":
                beta = float(cons.attrs.get("beta", 1.0)) if len(cons.inputs) > 2 and cons.inputs[2].name else 1.0
                if len(cons.inputs) <= 2 or not cons.inputs[2].name:
                    cons.attrs["beta"] = 1.0
                if not self.add_to_bias(cons, 2, contrib / beta, (contrib.size,)):
                    self.skips["bias_correction"] += 1
            else:
                self.matmul_bias(cons, contrib)
        stats["layers_pruned"] += 1
        stats["channels_removed"] += len(removed)
        return True

    def refit(self, cu: _Unit, cw: np.ndarray, keep: np.ndarray, ckind: str) -> tuple[np.ndarray, np.ndarray]:
        """Least squares for the consumer on its kept input channels plus an intercept (the new bias share)."""
        gram, rows, mean = cu.gram(0)
        if ckind == "conv":
            wm = cw.reshape(cw.shape[0], -1).astype(np.float64)
            kern = int(np.prod(cw.shape[2:]))
            mask = np.zeros(cw.shape[1], bool)
            mask[keep] = True
            cols = np.flatnonzero(np.repeat(mask, kern))
        else:
            wm = (cw.T if ckind == "matmul" else cw).astype(np.float64)
            cols = np.asarray(keep)
        total = mean * rows
        n = len(cols)
        a = np.empty((n + 1, n + 1))
        a[:n, :n] = gram[np.ix_(cols, cols)]
        lam = self.o.damp * float(np.mean(np.diag(gram))) if gram.size else 0.0
        a[np.arange(n), np.arange(n)] += max(lam, 1e-12)
        a[:n, n] = a[n, :n] = total[cols]
        a[n, n] = max(rows, 1)
        rhs = np.vstack([gram[cols] @ wm.T, (total @ wm.T)[None, :]])
        sol = np.linalg.lstsq(a, rhs, rcond=None)[0]
        w_new, shift = sol[:n].T, sol[n]
        if ckind == "conv":
            new = w_new.reshape(cw.shape[0], len(keep), *cw.shape[2:])
        elif ckind == "matmul":
            new = w_new.T
        else:
            new = w_new
        return new.astype(cw.dtype), shift

    def matmul_bias(self, cons: gs.Node, contrib: np.ndarray) -> None:
        y = cons.outputs[0]
        if len(y.outputs) == 1 and y.outputs[0].op == "Add":
            add = y.outputs[0]
            other = [i for i, t in enumerate(add.inputs) if t is not y]
            if len(other) == 1 and self.add_to_bias(add, other[0], contrib, (contrib.size,), required=True):
                return
        g = next(gg for gg in G.iter_graphs(self.graph) if G.positions(gg.nodes, cons))
        dtype = cons.inputs[1].values.dtype
        G.insert_after(g, y, "Add", extra_inputs=[gs.Constant(self.fresh(f"{cons.name}_bias"), contrib.astype(dtype))],
                       name=self.fresh(f"{cons.name}_bias_add"))


# ----------------------------------------------------------------- helpers

def _input_norms(sq: np.ndarray) -> np.ndarray:
    """‖X_j‖₂ from the column sums of squares. An input that is zero on all the calibration data gets
    a norm far below every live one (1e-6 of the smallest), so its weights still rank below the
    live ones and, among themselves, by magnitude rather than by position: with no evidence from
    the data, magnitude decides."""
    norms = np.sqrt(np.maximum(sq, 0.0))
    live = norms > 0
    if not live.all():
        norms = np.where(live, norms, 1e-6 * float(norms[live].min()) if live.any() else 1.0)
    return norms


def _damping(gram: np.ndarray, damp: float) -> tuple[np.ndarray, float, np.ndarray]:
    """XᵀX with a unit diagonal at inputs that are zero on all the calibration data (they then touch
    nothing else), the ridge ``lam`` (``damp`` times its mean diagonal) and the mask of those dead inputs."""
    gram = gram.copy()
    dead = np.diag(gram) <= 0
    gram[dead, dead] = 1.0
    return gram, damp * float(np.mean(np.diag(gram))), dead


def _obs_scores(w: np.ndarray, gram: np.ndarray, damp: float) -> np.ndarray:
    """The OBS saliency of SparseGPT (Frantar & Alistarh 2023), ranked by its square root:
    |w_ij| / sqrt([(XᵀX + lam I)⁻¹]_jj), ``lam`` the same ridge as the refit. w_ij²/[H⁻¹]_jj is the
    increase of the layer's squared output error when w_ij alone is removed and the row's other
    weights are re-solved. With uncorrelated inputs it is |w_ij|·‖X_j‖ (Wanda); correlated inputs
    make a weight that the others can stand in for cheaper. The square root makes it scale like
    |W| (for LAMP and ``auto``); the order within any group is the same. Weights of inputs that are
    zero on all the calibration data rank below every live one, by magnitude among themselves."""
    h, lam, dead = _damping(gram, damp)
    h[np.diag_indices_from(h)] += max(lam, 1e-12)
    try:
        inv_diag = np.diag(np.linalg.inv(h))
    except np.linalg.LinAlgError:
        inv_diag = np.diag(np.linalg.pinv(h))
    inv_diag = np.maximum(inv_diag, 1e-300)
    s = np.abs(w) / np.sqrt(inv_diag)[None, :]
    if dead.any():
        live = s[:, ~dead]
        floor = float(live[live > 0].min()) if live.size and np.any(live > 0) else 1.0
        a = np.abs(w[:, dead])
        s[:, dead] = 0.5 * floor * a / max(float(a.max()), 1e-300)
    return s


def _keep_lowest_per_row(scores: np.ndarray, drops) -> np.ndarray:
    """Mask keeping all but the ``drops`` lowest scores of every output row (one count, or one per
    row; ties by position)."""
    rank = np.empty(scores.shape, np.int64)
    np.put_along_axis(rank, np.argsort(scores, axis=1, kind="stable"), np.arange(scores.shape[1])[None, :], axis=1)
    return rank >= np.reshape(np.asarray(drops, np.int64), (-1, 1))


def _floor(x: float) -> int:
    """floor, forgiving the float error of products like 0.95 * 100."""
    return int(np.floor(x + 1e-9))


def _keep_lowest_out(scores: np.ndarray, drop: int) -> np.ndarray:
    """Mask keeping all but the ``drop`` lowest scores (ties broken by position)."""
    keep = np.ones(scores.size, bool)
    if drop > 0:
        keep[np.argsort(scores, axis=None, kind="stable")[:drop]] = False
    return keep.reshape(scores.shape)


class _Counted:
    """Calibration feeds passed through, counting the samples each full pass yields (as the feeds'
    leading dimension counts them) into ``owner.samples_read``."""

    def __init__(self, data, owner) -> None:
        self.data, self.owner = data, owner

    def __iter__(self):
        n = 0
        for feed in self.data:
            n += max((int(np.shape(v)[0]) for v in feed.values() if np.ndim(v)), default=1)
            yield feed
        self.owner.samples_read = max(self.owner.samples_read, n)


class _Cross:
    """Streaming XₚᵀXₚ, XₚᵀX_d and the means of both: the pruned and the dense model's inputs to one layer."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.gram = np.zeros((k, k))
        self.cross = np.zeros((k, k))
        self.mean = np.zeros(k)
        self.mean_dense = np.zeros(k)
        self.rows = 0

    def update(self, xp: np.ndarray, xd: np.ndarray) -> None:
        xp, xd = np.asarray(xp, np.float64), np.asarray(xd, np.float64)
        self.gram += xp.T @ xp
        self.cross += xp.T @ xd
        total = self.rows + len(xp)
        if total:
            self.mean += (xp.sum(axis=0) - len(xp) * self.mean) / total
            self.mean_dense += (xd.sum(axis=0) - len(xd) * self.mean_dense) / total
        self.rows = total


def _rows(x: np.ndarray, layout: tuple, gi: int, k: int):
    """Chunks of a layer input's rows (im2col for Conv) whose columns match W[o].reshape(-1)."""
    from onnxopt.calibrate import conv_rows, matmul_rows

    if layout[0] == "conv":
        _, kernel, pads, strides, dil, auto_pad, groups = layout
        x2 = x if x.ndim == 4 else x[:, :, None, :]
        p = _resolve_pads(x2.shape[2:], kernel, pads, strides, dil, auto_pad)
        step = max(1, 32768 // max(1, _out_size(x2.shape[2:], kernel, p, strides, dil)))
        for start in range(0, x2.shape[0], step):
            yield conv_rows(x2[start:start + step], kernel, p, strides, dil, gi, groups)
        return
    rows = x.T if layout[1] else matmul_rows(x)
    if rows.shape[-1] != k:
        return
    for start in range(0, rows.shape[0], 65536):
        yield rows[start:start + 65536]


def _paired(current: onnx.ModelProto, dense: onnx.ModelProto, name: str) -> tuple[onnx.ModelProto, str]:
    """One model running ``current`` and (prefixed) ``dense`` on the same inputs; the dense twin of ``name``."""
    import onnx.compose

    prefix = "dense__"
    twin = onnx.compose.add_prefix(dense, prefix)
    model = onnx.ModelProto()
    model.CopyFrom(current)
    feeds = [onnx.helper.make_node("Identity", [i.name], [prefix + i.name], name=f"{prefix}feed_{i.name}")
             for i in dense.graph.input]
    model.graph.node.extend(feeds)
    model.graph.node.extend(twin.graph.node)
    model.graph.initializer.extend(twin.graph.initializer)
    model.graph.sparse_initializer.extend(twin.graph.sparse_initializer)
    model.graph.value_info.extend(twin.graph.value_info)
    model.functions.extend(twin.functions)
    return model, prefix + name


def _cg_solve(w: np.ndarray, keep: np.ndarray, gram: np.ndarray, lam: float, rhs_matrix: np.ndarray,
              tol: float = 1e-5, max_iter: int = 1000) -> np.ndarray:
    """The same per-row least squares, ``(G[S,S] + lam) w_S = (M w + lam w)[S]``, for all rows at once by
    Jacobi-preconditioned conjugate gradients: each iteration is one [O,K]x[K,K] product, where
    direct solves would cost the sum of |S|³."""
    m = keep.astype(np.float64)
    diag = np.diag(gram) + lam
    b = (w @ rhs_matrix + lam * w) * m
    x = w * m
    apply = lambda v: ((v * m) @ gram + lam * v) * m
    r = b - apply(x)
    z = r / diag
    p = z.copy()
    rz = np.sum(r * z, axis=1)
    bnorm = np.maximum(np.linalg.norm(b, axis=1), 1e-300)
    for _ in range(max_iter):
        if np.all(np.linalg.norm(r, axis=1) <= tol * bnorm):
            break
        ap = apply(p)
        den = np.sum(p * ap, axis=1)
        alpha = np.divide(rz, den, out=np.zeros_like(rz), where=den > 0)
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        z = r / diag
        rz_new = np.sum(r * z, axis=1)
        beta = np.divide(rz_new, rz, out=np.zeros_like(rz), where=rz > 0)
        p = z + beta[:, None] * p
        rz = rz_new
    return x * m


_EXACT_FLOPS = 5e8  # direct per-row solves while the sum of |S|³ stays below this, else conjugate gradients


def _lamp(scores: np.ndarray) -> np.ndarray:
    """Layer-adaptive magnitude (LAMP, Lee et al. 2021): s² over the sum of s² of the weights at least as large.

    Comparable across layers: the layer's largest weight scores 1, and a layer's
    scores do not depend on its size or scale.
    """
    sq = (scores.astype(np.float64) ** 2).ravel()
    order = np.argsort(sq, kind="stable")
    suffix = np.cumsum(sq[order][::-1])[::-1]
    out = np.empty_like(sq)
    out[order] = sq[order] / np.maximum(suffix, 1e-300)
    return out


def _nm_keep(groups: np.ndarray, n: int) -> np.ndarray:
    """For rows of m scores: True at the n largest of each row."""
    order = np.argsort(-groups, axis=1, kind="stable")
    keep = np.zeros(groups.shape, bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    return keep


def _sparse_proto(values: np.ndarray, name: str) -> Optional[onnx.SparseTensorProto]:
    """COO with linear int64 indices (the form onnx.checker accepts), or None when not smaller."""
    flat = values.reshape(-1)
    idx = np.flatnonzero(flat)
    if idx.size * (values.itemsize + 8) >= values.nbytes:
        return None
    vals = onnx.numpy_helper.from_array(flat[idx].copy(), name)
    ind = onnx.numpy_helper.from_array(idx.astype(np.int64), "")
    return onnx.helper.make_sparse_tensor(vals, ind, list(values.shape))


def _resolve_pads(spatial, kernel, pads, strides, dil, auto_pad) -> tuple:
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for size, k, s, d in zip(spatial, kernel, strides, dil):
            total = max(0, (int(np.ceil(size / s)) - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            out.append((big, small) if auto_pad == "SAME_LOWER" else (small, big))
        return (out[0][0], out[1][0], out[0][1], out[1][1])
    if auto_pad == "VALID":
        return (0, 0, 0, 0)
    return tuple(pads)


def _out_size(spatial, kernel, pads, strides, dil) -> int:
    oh = (spatial[0] + pads[0] + pads[2] - dil[0] * (kernel[0] - 1) - 1) // strides[0] + 1
    ow = (spatial[1] + pads[1] + pads[3] - dil[1] * (kernel[1] - 1) - 1) // strides[1] + 1
    return max(1, oh * ow)


def _per_channel(c: np.ndarray, channels: int, axis_last: bool) -> bool:
    if c.size == 1:
        return True
    shape = c.shape
    if axis_last:
        return shape[-1] == channels and c.size == channels
    # [C,1,1] or [1,C,1,1] style (channel axis 1 of a rank-4 tensor, counted from the end: -3)
    return c.size == channels and len(shape) >= 3 and shape[-3] == channels


def _slice_channels(c: np.ndarray, keep: np.ndarray, channels: int, axis_last: bool) -> np.ndarray:
    if c.size == 1:
        return c
    return np.ascontiguousarray(np.take(c, keep, axis=-1 if axis_last else c.ndim - 3))


def _depthwise(n: gs.Node, t: gs.Tensor, channels: int) -> bool:
    """A Conv with one filter per input channel (group = channels), constant single-use parameters, reading t."""
    if n.op != "Conv" or (n.domain or "") not in ("", "ai.onnx") or G.positions(n.inputs, t) != [0] or len(n.inputs) < 2:
        return False
    w = n.inputs[1]
    if not isinstance(w, gs.Constant) or len(w.shape) < 3 or int(n.attrs.get("group", 1)) != channels:
        return False
    if w.shape[0] != channels or w.shape[1] != 1:
        return False
    params = [x for x in n.inputs[1:] if x.name]
    return all(isinstance(x, gs.Constant) and len(x.outputs) == 1 for x in params)


def _through(n: gs.Node, inputs: list) -> Optional[np.ndarray]:
    """Per-channel constants pushed through one region node (pools keep a constant constant);
    ``inputs`` holds the region operands' values, None for the others."""
    op = n.op
    v = next((x for x in inputs if x is not None), None)
    if v is None:
        return None
    if op == "Conv":  # depthwise: a constant input gives sum(W[c]) * v + b inside the padding border
        w = n.inputs[1].values.astype(np.float64)
        b = n.inputs[2].values.astype(np.float64) if len(n.inputs) > 2 and n.inputs[2].name else 0.0
        return v * w.reshape(w.shape[0], -1).sum(axis=1) + b
    if op in _POOLS or op in ("Flatten", "Identity", "Dropout"):
        return v
    if op == "BatchNormalization":
        scale, bias, mean, var = (x.values.astype(np.float64).reshape(-1) for x in n.inputs[1:5])
        eps = float(n.attrs.get("epsilon", 1e-5))
        return (v - mean) / np.sqrt(var + eps) * scale + bias
    if op == "Relu":
        return np.maximum(v, 0)
    if op == "LeakyRelu":
        return np.where(v >= 0, v, v * float(n.attrs.get("alpha", 0.01)))
    if op == "PRelu":
        a = float(G.const_value(n.inputs[1]).reshape(-1)[0])
        return np.where(v >= 0, v, v * a)
    if op == "Sigmoid":
        return 1 / (1 + np.exp(-v))
    if op == "Tanh":
        return np.tanh(v)
    if op == "Clip":
        lo = G.const_value(n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1].name else n.attrs.get("min", -np.inf)
        hi = G.const_value(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2].name else n.attrs.get("max", np.inf)
        return np.clip(v, float(np.asarray(lo).reshape(-1)[0]), float(np.asarray(hi).reshape(-1)[0]))
    if op == "HardSwish":
        return v * np.clip(v / 6 + 0.5, 0, 1)
    if op == "HardSigmoid":
        return np.clip(v * float(n.attrs.get("alpha", 0.2)) + float(n.attrs.get("beta", 0.5)), 0, 1)
    if op in ("Gelu", "Erf"):
        from math import erf
        e = np.vectorize(erf)
        return e(v) if op == "Erf" else 0.5 * v * (1 + e(v / np.sqrt(2)))
    if op == "Softplus":
        return np.log1p(np.exp(v))
    if op == "Abs":
        return np.abs(v)
    if op == "Neg":
        return -v
    if op == "Exp":
        return np.exp(v)
    if op == "Sqrt":
        return np.sqrt(np.maximum(v, 0))
    if op == "Pow":
        return np.power(v, float(G.const_value(n.inputs[1]).reshape(-1)[0]))
    if op in _BINARY:
        a, b = (x if x is not None else np.broadcast_to(G.const_value(t).astype(np.float64).reshape(-1), v.shape)
                for x, t in zip(inputs, n.inputs))
        return {"Add": np.add, "Mul": np.multiply, "Sub": np.subtract, "Div": np.divide}[op](a, b)
    return None


def _set_channels(t: gs.Tensor, channels: int, axis_last: bool) -> None:
    """Update the channel dimension of a tensor's declared shape, or forget the shape."""
    if t.shape is None:
        return
    shape = list(t.shape)
    axis = -1 if axis_last else 1
    if len(shape) >= 2 and isinstance(shape[axis], int):
        shape[axis] = channels
        t.shape = shape
    else:
        t.shape = None
