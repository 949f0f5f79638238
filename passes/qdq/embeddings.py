"""Embedding tables as int8: a Gather on a large float constant table reads an int8 table (one scale
per row, symmetric) through a per-axis DequantizeLinear.

Rows of a trained embedding table differ in norm (frequent tokens, padding rows, positions), so one
scale per row keeps each row's relative error at int8 level (at most half a step of its own
max|value|/127). The DequantizeLinear sits on the table, before the Gather: ONNX Runtime folds it
once when the session is created (the table is a constant), so inference runs the float Gather at
float speed and only the file shrinks. Per-axis DequantizeLinear needs opset 13.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G

from .opset import PER_CHANNEL_OPSET
from .writer import weight_qparams

MIN_VALUES = 4096  # a smaller table is not worth a node (a type-id table holds 2 x hidden values)


def quantize_embeddings(graph: gs.Graph, opset: int, stats: dict, skips: Counter) -> int:
    """Rewrite every Gather on a float table of at least MIN_VALUES values in the top-level graph.
    Returns the number of tables quantized (a table shared by several Gathers is quantized once)."""
    overridable = set(vars(graph).get("initializer_inputs", []))
    names = G.Names(graph)
    done: dict[int, gs.Variable] = {}
    for node in list(graph.nodes):
        if node.op != "Gather" or (node.domain or "") not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        table_t = node.inputs[0]
        if id(table_t) in done:
            node.inputs[0] = done[id(table_t)]
            continue
        table = G.const_value(table_t)
        if table is None or table.dtype != np.float32 or table.ndim < 2 or table.size < MIN_VALUES:
            continue
        if table_t.name in overridable:
            skips["embedding_overridable"] += 1
            continue
        if int(node.attrs.get("axis", 0)) != 0:
            skips["embedding_axis"] += 1
            continue
        if opset and opset < PER_CHANNEL_OPSET:
            skips["embedding_opset"] += 1
            continue
        scale, q = weight_qparams(table, 0)
        base = table_t.name or "embedding"
        out = gs.Variable(names.fresh(f"{base}_dequantized"), dtype=np.float32, shape=list(table.shape))
        graph.nodes.append(gs.Node(
            "DequantizeLinear", name=names.fresh(f"{base}_DequantizeLinear"), attrs={"axis": 0},
            inputs=[gs.Constant(names.fresh(f"{base}_quantized"), q),
                    gs.Constant(names.fresh(f"{base}_scale"), scale.astype(np.float32)),
                    gs.Constant(names.fresh(f"{base}_zero_point"), np.zeros(scale.shape, np.int8))],
            outputs=[out]))
        done[id(table_t)] = out
        node.inputs[0] = out
        stats["embedding_values"] = stats.get("embedding_values", 0) + int(table.size)
    if done:
        stats["embeddings_quantized"] = len(done)
    return len(done)
