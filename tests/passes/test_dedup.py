"""The ``dedup`` pass: identical constants and identical nodes merged, in every scope.

dedup is exact: every rewritten model must give bitwise-identical outputs in ONNX Runtime.
Each rewriting case runs through ``onnxopt.optimize`` (pass manager, contracts, checker,
validation in ORT, the automatic dce after the pass) and directly through the pass on an
imported graph; both must agree. Negative cases assert the graph is untouched.
"""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx_graphsurgeon.ir.tensor import LazyValues

import onnxopt
from helpers import (BOOL, FLOAT, INT64, all_nodes, assert_pass_agrees, assert_same_outputs, init, interface, make_model, node,
                     node_names, random_feed, run_model, run_pass_direct, subgraph, vi)
from onnxopt import graph as G
from onnxopt.pipeline import PassContext, get_pass

X = np.array([-1.5, 0.0, 2.25, 4.0], np.float32)
ZERO_STATS = {"constants_merged": 0, "bytes_saved": 0, "nodes_merged": 0, "skipped_nondeterministic": 0,
              "skipped_custom_domain": 0, "skipped_unsupported": 0, "kept_graph_io": 0}


def stats(**changes: int) -> dict:
    return {**ZERO_STATS, **changes}


def dedup_both(model: onnx.ModelProto, feeds=None, passes: str = "dedup"):
    """Run dedup through optimize() and directly; check both agree and match the original in ORT.

    Returns (optimized model, dedup's stats, modified).
    """
    feeds = list(feeds) if feeds is not None else [random_feed(model, seed=s) for s in range(2)]
    result = onnxopt.optimize(model, passes, inputs=feeds)
    assert result.validation is not None
    assert result.validation.identical, result.validation.headline()
    assert result.passed
    record = result.records[0]
    assert record.name == "dedup"
    assert [r.name for r in result.records] == (["dedup", "dce"] if record.modified else ["dedup"])

    direct, direct_result = run_pass_direct(model, "dedup", **_options(passes))
    assert_pass_agrees(model, result.model, record, direct, direct_result, feeds)
    return result.model, dict(record.stats), record.modified


def _options(passes: str) -> dict:
    if "(" not in passes:
        return {}
    body = passes[passes.index("(") + 1:-1]
    return {k: (v == "true") for k, v in (kv.split("=") for kv in body.split(","))}


def assert_untouched(model: onnx.ModelProto, expected_stats: dict) -> None:
    """The pass changes nothing (same nodes, inputs, initializers) and reports ``expected_stats``."""
    out, result = run_pass_direct(model, "dedup")
    assert result.modified is False
    assert result.stats == expected_stats
    assert [(n.name, list(n.input), list(n.output)) for n in all_nodes(out)] == \
        [(n.name, list(n.input), list(n.output)) for n in all_nodes(model)]
    assert sorted(i.name for i in out.graph.initializer) == sorted(i.name for i in model.graph.initializer)
    assert interface(out) == interface(model)


def inputs_of(model: onnx.ModelProto, name: str) -> list[str]:
    return list(next(n for n in all_nodes(model) if n.name == name).input)


# ----------------------------------------------------------------- constants

def test_identical_initializers_merged_other_dtype_or_shape_kept():
    """w_a and w_b are the same float32 [4] values; w_c has their bytes as [2,2], w_d as int32 [4]."""
    values = np.array([1.0, 2.0, -3.0, 0.5], np.float32)
    model = make_model(
        [node("Add", ["x", "w_a"], ["a"], name="add"),
         node("Mul", ["a", "w_b"], ["y1"], name="mul"),
         node("Sub", ["x22", "w_c"], ["y2"], name="sub"),
         node("Add", ["xi", "w_d"], ["y3"], name="add_int")],
        [vi("x", [4]), vi("x22", [2, 2]), vi("xi", [4], TensorProto.INT32)],
        [vi("y1", [4]), vi("y2", [2, 2]), vi("y3", [4], TensorProto.INT32)],
        [init("w_a", values), init("w_b", values), init("w_c", values.reshape(2, 2)),
         init("w_d", values.view(np.int32), np.int32)])
    out, st_, modified = dedup_both(model)
    assert modified is True
    assert st_ == stats(constants_merged=1, bytes_saved=16)
    assert inputs_of(out, "mul") == ["a", "w_a"]
    assert sorted(i.name for i in out.graph.initializer) == ["w_a", "w_c", "w_d"]
    got = run_model(out, {"x": X, "x22": X.reshape(2, 2), "xi": np.arange(4, dtype=np.int32)})
    np.testing.assert_array_equal(got["y1"], (X + values) * values)


def test_initializers_compared_by_bits_and_element_type():
    """NaN payloads equal bit for bit merge; -0.0 is not 0.0; float16, bfloat16 and uint16 with the
    same bytes stay apart; two identical bfloat16 tensors merge without their values being decoded
    into the graph (a bfloat16 read through gs would be cast)."""
    bits = np.array([0x3C00, 0x4000], np.uint16)  # float16 1.0, 2.0

    def bf16(name):
        return helper.make_tensor(name, TensorProto.BFLOAT16, [2], bits.tobytes(), raw=True)

    model = make_model(
        [node("Add", ["x", "n1"], ["y1"], name="add1"), node("Sub", ["x", "n2"], ["y2"], name="sub2"),
         node("Add", ["x", "z"], ["y3"], name="add3"),
         node("Cast", ["h"], ["hc"], name="cast_h", to=FLOAT), node("Cast", ["b1"], ["b1c"], name="cast_b1", to=FLOAT),
         node("Cast", ["b2"], ["b2c"], name="cast_b2", to=FLOAT), node("Cast", ["u"], ["uc"], name="cast_u", to=FLOAT),
         node("Concat", ["hc", "b1c", "b2c", "uc"], ["y4"], name="concat", axis=0)],
        [vi("x", [2])], [vi("y1", [2]), vi("y2", [2]), vi("y3", [2]), vi("y4", [8])],
        [init("n1", [np.nan, 0.0]), init("n2", [np.nan, 0.0]), init("z", [np.nan, -0.0]),
         init("h", bits.view(np.float16), np.float16), bf16("b1"), bf16("b2"), init("u", bits, np.uint16)])
    out, st_, _ = dedup_both(model)
    assert st_ == stats(constants_merged=2, bytes_saved=8 + 4, nodes_merged=1)  # then the two Casts are one
    assert inputs_of(out, "sub2") == ["x", "n1"] and inputs_of(out, "add3") == ["x", "z"]
    assert inputs_of(out, "concat") == ["hc", "b1c", "b1c", "uc"]
    assert sorted(i.name for i in out.graph.initializer) == ["b1", "h", "n1", "u", "z"]
    assert next(i for i in out.graph.initializer if i.name == "b1").data_type == TensorProto.BFLOAT16

    graph = G.import_graph(model)
    get_pass("dedup")().run(graph, PassContext())
    assert all(isinstance(t._values, LazyValues) for t in G.constants(graph)), "values were loaded into the graph"


def clip_model() -> onnx.ModelProto:
    """Two Clip(0, 6) as an exporter writes them: each limit in a Constant node of its own, in the
    three spellings (value tensor, value_float); plus a value_int 6 that is not a float 6."""
    def scalar(name, v):
        return node("Constant", [], [name], name=name, value=helper.make_tensor(name, FLOAT, [], [v]))

    return make_model(
        [scalar("lo1", 0.0), scalar("hi1", 6.0), node("Clip", ["x", "lo1", "hi1"], ["c1"], name="clip1"),
         node("Neg", ["c1"], ["n"], name="neg"),
         scalar("lo2", 0.0), node("Constant", [], ["hi2"], name="hi2", value_float=6.0),
         node("Clip", ["n", "lo2", "hi2"], ["c2"], name="clip2"),
         node("Constant", [], ["six_int"], name="six_int", value_int=6),
         node("Add", ["k", "six_int"], ["y_int"], name="add_int")],
        [vi("x", [4]), vi("k", [], INT64)], [vi("c2", [4]), vi("y_int", [], INT64)])


def test_identical_constant_nodes_merged():
    model = clip_model()
    feeds = [{"x": X * 3, "k": np.array(2, np.int64)}]
    out, st_, _ = dedup_both(model, feeds)
    assert st_ == stats(constants_merged=2, bytes_saved=8)
    assert node_names(out) == ["lo1", "hi1", "clip1", "neg", "clip2", "six_int", "add_int"]
    assert inputs_of(out, "clip2") == ["n", "lo1", "hi1"]
    np.testing.assert_array_equal(run_model(out, feeds[0])["c2"], np.clip(-np.clip(X * 3, 0, 6), 0, 6))


def test_constant_node_merged_into_identical_initializer():
    """The initializer is kept, wherever the Constant node comes; value_ints spelled as a node."""
    model = make_model(
        [node("Constant", [], ["shape_c"], name="shape_c", value_ints=[2, 2]),
         node("Reshape", ["x", "shape_c"], ["r1"], name="reshape1"),
         node("Reshape", ["x2", "shape_i"], ["r2"], name="reshape2"),
         node("Add", ["r1", "r2"], ["y"], name="add")],
        [vi("x", [4]), vi("x2", [4])], [vi("y", [2, 2])], [init("shape_i", [2, 2], np.int64)])
    out, st_, _ = dedup_both(model)
    assert st_ == stats(constants_merged=1, bytes_saved=16)
    assert node_names(out) == ["reshape1", "reshape2", "add"]
    assert inputs_of(out, "reshape1") == ["x", "shape_i"]


def test_constant_that_is_a_graph_output_stays():
    model = make_model(
        [node("Constant", [], ["k1"], name="k1", value_floats=[1.0, 2.0, 3.0, 4.0]),
         node("Constant", [], ["k2"], name="k2", value_floats=[1.0, 2.0, 3.0, 4.0]),
         node("Add", ["x", "k1"], ["y"], name="add")],
        [vi("x", [4])], [vi("y", [4]), vi("k2", [4])])
    assert_untouched(model, stats(kept_graph_io=1))


def overridable_model() -> onnx.ModelProto:
    """w1 and w2 hold the same values, but w2 is also a graph input: a caller may feed another w2."""
    return make_model([node("Add", ["x", "w1"], ["a"], name="add"), node("Mul", ["a", "w2"], ["y"], name="mul")],
                      [vi("x", [2]), vi("w2", [2])], [vi("y", [2])], [init("w1", [1.0, 2.0]), init("w2", [1.0, 2.0])])


def test_overridable_initializer_not_merged_when_the_graph_says_so():
    graph = G.import_graph(overridable_model())
    graph.initializer_inputs = ["w2"]
    result = get_pass("dedup")().run(graph, PassContext())
    assert result.modified is False
    assert result.stats == stats(kept_graph_io=1)


def test_overridable_initializer_not_merged():
    model = overridable_model()
    out, result = run_pass_direct(model, "dedup")
    assert result.stats == stats(kept_graph_io=1)
    feed = {"x": np.ones(2, np.float32), "w2": np.array([5.0, 7.0], np.float32)}
    np.testing.assert_array_equal(run_model(out, feed)["y"], run_model(model, feed)["y"])


# ----------------------------------------------------------------- nodes

def test_identical_relu_add_branches_merged():
    model = make_model(
        [node("Relu", ["x"], ["r1"], name="relu1"), node("Relu", ["x"], ["r2"], name="relu2"),
         node("Add", ["r1", "w"], ["a1"], name="add1"), node("Add", ["r2", "w"], ["a2"], name="add2"),
         node("Mul", ["a1", "a2"], ["y"], name="mul")],
        [vi("x", [4])], [vi("y", [4])], [init("w", [0.5, -1.0, 2.0, 0.0])])
    out, st_, _ = dedup_both(model)
    assert st_ == stats(nodes_merged=2)
    assert node_names(out) == ["relu1", "add1", "mul"]
    assert inputs_of(out, "mul") == ["a1", "a1"]
    a = np.maximum(X, 0) + np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    np.testing.assert_array_equal(run_model(out, {"x": X})["y"], a * a)


def chain_model() -> onnx.ModelProto:
    """Two copies of Relu -> Sigmoid -> Mul(w) -> Neg (the second reads its own copy of w), interleaved
    and out of order, joined by an Add: the whole second chain collapses in one run."""
    return make_model(
        [node("Relu", ["x"], ["r1"], name="relu1"), node("Sigmoid", ["r1"], ["s1"], name="sig1"),
         node("Relu", ["x"], ["r2"], name="relu2"),
         node("Mul", ["s1", "w1"], ["m1"], name="mul1"), node("Sigmoid", ["r2"], ["s2"], name="sig2"),
         node("Neg", ["m1"], ["n1"], name="neg1"), node("Mul", ["s2", "w2"], ["m2"], name="mul2"),
         node("Neg", ["m2"], ["n2"], name="neg2"),
         node("Add", ["n1", "n2"], ["y"], name="add")],
        [vi("x", [4])], [vi("y", [4])], [init("w1", [1.0, 2.0, 3.0, 4.0]), init("w2", [1.0, 2.0, 3.0, 4.0])])


def test_chain_of_duplicates_collapses_in_one_run():
    model = chain_model()
    out, st_, _ = dedup_both(model)
    assert st_ == stats(constants_merged=1, bytes_saved=16, nodes_merged=4)
    assert node_names(out) == ["relu1", "sig1", "mul1", "neg1", "add"]
    assert inputs_of(out, "add") == ["n1", "n1"]
    again, result = run_pass_direct(out, "dedup")
    assert result.modified is False and result.stats == ZERO_STATS
    assert node_names(again) == node_names(out)


def test_unsorted_graph_still_collapses():
    """The same chain with its nodes listed in reverse: visited in topological order all the same."""
    model = chain_model()
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    out, result = run_pass_direct(model, "dedup")
    assert result.stats == stats(constants_merged=1, bytes_saved=16, nodes_merged=4)
    assert sorted(name.rstrip("12") for name in node_names(out)) == ["add", "mul", "neg", "relu", "sig"]
    assert_same_outputs(chain_model(), out, [random_feed(model)], opt_levels=("disable",))


def test_differing_attributes_not_merged_equal_ones_merged():
    """Transpose perm, LeakyRelu alpha (and -0.0 vs 0.0), ConstantOfShape tensor value, Cast to: only
    the exact repeats merge. A missing attribute is not taken for its default."""
    def cos(name, v, dtype=FLOAT):
        return node("ConstantOfShape", ["shp"], [name], name=name, value=helper.make_tensor("v", dtype, [1], [v]))

    model = make_model(
        [node("Transpose", ["m"], ["t1"], name="t1", perm=[1, 0]), node("Transpose", ["m"], ["t2"], name="t2", perm=[0, 1]),
         node("Transpose", ["m"], ["t3"], name="t3", perm=[1, 0]), node("Transpose", ["m"], ["t4"], name="t4"),
         node("LeakyRelu", ["x"], ["l1"], name="l1", alpha=0.1), node("LeakyRelu", ["x"], ["l2"], name="l2", alpha=0.2),
         node("LeakyRelu", ["x"], ["l3"], name="l3", alpha=0.1),
         node("LeakyRelu", ["x"], ["l4"], name="l4", alpha=0.0), node("LeakyRelu", ["x"], ["l5"], name="l5", alpha=-0.0),
         cos("c1", 1.5), cos("c2", 2.5), cos("c3", 1.5), cos("c4", 1, TensorProto.INT64),
         node("Cast", ["c4"], ["c4f"], name="c4f", to=FLOAT), node("Cast", ["c4"], ["c4d"], name="c4d", to=TensorProto.DOUBLE),
         node("Cast", ["c4d"], ["c4df"], name="c4df", to=FLOAT),
         node("Concat", ["t1", "t2", "t3", "t4"], ["y_t"], name="cat_t", axis=0),
         node("Concat", ["l1", "l2", "l3", "l4", "l5"], ["y_l"], name="cat_l", axis=0),
         node("Concat", ["c1", "c2", "c3", "c4f", "c4df"], ["y_c"], name="cat_c", axis=0)],
        [vi("m", [2, 2]), vi("x", [4]), vi("shp", [1], INT64)],
        [vi("y_t", [8, 2]), vi("y_l", [20]), vi("y_c", [None])])
    feeds = [{"m": X.reshape(2, 2), "x": X, "shp": np.array([3], np.int64)}]
    out, st_, _ = dedup_both(model, feeds)
    assert st_ == stats(nodes_merged=3)
    assert inputs_of(out, "cat_t") == ["t1", "t2", "t1", "t4"]
    assert inputs_of(out, "cat_l") == ["l1", "l2", "l1", "l4", "l5"]
    assert inputs_of(out, "cat_c") == ["c1", "c2", "c1", "c4f", "c4df"]


def test_random_ops_not_merged():
    model = make_model(
        [node("RandomNormalLike", ["x"], ["r1"], name="rn1"), node("RandomNormalLike", ["x"], ["r2"], name="rn2"),
         node("RandomUniform", [], ["u1"], name="ru1", shape=[4]), node("RandomUniform", [], ["u2"], name="ru2", shape=[4]),
         node("Dropout", ["x", "ratio", "train"], ["d1"], name="drop1"),
         node("Dropout", ["x", "ratio", "train"], ["d2"], name="drop2"),
         node("Concat", ["r1", "r2", "u1", "u2", "d1", "d2"], ["y"], name="cat", axis=0)],
        [vi("x", [4]), vi("train", [], BOOL)], [vi("y", [24])], [init("ratio", 0.5)])
    assert_untouched(model, stats(skipped_nondeterministic=3))


def test_dropout_in_inference_mode_merged():
    model = make_model(
        [node("Dropout", ["x", "ratio", "off"], ["d1"], name="drop1"),
         node("Dropout", ["x", "ratio", "off"], ["d2"], name="drop2"),
         node("Dropout", ["x"], ["d3"], name="drop3"), node("Dropout", ["x"], ["d4"], name="drop4"),
         node("Concat", ["d1", "d2", "d3", "d4"], ["y"], name="cat", axis=0)],
        [vi("x", [4])], [vi("y", [16])], [init("ratio", 0.5), init("off", False, np.bool_)])
    out, st_, _ = dedup_both(model)
    assert st_ == stats(nodes_merged=2)
    assert inputs_of(out, "cat") == ["d1", "d1", "d3", "d3"]


# ----------------------------------------------------------------- graph outputs

def test_duplicate_graph_outputs_kept():
    model = make_model([node("Relu", ["x"], ["y1"], name="relu1"), node("Relu", ["x"], ["y2"], name="relu2")],
                       [vi("x", [4])], [vi("y1", [4]), vi("y2", [4])])
    assert_untouched(model, stats(kept_graph_io=1))


def test_duplicate_output_handed_to_the_kept_node():
    """relu2's output is a graph output, relu1's is not: relu1's output takes the name, relu2 goes."""
    model = make_model(
        [node("Relu", ["x"], ["t"], name="relu1"), node("Neg", ["t"], ["z"], name="neg"),
         node("Relu", ["x"], ["y"], name="relu2"), node("Sigmoid", ["y"], ["s"], name="sig")],
        [vi("x", [4])], [vi("z", [4]), vi("y", [4]), vi("s", [4])])
    out, st_, _ = dedup_both(model)
    assert st_ == stats(nodes_merged=1)
    assert node_names(out) == ["relu1", "neg", "sig"]
    assert list(out.graph.node[0].output) == ["y"]
    assert inputs_of(out, "neg") == ["y"] and inputs_of(out, "sig") == ["y"]


# ----------------------------------------------------------------- subgraphs

def if_model() -> onnx.ModelProto:
    """r = Relu(x) and a Constant 6 outside. then: Relu(x) again (reuses r), two identical Sigmoids, a
    Constant node holding w's values; else: Relu(x) again, a Sigmoid like then's (siblings do not
    share) and a Constant 6 (reuses the outer one)."""
    then = helper.make_graph(
        [node("Relu", ["x"], ["t0"], name="then_relu"),
         node("Sigmoid", ["t0"], ["t1"], name="then_sig1"), node("Sigmoid", ["t0"], ["t2"], name="then_sig2"),
         node("Constant", [], ["t_w"], name="then_w", value=helper.make_tensor("v", FLOAT, [4], [1.0, 2.0, 3.0, 4.0])),
         node("Add", ["t1", "t2"], ["t3"], name="then_add"), node("Mul", ["t3", "t_w"], ["t"], name="then_mul")],
        "then", [], [vi("t", [4])])
    els = helper.make_graph(
        [node("Relu", ["x"], ["e0"], name="else_relu"), node("Sigmoid", ["e0"], ["e1"], name="else_sig"),
         node("Constant", [], ["e_six"], name="else_six", value_float=6.0),
         node("Min", ["e1", "e_six"], ["e"], name="else_min")],
        "else", [], [vi("e", [4])])
    return make_model(
        [node("Relu", ["x"], ["r"], name="relu"), node("Mul", ["r", "w"], ["z0"], name="mul"),
         node("Constant", [], ["six"], name="six", value=helper.make_tensor("v", FLOAT, [], [6.0])),
         node("Min", ["z0", "six"], ["z"], name="min"),
         node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=els)],
        [vi("c", [], BOOL), vi("x", [4])], [vi("y", [4]), vi("z", [4])], [init("w", [1.0, 2.0, 3.0, 4.0])])


def test_duplicates_inside_if_branches():
    model = if_model()
    feeds = [{"c": np.array(flag), "x": X} for flag in (True, False)]
    out, st_, _ = dedup_both(model, feeds)
    assert st_ == stats(constants_merged=2, bytes_saved=16 + 4, nodes_merged=3)
    then, els = subgraph(out, "If", "then_branch"), subgraph(out, "If", "else_branch")
    assert node_names(then) == ["then_sig1", "then_add", "then_mul"]
    assert inputs_of_graph(then, "then_sig1") == ["r"] and inputs_of_graph(then, "then_add") == ["t1", "t1"]
    assert inputs_of_graph(then, "then_mul") == ["t3", "w"]
    assert node_names(els) == ["else_sig", "else_min"] and inputs_of_graph(els, "else_sig") == ["r"]
    assert inputs_of_graph(els, "else_min") == ["e1", "six"]
    sig = run_model(out, feeds[1])["y"]
    np.testing.assert_array_equal(run_model(out, feeds[0])["y"], (sig + sig) * np.array([1, 2, 3, 4], np.float32))


def inputs_of_graph(graph: onnx.GraphProto, name: str) -> list[str]:
    return list(next(n for n in graph.node if n.name == name).input)


def test_loop_body_duplicates_and_loop_invariant_reuse():
    """The body recomputes Mul(xs, xs), already made outside (reused), and Add(v_in, m) twice (merged);
    the duplicate that is a body output is kept when the kept one is a body output too."""
    body = helper.make_graph(
        [node("Mul", ["xs", "xs"], ["m"], name="body_mul"),
         node("Add", ["v_in", "m"], ["s0"], name="body_add1"), node("Add", ["v_in", "m"], ["s1"], name="body_add2"),
         node("Neg", ["s1"], ["scan"], name="body_neg"), node("Add", ["v_in", "m"], ["s2"], name="body_add3"),
         node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
        "body", [vi("i", [], INT64), vi("cond_in", [], BOOL), vi("v_in", [4])],
        [vi("cond_out", [], BOOL), vi("s0", [4]), vi("scan", [4]), vi("s2", [4])])
    model = make_model(
        [node("Sigmoid", ["x"], ["xs"], name="make_xs"), node("Mul", ["xs", "xs"], ["sq"], name="outer_mul"),
         node("Loop", ["n", "", "v0"], ["v_final", "scanned", "last"], name="loop", body=body),
         node("Add", ["v_final", "sq"], ["y"], name="add")],
        [vi("n", [], INT64), vi("x", [4]), vi("v0", [4])],
        [vi("y", [4]), vi("scanned", [None, 4]), vi("last", [None, 4])])
    feeds = [{"n": np.array(k, np.int64), "x": X, "v0": np.array([0.5, -0.5, 1.0, 0.0], np.float32)} for k in (0, 3)]
    out, st_, _ = dedup_both(model, feeds)
    assert st_ == stats(nodes_merged=2, kept_graph_io=1)
    body_out = subgraph(out.graph.node[2], "body")
    assert node_names(body_out) == ["body_add1", "body_neg", "body_add3", "body_cond"]
    assert inputs_of_graph(body_out, "body_add1") == ["v_in", "sq"]
    assert inputs_of_graph(body_out, "body_neg") == ["s0"]


# ----------------------------------------------------------------- domains and functions

FN_OPSETS = {"": 17, "custom": 1}


def function(name: str, nodes) -> onnx.FunctionProto:
    return helper.make_function("custom", name, ["a"], ["b"], list(nodes),
                                [helper.make_opsetid(d, v) for d, v in FN_OPSETS.items()])


def test_local_function_calls_merged_when_pure():
    functions = [function("Twice", [helper.make_node("Add", ["a", "a"], ["b"])]),
                 function("Noisy", [helper.make_node("RandomNormalLike", ["a"], ["r"]),
                                    helper.make_node("Add", ["a", "r"], ["b"])]),
                 function("CallsNoisy", [helper.make_node("Noisy", ["a"], ["b"], domain="custom")])]
    model = make_model(
        [node("Twice", ["x"], ["p1"], name="twice1", domain="custom"),
         node("Twice", ["x"], ["p2"], name="twice2", domain="custom"),
         node("Noisy", ["x"], ["q1"], name="noisy1", domain="custom"),
         node("Noisy", ["x"], ["q2"], name="noisy2", domain="custom"),
         node("CallsNoisy", ["x"], ["w1"], name="calls1", domain="custom"),
         node("CallsNoisy", ["x"], ["w2"], name="calls2", domain="custom"),
         node("Concat", ["p1", "p2", "q1", "q2", "w1", "w2"], ["y"], name="cat", axis=0)],
        [vi("x", [4])], [vi("y", [24])], functions=functions, opsets=FN_OPSETS)
    out, result = run_pass_direct(model, "dedup")
    assert result.stats == stats(nodes_merged=1, skipped_nondeterministic=2)
    assert node_names(out) == ["twice1", "noisy1", "noisy2", "calls1", "calls2", "cat"]
    assert inputs_of(out, "cat") == ["p1", "p1", "q1", "q2", "w1", "w2"]


def test_constants_and_nodes_inside_function_bodies_merged():
    body = [helper.make_node("Constant", [], ["k1"], value_float=2.0),
            helper.make_node("Constant", [], ["k2"], value_float=2.0),
            helper.make_node("Mul", ["a", "k1"], ["t1"]), helper.make_node("Mul", ["a", "k2"], ["t2"]),
            helper.make_node("Add", ["t1", "t2"], ["b"])]
    model = make_model([node("Scale", ["x"], ["y"], name="call", domain="custom")],
                       [vi("x", [4])], [vi("y", [4])], functions=[function("Scale", body)], opsets=FN_OPSETS)
    out, st_, _ = dedup_both(model)
    assert st_ == stats(constants_merged=1, bytes_saved=4, nodes_merged=1)
    assert [n.op_type for n in out.functions[0].node] == ["Constant", "Mul", "Add"]
    np.testing.assert_array_equal(run_model(out, {"x": X})["y"], X * 2 + X * 2)


def test_custom_domain_ops_left_alone_unless_listed():
    model = make_model(
        [node("MyOp", ["x"], ["a"], name="my1", domain="vendor"), node("MyOp", ["x"], ["b"], name="my2", domain="vendor"),
         node("Add", ["a", "b"], ["y"], name="add")],
        [vi("x", [4])], [vi("y", [4])], opsets={"": 17, "vendor": 1}, check=False)
    assert_untouched(model, stats(skipped_custom_domain=1))
    graph = G.import_graph(model)
    result = get_pass("dedup")(domains=["vendor"]).run(graph, PassContext())
    assert result.stats == stats(nodes_merged=1)


def test_com_microsoft_ops_merged():
    model = make_model(
        [node("Gelu", ["x"], ["g1"], name="gelu1", domain="com.microsoft"),
         node("Gelu", ["x"], ["g2"], name="gelu2", domain="com.microsoft"),
         node("Add", ["g1", "g2"], ["y"], name="add")],
        [vi("x", [4])], [vi("y", [4])], opsets={"": 17, "com.microsoft": 1}, check=False)
    out, st_, _ = dedup_both(model)
    assert st_ == stats(nodes_merged=1)
    assert node_names(out) == ["gelu1", "add"]


def test_optional_not_merged():
    """gs drops Optional's type attribute: two Optionals may look alike when they are not."""
    model = make_model(
        [node("Optional", ["x"], ["o1"], name="opt1"), node("Optional", ["x"], ["o2"], name="opt2"),
         node("OptionalGetElement", ["o1"], ["a"], name="get1"), node("OptionalGetElement", ["o2"], ["b"], name="get2"),
         node("Add", ["a", "b"], ["y"], name="add")],
        [vi("x", [4])], [vi("y", [4])], opsets={"": 18})
    assert_untouched(model, stats(skipped_unsupported=1))


def test_options_turn_each_half_off():
    model = chain_model()
    out, st_, _ = dedup_both(model, passes="dedup(nodes=false)")
    assert st_ == stats(constants_merged=1, bytes_saved=16)
    assert len(out.graph.node) == len(model.graph.node)
    out, st_, _ = dedup_both(model, passes="dedup(constants=false)")
    assert st_ == stats(nodes_merged=2)  # the chains part where they read different w copies
    assert node_names(out) == ["relu1", "sig1", "mul1", "neg1", "mul2", "neg2", "add"]


# ----------------------------------------------------------------- benchmark-shaped

def test_pipeline_string_and_auto_dce():
    result = onnxopt.optimize(clip_model(), "dedup", inputs=[{"x": X, "k": np.array(1, np.int64)}])
    assert result.pipeline == "dedup(constants=true,nodes=true,domains=com.microsoft)"
    assert [(r.name, r.auto) for r in result.records] == [("dedup", False), ("dce", True)]


# ----------------------------------------------------------------- random DAGs

UNARY = ("Relu", "Neg", "Identity")
BINARY = ("Add", "Mul")
INIT_VALUES = [np.array(v, np.float32) for v in ([0.5, -2.0, 3.0], [0.5, -2.0, 3.0], [1.25, 0.0, -0.75])]


@st.composite
def random_dags(draw):
    """Nodes drawn from few ops over few values, so that many repeat; two of the initializers are equal."""
    values = ["x0", "x1"] + [f"c{i}" for i in range(3)]
    nodes = []
    for i in range(draw(st.integers(4, 30))):
        op = draw(st.sampled_from(UNARY + BINARY))
        pick = st.sampled_from(values[:5] + values[-3:])
        ins = [draw(pick) for _ in range(2 if op in BINARY else 1)]
        nodes.append(node(op, ins, [f"v{i}"], name=f"k{i}"))
        values.append(f"v{i}")
    outputs = draw(st.lists(st.sampled_from([n.output[0] for n in nodes]), min_size=1, max_size=4, unique=True))
    read = {t for n in nodes for t in n.input}
    inits = [init(f"c{i}", INIT_VALUES[i]) for i in range(3) if f"c{i}" in read]
    return make_model(nodes, [vi("x0", [3]), vi("x1", [3])], [vi(o, [3]) for o in outputs], inits)


def expected_merges(model: onnx.ModelProto) -> tuple[int, int, int]:
    """(constants merged, nodes merged, kept_graph_io) by value numbering over the NodeProtos."""
    inits = {i.name: onnx.numpy_helper.to_array(i).tobytes() for i in model.graph.initializer}
    canon, first_init = {}, {}
    constants = 0
    for name, data in inits.items():
        canon[name] = first_init.setdefault(data, name)
        constants += canon[name] != name
    outputs = {o.name for o in model.graph.output}
    seen: dict = {}
    merged = kept = 0
    for n in model.graph.node:
        key = (n.op_type, tuple(canon.get(i, i) for i in n.input))
        out = n.output[0]
        if key not in seen:
            seen[key] = out
            canon[out] = out
        elif out in outputs and seen[key] in outputs:
            kept += 1
            canon[out] = out
        else:
            merged += 1
            if out in outputs:
                outputs.add(seen[key])
            canon[out] = seen[key]
    return constants, merged, kept


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(random_dags())
def test_random_dags_merge_exactly_the_repeats(model):
    constants, merged, kept = expected_merges(model)
    out, result = run_pass_direct(model, "dedup")
    assert interface(out) == interface(model)
    assert_same_outputs(model, out, [random_feed(model, seed=1)], opt_levels=("disable",))
    assert result.stats["constants_merged"] == constants
    assert result.stats["nodes_merged"] == merged
    assert result.stats["kept_graph_io"] == kept
    assert len(out.graph.node) == len(model.graph.node) - merged
    again, second = run_pass_direct(out, "dedup")
    assert second.stats["nodes_merged"] == 0 and second.stats["constants_merged"] == 0


def test_pass_object_keeps_nothing_of_the_graph_after_running():
    """A pipeline holds its pass objects; they must not keep a graph (and its model) alive."""
    import gc
    import weakref

    model = make_model([node("Add", ["x", "a"], ["y"]), node("Add", ["y", "b"], ["z"])],
                       [vi("x", [2])], [vi("z", [2])],
                       [init("a", np.ones(2, np.float32)), init("b", np.ones(2, np.float32))])
    graph = G.import_graph(model)
    dedup = get_pass("dedup")()
    assert dedup.run(graph, PassContext()).modified
    ref = weakref.ref(graph)
    del graph
    gc.collect()
    assert ref() is None
