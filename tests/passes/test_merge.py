"""The ``merge`` pass: sibling MatMul/Gemm, MatMul + bias Add into Gemm, Slice of Slice.

Each rewrite runs the original and the result in ONNX Runtime on the same inputs. Slice
merging moves no arithmetic (bitwise identical); MatMul/Gemm merges may reorder float
accumulation and are compared within float rounding.
"""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

import onnxopt
from helpers import assert_same_outputs, init, interface, make_model, node, ops, random_feed, run_model, \
    run_pass_direct, vi

SIZES = [{"batch": 1, "seq": 3}, {"batch": 2, "seq": 5}]


def assert_close(reference, candidate, sizes=SIZES):
    for i, dims in enumerate(sizes):
        feed = random_feed(reference, seed=i, dims=dims)
        ref, got = run_model(reference, feed), run_model(candidate, feed)
        assert list(ref) == list(got)
        for name in ref:
            assert ref[name].shape == got[name].shape
            np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-5)


def qkv(hidden=8, bias=True, widths=(8, 8, 8)):
    rng = np.random.default_rng(0)
    nodes, inits, outs = [], [], []
    for i, width in enumerate(widths):
        inits.append(init(f"w{i}", rng.standard_normal((hidden, width))))
        last = f"m{i}"
        nodes.append(node("MatMul", ["x", f"w{i}"], [last]))
        if bias:
            inits.append(init(f"b{i}", rng.standard_normal(width)))
            nodes.append(node("Add", [last, f"b{i}"], [f"y{i}"]))
            last = f"y{i}"
        nodes.append(node("Relu", [last], [f"out{i}"]))
        outs.append(vi(f"out{i}", ["batch", "seq", width]))
    return make_model(nodes, [vi("x", ["batch", "seq", hidden])], outs, inits)


def test_qkv_siblings_merge_into_one_matmul_add_and_split():
    model = qkv(widths=(8, 8, 4))
    out, result = run_pass_direct(model, "merge", siblings=True)
    assert result.stats["sibling_groups"] == 1 and result.stats["sibling_nodes"] == 3
    result = onnxopt.optimize(model, "merge(siblings=true)", inputs=random_feed(model, dims=SIZES[1]))
    assert result.passed
    assert ops(result.model) == ["MatMul", "Add", "Split", "Relu", "Relu", "Relu"]
    split = next(n for n in result.model.graph.node if n.op_type == "Split")
    sizes = next(t for t in result.model.graph.initializer if t.name == split.input[1])
    assert numpy_helper.to_array(sizes).tolist() == [8, 8, 4]
    assert interface(result.model) == interface(model)
    assert_close(model, result.model)


def test_siblings_without_bias_merge_into_matmul_and_split():
    model = qkv(bias=False)
    out, result = run_pass_direct(model, "merge", siblings=True)
    assert ops(out)[:2] == ["MatMul", "Split"] and ops(out).count("MatMul") == 1
    assert_close(model, out)


def test_siblings_stay_apart_by_default():
    model = qkv()
    out, result = run_pass_direct(model, "merge")
    assert result.stats["sibling_groups"] == 0 and ops(out).count("MatMul") == 3


def test_weight_read_twice_is_not_merged():
    model = qkv(bias=False)
    model.graph.node.append(node("Relu", ["w0"], ["wr"]))
    model.graph.output.append(vi("wr", [8, 8]))
    out, result = run_pass_direct(model, "merge", siblings=True)
    # w0 has two readers: only the other two MatMuls merge (weights are moved, never copied).
    assert result.stats["sibling_nodes"] == 2 and ops(out).count("MatMul") == 2
    assert_close(model, out)


def test_gemm_siblings_with_transposed_weights_and_bias():
    rng = np.random.default_rng(1)
    nodes = [node("Gemm", ["x", f"w{i}", f"b{i}"], [f"y{i}"], transB=1) for i in range(3)]
    inits = [init(f"w{i}", rng.standard_normal((5, 6))) for i in range(3)]
    inits += [init(f"b{i}", rng.standard_normal(5)) for i in range(3)]
    model = make_model(nodes, [vi("x", ["batch", 6])], [vi(f"y{i}", ["batch", 5]) for i in range(3)], inits)
    out, result = run_pass_direct(model, "merge", siblings=True)
    assert result.stats["sibling_groups"] == 1 and ops(out) == ["Gemm", "Split"]
    assert_close(model, out, [{"batch": 1}, {"batch": 4}])


def test_2d_matmul_and_bias_add_become_gemm():
    rng = np.random.default_rng(2)
    nodes = [node("Reshape", ["x", "flat"], ["f"]), node("MatMul", ["f", "w"], ["m"]),
             node("Add", ["bias", "m"], ["y"])]
    inits = [init("flat", [0, -1], np.int64), init("w", rng.standard_normal((12, 5))),
             init("bias", rng.standard_normal(5))]
    model = make_model(nodes, [vi("x", ["batch", 3, 4])], [vi("y", ["batch", 5])], inits)
    out, result = run_pass_direct(model, "merge")
    assert result.stats["gemms_made"] == 1 and ops(out) == ["Reshape", "Gemm"]
    assert_close(model, out, [{"batch": 1}, {"batch": 3}])


def test_3d_matmul_and_add_stay():
    model = qkv(widths=(8,))
    out, result = run_pass_direct(model, "merge")
    assert result.stats["gemms_made"] == 0 and ops(out) == ["MatMul", "Add", "Relu"]


def focus():
    """YOLOX's space-to-depth: x[..., ::2, ::2] and friends, each as a Slice of a Slice."""
    big = np.iinfo(np.int64).max
    nodes, outs = [], []
    for r in (0, 1):
        nodes.append(node("Slice", ["x", f"s{r}", "end", "ax2", "two"], [f"rows{r}"]))
        for c in (0, 1):
            nodes.append(node("Slice", [f"rows{r}", f"s{c}", "end", "ax3", "two"], [f"p{r}{c}"]))
            outs.append(f"p{r}{c}")
    nodes.append(node("Concat", outs, ["y"], axis=1))
    inits = [init("s0", [0], np.int64), init("s1", [1], np.int64), init("end", [big], np.int64),
             init("ax2", [2], np.int64), init("ax3", [3], np.int64), init("two", [2], np.int64)]
    return make_model(nodes, [vi("x", ["batch", 3, 8, 8])], [vi("y", ["batch", 12, 4, 4])], inits)


def test_slice_of_slice_along_other_axes_becomes_one_slice():
    model = focus()
    result = onnxopt.optimize(model, "merge", inputs=random_feed(model, dims={"batch": 2}))
    assert result.passed
    assert ops(result.model) == ["Slice"] * 4 + ["Concat"]
    assert_same_outputs(model, result.model, [random_feed(model, seed=i, dims={"batch": i + 1}) for i in range(2)])


def test_slices_along_the_same_axis_stay():
    nodes = [node("Slice", ["x", "one", "big"], ["a"]), node("Slice", ["a", "one", "big"], ["y"])]
    inits = [init("one", [1], np.int64), init("big", [100], np.int64)]
    model = make_model(nodes, [vi("x", [6])], [vi("y", [4])], inits)
    out, result = run_pass_direct(model, "merge")
    assert result.stats["slices_merged"] == 0 and ops(out) == ["Slice", "Slice"]


def test_matmul_of_a_2d_graph_input_becomes_gemm_but_declared_intermediate_ranks_are_not_trusted():
    rng = np.random.default_rng(3)
    nodes = [node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "bias"], ["h"]),
             node("Relu", ["h"], ["r"]), node("MatMul", ["r", "w2"], ["m2"]), node("Add", ["m2", "bias2"], ["y"])]
    inits = [init("w", rng.standard_normal((6, 5))), init("bias", rng.standard_normal(5)),
             init("w2", rng.standard_normal((5, 4))), init("bias2", rng.standard_normal(4))]
    model = make_model(nodes, [vi("x", ["batch", 6])], [vi("y", ["batch", 4])], inits)
    model.graph.value_info.append(vi("r", ["batch", 5]))  # a declared rank: not proof
    out, result = run_pass_direct(model, "merge")
    assert result.stats["gemms_made"] == 1 and ops(out) == ["Gemm", "Relu", "MatMul", "Add"]
    assert_close(model, out, [{"batch": 1}, {"batch": 3}])
