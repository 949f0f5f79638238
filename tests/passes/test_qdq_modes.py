"""qdq's modes (dynamic, auto), int8 embedding tables and SmoothQuant, each checked in ONNX Runtime
on small hand-built graphs."""

from __future__ import annotations

import collections

import numpy as np
import onnx
from onnx import numpy_helper

import onnxopt
from helpers import INT64, init, make_model, node, ort_optimized_ops, run_model, vi
from onnxopt import graph as G
from onnxopt.pipeline import PassContext

smooth_module = __import__("passes.qdq.smooth", fromlist=["smooth"])


def quantize(model, passes, data=None, inputs=None, **kw):
    result = onnxopt.optimize(model, passes, calibration=data, inputs=inputs if inputs is not None else data, **kw)
    assert result.passed, result.validation.headline()
    onnx.checker.check_model(result.model)
    record = next(r for r in result.records if r.name == "qdq")
    return result, record.stats, record.notes


def op_counts(model):
    return collections.Counter(n.op_type for n in model.graph.node)


def initializers(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def feeds(shape, n=4, seed=0, name="x", outliers=()):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal(shape).astype(np.float32)
        for c in outliers:
            x[..., c] *= 30.0
        out.append({name: x})
    return out


# ----------------------------------------------------------------- dynamic

def mlp():
    """MatMul (3-D activation) + bias, GELU-ish Relu, Gemm with transB and bias."""
    rng = np.random.default_rng(3)
    return make_model(
        [node("MatMul", ["x", "w1"], ["h0"], name="fc1"), node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
         node("Relu", ["h1"], ["h2"]), node("Reshape", ["h2", "shape"], ["h3"]),
         node("Gemm", ["h3", "w2", "b2"], ["y"], name="fc2", transB=1)],
        [vi("x", [2, 8, 16])], [vi("y", [16, 12])],
        [init("w1", rng.standard_normal((16, 32)) * 0.2), init("b1", rng.standard_normal(32) * 0.1),
         init("shape", [16, 32], np.int64), init("w2", rng.standard_normal((12, 32)) * 0.2),
         init("b2", rng.standard_normal(12) * 0.1)])


def test_dynamic_matmul_and_gemm_run_integer_kernels_close_to_float(tmp_path):
    model = mlp()
    data = feeds((2, 8, 16))
    # round to nearest: the layout is the point here (GPTQ codes: test_qdq_rounding.py); on these 32
    # rows of noise either rounding sits a near-tie flip from the 1-point top-1 limit
    result, stats, _ = quantize(model, "qdq(mode=dynamic,rounding=nearest)", data)
    out = result.model
    ops = op_counts(out)
    assert stats["dynamic_nodes"] == 2 and stats["weights_quantized"] == 2 and stats["dynamic_activations"] == 2
    assert ops["DynamicQuantizeLinear"] == 2 and ops["MatMulInteger"] == 2
    assert ops["MatMul"] == 0 and ops["Gemm"] == 0
    weights = {k: v for k, v in initializers(out).items() if v.dtype == np.int8 and v.ndim == 2}
    assert sorted(v.shape for v in weights.values()) == [(16, 32), (32, 12)]  # the transB weight as [K, N]
    scales = sorted(v.shape for k, v in initializers(out).items() if k.endswith("_w_scale"))
    assert scales == [(12,), (32,)]  # one scale per output column
    fused = ort_optimized_ops(out, tmp_path)
    assert fused["DynamicQuantizeMatMul"] + fused["MatMulIntegerToFloat"] == 2 and fused["MatMulInteger"] == 0
    for feed in data:
        ref, got = run_model(model, feed)["y"], run_model(out, feed, "all")["y"]
        assert cosine(ref, got) > 0.9995
        assert np.max(np.abs(ref - got)) < 0.03 * np.max(np.abs(ref))


def test_dynamic_needs_no_calibration_data():
    model = mlp()
    inputs = feeds((2, 8, 16), seed=1)
    result = onnxopt.optimize(model, "qdq(mode=dynamic)", inputs=inputs)
    assert result.passed
    stats = next(r for r in result.records if r.name == "qdq").stats
    assert stats["dynamic_nodes"] == 2 and "guard_min_cosine_ppm" not in stats


def test_dynamic_shares_one_quantization_per_activation_and_skips_activation_products():
    rng = np.random.default_rng(4)
    model = make_model(
        [node("MatMul", ["x", "wq"], ["q"], name="q"), node("MatMul", ["x", "wk"], ["k"], name="k"),
         node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), node("MatMul", ["q", "kt"], ["y"], name="scores")],
        [vi("x", [2, 5, 8])], [vi("y", [2, 5, 5])],
        [init("wq", rng.standard_normal((8, 8)) * 0.3), init("wk", rng.standard_normal((8, 8)) * 0.3)])
    result, stats, _ = quantize(model, "qdq(mode=dynamic)", feeds((2, 5, 8)), tolerance="min_cosine=0.99")
    assert stats["dynamic_nodes"] == 2 and stats["dynamic_activations"] == 1
    assert stats["skipped_dynamic_weight"] == 1  # q x k^T: two activations
    assert op_counts(result.model)["DynamicQuantizeLinear"] == 1


# ----------------------------------------------------------------- embeddings

def embedder(rows=200, dim=32, seed=5):
    """A word table (rows of varied norm) and a small position table, each read by a Gather."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((rows, dim)) * rng.uniform(0.01, 2.0, (rows, 1))
    return make_model(
        [node("Gather", ["table", "ids"], ["y"], name="embed"), node("Gather", ["small", "ids"], ["p"], name="pos")],
        [vi("ids", ["N", 6], INT64)], [vi("y", ["N", 6, dim]), vi("p", ["N", 6, dim])],
        [init("table", table), init("small", np.full((64, dim), 0.5))]), table


def id_feeds(n=3, rows=64):
    rng = np.random.default_rng(0)
    return [{"ids": rng.integers(0, rows, (2, 6)).astype(np.int64)} for _ in range(n)]


def test_embedding_table_becomes_int8_per_row(tmp_path):
    model, table = embedder()
    data = id_feeds()
    for mode in ("dynamic", "static"):
        result, stats, _ = quantize(model, f"qdq(mode={mode})", data)
        out = result.model
        assert stats["embeddings_quantized"] == 1 and stats["embedding_values"] == table.size
        inits = initializers(out)
        q = next(v for v in inits.values() if v.dtype == np.int8 and v.shape == table.shape)
        scale = next(v for k, v in inits.items() if k.startswith("table_scale"))
        assert scale.shape == (table.shape[0], 1)
        assert op_counts(out) == {"Gather": 3, "Cast": 1, "Mul": 1}  # int8 rows and their scales gathered
        assert "small" in inits and inits["small"].dtype == np.float32  # under MIN_VALUES: kept float
        # every row within half a step of its own scale
        err = np.abs(q.astype(np.float32) * scale - table)
        assert np.all(err <= scale * 0.5 + 1e-7)
        assert ort_optimized_ops(out, tmp_path)["DequantizeLinear"] == 0  # nothing dequantizes the whole table per run
        for feed in data:
            ref, got = run_model(model, feed)["y"], run_model(out, feed, "all")["y"]
            rel = np.abs(ref - got) / np.abs(table).max(1)[feed["ids"]][..., None]
            assert rel.max() < 0.5 / 127 + 1e-6
    result, stats, _ = quantize(model, "qdq(mode=dynamic,embeddings=false)", data, tolerance="atol=1e-6")
    assert "embeddings_quantized" not in stats and op_counts(result.model) == {"Gather": 2}


def test_embedding_table_at_an_old_opset():
    model, table = embedder()
    model.opset_import[0].version = 11
    result, stats, _ = quantize(model, "qdq(mode=dynamic)", id_feeds())
    assert stats["embeddings_quantized"] == 1 and op_counts(result.model)["Cast"] == 1


# ----------------------------------------------------------------- SmoothQuant

def smoothable(outlier_scale=20.0):
    """Three activations read by MatMuls: a LayerNorm output also read by a residual Add (a Mul is
    inserted), a LayerNorm output read only by a MatMul (absorbed into its scale and bias), and a
    decomposed LayerNorm affine (Mul, then Add of constants: absorbed)."""
    rng = np.random.default_rng(9)
    gamma = np.ones(16)
    gamma[[2, 11]] = outlier_scale  # outlier channels, as transformer LayerNorms have
    return make_model(
        [node("LayerNormalization", ["x", "g1", "b1"], ["n1"], name="ln1", axis=-1),
         node("MatMul", ["n1", "wq"], ["q"], name="q_proj"), node("MatMul", ["n1", "wk"], ["k"], name="k_proj"),
         node("Add", ["q", "k"], ["qk"]), node("Add", ["qk", "n1"], ["r"], name="residual"),
         node("LayerNormalization", ["r", "g2", "b2"], ["n2"], name="ln2", axis=-1),
         node("MatMul", ["n2", "w2"], ["h"], name="fc"),
         node("Mul", ["h", "g3"], ["hg"]), node("Add", ["hg", "b3"], ["hb"]),
         node("MatMul", ["hb", "w3"], ["y"], name="out_proj")],
        [vi("x", ["N", 5, 16])], [vi("y", ["N", 5, 16])],
        [init("g1", gamma), init("b1", rng.standard_normal(16) * 0.1),
         init("wq", rng.standard_normal((16, 16)) * 0.3), init("wk", rng.standard_normal((16, 16)) * 0.3),
         init("g2", gamma), init("b2", rng.standard_normal(16) * 0.1),
         init("w2", rng.standard_normal((16, 16)) * 0.3), init("g3", gamma[::-1].copy()),
         init("b3", rng.standard_normal(16) * 0.1), init("w3", rng.standard_normal((16, 16)) * 0.3)])


def test_smoothquant_alone_is_exact_in_float():
    model = smoothable()
    data = feeds((2, 5, 16), n=32)
    graph = G.import_graph(model)
    ctx = PassContext(opset=17, calibration=data, template=model)
    options = __import__("passes.qdq.options", fromlist=["o"]).QdqOptions()
    stats, notes = {}, []
    done = smooth_module.smooth_graph(graph, ctx, options, stats, notes)
    smoothed = ctx.export(graph)
    onnx.checker.check_model(smoothed)
    assert done == 3 and stats["smoothed_layers"] == 4 and stats["smooth_candidates"] == 3
    ops = op_counts(smoothed)
    assert ops["Mul"] == 2  # one inserted (n1 has a residual reader), the decomposed affine's own
    names = {n.name for n in smoothed.graph.node}
    assert any(n.endswith("_SmoothQuant") for n in names)
    inits = initializers(smoothed)
    g2 = next(v for k, v in inits.items() if k.startswith("g2"))
    assert not np.allclose(g2, initializers(model)["g2"])  # ln2's scale took the division
    for feed in data + feeds((3, 5, 16), seed=7):
        ref, got = run_model(model, feed)["y"], run_model(smoothed, feed, "all")["y"]
        np.testing.assert_allclose(got, ref, atol=1e-5 * max(1.0, np.abs(ref).max()), rtol=1e-5)


def test_smoothquant_lowers_static_error_on_outlier_channels():
    model = smoothable(outlier_scale=40.0)
    data = feeds((4, 5, 16), n=6)
    plain, _, _ = quantize(model, "qdq(mode=static,smooth=false)", data, tolerance="min_cosine=0.9")
    smooth, stats, notes = quantize(model, "qdq(mode=static,smooth=true)", data, tolerance="min_cosine=0.9")
    assert stats["smoothed_activations"] >= 1 and any("SmoothQuant" in n for n in notes)
    test = feeds((4, 5, 16), seed=11)[0]
    ref = run_model(model, test)["y"]
    err_plain = np.abs(run_model(plain.model, test, "all")["y"] - ref).mean()
    err_smooth = np.abs(run_model(smooth.model, test, "all")["y"] - ref).mean()
    assert err_smooth < 0.8 * err_plain


# ----------------------------------------------------------------- auto

def cnn():
    rng = np.random.default_rng(2)
    return make_model(
        [node("Conv", ["x", "w1", "c1"], ["a"], pads=[1, 1, 1, 1]), node("Relu", ["a"], ["ar"]),
         node("Conv", ["ar", "w2", "c2"], ["b"], pads=[1, 1, 1, 1]), node("Relu", ["b"], ["br"]),
         node("GlobalAveragePool", ["br"], ["p"]), node("Flatten", ["p"], ["f"]),
         node("Gemm", ["f", "wf", "bf"], ["y"], transB=1)],
        [vi("x", ["N", 8, 8, 8])], [vi("y", ["N", 10])],
        [init("w1", rng.standard_normal((32, 8, 3, 3)) * 0.15), init("c1", rng.standard_normal(32) * 0.1),
         init("w2", rng.standard_normal((32, 32, 3, 3)) * 0.06), init("c2", rng.standard_normal(32) * 0.1),
         init("wf", rng.standard_normal((10, 32)) * 0.3), init("bf", rng.standard_normal(10) * 0.1)])


def encoder_layer():
    """Post-LN transformer layer: Q/K/V projections, Softmax attention, FFN, LayerNorms; the LayerNorm
    output has some wider channels."""
    rng = np.random.default_rng(8)
    d = 32
    gamma = np.ones(d)
    gamma[[3, 17]] = 2.0
    names: list = []
    inits = []
    for shape in [(d, d), (d, d), (d, d), (d, d), (d, 4 * d), (4 * d, d)]:
        inits.append(init(f"w{len(names)}", rng.standard_normal(shape) * (0.5 / np.sqrt(shape[0]))))
        names.append(f"w{len(names)}")
    return make_model(
        [node("LayerNormalization", ["x", "g0", "b0"], ["n"], axis=-1),
         node("MatMul", ["n", "w0"], ["q"]), node("MatMul", ["n", "w1"], ["k"]), node("MatMul", ["n", "w2"], ["v"]),
         node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), node("MatMul", ["q", "kt"], ["s"]),
         node("Softmax", ["s"], ["p"], axis=-1), node("MatMul", ["p", "v"], ["c"]),
         node("MatMul", ["c", "w3"], ["o"]), node("Add", ["o", "n"], ["r"]),
         node("LayerNormalization", ["r", "g1", "b1"], ["n2"], axis=-1),
         node("MatMul", ["n2", "w4"], ["h"]), node("Relu", ["h"], ["hr"]), node("MatMul", ["hr", "w5"], ["f"]),
         node("Add", ["f", "n2"], ["y"])],
        [vi("x", ["N", 16, d])], [vi("y", ["N", 16, d])],
        inits + [init("g0", gamma), init("b0", np.zeros(d)), init("g1", gamma[::-1].copy()), init("b1", np.zeros(d))])


def test_auto_keeps_static_on_a_cnn_and_dynamic_on_a_transformer():
    result, stats, notes = quantize(cnn(), "qdq", feeds((2, 8, 8, 8), n=6), tolerance="min_cosine=0.98")
    assert stats["auto_chose_static"] == 1 and stats["quantized_Conv"] == 2
    assert stats["auto_static_bytes"] < 0.5 * stats["auto_dynamic_bytes"]  # dynamic leaves convolutions float
    assert any(n.startswith("mode=auto -> static") for n in notes)

    result, stats, notes = quantize(encoder_layer(), "qdq", feeds((2, 16, 32), n=6), tolerance="min_cosine=0.98")
    assert stats["auto_chose_dynamic"] == 1 and stats["dynamic_nodes"] == 6
    assert stats["auto_dynamic_bytes"] <= 1.02 * stats["auto_static_bytes"]  # attention and residuals stay float in both
    assert any(n.startswith("mode=auto -> dynamic") for n in notes)
    assert op_counts(result.model)["MatMulInteger"] == 6


def test_auto_choice_rule():
    modes = __import__("passes.qdq.modes", fromlist=["m"])
    # (mode, graph, result, cosine, bytes)
    assert modes.choose([("static", 0, 0, 0.995, 100), ("dynamic", 0, 0, 0.999, 300)], 0.99)[0] == "static"
    assert modes.choose([("static", 0, 0, 0.995, 100), ("dynamic", 0, 0, 0.999, 101)], 0.99)[0] == "dynamic"
    assert modes.choose([("static", 0, 0, 0.95, 100), ("dynamic", 0, 0, 0.999, 300)], 0.99)[0] == "dynamic"
    assert modes.choose([("static", 0, 0, 0.97, 100), ("dynamic", 0, 0, 0.96, 90)], 0.99)[0] == "static"


def test_mode_option_is_checked():
    import pytest
    from onnxopt.errors import InputError

    with pytest.raises(InputError):
        onnxopt.optimize(mlp(), "qdq(mode=fast)")
    with pytest.raises(InputError):
        onnxopt.optimize(mlp(), "qdq(smooth_alpha=1.5)")



def test_layers_in_if_bodies_are_counted_in_every_mode():
    """A model whose layers all sit in If branches (a sample-rate switch): every mode leaves it
    unchanged and says how many layers it did not reach."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(8)
    then = helper.make_graph([node("Conv", ["x", "w"], ["cv"], name="inner_conv"),
                              node("Reshape", ["cv", "flat"], ["f"]), node("MatMul", ["f", "m"], ["yt"], name="inner_mm")],
                             "then", [], [vi("yt", ["N", 4])])
    other = helper.make_graph([node("Reshape", ["x", "flat"], ["g"]), node("MatMul", ["g", "m"], ["ye"], name="else_mm")],
                              "else", [], [vi("ye", ["N", 4])])
    model = make_model([node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other)],
                       [vi("x", ["N", 2, 3, 3]), vi("c", [], TensorProto.BOOL)], [vi("y", ["N", 4])],
                       [init("w", rng.standard_normal((2, 2, 1, 1))), init("flat", [-1, 18], np.int64),
                        init("m", rng.standard_normal((18, 4)))])
    data = [{"x": f["x"], "c": np.array(i % 2 == 0)} for i, f in enumerate(feeds((1, 2, 3, 3)))]
    for mode, subgraph_layers in (("dynamic", 2), ("static", 3), ("auto", 3)):
        result, stats, _ = quantize(model, f"qdq(mode={mode})", data)
        assert not next(r for r in result.records if r.name == "qdq").modified
        assert stats["skipped_subgraph"] == subgraph_layers, (mode, stats)
        assert op_counts(result.model) == op_counts(model)
        for feed in data:
            np.testing.assert_array_equal(run_model(result.model, feed)["y"], run_model(model, feed)["y"])


def test_auto_leaves_a_model_float_when_quantizing_saves_no_bytes():
    """A 4x3 classifier head: its int8 weight, scales and quantize nodes take more bytes than the
    48 float values they replace, so auto mode keeps the float model and says why."""
    rng = np.random.default_rng(5)
    model = make_model([node("Gemm", ["x", "w", "b"], ["y"], name="head", transB=1)], [vi("x", ["N", 4])],
                       [vi("y", ["N", 3])], [init("w", rng.standard_normal((3, 4))), init("b", rng.standard_normal(3))])
    data = feeds((8, 4), seed=2)
    result, stats, notes = quantize(model, "qdq", data)
    assert not next(r for r in result.records if r.name == "qdq").modified
    assert stats["skipped_no_saving"] == 1 and any("left float" in n for n in notes)
    assert op_counts(result.model) == op_counts(model)
    np.testing.assert_array_equal(run_model(result.model, data[0])["y"], run_model(model, data[0])["y"])
    big = make_model([node("Gemm", ["x", "w", "b"], ["y"], name="head", transB=1)], [vi("x", ["N", 256])],
                     [vi("y", ["N", 64])], [init("w", rng.standard_normal((64, 256))), init("b", rng.standard_normal(64))])
    _, stats, _ = quantize(big, "qdq", feeds((8, 256), seed=2), output_kinds={"y": "other"})  # random scores
    assert "skipped_no_saving" not in stats and stats["weights_quantized"] == 1
