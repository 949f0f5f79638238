"""The ``shape_fold`` pass: shape computations resolved over symbolic dims.

Every rewriting case runs the pass on a hand-built graph and then the original and the
result in ONNX Runtime at several sizes of the symbolic dims; outputs must be bitwise
identical (the pass moves no float arithmetic). Negative cases assert what stays.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from helpers import INT64, assert_same_outputs, init, interface, make_model, node, ops, random_feed, run_model, \
    run_pass_direct, vi
from onnxopt import graph as G
from onnxopt.pipeline import PassContext, get_pass


def feeds(model, sizes):
    return [random_feed(model, seed=i, dims=dims) for i, dims in enumerate(sizes)]


SIZES = [{"batch": 1, "seq": 3}, {"batch": 2, "seq": 5}]


def _dim_chain(src: str, axis: int, tag: str) -> list:
    """Gather(Shape(src), axis) -> Unsqueeze: one element of a shape, 1-D."""
    return [node("Shape", [src], [f"{tag}_shape"]),
            node("Gather", [f"{tag}_shape", f"{tag}_i"], [f"{tag}_g"], axis=0),
            node("Unsqueeze", [f"{tag}_g", "axes0"], [f"{tag}_u"])]


def attention_reshape():
    """x [batch, seq, 768] -> Reshape(x, Concat(batch, seq, [12], [64])) -> Transpose."""
    nodes = [*_dim_chain("x", 0, "b"), *_dim_chain("x", 1, "s"),
             node("Concat", ["b_u", "s_u", "heads", "head_dim"], ["target"], axis=0),
             node("Reshape", ["x", "target"], ["r"]),
             node("Transpose", ["r"], ["y"], perm=[0, 2, 1, 3])]
    inits = [init("b_i", 0, np.int64), init("s_i", 1, np.int64), init("axes0", [0], np.int64),
             init("heads", [12], np.int64), init("head_dim", [64], np.int64)]
    return make_model(nodes, [vi("x", ["batch", "seq", 768])], [vi("y", ["batch", 12, "seq", 64])], inits)


def test_reshape_target_from_symbolic_dims_becomes_copy_dims():
    model = attention_reshape()
    out, result = run_pass_direct(model, "shape_fold")
    assert result.stats["reshapes_resolved"] == 1 and result.stats["skipped_no_inference"] == 0
    reshape = next(n for n in out.graph.node if n.op_type == "Reshape")
    target = next(t for t in out.graph.initializer if t.name == reshape.input[1])
    assert helper.tensor_dtype_to_np_dtype(target.data_type) == np.int64
    assert numpy_helper.to_array(target).tolist() == [0, 0, 12, 64]
    assert_same_outputs(model, out, feeds(model, SIZES))


def test_cleanup_removes_the_whole_shape_chain():
    model = attention_reshape()
    result = onnxopt.optimize(model, "cleanup", inputs=feeds(model, SIZES[1:])[0])
    assert result.passed
    assert ops(result.model) == ["Reshape", "Transpose"]
    assert interface(result.model) == interface(model)
    assert_same_outputs(model, result.model, feeds(model, SIZES))


def test_product_of_symbolic_dims_becomes_the_one_inferred_element():
    # y [batch, seq, 4, 8] -> Reshape(y, Concat(batch*seq, [32])): batch*seq is left to -1.
    nodes = [node("Shape", ["y"], ["sh"]),
             node("Gather", ["sh", "i0"], ["b"], axis=0), node("Gather", ["sh", "i1"], ["s"], axis=0),
             node("Mul", ["b", "s"], ["bs"]), node("Unsqueeze", ["bs", "axes0"], ["bs_u"]),
             node("Concat", ["bs_u", "c32"], ["target"], axis=0),
             node("Reshape", ["y", "target"], ["z"])]
    inits = [init("i0", 0, np.int64), init("i1", 1, np.int64), init("axes0", [0], np.int64),
             init("c32", [32], np.int64)]
    model = make_model(nodes, [vi("y", ["batch", "seq", 4, 8])], [vi("z", [None, 32])], inits)
    out, result = run_pass_direct(model, "shape_fold")
    assert result.stats["reshapes_resolved"] == 1
    result = onnxopt.optimize(model, "cleanup", inputs=feeds(model, SIZES[1:])[0])
    assert ops(result.model) == ["Reshape"]
    assert_same_outputs(model, result.model, feeds(model, SIZES))


def test_shape_of_known_dims_becomes_a_constant():
    # Expand(c, Shape(x)[1:]) with x [batch, 3, 4]: the dims read are known.
    nodes = [node("Shape", ["x"], ["sh"]), node("Slice", ["sh", "one", "three"], ["tail"]),
             node("Expand", ["c", "tail"], ["e"]), node("Add", ["x", "e"], ["y"])]
    inits = [init("one", [1], np.int64), init("three", [3], np.int64), init("c", [[1.5]], np.float32)]
    model = make_model(nodes, [vi("x", ["batch", 3, 4])], [vi("y", ["batch", 3, 4])], inits)
    out, result = run_pass_direct(model, "shape_fold")
    assert result.stats["values_folded"] == 1
    expand = next(n for n in out.graph.node if n.op_type == "Expand")
    assert numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == expand.input[1])).tolist() == [3, 4]
    result = onnxopt.optimize(model, "cleanup", inputs=feeds(model, SIZES[1:])[0])
    assert "Shape" not in ops(result.model) and "Slice" not in ops(result.model)
    assert_same_outputs(model, result.model, feeds(model, SIZES))


def test_transpose_of_size_one_dims_becomes_reshape():
    nodes = [node("Transpose", ["x"], ["t"], perm=[1, 0, 2]), node("Relu", ["t"], ["y"])]
    model = make_model(nodes, [vi("x", ["batch", 1, 8])], [vi("y", [1, "batch", 8])])
    out, result = run_pass_direct(model, "shape_fold")
    assert result.stats["transposes_to_reshape"] == 1
    assert ops(out) == ["Reshape", "Relu"]
    assert_same_outputs(model, out, feeds(model, SIZES))


def test_transpose_that_moves_data_stays():
    nodes = [node("Transpose", ["x"], ["y"], perm=[0, 2, 1])]
    model = make_model(nodes, [vi("x", ["batch", 2, 8])], [vi("y", ["batch", 8, 2])])
    out, result = run_pass_direct(model, "shape_fold")
    assert result.stats["transposes_to_reshape"] == 0 and ops(out) == ["Transpose"]


def test_two_unknown_elements_leave_the_reshape_alone():
    # Reshape to [seq, batch, 4]: neither symbolic element copies its own position.
    nodes = [*_dim_chain("x", 1, "s"), *_dim_chain("x", 0, "b"),
             node("Concat", ["s_u", "b_u", "four"], ["target"], axis=0),
             node("Reshape", ["x", "target"], ["y"])]
    inits = [init("s_i", 1, np.int64), init("b_i", 0, np.int64), init("axes0", [0], np.int64),
             init("four", [4], np.int64)]
    model = make_model(nodes, [vi("x", ["batch", "seq", 4])], [vi("y", ["seq", "batch", 4])], inits)
    out, result = run_pass_direct(model, "shape_fold")
    assert result.stats["reshapes_unresolved"] == 1 and result.stats["reshapes_resolved"] == 0
    assert ops(out) == ops(model)
    assert_same_outputs(model, out, feeds(model, SIZES))


def test_allowzero_reshape_gets_no_copy_dims():
    nodes = [*_dim_chain("x", 0, "b"), *_dim_chain("x", 1, "s"),
             node("Concat", ["b_u", "s_u", "four"], ["target"], axis=0),
             node("Reshape", ["x", "target"], ["y"], allowzero=1)]
    inits = [init("b_i", 0, np.int64), init("s_i", 1, np.int64), init("axes0", [0], np.int64),
             init("four", [4], np.int64)]
    model = make_model(nodes, [vi("x", ["batch", "seq", 4])], [vi("y", ["batch", "seq", 4])], inits)
    out, result = run_pass_direct(model, "shape_fold")
    assert result.stats["reshapes_unresolved"] == 1 and ops(out) == ops(model)


def tf2onnx_lstm():
    """x [batch, seq, 4] -> Transpose -> LSTM(initial states ConstantOfShape(0) sized from the batch)
    -> Squeeze(num_directions) -> Transpose back: the scaffolding tf2onnx writes."""
    hidden = 3
    rng = np.random.default_rng(0)
    nodes = [node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
             node("Shape", ["xt"], ["sh"]), node("Gather", ["sh", "one"], ["b"], axis=0),
             node("Unsqueeze", ["b", "axes0"], ["b_u"]),
             node("Concat", ["dirs", "b_u", "hid"], ["state_shape"], axis=0),
             node("ConstantOfShape", ["state_shape"], ["zeros"],
                  value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
             node("LSTM", ["xt", "W", "R", "B", "", "zeros", "zeros"], ["Y", "Y_h", "Y_c"], hidden_size=hidden),
             node("Squeeze", ["Y", "axes1"], ["ys"]),
             node("Transpose", ["ys"], ["y"], perm=[1, 0, 2])]
    inits = [init("one", 1, np.int64), init("axes0", [0], np.int64), init("axes1", [1], np.int64),
             init("dirs", [1], np.int64), init("hid", [hidden], np.int64),
             init("W", rng.standard_normal((1, 4 * hidden, 4)) * 0.5),
             init("R", rng.standard_normal((1, 4 * hidden, hidden)) * 0.5),
             init("B", rng.standard_normal((1, 8 * hidden)) * 0.1)]
    return make_model(nodes, [vi("x", ["batch", "seq", 4])], [vi("y", ["batch", "seq", hidden])], inits)


def test_zero_initial_states_of_an_lstm_are_dropped():
    model = tf2onnx_lstm()
    out, result = run_pass_direct(model, "shape_fold")
    assert result.stats["rnn_states_dropped"] == 2
    lstm = next(n for n in out.graph.node if n.op_type == "LSTM")
    assert list(lstm.input) == ["xt", "W", "R", "B"]
    result = onnxopt.optimize(model, "cleanup", inputs=feeds(model, SIZES[1:])[0])
    assert result.passed
    assert ops(result.model) == ["Transpose", "LSTM", "Squeeze", "Transpose"]
    assert_same_outputs(model, result.model, feeds(model, SIZES))


def test_nonzero_initial_state_stays():
    model = tf2onnx_lstm()
    fill = next(n for n in model.graph.node if n.op_type == "ConstantOfShape")
    fill.attribute[0].t.CopyFrom(helper.make_tensor("v", TensorProto.FLOAT, [1], [0.25]))
    out, result = run_pass_direct(model, "shape_fold")
    assert result.stats["rnn_states_dropped"] == 0
    assert "ConstantOfShape" in ops(out)
    assert_same_outputs(model, out, feeds(model, SIZES))


def test_unknown_op_means_no_inference_and_no_change():
    nodes = [node("Shape", ["x"], ["sh"]), node("Mystery", ["x", "sh"], ["y"], domain="custom.ops")]
    model = make_model(nodes, [vi("x", ["batch", 3])], [vi("y", None)],
                       opsets={"": 17, "custom.ops": 1}, check=False)
    graph_ops = ops(model)
    graph = G.import_graph(model)
    result = get_pass("shape_fold")().run(graph, PassContext())
    assert not result.modified
    assert [n.op for n in graph.nodes] == graph_ops


def test_large_weights_before_the_chain_are_read_as_shapes_only():
    # The Mul's weight (1.2 kB) is exported to inference without its data.
    nodes = [node("Mul", ["x", "w"], ["m"]), *_dim_chain("m", 0, "b"),
             node("Concat", ["b_u", "c30", "c10"], ["target"], axis=0),
             node("Reshape", ["m", "target"], ["y"])]
    inits = [init("w", np.linspace(-1, 1, 300)), init("b_i", 0, np.int64), init("axes0", [0], np.int64),
             init("c30", [30], np.int64), init("c10", [10], np.int64)]
    model = make_model(nodes, [vi("x", ["batch", 300])], [vi("y", ["batch", 30, 10])], inits)
    out, result = run_pass_direct(model, "shape_fold")
    assert result.stats["reshapes_resolved"] == 1 and result.stats["skipped_no_inference"] == 0
    assert_same_outputs(model, out, feeds(model, SIZES))


def test_overridable_initializer_is_not_taken_as_fixed():
    # k is an initializer also listed as a graph input: a caller may feed another value.
    nodes = [node("Concat", ["k", "two"], ["target"], axis=0), node("Expand", ["c", "target"], ["y"])]
    inits = [init("k", [3], np.int64), init("two", [2], np.int64), init("c", [1.0])]
    model = make_model(nodes, [vi("k", [1], INT64)], [vi("y", [None, None])], inits)
    out, result = run_pass_direct(model, "shape_fold")
    assert result.stats["values_folded"] == 0
    assert_same_outputs(model, out, [{"k": np.array([4], np.int64)}])


def test_dims_carry_through_resize_by_integer_scales():
    # The batch read from x must be known to equal the batch of Resize's output.
    nodes = [node("Resize", ["x", "", "scales"], ["r"], mode="nearest"), *_dim_chain("x", 0, "b"),
             node("Concat", ["b_u", "three", "rest"], ["target"], axis=0),
             node("Reshape", ["r", "target"], ["y"])]
    inits = [init("scales", [1, 1, 2, 2]), init("b_i", 0, np.int64), init("axes0", [0], np.int64),
             init("three", [3], np.int64), init("rest", [-1], np.int64)]
    model = make_model(nodes, [vi("x", ["batch", 3, "h", "w"])], [vi("y", ["batch", 3, None])], inits)
    out, result = run_pass_direct(model, "shape_fold")
    assert result.stats["reshapes_resolved"] == 1
    reshape = next(n for n in out.graph.node if n.op_type == "Reshape")
    target = next(t for t in out.graph.initializer if t.name == reshape.input[1])
    assert numpy_helper.to_array(target).tolist() == [0, 3, -1]
    assert_same_outputs(model, out, feeds(model, [{"batch": 1, "h": 2, "w": 3}, {"batch": 2, "h": 4, "w": 1}]))


def test_zeros_expanded_to_the_state_shape_are_dropped():
    model = tf2onnx_lstm()
    fill = next(n for n in model.graph.node if n.op_type == "ConstantOfShape")
    fill.CopyFrom(node("Expand", ["zero", "state_shape"], ["zeros"]))
    model.graph.initializer.append(init("zero", [0.0]))
    out, result = run_pass_direct(model, "shape_fold")
    assert result.stats["rnn_states_dropped"] == 2
    assert_same_outputs(model, out, feeds(model, SIZES))


def test_dims_named_question_mark_are_not_taken_as_equal():
    # a [?, 4] and b [?, 6]: Reshape(b, [a's dim 0, -1]) must not become [0, -1] (b's own dim 0).
    nodes = [*_dim_chain("a", 0, "n"), node("Concat", ["n_u", "rest"], ["target"], axis=0),
             node("Reshape", ["b", "target"], ["y"])]
    inits = [init("n_i", 0, np.int64), init("axes0", [0], np.int64), init("rest", [-1], np.int64)]
    model = make_model(nodes, [vi("a", ["?", 4]), vi("b", ["?", 6])], [vi("y", [None, None])], inits)
    out, result = run_pass_direct(model, "shape_fold")
    assert result.stats["reshapes_unresolved"] == 1 and result.stats["reshapes_resolved"] == 0
    feed = {"a": np.zeros((3, 4), np.float32), "b": np.arange(24, dtype=np.float32).reshape(4, 6)}
    assert run_model(out, feed)["y"].shape == (3, 8)
    assert_same_outputs(model, out, [feed])


def test_zeros_unsqueezed_and_concatenated_per_direction_are_dropped():
    # tf2onnx's bidirectional state: Concat(Unsqueeze(Expand(0, [batch, hidden])) twice).
    model = tf2onnx_lstm()
    lstm = next(n for n in model.graph.node if n.op_type == "LSTM")
    fill = next(n for n in model.graph.node if n.op_type == "ConstantOfShape")
    fill.CopyFrom(node("Expand", ["zero", "state_shape"], ["zeros3"]))
    model.graph.node.insert(list(model.graph.node).index(lstm),
                            node("Concat", ["zeros3"], ["zeros"], axis=0))
    model.graph.initializer.append(init("zero", [0.0]))
    out, result = run_pass_direct(model, "shape_fold")
    assert result.stats["rnn_states_dropped"] == 2
    assert_same_outputs(model, out, feeds(model, SIZES))


def test_equal_of_two_symbols_is_not_taken_as_false():
    # Where(Equal(batch, seq), [7], [9]) depends on the run; it must not fold to [9].
    nodes = [*_dim_chain("x", 0, "b"), *_dim_chain("x", 1, "s"), node("Equal", ["b_u", "s_u"], ["eq"]),
             node("Where", ["eq", "seven", "nine"], ["n"]), node("Expand", ["c", "n"], ["y"])]
    inits = [init("b_i", 0, np.int64), init("s_i", 1, np.int64), init("axes0", [0], np.int64),
             init("seven", [7], np.int64), init("nine", [9], np.int64), init("c", [1.0])]
    model = make_model(nodes, [vi("x", ["batch", "seq"])], [vi("y", [None])], inits)
    out, result = run_pass_direct(model, "shape_fold")
    assert result.stats["values_folded"] == 0
    assert_same_outputs(model, out, feeds(model, [{"batch": 2, "seq": 2}, {"batch": 2, "seq": 3}]))


def test_if_on_a_known_dim_becomes_the_branch_it_takes():
    # torch exports rank and size checks as If(Equal(Gather(Shape(x), 1), 3)).
    then_g = helper.make_graph([node("Relu", ["x"], ["a"])], "then", [], [vi("a", None)])
    else_g = helper.make_graph([node("Neg", ["x"], ["b"])], "else", [], [vi("b", None)])
    nodes = [node("Shape", ["x"], ["sh"]), node("Gather", ["sh", "one"], ["width"], axis=0),
             node("Equal", ["width", "three"], ["cond"]),
             node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    inits = [init("one", 1, np.int64), init("three", 3, np.int64)]
    model = make_model(nodes, [vi("x", ["batch", 3])], [vi("y", ["batch", 3])], inits)
    out, result = run_pass_direct(model, "shape_fold")
    assert result.stats["ifs_inlined"] == 1
    assert "If" not in ops(out) and "Relu" in ops(out)
    result = onnxopt.optimize(model, "cleanup", inputs=feeds(model, SIZES[1:])[0])
    assert result.passed and ops(result.model) == ["Relu"]
    assert interface(result.model) == interface(model)
    assert_same_outputs(model, result.model, feeds(model, [{"batch": 1}, {"batch": 4}]))


def _branch_with_dim_check(tag: str, axis: int, size: str) -> onnx.GraphProto:
    """A branch holding If(Equal(Gather(Shape(x), axis), size)): Relu(x) when equal, else Neg(x)."""
    then_g = helper.make_graph([node("Relu", ["x"], [f"{tag}_a"])], f"{tag}_then", [], [vi(f"{tag}_a", None)])
    else_g = helper.make_graph([node("Neg", ["x"], [f"{tag}_b"])], f"{tag}_else", [], [vi(f"{tag}_b", None)])
    nodes = [node("Shape", ["x"], [f"{tag}_sh"]), node("Gather", [f"{tag}_sh", f"axis{axis}"], [f"{tag}_d"], axis=0),
             node("Equal", [f"{tag}_d", size], [f"{tag}_cond"]),
             node("If", [f"{tag}_cond"], [f"{tag}_y"], then_branch=then_g, else_branch=else_g)]
    return helper.make_graph(nodes, tag, [], [vi(f"{tag}_y", None)])


def test_if_inside_a_branch_on_a_known_dim_becomes_the_branch_it_takes():
    # Exporters nest size checks inside the branches of an If on a runtime flag; each branch
    # is folded with what inference knew in it. The check on the batch dim must stay.
    nodes = [node("If", ["flag"], ["y"], then_branch=_branch_with_dim_check("t", 1, "three"),
                  else_branch=_branch_with_dim_check("e", 0, "one"))]
    inits = [init("axis0", 0, np.int64), init("axis1", 1, np.int64), init("three", 3, np.int64),
             init("one", 1, np.int64)]
    model = make_model(nodes, [vi("x", ["batch", 3]), vi("flag", [], TensorProto.BOOL)], [vi("y", ["batch", 3])], inits)
    out, result = run_pass_direct(model, "shape_fold")
    assert result.stats["ifs_inlined"] == 1
    outer = out.graph.node[0]
    then_g = next(a.g for a in outer.attribute if a.name == "then_branch")
    else_g = next(a.g for a in outer.attribute if a.name == "else_branch")
    assert "If" not in ops(then_g) and "Relu" in ops(then_g)
    assert "If" in ops(else_g)
    rng = np.random.default_rng(0)
    runs = [{"x": rng.standard_normal((batch, 3)).astype(np.float32), "flag": np.array(flag)}
            for batch in (1, 4) for flag in (True, False)]
    assert_same_outputs(model, out, runs)


def test_branch_not_taken_is_not_rewritten_with_the_taken_ones_knowledge():
    # With a known condition, inference analyses the branch taken in place of the other;
    # the other's values (same names, other ops) must not be folded with what it found.
    def branch(tag: str, axis: str) -> onnx.GraphProto:
        nodes = [node("Shape", ["x"], ["sh"], name=f"{tag}_sh"),
                 node("Gather", ["sh", axis], ["v"], name=f"{tag}_v", axis=0),
                 node("Unsqueeze", ["v", "axes0"], ["vu"], name=f"{tag}_vu"),
                 node("Expand", ["c", "vu"], [f"{tag}_y"])]
        return helper.make_graph(nodes, tag, [], [vi(f"{tag}_y", None)])

    nodes = [node("Shape", ["x"], ["xs"]), node("Gather", ["xs", "axis1"], ["width"], axis=0),
             node("Equal", ["width", "three"], ["cond"]),
             node("If", ["cond"], ["y"], then_branch=branch("t", "axis1"), else_branch=branch("e", "axis0"))]
    inits = [init("axis0", 0, np.int64), init("axis1", 1, np.int64), init("three", 3, np.int64),
             init("axes0", [0], np.int64), init("c", [1.0])]
    model = make_model(nodes, [vi("x", ["batch", 3])], [vi("y", [None])], inits)
    out, result = run_pass_direct(model, "shape_fold", if_branches=False)
    outer = next(n for n in out.graph.node if n.op_type == "If")
    else_g = next(a.g for a in outer.attribute if a.name == "else_branch")
    then_g = next(a.g for a in outer.attribute if a.name == "then_branch")
    assert else_g.node[-1].input[1] == "vu" and not else_g.initializer  # v is the batch dim there
    target = next(t for t in then_g.initializer if t.name == then_g.node[-1].input[1])
    assert numpy_helper.to_array(target).tolist() == [3]  # v is 3 there
    rng = np.random.default_rng(0)
    assert_same_outputs(model, out, [{"x": rng.standard_normal((b, 3)).astype(np.float32)} for b in (1, 4)])
