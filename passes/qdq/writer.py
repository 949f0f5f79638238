"""Writing the plan into the graph: Q/DQ pairs, int8 weights, int32 biases, and the numerics of their parameters."""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import graph as G

from .options import QdqOptions
from .plan import Plan, _dq_source


class Writer:
    def __init__(self, graph: gs.Graph, o: QdqOptions, per_channel: bool, reduce_range: bool,
                 ranges: dict[str, tuple[float, float]], stats: dict,
                 codes: Optional[dict[tuple[str, int], np.ndarray]] = None) -> None:
        self.graph = graph
        self.codes = codes or {}  # (weight name, axis) -> int8 codes chosen elsewhere (GPTQ, rounding.py)
        self.o = o
        self.per_channel = per_channel
        self.wmax = 64 if reduce_range else 127
        self.ranges = ranges
        self.stats = stats
        self.names = G.Names(graph)
        self.params: dict[int, tuple[gs.Constant, gs.Constant, float]] = {}  # id(tensor) -> (scale, zp, scale value)
        self.dq: dict[int, gs.Variable] = {}
        self.renamed: dict[str, str] = {}  # new name of a graph output's float tensor -> its original name
        self.weight_dq: dict[tuple[int, int, bool], tuple[gs.Variable, np.ndarray]] = {}

    def fresh(self, base: str) -> str:
        return self.names.fresh(base)

    def act_params(self, tensor: gs.Tensor, plan: Plan) -> tuple[gs.Constant, gs.Constant, float]:
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

    def apply(self, plan: Plan) -> None:
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
        weight_only = {id(n) for n in plan.weight_only}
        for node in plan.nodes + plan.weight_only:
            if id(node) not in plan.weights:
                continue
            w, axis = plan.weights[id(node)]
            w_tensor = node.inputs[1]
            only = id(node) in weight_only
            key = (id(w_tensor), axis, only)
            if key not in self.weight_dq:
                self.weight_dq[key] = self.quantize_weight(w_tensor.name, w, axis,
                                                           self.codes.get((w_tensor.name, axis)), only)
                self.stats["weights_quantized"] += 1
            dq_out, w_scale = self.weight_dq[key]
            node.inputs[1] = dq_out
            if only:
                self.stats["weight_only_nodes"] = self.stats.get("weight_only_nodes", 0) + 1
                continue  # float activations: the bias stays float
            if node.op in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2 and node.inputs[2].name:
                self.quantize_bias(node, w_scale, axis, plan)

    def quantize_weight(self, name: str, w: np.ndarray, axis: int, codes: Optional[np.ndarray] = None,
                        weight_only: bool = False) -> tuple[gs.Variable, np.ndarray]:
        scale, q = weight_qparams(w, axis if self.per_channel else None, self.wmax)
        if codes is not None and codes.shape == q.shape:
            q = codes
        qw = gs.Constant(self.fresh(f"{name}_quantized"), q)
        if weight_only:
            return self.cast_weight(name, qw, scale, axis, list(w.shape)), scale
        s = gs.Constant(self.fresh(f"{name}_scale"), scale.astype(np.float32))
        z = gs.Constant(self.fresh(f"{name}_zero_point"), np.zeros(scale.shape, np.int8))
        out = gs.Variable(self.fresh(f"{name}_dequantized"), dtype=np.float32, shape=list(w.shape))
        attrs = {"axis": axis} if self.per_channel else {}
        self.graph.nodes.append(gs.Node("DequantizeLinear", name=self.fresh(f"{name}_DequantizeLinear"),
                                        attrs=attrs, inputs=[qw, s, z], outputs=[out]))
        return out, scale

    def cast_weight(self, name: str, qw: gs.Constant, scale: np.ndarray, axis: int, shape: list) -> gs.Variable:
        """int8 codes read by a float layer as Cast(codes) * scale, the same values a DequantizeLinear
        gives. ONNX Runtime constant-folds Cast and Mul of initializers when the session loads (it
        leaves DequantizeLinear for its QDQ fusions and runs it on every call: ppocr_v4_rec with 47
        such layers ran 1.4x slower than with Cast and Mul), so the file keeps int8 and the layer
        runs at float speed."""
        cast_out = gs.Variable(self.fresh(f"{name}_int8_as_float"), dtype=np.float32, shape=shape)
        self.graph.nodes.append(gs.Node("Cast", name=self.fresh(f"{name}_Cast"), attrs={"to": onnx.TensorProto.FLOAT},
                                        inputs=[qw], outputs=[cast_out]))
        if self.per_channel and scale.ndim:
            view = [1] * len(shape)
            view[axis] = -1
            scale = scale.reshape(view)
        s = gs.Constant(self.fresh(f"{name}_scale"), scale.astype(np.float32))
        out = gs.Variable(self.fresh(f"{name}_dequantized"), dtype=np.float32, shape=shape)
        self.graph.nodes.append(gs.Node("Mul", name=self.fresh(f"{name}_Mul"), inputs=[cast_out, s], outputs=[out]))
        return out

    def quantize_bias(self, node: gs.Node, w_scale: np.ndarray, axis: int, plan: Plan) -> None:
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
