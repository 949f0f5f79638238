"""Dynamic quantization, as ONNX Runtime deploys transformers on CPU: int8 weights, activations
quantized at run time.

A MatMul (or a Gemm without transA, alpha = beta = 1) whose weight is a float constant becomes

    x -> DynamicQuantizeLinear -> MatMulInteger(x_q, W_q, x_zp, W_zp) -> Cast(float) -> Mul(x_s * W_s) [-> Add(bias)]

with W_q int8 symmetric, one scale per output column (axis 1 of the [K, N] weight; a transB
Gemm's weight is transposed first), zero points 0, and the activation uint8 asymmetric over each
run's own min/max (one scale per tensor and run: no calibration data needed). ONNX Runtime fuses
the chain into com.microsoft DynamicQuantizeMatMul (bias included), which takes the per-column
scales: the standard ops are written, so the file runs on any runtime, and ORT runs its fused
kernel. One DynamicQuantizeLinear is written per activation and read by every MatMul on it
(Q/K/V); ORT then fuses each reader into a MatMulIntegerToFloat on the shared quantized tensor.

Convolutions stay float in this mode (ORT's ConvInteger is slower than its float Conv on CPU).
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt import layers as L

from .plan import _float32_or_unknown, _is_activation
from .writer import weight_qparams

DYNAMIC_OPSET = 11  # DynamicQuantizeLinear


class DynamicPlan:
    """The MatMul/Gemm nodes quantized dynamically, each with its [K, N] float weight."""

    def __init__(self, graph: gs.Graph, ops: set, exclude: list[str], skips: Counter,
                 keep_float: frozenset = frozenset(), only: list[str] = ()) -> None:
        overridable = set(vars(graph).get("initializer_inputs", []))
        self.nodes: list[gs.Node] = []
        self.weights: dict[int, np.ndarray] = {}
        self.position: dict[int, int] = {}
        for sub in list(G.iter_graphs(graph))[1:]:  # If/Loop/Scan bodies stay float: counted, not reached
            skips["subgraph"] += sum(1 for n in sub.nodes if n.op in ("MatMul", "Gemm") and n.op in ops
                                     and (n.domain or "") in ("", "ai.onnx"))
        for pos, node in enumerate(graph.nodes):
            if node.op not in ("MatMul", "Gemm") or node.op not in ops or (node.domain or "") not in ("", "ai.onnx"):
                continue
            if pos in keep_float:
                continue
            if L.left_out([node.name or ""], exclude, only):
                skips["excluded"] += 1
                continue
            w = self._weight(node, overridable, skips)
            if w is None:
                continue
            self.nodes.append(node)
            self.weights[id(node)] = w
            self.position[id(node)] = pos

    @staticmethod
    def _weight(node: gs.Node, overridable: set, skips: Counter):
        if len(node.inputs) < 2 or not _is_activation(node.inputs[0]):
            skips["constant_input"] += 1
            return None
        if not _float32_or_unknown(node.inputs[0]) or not _float32_or_unknown(node.outputs[0]):
            skips["dtype"] += 1
            return None
        w_t = node.inputs[1]
        found = L.resolve_weight(w_t)  # overridable weights are counted below, by name
        w = found.array() if isinstance(found, L.Weight) and not found.transposed else None  # Transpose: fold first
        if w is None:
            skips["weight_not_folded" if found == "weight_not_folded" or isinstance(found, L.Weight)
                  else "dynamic_weight"] += 1
            return None
        if w_t.name in overridable:
            skips["overridable_weight"] += 1
            return None
        if w.dtype != np.float32:
            skips["weight_dtype"] += 1
            return None
        if w.ndim != 2:
            skips["weight_rank"] += 1
            return None
        if node.op == "Gemm":
            a = node.attrs
            if int(a.get("transA", 0)) or float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0:
                skips["gemm_attrs"] += 1
                return None
            if int(a.get("transB", 0)):
                w = np.ascontiguousarray(w.T)
        return w


def stored_axis(node: gs.Node) -> int:
    """The output-channel axis of the stored weight: 1 of [K, N], 0 of a Gemm transB [N, K]."""
    return 0 if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else 1


def apply_dynamic(graph: gs.Graph, plan: DynamicPlan, wmax: int, stats: dict,
                  codes: Optional[dict] = None) -> None:
    """Rewrite the planned nodes; every quantized weight is written once (a tied weight shares it).
    ``codes``: int8 codes chosen elsewhere (GPTQ, rounding.py) by (weight name, stored axis)."""
    codes = codes or {}
    names = G.Names(graph)
    quantized_x: dict[int, tuple[gs.Variable, gs.Variable, gs.Variable]] = {}
    weights: dict[tuple[int, bool], tuple[gs.Constant, gs.Constant, np.ndarray]] = {}
    new: list[gs.Node] = []
    for node in plan.nodes:
        x, y = node.inputs[0], node.outputs[0]
        base = node.name or y.name
        if id(x) not in quantized_x:
            xq = gs.Variable(names.fresh(f"{x.name}_quantized"), dtype=np.uint8)
            xs = gs.Variable(names.fresh(f"{x.name}_scale"), dtype=np.float32, shape=[])
            xz = gs.Variable(names.fresh(f"{x.name}_zero_point"), dtype=np.uint8, shape=[])
            new.append(gs.Node("DynamicQuantizeLinear", name=names.fresh(f"{x.name}_DynamicQuantizeLinear"),
                               inputs=[x], outputs=[xq, xs, xz]))
            quantized_x[id(x)] = (xq, xs, xz)
            stats["dynamic_activations"] = stats.get("dynamic_activations", 0) + 1
        xq, xs, xz = quantized_x[id(x)]
        key = (id(node.inputs[1]), node.op == "Gemm" and bool(int(node.attrs.get("transB", 0))))
        if key not in weights:
            w = plan.weights[id(node)]
            scale, q = weight_qparams(w, 1, wmax)
            chosen = codes.get((node.inputs[1].name, stored_axis(node)))
            if chosen is not None:
                chosen = chosen.T if stored_axis(node) == 0 else chosen
                q = chosen if chosen.shape == q.shape else q
            wname = node.inputs[1].name or base
            weights[key] = (gs.Constant(names.fresh(f"{wname}_quantized"), q),
                            gs.Constant(names.fresh(f"{wname}_zero_point"), np.zeros(scale.shape, np.int8)),
                            scale.astype(np.float32))
            stats["weights_quantized"] = stats.get("weights_quantized", 0) + 1
        wq, wz, scale = weights[key]
        acc = gs.Variable(names.fresh(f"{base}_int32"), dtype=np.int32)
        acc_f = gs.Variable(names.fresh(f"{base}_int32_float"), dtype=np.float32)
        s = gs.Variable(names.fresh(f"{base}_scale"), dtype=np.float32, shape=list(scale.shape))
        bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name else None
        out = gs.Variable(names.fresh(f"{base}_unbiased"), dtype=np.float32) if bias is not None else y
        new += [
            gs.Node("MatMulInteger", name=names.fresh(f"{base}_MatMulInteger"), inputs=[xq, wq, xz, wz], outputs=[acc]),
            gs.Node("Cast", name=names.fresh(f"{base}_Cast"), attrs={"to": 1}, inputs=[acc], outputs=[acc_f]),
            gs.Node("Mul", name=names.fresh(f"{base}_scales"), inputs=[xs, gs.Constant(names.fresh(f"{base}_w_scale"), scale)],
                    outputs=[s]),
            gs.Node("Mul", name=names.fresh(f"{base}_rescale"), inputs=[acc_f, s], outputs=[out]),
        ]
        if bias is not None:
            new.append(gs.Node("Add", name=names.fresh(f"{base}_bias"), inputs=[out, bias], outputs=[y]))
        node.outputs.clear()  # the original node is dropped below; its output now comes from the chain
        node.inputs.clear()
    drop = {id(n) for n in plan.nodes}
    graph.nodes = [n for n in graph.nodes if id(n) not in drop] + new
    stats["dynamic_nodes"] = len(plan.nodes)
