"""The latency gate: each factorized layer timed against the original in ONNX Runtime on a
representative input."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.pipeline import PassContext
from onnxopt.runtime import session_for

from .collect import _Layer


def _inferred_shapes(graph: gs.Graph, ctx: PassContext, layers: list[_Layer]) -> dict[str, list]:
    """Shapes of layer inputs from onnx shape inference, for layers without a known shape."""
    if all(l.x_shape is not None or (l.x.shape is not None and len(l.x.shape) > 0) for l in layers):
        return {}
    try:
        model = onnx.shape_inference.infer_shapes(ctx.export(graph))
    except Exception:
        return {}
    found = {}
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            found[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    return found


def _rows(l: _Layer, ctx: PassContext, shapes: dict[str, list]) -> int:
    if l.x_shape is not None:
        shape = list(l.x_shape)
    else:
        shape = list(l.x.shape) if l.x.shape is not None and len(l.x.shape) else shapes.get(l.x.name, [l.k])
    shape = shape[:-1]
    rows = 1
    for d in shape:
        rows *= d if isinstance(d, int) and d > 0 else int(ctx.dims.get(str(d), 1))
    return max(rows, 1)


def _time_layer(l: _Layer, ctx: PassContext, shapes: dict[str, list]) -> None:
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    rows = _rows(l, ctx, shapes)
    try:
        _time_pair(l, ctx, rows, l.dtype, ort, helper, numpy_helper)
    except Exception:  # no kernel for this dtype on CPU: time the float32 equivalent
        _time_pair(l, ctx, rows, np.dtype(np.float32), ort, helper, numpy_helper)


def _time_pair(l: _Layer, ctx: PassContext, rows: int, xdtype: np.dtype, ort: Any, helper: Any, numpy_helper: Any) -> None:
    elem = helper.np_dtype_to_tensor_dtype(xdtype)
    r = l.rank
    w = l.w.astype(xdtype)
    a = np.asarray(l.p[:, :r], xdtype)
    b = np.asarray(l.vt[:r], xdtype)

    def build(nodes, inits):
        g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", elem, [rows, l.k])],
                              [helper.make_tensor_value_info("y", elem, [rows, l.n])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        so = ort.SessionOptions()
        so.log_severity_level = 4  # errors come back as exceptions; no raw ORT lines
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return session_for(m, so)  # from files when a factor pair is too large for one protobuf

    orig = build([helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": w})
    fact = build([helper.make_node("MatMul", ["x", "a"], ["t"]), helper.make_node("MatMul", ["t", "b"], ["y"])],
                 {"a": a, "b": b})
    feed = {"x": np.random.default_rng(ctx.seed).standard_normal((rows, l.k)).astype(xdtype)}
    for sess in (orig, fact):
        for _ in range(3):
            sess.run(None, feed)
    times: tuple[list, list] = ([], [])
    start = time.perf_counter()
    runs = 0
    while runs < 15 or (runs < 400 and time.perf_counter() - start < 0.15):
        for which, sess in enumerate((orig, fact) if runs % 2 == 0 else (fact, orig)):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times[which if runs % 2 == 0 else 1 - which].append(time.perf_counter() - t0)
        runs += 1
    l.t_orig = statistics.median(times[0]) * 1000.0
    l.t_fact = statistics.median(times[1]) * 1000.0
    l.timing_rows = rows
