"""Shared test helpers: build small models with onnx.helper, run them in ONNX Runtime,
assert that two models compute bitwise-identical outputs, and run a pass directly.

Importable as ``from helpers import ...`` when ``tests`` is on the import path
(pyproject: ``pythonpath = [".", "tests"]``; locally ``PYTHONPATH=tests``).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxopt import graph as G
from onnxopt.pipeline import PassContext, PassResult, get_pass

FLOAT = TensorProto.FLOAT
BOOL = TensorProto.BOOL
INT64 = TensorProto.INT64

OPSET = 17
IR_VERSION = 10  # understood by every onnxruntime the project supports

_ORT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


# ----------------------------------------------------------------- building

def vi(name: str, shape: Sequence[Any] | None = (2,), dtype: int = FLOAT) -> onnx.ValueInfoProto:
    """A typed value (graph input/output); ``shape=None`` leaves the rank unknown."""
    return helper.make_tensor_value_info(name, dtype, None if shape is None else list(shape))


def init(name: str, values: Any, dtype: Any = np.float32) -> onnx.TensorProto:
    """An initializer from values."""
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def node(op: str, inputs: Sequence[str], outputs: Sequence[str], name: str | None = None,
         domain: str | None = None, **attrs: Any) -> onnx.NodeProto:
    """A node; its name defaults to its first output's name prefixed with 'n_'."""
    kwargs = {"domain": domain} if domain is not None else {}
    return helper.make_node(op, list(inputs), list(outputs), name=name if name is not None else f"n_{outputs[0]}",
                            **kwargs, **attrs)


def make_graph(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
               outputs: Sequence[onnx.ValueInfoProto], initializers: Sequence[onnx.TensorProto] = (),
               name: str = "g") -> onnx.GraphProto:
    return helper.make_graph(list(nodes), name, list(inputs), list(outputs), initializer=list(initializers))


def make_model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
               outputs: Sequence[onnx.ValueInfoProto], initializers: Sequence[onnx.TensorProto] = (), *,
               functions: Sequence[onnx.FunctionProto] = (), opsets: Mapping[str, int] | None = None,
               ir_version: int = IR_VERSION, check: bool = True) -> onnx.ModelProto:
    """A model of one graph; checked with the ONNX checker unless ``check=False``."""
    opsets = dict(opsets or {"": OPSET})
    model = helper.make_model(make_graph(nodes, inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              functions=list(functions))
    model.ir_version = ir_version
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


# ----------------------------------------------------------------- walking protos

def iter_graph_protos(graph: onnx.GraphProto):
    """A GraphProto and every nested subgraph (If branches, Loop/Scan bodies)."""
    yield graph
    for n in graph.node:
        for attr in n.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graph_protos(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graph_protos(g)


def all_nodes(model: onnx.ModelProto, functions: bool = True) -> list[onnx.NodeProto]:
    """Every node of the model: main graph, nested subgraphs and (optionally) function bodies."""
    nodes = [n for g in iter_graph_protos(model.graph) for n in g.node]
    if functions:
        nodes += [n for f in model.functions for n in f.node]
    return nodes


def node_names(model_or_graph: onnx.ModelProto | onnx.GraphProto) -> list[str]:
    graph = model_or_graph.graph if isinstance(model_or_graph, onnx.ModelProto) else model_or_graph
    return [n.name for n in graph.node]


def ops(model_or_graph: onnx.ModelProto | onnx.GraphProto) -> list[str]:
    graph = model_or_graph.graph if isinstance(model_or_graph, onnx.ModelProto) else model_or_graph
    return [n.op_type for n in graph.node]


def interface(model: onnx.ModelProto) -> tuple[list, list]:
    """(inputs, outputs) of the main graph as serialized ValueInfoProtos, for exact comparison."""
    return ([v.SerializeToString() for v in model.graph.input],
            [v.SerializeToString() for v in model.graph.output])


def subgraph(model_or_node: Any, op_or_attr: str, attr: str | None = None) -> onnx.GraphProto:
    """``subgraph(model, "If", "then_branch")``: the first such node's graph attribute;
    ``subgraph(node, "body")``: a node's graph attribute."""
    if isinstance(model_or_node, onnx.ModelProto):
        n = next(n for n in model_or_node.graph.node if n.op_type == op_or_attr)
        name = attr
    else:
        n, name = model_or_node, op_or_attr
    return next(a.g for a in n.attribute if a.name == name)


# ----------------------------------------------------------------- running

def session(model: onnx.ModelProto, opt_level: str = "disable") -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = _ORT_LEVELS[opt_level]
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_model(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], opt_level: str = "disable") -> dict[str, np.ndarray]:
    """Output name -> array, ORT graph optimizations off by default (the graph as written)."""
    sess = session(model, opt_level)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, dict(feed))))


def assert_identical(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> None:
    """Same output names in the same order, same dtypes and shapes, bitwise-equal data."""
    assert list(reference) == list(candidate), f"output names differ: {list(reference)} vs {list(candidate)}"
    for name in reference:
        ref, cand = np.asarray(reference[name]), np.asarray(candidate[name])
        assert ref.dtype == cand.dtype, f"output {name}: dtype {ref.dtype} vs {cand.dtype}"
        assert ref.shape == cand.shape, f"output {name}: shape {ref.shape} vs {cand.shape}"
        assert ref.tobytes() == cand.tobytes(), f"output {name}: values differ\n{ref}\nvs\n{cand}"


def assert_same_outputs(reference: onnx.ModelProto, candidate: onnx.ModelProto,
                        feeds: Iterable[Mapping[str, np.ndarray]], opt_levels: Sequence[str] = ("disable", "all")) -> None:
    """Both models, on every feed and every ORT optimization level given, give bitwise-identical outputs."""
    feeds = list(feeds)
    assert feeds, "no feeds given"
    for level in opt_levels:
        for feed in feeds:
            assert_identical(run_model(reference, feed, level), run_model(candidate, feed, level))


def random_feed(model: onnx.ModelProto, seed: int = 0, dims: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Seeded inputs for a model: normal floats, small ints, random bools; symbolic dims from ``dims`` or 2."""
    rng = np.random.default_rng(seed)
    feed = {}
    for v in model.graph.input:
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (dims or {}).get(d.dim_param, 2) for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if dtype == np.bool_:
            feed[v.name] = np.asarray(rng.random(shape) < 0.5)
        elif np.issubdtype(dtype, np.integer):
            feed[v.name] = np.asarray(rng.integers(0, 4, size=shape), dtype=dtype)
        else:
            feed[v.name] = np.asarray(rng.standard_normal(shape), dtype=dtype)
    return feed


# ----------------------------------------------------------------- passes

def run_pass_direct(model: onnx.ModelProto, name: str, **options: Any) -> tuple[onnx.ModelProto, PassResult]:
    """Import, run one pass on the graph (no pass manager), export; the result must pass the checker."""
    graph = G.import_graph(model)
    result = get_pass(name)(**options).run(graph, PassContext())
    assert isinstance(result, PassResult)
    out = G.export_model(graph, model)
    onnx.checker.check_model(out, full_check=True)
    return out, result


def assert_pass_agrees(model: onnx.ModelProto, optimized: onnx.ModelProto, record: Any,
                       direct: onnx.ModelProto, direct_result: PassResult, feeds: Sequence[dict]) -> None:
    """A pass run by the pipeline and run directly on the graph: same statistics, the model's
    interface kept by both, and both compute what the original does (ORT optimizations on and off)."""
    assert direct_result.stats == record.stats
    assert direct_result.modified == record.modified
    assert interface(optimized) == interface(model)
    assert interface(direct) == interface(model)
    assert_same_outputs(model, optimized, feeds)
    assert_same_outputs(model, direct, feeds[:1], opt_levels=("disable",))


def ort_optimized_ops(model: onnx.ModelProto, tmp_path: Any) -> dict[str, int]:
    """Op types of ONNX Runtime's own optimized graph (graph optimizations on, CPU): what it fused."""
    import collections

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def outlier_mlp() -> onnx.ModelProto:
    """MatMul mm1 -> Relu -> MatMul mm2 on x [N, 16] (seeded); mm1's weight ignores feature 0, so
    data that puts one huge outlier there wipes out mm1's other input features at 8 bits while
    costing the float model nothing (the qdq guard tests plant their sensitive layer this way)."""
    rng = np.random.default_rng(9)
    w1 = rng.standard_normal((16, 16)).astype(np.float32)
    w1[0] = 0
    return make_model([node("MatMul", ["x", "w1"], ["h"], name="mm1"), node("Relu", ["h"], ["r"], name="relu"),
                       node("MatMul", ["r", "w2"], ["y"], name="mm2")],
                      [vi("x", ["N", 16])], [vi("y", ["N", 4])],
                      [init("w1", w1), init("w2", rng.standard_normal((16, 4)))])
