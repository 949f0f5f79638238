"""Graph helpers in onnxopt.graph: finding nodes, surgery, scope reads, sizes, import/export.

Every rewrite is exported and run in ONNX Runtime against values computed with numpy.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import graph as G
from onnxopt.pipeline import duplicate_names
from helpers import (BOOL, INT64, assert_same_outputs, init, interface, make_model, node, ops,
                     run_model, vi)


X = np.array([-1.5, 0.0, 2.25], np.float32)


def export(graph: gs.Graph, template: onnx.ModelProto, check: bool = True) -> onnx.ModelProto:
    model = G.export_model(graph, template)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def tensor(graph: gs.Graph, name: str) -> gs.Tensor:
    return graph.tensors()[name]


def by_name(graph: gs.Graph, name: str) -> gs.Node:
    (found,) = [n for n in graph.nodes if n.name == name]
    return found


# ----------------------------------------------------------------- a model with every kind of scope

FN_OPSETS = {"": 17, "custom": 1}


def scoped_model() -> onnx.ModelProto:
    """Top level: Relu, Neg, an If (then: Neg + nested If; else: Relu), a call to custom.F (body: Neg, Add)."""
    inner_then = helper.make_graph([node("Neg", ["q"], ["it"], name="inner_then_neg")], "inner_then", [], [vi("it", [3])])
    inner_else = helper.make_graph([node("Sigmoid", ["x"], ["ie"], name="inner_else_sig")], "inner_else", [],
                                   [vi("ie", [3])])
    then = helper.make_graph(
        [node("Neg", ["p"], ["t0"], name="then_neg"),
         node("If", ["c2"], ["t1"], name="then_inner_if", then_branch=inner_then, else_branch=inner_else),
         node("Add", ["t0", "t1"], ["t2"], name="then_add"),
         node("Mul", ["t2", "w"], ["t"], name="then_mul")],
        "then", [], [vi("t", [3])])
    els = helper.make_graph([node("Relu", ["x"], ["e"], name="else_relu")], "else", [], [vi("e", [3])])
    fn = helper.make_function("custom", "F", ["a"], ["b"],
                              [helper.make_node("Neg", ["a"], ["na"], name="fn_neg"),
                               helper.make_node("Add", ["na", "a"], ["b"], name="fn_add")],
                              [helper.make_opsetid(d, v) for d, v in FN_OPSETS.items()])
    return make_model(
        [node("Relu", ["x"], ["p"], name="top_relu"),
         node("Neg", ["x"], ["q"], name="top_neg"),
         node("If", ["c"], ["y"], name="top_if", then_branch=then, else_branch=els),
         node("F", ["x"], ["z"], name="top_call", domain="custom")],
        [vi("c", [], BOOL), vi("c2", [], BOOL), vi("x", [3])], [vi("y", [3]), vi("z", [3])],
        [init("w", [2.0, 3.0, 4.0])], functions=[fn], opsets=FN_OPSETS)


def names(nodes) -> list[str]:
    return sorted(n.name for n in nodes)


def test_find_nodes_by_op_recursive_into_subgraphs_and_functions():
    graph = G.import_graph(scoped_model())
    assert names(G.find_nodes(graph, "Neg")) == ["fn_neg", "inner_then_neg", "then_neg", "top_neg"]
    assert names(G.find_nodes(graph, "Neg", recursive=False)) == ["top_neg"]
    assert names(G.find_nodes(graph, ["Relu", "Sigmoid"])) == ["else_relu", "inner_else_sig", "top_relu"]
    assert names(G.find_nodes(graph, ("If",))) == ["then_inner_if", "top_if"]
    assert G.find_nodes(graph, "Conv") == []


def test_find_nodes_by_name_glob():
    graph = G.import_graph(scoped_model())
    assert names(G.find_nodes(graph, name="then_*")) == ["then_add", "then_inner_if", "then_mul", "then_neg"]
    assert names(G.find_nodes(graph, "Neg", name="*then*")) == ["inner_then_neg", "then_neg"]
    assert names(G.find_nodes(graph, name="top_?e*")) == ["top_neg", "top_relu"]
    assert G.find_nodes(graph, name="THEN_*") == []  # case-sensitive
    assert names(G.find_nodes(graph, name="top_*", recursive=False)) == ["top_call", "top_if", "top_neg", "top_relu"]
    everything = G.find_nodes(graph)
    assert len(everything) == G.node_count(graph) == 13
    assert all(isinstance(n, gs.Node) for n in everything)


# ----------------------------------------------------------------- rewire_input

def test_rewire_input_changes_every_slot_and_keeps_links_consistent():
    model = make_model([node("Relu", ["x"], ["a"], name="relu"), node("Neg", ["x"], ["b"], name="neg"),
                        node("Add", ["a", "a"], ["y"], name="add"), node("Mul", ["a", "x"], ["z"], name="mul")],
                       [vi("x", [3])], [vi("y", [3]), vi("z", [3])])
    graph = G.import_graph(model)
    add, a, b = by_name(graph, "add"), tensor(graph, "a"), tensor(graph, "b")
    assert G.rewire_input(add, a, b) == 2
    assert all(t is b for t in add.inputs)
    assert add not in a.outputs and sum(c is add for c in b.outputs) == 2
    assert G.rewire_input(add, a, b) == 0  # nothing left to change
    assert G.rewire_input(by_name(graph, "relu"), a, b) == 0  # relu does not read a
    out = export(graph, model)
    got = run_model(out, {"x": X})
    np.testing.assert_array_equal(got["y"], -X + -X)
    np.testing.assert_array_equal(got["z"], np.maximum(X, 0) * X)  # the other consumer of a is untouched


# ----------------------------------------------------------------- insert_after

def chain_model() -> onnx.ModelProto:
    """a = Sigmoid(x); y1 = Neg(a); y2 = Relu(a)."""
    return make_model([node("Sigmoid", ["x"], ["a"], name="sig"), node("Neg", ["a"], ["y1"], name="neg"),
                       node("Relu", ["a"], ["y2"], name="relu")],
                      [vi("x", [3])], [vi("y1", [3]), vi("y2", [3])])


def sigmoid(x):
    return run_model(make_model([node("Sigmoid", ["x"], ["y"])], [vi("x", [3])], [vi("y", [3])]), {"x": x})["y"]


def test_insert_after_inner_tensor_feeds_every_consumer():
    model = chain_model()
    graph = G.import_graph(model)
    a = tensor(graph, "a")
    new = G.insert_after(graph, a, "Neg")
    assert new.op == "Neg" and new.inputs[0] is a and len(new.outputs) == 1
    out_t = new.outputs[0]
    assert [c.name for c in a.outputs] == [new.name]
    assert sorted(c.name for c in out_t.outputs) == ["neg", "relu"]
    assert out_t.name != "a" and a.name == "a"
    assert out_t.dtype == a.dtype and out_t.shape == a.shape
    out = export(graph, model)
    assert interface(out) == interface(model)
    got = run_model(out, {"x": X})
    np.testing.assert_array_equal(got["y1"], sigmoid(X))            # Neg(Neg(a)) == a
    np.testing.assert_array_equal(got["y2"], np.maximum(-sigmoid(X), 0))


def assert_topologically_sorted(graph: onnx.GraphProto, outer: frozenset = frozenset()) -> None:
    """Every value a node reads (its inputs and its subgraphs' reads) is made before it or is in scope."""
    known = set(outer) | {v.name for v in graph.input} | {i.name for i in graph.initializer} | {""}
    for n in graph.node:
        for sub in (a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH):
            assert_topologically_sorted(sub, frozenset(known))
        missing = [t for t in n.input if t not in known]
        assert not missing, f"node {n.name} reads {missing} before they are made"
        known.update(n.output)


def test_insert_after_then_export_is_topologically_sorted():
    model = chain_model()
    graph = G.import_graph(model)
    G.insert_after(graph, tensor(graph, "a"), "Neg")
    assert graph.nodes[-1].op == "Neg"  # appended: export must sort
    out = G.export_model(graph, model)
    onnx.checker.check_model(out, full_check=True)
    assert_topologically_sorted(out.graph)
    assert sorted(ops(out)) == ["Neg", "Neg", "Relu", "Sigmoid"]


def test_insert_after_a_value_read_only_inside_a_branch():
    """The new node must be placed before the If whose branch reads the value from the outer scope."""
    then = helper.make_graph([node("Relu", ["p"], ["t"], name="then_relu")], "then", [], [vi("t", [3])])
    els = helper.make_graph([node("Neg", ["p"], ["e"], name="else_neg")], "else", [], [vi("e", [3])])
    model = make_model([node("Sigmoid", ["x"], ["p"], name="sig"),
                        node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=els)],
                       [vi("c", [], BOOL), vi("x", [3])], [vi("y", [3])])
    graph = G.import_graph(model)
    p = tensor(graph, "p")
    new = G.insert_after(graph, p, "Neg")
    branch_nodes = [b.nodes[0] for b in G.subgraphs_of(by_name(graph, "if"))]
    assert all(n.inputs[0] is new.outputs[0] for n in branch_nodes)
    out = export(graph, model)
    assert_topologically_sorted(out.graph)
    got_then = run_model(out, {"c": np.array(True), "x": X})["y"]
    got_else = run_model(out, {"c": np.array(False), "x": X})["y"]
    np.testing.assert_array_equal(got_then, np.maximum(-sigmoid(X), 0))
    np.testing.assert_array_equal(got_else, sigmoid(X))


def test_insert_after_graph_output_keeps_output_name():
    model = make_model([node("Relu", ["x"], ["y"], name="relu")], [vi("x", [3])], [vi("y", [3])])
    graph = G.import_graph(model)
    y = tensor(graph, "y")
    new = G.insert_after(graph, y, "Neg")
    assert [t.name for t in graph.outputs] == ["y"]
    assert graph.outputs[0] is new.outputs[0]
    assert y.name != "y" and new.inputs[0] is y
    out = export(graph, model)
    assert interface(out) == interface(model)
    np.testing.assert_array_equal(run_model(out, {"x": X})["y"], -np.maximum(X, 0))


def test_insert_after_with_extra_inputs_attrs_and_name():
    model = make_model([node("Relu", ["x"], ["y"], name="relu")], [vi("x", [3])], [vi("y", [3])])
    graph = G.import_graph(model)
    scale = gs.Constant("scale", np.array([2.0, 0.5, -1.0], np.float32))
    new = G.insert_after(graph, tensor(graph, "y"), "Mul", extra_inputs=[scale], name="scale_it")
    assert new.name == "scale_it" and new.inputs[1] is scale
    clip = G.insert_after(graph, graph.outputs[0], "LeakyRelu", attrs={"alpha": 0.25})
    assert clip.attrs["alpha"] == 0.25
    out = export(graph, model)
    assert [o.name for o in out.graph.output] == ["y"]
    scaled = np.maximum(X, 0) * np.array([2.0, 0.5, -1.0], np.float32)
    np.testing.assert_array_equal(run_model(out, {"x": X})["y"], np.where(scaled < 0, scaled * np.float32(0.25), scaled))


def test_insert_after_twice_gives_fresh_unique_names():
    model = make_model([node("Relu", ["x"], ["y"], name="relu")], [vi("x", [3])], [vi("y", [3])])
    graph = G.import_graph(model)
    first = G.insert_after(graph, graph.outputs[0], "Neg")
    second = G.insert_after(graph, graph.outputs[0], "Neg")
    assert first.name != second.name
    assert duplicate_names(graph) == set()
    all_names = [t.name for t in graph.tensors().values()]
    assert len(all_names) == len(set(all_names))
    out = export(graph, model)
    np.testing.assert_array_equal(run_model(out, {"x": X})["y"], np.maximum(X, 0))  # Neg(Neg(relu))


# ----------------------------------------------------------------- bypass and remove_node

def test_bypass_inner_identity_and_dropout():
    model = make_model([node("Relu", ["x"], ["a"], name="relu"), node("Identity", ["a"], ["b"], name="id"),
                        node("Dropout", ["b"], ["c"], name="drop"), node("Neg", ["c"], ["y"], name="neg"),
                        node("Sigmoid", ["b"], ["z"], name="sig")],
                       [vi("x", [3])], [vi("y", [3]), vi("z", [3])])
    graph = G.import_graph(model)
    a = tensor(graph, "a")
    assert G.bypass(graph, by_name(graph, "id")) is True
    assert G.bypass(graph, by_name(graph, "drop")) is True
    assert [n.name for n in graph.nodes] == ["relu", "neg", "sig"]
    assert by_name(graph, "neg").inputs[0] is a and by_name(graph, "sig").inputs[0] is a
    out = export(graph, model)
    assert interface(out) == interface(model)
    assert_same_outputs(model, out, [{"x": X}])


def test_bypass_identity_into_graph_output_renames_the_source():
    model = make_model([node("Relu", ["x"], ["a"], name="relu"), node("Identity", ["a"], ["y"], name="id"),
                        node("Neg", ["a"], ["z"], name="neg")],
                       [vi("x", [3])], [vi("y", [3]), vi("z", [3])])
    graph = G.import_graph(model)
    a = tensor(graph, "a")
    assert G.bypass(graph, by_name(graph, "id")) is True
    assert graph.outputs[0] is a and a.name == "y"
    assert a.dtype == np.float32 and list(a.shape) == [3]
    out = export(graph, model)
    assert interface(out) == interface(model)
    assert [list(n.output) for n in out.graph.node] == [["y"], ["z"]]
    assert list(out.graph.node[1].input) == ["y"]
    assert_same_outputs(model, out, [{"x": X}])


@pytest.mark.parametrize("src", ["x", "w", "r"])
def test_bypass_refuses_when_it_would_change_the_interface(src):
    """Source is a graph input, an initializer, or another graph output: the Identity stays."""
    model = make_model([node("Relu", ["x"], ["r"], name="relu"), node("Identity", [src], ["y"], name="id")],
                       [vi("x", [3])], [vi("r", [3]), vi("y", [3])], [init("w", [1.0, 2.0, 3.0])])
    graph = G.import_graph(model)
    assert G.bypass(graph, by_name(graph, "id")) is False
    assert [n.name for n in graph.nodes] == ["relu", "id"]
    assert [t.name for t in graph.outputs] == ["r", "y"] and [t.name for t in graph.inputs] == ["x"]
    out = export(graph, model)
    assert_same_outputs(model, out, [{"x": X}])


def test_bypass_refuses_branch_output_from_outer_scope():
    then = helper.make_graph([node("Identity", ["p"], ["t"], name="then_id")], "then", [], [vi("t", [3])])
    els = helper.make_graph([node("Neg", ["p"], ["e"], name="else_neg")], "else", [], [vi("e", [3])])
    model = make_model([node("Relu", ["x"], ["p"], name="relu"),
                        node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=els)],
                       [vi("c", [], BOOL), vi("x", [3])], [vi("y", [3])])
    graph = G.import_graph(model)
    branch = by_name(graph, "if").attrs["then_branch"]
    assert G.bypass(branch, branch.nodes[0]) is False
    assert [n.name for n in branch.nodes] == ["then_id"]
    assert tensor(graph, "p").name == "p" and [t.name for t in branch.outputs] == ["t"]
    assert branch.nodes[0].inputs[0] is tensor(graph, "p") and branch.outputs[0] is branch.nodes[0].outputs[0]


def test_export_model_with_subgraphs_and_functions_round_trips():
    model = scoped_model()
    out = export(G.import_graph(model), model)
    assert interface(out) == interface(model)
    assert [f.name for f in out.functions] == ["F"]
    feeds = [{"c": np.array(a), "c2": np.array(b), "x": X} for a in (True, False) for b in (True, False)]
    assert_same_outputs(model, out, feeds)


def test_remove_node_detaches_it():
    model = make_model([node("Relu", ["x"], ["a"], name="relu"), node("Neg", ["a"], ["d"], name="dead"),
                        node("Sigmoid", ["a"], ["y"], name="sig")],
                       [vi("x", [3])], [vi("y", [3])])
    graph = G.import_graph(model)
    dead, a, d = by_name(graph, "dead"), tensor(graph, "a"), tensor(graph, "d")
    G.remove_node(graph, dead)
    assert [n.name for n in graph.nodes] == ["relu", "sig"]
    assert list(dead.inputs) == [] and list(dead.outputs) == []
    assert [c.name for c in a.outputs] == ["sig"]
    assert list(d.inputs) == []
    out = export(graph, model)
    assert ops(out) == ["Relu", "Sigmoid"]
    assert_same_outputs(model, out, [{"x": X}])


def test_remove_node_removes_that_node_not_an_equal_looking_one():
    """Two unnamed nodes with the same op and attributes: the one given is the one removed."""
    model = make_model([node("Neg", ["x"], ["a"], name=""), node("Neg", ["x"], ["b"], name=""),
                        node("Add", ["a", "b"], ["y"], name="add")],
                       [vi("x", [3])], [vi("y", [3])])
    graph = G.import_graph(model)
    second = graph.nodes[1]
    b = second.outputs[0]
    G.remove_node(graph, second)
    assert len(graph.nodes) == 2 and graph.nodes[0].outputs[0].name == "a"
    assert list(b.inputs) == []


# ----------------------------------------------------------------- outer_reads

def test_outer_reads_of_if_branches_nested():
    graph = G.import_graph(scoped_model())
    top_if = by_name(graph, "top_if")
    then, els = top_if.attrs["then_branch"], top_if.attrs["else_branch"]
    reads = G.outer_reads(then)
    # p (then_neg), c2 (nested If's condition), q and x (read two levels down); w is a constant; t0, t1, t2, t are local.
    assert sorted(t.name for t in reads) == ["c2", "p", "q", "x"]
    top = graph.tensors()
    assert all(any(t is top[name] for t in reads) for name in ("p", "q", "x", "c2"))  # the outer objects themselves
    assert sorted(t.name for t in G.outer_reads(els)) == ["x"]
    inner = by_name(then, "then_inner_if").attrs["then_branch"]
    assert sorted(t.name for t in G.outer_reads(inner)) == ["q"]


def test_outer_reads_of_loop_body_excludes_body_inputs():
    body = helper.make_graph([node("Add", ["v_in", "xs"], ["v_out"], name="body_add"),
                              node("Mul", ["v_out", "k"], ["scan"], name="body_mul"),
                              node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
                             "body", [vi("i", [], INT64), vi("cond_in", [], BOOL), vi("v_in", [3])],
                             [vi("cond_out", [], BOOL), vi("v_out", [3]), vi("scan", [3])])
    model = make_model([node("Sigmoid", ["x"], ["xs"], name="make_xs"),
                        node("Loop", ["n", "", "x"], ["v", "s"], name="loop", body=body)],
                       [vi("n", [], INT64), vi("x", [3])], [vi("v", [3]), vi("s", [None, 3])],
                       [init("k", [1.0, 2.0, 3.0])])
    graph = G.import_graph(model)
    reads = list(G.outer_reads(by_name(graph, "loop").attrs["body"]))
    assert [t.name for t in reads] == ["xs"]  # i, cond_in, v_in are body inputs; k is a constant
    assert reads[0] is tensor(graph, "xs")


# ----------------------------------------------------------------- sizes

def sized_model() -> onnx.ModelProto:
    """Known sizes: W f32[3,4] (read twice: counted once), shape i64[2], Constant f64[5] (a graph output),
    a then-branch initializer f32[2,2] and a Constant f32[4] inside function G."""
    then = helper.make_graph([node("Neg", ["sub_w"], ["t"], name="then_neg")], "then", [], [vi("t", [2, 2])],
                             initializer=[init("sub_w", [[1.0, 2.0], [3.0, 4.0]])])
    els = helper.make_graph([node("Relu", ["m22"], ["e"], name="else_relu")], "else", [], [vi("e", [2, 2])])
    fn = helper.make_function("custom", "G", ["a"], ["b"],
                              [helper.make_node("Constant", [], ["k4"], name="fn_const",
                                                value=helper.make_tensor("k4v", onnx.TensorProto.FLOAT, [4],
                                                                         [1.0, 2.0, 3.0, 4.0])),
                               helper.make_node("Add", ["a", "k4"], ["b"], name="fn_add")],
                              [helper.make_opsetid(d, v) for d, v in FN_OPSETS.items()])
    return make_model(
        [node("Add", ["x", "W"], ["s"], name="add"),
         node("Mul", ["s", "W"], ["m"], name="mul"),
         node("Reshape", ["m", "shape"], ["r"], name="reshape"),
         node("Constant", [], ["k"], name="const",
              value=helper.make_tensor("kv", onnx.TensorProto.DOUBLE, [5], [0.0, 1.0, 2.0, 3.0, 4.0])),
         node("Slice", ["x", "st", "en"], ["m22"], name="slice"),
         node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=els),
         node("G", ["x"], ["g"], name="call", domain="custom")],
        [vi("c", [], BOOL), vi("x", [3, 4])],
        [vi("r", [4, 3]), vi("k", [5], onnx.TensorProto.DOUBLE), vi("y", [2, 2]), vi("g", [3, 4])],
        [init("W", np.arange(12).reshape(3, 4)), init("shape", [4, 3], np.int64),
         init("st", [0, 0], np.int64), init("en", [2, 2], np.int64)],
        functions=[fn], opsets=FN_OPSETS)


def test_param_count_bytes_and_node_count_on_a_known_model():
    model = sized_model()
    graph = G.import_graph(model)
    # W 12, shape 2, st 2, en 2, Constant k 5, sub_w 4, function Constant 4
    assert G.param_count(graph) == 12 + 2 + 2 + 2 + 5 + 4 + 4
    assert G.param_bytes(graph) == 12 * 4 + 3 * 2 * 8 + 5 * 8 + 4 * 4 + 4 * 4
    assert G.node_count(graph) == 7 + 1 + 1 + 2
    assert len(G.constants(graph)) == 7
    # The model runs, and the sizes match what is in the proto.
    feed = {"c": np.array(True), "x": np.ones((3, 4), np.float32)}
    got = run_model(model, feed)
    np.testing.assert_array_equal(got["k"], np.arange(5, dtype=np.float64))
    np.testing.assert_array_equal(got["y"], -np.array([[1.0, 2.0], [3.0, 4.0]], np.float32))


def test_sizes_count_a_shared_constant_once_and_follow_surgery():
    model = make_model([node("Add", ["x", "w"], ["a"], name="add"), node("Mul", ["a", "w"], ["b"], name="mul"),
                        node("Sub", ["b", "v"], ["y"], name="sub")],
                       [vi("x", [3])], [vi("y", [3])], [init("w", [1.0, 2.0, 3.0]), init("v", [1.0, 1.0, 1.0])])
    graph = G.import_graph(model)
    assert (G.param_count(graph), G.param_bytes(graph), G.node_count(graph)) == (6, 24, 3)
    sub = by_name(graph, "sub")
    graph.outputs[0] = sub.inputs[0]
    graph.outputs[0].name = "y_new"
    G.remove_node(graph, sub)
    assert (G.param_count(graph), G.param_bytes(graph), G.node_count(graph)) == (3, 12, 2)


# ----------------------------------------------------------------- import/export round trip

def rich_model() -> onnx.ModelProto:
    fn = helper.make_function("custom", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                              [helper.make_opsetid(d, v) for d, v in FN_OPSETS.items()])
    model = make_model([node("Twice", ["x"], ["t"], name="call", domain="custom"),
                        node("Mul", ["t", "w"], ["y"], name="mul")],
                       [vi("x", ["batch", 3])], [vi("y", ["batch", 3])], [init("w", [1.0, -2.0, 0.5])],
                       functions=[fn], opsets={"": 17, "custom": 1, "com.microsoft": 1}, ir_version=8)
    model.producer_name, model.producer_version = "unit-tests", "4.2"
    model.domain, model.model_version, model.doc_string = "ai.onnxopt.tests", 7, "a model for round trips"
    for key, value in (("author", "tests"), ("license", "none")):
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    return model


def opsets(model: onnx.ModelProto) -> list[tuple[str, int]]:
    return [(o.domain, o.version) for o in model.opset_import]


def test_import_export_round_trip_keeps_model_fields():
    model = rich_model()
    out = export(G.import_graph(model), model)
    assert out.ir_version == 8
    assert opsets(out) == [("", 17), ("custom", 1), ("com.microsoft", 1)]
    assert (out.producer_name, out.producer_version) == ("unit-tests", "4.2")
    assert (out.domain, out.model_version, out.doc_string) == ("ai.onnxopt.tests", 7, "a model for round trips")
    assert [(p.key, p.value) for p in out.metadata_props] == [("author", "tests"), ("license", "none")]
    assert [(f.domain, f.name) for f in out.functions] == [("custom", "Twice")]
    fn = out.functions[0]
    assert (list(fn.input), list(fn.output)) == (["a"], ["b"])
    assert [(n.op_type, list(n.input), list(n.output)) for n in fn.node] == [("Add", ["a", "a"], ["b"])]
    assert sorted((o.domain, o.version) for o in fn.opset_import) == [("", 17), ("custom", 1)]
    assert interface(out) == interface(model)
    assert [i.name for i in out.graph.initializer] == ["w"]
    feed = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    assert_same_outputs(model, out, [feed])
    np.testing.assert_array_equal(run_model(out, feed)["y"], feed["x"] * 2 * np.array([1.0, -2.0, 0.5], np.float32))


def test_export_twice_does_not_duplicate_fields_and_adds_new_domains():
    model = rich_model()
    graph = G.import_graph(model)
    first = export(graph, model)
    # A node in a domain the original did not import: the domain is added, the others keep their versions.
    G.insert_after(graph, graph.outputs[0], "Neg")
    graph.nodes[-1].domain = "ai.onnx.ml.experimental"
    second = G.export_model(graph, model)
    assert [(p.key, p.value) for p in second.metadata_props] == [(p.key, p.value) for p in first.metadata_props]
    got = dict(opsets(second))
    assert len(got) == len(second.opset_import)
    assert {k: got[k] for k in ("", "custom", "com.microsoft")} == {"": 17, "custom": 1, "com.microsoft": 1}
    assert "ai.onnx.ml.experimental" in got
    assert second.ir_version == 8 and len(second.functions) == 1


def test_outer_initializer_read_only_in_branches_stays_in_the_main_graph():
    """gs would write it into both branches; export puts it back once, so nothing changes."""
    w = numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(2, 2, 1, 1), "w")
    then = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["yt"])], "then", [],
                             [helper.make_tensor_value_info("yt", TensorProto.FLOAT, [1, 2, 3, 3])])
    other = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["ye"])], "else", [],
                              [helper.make_tensor_value_info("ye", TensorProto.FLOAT, [1, 2, 3, 3])])
    model = helper.make_model(helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3])], [w]),
        opset_imports=[helper.make_opsetid("", 17)])
    out = G.export_model(G.import_graph(model), model)
    assert [t.name for t in out.graph.initializer] == ["w"]
    assert all(not a.g.initializer for a in out.graph.node[0].attribute)
    assert out.ByteSize() <= model.ByteSize() + 16


# ----------------------------------------------------------------- large constants on export

def big_constants_model() -> onnx.ModelProto:
    """Large weights everywhere export stubs them: an initializer, a Constant node, an fp16 weight,
    an initializer read only inside an If branch, and a branch-local Constant node."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    h = rng.standard_normal((64, 64)).astype(np.float16)
    inner = rng.standard_normal((64, 64)).astype(np.float32)
    then = helper.make_graph([node("MatMul", ["x", "wb"], ["t0"], name="then_mm"),
                              helper.make_node("Constant", [], ["kc"], value=numpy_helper.from_array(inner, "kc")),
                              node("Add", ["t0", "kc"], ["t"], name="then_add")],
                             "then", [], [vi("t", [64, 64])])
    els = helper.make_graph([node("Identity", ["x"], ["e"], name="else_id")], "else", [], [vi("e", [64, 64])])
    return make_model(
        [node("MatMul", ["x", "w"], ["a"], name="mm"),
         helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(w * 2, "k"), name="const"),
         node("Add", ["a", "k"], ["b"], name="add"),
         node("Cast", ["h"], ["hf"], name="cast", to=TensorProto.FLOAT),
         node("Add", ["b", "hf"], ["y"], name="add_h"),
         node("If", ["c"], ["z"], name="if", then_branch=then, else_branch=els)],
        [vi("x", [64, 64]), vi("c", [], BOOL)], [vi("y", [64, 64]), vi("z", [64, 64])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(h, "h"),
         numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "wb")])


def all_tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    from onnxopt.io import iter_tensors
    return {t.name: numpy_helper.to_array(t) for t in iter_tensors(model.graph)}


def test_export_writes_large_constants_bit_identical_and_leaves_no_stub_marks():
    model = big_constants_model()
    graph = G.import_graph(model)
    out = export(graph, model)
    want, got = all_tensors(model), all_tensors(out)
    assert sorted(got) == sorted(want)
    for name, values in want.items():
        assert got[name].dtype == values.dtype and np.array_equal(got[name], values), name
    from onnxopt.io import iter_tensors
    assert not any(t.doc_string for t in iter_tensors(out.graph))
    assert [t.name for t in out.graph.initializer] == ["w", "h", "wb"]
    # the graph's own constants are untouched by the export
    assert all(isinstance(t._values, (np.ndarray, gs.ir.tensor.LazyValues)) and type(t._values).__name__ != "_Stub"
               for t in G.constants(graph))
    feed = {"x": np.ones((64, 64), np.float32), "c": np.array(True)}
    assert_same_outputs(model, out, [feed])


def test_export_writes_new_numpy_constants_and_a_failed_export_restores_them():
    model = big_constants_model()
    graph = G.import_graph(model)
    w = tensor(graph, "w")
    w.values = np.full((64, 64), 0.5, np.float32)  # a pass's new value, held as numpy
    out = export(graph, model)
    np.testing.assert_array_equal(all_tensors(out)["w"], np.full((64, 64), 0.5, np.float32))
    before = w._values
    graph.nodes.append(gs.Node("Add", inputs=[w, gs.Variable("undefined_dtype_bad")], outputs=[]))
    graph.nodes[-1].attrs["bad"] = object()  # gs cannot export this attribute
    with pytest.raises(Exception):
        G.export_model(graph, model)
    assert w._values is before


def test_const_array_reads_the_proto_once_without_caching():
    model = big_constants_model()
    graph = G.import_graph(model)
    w = tensor(graph, "w")
    values = G.const_array(w)
    np.testing.assert_array_equal(values, numpy_helper.to_array(model.graph.initializer[0]))
    assert not values.flags.writeable  # a view of the proto's bytes: callers copy before writing
    assert isinstance(w._values, gs.ir.tensor.LazyValues)  # not loaded into the tensor
    h = G.const_array(tensor(graph, "h"))
    assert h.dtype == np.float16 and h.shape == (64, 64)
    w.values = np.zeros((2, 2), np.float32)
    assert G.const_array(w) is w._values


# ----------------------------------------------------------------- the value behind a tensor

def test_constant_source_and_const_value_follow_every_form():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    model = make_model(
        [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(w, "kv"), name="c_tensor"),
         helper.make_node("Constant", [], ["f"], value_floats=[1.5, 2.0], name="c_floats"),
         helper.make_node("Constant", [], ["i"], value_int=7, name="c_int"),
         helper.make_node("Constant", [], ["s"], value_string="x", name="c_str"),
         node("Identity", ["k"], ["k1"], name="id1"), node("Identity", ["k1"], ["k2"], name="id2"),
         node("Add", ["x", "k2"], ["a"], name="add"), node("Mul", ["a", "w"], ["b"], name="mul"),
         node("Sub", ["b", "d"], ["y"], name="sub")],
        [vi("x", [2, 3])], [vi("y", [2, 3])], [init("w", w), init("d", w)])
    model.graph.input.append(helper.make_tensor_value_info("d", TensorProto.FLOAT, [2, 3]))
    graph = G.import_graph(model)
    overridable = vars(graph)["initializer_inputs"]
    assert overridable == ["d"]
    t = graph.tensors()
    np.testing.assert_array_equal(G.const_value(t["w"]), w)
    np.testing.assert_array_equal(G.const_value(t["k2"]), w)  # Constant node through two Identity nodes
    assert isinstance(G.constant_source(t["k2"]), gs.Constant)
    f, i = G.const_value(t["f"]), G.const_value(t["i"])
    assert f.dtype == np.float32 and f.tolist() == [1.5, 2.0]
    assert i.dtype == np.int64 and i.shape == () and int(i) == 7
    assert G.const_value(t["s"]) is None                      # strings are not read
    assert G.const_value(t["a"]) is None                      # computed
    assert G.const_value(t["x"]) is None                      # graph input
    assert G.const_value(t["d"], overridable) is None         # may be fed at run time
    np.testing.assert_array_equal(G.const_value(t["d"]), w)
    assert G.const_value(t["w"], max_elems=5) is None


# ----------------------------------------------------------------- value_info as exporters write it

def shapeless_value_info(name: str, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    entry = onnx.ValueInfoProto(name=name)
    entry.type.tensor_type.elem_type = dtype
    return entry


def test_value_info_without_shape_does_not_hide_the_declared_output_shape():
    """An older exporter lists every value in value_info with its type only, graph outputs
    included. The declared inputs and outputs keep their shapes through import and export,
    in every scope, so the model still passes the checker."""
    branch = helper.make_graph([helper.make_node("Neg", ["t"], ["bt"])], "then", [],
                               [helper.make_tensor_value_info("bt", TensorProto.FLOAT, [3])])
    branch.value_info.append(shapeless_value_info("bt"))
    other = helper.make_graph([helper.make_node("Identity", ["t"], ["be"])], "else", [],
                              [helper.make_tensor_value_info("be", TensorProto.FLOAT, [3])])
    model = make_model([node("Mul", ["x", "w"], ["t"]), node("If", ["c"], ["y"], then_branch=branch, else_branch=other)],
                       [vi("x", [3]), vi("c", [], BOOL)], [vi("y", [3])], [init("w", [1.0, 2.0, 3.0])])
    model.graph.value_info.extend([shapeless_value_info("t"), shapeless_value_info("y"), shapeless_value_info("x")])
    onnx.checker.check_model(model, full_check=True)

    graph = G.import_graph(model)
    assert (graph.inputs[0].shape, graph.outputs[0].shape) == ([3], [3])
    assert graph.nodes[1].attrs["then_branch"].outputs[0].shape == [3]
    out = export(graph, model)
    assert interface(out) == interface(model)
    assert [v.name for v in out.graph.value_info] == ["t"]  # the repeats of x and y are dropped
    for cond in (True, False):
        assert_same_outputs(model, out, [{"x": X, "c": np.array(cond)}])


def test_export_drops_value_info_that_onnxruntime_would_reject():
    """A value whose shape is known but not its type (a pass that set only a shape) would be
    written with element type 0, which ONNX Runtime refuses; entries without a type say nothing."""
    model = make_model([node("Relu", ["x"], ["r"]), node("Neg", ["r"], ["y"])], [vi("x", [3])], [vi("y", [3])])
    model.graph.value_info.append(onnx.ValueInfoProto(name="r"))
    graph = G.import_graph(model)
    tensor(graph, "r").dtype, tensor(graph, "r").shape = None, [3]
    out = export(graph, model)
    assert list(out.graph.value_info) == []
    np.testing.assert_array_equal(run_model(out, {"x": X})["y"], -np.maximum(X, 0))


@pytest.mark.parametrize("ir_version", [3, 8])
def test_a_constant_both_branches_read_is_written_once_in_the_main_graph(ir_version):
    """A pass may give both If branches one constant (dedup does); gs would write it into each
    branch. Export writes it once, in the main graph (before IR 4, listed as an input too)."""
    two = numpy_helper.from_array(np.full(3, 2.0, np.float32))
    then = helper.make_graph([helper.make_node("Constant", [], ["a"], value=two),
                              helper.make_node("Add", ["x", "a"], ["yt"])], "then", [],
                             [helper.make_tensor_value_info("yt", TensorProto.FLOAT, [3])])
    other = helper.make_graph([helper.make_node("Constant", [], ["b"], value=two),
                               helper.make_node("Mul", ["x", "b"], ["ye"])], "else", [],
                              [helper.make_tensor_value_info("ye", TensorProto.FLOAT, [3])])
    inputs = [vi("x", [3]), vi("c", [], BOOL)]
    model = make_model([node("If", ["c"], ["y"], then_branch=then, else_branch=other)], inputs, [vi("y", [3])],
                       ir_version=ir_version, opsets={"": 11})
    graph = G.import_graph(model)
    shared = gs.Constant("shared", np.full(3, 2.0, np.float32))
    for sub in G.subgraphs_of(graph.nodes[0]):
        sub.nodes = sub.nodes[1:]
        sub.nodes[0].inputs[1] = shared
    out = export(graph, model)
    assert [t.name for t in out.graph.initializer] == ["shared"]
    assert all(len(attr.g.initializer) == 0 for attr in out.graph.node[0].attribute)
    assert ("shared" in [i.name for i in out.graph.input]) == (ir_version < 4)
    for cond, expected in ((True, X + 2), (False, X * 2)):
        np.testing.assert_array_equal(run_model(out, {"x": X, "c": np.array(cond)})["y"], expected)
