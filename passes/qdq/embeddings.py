"""Embedding tables as int8: a Gather on a large float constant table reads an int8 table (one scale
per row, symmetric) and its rows are scaled back after the Gather.

Rows of a trained embedding table differ in norm (frequent tokens, padding rows, positions), so one
scale per row keeps each row's relative error at int8 level (at most half a step of its own
max|value|/127). The Gather reads the int8 table and the per-row scales ([rows, 1]) with the same
indices: Gather(q, ids) -> Cast(float) -> Mul(Gather(scale, ids)), the work of the tokens looked
up only. A per-axis DequantizeLinear on the table before the Gather computes the same values, but
ONNX Runtime 1.32 does not fold it at session creation and dequantizes the whole table on every
run (MiniLM: 11.7M values, ~+20 ms per batch); a DequantizeLinear after the Gather takes only one
scale per tensor (per-axis scales are 1-D) or, blocked, opset 21.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt import layers as L

from .writer import weight_qparams

MIN_VALUES = 4096  # a smaller table is not worth a node (a type-id table holds 2 x hidden values)


def quantize_embeddings(graph: gs.Graph, opset: int, stats: dict, skips: Counter,
                        exclude: list[str] = (), only: list[str] = ()) -> int:
    """Rewrite every Gather on a float table of at least MIN_VALUES values in the top-level graph
    (a Gather or table that ``exclude``/``only`` leave out stays float).
    Returns the number of tables quantized (a table shared by several Gathers is quantized once)."""
    names = G.Names(graph)
    tables: dict[int, tuple[gs.Constant, gs.Constant]] = {}  # id(float table) -> (int8 table, row scales)
    found, passed = L.find_embeddings(graph, top_only=True)
    skips["embedding_overridable"] += passed["overridable_weight"]
    for emb in found:
        node = emb.node
        if L.left_out([node.name or "", emb.table.name], exclude, only):
            skips["embedding_excluded"] += 1
            continue
        if id(emb.table) in tables:
            rewrite(graph, node, *tables[id(emb.table)], names)
            continue
        if emb.dtype != np.float32 or int(np.prod(emb.shape)) < MIN_VALUES:
            continue
        if emb.axis != 0:
            skips["embedding_axis"] += 1
            continue
        table = G.const_value(node.inputs[0])
        if table is None:
            continue
        scale, q = weight_qparams(table, 0)
        base = node.inputs[0].name or "embedding"
        tables[id(emb.table)] = (gs.Constant(names.fresh(f"{base}_quantized"), q),
                                 gs.Constant(names.fresh(f"{base}_scale"),
                                             scale.astype(np.float32).reshape((-1,) + (1,) * (table.ndim - 1))))
        stats["embedding_values"] = stats.get("embedding_values", 0) + int(table.size)
        rewrite(graph, node, *tables[id(emb.table)], names)
    if tables:
        stats["embeddings_quantized"] = len(tables)
    return len(tables)


def rewrite(graph: gs.Graph, node: gs.Node, q: gs.Constant, scale: gs.Constant, names: G.Names) -> None:
    """Gather(table, ids) -> Gather(q, ids) -> Cast -> Mul(Gather(scale, ids)), the output keeping its tensor."""
    ids, y = node.inputs[1], node.outputs[0]
    base = node.name or y.name
    rows = gs.Variable(names.fresh(f"{base}_int8"), dtype=np.int8)
    rows_f = gs.Variable(names.fresh(f"{base}_int8_float"), dtype=np.float32)
    row_scale = gs.Variable(names.fresh(f"{base}_row_scale"), dtype=np.float32)
    node.inputs[0] = q
    node.outputs[0] = rows
    graph.nodes += [
        gs.Node("Cast", name=names.fresh(f"{base}_Cast"), attrs={"to": 1}, inputs=[rows], outputs=[rows_f]),
        gs.Node("Gather", name=names.fresh(f"{base}_scales"), attrs={"axis": 0}, inputs=[scale, ids],
                outputs=[row_scale]),
        gs.Node("Mul", name=names.fresh(f"{base}_dequantize"), inputs=[rows_f, row_scale], outputs=[y])]
