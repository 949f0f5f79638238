"""The ``fold`` pass: constant folding in every scope, shapes of static values, what must not fold.

fold is exact: every rewritten model must give bitwise-identical outputs in ONNX
Runtime. Each case runs twice: through ``onnxopt.optimize`` (pass manager, the
automatic dce after it, contracts, checker, validation in ORT) and directly
through the pass on an imported graph; both must report the same statistics.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from helpers import (FLOAT, INT64, all_nodes, assert_pass_agrees, init, interface, make_model, node, ops,
                     random_feed, run_model, run_pass_direct, subgraph, vi)
from onnxopt import graph as G
from onnxopt.pipeline import PassContext, get_pass

FLOAT16 = TensorProto.FLOAT16
ZERO_STATS = {"nodes_folded": 0, "constant_nodes_replaced": 0, "constants_created": 0, "bytes_created": 0,
              "rounds": 1, "skipped_too_large": 0, "skipped_nondeterministic": 0, "skipped_dequantize": 0,
              "skipped_control_flow": 0, "skipped_unsupported": 0}


def stats(**changes: int) -> dict:
    return {**ZERO_STATS, **changes}


def spec(options: dict) -> str:
    if not options:
        return "fold"
    return "fold(" + ",".join(f"{k}={str(v).lower()}" for k, v in options.items()) + ")"


def run_direct(model: onnx.ModelProto, full_check: bool = True, **options):
    """The pass alone on an imported graph (no pass manager, no dce), exported and checked."""
    if full_check:
        return run_pass_direct(model, "fold", **options)
    graph = G.import_graph(model)
    result = get_pass("fold")(**options).run(graph, PassContext())
    out = G.export_model(graph, model)
    onnx.checker.check_model(out)
    return out, result


def fold_both(model: onnx.ModelProto, feeds=None, full_check: bool = True, max_growth=None, **options):
    """fold through optimize() and directly; both agree, the interface is kept, outputs are bitwise equal.

    ``full_check=False`` for models whose declared shapes are wrong on purpose; ``max_growth``
    goes to optimize() (the direct run has only ``max_growth_bytes``).
    Returns (optimized model, fold's stats, modified).
    """
    feeds = list(feeds) if feeds is not None else [random_feed(model, seed=s) for s in range(2)]
    result = onnxopt.optimize(model, spec(options), inputs=feeds, max_growth=max_growth)
    assert result.validation is not None and result.validation.identical, result.validation.headline()
    assert result.passed
    record = result.records[0]
    assert record.name == "fold"

    direct, direct_result = run_direct(model, full_check, **options)
    assert_pass_agrees(model, result.model, record, direct, direct_result, feeds)
    return result.model, dict(record.stats), record.modified


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def const_node(name: str, values, dtype=np.float32) -> onnx.NodeProto:
    value = numpy_helper.from_array(np.asarray(values, dtype), name)
    return node("Constant", [], [name], name=f"c_{name}", value=value)


# ----------------------------------------------------------------- arithmetic and Constant nodes

def test_arithmetic_on_initializers_folds_to_one_constant():
    """y = x * ((a + b) * 2): the Add and Mul on weights fold; the Mul on x stays."""
    model = make_model(
        [node("Add", ["a", "b"], ["ab"]), node("Mul", ["ab", "two"], ["w"]),
         node("Mul", ["x", "w"], ["y"], name="live")],
        [vi("x", [3])], [vi("y", [3])],
        [init("a", [1.0, 2.0, 3.0]), init("b", [0.5, 0.5, 0.5]), init("two", 2.0)])
    out, st, modified = fold_both(model)
    assert ops(out) == ["Mul"] and out.graph.node[0].name == "live"
    assert modified is True
    assert st == stats(nodes_folded=2, constants_created=1, bytes_created=12)
    w = initializers(out)[out.graph.node[0].input[1]]
    np.testing.assert_array_equal(w, np.array([3.0, 5.0, 7.0], np.float32))
    assert w.dtype == np.float32
    x = np.array([1.0, -1.0, 2.0], np.float32)
    np.testing.assert_array_equal(run_model(out, {"x": x})["y"], x * np.array([3.0, 5.0, 7.0], np.float32))


def test_constant_nodes_become_initializers_and_fold():
    """A Constant node (tensor value) feeding a live node becomes an initializer without a copy;
    value_float / value_ints Constant nodes are evaluated; their arithmetic folds."""
    model = make_model(
        [const_node("k", [0.5, 1.5, -2.0]),
         node("Constant", [], ["s"], name="c_s", value_float=3.0),
         node("Constant", [], ["shape"], name="c_shape", value_ints=[3, 1]),
         node("Mul", ["k", "s"], ["ks"]),
         node("Mul", ["x", "ks"], ["m"], name="live_mul"),
         node("Reshape", ["m", "shape"], ["r"], name="live_reshape"),
         node("Add", ["r", "k"], ["y"], name="live_add")],
        [vi("x", [3])], [vi("y", [3, 3])])
    out, st, _ = fold_both(model)
    assert [n.name for n in out.graph.node] == ["live_mul", "live_reshape", "live_add"]
    consts = initializers(out)
    np.testing.assert_array_equal(consts["ks"], np.array([1.5, 4.5, -6.0], np.float32))
    np.testing.assert_array_equal(consts["shape"], np.array([3, 1], np.int64))
    np.testing.assert_array_equal(consts["k"], np.array([0.5, 1.5, -2.0], np.float32))
    # k moved (no new bytes), shape and ks evaluated (16 + 12 bytes); s used only by the folded Mul.
    assert st == stats(nodes_folded=4, constant_nodes_replaced=3, constants_created=3, bytes_created=28)


def test_identity_of_initializer_reads_the_initializer_without_a_copy():
    """Exporters share one weight through Identity nodes; folding must not duplicate it."""
    model = make_model(
        [node("Identity", ["w"], ["w1"]), node("Identity", ["w"], ["w2"]),
         node("Mul", ["x", "w1"], ["m"], name="m"), node("Add", ["m", "w2"], ["y"], name="a")],
        [vi("x", [3])], [vi("y", [3])], [init("w", [1.0, 2.0, 3.0])])
    out, st, _ = fold_both(model)
    assert [n.name for n in out.graph.node] == ["m", "a"]
    assert [n.input[1] for n in out.graph.node] == ["w", "w"]
    assert list(initializers(out)) == ["w"]
    assert st == stats(nodes_folded=2)


def test_one_onnxruntime_session_per_round(monkeypatch):
    """Many independent foldable nodes are evaluated together, not one session per node."""
    evaluate = sys.modules[get_pass("fold").__module__ + ".evaluate"]
    calls = []
    real = evaluate._run_ort
    monkeypatch.setattr(evaluate, "_run_ort", lambda *a: calls.append(1) or real(*a))
    nodes, value = [], "w"
    for i in range(40):
        nodes.append(node("Add" if i % 2 else "Mul", [value, "w"], [f"v{i}"]))
        value = f"v{i}"
    nodes.append(node("Add", ["x", value], ["y"], name="live"))
    model = make_model(nodes, [vi("x", [2])], [vi("y", [2])], [init("w", [1.0, 0.5])])
    out, result = run_pass_direct(model, "fold")
    assert len(calls) == 1
    assert result.stats["nodes_folded"] == 40 and result.stats["rounds"] == 1
    assert len(out.graph.node) == 1


# ----------------------------------------------------------------- shapes

def shape_chain_model(x_shape) -> onnx.ModelProto:
    """Reshape x to [x.shape[0], -1] through Shape -> Gather -> Unsqueeze -> Concat."""
    return make_model(
        [node("Shape", ["x"], ["shp"]),
         node("Gather", ["shp", "zero"], ["n"], axis=0),
         node("Unsqueeze", ["n", "axes"], ["n1"]),
         node("Concat", ["n1", "minus_one"], ["target"], axis=0),
         node("Reshape", ["x", "target"], ["y"], name="reshape")],
        [vi("x", x_shape)], [vi("y", [x_shape[0], None])],
        [init("zero", 0, np.int64), init("axes", [0], np.int64), init("minus_one", [-1], np.int64)])


def test_shape_chain_on_static_input_folds_reshape_target():
    model = shape_chain_model([2, 3, 4])
    out, st, _ = fold_both(model)
    assert ops(out) == ["Reshape"]
    np.testing.assert_array_equal(initializers(out)[out.graph.node[0].input[1]], np.array([2, -1], np.int64))
    assert st == stats(nodes_folded=4, constants_created=1, bytes_created=16)


def test_shape_of_symbolic_dim_is_not_folded():
    model = shape_chain_model(["batch", 3, 4])
    out, st, modified = fold_both(model, feeds=[random_feed(model, dims={"batch": b}) for b in (1, 5)])
    assert modified is False
    assert st == stats()
    assert ops(out) == ops(model)
    assert out.graph == model.graph


def test_shape_with_start_folds_the_static_dims_of_a_symbolic_value():
    """Shape(start=1) of [batch, 3, 4] is [3, 4] whatever the batch."""
    model = make_model(
        [node("Shape", ["x"], ["tail"], start=1),
         node("Concat", ["minus_one", "tail"], ["target"], axis=0),
         node("Reshape", ["x", "target"], ["y"], name="reshape")],
        [vi("x", ["batch", 3, 4])], [vi("y", ["batch", 3, 4])], [init("minus_one", [-1], np.int64)],
        opsets={"": 17})
    out, st, _ = fold_both(model, feeds=[random_feed(model, dims={"batch": b}) for b in (1, 3)])
    assert ops(out) == ["Reshape"]
    np.testing.assert_array_equal(initializers(out)[out.graph.node[0].input[1]], np.array([-1, 3, 4], np.int64))
    assert st == stats(nodes_folded=2, constants_created=1, bytes_created=24)


def test_static_shapes_come_from_inference_not_declared_output_shapes():
    """The graph output r is declared [7] but is [3]; Shape(r) must fold to [3]."""
    model = make_model(
        [node("Relu", ["x"], ["r"]), node("Shape", ["r"], ["s"]),
         node("Cast", ["s"], ["sf"], to=FLOAT), node("Mul", ["r", "sf"], ["y"], name="live")],
        [vi("x", [3])], [vi("r", [7]), vi("y", [3])], check=False)
    model.graph.value_info.append(vi("s", [5], INT64))  # wrong too
    out, st, _ = fold_both(model, full_check=False)
    assert ops(out) == ["Relu", "Mul"]
    np.testing.assert_array_equal(initializers(out)[out.graph.node[1].input[1]], np.array([3.0], np.float32))
    assert st == stats(nodes_folded=2, constants_created=1, bytes_created=4)


def test_fold_shapes_false_leaves_shape_of_activations():
    model = shape_chain_model([2, 3, 4])
    out, st, modified = fold_both(model, fold_shapes=False)
    assert modified is False and ops(out) == ops(model)
    assert st == stats()


# ----------------------------------------------------------------- size guard

def test_size_guard_skips_large_results_and_counts_them():
    """ConstantOfShape to 4 MiB and Expand to 4 MiB are left; a small result read from them still folds."""
    model = make_model(
        [node("ConstantOfShape", ["big_shape"], ["big"], value=numpy_helper.from_array(np.array([1.5], np.float32))),
         node("Expand", ["w", "big_shape"], ["wide"]),
         node("Add", ["x", "big"], ["y"], name="use_big"),
         node("Add", ["x", "wide"], ["z"], name="use_wide"),
         node("ReduceSum", ["big", "axes"], ["small"], keepdims=0),
         node("Mul", ["small", "x1"], ["u"], name="use_small")],
        [vi("x", [1024, 1024]), vi("x1", [1024])], [vi("y", [1024, 1024]), vi("z", [1024, 1024]), vi("u", [1024])],
        [init("big_shape", [1024, 1024], np.int64), init("w", np.arange(1024), np.float32),
         init("axes", [0], np.int64)])
    out, st, _ = fold_both(model, feeds=[random_feed(model)])
    assert sorted(ops(out)) == sorted(["ConstantOfShape", "Expand", "Add", "Add", "Mul"])
    np.testing.assert_array_equal(initializers(out)["small"], np.full(1024, 1536.0, np.float32))
    assert st == stats(nodes_folded=1, constants_created=1, bytes_created=4096, skipped_too_large=2)

    out, st, _ = fold_both(model, feeds=[random_feed(model)], max_growth="none", max_growth_bytes=8 << 20)
    assert sorted(ops(out)) == ["Add", "Add", "Mul"]
    assert st["skipped_too_large"] == 0 and st["nodes_folded"] == 3


def test_size_guard_counts_a_weight_another_node_still_reads():
    """A tied embedding: W is gathered and, transposed, multiplied. Folding the Transpose
    would store a second copy of W (64 KiB): over an 8 KiB limit it stays; when the
    Transpose is W's only reader, folding stores no extra bytes and goes ahead."""
    w = np.arange(128 * 128, dtype=np.float32).reshape(128, 128) / 1e4
    tied = make_model(
        [node("Gather", ["w", "ids"], ["emb"], name="embed"),
         node("Transpose", ["w"], ["wt"], name="tr", perm=[1, 0]),
         node("MatMul", ["emb", "wt"], ["y"], name="head")],
        [vi("ids", [4], INT64)], [vi("y", [4, 128])], [init("w", w)])
    feeds = [{"ids": np.array([0, 5, 7, 127], np.int64)}]
    out, st, _ = fold_both(tied, feeds=feeds, max_growth_bytes=8192)
    assert ops(out) == ["Gather", "Transpose", "MatMul"]
    assert st == stats(skipped_too_large=1)

    alone = make_model(
        [node("Transpose", ["w"], ["wt"], name="tr", perm=[1, 0]),
         node("MatMul", ["x", "wt"], ["y"], name="head")],
        [vi("x", [4, 128])], [vi("y", [4, 128])], [init("w", w)])
    out, st, _ = fold_both(alone, feeds=[random_feed(alone)], max_growth_bytes=8192)
    assert ops(out) == ["MatMul"]
    np.testing.assert_array_equal(initializers(out)[out.graph.node[0].input[1]], w.T)
    assert st["nodes_folded"] == 1 and st["skipped_too_large"] == 0


def assert_no_growth(model: onnx.ModelProto, out: onnx.ModelProto) -> None:
    """The file stays within the default growth limit: +1% of the input, at least 64 KiB."""
    assert out.ByteSize() - model.ByteSize() <= max(model.ByteSize() // 100, 64 << 10)


def int8_embedding(dtype=np.int8, rows: int = 1000, zero_point: bool = False) -> onnx.ModelProto:
    """A sentence embedder's table shipped narrow and dequantized at run time:
    Cast(W) * scale, or (Cast(W) - zero point) * scale, gathered by token ids."""
    info = np.iinfo(dtype)
    table = np.random.default_rng(0).integers(info.min, info.max, (rows, 64), endpoint=True).astype(dtype)
    nodes = [node("Cast", ["wq"], ["wf"], to=FLOAT)]
    if zero_point:
        nodes.append(node("Sub", ["wf", "zp"], ["wc"]))
    nodes += [node("Mul", ["wc" if zero_point else "wf", "scale"], ["w"]),
              node("Gather", ["w", "ids"], ["emb"], name="lookup"), node("ReduceMean", ["emb"], ["y"], axes=[0],
                                                                         keepdims=0, name="pool")]
    return make_model(nodes, [vi("ids", [5], INT64)], [vi("y", [64])],
                      [init("wq", table, dtype), init("scale", 0.02), init("zp", 3.0)][:3 if zero_point else 2],
                      opsets={"": 13})


IDS = [{"ids": np.array([0, 1, 17, 998, 999], np.int64)}]


@pytest.mark.parametrize("dtype, zero_point", [(np.int8, False), (np.int8, True), (np.uint8, True), (np.int16, False)],
                         ids=["int8", "int8-zero-point", "uint8-zero-point", "int16"])
def test_dequantization_of_narrow_weights_is_not_folded(dtype, zero_point):
    """Folding Cast + Mul over an int8 table would store it as float32 (4x): the chain stays,
    every node of it counted, and the file keeps its size."""
    model = int8_embedding(dtype, zero_point=zero_point)
    result = onnxopt.optimize(model, "cleanup", inputs=IDS)
    assert result.passed and result.validation.identical
    out = result.model
    assert ops(out) == ops(model)
    assert initializers(out)["wq"].dtype == dtype
    assert_no_growth(model, out)
    fold = result.records[0].stats
    assert fold["skipped_too_large"] == len(model.graph.node) - 2 and fold["nodes_folded"] == 0
    assert "left unfolded for size" in result.records[0].notes[0]


def test_int4_weights_are_never_unpacked():
    """4-bit weights are stored packed; fold does not read them, even without a growth limit,
    and counts what reads them."""
    values = np.random.default_rng(4).integers(-8, 8, (64, 32))
    model = make_model(
        [node("Cast", ["wq"], ["wf"], to=FLOAT), node("Mul", ["wf", "scale"], ["w"]),
         node("MatMul", ["x", "w"], ["y"], name="mm")],
        [vi("x", [2, 64])], [vi("y", [2, 32])],
        [helper.make_tensor("wq", TensorProto.INT4, [64, 32], values.flatten().tolist()), init("scale", 0.1)],
        opsets={"": 21})
    out, st, _ = fold_both(model, max_growth="none")
    assert ops(out) == ops(model)
    assert st == stats(skipped_unsupported=1)
    assert_no_growth(model, out)


def test_a_tiny_dequantized_table_still_folds():
    """A few hundred bytes of float is within the allowance (64 KiB for a small model)."""
    model = int8_embedding(rows=16)
    out, st, _ = fold_both(model, feeds=[{"ids": np.array([0, 1, 2, 3, 15], np.int64)}])
    assert ops(out) == ["Gather", "ReduceMean"]
    assert st["skipped_too_large"] == 0 and st["nodes_folded"] == 2 and st["bytes_created"] == 16 * 64 * 4


def test_dequantize_linear_of_weights_is_not_folded_even_when_asked():
    """fold_dequantize=true lifts the rule on DequantizeLinear by name; the size guard still keeps
    an int8 weight that would grow fourfold."""
    wq = np.random.default_rng(1).integers(-128, 127, (256, 128)).astype(np.int8)
    model = make_model(
        [node("DequantizeLinear", ["wq", "scale", "zp"], ["w"]), node("MatMul", ["x", "w"], ["y"], name="mm")],
        [vi("x", [2, 256])], [vi("y", [2, 128])],
        [init("wq", wq, np.int8), init("scale", 0.01), init("zp", 0, np.int8)])
    out, st, _ = fold_both(model, fold_dequantize=True)
    assert ops(out) == ["DequantizeLinear", "MatMul"]
    assert st == stats(skipped_too_large=1)
    assert_no_growth(model, out)


def test_fp16_weights_cast_to_float_stay_fp16():
    """A model shipped in fp16 that computes in float keeps its weights fp16 on disk."""
    rng = np.random.default_rng(2)
    model = make_model(
        [node("Cast", ["w16"], ["w"], to=FLOAT), node("MatMul", ["x", "w"], ["y"], name="mm")],
        [vi("x", [3, 256])], [vi("y", [3, 256])], [init("w16", rng.standard_normal((256, 256)), np.float16)])
    out, st, _ = fold_both(model)
    assert ops(out) == ["Cast", "MatMul"]
    assert initializers(out)["w16"].dtype == np.float16
    assert st == stats(skipped_too_large=1)
    assert_no_growth(model, out)


def test_tied_embedding_transpose_is_kept_under_the_pipeline_limit():
    """A second, transposed copy of a 75 KiB table is 7.5% of this model: over the default
    limit (1%, at least 64 KiB); allowed once the user raises it with max_growth."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((300, 64)).astype(np.float32)
    body = rng.standard_normal((64, 64 * 60)).astype(np.float32)  # the rest of the model, ~1 MiB
    model = make_model(
        [node("Gather", ["w", "ids"], ["emb"], name="embed"), node("MatMul", ["emb", "body"], ["h"], name="body_mm"),
         node("Slice", ["h", "starts", "ends", "axes"], ["hs"], name="cut"),
         node("Transpose", ["w"], ["wt"], name="tr", perm=[1, 0]), node("MatMul", ["hs", "wt"], ["y"], name="head")],
        [vi("ids", [4], INT64)], [vi("y", [4, 300])],
        [init("w", w), init("body", body), init("starts", [0], np.int64), init("ends", [64], np.int64),
         init("axes", [1], np.int64)])
    feeds = [{"ids": np.array([0, 5, 7, 299], np.int64)}]
    out, st, _ = fold_both(model, feeds=feeds)
    assert ops(out) == ops(model)
    assert st == stats(skipped_too_large=1)
    assert_no_growth(model, out)

    raised = onnxopt.optimize(model, "cleanup", inputs=feeds, max_growth="10%")
    assert raised.passed and raised.validation.identical
    assert "Transpose" not in ops(raised.model)
    assert raised.model.ByteSize() > model.ByteSize() + w.nbytes - 1024


def test_a_weight_sliced_into_gates_by_two_steps_folds_without_growth():
    """An exported LSTM unrolled over two steps: each step slices the same 256 KiB weight into
    four gates. Folded together the slices free the weight, and the second step's slices are
    the first's values (one constant each): all eight fold, and the file does not grow."""
    w = np.random.default_rng(5).standard_normal((128, 512)).astype(np.float32)
    nodes, inits = [], [init("w", w), init("axis", [1], np.int64)]
    for gate in range(4):
        inits += [init(f"s{gate}", [128 * gate], np.int64), init(f"e{gate}", [128 * gate + 128], np.int64)]
    state = "x"
    for step in range(2):
        gates = []
        for gate in range(4):
            nodes += [node("Slice", ["w", f"s{gate}", f"e{gate}", "axis"], [f"w{step}{gate}"]),
                      node("MatMul", [state, f"w{step}{gate}"], [f"g{step}{gate}"], name=f"mm{step}{gate}")]
            gates.append(f"g{step}{gate}")
        nodes += [node("Sum", gates, [f"h{step}"], name=f"sum{step}"),
                  node("Tanh", [f"h{step}"], [f"t{step}"], name=f"tanh{step}")]
        state = f"t{step}"
    nodes.append(node("Identity", [state], ["y"], name="out"))
    model = make_model(nodes, [vi("x", [2, 128])], [vi("y", [2, 128])], inits)
    out, st, _ = fold_both(model)
    assert "Slice" not in ops(out)
    assert st["nodes_folded"] == 8 and st["skipped_too_large"] == 0 and st["constants_created"] == 4
    assert_no_growth(model, out)
    assert out.ByteSize() <= model.ByteSize()


# ----------------------------------------------------------------- dtypes

def test_fp16_and_scalars_keep_dtype_and_shape():
    model = make_model(
        [node("Cast", ["w32"], ["w16"], to=FLOAT16), node("Mul", ["w16", "h"], ["wh"]),
         node("ReduceMax", ["wh"], ["peak"], keepdims=0),
         node("Mul", ["x", "wh"], ["m"], name="live_mul"), node("Add", ["m", "peak"], ["y"], name="live_add")],
        [vi("x", [2, 2], FLOAT16)], [vi("y", [2, 2], FLOAT16)],
        [init("w32", [[0.1, 0.2], [0.3, 1000.0]]), init("h", 0.5, np.float16)])
    out, st, _ = fold_both(model)
    assert [n.name for n in out.graph.node] == ["live_mul", "live_add"]
    consts = initializers(out)
    assert consts["wh"].dtype == np.float16 and consts["wh"].shape == (2, 2)
    assert consts["peak"].dtype == np.float16 and consts["peak"].shape == ()
    expected = np.array([[0.1, 0.2], [0.3, 1000.0]], np.float32).astype(np.float16) * np.float16(0.5)
    np.testing.assert_array_equal(consts["wh"], expected)
    assert st == stats(nodes_folded=3, constants_created=2, bytes_created=10)


def test_bfloat16_result_is_stored_as_bfloat16():
    """ORT hands bfloat16 back as raw bytes; the stored constant keeps the type and the bits."""
    model = make_model(
        [node("Cast", ["w"], ["wb"], to=TensorProto.BFLOAT16), node("Relu", ["x"], ["y"], name="live")],
        [vi("x", [2])], [vi("y", [2]), vi("wb", [3], TensorProto.BFLOAT16)], [init("w", [1.0, -2.5, 3.140625])])
    out, result = run_pass_direct(model, "fold")
    assert result.stats == stats(nodes_folded=1, constants_created=1, bytes_created=6)
    assert ops(out) == ["Constant", "Relu"]
    value = out.graph.node[0].attribute[0].t
    assert value.data_type == TensorProto.BFLOAT16 and list(value.dims) == [3]
    np.testing.assert_array_equal(numpy_helper.to_array(value).astype(np.float32), [1.0, -2.5, 3.140625])
    assert interface(out) == interface(model)


# ----------------------------------------------------------------- graph outputs

def test_graph_output_that_becomes_constant_keeps_name_type_and_declared_shape():
    """A folded graph output is made by a Constant node under its own name; its declared
    (symbolic) shape stays; a live node may still read it."""
    model = make_model(
        [node("Add", ["a", "b"], ["c"]), node("Mul", ["x", "c"], ["y"], name="live")],
        [vi("x", [2])], [vi("y", [2]), vi("c", ["n"])],
        [init("a", [1.0, 2.0]), init("b", [3.0, 4.0])])
    out, st, _ = fold_both(model)
    assert ops(out) == ["Constant", "Mul"]
    assert out.graph.node[0].output[0] == "c" and out.graph.node[1].input[1] == "c"
    assert st == stats(nodes_folded=1, constants_created=1, bytes_created=8)
    np.testing.assert_array_equal(run_model(out, {"x": np.ones(2, np.float32)})["c"], np.array([4.0, 6.0], np.float32))
    # Idempotent: the Constant node producing a graph output is left as it is.
    again, result = run_pass_direct(out, "fold")
    assert result.modified is False and again.graph == out.graph


# ----------------------------------------------------------------- control flow

def branch(name: str, nodes, out: str) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [vi(out, [3])])


def test_folds_inside_if_branches_with_outer_constants():
    then_branch = branch("then", [
        const_node("t_k", [1.0, 1.0, 1.0]),
        node("Add", ["w", "t_k"], ["t_w"]),  # w comes from the outer scope
        node("Mul", ["x", "t_w"], ["t_out"], name="then_live")], "t_out")
    else_branch = branch("else", [
        node("Neg", ["w"], ["e_out"])], "e_out")  # a branch output that folds entirely
    model = make_model(
        [node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        [vi("x", [3]), vi("cond", [], TensorProto.BOOL)], [vi("y", [3])], [init("w", [1.0, 2.0, 3.0])])
    feeds = [{"x": np.array([1.0, 2.0, 3.0], np.float32), "cond": np.array(c)} for c in (True, False)]
    out, st, _ = fold_both(model, feeds=feeds)
    then_out, else_out = subgraph(out, "If", "then_branch"), subgraph(out, "If", "else_branch")
    assert ops(then_out) == ["Mul"] and ops(else_out) == ["Constant"]
    assert else_out.node[0].output[0] == "e_out" and else_out.output[0].name == "e_out"
    assert st == stats(nodes_folded=3, constant_nodes_replaced=1, constants_created=2, bytes_created=24,
                       skipped_control_flow=0)
    np.testing.assert_array_equal(run_model(out, feeds[1])["y"], np.array([-1.0, -2.0, -3.0], np.float32))


def test_loop_body_folds_outer_static_shapes_but_not_loop_carried_ones():
    """In a Loop body, Shape of a value from outside the loop folds; Shape of a loop-carried
    value (which grows each iteration) does not."""
    body = helper.make_graph(
        [node("Identity", ["cond_in"], ["cond_out"]),
         node("Shape", ["x"], ["xs"]),  # x: outer, static [2]
         node("Cast", ["xs"], ["xsf"], to=FLOAT),
         node("Concat", ["acc_in", "xsf"], ["acc_out"], axis=0, name="grow"),
         node("Shape", ["acc_in"], ["acc_shape"], name="carried_shape"),
         node("Cast", ["acc_shape"], ["acc_len"], to=FLOAT, name="carried_cast"),
         node("Identity", ["acc_len"], ["len_out"], name="scan_out")],
        "body",
        [vi("i", [], INT64), vi("cond_in", [], TensorProto.BOOL), vi("acc_in", None)],
        [vi("cond_out", [], TensorProto.BOOL), vi("acc_out", None), vi("len_out", None)])
    model = make_model(
        [node("Loop", ["n", "", "acc0"], ["acc", "lens"], body=body), node("Add", ["x", "x"], ["y"])],
        [vi("x", [2]), vi("n", [], INT64)], [vi("acc", ["len"]), vi("lens", ["n", 1]), vi("y", [2])],
        [init("acc0", [0.5])])
    feeds = [{"x": np.array([1.0, 2.0], np.float32), "n": np.array(3, np.int64)}]
    out, st, _ = fold_both(model, feeds=feeds)
    body_out = subgraph(out, "Loop", "body")
    assert [n.name for n in body_out.node if n.op_type != "Identity"] == ["grow", "carried_shape", "carried_cast"]
    np.testing.assert_array_equal(run_model(out, feeds[0])["lens"].ravel(), np.array([1.0, 2.0, 3.0], np.float32))
    assert st == stats(nodes_folded=2, constants_created=1, bytes_created=4)


# ----------------------------------------------------------------- what must not fold

def test_random_ops_and_training_dropout_are_not_folded():
    model = make_model(
        [node("RandomNormal", [], ["noise"], shape=[3], seed=1.0),
         node("RandomUniformLike", ["w"], ["noise2"], seed=2.0),
         node("Bernoulli", ["p"], ["coin"], seed=3.0),
         node("Dropout", ["w", "ratio", "train"], ["dropped"], seed=4),
         node("Add", ["noise", "noise2"], ["n12"]),
         node("Add", ["n12", "dropped"], ["n3"]),
         node("Add", ["n3", "coin"], ["y"])],
        [], [vi("y", [3])],
        [init("w", [1.0, 2.0, 3.0]), init("p", [0.5, 0.5, 0.5]), init("ratio", 0.5),
         init("train", True, np.bool_)])
    graph = G.import_graph(model)
    result = get_pass("fold")().run(graph, PassContext(opset=17))
    assert result.modified is False
    assert result.stats == stats(skipped_nondeterministic=4)
    assert [n.op for n in graph.nodes] == [n.op_type for n in model.graph.node]


def test_dropout_in_inference_mode_folds():
    model = make_model(
        [node("Dropout", ["w", "ratio"], ["d"]), node("Mul", ["x", "d"], ["y"], name="live")],
        [vi("x", [3])], [vi("y", [3])], [init("w", [1.0, 2.0, 3.0]), init("ratio", 0.5)])
    out, st, _ = fold_both(model)
    assert ops(out) == ["Mul"]
    assert st == stats(nodes_folded=1, constants_created=1, bytes_created=12)


def test_dequantize_of_constant_weight_is_kept_unless_asked():
    """QuantizeLinear of a float constant folds (to int8); DequantizeLinear is kept by default.

    (A Mul reads the weight: ORT fuses DequantizeLinear -> MatMul into an integer MatMul,
    which folding the DequantizeLinear would change: the reason it is kept by default.)
    """
    model = make_model(
        [node("QuantizeLinear", ["wf", "scale", "zp"], ["wq"]),
         node("DequantizeLinear", ["wq", "scale", "zp"], ["wd"]),
         node("Mul", ["x", "wd"], ["y"], name="live")],
        [vi("x", [2, 2])], [vi("y", [2, 2])],
        [init("wf", [[0.5, -1.0], [0.25, 2.0]]), init("scale", 0.25), init("zp", 0, np.int8)])
    out, st, _ = fold_both(model)
    assert ops(out) == ["DequantizeLinear", "Mul"]
    wq = initializers(out)["wq"]
    assert wq.dtype == np.int8
    np.testing.assert_array_equal(wq, np.array([[2, -4], [1, 8]], np.int8))
    assert st == stats(nodes_folded=1, constants_created=1, bytes_created=4, skipped_dequantize=1)

    out, st, _ = fold_both(model, fold_dequantize=True)
    assert ops(out) == ["Mul"]
    assert st == stats(nodes_folded=2, constants_created=1, bytes_created=16)


def test_unsupported_custom_op_is_left_and_counted():
    """An op neither ONNX Runtime nor onnx.reference knows stays; so do its consumers."""
    model = make_model(
        [node("Neg", ["w"], ["nw"]),
         node("Mystery", ["nw"], ["q"], domain="example.custom"),
         node("Abs", ["q"], ["aq"]),
         node("Add", ["x", "aq"], ["y"], name="live")],
        [vi("x", [2])], [vi("y", [2])], [init("w", [1.0, 2.0])],
        opsets={"": 17, "example.custom": 1}, check=False)
    graph = G.import_graph(model)
    result = get_pass("fold")().run(graph, PassContext(opset=17))
    assert result.stats == stats(nodes_folded=1, constants_created=1, bytes_created=8, skipped_unsupported=1)
    assert [n.op for n in graph.nodes] == ["Mystery", "Abs", "Add"]
    assert isinstance(graph.nodes[0].inputs[0], gs.Constant)


def test_overridable_initializers_are_not_constants():
    """Initializers also listed as graph inputs (IR >= 4) may be fed by the user. gs drops that
    listing; an importer that records it in ``graph.initializer_inputs`` keeps them unfolded."""
    model = make_model(
        [node("Add", ["a", "b"], ["c"]), node("Shape", ["a"], ["sa"]), node("Mul", ["x", "c"], ["m"], name="live"),
         node("Reshape", ["m", "sa"], ["y"], name="reshape")],
        [vi("x", [2]), vi("a", [2])], [vi("y", [2])], [init("a", [1.0, 2.0]), init("b", [3.0, 4.0])])
    graph = G.import_graph(model)
    graph.initializer_inputs = ["a"]
    result = get_pass("fold")().run(graph, PassContext(opset=17))
    assert result.modified is False
    assert [n.op for n in graph.nodes] == ["Add", "Shape", "Mul", "Reshape"]


def test_com_microsoft_op_that_onnxruntime_runs_folds():
    model = make_model(
        [node("FastGelu", ["w"], ["g"], domain="com.microsoft"), node("Add", ["x", "g"], ["y"], name="live")],
        [vi("x", [3])], [vi("y", [3])], [init("w", [-1.0, 0.0, 2.0])],
        opsets={"": 17, "com.microsoft": 1}, check=False)
    out, st, _ = fold_both(model)
    assert ops(out) == ["Add"]
    assert st == stats(nodes_folded=1, constants_created=1, bytes_created=12)


def test_sequences_are_evaluated_but_never_stored():
    """SequenceConstruct -> ConcatFromSequence folds to one tensor; the sequence itself is not a constant."""
    model = make_model(
        [node("SequenceConstruct", ["a", "b"], ["seq"]), node("ConcatFromSequence", ["seq"], ["cat"], axis=0),
         node("Add", ["x", "cat"], ["y"], name="live")],
        [vi("x", [4])], [vi("y", [4])], [init("a", [1.0, 2.0]), init("b", [3.0, 4.0])])
    out, st, _ = fold_both(model)
    assert ops(out) == ["Add"]
    np.testing.assert_array_equal(initializers(out)["cat"], np.array([1.0, 2.0, 3.0, 4.0], np.float32))
    assert st == stats(nodes_folded=2, constants_created=1, bytes_created=16)


def test_ir3_model_gets_constant_nodes_not_initializers():
    """Before IR 4 an initializer must be a graph input: folded values become Constant nodes."""
    model = make_model(
        [node("Add", ["a", "b"], ["c"]), node("Mul", ["x", "c"], ["y"], name="live")],
        [vi("x", [2]), vi("a", [2]), vi("b", [2])], [vi("y", [2])],
        [init("a", [1.0, 2.0]), init("b", [3.0, 4.0])], ir_version=3, opsets={"": 8})
    out, st, _ = fold_both(model, feeds=[{"x": np.array([1.0, 2.0], np.float32)}])
    assert ops(out) == ["Constant", "Mul"]
    assert st == stats(nodes_folded=1, constants_created=1, bytes_created=8)


def test_every_node_of_an_all_constant_model_folds_in_every_scope():
    """A model whose outputs are all computable at export time keeps only Constant nodes."""
    model = make_model(
        [node("Range", ["start", "limit", "delta"], ["r"]), node("Cast", ["r"], ["rf"], to=FLOAT),
         node("Softmax", ["rf"], ["y"]), node("Shape", ["rf"], ["n"])],
        [], [vi("y", [5]), vi("n", [1], INT64)],
        [init("start", 0, np.int64), init("limit", 5, np.int64), init("delta", 1, np.int64)])
    out, st, _ = fold_both(model, feeds=[{}])
    assert ops(out) == ["Constant", "Constant"]
    assert [n.output[0] for n in all_nodes(out)] == ["y", "n"]
    assert st == stats(nodes_folded=4, constants_created=2, bytes_created=28)
    assert all(len(n.input) == 0 for n in all_nodes(out))


def test_options_are_validated():
    model = make_model([node("Relu", ["x"], ["y"])], [vi("x")], [vi("y")])
    with pytest.raises(onnxopt.InputError):
        onnxopt.optimize(model, "fold(bad=1)")
    with pytest.raises(onnxopt.InputError):
        onnxopt.optimize(model, "fold(max_growth_bytes=big)")
