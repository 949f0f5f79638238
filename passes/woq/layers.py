"""The layers woq rewrites: MatMul/Gemm found by :mod:`onnxopt.layers`, and Gathers on float tables.

``find_layers`` turns onnxopt.layers' weighted layers (MatMul and Gemm) into :class:`Target`s
and adds the embedding Gathers; what cannot map onto MatMulNBits or GatherBlockQuantized is
counted in one vocabulary, onnxopt.layers' reasons first. Reading a weight's values is left
to :meth:`Target.read`, called one layer at a time, so no more than one float weight is
held at once.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from onnxopt import graph as G
from onnxopt import layers as L

from .options import WoqOptions

FLOATS = (np.dtype(np.float32), np.dtype(np.float16))   # MatMulNBits' and GatherBlockQuantized's A/output types
# onnxopt.layers' reasons, then woq's own (what MatMulNBits / GatherBlockQuantized cannot express)
SKIPS = ("excluded", "dynamic_weight", "overridable_weight", "weight_not_folded", "constant_input", "weight_dtype",
         "weight_rank", "in_function", "gemm_trans_a", "gemm_bias", "input_1d", "embeddings_off", "gather_axis",
         "gather_odd_width")


@dataclass(eq=False)
class Target:
    """One node to rewrite: a MatMul/Gemm (``layer`` from onnxopt.layers) or an embedding Gather."""

    node: gs.Node
    graph: gs.Graph
    kind: str                   # matmul | gemm | gather
    const: gs.Constant          # the stored values
    top: bool                   # in the main graph (calibration reaches it)
    layer: Optional[L.Layer] = None
    alpha: float = 1.0
    bias: Optional[np.ndarray] = None   # Gemm: beta * C as float [N]

    @property
    def x(self) -> gs.Tensor:
        """The activation input (Gather: the indices)."""
        return self.node.inputs[1] if self.kind == "gather" else self.node.inputs[0]

    @property
    def name(self) -> str:
        return self.const.name or self.node.name or "woq"

    @property
    def k(self) -> int:
        """MatMul/Gemm: input features; Gather: the table's width."""
        return self.layer.in_features if self.layer is not None else self.const._values.shape[1]

    @property
    def n(self) -> int:
        """MatMul/Gemm: output features; Gather: the table's rows."""
        return self.layer.out_features if self.layer is not None else self.const._values.shape[0]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.const._values.dtype)

    @property
    def nbytes(self) -> int:
        return int(self.const._values.nbytes)

    def read(self) -> np.ndarray:
        """The weight as float32 [K, N] (Gather: the table [rows, width]), read now and not cached on
        the graph (gs's ``values`` would keep it)."""
        stored = _stored(self.const)
        if self.layer is not None:
            stored = self.layer.matrix(stored).T     # [out, in] -> [K, N]
        return np.asarray(stored, np.float32)

    def replace(self, new: gs.Node) -> None:
        """Put ``new`` in the node's place, writing the node's outputs."""
        outputs = list(self.node.outputs)
        self.node.outputs.clear()
        new.outputs = outputs
        nodes = self.graph.nodes
        idx = G.positions(nodes, self.node)[0]
        self.node.inputs.clear()
        nodes[idx] = new


def _stored(const: gs.Constant) -> np.ndarray:
    """A constant's values without a copy where its bytes are in memory (a read-only view), else
    loaded once and not kept by the graph."""
    values = const._values
    if not isinstance(values, LazyValues):
        return np.asarray(values)
    proto = values.tensor
    dtype = np.dtype(values.dtype)
    if (proto.HasField("raw_data") and proto.data_location != onnx.TensorProto.EXTERNAL
            and sys.byteorder == "little" and len(proto.raw_data) == dtype.itemsize * int(np.prod(values.shape))):
        return np.frombuffer(proto.raw_data, dtype=dtype).reshape(tuple(values.shape))
    return values.load()


def find_layers(graph: gs.Graph, opts: WoqOptions, skips: Counter) -> list[Target]:
    """Every rewritable node in the graph and its If/Loop/Scan bodies; the rest counted in ``skips``."""
    found = L.find_layers(graph, ops=("MatMul", "Gemm"), exclude=opts.exclude, check_input=True, only=opts.only)
    for node, scope, reason in found.skipped:
        skips["in_function" if scope.startswith("function ") else reason] += 1
    overridable = set(vars(graph).get("initializer_inputs", []) or [])
    targets = []
    for layer in found.layers:
        target = _dense(layer, skips, overridable)
        if target is not None:
            targets.append(target)
    targets += _gathers(graph, opts, skips, overridable)
    return targets


def _dense(layer: L.Layer, skips: Counter, overridable: set) -> Optional[Target]:
    if layer.in_function:
        skips["in_function"] += 1
        return None
    if layer.weight.dtype not in FLOATS or isinstance(layer.weight.const._values, SparseValues):
        skips["weight_dtype"] += 1     # float64 (MatMulNBits takes float16/32), or a sparse constant
        return None
    x = layer.x
    if x.shape is not None and len(x.shape) == 1:
        skips["input_1d"] += 1         # MatMul of a vector drops an axis; MatMulNBits keeps A's rank
        return None
    if layer.kind == "matmul":
        return Target(layer.node, layer.graph, "matmul", layer.weight.const, layer.top, layer)
    if layer.trans_a:
        skips["gemm_trans_a"] += 1
        return None
    n, bias = layer.out_features, None
    if layer.bias is not None:
        c = G.const_value(layer.bias, overridable)
        if c is None or c.size not in (1, n) or c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
            skips["gemm_bias"] += 1    # a bias per row, or computed: not MatMulNBits' [N] bias
            return None
        bias = np.broadcast_to(np.asarray(c, np.float32).reshape(-1), (n,)) * np.float32(layer.beta)
    return Target(layer.node, layer.graph, "gemm", layer.weight.const, layer.top, layer, alpha=layer.alpha, bias=bias)


def _gathers(graph: gs.Graph, opts: WoqOptions, skips: Counter, overridable: set) -> list[Target]:
    """Embedding Gathers (onnxopt.layers.find_embeddings) on fp16/fp32 2-D tables, outside functions."""
    found, passed = L.find_embeddings(graph)
    skips.update(passed)
    out = []
    for emb in found:
        node, table = emb.node, emb.table
        if emb.dtype not in FLOATS or len(emb.shape) != 2:
            continue   # fp64 or higher-rank tables: not what GatherBlockQuantized takes, not counted
        if not opts.embeddings:
            skips["embeddings_off"] += 1
        elif L.left_out([node.name or "", table.name], opts.exclude, opts.only):
            skips["excluded"] += 1
        elif emb.axis not in (0, -2):
            skips["gather_axis"] += 1
        elif emb.shape[1] * opts.bits % 8:
            skips["gather_odd_width"] += 1   # rows are packed in whole bytes
        else:
            out.append(Target(node, emb.graph, "gather", table, emb.top))
    return out
