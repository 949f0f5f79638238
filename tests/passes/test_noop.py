"""The ``noop`` pass: operations that do nothing are removed, and only those.

noop is exact: every rewritten model must give bitwise-identical outputs in ONNX
Runtime. Each rewriting case runs through ``onnxopt.optimize`` (pass manager,
contracts, checker, validation in ORT, dce after the pass) and directly through
the pass on an imported graph; both must agree on the stats and the result.
Negative cases assert the graph comes out exactly as it went in.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import onnxopt
from helpers import (BOOL, FLOAT, INT64, all_nodes, assert_same_outputs, init, interface, make_model, node,
                     ops, random_feed, run_model, run_pass_direct, subgraph, vi)
from onnxopt import graph as G
from onnxopt.pipeline import PassContext, get_pass

INT64_MAX = np.iinfo(np.int64).max
STAT_KEYS = ("identity_removed", "dropout_removed", "cast_removed", "reshape_removed", "reshape_chain_collapsed", "unsqueeze_merged",
             "expand_removed", "tile_removed", "transpose_removed", "transpose_merged", "pad_removed",
             "arith_removed", "slice_removed", "concat_removed", "split_removed", "single_input_removed",
             "where_removed", "kept_graph_io", "skipped_unknown_shape", "skipped_unknown_type", "skipped_dropout")


def stats(**changes: int) -> dict:
    assert set(changes) <= set(STAT_KEYS), set(changes) - set(STAT_KEYS)
    return {**{k: 0 for k in STAT_KEYS}, **changes}


def pipeline(**options) -> str:
    return "noop" if not options else "noop(" + ",".join(f"{k}={str(v).lower()}" for k, v in options.items()) + ")"


def noop_both(model: onnx.ModelProto, feeds=None, full_check: bool = True, **options):
    """Run noop through optimize() and directly (then dce); check both agree and match the original in ORT.

    ``full_check=False`` for models whose declared shapes are wrong on purpose (the
    checker's shape inference rejects them). Returns (optimized model, stats, modified).
    """
    feeds = list(feeds) if feeds is not None else [random_feed(model, seed=s) for s in range(2)]
    result = onnxopt.optimize(model, pipeline(**options), inputs=feeds)
    assert result.validation is not None and result.validation.identical, result.validation.headline()
    assert result.passed
    record = result.records[0]
    assert record.name == "noop"
    assert [r.name for r in result.records] == (["noop", "dce"] if record.modified else ["noop"])

    graph = G.import_graph(model)
    direct = get_pass("noop")(**options).run(graph, PassContext())
    assert direct.stats == record.stats
    assert direct.modified == record.modified
    get_pass("dce")().run(graph, PassContext())
    direct_model = G.export_model(graph, model)
    onnx.checker.check_model(direct_model, full_check=full_check)
    assert [n.name for n in all_nodes(direct_model)] == [n.name for n in all_nodes(result.model)]

    assert interface(result.model) == interface(model)
    assert interface(direct_model) == interface(model)
    assert_same_outputs(model, result.model, feeds)
    assert_same_outputs(model, direct_model, feeds[:1], opt_levels=("disable",))
    return result.model, dict(record.stats), record.modified


def untouched(model: onnx.ModelProto, expected_stats: dict | None = None, full_check: bool = True,
              **options) -> dict:
    """The pass leaves the model exactly as it was (same serialized graph), reports no change."""
    graph = G.import_graph(model)
    result = get_pass("noop")(**options).run(graph, PassContext())
    out = G.export_model(graph, model)
    onnx.checker.check_model(out, full_check=full_check)
    assert result.modified is False
    assert out.graph.SerializeToString() == G.export_model(G.import_graph(model), model).graph.SerializeToString()
    assert [n.name for n in out.graph.node] == [n.name for n in model.graph.node]
    if expected_stats is not None:
        assert result.stats == expected_stats
    return result.stats


def unary_model(nodes, x_shape=(2, 3), y_shape=(2, 3), inits=(), x_dtype=FLOAT, y_dtype=FLOAT, **kwargs):
    """x -> Relu -> r -> nodes... -> m -> Neg -> y."""
    return make_model([node("Relu", ["x"], ["r"], name="relu"), *nodes, node("Neg", ["m"], ["y"], name="neg")],
                      [vi("x", list(x_shape), x_dtype)], [vi("y", list(y_shape), y_dtype)], list(inits), **kwargs)


# ----------------------------------------------------------------- Identity and Dropout

def test_identity_chain_removed_and_second_run_does_nothing():
    model = unary_model([node("Identity", ["r"], ["a"], name="id1"), node("Identity", ["a"], ["m"], name="id2")])
    out, st_, modified = noop_both(model)
    assert ops(out) == ["Relu", "Neg"] and list(out.graph.node[1].input) == ["r"]
    assert st_ == stats(identity_removed=2) and modified
    again, result = run_pass_direct(out, "noop")
    assert result.modified is False and result.stats == stats()


def test_noop_feeding_a_graph_output_keeps_its_name():
    model = make_model([node("Relu", ["x"], ["r"], name="relu"), node("Identity", ["r"], ["y"], name="id"),
                        node("Neg", ["r"], ["z"], name="neg")],
                       [vi("x", [3])], [vi("y", [3]), vi("z", [3])])
    out, st_, _ = noop_both(model)
    assert ops(out) == ["Relu", "Neg"]
    assert list(out.graph.node[0].output) == ["y"] and list(out.graph.node[1].input) == ["y"]
    assert [o.name for o in out.graph.output] == ["y", "z"]
    assert st_ == stats(identity_removed=1)


@pytest.mark.parametrize("op", ["Identity", "Cast", "Transpose"])
def test_noop_between_graph_input_and_output_is_kept(op):
    attrs = {"Cast": {"to": FLOAT}, "Transpose": {"perm": [0, 1]}}.get(op, {})
    model = make_model([node(op, ["x"], ["y"], name="only", **attrs)], [vi("x", [2, 3])], [vi("y", [2, 3])])
    untouched(model, stats(kept_graph_io=1))


def test_noop_from_an_initializer_to_a_graph_output_is_kept():
    model = make_model([node("Identity", ["w"], ["y"], name="id"), node("Neg", ["x"], ["z"], name="neg")],
                       [vi("x", [3])], [vi("y", [3]), vi("z", [3])], [init("w", [1.0, 2.0, 3.0])])
    untouched(model, stats(kept_graph_io=1))


def dropout_model(extra_inputs=(), inits=(), mask=None, graph_inputs=()):
    outputs = ["m"] + ([mask] if mask else [])
    nodes = [node("Dropout", ["r", *extra_inputs], outputs, name="drop")]
    if mask == "mask_read":
        nodes.append(node("Cast", ["mask_read"], ["mask_f"], name="mask_cast", to=FLOAT))
    model_outputs = [vi("y", [2, 3])] + ([vi("mask_f", [2, 3])] if mask == "mask_read" else [])
    return make_model([node("Relu", ["x"], ["r"], name="relu"), *nodes, node("Neg", ["m"], ["y"], name="neg")],
                      [vi("x", [2, 3]), *graph_inputs], model_outputs, list(inits))


@pytest.mark.parametrize("case", ["plain", "ratio", "training_false", "mask_unused"])
def test_dropout_in_inference_removed(case):
    model = {
        "plain": lambda: dropout_model(),
        "ratio": lambda: dropout_model(["ratio"], [init("ratio", 0.3)]),
        "training_false": lambda: dropout_model(["ratio", "train"],
                                                [init("ratio", 0.5), init("train", False, np.bool_)]),
        "mask_unused": lambda: dropout_model(mask="mask_unused"),
    }[case]()
    out, st_, _ = noop_both(model)
    assert ops(out) == ["Relu", "Neg"]
    assert st_ == stats(dropout_removed=1)


def test_dropout_with_mask_read_or_training_mode_unknown_is_kept():
    untouched(dropout_model(mask="mask_read"), stats(skipped_dropout=1))
    model = dropout_model(["", "train"], graph_inputs=[vi("train", [], BOOL)])
    untouched(model, stats(skipped_dropout=1))
    model = dropout_model(["ratio", "train"], [init("ratio", 0.5), init("train", True, np.bool_)])
    untouched(model, stats(skipped_dropout=1))


# ----------------------------------------------------------------- Cast

def test_cast_to_the_same_type_removed_other_casts_kept():
    model = make_model(
        [node("Relu", ["x"], ["r"], name="relu"),
         node("Cast", ["r"], ["same"], name="cast_same", to=FLOAT),
         node("Cast", ["same"], ["d"], name="cast_double", to=TensorProto.DOUBLE),
         node("CastLike", ["d", "like"], ["e"], name="castlike_same"),
         node("Cast", ["e"], ["y"], name="cast_back", to=FLOAT)],
        [vi("x", [2, 3])], [vi("y", [2, 3])], [init("like", [0.0], np.float64)])
    out, st_, _ = noop_both(model)
    assert [n.name for n in out.graph.node] == ["relu", "cast_double", "cast_back"]
    assert st_ == stats(cast_removed=2)


def test_cast_to_a_different_type_kept():
    model = unary_model([node("Cast", ["r"], ["h"], name="to_half", to=TensorProto.FLOAT16),
                         node("Cast", ["h"], ["m"], name="to_float", to=FLOAT)])
    untouched(model, stats())


def test_cast_of_a_value_with_unknown_type_kept():
    """A custom op's output: nothing says its type, so the Cast stays."""
    model = make_model([node("Mystery", ["x"], ["u"], name="mystery", domain="custom"),
                        node("Cast", ["u"], ["y"], name="cast", to=FLOAT)],
                       [vi("x", [3])], [vi("y", [3])], opsets={"": 17, "custom": 1})
    untouched(model, stats(skipped_unknown_type=1))


# ----------------------------------------------------------------- Reshape family, Expand, Tile

def reshape_model(target, x_shape, y_shape, allowzero=None):
    attrs = {} if allowzero is None else {"allowzero": allowzero}
    return unary_model([node("Reshape", ["r", "shape"], ["m"], name="reshape", **attrs)], x_shape, y_shape,
                       [init("shape", target, np.int64)])


@pytest.mark.parametrize("target,x_shape", [
    ([2, 3, 4], [2, 3, 4]),
    ([-1, 3, 4], ["n", 3, 4]),   # symbolic batch, recovered by -1
    ([0, 3, -1], ["n", 3, 4]),   # 0 copies the input dim
    ([2, -1], [2, 3]),
])
def test_reshape_to_the_same_shape_removed(target, x_shape):
    model = reshape_model(target, x_shape, x_shape)
    out, st_, _ = noop_both(model, [random_feed(model)])
    assert ops(out) == ["Relu", "Neg"]
    assert st_ == stats(reshape_removed=1)


@pytest.mark.parametrize("target,x_shape,expected", [
    ([3, 2], [2, 3], stats()),                                   # changes the shape
    ([6], [2, 3], stats()),
    ([2, 3], ["n", 3], stats(skipped_unknown_shape=1)),          # holds only when n == 2
    ([-1, 3], ["n", "k"], stats(skipped_unknown_shape=1)),
])
def test_reshape_that_changes_or_may_change_the_shape_kept(target, x_shape, expected):
    y_shape = [d if isinstance(d, int) and d > 0 else None for d in target]
    untouched(reshape_model(target, x_shape, y_shape), expected)


def test_reshape_with_allowzero_keeps_a_literal_zero():
    untouched(reshape_model([0, 3], [2, 3], [0, 3], allowzero=1), stats())


def test_flatten_squeeze_expand_tile_that_keep_the_shape_removed():
    model = unary_model([node("Flatten", ["r"], ["f"], name="flatten", axis=1),
                         node("Squeeze", ["f"], ["s"], name="squeeze"),
                         node("Expand", ["s", "one_three"], ["e"], name="expand"),
                         node("Tile", ["e", "ones"], ["m"], name="tile")],
                        inits=[init("one_three", [1, 3], np.int64), init("ones", [1, 1], np.int64)])
    out, st_, _ = noop_both(model)
    assert ops(out) == ["Relu", "Neg"]
    assert st_ == stats(reshape_removed=2, expand_removed=1, tile_removed=1)


def test_flatten_squeeze_expand_tile_that_change_the_shape_kept():
    model = make_model(
        [node("Flatten", ["x"], ["f"], name="flatten", axis=1),            # [2,1,3] -> [2,3]
         node("Squeeze", ["x"], ["s"], name="squeeze"),                    # drops the 1
         node("Expand", ["x", "big"], ["e"], name="expand"),               # [2,1,3] -> [2,4,3]
         node("Tile", ["x", "reps"], ["t"], name="tile")],
        [vi("x", [2, 1, 3])], [vi("f", [2, 3]), vi("s", [2, 3]), vi("e", [2, 4, 3]), vi("t", [2, 2, 3])],
        [init("big", [2, 4, 3], np.int64), init("reps", [1, 2, 1], np.int64)])
    untouched(model, stats())


def test_reshape_chain_collapses_to_the_last_reshape():
    """[2,3,4] -> [6,4] -> [4,6]: one Reshape left; [2,3,4] -> [6,4] -> [2,3,4]: none left."""
    model = make_model(
        [node("Relu", ["x"], ["r"], name="relu"),
         node("Reshape", ["r", "s64"], ["a"], name="first"),
         node("Reshape", ["a", "s46"], ["y"], name="second"),
         node("Reshape", ["r", "s64"], ["b"], name="first_again"),
         node("Reshape", ["b", "s234"], ["c"], name="back"),
         node("Neg", ["c"], ["z"], name="neg")],
        [vi("x", [2, 3, 4])], [vi("y", [4, 6]), vi("z", [2, 3, 4])],
        [init("s64", [6, 4], np.int64), init("s46", [4, 6], np.int64), init("s234", [2, 3, 4], np.int64)])
    out, st_, _ = noop_both(model)
    assert [n.name for n in out.graph.node] == ["relu", "second", "neg"]
    assert list(out.graph.node[1].input) == ["r", "s46"] and list(out.graph.node[2].input) == ["r"]
    assert st_ == stats(reshape_chain_collapsed=2, reshape_removed=1)


def test_reshape_chain_kept_when_the_middle_is_read_or_the_target_copies_dims():
    model = make_model(
        [node("Reshape", ["x", "s64"], ["a"], name="first"),
         node("Reshape", ["a", "s46"], ["y"], name="second"),
         node("Neg", ["a"], ["z"], name="reads_middle"),
         node("Reshape", ["x", "s64"], ["b"], name="first2"),
         node("Reshape", ["b", "s0"], ["w"], name="copies_dim")],      # 0 copies b's dim, not x's
        [vi("x", [2, 3, 4])], [vi("y", [4, 6]), vi("z", [6, 4]), vi("w", [6, 2, 2])],
        [init("s64", [6, 4], np.int64), init("s46", [4, 6], np.int64), init("s0", [0, 2, 2], np.int64)])
    untouched(model, stats())


# ----------------------------------------------------------------- Transpose

def test_identity_transpose_and_cancelling_pair_removed():
    model = unary_model([node("Transpose", ["r"], ["t0"], name="t_identity", perm=[0, 1, 2]),
                         node("Transpose", ["t0"], ["t1"], name="t_a", perm=[1, 2, 0]),
                         node("Transpose", ["t1"], ["m"], name="t_b", perm=[2, 0, 1])],
                        (2, 3, 4), (2, 3, 4))
    out, st_, _ = noop_both(model)
    assert ops(out) == ["Relu", "Neg"]
    assert st_ == stats(transpose_removed=3)


def test_transpose_pair_merged_into_one():
    model = unary_model([node("Transpose", ["r"], ["t1"], name="t_a", perm=[1, 0, 2]),
                         node("Transpose", ["t1"], ["m"], name="t_b", perm=[0, 2, 1])],
                        (2, 3, 4), (3, 4, 2))
    out, st_, _ = noop_both(model)
    assert [n.name for n in out.graph.node] == ["relu", "t_b", "neg"]
    perm = next(a for a in out.graph.node[1].attribute if a.name == "perm")
    assert list(perm.ints) == [1, 2, 0] and list(out.graph.node[1].input) == ["r"]
    assert st_ == stats(transpose_merged=1)


def test_transpose_pair_that_does_not_cancel_and_whose_middle_is_read_is_kept():
    model = make_model([node("Transpose", ["x"], ["t1"], name="t_a", perm=[1, 0, 2]),
                        node("Transpose", ["t1"], ["y"], name="t_b", perm=[0, 2, 1]),
                        node("Neg", ["t1"], ["z"], name="reads_middle")],
                       [vi("x", [2, 3, 4])], [vi("y", [3, 4, 2]), vi("z", [3, 2, 4])])
    untouched(model, stats())


def test_cancelling_pair_whose_middle_is_read_drops_the_second():
    model = make_model([node("Relu", ["x"], ["r"], name="relu"),
                        node("Transpose", ["r"], ["t1"], name="t_a", perm=[1, 0]),
                        node("Transpose", ["t1"], ["y"], name="t_b", perm=[1, 0]),
                        node("Neg", ["t1"], ["z"], name="reads_middle")],
                       [vi("x", [2, 3])], [vi("y", [2, 3]), vi("z", [3, 2])])
    out, st_, _ = noop_both(model)
    assert [n.name for n in out.graph.node] == ["relu", "t_a", "reads_middle"]
    assert list(out.graph.node[0].output) == ["y"]
    assert st_ == stats(transpose_removed=1)


def test_cancelling_pair_from_graph_input_to_output_merges_and_keeps_one():
    model = make_model([node("Transpose", ["x"], ["t1"], name="t_a", perm=[1, 0]),
                        node("Transpose", ["t1"], ["y"], name="t_b", perm=[1, 0])],
                       [vi("x", [2, 3])], [vi("y", [2, 3])])
    out, st_, _ = noop_both(model)
    assert [n.name for n in out.graph.node] == ["t_b"] and list(out.graph.node[0].input) == ["x"]
    assert st_ == stats(transpose_merged=1, kept_graph_io=1)


# ----------------------------------------------------------------- Pad, Slice

@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_with_zero_pads_removed(mode):
    model = unary_model([node("Pad", ["r", "pads"], ["m"], name="pad", mode=mode)],
                        inits=[init("pads", [0, 0, 0, 0], np.int64)])
    out, st_, _ = noop_both(model)
    assert ops(out) == ["Relu", "Neg"]
    assert st_ == stats(pad_removed=1)


def test_pad_with_nonzero_or_unknown_pads_kept():
    untouched(unary_model([node("Pad", ["r", "pads"], ["m"], name="pad")], y_shape=(2, 4),
                          inits=[init("pads", [0, 0, 0, 1], np.int64)]), stats())
    model = make_model([node("Pad", ["x", "pads"], ["y"], name="pad")],
                       [vi("x", [2, 3]), vi("pads", [4], INT64)], [vi("y", [None, None])])
    untouched(model, stats())


@pytest.mark.parametrize("starts,ends,axes,steps,x_shape", [
    ([0, 0], [INT64_MAX, INT64_MAX], [0, 1], [1, 1], ["n", 3]),
    ([0], [3], [1], None, [2, 3]),          # ends == dim
    ([-3], [100], [-1], None, [2, 3]),      # -3 is the start of a dim of 3
    ([0], [INT64_MAX], None, None, ["n", "k"]),
])
def test_slice_over_the_whole_tensor_removed(starts, ends, axes, steps, x_shape):
    extra = [init("starts", starts, np.int64), init("ends", ends, np.int64)]
    names = ["r", "starts", "ends"]
    if axes is not None or steps is not None:
        extra.append(init("axes", axes if axes is not None else list(range(len(starts))), np.int64))
        names.append("axes")
    if steps is not None:
        extra.append(init("steps", steps, np.int64))
        names.append("steps")
    model = unary_model([node("Slice", names, ["m"], name="slice")], x_shape, x_shape, extra)
    out, st_, _ = noop_both(model)
    assert ops(out) == ["Relu", "Neg"]
    assert st_ == stats(slice_removed=1)


@pytest.mark.parametrize("starts,ends,steps,x_shape,expected", [
    ([0], [INT64_MAX], [2], [4, 3], stats()),                       # step 2
    ([0], [3], [1], [4, 3], stats()),                               # drops a row
    ([1], [INT64_MAX], [1], [4, 3], stats()),
    ([0], [INT64_MAX], [-1], [4, 3], stats()),
    ([0], [8], [1], ["n", 3], stats(skipped_unknown_shape=1)),      # n may exceed 8
])
def test_slice_that_drops_something_kept(starts, ends, steps, x_shape, expected):
    model = unary_model([node("Slice", ["r", "starts", "ends", "axes", "steps"], ["m"], name="slice")],
                        x_shape, [None, 3],
                        [init("starts", starts, np.int64), init("ends", ends, np.int64), init("axes", [0], np.int64),
                         init("steps", steps, np.int64)])
    untouched(model, expected)


# ----------------------------------------------------------------- Add/Sub/Mul/Div

@pytest.mark.parametrize("op,inputs,const,x_shape", [
    ("Add", ["r", "c"], 0.0, ["n", 3]),                 # scalar zero
    ("Add", ["c", "r"], [0.0, 0.0, 0.0], ["n", 3]),     # zero first, broadcast along a symbolic dim
    ("Sub", ["r", "c"], [[0.0], [0.0]], [2, 3]),
    ("Mul", ["c", "r"], [[1.0, 1.0, 1.0]], [2, 3]),
    ("Div", ["r", "c"], [[[1.0]]], [4, 2, 3]),
])
def test_arith_with_neutral_constant_removed(op, inputs, const, x_shape):
    model = unary_model([node(op, inputs, ["m"], name="arith")], x_shape, x_shape, [init("c", const)])
    out, st_, _ = noop_both(model)
    assert ops(out) == ["Relu", "Neg"]
    assert st_ == stats(arith_removed=1)


def test_arith_on_integers_and_from_a_constant_node_removed():
    model = make_model(
        [node("Constant", [], ["zero"], name="const_zero", value=helper.make_tensor("v", INT64, [], [0])),
         node("Add", ["x", "zero"], ["a"], name="add"),
         node("Mul", ["a", "one"], ["b"], name="mul"),
         node("Neg", ["b"], ["y"], name="neg")],
        [vi("x", [2, 3], INT64)], [vi("y", [2, 3], INT64)], [init("one", [1, 1, 1], np.int64)])
    out, st_, _ = noop_both(model)
    assert [n.name for n in out.graph.node] == ["neg"]  # the Constant node went with dce
    assert st_ == stats(arith_removed=2)


@pytest.mark.parametrize("op,inputs,const,x_shape,y_shape,expected", [
    ("Add", ["r", "c"], [[0.0, 0.0, 0.0]], [3], [1, 3], stats()),          # broadcasts [3] to [1,3]
    ("Add", ["r", "c"], [0.0, 0.0, 0.0], [2, 1], [2, 3], stats()),         # broadcasts the 1
    ("Add", ["r", "c"], [[0.0, 0.0, 0.0]] * 2, ["n", 3], [2, 3], stats(skipped_unknown_shape=1)),
    ("Add", ["r", "c"], [0.0, 0.5, 0.0], [2, 3], [2, 3], stats()),         # not all zero
    ("Sub", ["c", "r"], [0.0, 0.0, 0.0], [2, 3], [2, 3], stats()),         # 0 - x
    ("Div", ["c", "r"], [1.0, 1.0, 1.0], [2, 3], [2, 3], stats()),         # 1 / x
    ("Mul", ["r", "c"], [1.0, 1.0, 2.0], [2, 3], [2, 3], stats()),
    ("Mul", ["r", "c"], [0.0, 0.0, 0.0], [2, 3], [2, 3], stats()),         # times 0 is not a no-op
])
def test_arith_that_is_not_a_noop_kept(op, inputs, const, x_shape, y_shape, expected):
    untouched(unary_model([node(op, inputs, ["m"], name="arith")], x_shape, y_shape, [init("c", const)]), expected)


def test_overridable_initializer_is_not_a_constant():
    """An initializer also listed as a graph input is a default the caller may replace:
    its zero is not a zero (import_graph records such names in graph.initializer_inputs)."""
    model = make_model([node("Relu", ["x"], ["r"], name="relu"), node("Add", ["r", "c"], ["y"], name="add")],
                       [vi("x", [3]), vi("c", [])], [vi("y", [3])], [init("c", 0.0)])
    untouched(model, stats())
    got = run_model(model, {"x": np.array([1.0, -2.0, 3.0], np.float32), "c": np.array(5.0, np.float32)})["y"]
    np.testing.assert_array_equal(got, np.array([6.0, 5.0, 8.0], np.float32))


# ----------------------------------------------------------------- Concat, Split, Sum, Where

def test_single_input_concat_sum_max_and_single_output_split_removed():
    model = unary_model([node("Concat", ["r"], ["a"], name="concat", axis=1),
                         node("Sum", ["a"], ["b"], name="sum"),
                         node("Max", ["b"], ["c"], name="max"),
                         node("Split", ["c"], ["m"], name="split", axis=0)])
    out, st_, _ = noop_both(model)
    assert ops(out) == ["Relu", "Neg"]
    assert st_ == stats(concat_removed=1, single_input_removed=2, split_removed=1)


def test_where_with_constant_condition_removed():
    model = make_model(
        [node("Relu", ["x"], ["r"], name="relu"), node("Sigmoid", ["x"], ["s"], name="sig"),
         node("Where", ["all_true", "r", "s"], ["a"], name="where_true"),
         node("Where", ["all_false", "r", "a"], ["b"], name="where_false"),
         node("Neg", ["b"], ["y"], name="neg")],
        [vi("x", [2, 3])], [vi("y", [2, 3])],
        [init("all_true", [True, True, True], np.bool_), init("all_false", False, np.bool_)])
    out, st_, _ = noop_both(model)
    assert [n.name for n in out.graph.node] == ["relu", "neg"]
    assert list(out.graph.node[1].input) == ["r"]
    assert st_ == stats(where_removed=2)


def test_where_that_mixes_or_broadcasts_kept():
    model = make_model(
        [node("Where", ["mixed", "x", "z"], ["a"], name="mixed"),
         node("Where", ["all_true", "x", "big"], ["b"], name="broadcasts")],   # [2,3] with [4,2,3]
        [vi("x", [2, 3]), vi("z", [2, 3]), vi("big", [4, 2, 3])], [vi("a", [2, 3]), vi("b", [4, 2, 3])],
        [init("mixed", [True, False, True], np.bool_), init("all_true", True, np.bool_)])
    untouched(model, stats())


# ----------------------------------------------------------------- shapes: where they come from

def test_declared_graph_output_shape_is_not_trusted():
    """y is declared [6] (wrongly; it is [2,3]). Without inference the Reshape of y to [6] must stay;
    a value_info shape of an intermediate is used."""
    model = make_model([node("Relu", ["x"], ["y"], name="relu"),
                        node("Reshape", ["y", "s6"], ["z"], name="reshape_out"),
                        node("Sigmoid", ["x"], ["v"], name="sig"),
                        node("Reshape", ["v", "s23"], ["w"], name="reshape_mid")],
                       [vi("x", [2, 3])], [vi("y", [6]), vi("z", [6]), vi("w", [2, 3])],
                       [init("s6", [6], np.int64), init("s23", [2, 3], np.int64)], check=False)
    model.graph.value_info.append(vi("v", [2, 3]))
    out, st_, _ = noop_both(model, full_check=False, infer_shapes=False)
    assert [n.name for n in out.graph.node] == ["relu", "reshape_out", "sig"]
    assert st_ == stats(reshape_removed=1, skipped_unknown_shape=1)
    out, st_, _ = noop_both(model, full_check=False)  # inference knows y is [2,3]: Reshape to [6] is real, and stays
    assert [n.name for n in out.graph.node] == ["relu", "reshape_out", "sig"]
    assert st_ == stats(reshape_removed=1)


def test_wrong_value_info_loses_to_inference():
    """value_info claims r is [6]; inference from the input says [2,3]: the Reshape to [6] stays."""
    model = unary_model([node("Reshape", ["r", "s6"], ["m"], name="reshape")], (2, 3), (6,),
                        [init("s6", [6], np.int64)], check=False)
    model.graph.value_info.append(vi("r", [6]))
    untouched(model, stats(), full_check=False)


# ----------------------------------------------------------------- scopes

def test_noops_inside_if_branches_removed():
    """then: Identity + Add(0) + Transpose pair on an outer value (shape known outside); else: Reshape to
    the same shape ending at the branch output (renamed)."""
    then = helper.make_graph([node("Identity", ["p"], ["t0"], name="then_id"),
                              node("Add", ["t0", "zero"], ["t1"], name="then_add"),
                              node("Transpose", ["t1"], ["t2"], name="then_ta", perm=[1, 0]),
                              node("Transpose", ["t2"], ["t3"], name="then_tb", perm=[1, 0]),
                              node("Relu", ["t3"], ["t"], name="then_relu")],
                             "then", [], [vi("t", [2, 3])])
    els = helper.make_graph([node("Neg", ["p"], ["e0"], name="else_neg"),
                             node("Reshape", ["e0", "s23"], ["e"], name="else_reshape")],
                            "else", [], [vi("e", [2, 3])])
    model = make_model([node("Sigmoid", ["x"], ["p"], name="sig"),
                        node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=els)],
                       [vi("c", [], BOOL), vi("x", [2, 3])], [vi("y", [2, 3])],
                       [init("zero", 0.0), init("s23", [2, 3], np.int64)])
    feeds = [{"c": np.array(flag), "x": random_feed(model)["x"]} for flag in (True, False)]
    out, st_, _ = noop_both(model, feeds)
    assert ops(subgraph(out, "If", "then_branch")) == ["Relu"]
    else_out = subgraph(out, "If", "else_branch")
    assert ops(else_out) == ["Neg"] and list(else_out.node[0].output) == ["e"]
    assert st_ == stats(identity_removed=1, arith_removed=1, transpose_removed=2, reshape_removed=1)


def test_loop_body_shapes_are_not_trusted_identities_still_go():
    """The carried value's declared shape [3] would make Reshape(v, [3]) look like a no-op, but
    the body's shapes are not trusted (a carried value may change shape); the Identity goes."""
    body = helper.make_graph(
        [node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
         node("Reshape", ["v_in", "s3"], ["v0"], name="body_reshape"),
         node("Add", ["v0", "xs"], ["s"], name="body_add"),
         node("Identity", ["s"], ["v_out"], name="body_id")],
        "body", [vi("i", [], INT64), vi("cond_in", [], BOOL), vi("v_in", [3])],
        [vi("cond_out", [], BOOL), vi("v_out", [3])])
    model = make_model([node("Sigmoid", ["x"], ["xs"], name="make_xs"),
                        node("Loop", ["n", "", "v0_init"], ["v_final"], name="loop", body=body)],
                       [vi("n", [], INT64), vi("x", [3]), vi("v0_init", [3])], [vi("v_final", [3])],
                       [init("s3", [3], np.int64)])
    feeds = [{"n": np.array(k, np.int64), "x": np.array([0.5, -1.0, 2.0], np.float32),
              "v0_init": np.array([1.0, 2.0, 3.0], np.float32)} for k in (0, 3)]
    out, st_, _ = noop_both(model, feeds)
    body_out = subgraph(out.graph.node[1], "body")
    assert [n.name for n in body_out.node] == ["body_cond", "body_reshape", "body_add"]
    assert list(body_out.node[2].output) == ["v_out"]
    assert st_ == stats(identity_removed=1, kept_graph_io=1, skipped_unknown_shape=1)


def test_noop_in_a_model_local_function_removed():
    fn = helper.make_function("custom", "F", ["a"], ["b"],
                              [helper.make_node("Relu", ["a"], ["t"]), helper.make_node("Identity", ["t"], ["b"])],
                              [helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)])
    model = make_model([node("F", ["x"], ["y"], name="call", domain="custom")], [vi("x", [3])], [vi("y", [3])],
                       functions=[fn], opsets={"": 17, "custom": 1})
    out, st_, _ = noop_both(model)
    assert [n.op_type for n in out.functions[0].node] == ["Relu"] and list(out.functions[0].node[0].output) == ["b"]
    assert st_ == stats(identity_removed=1)
    np.testing.assert_array_equal(run_model(out, {"x": np.array([-1.0, 2.0, 0.5], np.float32)})["y"],
                                  np.array([0.0, 2.0, 0.5], np.float32))


def test_outputs_are_the_known_answer():
    """Not only 'same as before': a chain of every kind of no-op computes Neg(Relu(x))."""
    model = unary_model([node("Identity", ["r"], ["a"], name="id"),
                         node("Dropout", ["a"], ["b"], name="drop"),
                         node("Cast", ["b"], ["c"], name="cast", to=FLOAT),
                         node("Mul", ["c", "one"], ["d"], name="mul"),
                         node("Pad", ["d", "pads"], ["e"], name="pad"),
                         node("Transpose", ["e"], ["m"], name="transpose", perm=[0, 1])],
                        inits=[init("one", 1.0), init("pads", [0, 0, 0, 0], np.int64)])
    out, st_, _ = noop_both(model)
    assert ops(out) == ["Relu", "Neg"]
    assert st_ == stats(identity_removed=1, dropout_removed=1, cast_removed=1, arith_removed=1,
                        pad_removed=1, transpose_removed=1)
    x = np.array([[-1.0, 0.0, 2.5], [3.0, -0.5, 1.0]], np.float32)
    np.testing.assert_array_equal(run_model(out, {"x": x})["y"], -np.maximum(x, 0))


# ----------------------------------------------------------------- random chains



def _broadcast(a: tuple, b: tuple) -> tuple:
    return tuple(np.broadcast_shapes(a, b))


@st.composite
def random_chains(draw):
    """x (first dim sometimes symbolic), sometimes through a Relu, then through 2-9 ops drawn from no-ops and near misses (broadcasting
    constants, real transposes/reshapes/slices/pads, casts to other types), some values tapped as extra
    graph outputs. Constants that multiply or divide are never 0, so no -0.0 appears."""
    shape = x_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    symbolic = draw(st.booleans())
    nodes, inits, outputs = [], [], []
    cur, k = "x", 0

    def fresh(prefix):
        nonlocal k
        k += 1
        return f"{prefix}{k}"

    def const(values, dtype=np.float32):
        name = fresh("c")
        inits.append(init(name, values, dtype))
        return name

    if draw(st.booleans()):  # a producer that can give its name to a graph output
        nodes.append(node("Relu", ["x"], ["v0"], name="relu"))
        cur = "v0"
    for _ in range(draw(st.integers(2, 9))):
        kind = draw(st.sampled_from(["Identity", "arith", "Transpose", "Reshape", "Slice", "Pad", "Cast",
                                     "Expand", "Dropout", "Concat"]))
        out = fresh("v")
        if kind in ("Identity", "Dropout", "Concat"):
            nodes.append(node(kind, [cur], [out], name=f"n_{out}", **({"axis": 0} if kind == "Concat" else {})))
        elif kind == "arith":
            op = draw(st.sampled_from(["Add", "Sub", "Mul", "Div"]))
            cshape = draw(st.sampled_from([(), (1,), shape[-1:], (1,) * len(shape), shape, (2, *shape),
                                           (*shape[:-1], 1)]))
            fill = draw(st.sampled_from(["neutral", "neutral", "other"]))
            neutral = 0.0 if op in ("Add", "Sub") else 1.0
            values = np.full(cshape, neutral if fill == "neutral" else 0.5, np.float32)
            c = const(values)
            first = draw(st.booleans())
            nodes.append(node(op, [c, cur] if first else [cur, c], [out], name=f"n_{out}"))
            shape = _broadcast(shape, cshape)
        elif kind == "Transpose":
            perm = draw(st.permutations(list(range(len(shape)))))
            nodes.append(node("Transpose", [cur], [out], name=f"n_{out}", perm=list(perm)))
            shape = tuple(shape[p] for p in perm)
        elif kind == "Reshape":
            target = draw(st.sampled_from(["same", "minus", "zero", "flat", "reversed"]))
            size = int(np.prod(shape))
            t = {"same": list(shape), "minus": [-1, *shape[1:]], "zero": [0, *shape[1:]], "flat": [size],
                 "reversed": list(reversed(shape))}[target]
            nodes.append(node("Reshape", [cur, const(t, np.int64)], [out], name=f"n_{out}"))
            shape = {"flat": (size,), "reversed": tuple(reversed(shape))}.get(target, shape)
        elif kind == "Slice":
            options = [(0, INT64_MAX, 1), (0, shape[0], 1), (-shape[0], 99, 1), (0, INT64_MAX, 2)]
            start, end, step = draw(st.sampled_from(options + [(1, INT64_MAX, 1)] * (shape[0] > 1)))
            ins = [cur, const([start], np.int64), const([end], np.int64), const([0], np.int64),
                   const([step], np.int64)]
            nodes.append(node("Slice", ins, [out], name=f"n_{out}"))
            shape = (len(range(*slice(start, end, step).indices(shape[0]))), *shape[1:])
        elif kind == "Pad":
            grow = draw(st.booleans())
            pads = [0] * (2 * len(shape))
            if grow:
                pads[-1] = 1
            nodes.append(node("Pad", [cur, const(pads, np.int64)], [out], name=f"n_{out}"))
            shape = (*shape[:-1], shape[-1] + 1) if grow else shape
        elif kind == "Cast":
            if draw(st.booleans()):
                nodes.append(node("Cast", [cur], [out], name=f"n_{out}", to=FLOAT))
            else:
                mid = fresh("d")
                nodes.append(node("Cast", [cur], [mid], name=f"n_{mid}", to=TensorProto.DOUBLE))
                nodes.append(node("Cast", [mid], [out], name=f"n_{out}", to=FLOAT))
        elif kind == "Expand":
            target = draw(st.sampled_from([(1,), shape, (1,) * len(shape), (2, *shape)]))
            nodes.append(node("Expand", [cur, const(list(target), np.int64)], [out], name=f"n_{out}"))
            shape = _broadcast(shape, target)
        if draw(st.integers(0, 4)) == 0:
            outputs.append(vi(out, list(shape)))
        cur = out
    if not outputs or outputs[-1].name != cur:
        outputs.append(vi(cur, list(shape)))
    return nodes, inits, outputs, x_shape, symbolic


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(random_chains())
def test_random_chains_same_outputs(chain):
    nodes, inits, outputs, x_shape, symbolic = chain
    declared = ["n", *x_shape[1:]] if symbolic else list(x_shape)
    model = make_model(nodes, [vi("x", declared)], outputs, inits)
    feed = {"x": np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)}
    out, result = run_pass_direct(model, "noop")
    assert interface(out) == interface(model)
    assert len(out.graph.node) <= len(model.graph.node)
    assert result.modified == (len(out.graph.node) < len(model.graph.node))
    assert_same_outputs(model, out, [feed], opt_levels=("disable",))
    again = run_pass_direct(out, "noop")[1]
    assert again.modified is False


@pytest.mark.parametrize("first, second", [([1], [2]), ([0], [0]), ([-1], [1]), ([1, 2], [0, 4])])
def test_unsqueeze_chain_merges_into_one(first, second):
    import onnxopt as _onnxopt
    from onnx import helper as _h, numpy_helper as _nh

    rank = 2 + len(first) + len(second)
    nodes = [_h.make_node("Unsqueeze", ["x", "a1"], ["m"]), _h.make_node("Unsqueeze", ["m", "a2"], ["y"])]
    graph = _h.make_graph(nodes, "g", [_h.make_tensor_value_info("x", 1, [2, 3])],
                          [_h.make_tensor_value_info("y", 1, [None] * rank)],
                          [_nh.from_array(np.array(first, np.int64), "a1"), _nh.from_array(np.array(second, np.int64), "a2")])
    model = _h.make_model(graph, opset_imports=[_h.make_opsetid("", 17)])
    result = _onnxopt.optimize(model, "noop")
    assert [n.op_type for n in result.model.graph.node] == ["Unsqueeze"]
    assert result.records[0].stats["unsqueeze_merged"] == 1
    assert result.validation.identical


def test_unsqueeze_chain_with_shared_middle_is_kept():
    import onnxopt as _onnxopt
    from onnx import helper as _h, numpy_helper as _nh

    nodes = [_h.make_node("Unsqueeze", ["x", "a"], ["m"]), _h.make_node("Unsqueeze", ["m", "a"], ["y"]),
             _h.make_node("Relu", ["m"], ["z"])]
    graph = _h.make_graph(nodes, "g", [_h.make_tensor_value_info("x", 1, [2, 3])],
                          [_h.make_tensor_value_info("y", 1, [1, 1, 2, 3]), _h.make_tensor_value_info("z", 1, [1, 2, 3])],
                          [_nh.from_array(np.array([0], np.int64), "a")])
    model = _h.make_model(graph, opset_imports=[_h.make_opsetid("", 17)])
    result = _onnxopt.optimize(model, "noop")
    assert [n.op_type for n in result.model.graph.node] == ["Unsqueeze", "Unsqueeze", "Relu"]
    assert result.records[0].stats["unsqueeze_merged"] == 0
