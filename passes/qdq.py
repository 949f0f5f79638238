"""Post-training int8 quantization: QuantizeLinear/DequantizeLinear pairs with calibrated ranges."""

from __future__ import annotations

import fnmatch
import platform
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt.calibrate import TensorRanges, calibration_set, stream_tensors
from onnxopt.errors import InputError
from onnxopt.options import option
from onnxopt.pipeline import (BN_FOLDED, CONSTANTS_FOLDED, Pass, PassContext, PassResult, Tolerance,
                               register_pass)
from ._qdq_opset import PER_CHANNEL_OPSET, raise_opset

# Ops with weights: weight input 1, (Conv/ConvTranspose/Gemm) bias input 2.
_WEIGHTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Ops ORT runs as integer kernels only when their output is quantized too (QLinearConv, QLinearAdd, ...).
_NEEDS_OUTPUT_Q = ("Conv", "ConvTranspose", "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool")
# Ops that keep their input's scale: ORT drops the Q/DQ around them and runs them on uint8/int8 data.
_SHARE_SCALE = ("MaxPool", "Resize")
_SHAPE_OPS = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather")
_FOLDED = ("Relu", "Clip")  # folded into the producer's range (ORT removes them before a Q)
_ALREADY_QUANTIZED = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger",
                      "MatMulInteger", "QLinearConv", "QLinearMatMul")
DEFAULT_OP_TYPES = ["Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul", "Concat", "MaxPool", "AveragePool",
                    "GlobalAveragePool", "Resize"]
_KNOWN_OPS = set(DEFAULT_OP_TYPES)
_SKIPS = ("subgraph", "excluded", "fragile", "dtype", "weight_dtype", "dynamic_weight", "weight_rank",
          "overridable_weight", "constant_input", "batchnorm_not_folded", "weight_not_folded")


@dataclass
class QdqOptions:
    method: Literal["minmax", "percentile", "entropy", "mse"] = option("percentile", help="how activation ranges are picked")
    percentile: float = option(99.99, help="for method=percentile: keep this share of values inside the range (each side)")
    per_channel: bool = option(True, help="weights: one scale per output channel (raises opset 10-12 to 13), else per tensor")
    activation_type: Literal["uint8", "int8"] = option("uint8", help="uint8 asymmetric, or int8 symmetric")
    weight_type: Literal["int8"] = option("int8", help="weight integer type: int8 symmetric (the only one)")
    reduce_range: Literal["auto", "true", "false"] = option("auto", help="7-bit weights; auto: on x86 CPUs without VNNI")
    samples: int = option(512, help="calibration samples read at most")
    exclude: list[str] = option(factory=list, help="node names or globs left in float")
    op_types: list[str] = option(factory=lambda: list(DEFAULT_OP_TYPES), help="op types to quantize")

    def validate(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1, got {self.samples}")
        unknown = [op for op in self.op_types if op not in _KNOWN_OPS]
        if unknown:
            raise ValueError(f"op_types: cannot quantize '{unknown[0]}'; quantizable: {';'.join(DEFAULT_OP_TYPES)}")


@register_pass
class Qdq(Pass):
    """Insert QuantizeLinear/DequantizeLinear pairs (int8 weights, uint8 activations) from calibration data. Lossy.

    Weights of Conv, ConvTranspose, MatMul and Gemm become int8 initializers
    (symmetric, per output channel: Conv axis 0, ConvTranspose axis 1, MatMul
    [K,N] axis 1, Gemm axis 0 or 1 after transB) read through a
    DequantizeLinear; Conv/ConvTranspose/Gemm biases become int32 with scale
    input scale x weight scale and zero point 0. Activations get one Q/DQ pair
    per tensor (uint8 asymmetric, or int8 symmetric) at the inputs of the
    quantized ops and at the outputs of ops ORT only fuses with a quantized
    output (Conv, ConvTranspose, Add, Mul, Concat, AveragePool,
    GlobalAveragePool); a Relu or Clip that is the only reader of such an
    output is folded into its range (the pair goes after it and ORT drops
    it; with int8 activations such a one-sided range gets zero point -128,
    as ORT needs). MaxPool, Resize and shape ops (Transpose, Reshape, Flatten, Squeeze,
    Unsqueeze, Slice, Gather on data) between quantized tensors keep their
    input's scale, so ORT runs them on 8-bit data. Everything else stays float
    and reads the float tensor.

    Ranges come from one streaming run over the calibration data
    (``ctx.calibration``; ``method`` minmax, percentile, entropy or mse, see
    onnxopt.calibrate.RangeStats; entropy is TensorRT's KL search with 256
    quantized bins for one-sided uint8 tensors, corrected for the number of
    independent values the histogram holds). Fragile patterns stay float unless
    ``op_types`` is set explicitly: in transformer-like graphs (Softmax,
    LayerNormalization or a decomposed LayerNorm present) Add and Mul
    (residuals, LayerNorm affine) and MatMuls of two activations (attention);
    Gather on embeddings is never quantized. ``reduce_range=auto`` picks 7-bit
    weights on x86 CPUs without VNNI, where ORT's u8s8 kernels can saturate.

    Accuracy guard: the result is compared with the float model on up to 4
    calibration batches in ORT with graph optimizations on (where the pairs
    become integer kernels). Below the pass's own min_cosine (0.99), the 24
    layers adding most local error (their output's relative error less their
    inputs', optimizations off) are each left out of the fully quantized model
    and the output cosine measured; they go back to float in order of cosine
    recovered per byte kept float, a layer that no longer helps with the others
    already float being skipped, until the cosine passes or no measured layer
    helps. Each is logged with its measured gain and bytes kept float, and
    ``fallback_nodes`` and ``guard_min_cosine_ppm`` report the outcome.

    Only the top-level graph is quantized; ops in If/Loop/Scan bodies stay
    float (``skipped_subgraph``). Models that already hold quantized ops are
    left alone. Per-channel weights need opset >= 13: a model at opset 10-12
    is converted to opset 13 by onnx's version converter (``opset_raised_to_13``;
    one scale per tensor leaves the small channels of a BatchNorm-folded Conv a
    level or two, see passes/_qdq_opset.py); where that fails, weights are per
    tensor (``per_tensor_low_opset``); below opset 10 nothing is done.
    """

    name = "qdq"
    Options = QdqOptions
    exact = False
    tolerance = Tolerance(min_cosine=0.99, max_top1_drop=1.0)
    leaves_dangling = True  # float weights and Constant nodes no longer read
    requires = (BN_FOLDED, CONSTANTS_FOLDED)  # a Conv feeding BatchNormalization, or a weight still computed, stays float

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        stats: dict[str, int] = {"quantized_nodes": 0, "qdq_pairs": 0, "weights_quantized": 0,
                                 "biases_quantized": 0, "activations_calibrated": 0, "scales_shared": 0,
                                 "relu_clip_folded": 0}
        skips: Counter = Counter()
        opset = ctx.opset or _opset(graph)
        if opset and opset < 10:
            stats["skipped_opset_below_10"] = 1
            return PassResult(False, stats)
        if any(n.op in _ALREADY_QUANTIZED or n.op.startswith("QLinear") for n in G.find_nodes(graph)):
            stats["skipped_already_quantized"] = 1
            return PassResult(False, stats)
        per_channel = o.per_channel
        notes: list[str] = []
        reduce_range, vnni = _reduce_range(o.reduce_range)
        stats["reduce_range"] = int(reduce_range)
        if vnni is not None:
            stats["cpu_int8_vnni"] = int(vnni)
            notes.append("reduce_range=auto -> {} ({})".format(
                str(reduce_range).lower(), "CPU has VNNI: full 8-bit weights" if vnni else
                "x86 CPU without VNNI: 7-bit weights, so ORT's u8s8 kernels do not saturate"
                if reduce_range else "not an x86 CPU"))

        plan = _Plan(graph, o, skips)
        if skips["batchnorm_not_folded"] or skips["weight_not_folded"]:
            notes.append(f"{skips['batchnorm_not_folded'] + skips['weight_not_folded']} layers have unfolded "
                         "BatchNormalization or weights and stay float; run 'cleanup' first (--passes cleanup,qdq)")
        if not plan.nodes:
            stats.update({f"skipped_{k}": skips[k] for k in _SKIPS})
            return PassResult(False, stats, notes)
        if per_channel and opset and opset < PER_CHANNEL_OPSET and plan.weights:
            # one scale per weight tensor can leave whole channels without levels: raise the opset instead
            why = raise_opset(graph, ctx.export(graph))
            if why is None:
                stats["opset_raised_to_13"] = 1
                notes.append(f"opset {opset} raised to {PER_CHANNEL_OPSET} for per-channel weight scales")
                skips = Counter()
                plan = _Plan(graph, o, skips)
            else:
                per_channel = False
                stats["per_tensor_low_opset"] = 1
                notes.append(f"opset {opset}: weights quantized per tensor (per-channel needs opset "
                             f"{PER_CHANNEL_OPSET}, and the opset could not be raised: {why})")

        # ---- calibration: one streaming run over the data for every tensor that needs its own range
        model = ctx.export(graph)
        data = calibration_set(ctx, model, o.samples)
        own = [t for t in plan.tensors.values() if plan.share_of.get(id(t)) is None]
        inputs = {t.name for t in graph.inputs}
        ranges = TensorRanges([t.name for t in own], o.method)
        dtypes: dict[str, np.dtype] = {}

        def reduce(batch: dict) -> None:
            for name, value in batch.items():
                dtypes.setdefault(name, np.asarray(value).dtype)
            ranges({k: v for k, v in batch.items() if np.asarray(v).dtype == np.float32})

        internal = [t.name for t in own if t.name not in inputs]
        feeds_once = _InputTap(data, [t.name for t in own if t.name in inputs], reduce)
        if not all(t.shape and not isinstance(t.shape[0], int) or (t.shape and t.shape[0] == -1)
                   for t in graph.inputs):
            feeds_once.max_batch = 0  # a fixed batch dimension: feeds stay as the data gives them
        batches = stream_tensors(model, internal, feeds_once, reduce) if internal else _drain(feeds_once)
        stats["calibration_batches"] = batches
        stats["calibration_synthetic"] = int(data.synthetic)

        # the threshold searches get the quantization grid each tensor will have: uint8 over [lo, hi]
        # (255 steps; 127 per side of 0 for signed data), int8 symmetric (127 steps per side; also for
        # one-sided data) except a folded Relu/Clip, which gets zero point -128 (255 steps)
        folded = {t.name for t in plan.tensors.values() if id(t) in plan.folded_ids}
        found = {n: s.range(o.method, o.percentile, symmetric=o.activation_type == "int8" and n not in folded)
                 for n, s in ranges.stats.items()}
        not_float = {n for n, d in dtypes.items() if d != np.float32}
        plan.drop_tensors(not_float)
        if not plan.nodes:
            stats.update({f"skipped_{k}": skips[k] for k in _SKIPS})
            return PassResult(False, stats)

        # ---- rewrite
        writer = _Writer(graph, o, per_channel, reduce_range, found, stats)
        writer.apply(plan)

        # ---- accuracy guard: check on calibration batches in ORT with optimizations on (as deployed);
        # when the pass's own tolerance is missed, return the layers adding most error to float
        base = dict(stats)
        check = _Guard(model, feeds_once, ctx, self.tolerance.min_cosine or 0.99)
        check.split = bool(feeds_once.max_batch)
        cosine = check.cosine(ctx.export(graph))
        stats["guard_min_cosine_ppm"] = int(round(cosine * 1e6))
        if cosine < check.target:
            current, cur_plan, cur_writer, fallen, cosine = self._mixed_precision(
                model, o, per_channel, reduce_range, found, not_float, base, check, ctx, cosine, notes)
            if current is not None:
                graph.nodes, graph.inputs, graph.outputs = current.nodes, current.inputs, current.outputs
                graph.functions = current.functions
                plan, stats = cur_plan, cur_writer.stats
            stats["fallback_nodes"] = len(fallen)
            stats["guard_min_cosine_ppm"] = int(round(cosine * 1e6))
            if cosine < check.target:
                notes.append(f"cosine {cosine:.5f} on calibration data is still below {check.target:.3g} after "
                             f"returning {len(fallen)} layers to float")
        stats["quantized_nodes"] = len(plan.nodes)
        for op, n in sorted(Counter(n.op for n in plan.nodes).items()):
            stats[f"quantized_{op}"] = n
        stats["relu_clip_folded"] = plan.folded
        stats.update({f"skipped_{k}": skips[k] for k in _SKIPS})
        return PassResult(True, stats, notes)

    # layers measured end to end when the guard steps in (the worst by local error first)
    MEASURED = 24

    def _mixed_precision(self, model, o, per_channel, reduce_range, found, not_float, base, check, ctx,
                         cosine, notes):
        """Return layers to float in order of output cosine recovered per byte kept float, until the
        guard's target holds or no measured layer helps any more.

        Each candidate (the MEASURED layers adding most local error) is left out of the fully
        quantized model alone and the output cosine measured (ORT, optimizations on): its gain. The
        cost of a layer is the bytes its weight takes in float over int8 (1 KiB at least, so layers
        without weights are not free). Candidates are tried best ratio first; one that does not raise
        the cosine with the others already float is skipped, not a reason to stop."""
        def build(keep):
            return self._build(model, o, per_channel, reduce_range, found, not_float, frozenset(keep), dict(base))

        current, cur_plan, cur_writer = build(())
        ranking = check.sensitivities(current, cur_plan, cur_writer)
        by_pos = {pos: node for node in cur_plan.nodes for pos in [cur_plan.position[id(node)]]}
        measured = []
        for pos, name, _ in ranking[:self.MEASURED]:
            gain = check.cosine(ctx.export(build([pos])[0])) - cosine
            w = cur_plan.weights.get(id(by_pos[pos]))
            cost = int(w[0].size * 3) if w is not None else 0
            measured.append((gain / max(cost, 1024), gain, cost, pos, name))
        measured.sort(key=lambda r: -r[0])
        fallen: list[int] = []
        for _, gain, cost, pos, name in measured:
            if cosine >= check.target:
                break
            if gain <= 0:
                continue
            trial = build(fallen + [pos])
            now = check.cosine(ctx.export(trial[0]))
            if now <= cosine:
                continue
            fallen.append(pos)
            current, cur_plan, cur_writer = trial
            notes.append(f"layer '{name}' back to float: output cosine +{now - cosine:.4f} "
                         f"(+{gain:.4f} alone), {cost} bytes kept float")
            cosine = now
        if cosine < check.target and len(fallen) < len(measured):
            notes.append(f"no other measured layer raises the cosine ({len(measured)} measured); "
                         "try another method or exclude= layers")
        return current, cur_plan, cur_writer, fallen, cosine

    @staticmethod
    def _build(model, o, per_channel, reduce_range, found, not_float, keep_float, stats):
        g = G.import_graph(model)
        plan = _Plan(g, o, Counter(), keep_float)
        plan.drop_tensors(not_float)
        for key in ("qdq_pairs", "weights_quantized", "biases_quantized", "activations_calibrated", "scales_shared"):
            stats[key] = 0
        writer = _Writer(g, o, per_channel, reduce_range, found, stats)
        writer.apply(plan)
        return g, plan, writer


# ----------------------------------------------------------------- planning

class _Plan:
    """Which nodes are quantized, which tensors get a Q/DQ pair, which share another's scale."""

    def __init__(self, graph: gs.Graph, o: QdqOptions, skips: Counter, keep_float: frozenset = frozenset()) -> None:
        self.graph = graph
        self.skips = skips
        explicit_ops = list(o.op_types) != DEFAULT_OP_TYPES
        ops = set(o.op_types)
        self.transformer = not explicit_ops and _transformer_like(graph)
        outputs = {id(t) for t in graph.outputs}
        overridable = set(vars(graph).get("initializer_inputs", []))
        for sub in list(G.iter_graphs(graph))[1:]:
            skips["subgraph"] += sum(1 for n in sub.nodes if n.op in ops and (n.domain or "") in ("", "ai.onnx"))

        self.nodes: list[gs.Node] = []          # quantized compute nodes, in graph order
        self.act_inputs: dict[int, list[int]] = {}  # id(node) -> input slots read through DQ
        self.tensors: dict[int, gs.Tensor] = {}  # id -> tensor that gets a Q/DQ pair
        self.all_consumers: set[int] = set()     # ids of tensors whose every reader reads the DQ
        self.readers: dict[int, set[int]] = {}   # id(tensor) -> ids of nodes that read its DQ
        self.share_of: dict[int, Optional[gs.Tensor]] = {}  # id(tensor) -> root tensor whose scale it takes
        self.folded = 0
        self.folded_ids: set[int] = set()       # Relu/Clip outputs that took their producer's place
        self.weights: dict[int, tuple[np.ndarray, int]] = {}  # id(node) -> (float weight, axis)
        self.shared_nodes: list[gs.Node] = []   # MaxPool/Resize run on 8-bit data between quantized tensors

        self.position: dict[int, int] = {}       # id(node) -> index in graph.nodes (stable: Q/DQ are appended)
        for pos, node in enumerate(graph.nodes):
            if node.op not in ops or (node.domain or "") not in ("", "ai.onnx"):
                continue
            if pos in keep_float:
                continue  # returned to float by the accuracy guard
            if node.op in _SHARE_SCALE:
                continue  # quantized only between quantized tensors (see _share_chains)
            if o.exclude and any(fnmatch.fnmatchcase(node.name or "", pat) for pat in o.exclude):
                skips["excluded"] += 1
                continue
            slots = self._activation_slots(node, overridable, skips)
            if slots is None:
                continue
            if not all(_float32_or_unknown(node.inputs[s]) for s in slots) or not _float32_or_unknown(node.outputs[0]):
                skips["dtype"] += 1
                self.weights.pop(id(node), None)
                continue
            self.nodes.append(node)
            self.position[id(node)] = pos
            self.act_inputs[id(node)] = slots
            for s in slots:
                self._want(node.inputs[s], node)
            if node.op in _NEEDS_OUTPUT_Q:
                out = self._fold(node.outputs[0], outputs)
                self._want(out, None)
                self.all_consumers.add(id(out))
        self._share_chains(ops, o.exclude)

    def _activation_slots(self, node: gs.Node, overridable: set, skips: Counter) -> Optional[list[int]]:
        op = node.op
        if op in _WEIGHTED:
            if len(node.inputs) < 2 or not _is_activation(node.inputs[0]):
                skips["dynamic_weight" if op != "MatMul" else "constant_input"] += 1
                return None
            if node.op in ("Conv", "ConvTranspose", "Gemm") and _feeds_batchnorm(node):
                skips["batchnorm_not_folded"] += 1  # run fold_bn (cleanup) first: Conv -> BN cannot fuse
                return None
            w_tensor = node.inputs[1]
            w = G.const_value(w_tensor)
            if w is None:
                if _foldable(w_tensor):
                    skips["weight_not_folded"] += 1  # run fold (cleanup) first
                    return None
                if op == "MatMul" and _is_activation(w_tensor):
                    if self.transformer:
                        skips["fragile"] += 1
                        return None
                    return [0, 1]
                skips["dynamic_weight"] += 1
                return None
            if w_tensor.name in overridable:
                skips["overridable_weight"] += 1
                return None
            if w.dtype != np.float32:
                skips["weight_dtype"] += 1
                return None
            axis = _weight_axis(node, w)
            if axis is None:
                skips["weight_rank"] += 1
                return None
            self.weights[id(node)] = (w, axis)
            return [0]
        if op in ("Add", "Mul"):
            if len(node.inputs) != 2 or not all(_is_activation(t) for t in node.inputs):
                skips["constant_input"] += 1
                return None
            if self.transformer:
                skips["fragile"] += 1
                return None
            if node.inputs[0] is node.inputs[1]:
                return [0, 1]
            return [0, 1]
        if op == "Concat":
            if not node.inputs or not all(_is_activation(t) for t in node.inputs):
                skips["constant_input"] += 1
                return None
            return list(range(len(node.inputs)))
        if op in ("AveragePool", "GlobalAveragePool"):
            return [0] if node.inputs and _is_activation(node.inputs[0]) else None
        return None

    def _fold(self, out: gs.Tensor, graph_outputs: set) -> gs.Tensor:
        """A Relu/Clip that is the only reader of ``out`` takes its place (its range is what ORT quantizes)."""
        readers = list(out.outputs)
        if len(readers) == 1 and readers[0].op in _FOLDED and (readers[0].domain or "") in ("", "ai.onnx") \
                and readers[0].inputs and readers[0].inputs[0] is out and id(out) not in graph_outputs:
            act = readers[0]
            if act.op == "Clip" and not all(_is_const(t) for t in act.inputs[1:] if t.name):
                return out
            if id(act.outputs[0]) in graph_outputs:
                return out
            self.folded += 1
            self.folded_ids.add(id(act.outputs[0]))
            return act.outputs[0]
        return out

    def _want(self, tensor: gs.Tensor, reader: Optional[gs.Node]) -> None:
        self.tensors[id(tensor)] = tensor
        self.share_of.setdefault(id(tensor), None)
        if reader is not None:
            self.readers.setdefault(id(tensor), set()).add(id(reader))

    def _share_chains(self, ops: set, exclude: list[str]) -> None:
        """Inputs of quantized nodes made by shape ops (and MaxPool/Resize) from a quantized tensor
        take that tensor's scale, every link of the chain quantized, so ORT runs the chain on 8-bit data."""
        for tensor in list(self.tensors.values()):
            chain: list[tuple[gs.Node, gs.Tensor]] = []
            t = tensor
            while True:
                maker = G.producer(t)
                if maker is None or (maker.domain or "") not in ("", "ai.onnx") or not maker.inputs:
                    break
                if not (maker.op in _SHAPE_OPS or (maker.op in _SHARE_SCALE and maker.op in ops)):
                    break
                if exclude and any(fnmatch.fnmatchcase(maker.name or "", p) for p in exclude):
                    break
                if maker.op == "Resize" and len(maker.outputs) != 1:
                    break
                src = maker.inputs[0]
                if not _is_activation(src) or len(maker.outputs) != 1 or maker.outputs[0] is not t:
                    break
                chain.append((maker, src))
                t = src
            if not chain:
                continue
            root = t
            if id(root) not in self.tensors:
                continue  # the chain starts at a float tensor: the last link calibrates itself
            for maker, src in chain:
                out = maker.outputs[0]
                if out is not tensor:
                    self.tensors[id(out)] = out
                self.share_of[id(out)] = root
                self.readers.setdefault(id(src), set()).add(id(maker))
                if maker.op in _SHARE_SCALE:
                    self.shared_nodes.append(maker)

    def drop_tensors(self, names: set) -> None:
        """Leave float every node one of whose quantized tensors turned out not to be float32."""
        if not names:
            return
        bad = {id(t) for t in self.tensors.values() if t.name in names}
        bad |= {key for key, root in self.share_of.items() if root is not None and id(root) in bad}
        keep = []
        for node in self.nodes:
            touched = [node.inputs[s] for s in self.act_inputs[id(node)]]
            if node.op in _NEEDS_OUTPUT_Q:
                touched.append(node.outputs[0])
            if any(id(t) in bad for t in touched):
                self.skips["dtype"] += 1
                for t in touched:
                    self.readers.get(id(t), set()).discard(id(node))
                continue
            keep.append(node)
        self.nodes = keep
        for key in bad:
            self.tensors.pop(key, None)
            self.all_consumers.discard(key)


# ----------------------------------------------------------------- writing

class _Writer:
    def __init__(self, graph: gs.Graph, o: QdqOptions, per_channel: bool, reduce_range: bool,
                 ranges: dict[str, tuple[float, float]], stats: dict) -> None:
        self.graph = graph
        self.o = o
        self.per_channel = per_channel
        self.wmax = 64 if reduce_range else 127
        self.ranges = ranges
        self.stats = stats
        self.names = G.Names(graph)
        self.params: dict[int, tuple[gs.Constant, gs.Constant, float]] = {}  # id(tensor) -> (scale, zp, scale value)
        self.dq: dict[int, gs.Variable] = {}
        self.renamed: dict[str, str] = {}  # new name of a graph output's float tensor -> its original name
        self.weight_dq: dict[tuple[int, int], tuple[gs.Variable, np.ndarray]] = {}

    def fresh(self, base: str) -> str:
        return self.names.fresh(base)

    def act_params(self, tensor: gs.Tensor, plan: _Plan) -> tuple[gs.Constant, gs.Constant, float]:
        root = plan.share_of.get(id(tensor))
        if root is not None and id(root) in plan.tensors:
            return self.act_params(root, plan)
        if id(tensor) in self.params:
            return self.params[id(tensor)]
        lo, hi = self.ranges.get(tensor.name, (0.0, 0.0))
        if self.o.activation_type == "int8" and id(tensor) in plan.folded_ids and lo >= 0:
            # a folded Relu/Clip: ORT drops it only when the zero point is the type's minimum
            scale, zp = activation_qparams(0.0, hi, "uint8")
            zp = -128
        else:
            scale, zp = activation_qparams(lo, hi, self.o.activation_type)
        self.stats["activations_calibrated"] += 1
        zp_dtype = np.uint8 if self.o.activation_type == "uint8" else np.int8
        s = gs.Constant(self.fresh(f"{tensor.name}_scale"), np.array(scale, np.float32))
        z = gs.Constant(self.fresh(f"{tensor.name}_zero_point"), np.array(zp, zp_dtype))
        self.params[id(tensor)] = (s, z, float(scale))
        return self.params[id(tensor)]

    def apply(self, plan: _Plan) -> None:
        graph = self.graph
        # activations: one pair per tensor
        order = {id(t): i for i, n in enumerate(graph.nodes) for t in n.outputs}
        tensors = sorted(plan.tensors.values(), key=lambda t: order.get(id(t), -1))
        for t in tensors:
            readers = list(t.outputs)
            if id(t) in plan.all_consumers:
                targets = readers
            else:
                wanted = plan.readers.get(id(t), set())
                targets = [n for n in readers if id(n) in wanted]
            if not targets and not (id(t) in plan.all_consumers and G.positions(graph.outputs, t)):
                continue
            s, z, _ = self.act_params(t, plan)
            if plan.share_of.get(id(t)) is not None:
                self.stats["scales_shared"] += 1
            dtype = np.uint8 if self.o.activation_type == "uint8" else np.int8
            q_out = gs.Variable(self.fresh(f"{t.name}_quantized"), dtype=dtype, shape=t.shape)
            dq_out = gs.Variable(self.fresh(f"{t.name}_dequantized"), dtype=np.float32, shape=t.shape)
            q = gs.Node("QuantizeLinear", name=self.fresh(f"{t.name}_QuantizeLinear"), inputs=[t, s, z], outputs=[q_out])
            dq = gs.Node("DequantizeLinear", name=self.fresh(f"{t.name}_DequantizeLinear"),
                         inputs=[q_out, s, z], outputs=[dq_out])
            for reader in targets:
                G.rewire_input(reader, t, dq_out)
            slots = G.positions(graph.outputs, t) if id(t) in plan.all_consumers else []
            if slots:  # a graph output: the DequantizeLinear output takes its name, dtype and shape
                dq_out.name, t.name = t.name, self.fresh(f"{t.name}_float")
                self.renamed[t.name] = dq_out.name
                dq_out.dtype, dq_out.shape = t.dtype, t.shape
                for i in slots:
                    graph.outputs[i] = dq_out
            graph.nodes.extend([q, dq])
            self.dq[id(t)] = dq_out
            self.stats["qdq_pairs"] += 1
        # weights and biases
        for node in plan.nodes:
            if id(node) not in plan.weights:
                continue
            w, axis = plan.weights[id(node)]
            w_tensor = node.inputs[1]
            key = (id(w_tensor), axis)
            if key not in self.weight_dq:
                self.weight_dq[key] = self.quantize_weight(w_tensor.name, w, axis)
                self.stats["weights_quantized"] += 1
            dq_out, w_scale = self.weight_dq[key]
            node.inputs[1] = dq_out
            if node.op in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2 and node.inputs[2].name:
                self.quantize_bias(node, w_scale, axis, plan)

    def quantize_weight(self, name: str, w: np.ndarray, axis: int) -> tuple[gs.Variable, np.ndarray]:
        scale, q = weight_qparams(w, axis if self.per_channel else None, self.wmax)
        qw = gs.Constant(self.fresh(f"{name}_quantized"), q)
        s = gs.Constant(self.fresh(f"{name}_scale"), scale.astype(np.float32))
        z = gs.Constant(self.fresh(f"{name}_zero_point"), np.zeros(scale.shape, np.int8))
        out = gs.Variable(self.fresh(f"{name}_dequantized"), dtype=np.float32, shape=list(w.shape))
        attrs = {"axis": axis} if self.per_channel else {}
        self.graph.nodes.append(gs.Node("DequantizeLinear", name=self.fresh(f"{name}_DequantizeLinear"),
                                        attrs=attrs, inputs=[qw, s, z], outputs=[out]))
        return out, scale

    def quantize_bias(self, node: gs.Node, w_scale: np.ndarray, axis: int, plan: _Plan) -> None:
        bias_t = node.inputs[2]
        b = G.const_value(bias_t)
        x = node.inputs[0]
        if b is None or b.dtype != np.float32 or b.ndim != 1:
            self.stats["skipped_bias"] = self.stats.get("skipped_bias", 0) + 1
            return
        if node.op == "Gemm" and (float(node.attrs.get("alpha", 1.0)) != 1.0 or float(node.attrs.get("beta", 1.0)) != 1.0):
            self.stats["skipped_bias"] = self.stats.get("skipped_bias", 0) + 1
            return
        src = _dq_source(x)
        if src is None or id(src) not in self.params and plan.share_of.get(id(src)) is None:
            self.stats["skipped_bias"] = self.stats.get("skipped_bias", 0) + 1
            return
        x_scale = self.act_params(src, plan)[2]
        if self.per_channel:
            ws = np.asarray(w_scale, np.float64).reshape(-1)
            if node.op == "ConvTranspose":  # weight axis 1 is C_out/group: repeat for every group
                ws = np.tile(ws, int(node.attrs.get("group", 1)))
            if ws.size != b.size:
                self.stats["skipped_bias"] = self.stats.get("skipped_bias", 0) + 1
                return
        else:
            ws = np.full(b.size, float(np.asarray(w_scale).reshape(-1)[0]))
        scale = (x_scale * ws).astype(np.float32)
        scale = np.where(scale > 0, scale, np.float32(1.0))
        q = np.clip(np.round(b.astype(np.float64) / scale.astype(np.float64)), -2**31, 2**31 - 1).astype(np.int32)
        name = bias_t.name
        qb = gs.Constant(self.fresh(f"{name}_quantized"), q)
        s = gs.Constant(self.fresh(f"{name}_scale"), scale if self.per_channel else scale[:1].reshape(()))
        z = gs.Constant(self.fresh(f"{name}_zero_point"), np.zeros(s.values.shape, np.int32))
        out = gs.Variable(self.fresh(f"{name}_dequantized"), dtype=np.float32, shape=list(b.shape))
        attrs = {"axis": 0} if self.per_channel else {}
        self.graph.nodes.append(gs.Node("DequantizeLinear", name=self.fresh(f"{name}_DequantizeLinear"),
                                        attrs=attrs, inputs=[qb, s, z], outputs=[out]))
        node.inputs[2] = out
        self.stats["biases_quantized"] += 1


# ----------------------------------------------------------------- numerics

def activation_qparams(lo: float, hi: float, dtype: str = "uint8") -> tuple[float, int]:
    """(scale, zero point) for an activation range: uint8 asymmetric over [min(lo,0), max(hi,0)],
    or int8 symmetric over [-max|.|, max|.|]."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if dtype == "int8":
        m = max(-lo, hi)
        scale = m / 127.0 if m > 0 else 1.0
        return float(np.float32(scale)), 0
    span = hi - lo
    if span <= 0:
        return 1.0, 0
    scale = float(np.float32(span / 255.0))
    zp = int(np.clip(np.round(-lo / scale), 0, 255))
    return scale, zp


def weight_qparams(w: np.ndarray, axis: Optional[int], qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """(scale, int8 values): symmetric, zero point 0, one scale per slice along ``axis`` (or one)."""
    w = np.asarray(w, np.float32)
    if axis is None:
        m = np.array(np.max(np.abs(w), initial=0.0), np.float64)
        shape = ()
    else:
        other = tuple(i for i in range(w.ndim) if i != axis)
        m = np.max(np.abs(w), axis=other, initial=0.0).astype(np.float64)
        shape = [1] * w.ndim
        shape[axis] = w.shape[axis]
    scale = np.where(m > 0, m / qmax, 1.0).astype(np.float32)
    q = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return scale, q


def _weight_axis(node: gs.Node, w: np.ndarray) -> Optional[int]:
    if node.op == "Conv" and w.ndim >= 3:
        return 0
    if node.op == "ConvTranspose" and w.ndim >= 3:
        return 1
    if node.op == "MatMul" and w.ndim == 2:
        return 1
    if node.op == "Gemm" and w.ndim == 2:
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return None


# ----------------------------------------------------------------- helpers

def _opset(graph: gs.Graph) -> int:
    return int(getattr(graph, "opset", 0) or 0)


def _reduce_range(option: str) -> tuple[bool, Optional[bool]]:
    """(reduce_range, whether the CPU has int8 VNNI or None when not asked)."""
    if option != "auto":
        return option == "true", None
    vnni = cpu_has_vnni()
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
    return (x86 and not vnni), vnni


def cpu_has_vnni() -> bool:
    """Whether the CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    except OSError:
        pass
    return False


def _transformer_like(graph: gs.Graph) -> bool:
    ops = {n.op for n in graph.nodes}
    return bool(ops & {"Softmax", "LayerNormalization", "Attention", "SkipLayerNormalization"}) or (
        "ReduceMean" in ops and bool(ops & {"Pow", "Sqrt"}))


def _feeds_batchnorm(node: gs.Node) -> bool:
    readers = list(node.outputs[0].outputs) if node.outputs else []
    return len(readers) == 1 and readers[0].op == "BatchNormalization"


def _foldable(tensor: gs.Tensor, depth: int = 0) -> bool:
    """A value computed from constants only by a short chain of layout ops (an unfolded weight)."""
    maker = G.producer(tensor)
    if maker is None or depth > 4 or maker.op not in ("Transpose", "Reshape", "Identity", "Cast", "Unsqueeze",
                                                       "Squeeze", "Flatten"):
        return False
    src = maker.inputs[0] if maker.inputs else None
    return src is not None and (_is_const(src) or _foldable(src, depth + 1)) and all(
        _is_const(t) for t in maker.inputs[1:] if t.name)


def _float32_or_unknown(tensor: gs.Tensor) -> bool:
    dtype = getattr(tensor, "dtype", None)
    if dtype is None:
        return True
    try:
        return np.dtype(dtype) == np.float32
    except TypeError:
        return False


def _is_activation(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Variable) and bool(tensor.name) and not _is_const(tensor)


def _dq_source(tensor: gs.Tensor) -> Optional[gs.Tensor]:
    """The float tensor a DequantizeLinear output stands for (the input of its QuantizeLinear)."""
    dq = G.producer(tensor)
    if dq is None or dq.op != "DequantizeLinear":
        return None
    q = G.producer(dq.inputs[0])
    if q is None or q.op != "QuantizeLinear":
        return None
    return q.inputs[0]


def _is_const(tensor: Optional[gs.Tensor]) -> bool:
    """Whether a tensor has a fixed value, without loading it."""
    return G.constant_source(tensor) is not None


class _Guard:
    """Output cosine of a quantized model against the float one on a few calibration batches
    (ORT, optimizations on), and per-layer error contributions (optimizations off, names kept)."""

    BATCHES = 4
    split = True  # the batch axis is symbolic: sensitivities may run on a slice of a batch

    def __init__(self, model: onnx.ModelProto, data, ctx: PassContext, target: float) -> None:
        self.model, self.ctx, self.target = model, ctx, target
        self.feeds = []
        for feed in data:
            self.feeds.append(feed)
            if len(self.feeds) >= self.BATCHES:
                break
        self.reference = [self._run(model, f, optimize=True) for f in self.feeds]

    def _session(self, model: onnx.ModelProto, optimize: bool):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        so.log_severity_level = 4  # errors come back as exceptions; no raw ORT lines
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def _run(self, model, feed, optimize, names=None, session=None):
        sess = session or self._session(model, optimize)
        names = names or [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feed)))

    def cosine(self, candidate: onnx.ModelProto) -> float:
        sess = self._session(candidate, True)
        dots: dict[str, list[float]] = {}
        for feed, ref in zip(self.feeds, self.reference):
            got = self._run(candidate, feed, True, list(ref), sess)
            for name, r in ref.items():
                if not np.issubdtype(np.asarray(r).dtype, np.floating):
                    continue
                a, b = np.asarray(r, np.float64).ravel(), np.asarray(got[name], np.float64).ravel()
                acc = dots.setdefault(name, [0.0, 0.0, 0.0])
                acc[0] += float(a @ b)
                acc[1] += float(a @ a)
                acc[2] += float(b @ b)
        values = [d[0] / np.sqrt(d[1] * d[2]) if d[1] > 0 and d[2] > 0 else (1.0 if d[1] == d[2] else 0.0)
                  for d in dots.values()]
        return float(min(values)) if values else 1.0

    def sensitivities(self, graph: gs.Graph, plan: "_Plan", writer: "_Writer") -> list[tuple[int, str, float]]:
        """(position, name, local SNR dB) of every quantized node, the one whose quantization adds most
        error first: the noise power of its output relative to the float model, less its inputs'.
        Measured on one batch, with graph optimizations off so every tensor keeps its name."""
        from onnxopt.calibrate import with_outputs

        pairs = []  # (node, (q, float) names of its output, [(q, float) names of its inputs])
        for node in plan.nodes:
            out = node.outputs[0].name
            ins = []
            for slot in plan.act_inputs[id(node)]:
                src = _dq_source(node.inputs[slot])
                if src is not None:
                    ins.append((src.name, writer.renamed.get(src.name, src.name)))
            pairs.append((node, (out, writer.renamed.get(out, out)), ins))
        if not pairs:
            return []
        q_names = sorted({n for _, o, ins in pairs for n in [o[0], *[i[0] for i in ins]]})
        f_names = sorted({n for _, o, ins in pairs for n in [o[1], *[i[1] for i in ins]]})
        q_model = with_outputs(self.ctx.export(graph), q_names)
        f_model = with_outputs(self.model, f_names)
        q_sess, f_sess = self._session(q_model, False), self._session(f_model, False)
        noise: dict[str, float] = {}
        power: dict[str, float] = {}
        for feed in list(_split(self.feeds[0], 2 if self.split else 0))[:1] if self.feeds else []:
            q = self._run(q_model, feed, False, q_names, q_sess)
            f = self._run(f_model, feed, False, f_names, f_sess)
            for _, o, ins in pairs:
                for qn, fn in [o, *ins]:
                    a, b = np.asarray(f[fn], np.float64), np.asarray(q[qn], np.float64)
                    noise[qn] = noise.get(qn, 0.0) + float(((a - b) ** 2).sum())
                    power[qn] = power.get(qn, 0.0) + float((a ** 2).sum())
        rel = {n: noise[n] / power[n] if power[n] > 0 else 0.0 for n in noise}
        ranked = []
        for node, o, ins in pairs:
            local = rel[o[0]] - max([rel[i[0]] for i in ins], default=0.0)
            ranked.append((local, plan.position[id(node)], node.name or node.outputs[0].name))
        ranked.sort(key=lambda r: -r[0])
        return [(pos, name, float(-10 * np.log10(max(local, 1e-30)))) for local, pos, name in ranked]


class _InputTap:
    """Re-iterable feeds that also hand the graph inputs wanted to ``reduce`` (first run only)."""

    # Every intermediate tensor of a batch is held at once, so calibration runs one sample at a
    # time: on mobilenetv2 (224x224) batch 1 peaked at 285 MiB against 873 MiB at batch 8, and
    # was no slower.
    max_batch = 1

    def __init__(self, data, names: list[str], reduce) -> None:
        self.data, self.names, self.reduce, self.runs = data, names, reduce, 0

    @property
    def synthetic(self) -> bool:
        return self.data.synthetic

    def __iter__(self):
        first = self.runs == 0
        self.runs += 1
        for batch in self.data:
            for feed in _split(batch, self.max_batch):
                if first and self.names:
                    self.reduce({n: feed[n] for n in self.names if n in feed})
                yield feed


def _split(feed: dict, size: int):
    """A feed cut into feeds of at most ``size`` samples when every input has the same leading axis."""
    leading = {np.asarray(v).shape[0] if np.ndim(v) else None for v in feed.values()}
    n = leading.pop() if len(leading) == 1 else None
    if not size or not n or n <= size:
        yield feed
        return
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in feed.items()}


def _drain(tap: _InputTap) -> int:
    n = 0
    for _ in tap:
        n += 1
    if n == 0:
        raise InputError("calibration data gave no batches")
    return n
