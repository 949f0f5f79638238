"""The layers woq can rewrite: MatMul/Gemm with a constant 2-D weight, Gather on a float table.

``find_layers`` is the one place that walks the graph; everything else takes its list.
Reading a weight's values is left to :meth:`Layer.read`, called one layer at a time,
so no more than one float weight is held at once.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from onnxopt import graph as G

from .options import WoqOptions

FLOATS = (np.dtype(np.float32), np.dtype(np.float16))
SKIPS = ("excluded", "no_constant_weight", "weight_not_2d", "weight_dtype", "gemm_trans_a", "gemm_bias",
         "input_1d", "in_function", "embeddings_off", "gather_axis", "gather_odd_width")


@dataclass(eq=False)
class Layer:
    graph: gs.Graph
    node: gs.Node
    kind: str                   # matmul | gemm | gather
    weight: gs.Constant         # the stored table: [K, N] (Gemm transB: [N, K]; Gather: [rows, width])
    top: bool                   # in the main graph (calibration reaches it)
    trans_b: bool = False
    alpha: float = 1.0
    bias: Optional[np.ndarray] = None   # Gemm: beta * C as float [N]

    @property
    def x(self) -> gs.Tensor:
        """The activation input (Gather: the indices)."""
        return self.node.inputs[1] if self.kind == "gather" else self.node.inputs[0]

    @property
    def shape(self) -> tuple:
        return tuple(self.weight._values.shape)

    @property
    def k(self) -> int:
        return self.shape[1] if self.trans_b or self.kind == "gather" else self.shape[0]

    @property
    def n(self) -> int:
        return self.shape[0] if self.trans_b or self.kind == "gather" else self.shape[1]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.weight._values.dtype)

    def read(self) -> np.ndarray:
        """The weight as float32 [K, N] (Gather: the table [rows, width]), read now and not cached."""
        values = self.weight._values
        array = values.load() if isinstance(values, LazyValues) else G.const_array(self.weight)
        w = np.asarray(array, np.float32)
        return w.T if self.trans_b else w


def find_layers(graph: gs.Graph, opts: WoqOptions, skips: Counter) -> list[Layer]:
    """Every rewritable layer in the graph and its If/Loop/Scan bodies; the rest counted in ``skips``."""
    overridable = set(vars(graph).get("initializer_inputs", []) or [])
    for func in getattr(graph, "functions", []):
        for g in G.iter_graphs(func, functions=False):
            skips["in_function"] += sum(1 for n in g.nodes if n.op in ("MatMul", "Gemm") and _onnx(n))
    layers = []
    for g in G.iter_graphs(graph, functions=False):
        for node in g.nodes:
            if node.op not in ("MatMul", "Gemm", "Gather") or not _onnx(node) or len(node.inputs) < 2:
                continue
            layer = _layer(g, node, g is graph, opts, skips, overridable)
            if layer is not None:
                layers.append(layer)
    return layers


def _onnx(node: gs.Node) -> bool:
    return (node.domain or "") in ("", "ai.onnx")


def _constant(tensor: gs.Tensor, overridable: set) -> Optional[gs.Constant]:
    source = G.constant_source(tensor, overridable)
    if isinstance(source, gs.Constant) and not isinstance(source._values, SparseValues):
        return source
    return None


def _layer(g: gs.Graph, node: gs.Node, top: bool, opts: WoqOptions, skips: Counter,
           overridable: set) -> Optional[Layer]:
    if node.op == "Gather":
        return _gather(g, node, top, opts, skips, overridable)
    weight = _constant(node.inputs[1], overridable)
    if weight is None:
        # activation x activation (attention), or a weight a caller may override
        if _constant(node.inputs[0], overridable) is None:
            skips["no_constant_weight"] += 1
        return None
    if _excluded(node, opts):
        skips["excluded"] += 1
        return None
    if len(weight._values.shape) != 2:
        skips["weight_not_2d"] += 1
        return None
    if np.dtype(weight._values.dtype) not in FLOATS:
        skips["weight_dtype"] += 1   # already integer (quantized) or float64, which MatMulNBits does not take
        return None
    x = node.inputs[0]
    if x.shape is not None and len(x.shape) == 1:
        skips["input_1d"] += 1       # MatMul of a vector drops an axis; MatMulNBits keeps A's rank
        return None
    if node.op == "MatMul":
        return Layer(g, node, "matmul", weight, top)
    if int(node.attrs.get("transA", 0)):
        skips["gemm_trans_a"] += 1
        return None
    trans_b = bool(int(node.attrs.get("transB", 0)))
    n = weight._values.shape[0 if trans_b else 1]
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        c = G.const_value(node.inputs[2], overridable)
        if c is None or c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1) or c.ndim > 2:
            skips["gemm_bias"] += 1   # a bias per row, or computed: not MatMulNBits' [N] bias
            return None
        bias = np.broadcast_to(np.asarray(c, np.float32).reshape(-1), (n,)) * float(node.attrs.get("beta", 1.0))
    return Layer(g, node, "gemm", weight, top, trans_b=trans_b, alpha=float(node.attrs.get("alpha", 1.0)),
                 bias=bias)


def _gather(g: gs.Graph, node: gs.Node, top: bool, opts: WoqOptions, skips: Counter,
            overridable: set) -> Optional[Layer]:
    table = _constant(node.inputs[0], overridable)
    if table is None or np.dtype(table._values.dtype) not in FLOATS or len(table._values.shape) != 2:
        return None   # a Gather on data or shapes: not an embedding, not counted
    if not opts.embeddings:
        skips["embeddings_off"] += 1
        return None
    if _excluded(node, opts):
        skips["excluded"] += 1
        return None
    if int(node.attrs.get("axis", 0)) not in (0, -2):
        skips["gather_axis"] += 1
        return None
    if table._values.shape[1] * opts.bits % 8:
        skips["gather_odd_width"] += 1   # rows are packed whole bytes
        return None
    return Layer(g, node, "gather", table, top)


def _excluded(node: gs.Node, opts: WoqOptions) -> bool:
    return any(fnmatch.fnmatchcase(node.name or "", pat) for pat in opts.exclude)
