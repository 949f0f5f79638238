"""onnxopt.channels: the per-channel region after a layer, or why it cannot be followed."""

from __future__ import annotations

import numpy as np
from helpers import init, make_model, node, vi

from onnxopt import channels
from onnxopt import graph as G

RNG = np.random.default_rng(0)


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _trace(model, producer="prod"):
    graph = G.import_graph(model)
    start = next(n for n in graph.nodes if n.name == producer)
    return channels.trace(start, graph, 4, start.op != "Conv")


def test_conv_relu_bn_pool_flatten_gemm():
    nodes = [node("Conv", ["x", "w1"], ["a"], name="prod"),
             node("BatchNormalization", ["a", "s", "b", "m", "v"], ["bn"]),
             node("Relu", ["bn"], ["r"]), node("GlobalAveragePool", ["r"], ["p"]), node("Flatten", ["p"], ["f"]),
             node("Gemm", ["f", "w2"], ["y"], name="cons", transB=1)]
    inits = [init("w1", _w(4, 3, 3, 3)), init("s", _w(4)), init("b", _w(4)), init("m", _w(4)),
             init("v", np.ones(4)), init("w2", _w(5, 4))]
    model = make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 5])], inits)
    region = _trace(model)
    assert isinstance(region, channels.Region)
    assert [n.op for n in region.chain] == ["BatchNormalization", "Relu", "GlobalAveragePool", "Flatten"]
    assert region.consumer.name == "cons" and region.consumer_layout == "nk"
    assert region.state[id(region.chain[-1].outputs[0])] == (True, False)  # after Flatten: channels last


def test_matmul_gelu_branches_and_remerges_into_one_consumer():
    nodes = [node("MatMul", ["x", "w1"], ["h"], name="prod"), node("Div", ["h", "sq2"], ["d"]),
             node("Erf", ["d"], ["e"]), node("Add", ["e", "one"], ["e1"]), node("Mul", ["h", "e1"], ["g"]),
             node("MatMul", ["g", "w2"], ["y"], name="cons")]
    inits = [init("w1", _w(3, 4)), init("sq2", np.float32(1.4142135)), init("one", np.float32(1.0)), init("w2", _w(4, 2))]
    model = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 2])], inits)
    region = _trace(model)
    assert isinstance(region, channels.Region)
    assert region.consumer.name == "cons" and region.consumer_layout == "kn"
    assert sorted(n.op for n in region.chain) == ["Add", "Div", "Erf", "Mul"]


def test_reasons_it_stops():
    residual = make_model([node("MatMul", ["x", "w1"], ["h"], name="prod"), node("Add", ["h", "x4"], ["s"]),
                           node("MatMul", ["s", "w2"], ["y"])],
                          [vi("x", [2, 3]), vi("x4", [2, 4])], [vi("y", [2, 2])], [init("w1", _w(3, 4)), init("w2", _w(4, 2))])
    fan_out = make_model([node("MatMul", ["x", "w1"], ["h"], name="prod"), node("MatMul", ["h", "w2"], ["y"]),
                          node("MatMul", ["h", "w3"], ["z"])],
                         [vi("x", [2, 3])], [vi("y", [2, 2]), vi("z", [2, 2])],
                         [init("w1", _w(3, 4)), init("w2", _w(4, 2)), init("w3", _w(4, 2))])
    output = make_model([node("MatMul", ["x", "w1"], ["h"], name="prod")], [vi("x", [2, 3])], [vi("h", [2, 4])],
                        [init("w1", _w(3, 4))])
    reshape = make_model([node("MatMul", ["x", "w1"], ["h"], name="prod"), node("Reshape", ["h", "shape"], ["r"]),
                          node("MatMul", ["r", "w2"], ["y"])], [vi("x", [2, 3])], [vi("y", [4, 2])],
                         [init("w1", _w(3, 4)), init("shape", [4, 2], np.int64), init("w2", _w(2, 2))])
    assert _trace(residual) == "residual"
    assert _trace(fan_out) == "branch"
    assert _trace(output) == "graph_output"
    assert _trace(reshape) == "reshape"
