"""The ``dce`` pass: dead nodes, initializers, Constant nodes, Identity chains, subgraphs, functions.

dce is exact: every rewritten model must give bitwise-identical outputs in ONNX
Runtime. Each case runs twice: through ``onnxopt.optimize`` (pass manager,
contracts, checker, validation in ORT) and directly through the pass on an
imported graph; both must agree.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

import onnxopt
from helpers import (BOOL, INT64, all_nodes, assert_pass_agrees, assert_same_outputs, init, interface, make_model, node,
                     node_names, ops, random_feed, run_model, run_pass_direct, subgraph, vi)

X = np.array([-1.5, 0.0, 2.25], np.float32)
ZERO_STATS = {"nodes_removed": 0, "identities_removed": 0, "identities_kept": 0,
              "initializers_removed": 0, "functions_removed": 0}


def stats(**changes: int) -> dict:
    return {**ZERO_STATS, **changes}


def dce_both(model: onnx.ModelProto, feeds=None, **options):
    """Run dce through optimize() and directly; check both agree and match the original in ORT.

    Returns (optimized model, stats, modified).
    """
    feeds = list(feeds) if feeds is not None else [random_feed(model, seed=s) for s in range(2)]
    passes = "dce" if not options else "dce(" + ",".join(f"{k}={str(v).lower()}" for k, v in options.items()) + ")"
    result = onnxopt.optimize(model, passes, inputs=feeds)
    assert result.validation is not None
    assert result.validation.identical, result.validation.headline()
    assert result.passed
    assert [r.name for r in result.records] == ["dce"]
    record = result.records[0]

    direct, direct_result = run_pass_direct(model, "dce", **options)
    assert [n.name for n in all_nodes(direct)] == [n.name for n in all_nodes(result.model)]
    # Interface untouched, outputs bitwise identical, with and without ORT's own optimizations.
    assert_pass_agrees(model, result.model, record, direct, direct_result, feeds)
    return result.model, dict(record.stats), record.modified


# ----------------------------------------------------------------- dead nodes and initializers

def dead_branch_model() -> onnx.ModelProto:
    """y = Relu(x) * w; a dead chain Sigmoid -> Add(w_dead) -> Neg, and a dead Add reading a live value."""
    return make_model(
        [node("Relu", ["x"], ["r"], name="relu"),
         node("Sigmoid", ["x"], ["d1"], name="dead_sig"),
         node("Mul", ["r", "w"], ["y"], name="mul"),
         node("Add", ["d1", "w_dead"], ["d2"], name="dead_add"),
         node("Neg", ["d2"], ["d3"], name="dead_neg"),
         node("Add", ["r", "r"], ["d4"], name="dead_add_live_input")],
        [vi("x", [3])], [vi("y", [3])],
        [init("w", [2.0, -3.0, 0.5]), init("w_dead", [1.0, 1.0, 1.0])])


def test_dead_branches_removed_live_nodes_kept():
    model = dead_branch_model()
    out, st_, modified = dce_both(model)
    assert node_names(out) == ["relu", "mul"]
    assert [i.name for i in out.graph.initializer] == ["w"]
    assert st_ == stats(nodes_removed=4, initializers_removed=1)
    assert modified is True
    # The known answer, not only "same as before".
    np.testing.assert_array_equal(run_model(out, {"x": X})["y"], np.maximum(X, 0) * np.array([2.0, -3.0, 0.5], np.float32))


def test_dce_is_idempotent():
    once, _ = run_pass_direct(dead_branch_model(), "dce")
    twice, result = run_pass_direct(once, "dce")
    assert result.modified is False
    assert result.stats == ZERO_STATS
    assert node_names(twice) == node_names(once)


def test_dead_initializers_removed_shared_ones_kept():
    """An initializer read by dead and live nodes stays; those read only by dead nodes go."""
    model = make_model(
        [node("Add", ["x", "shared"], ["y"], name="live"),
         node("Mul", ["x", "shared"], ["d1"], name="dead1"),
         node("Mul", ["d1", "only_dead_a"], ["d2"], name="dead2"),
         node("Sub", ["d2", "only_dead_b"], ["d3"], name="dead3")],
        [vi("x", [3])], [vi("y", [3])],
        [init("shared", [1.0, 2.0, 3.0]), init("only_dead_a", [4.0, 5.0, 6.0]),
         init("only_dead_b", np.ones((4, 3)))])
    out, st_, _ = dce_both(model)
    assert node_names(out) == ["live"]
    assert [i.name for i in out.graph.initializer] == ["shared"]
    assert st_ == stats(nodes_removed=3, initializers_removed=2)



def test_initializer_no_node_reads_is_removed_and_counted():
    model = make_model([node("Relu", ["x"], ["y"], name="relu")], [vi("x", [3])], [vi("y", [3])],
                       [init("never_read", [1.0, 2.0, 3.0])])
    out, st_, modified = dce_both(model)
    assert list(out.graph.initializer) == []
    assert st_ == stats(initializers_removed=1)
    assert modified is True


def test_unused_constant_nodes_removed_used_kept():
    model = make_model(
        [node("Constant", [], ["k_live"], name="const_live",
              value=helper.make_tensor("v", onnx.TensorProto.FLOAT, [3], [0.5, 1.5, -2.0])),
         node("Constant", [], ["k_dead"], name="const_dead",
              value=helper.make_tensor("v", onnx.TensorProto.FLOAT, [2, 2], [1.0, 2.0, 3.0, 4.0])),
         node("Constant", [], ["k_dead_f"], name="const_dead_float", value_float=7.0),
         node("Mul", ["x", "k_live"], ["y"], name="mul")],
        [vi("x", [3])], [vi("y", [3])])
    out, st_, _ = dce_both(model)
    assert node_names(out) == ["const_live", "mul"]
    assert st_["nodes_removed"] == 2
    assert st_["identities_removed"] == st_["identities_kept"] == st_["functions_removed"] == 0
    np.testing.assert_array_equal(run_model(out, {"x": X})["y"], X * np.array([0.5, 1.5, -2.0], np.float32))


def test_graph_inputs_never_removed_outputs_never_changed():
    """An unused input stays; an output that is a graph input, and one that is an initializer, stay as they are."""
    model = make_model(
        [node("Neg", ["x"], ["y"], name="neg"), node("Relu", ["unused"], ["d"], name="dead")],
        [vi("x", [3]), vi("unused", ["n", 3]), vi("also_unused", [1], INT64)],
        [vi("y", [3]), vi("x", [3]), vi("c", [2])],
        [init("c", [4.0, 5.0])])
    out, st_, _ = dce_both(model)
    assert [i.name for i in out.graph.input] == ["x", "unused", "also_unused"]
    assert [o.name for o in out.graph.output] == ["y", "x", "c"]
    assert node_names(out) == ["neg"]
    assert st_ == stats(nodes_removed=1)
    got = run_model(out, random_feed(out) | {"x": X})
    np.testing.assert_array_equal(got["y"], -X)
    np.testing.assert_array_equal(got["x"], X)
    np.testing.assert_array_equal(got["c"], np.array([4.0, 5.0], np.float32))


def initializer_input_model(read_by: str) -> onnx.ModelProto:
    """w is an initializer also listed as a graph input (an overridable default, IR >= 4)."""
    reader = node("Add", ["x", "w"], ["d"] if read_by == "dead" else ["y"], name="add")
    nodes = [reader, node("Relu", ["x"], ["y"], name="relu")] if read_by == "dead" else [reader]
    return make_model(nodes, [vi("x", [3]), vi("w", [3])], [vi("y", [3])], [init("w", [1.0, 2.0, 3.0])],
                      ir_version=8)


def test_initializer_listed_as_input_and_read_stays_overridable():
    model = initializer_input_model("live")
    out, st_, _ = dce_both(model, [{"x": X}])
    assert [i.name for i in out.graph.input] == ["x", "w"]
    assert st_ == ZERO_STATS
    feed = {"x": X, "w": np.array([10.0, 20.0, 30.0], np.float32)}
    np.testing.assert_array_equal(run_model(out, feed)["y"], X + feed["w"])  # the override still works



def test_initializer_listed_as_input_read_only_by_dead_nodes_stays_an_input():
    model = initializer_input_model("dead")
    out, st_, _ = dce_both(model, [{"x": X}])
    assert [i.name for i in out.graph.input] == ["x", "w"]
    assert node_names(out) == ["relu"]
    assert st_["nodes_removed"] == 1
    np.testing.assert_array_equal(run_model(out, {"x": X, "w": X})["y"], np.maximum(X, 0))


def test_nothing_dead_means_not_modified():
    model = make_model([node("Relu", ["x"], ["r"], name="relu"), node("Add", ["r", "w"], ["y"], name="add")],
                       [vi("x", [3])], [vi("y", [3])], [init("w", [1.0, 2.0, 3.0])])
    out, st_, modified = dce_both(model)
    assert modified is False
    assert st_ == ZERO_STATS
    assert node_names(out) == ["relu", "add"]


# ----------------------------------------------------------------- Identity chains

def test_identity_chain_removed():
    model = make_model(
        [node("Relu", ["x"], ["a"], name="relu"),
         node("Identity", ["a"], ["b"], name="id1"),
         node("Identity", ["b"], ["c"], name="id2"),
         node("Neg", ["c"], ["y"], name="neg")],
        [vi("x", [3])], [vi("y", [3])])
    out, st_, modified = dce_both(model)
    assert ops(out) == ["Relu", "Neg"]
    assert out.graph.node[1].input[0] == out.graph.node[0].output[0]
    assert st_ == stats(identities_removed=2)
    assert modified is True


def test_identity_chain_kept_when_identities_off():
    model = make_model(
        [node("Relu", ["x"], ["a"], name="relu"),
         node("Identity", ["a"], ["b"], name="id1"),
         node("Identity", ["b"], ["dead"], name="id_dead"),
         node("Neg", ["b"], ["y"], name="neg")],
        [vi("x", [3])], [vi("y", [3])])
    out, st_, _ = dce_both(model, identities=False)
    assert node_names(out) == ["relu", "id1", "neg"]
    assert st_ == stats(nodes_removed=1)


def test_identity_into_graph_output_renames_producer():
    """x -> Relu -> a -> Identity -> b -> Identity -> y (output), b also read by Neg -> z (output)."""
    model = make_model(
        [node("Relu", ["x"], ["a"], name="relu"),
         node("Identity", ["a"], ["b"], name="id1"),
         node("Identity", ["b"], ["y"], name="id2"),
         node("Neg", ["b"], ["z"], name="neg")],
        [vi("x", [3])], [vi("y", [3]), vi("z", [3])])
    out, st_, _ = dce_both(model)
    assert ops(out) == ["Relu", "Neg"]
    assert list(out.graph.node[0].output) == ["y"]  # the producer took the output's name
    assert list(out.graph.node[1].input) == ["y"]
    assert [o.name for o in out.graph.output] == ["y", "z"]
    assert st_ == stats(identities_removed=2)
    got = run_model(out, {"x": X})
    np.testing.assert_array_equal(got["y"], np.maximum(X, 0))
    np.testing.assert_array_equal(got["z"], -np.maximum(X, 0))


@pytest.mark.parametrize("source", ["input", "initializer"])
def test_identity_from_input_or_initializer_to_output_stays(source):
    """Removing it would rename a graph input / make an output an initializer; the chain shrinks to one."""
    src = "x" if source == "input" else "w"
    model = make_model(
        [node("Identity", [src], ["m"], name="id_mid"),
         node("Identity", ["m"], ["y"], name="id_out"),
         node("Sigmoid", ["x"], ["z"], name="sig")],
        [vi("x", [3])], [vi("y", [3]), vi("z", [3])], [init("w", [9.0, 8.0, 7.0])] if src == "w" else [])
    out, st_, modified = dce_both(model)
    assert ops(out) == ["Identity", "Sigmoid"]
    assert list(out.graph.node[0].input) == [src] and list(out.graph.node[0].output) == ["y"]
    assert st_ == stats(identities_removed=1, identities_kept=1)
    assert modified is True
    expected = X if source == "input" else np.array([9.0, 8.0, 7.0], np.float32)
    np.testing.assert_array_equal(run_model(out, {"x": X})["y"], expected)


def test_single_identity_input_to_output_stays_and_is_not_a_change():
    model = make_model([node("Identity", ["x"], ["y"], name="id")], [vi("x", [3])], [vi("y", [3])])
    out, st_, modified = dce_both(model)
    assert node_names(out) == ["id"]
    assert st_ == stats(identities_kept=1)
    assert modified is False


def test_two_outputs_fed_by_same_tensor_through_identities():
    model = make_model(
        [node("Relu", ["x"], ["r"], name="relu"),
         node("Identity", ["r"], ["y1"], name="id1"),
         node("Identity", ["r"], ["y2"], name="id2")],
        [vi("x", [3])], [vi("y1", [3]), vi("y2", [3])])
    out, st_, _ = dce_both(model)
    assert ops(out) == ["Relu", "Identity"]
    assert list(out.graph.node[0].output) == ["y1"]
    assert list(out.graph.node[1].input) == ["y1"] and list(out.graph.node[1].output) == ["y2"]
    assert [o.name for o in out.graph.output] == ["y1", "y2"]
    assert st_ == stats(identities_removed=1, identities_kept=1)
    got = run_model(out, {"x": X})
    np.testing.assert_array_equal(got["y1"], np.maximum(X, 0))
    np.testing.assert_array_equal(got["y2"], np.maximum(X, 0))


def test_identity_of_a_graph_output_into_another_output_stays():
    model = make_model(
        [node("Relu", ["x"], ["y1"], name="relu"), node("Identity", ["y1"], ["y2"], name="id")],
        [vi("x", [3])], [vi("y1", [3]), vi("y2", [3])])
    out, st_, modified = dce_both(model)
    assert node_names(out) == ["relu", "id"]
    assert st_ == stats(identities_kept=1)
    assert modified is False


# ----------------------------------------------------------------- subgraphs

def if_model(dead_outer: bool = True, cond_shape=()) -> onnx.ModelProto:
    """If(c): then = Relu(p) (+ a dead Neg(p)), else = Neg(q) * w_else; p and q made outside, read only inside."""
    then = helper.make_graph([node("Relu", ["p"], ["t"], name="then_relu"),
                              node("Neg", ["p"], ["t_dead"], name="then_dead")],
                             "then", [], [vi("t", [3])])
    els = helper.make_graph([node("Neg", ["q"], ["e0"], name="else_neg"),
                             node("Mul", ["e0", "w_else"], ["e"], name="else_mul")],
                            "else", [], [vi("e", [3])])
    nodes = [node("Sigmoid", ["x"], ["p"], name="make_p"),
             node("Add", ["x", "w"], ["q"], name="make_q"),
             node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=els)]
    if dead_outer:
        nodes.append(node("Mul", ["p", "q"], ["outer_dead"], name="outer_dead"))
    return make_model(nodes, [vi("c", list(cond_shape), BOOL), vi("x", [3])], [vi("y", [3])],
                      [init("w", [1.0, -1.0, 0.25]), init("w_else", [3.0, 3.0, 3.0])])


def both_branches(extra=None):
    return [{"c": np.array(flag), "x": X, **(extra or {})} for flag in (True, False)]


def test_if_branches_keep_outer_producers_and_lose_dead_nodes():
    model = if_model()
    out, st_, _ = dce_both(model, both_branches())
    assert node_names(out) == ["make_p", "make_q", "if"]
    assert node_names(subgraph(out, "If", "then_branch")) == ["then_relu"]
    assert node_names(subgraph(out, "If", "else_branch")) == ["else_neg", "else_mul"]
    assert st_ == stats(nodes_removed=2)
    sig = 1 / (1 + np.exp(-X.astype(np.float64)))
    got_then = run_model(out, both_branches()[0])["y"]
    got_else = run_model(out, both_branches()[1])["y"]
    np.testing.assert_allclose(got_then, np.maximum(sig, 0), rtol=1e-6)
    np.testing.assert_array_equal(got_else, -(X + np.array([1.0, -1.0, 0.25], np.float32)) * np.float32(3.0))


def test_identities_across_scopes():
    """Outer Identity read only inside a branch: the branch reads its source. Outer Identity into a graph
    output whose source a branch reads: the rename is seen inside the branch. In a branch: Identity from
    an outer value to the branch output stays; Identity from a local value is removed by renaming."""
    then = helper.make_graph([node("Relu", ["h"], ["t0"], name="then_relu"),
                              node("Add", ["t0", "r"], ["t1"], name="then_add"),
                              node("Identity", ["t1"], ["t"], name="then_id_local")],
                             "then", [], [vi("t", [3])])
    els = helper.make_graph([node("Identity", ["r"], ["e"], name="else_id_outer")], "else", [], [vi("e", [3])])
    model = make_model(
        [node("Sigmoid", ["x"], ["r"], name="sig"),
         node("Identity", ["r"], ["h"], name="id_read_in_branch"),
         node("Identity", ["r"], ["z"], name="id_to_output"),
         node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=els)],
        [vi("c", [], BOOL), vi("x", [3])], [vi("y", [3]), vi("z", [3])])
    out, st_, _ = dce_both(model, both_branches())
    assert node_names(out) == ["sig", "if"]
    assert list(out.graph.node[0].output) == ["z"]  # r took the output's name...
    then_out, else_out = subgraph(out, "If", "then_branch"), subgraph(out, "If", "else_branch")
    assert [list(n.input) for n in then_out.node] == [["z"], ["t0", "z"]]  # ...and the branches read it
    assert node_names(then_out) == ["then_relu", "then_add"] and list(then_out.node[1].output) == ["t"]
    assert node_names(else_out) == ["else_id_outer"] and list(else_out.node[0].input) == ["z"]
    assert st_ == stats(identities_removed=3, identities_kept=1)
    sig = run_model(out, both_branches()[1])["z"]
    np.testing.assert_array_equal(run_model(out, both_branches()[0])["y"], np.maximum(sig, 0) + sig)
    np.testing.assert_array_equal(run_model(out, both_branches()[1])["y"], sig)


def test_outer_value_read_only_by_a_nested_if_stays():
    """s is made in the main graph and read only two If levels down."""
    inner_then = helper.make_graph([node("Neg", ["s"], ["it"], name="inner_then_neg")], "inner_then", [], [vi("it", [3])])
    inner_else = helper.make_graph([node("Relu", ["x"], ["ie"], name="inner_else_relu")], "inner_else", [], [vi("ie", [3])])
    then = helper.make_graph([node("If", ["c2"], ["t"], name="inner_if", then_branch=inner_then, else_branch=inner_else),
                              node("Sigmoid", ["s"], ["t_dead"], name="then_dead")],
                             "then", [], [vi("t", [3])])
    els = helper.make_graph([node("Identity", ["x"], ["e"], name="else_id")], "else", [], [vi("e", [3])])
    model = make_model(
        [node("Mul", ["x", "x"], ["s"], name="make_s"),
         node("If", ["c"], ["y"], name="outer_if", then_branch=then, else_branch=els)],
        [vi("c", [], BOOL), vi("c2", [], BOOL), vi("x", [3])], [vi("y", [3])])
    feeds = [{"c": np.array(a), "c2": np.array(b), "x": X} for a in (True, False) for b in (True, False)]
    out, st_, _ = dce_both(model, feeds, identities=False)
    assert node_names(out) == ["make_s", "outer_if"]
    assert node_names(subgraph(out, "If", "then_branch")) == ["inner_if"]
    assert st_ == stats(nodes_removed=1)
    np.testing.assert_array_equal(run_model(out, feeds[0])["y"], -(X * X))


def loop_model(with_identities: bool) -> onnx.ModelProto:
    """Loop n times: v <- v + xs (xs = Sigmoid(x), made outside, read only in the body); scan out v + xs.

    The body has a dead Mul; with identities, the loop-carried value and the condition pass through
    Identity (body input -> body output: must stay) and the scan output through one (removable).
    """
    body_nodes = [node("Add", ["v_in", "xs"], ["s0"], name="body_add"),
                  node("Mul", ["v_in", "v_in"], ["body_dead_out"], name="body_dead")]
    if with_identities:
        body_nodes += [node("Identity", ["cond_in"], ["cond_out"], name="body_id_cond"),
                       node("Identity", ["s0"], ["v_out"], name="body_id_carried"),
                       node("Identity", ["s0"], ["scan"], name="body_id_scan"),
                       node("Identity", ["v_in"], ["unused_id"], name="body_id_dead")]
        outs = [vi("cond_out", [], BOOL), vi("v_out", [3]), vi("scan", [3])]
    else:
        body_nodes.append(node("Identity", ["cond_in"], ["cond_out"], name="body_id_cond"))
        outs = [vi("cond_out", [], BOOL), vi("s0", [3]), vi("s0_scan", [3])]
        body_nodes.append(node("Neg", ["s0"], ["s0_scan"], name="body_neg"))
    body = helper.make_graph(body_nodes, "body", [vi("i", [], INT64), vi("cond_in", [], BOOL), vi("v_in", [3])], outs)
    return make_model(
        [node("Sigmoid", ["x"], ["xs"], name="make_xs"),
         node("Relu", ["x"], ["outer_dead"], name="outer_dead"),
         node("Loop", ["n", "", "v0"], ["v_final", "scanned"], name="loop", body=body)],
        [vi("n", [], INT64), vi("x", [3]), vi("v0", [3])], [vi("v_final", [3]), vi("scanned", [None, 3])])


def loop_feeds():
    return [{"n": np.array(k, np.int64), "x": X, "v0": np.array([0.5, -0.5, 1.0], np.float32)} for k in (0, 3)]


def test_loop_body_dead_nodes_removed_outer_read_kept():
    model = loop_model(with_identities=False)
    out, st_, _ = dce_both(model, loop_feeds(), identities=False)
    assert node_names(out) == ["make_xs", "loop"]
    body = subgraph(out.graph.node[1], "body")
    assert node_names(body) == ["body_add", "body_id_cond", "body_neg"]
    assert st_ == stats(nodes_removed=2)
    got = run_model(out, loop_feeds()[1])
    sig = (1 / (1 + np.exp(-X.astype(np.float64)))).astype(np.float32)
    np.testing.assert_allclose(got["v_final"], np.array([0.5, -0.5, 1.0], np.float32) + 3 * sig, rtol=1e-6)
    assert got["scanned"].shape == (3, 3)


def test_loop_carried_value_through_identity_stays_valid():
    model = loop_model(with_identities=True)
    out, st_, _ = dce_both(model, loop_feeds())
    body = subgraph(out.graph.node[1], "body")
    assert node_names(out) == ["make_xs", "loop"]
    # cond_in -> cond_out must stay (body input to body output); s0 -> v_out is removed by renaming
    # the Add's output; s0 -> scan then reads a body output and must stay; the dead ones go.
    assert sorted(node_names(body)) == ["body_add", "body_id_cond", "body_id_scan"]
    assert [o.name for o in body.output] == ["cond_out", "v_out", "scan"]
    assert st_ == stats(nodes_removed=2, identities_removed=2, identities_kept=2)


# ----------------------------------------------------------------- model-local functions

FN_OPSETS = {"": 17, "custom": 1}


def function(name: str, nodes, inputs=("a",), outputs=("b",)) -> onnx.FunctionProto:
    return helper.make_function("custom", name, list(inputs), list(outputs), list(nodes),
                                [helper.make_opsetid(d, v) for d, v in FN_OPSETS.items()])


def call(op: str, inputs, outputs, name: str) -> onnx.NodeProto:
    return node(op, inputs, outputs, name=name, domain="custom")


def test_unused_functions_removed_used_ones_kept():
    """Outer calls Inner (Inner is used only from inside a function); Unused is never called;
    DeadCall is only called by a dead node; Outer has a dead node in its body."""
    functions = [
        function("Inner", [helper.make_node("Neg", ["a"], ["b"])]),
        function("Outer", [helper.make_node("Inner", ["a"], ["t"], domain="custom"),
                           helper.make_node("Relu", ["t"], ["b"]),
                           helper.make_node("Sigmoid", ["a"], ["dead_in_fn"])]),
        function("Unused", [helper.make_node("Sigmoid", ["a"], ["b"])]),
        function("DeadCall", [helper.make_node("Relu", ["a"], ["b"])]),
    ]
    model = make_model([call("Outer", ["x"], ["y"], "call_outer"), call("DeadCall", ["x"], ["d"], "call_dead")],
                       [vi("x", [3])], [vi("y", [3])], functions=functions, opsets=FN_OPSETS)
    out, st_, _ = dce_both(model)
    assert [f.name for f in out.functions] == ["Inner", "Outer"]
    assert [n.op_type for n in out.functions[1].node] == ["Inner", "Relu"]
    assert node_names(out) == ["call_outer"]
    assert st_ == stats(nodes_removed=2, functions_removed=2)
    np.testing.assert_array_equal(run_model(out, {"x": X})["y"], np.maximum(-X, 0))


def test_function_used_only_inside_an_if_branch_kept():
    functions = [function("Branch", [helper.make_node("Sigmoid", ["a"], ["b"])]),
                 function("Unused", [helper.make_node("Neg", ["a"], ["b"])])]
    then = helper.make_graph([call("Branch", ["x"], ["t"], "then_call")], "then", [], [vi("t", [3])])
    els = helper.make_graph([node("Neg", ["x"], ["e"], name="else_neg")], "else", [], [vi("e", [3])])
    model = make_model([node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=els)],
                       [vi("c", [], BOOL), vi("x", [3])], [vi("y", [3])], functions=functions, opsets=FN_OPSETS)
    out, st_, _ = dce_both(model, both_branches())
    assert [f.name for f in out.functions] == ["Branch"]
    assert st_ == stats(functions_removed=1)


# ----------------------------------------------------------------- optimize() without explicit inputs


def test_optimize_with_synthetic_data_on_a_scalar_bool_input():
    model = make_model([node("Neg", ["x"], ["nx"], name="neg"), node("Where", ["c", "x", "nx"], ["y"], name="where"),
                        node("Relu", ["x"], ["d"], name="dead")],
                       [vi("c", [], BOOL), vi("x", [3])], [vi("y", [3])])
    result = onnxopt.optimize(model, "dce")
    assert result.validation.identical
    assert node_names(result.model) == ["neg", "where"]


# ----------------------------------------------------------------- random DAGs

UNARY = ("Relu", "Sigmoid", "Neg", "Identity")
BINARY = ("Add", "Mul")
INIT_VALUES = [np.array(v, np.float32) for v in ([0.5, -2.0, 3.0], [1.25, 0.0, -0.75], [-1.0, 4.0, 0.125])]


@st.composite
def random_dags(draw):
    """5-40 nodes over 1-3 inputs and up to 3 initializers, wired at random (many dead by construction),
    with 1-3 distinct node outputs as graph outputs."""
    n_inputs = draw(st.integers(1, 3))
    n_inits = draw(st.integers(0, 3))
    values = [f"x{i}" for i in range(n_inputs)] + [f"c{i}" for i in range(n_inits)]
    nodes = []
    for i in range(draw(st.integers(5, 40))):
        op = draw(st.sampled_from(UNARY + BINARY))
        pick = st.one_of(st.sampled_from(values[-4:]), st.sampled_from(values))  # deep chains and long edges
        ins = [draw(pick) for _ in range(2 if op in BINARY else 1)]
        nodes.append(node(op, ins, [f"v{i}"], name=f"k{i}"))
        values.append(f"v{i}")
    outputs = draw(st.lists(st.sampled_from([n.output[0] for n in nodes]), min_size=1, max_size=3, unique=True))
    # Extra outputs through short Identity chains from any value (inputs, initializers, outputs):
    # the cases where some Identity must stay.
    for j in range(draw(st.integers(0, 2))):
        src = draw(st.sampled_from(values + outputs))
        for k in range(draw(st.integers(1, 2))):
            nodes.append(node("Identity", [src], [f"tap{j}_{k}"], name=f"tap{j}_{k}"))
            src = f"tap{j}_{k}"
        outputs.append(src)
    read = {t for n in nodes for t in n.input}
    inits = [init(f"c{i}", INIT_VALUES[i]) for i in range(n_inits) if f"c{i}" in read]
    return make_model(nodes, [vi(f"x{i}", [3]) for i in range(n_inputs)], [vi(o, [3]) for o in outputs], inits)


def expected_liveness(model: onnx.ModelProto):
    """Names of live nodes (reachability from the outputs over NodeProtos), and initializers live nodes read."""
    maker = {o: n for n in model.graph.node for o in n.output}
    live, work = set(), [o.name for o in model.graph.output]
    while work:
        n = maker.get(work.pop())
        if n is not None and n.name not in live:
            live.add(n.name)
            work.extend(n.input)
    read = {t for n in model.graph.node if n.name in live for t in n.input}
    inits_live = {i.name for i in model.graph.initializer if i.name in read}
    return live, inits_live


def expected_identities_left(model: onnx.ModelProto) -> int:
    """Identities that must remain: per root value (the source behind Identity chains), every graph output
    reached through Identities needs one, except that one of them can take over a node output's name
    when that node output is not itself a graph output. Graph inputs and initializers cannot be renamed."""
    maker = {o: n for n in model.graph.node for o in n.output}

    def root(t: str) -> str:
        while t in maker and maker[t].op_type == "Identity":
            t = maker[t].input[0]
        return t

    outs = [o.name for o in model.graph.output]
    needed = 0
    for r in {root(o) for o in outs}:
        direct = r in outs
        through = sum(1 for o in outs if o != r and root(o) == r)
        renamable = r in maker and not direct  # a non-Identity node output, not an output itself
        needed += through - (1 if renamable and through else 0)
    return needed


DAG_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                        suppress_health_check=[HealthCheck.too_slow])


def check_random_dag(model: onnx.ModelProto, identities: bool) -> None:
    live, inits_live = expected_liveness(model)
    by_name = {n.name: n for n in model.graph.node}
    identity_total = sum(n.op_type == "Identity" for n in model.graph.node)

    out, result = run_pass_direct(model, "dce", identities=identities)

    assert interface(out) == interface(model)
    assert_same_outputs(model, out, [random_feed(model, seed=1)])
    left = {n.name for n in out.graph.node}
    assert left <= set(by_name), "dce invented nodes"
    assert {i.name for i in out.graph.initializer} == inits_live
    dead_non_id = sum(1 for n in model.graph.node if n.name not in live and n.op_type != "Identity")
    if identities:
        assert {n for n in left if by_name[n].op_type != "Identity"} == \
            {n for n in live if by_name[n].op_type != "Identity"}
        ids_left = sum(1 for n in out.graph.node if n.op_type == "Identity")
        assert ids_left == expected_identities_left(model)
        assert result.stats["nodes_removed"] == dead_non_id
        assert result.stats["identities_removed"] == identity_total - ids_left
        assert result.stats["identities_kept"] == ids_left
    else:
        assert left == live
        assert result.stats["nodes_removed"] == len(model.graph.node) - len(live)
        assert result.stats["identities_removed"] == result.stats["identities_kept"] == 0
    assert result.stats["initializers_removed"] == len(model.graph.initializer) - len(inits_live)
    assert result.stats["functions_removed"] == 0
    changed = len(out.graph.node) != len(model.graph.node) or len(out.graph.initializer) != len(model.graph.initializer)
    assert result.modified == changed


@DAG_SETTINGS
@given(random_dags())
def test_random_dags_exact_liveness(model):
    check_random_dag(model, identities=False)


@DAG_SETTINGS
@given(random_dags())
def test_random_dags_with_identity_removal(model):
    check_random_dag(model, identities=True)
