"""The ``qdq`` pass: QuantizeLinear/DequantizeLinear insertion with calibrated ranges.

Every rewritten model goes through ``onnxopt.optimize`` (pass manager, contracts, the ONNX
checker, validation in ONNX Runtime with graph optimizations on) and is checked for the exact
Q/DQ layout expected; the fused kernels ORT makes of it are read from its optimized model.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from helpers import init, make_model, node, ort_optimized_ops, outlier_mlp, vi
from onnxopt.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
qdq_module = __import__("passes.qdq", fromlist=["qdq"])


def feeds(shape, n=4, seed=0, name="x", relu=False):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal(shape).astype(np.float32)
        out.append({name: np.maximum(x, 0) if relu else x})
    return out


def static(passes):
    """The pipeline with qdq in static mode without SmoothQuant (this module checks that layout; the
    modes, SmoothQuant and embeddings: test_qdq_modes.py), weights rounded to nearest and the guard's
    layers taken back whole (GPTQ rounding and weights-only fallback: test_qdq_rounding.py)."""
    if "mode=" in passes:
        return passes
    fixed = "mode=static,smooth=false,rounding=nearest,fallback=float"
    return passes.replace("qdq(", f"qdq({fixed},") if "qdq(" in passes else passes.replace("qdq", f"qdq({fixed})")


def quantize(model, passes="qdq", data=None, **kw):
    result = onnxopt.optimize(model, static(passes), calibration=data, inputs=data, **kw)
    assert result.passed, result.validation.headline()
    onnx.checker.check_model(result.model)
    record = next(r for r in result.records if r.name == "qdq")
    return result, record.stats


def op_counts(model):
    return collections.Counter(n.op_type for n in model.graph.node)


def initializer(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def producer_of(model, name):
    return next((n for n in model.graph.node if name in n.output), None)


def readers_of(model, name):
    return [n for n in model.graph.node if name in n.input]


def dq_params(model, dq):
    return initializer(model, dq.input[0]), initializer(model, dq.input[1]), initializer(model, dq.input[2])


def qdq_stats(**changes):
    base = {"quantized_nodes": 0, "qdq_pairs": 0, "weights_quantized": 0, "biases_quantized": 0,
            "activations_calibrated": 0, "scales_shared": 0, "relu_clip_folded": 0}
    return {**base, **changes}


def skips(stats):
    return {k: v for k, v in stats.items() if k.startswith("skipped_") and v}


# ----------------------------------------------------------------- small hand-made graphs

def conv_relu_conv(opset=17, weight_in_constant_node=False):
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w1[2] *= 10  # per-channel scales must differ
    w2 = rng.standard_normal((2, 4, 1, 1)).astype(np.float32)
    nodes = [node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             node("Relu", ["c1"], ["r1"], name="relu1"),
             node("Conv", ["r1", "w2"], ["y"], name="conv2")]
    inits = [init("b1", rng.standard_normal(4)), init("w2", w2)]
    if weight_in_constant_node:
        nodes.insert(0, helper.make_node("Constant", [], ["w1"], name="w1_const",
                                         value=numpy_helper.from_array(w1, "w1v")))
    else:
        inits.append(init("w1", w1))
    model = make_model(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", ["N", 2, 6, 6])], inits,
                       opsets={"": opset})
    return model, w1


def test_conv_relu_conv_layout_scales_and_bias(tmp_path):
    model, w1 = conv_relu_conv()
    data = feeds((2, 3, 6, 6))
    result, stats = quantize(model, "qdq(method=minmax)", data)
    out = result.model
    assert stats == {**qdq_stats(quantized_nodes=2, qdq_pairs=3, weights_quantized=2, biases_quantized=1,
                                 activations_calibrated=3, relu_clip_folded=1, quantized_Conv=2,
                                 calibration_batches=8, calibration_synthetic=0),
                     "guard_min_cosine_ppm": stats["guard_min_cosine_ppm"],
                     "reduce_range": stats["reduce_range"], **({"cpu_int8_vnni": stats["cpu_int8_vnni"]}
                                                                  if "cpu_int8_vnni" in stats else {}),
                     **{k: 0 for k in stats if k.startswith("skipped_")}}
    ops = op_counts(out)
    assert ops == {"Conv": 2, "Relu": 1, "QuantizeLinear": 3, "DequantizeLinear": 6}
    # Q/DQ on the input x, after the Relu (Relu folded into conv1's range; none between Conv and Relu),
    # and on the graph output y, whose name now belongs to the DequantizeLinear (so ORT fuses conv2)
    assert producer_of(out, "y").op_type == "DequantizeLinear"
    conv1 = next(n for n in out.graph.node if n.name == "conv1")
    relu = next(n for n in out.graph.node if n.name == "relu1")
    assert producer_of(out, relu.input[0]) is conv1
    assert [n.op_type for n in readers_of(out, relu.output[0])] == ["QuantizeLinear"]
    # input activation: uint8, asymmetric, from the calibration min/max
    x = np.concatenate([f["x"] for f in data])
    dq_x = producer_of(out, conv1.input[0])
    s_x, z_x = initializer(out, dq_x.input[1]), initializer(out, dq_x.input[2])
    assert z_x.dtype == np.uint8
    assert s_x == pytest.approx((x.max() - x.min()) / 255, rel=1e-6)
    assert z_x == np.round(-x.min() / s_x)
    # Relu output: zero point 0, so ORT drops the Relu
    q_r = readers_of(out, relu.output[0])[0]
    assert initializer(out, q_r.input[2]) == 0
    # weights: int8, symmetric, one scale per output channel on axis 0
    dq_w = producer_of(out, conv1.input[1])
    assert dq_w.op_type == "DequantizeLinear" and helper.get_attribute_value(dq_w.attribute[0]) == 0
    q, s, z = dq_params(out, dq_w)
    assert q.dtype == np.int8 and z.dtype == np.int8 and not z.any()
    want = np.abs(w1).reshape(4, -1).max(axis=1) / (64 if stats["reduce_range"] else 127)
    assert np.allclose(s, want, rtol=1e-6) and s[2] > 5 * s[0]
    assert np.array_equal(q, np.round(w1 / want[:, None, None, None]).astype(np.int8))
    # bias: int32, scale = input scale x weight scale, zero point 0
    qb, sb, zb = dq_params(out, producer_of(out, conv1.input[2]))
    assert qb.dtype == np.int32 and zb.dtype == np.int32 and not zb.any()
    assert np.allclose(sb, s_x * s, rtol=1e-6)
    b1 = initializer(model, "b1")
    assert np.abs(qb * sb - b1).max() <= sb.max() / 2 + 1e-7
    # ORT fuses everything into integer kernels
    fused = ort_optimized_ops(out, tmp_path)
    assert fused["QLinearConv"] == 2 and "Relu" not in fused and fused["DequantizeLinear"] == 1  # output y


def test_weight_in_constant_node_and_reduce_range(tmp_path):
    model, w1 = conv_relu_conv(weight_in_constant_node=True)
    result, stats = quantize(model, "qdq(reduce_range=true)", feeds((2, 3, 6, 6)))
    assert stats["weights_quantized"] == 2 and stats["reduce_range"] == 1 and "cpu_int8_vnni" not in stats
    assert "Constant" not in op_counts(result.model)  # dce after the pass drops the float weight
    weights = {t.name for t in result.model.graph.initializer}
    for dq in (n for n in result.model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights):
        q = initializer(result.model, dq.input[0])
        if q.dtype == np.int8:
            assert np.abs(q).max() <= 64 and np.abs(q).max() >= 63


def test_reduce_range_auto_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(qdq_module, "cpu_has_vnni", lambda: False)
    monkeypatch.setattr(qdq_module.platform, "machine", lambda: "x86_64")
    assert qdq_module._reduce_range("auto") == (True, False)
    monkeypatch.setattr(qdq_module, "cpu_has_vnni", lambda: True)
    assert qdq_module._reduce_range("auto") == (False, True)
    monkeypatch.setattr(qdq_module.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(qdq_module, "cpu_has_vnni", lambda: False)
    assert qdq_module._reduce_range("auto") == (False, False)
    assert qdq_module._reduce_range("true") == (True, None)


@pytest.mark.parametrize("op,trans_b,axis", [("MatMul", 0, 1), ("Gemm", 0, 1), ("Gemm", 1, 0)])
def test_matmul_and_gemm_weight_axis(op, trans_b, axis):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((5, 3) if trans_b else (3, 5)).astype(np.float32)
    w[..., 1] *= 8 if not trans_b else 1
    attrs = {"transB": trans_b} if op == "Gemm" else {}
    ins = ["x", "w", "b"] if op == "Gemm" else ["x", "w"]
    inits = [init("w", w)] + ([init("b", rng.standard_normal(5))] if op == "Gemm" else [])
    model = make_model([node(op, ins, ["y"], name="mm", **attrs)], [vi("x", ["N", 3])], [vi("y", ["N", 5])], inits)
    result, stats = quantize(model, "qdq", feeds((8, 3)))
    assert stats["weights_quantized"] == 1 and stats["biases_quantized"] == (1 if op == "Gemm" else 0)
    out = result.model
    mm = next(n for n in out.graph.node if n.name == "mm")
    dq_w = producer_of(out, mm.input[1])
    assert helper.get_attribute_value(dq_w.attribute[0]) == axis
    _, s, _ = dq_params(out, dq_w)
    assert np.allclose(s, np.abs(w).max(axis=1 - axis) / (64 if stats["reduce_range"] else 127), rtol=1e-6)
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "y" for n in out.graph.node)  # float output


def test_conv_transpose_axis_1_and_grouped_bias():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)  # [C_in, C_out/group, k, k], group 2
    model = make_model([node("ConvTranspose", ["x", "w", "b"], ["y"], name="ct", group=2, strides=[2, 2])],
                       [vi("x", ["N", 4, 3, 3])], [vi("y", ["N", 6, 6, 6])],
                       [init("w", w), init("b", rng.standard_normal(6))])
    result, stats = quantize(model, "qdq", feeds((2, 4, 3, 3)))
    out = result.model
    ct = next(n for n in out.graph.node if n.name == "ct")
    _, s, _ = dq_params(out, producer_of(out, ct.input[1]))
    assert s.shape == (3,) and helper.get_attribute_value(producer_of(out, ct.input[1]).attribute[0]) == 1
    _, sb, _ = dq_params(out, producer_of(out, ct.input[2]))
    s_x = initializer(out, producer_of(out, ct.input[0]).input[1])
    assert np.allclose(sb, s_x * np.tile(s, 2), rtol=1e-6)
    assert stats["quantized_ConvTranspose"] == 1 and stats["biases_quantized"] == 1


def test_shape_ops_share_their_input_scale(tmp_path):
    """Conv -> Relu -> MaxPool -> Flatten -> Gemm: MaxPool and Flatten take the Relu output's scale."""
    rng = np.random.default_rng(4)
    model = make_model(
        [node("Conv", ["x", "w"], ["c"], name="conv"), node("Relu", ["c"], ["r"], name="relu"),
         node("MaxPool", ["r"], ["m"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
         node("Flatten", ["m"], ["f"], name="flat"), node("Gemm", ["f", "wg", "bg"], ["y"], name="fc", transB=1)],
        [vi("x", ["N", 2, 4, 4])], [vi("y", ["N", 3])],
        [init("w", rng.standard_normal((4, 2, 1, 1))), init("wg", rng.standard_normal((3, 16))),
         init("bg", rng.standard_normal(3))])
    result, stats = quantize(model, "qdq", feeds((4, 2, 4, 4)))
    out = result.model
    assert stats["scales_shared"] == 2 and stats["qdq_pairs"] == 4 and stats["activations_calibrated"] == 2
    scale_of = {n.input[0]: n.input[1] for n in out.graph.node if n.op_type == "QuantizeLinear"}
    assert scale_of["r"] == scale_of["m"] == scale_of["f"] != scale_of["x"]
    fused = ort_optimized_ops(out, tmp_path)
    assert fused["QLinearConv"] == 1 and fused["QGemm"] == 1 and "DequantizeLinear" not in fused


def test_residual_add_and_concat_in_a_cnn(tmp_path):
    rng = np.random.default_rng(5)
    model = make_model(
        [node("Conv", ["x", "w1"], ["a"], name="c1"), node("Conv", ["x", "w2"], ["b"], name="c2"),
         node("Add", ["a", "b"], ["s"], name="add"), node("Concat", ["s", "a"], ["cat"], name="cat", axis=1),
         node("Conv", ["cat", "w3"], ["y"], name="c3")],
        [vi("x", ["N", 2, 4, 4])], [vi("y", ["N", 2, 4, 4])],
        [init("w1", rng.standard_normal((3, 2, 1, 1))), init("w2", rng.standard_normal((3, 2, 1, 1))),
         init("w3", rng.standard_normal((2, 6, 1, 1)))])
    result, stats = quantize(model, "qdq", feeds((4, 2, 4, 4)))
    assert stats["quantized_Add"] == 1 and stats["quantized_Concat"] == 1 and stats["quantized_Conv"] == 3
    assert stats["qdq_pairs"] == 6  # x, a, b, s, cat, y
    fused = ort_optimized_ops(result.model, tmp_path)
    assert fused["QLinearAdd"] == 1 and fused["QLinearConcat"] == 1 and fused["QLinearConv"] == 3


def test_no_qdq_around_ops_ort_cannot_fuse():
    """Softmax, Sigmoid, Div stay float and read float tensors; Q/DQ only where a fused kernel reads them."""
    rng = np.random.default_rng(6)
    model = make_model(
        [node("MatMul", ["x", "w"], ["m"], name="mm"), node("Softmax", ["m"], ["sm"], name="softmax", axis=-1),
         node("Sigmoid", ["sm"], ["sg"], name="sig"), node("Div", ["sg", "x2"], ["y"], name="div")],
        [vi("x", ["N", 4]), vi("x2", ["N", 4])], [vi("y", ["N", 4])], [init("w", rng.standard_normal((4, 4)))])
    data = [{"x": f["x"], "x2": f["x"] ** 2 + 1} for f in feeds((6, 4))]
    result, stats = quantize(model, "qdq", data)
    out = result.model
    quantized = {n.input[0] for n in out.graph.node if n.op_type == "QuantizeLinear"}
    assert quantized == {"x"}
    for n in out.graph.node:
        if n.op_type in ("Softmax", "Sigmoid", "Div"):
            assert all(producer_of(out, i) is None or producer_of(out, i).op_type != "DequantizeLinear"
                       for i in n.input)
    assert stats["skipped_fragile"] == 0 and stats["quantized_MatMul"] == 1


def transformer_block():
    """MatMul(weight) -> Add(bias) -> attention-ish MatMul of two activations -> Softmax; residual Add."""
    rng = np.random.default_rng(7)
    return make_model(
        [node("MatMul", ["x", "wq"], ["q0"], name="q_proj"), node("Add", ["q0", "bq"], ["q"], name="q_bias"),
         node("Transpose", ["q"], ["qt"], name="qt", perm=[0, 2, 1]),
         node("MatMul", ["q", "qt"], ["att"], name="scores"), node("Softmax", ["att"], ["p"], name="softmax", axis=-1),
         node("MatMul", ["p", "q"], ["ctx"], name="context"), node("Add", ["ctx", "x"], ["y"], name="residual")],
        [vi("x", ["N", 5, 4])], [vi("y", ["N", 5, 4])],
        [init("wq", rng.standard_normal((4, 4)) * 0.3), init("bq", rng.standard_normal(4))])


def test_fragile_transformer_patterns_stay_float_by_default():
    model = transformer_block()
    data = feeds((2, 5, 4))
    result, stats = quantize(model, "qdq", data)
    assert stats["quantized_nodes"] == 1 and stats["quantized_MatMul"] == 1
    assert skips(stats) == {"skipped_fragile": 3, "skipped_constant_input": 1}  # scores, context, residual; bias Add
    assert op_counts(result.model)["QuantizeLinear"] == 1
    # asked for explicitly, the attention MatMuls and the residual Add are quantized too
    result, stats = quantize(model, "qdq(op_types=MatMul;Add)", data, tolerance="min_cosine=0.9")
    assert stats["quantized_MatMul"] == 3 and stats["quantized_Add"] == 1 and "skipped_fragile" not in skips(stats)


def test_accuracy_guard_returns_the_most_sensitive_layer_to_float(caplog):
    """x has a feature that is 0 except for one huge outlier (and no weight reads it): its range
    wipes out every other feature of mm1's input. The guard finds mm1 and leaves it float."""
    model = outlier_mlp()
    data = feeds((8, 16), n=4)
    for f in data:
        f["x"][:, 0] = 0
    data[0]["x"][0, 0] = 5000.0
    result, stats = quantize(model, "qdq(method=minmax)", data)
    assert stats["fallback_nodes"] == 1 and stats["quantized_nodes"] == 1 and stats["quantized_MatMul"] == 1
    assert stats["guard_min_cosine_ppm"] >= 990000
    notes = [n for r in result.records for n in r.notes]
    assert any("layer 'mm1' back to float" in n for n in notes)
    assert "note (qdq): layer 'mm1' back to float" in result.summary()
    mm1 = next(n for n in result.model.graph.node if n.name == "mm1")
    assert mm1.input[0] == "x" and initializer(result.model, mm1.input[1]).dtype == np.float32
    mm2 = next(n for n in result.model.graph.node if n.name == "mm2")
    assert producer_of(result.model, mm2.input[1]).op_type == "DequantizeLinear"
    assert result.validation.outputs[0].cosine > 0.999
    # guard=false keeps both layers quantized: no check, no fallback
    result = onnxopt.optimize(model, static("qdq(method=minmax,guard=false)"), calibration=data, validate=False)
    stats = next(r for r in result.records if r.name == "qdq").stats
    assert stats["quantized_MatMul"] == 2 and "fallback_nodes" not in stats and "guard_min_cosine_ppm" not in stats


def test_exclude_by_glob_and_op_types():
    model, _ = conv_relu_conv()
    data = feeds((2, 3, 6, 6))
    result, stats = quantize(model, "qdq(exclude=conv2*)", data)
    assert stats["quantized_Conv"] == 1 and stats["skipped_excluded"] == 1
    conv2 = next(n for n in result.model.graph.node if n.name == "conv2")
    assert initializer(result.model, conv2.input[1]).dtype == np.float32
    result, stats = quantize(model, "qdq(op_types=Gemm)", data)
    assert not result.records[0].modified and stats["quantized_nodes"] == 0
    assert op_counts(result.model) == op_counts(model)


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_int8_symmetric_activations(tmp_path, method):
    model, _ = conv_relu_conv()
    result, stats = quantize(model, f"qdq(activation_type=int8,method={method})", feeds((2, 3, 6, 6)))
    zps = {q.input[0]: initializer(result.model, q.input[2]) for q in result.model.graph.node
           if q.op_type == "QuantizeLinear"}
    assert all(z.dtype == np.int8 for z in zps.values())
    assert zps["x"] == 0 and zps["y_float"] == 0 and zps["r1"] == -128  # the folded Relu: one-sided, as ORT needs
    assert ort_optimized_ops(result.model, tmp_path)["QLinearConv"] == 2


def test_low_opsets_raise_to_13_for_per_channel_weights():
    model, w1 = conv_relu_conv(opset=11)
    result, stats = quantize(model, "qdq", feeds((2, 3, 6, 6)))
    assert stats["opset_raised_to_13"] == 1 and "per_tensor_low_opset" not in stats
    assert stats["quantized_Conv"] == 2
    assert next(o.version for o in result.model.opset_import if o.domain == "") == 13
    conv1 = next(n for n in result.model.graph.node if n.name == "conv1")
    scale = initializer(result.model, producer_of(result.model, conv1.input[1]).input[1])
    np.testing.assert_allclose(scale, np.abs(w1).max(axis=(1, 2, 3)) / 127, rtol=1e-6)


def test_low_opsets_fall_back_or_skip(monkeypatch):
    import passes.qdq as qdq_module

    monkeypatch.setattr(qdq_module, "raise_opset", lambda graph, model: "no adapter")
    model, _ = conv_relu_conv(opset=11)
    result, stats = quantize(model, "qdq", feeds((2, 3, 6, 6)))
    assert stats["per_tensor_low_opset"] == 1 and stats["quantized_Conv"] == 2
    assert next(o.version for o in result.model.opset_import if o.domain == "") == 11
    for dq in (n for n in result.model.graph.node if n.op_type == "DequantizeLinear"):
        assert not dq.attribute and initializer(result.model, dq.input[1]).ndim == 0
    model, _ = conv_relu_conv(opset=9)
    result, stats = quantize(model, "qdq", feeds((2, 3, 6, 6)))
    assert stats == {**qdq_stats(), "skipped_opset_below_10": 1}
    assert op_counts(result.model) == op_counts(model)


def test_subgraphs_and_quantized_models_are_left_alone():
    rng = np.random.default_rng(8)
    w = init("w", rng.standard_normal((2, 2, 1, 1)))
    branch = helper.make_graph([node("Conv", ["x", "w"], ["yb"], name="inner_conv")], "then", [],
                               [vi("yb", ["N", 2, 3, 3])])
    other = helper.make_graph([node("Identity", ["x"], ["ye"], name="inner_id")], "else", [], [vi("ye", ["N", 2, 3, 3])])
    model = make_model([node("If", ["c"], ["y"], name="if", then_branch=branch, else_branch=other)],
                       [vi("x", ["N", 2, 3, 3]), vi("c", [], TensorProto.BOOL)], [vi("y", ["N", 2, 3, 3])], [w])
    data = [{"x": f["x"], "c": np.array(True)} for f in feeds((1, 2, 3, 3))]
    result, stats = quantize(model, "qdq", data)
    assert stats["skipped_subgraph"] == 1 and stats["quantized_nodes"] == 0
    assert not result.records[0].modified and op_counts(result.model) == op_counts(model)

    done, _ = quantize(conv_relu_conv()[0], "qdq", feeds((2, 3, 6, 6)))
    again, stats = quantize(done.model, "qdq", feeds((2, 3, 6, 6)))
    assert stats == {**qdq_stats(), "skipped_already_quantized": 1}


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_methods_on_the_digits_mlp(method):
    result, stats = quantize(str(MODELS / "digits_mlp.onnx"), f"qdq(method={method},samples=128)",
                             str(MODELS / "digits_calib.npz"))
    # one sample at a time; a third of the 128 (42) held out of fitting for the guard (onnxopt/holdout.py)
    assert stats["quantized_Gemm"] == 3 and stats["calibration_batches"] == 86
    assert stats["guard_held_out_samples"] == 42
    assert result.validation.outputs[0].cosine > 0.999


def test_methods_give_different_scales():
    """Real data through the digits CNN: the KL search clips some activations (on the MLP's few
    hundred values per tensor it keeps every range: too few values for a 2048-bin search)."""
    model = str(MODELS / "digits_cnn.onnx")
    scales = {}
    for method in ("minmax", "entropy"):
        result, _ = quantize(model, f"cleanup,qdq(method={method},samples=360,guard=false)", str(MODELS / "digits_calib.npz"))
        scales[method] = [float(initializer(result.model, n.input[1])) for n in result.model.graph.node
                          if n.op_type == "QuantizeLinear"]
    assert all(e <= m for e, m in zip(scales["entropy"], scales["minmax"])), scales
    assert sum(e < 0.95 * m for e, m in zip(scales["entropy"], scales["minmax"])) >= 2, scales


def test_digits_cnn_accuracy_and_fusion(tmp_path):
    """The shipped CNN: cleanup then qdq, calibrated on the calibration split, tested on the test split."""
    result, stats = quantize(str(MODELS / "digits_cnn.onnx"), "cleanup,qdq", str(MODELS / "digits_calib.npz"))
    result = onnxopt.optimize(str(MODELS / "digits_cnn.onnx"), "cleanup,qdq",
                              calibration=str(MODELS / "digits_calib.npz"), inputs=str(MODELS / "digits_test.npz"))
    assert result.passed
    out = result.validation.outputs[0]
    assert out.accuracy_reference - out.accuracy_candidate <= 0.005
    stats = next(r for r in result.records if r.name == "qdq").stats
    assert {k: stats[k] for k in ("quantized_Conv", "quantized_Gemm", "quantized_GlobalAveragePool",
                                  "relu_clip_folded", "weights_quantized", "biases_quantized")} == {
        "quantized_Conv": 3, "quantized_Gemm": 1, "quantized_GlobalAveragePool": 1, "relu_clip_folded": 3,
        "weights_quantized": 4, "biases_quantized": 4}
    fused = ort_optimized_ops(result.model, tmp_path)
    assert fused["QLinearConv"] == 3 and fused["QGemm"] == 1 and fused["QLinearGlobalAveragePool"] == 1
    assert "DequantizeLinear" not in fused and "Relu" not in fused
    assert result.to_dict()  # the report carries the stats
    sizes = result.model.ByteSize(), onnxopt.load(str(MODELS / "digits_cnn.onnx")).ByteSize()
    assert sizes[0] < 0.45 * sizes[1]


def test_unfolded_batchnorm_is_left_for_cleanup(caplog):
    # with prerequisites off (by default fold_bn runs first: tests/test_cli.py)
    result, stats = quantize(str(MODELS / "digits_cnn.onnx"), "qdq(samples=64,prerequisites=false)", str(MODELS / "digits_calib.npz"))
    assert stats["skipped_batchnorm_not_folded"] == 3 and stats.get("quantized_Conv", 0) == 0
    assert any("run 'cleanup' first" in n for r in result.records for n in r.notes)


# ----------------------------------------------------------------- bad calibration data

@pytest.mark.parametrize("data,message", [
    ({"images": np.zeros((4, 1, 8, 8), np.float32)}, "has array 'images' but the model's inputs are: input"),
    ({"input": np.zeros((4, 1, 8, 8), np.float64)}, "input 'input' must be float32, calibration data has float64"),
    ({"input": np.zeros((4, 8, 8, 1), np.float32)}, "dimension 1 differs"),
    ("EMPTY", "folder holds no .npz or .npy files"),
])
def test_bad_calibration_data_is_a_clear_input_error(data, message, tmp_path):
    if data == "EMPTY":
        data = str(tmp_path)
    with pytest.raises(InputError, match=message):
        onnxopt.optimize(str(MODELS / "digits_mlp.onnx"), "qdq", calibration=data,
                         inputs=str(MODELS / "digits_test.npz"))


def test_option_errors():
    with pytest.raises(InputError, match="percentile must be in"):
        onnxopt.optimize(str(MODELS / "digits_mlp.onnx"), "qdq(percentile=20)")
    with pytest.raises(InputError, match="cannot quantize 'Softmax'"):
        onnxopt.optimize(str(MODELS / "digits_mlp.onnx"), "qdq(op_types=Softmax)")
    with pytest.raises(InputError, match="option 'method'"):
        onnxopt.optimize(str(MODELS / "digits_mlp.onnx"), "qdq(method=kl)")


def test_batches_are_cut_to_single_samples_only_when_the_batch_axis_is_symbolic():
    rng = np.random.default_rng(10)
    # symbolic: 32 samples, 16 of them held out of fitting for the guard; fixed: 2 feeds, too few to split
    for batch_dim, want, held in (("N", 16, 16), (16, 2, None)):
        model = make_model([node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", [batch_dim, 4])],
                           [vi("y", [batch_dim, 3])], [init("w", rng.standard_normal((4, 3)))])
        data = [{"x": rng.standard_normal((16, 4)).astype(np.float32)} for _ in range(2)]
        _, stats = quantize(model, "qdq", data)
        assert stats["calibration_batches"] == want and stats["quantized_MatMul"] == 1
        assert stats.get("guard_held_out_samples") == held


def test_iterable_calibration_through_the_api():
    gen = ({"input": np.random.default_rng(i).random((8, 1, 8, 8)).astype(np.float32)} for i in range(6))
    result = onnxopt.optimize(str(MODELS / "digits_mlp.onnx"), static("qdq"), calibration=gen,
                              inputs=str(MODELS / "digits_test.npz"))
    assert result.passed
    stats = next(r for r in result.records if r.name == "qdq").stats
    assert stats["calibration_batches"] == 32 and stats["guard_held_out_samples"] == 16  # of 48 samples


def wide_channel_conv_layernorm(opset=12):
    """Conv whose output channels span 100x in weight range (as after BatchNormalization folding),
    then a LayerNorm over channels written out (ReduceMean, Sub, Pow, Sqrt, Div), as in
    PP-OCR's recognizer: one weight scale for all channels leaves the small ones ~1 level."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 8, 1, 1)).astype(np.float32) * 0.2
    w[3, 7] = 20.0  # a wide channel reading an input channel that is near 0 (see the data below)
    nodes = [node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             node("ReduceMean", ["c"], ["mu"], axes=[1], keepdims=1),
             node("Sub", ["c", "mu"], ["d"]), node("Pow", ["d", "two"], ["d2"]),
             node("ReduceMean", ["d2"], ["var"], axes=[1], keepdims=1),
             node("Add", ["var", "eps"], ["ve"]), node("Sqrt", ["ve"], ["sd"]),
             node("Div", ["d", "sd"], ["y"])]
    inits = [init("w", w), init("b", rng.standard_normal(16) * 0.1), init("two", np.array(2.0)),
             init("eps", np.array(1e-5))]
    return make_model(nodes, [vi("x", ["N", 8, 4, 4])], [vi("y", ["N", 16, 4, 4])], inits, opsets={"": opset})


def test_per_tensor_weights_collapse_a_normalised_output_and_per_channel_keeps_it():
    model = wide_channel_conv_layernorm()
    data, check = feeds((8, 8, 4, 4), seed=1), feeds((8, 8, 4, 4), seed=2)
    for f in data + check:
        f["x"][:, 7] *= 0.01
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def cosine(m):
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        a = np.concatenate([ref.run(None, f)[0].ravel() for f in check]).astype(np.float64)
        b = np.concatenate([sess.run(None, f)[0].ravel() for f in check]).astype(np.float64)
        return a @ b / np.sqrt((a @ a) * (b @ b))

    result, stats = quantize(model, "qdq", data)
    assert stats["opset_raised_to_13"] == 1 and stats["quantized_Conv"] == 1 and "fallback_nodes" not in stats
    assert cosine(result.model) > 0.99
    # per tensor, the guard must return the Conv to float to keep the output at all
    flat = onnxopt.optimize(model, "qdq(per_channel=false)", calibration=data, validate=False)
    flat_stats = next(r for r in flat.records if r.name == "qdq").stats
    assert flat_stats["fallback_nodes"] == 1 and flat_stats["quantized_nodes"] == 0


def test_accuracy_guard_ranks_layers_by_their_effect_on_the_output():
    """Two layers read an input with a huge outlier feature (their 8-bit input wipes out the other
    features): mm1 feeds the output, decoy's path is scaled by 1e-4 before it joins. decoy adds the
    most error locally, but returning it to float does not help the output: only mm1 goes back, and
    the note gives its measured gain and the bytes it keeps float (16x16 float32 over int8)."""
    rng = np.random.default_rng(9)
    w1 = rng.standard_normal((16, 16)).astype(np.float32)
    w1[0] = 0
    wd = rng.standard_normal((16, 16)).astype(np.float32)
    wd[0] = 0
    model = make_model([node("MatMul", ["x", "w1"], ["h"], name="mm1"), node("Relu", ["h"], ["r"], name="relu"),
                        node("MatMul", ["r", "w2"], ["ym"], name="mm2"),
                        node("MatMul", ["x2", "wd"], ["hd"], name="decoy"),
                        node("Relu", ["hd"], ["rd"], name="relu_d"),
                        node("MatMul", ["rd", "wt"], ["yd"], name="tail"),
                        node("Add", ["ym", "yd"], ["y"], name="join")],
                       [vi("x", ["N", 16]), vi("x2", ["N", 16])], [vi("y", ["N", 4])],
                       [init("w1", w1), init("w2", rng.standard_normal((16, 4))), init("wd", wd),
                        init("wt", rng.standard_normal((16, 4)) * 1e-4)])
    data = [{"x": f["x"], "x2": g["x"]} for f, g in zip(feeds((8, 16), n=4), feeds((8, 16), n=4, seed=3))]
    for f in data:
        f["x"][:, 0] = 0
        f["x2"][:, 0] = 0
    data[0]["x"][0, 0] = 5000.0
    data[0]["x2"][0, 0] = 50000.0
    result, stats = quantize(model, "qdq(method=minmax)", data)
    assert stats["fallback_nodes"] == 1 and stats["guard_min_cosine_ppm"] >= 990000
    notes = [n for r in result.records for n in r.notes]
    assert any(n.startswith("layer 'mm1' back to float") and "768 bytes kept float" in n for n in notes), notes
    assert not any("'decoy'" in n for n in notes)
    decoy = next(n for n in result.model.graph.node if n.name == "decoy")
    assert producer_of(result.model, decoy.input[1]).op_type == "DequantizeLinear"


def test_mixed_precision_returns_the_planted_sensitive_layer_first_and_reports_the_trade_curve():
    """Four MatMuls; mm2 reads a second input whose feature 0 is 0 except for one huge outlier (no
    weight reads it), so its 8-bit input wipes out the other features. Measured end to end, mm2 goes
    back to float first and alone, the others stay quantized, and the trade curve (weights, score)
    grows in size step by step."""
    rng = np.random.default_rng(4)
    ws = [(rng.standard_normal((16, n)) / 4).astype(np.float32) for n in (16, 16, 16, 3)]
    ws[2][0] = 0
    ws[3] *= 8  # three decisive class scores: no near-ties for 8-bit noise to flip
    model = make_model([node("MatMul", ["x", "w0"], ["h0"], name="mm0"), node("Relu", ["h0"], ["r0"], name="relu0"),
                        node("MatMul", ["r0", "w1"], ["h1"], name="mm1"),
                        node("MatMul", ["x2", "w2"], ["h2"], name="mm2"),
                        node("Add", ["h1", "h2"], ["s"], name="join"),
                        node("MatMul", ["s", "w3"], ["h3"], name="mm3"),
                        node("Softmax", ["h3"], ["y"], name="out", axis=-1)],
                       [vi("x", ["N", 16]), vi("x2", ["N", 16])], [vi("y", ["N", 3])],
                       [init(f"w{i}", w) for i, w in enumerate(ws)])
    data = [{"x": f["x"], "x2": g["x"]} for f, g in zip(feeds((8, 16), n=4), feeds((8, 16), n=4, seed=3))]
    for f in data:
        f["x2"][:, 0] = 0
    data[0]["x2"][0, 0] = 5000.0
    result, stats = quantize(model, "qdq(method=minmax)", data)
    notes = [n for r in result.records for n in r.notes]
    fallen = [n.split("'")[1] for n in notes if n.startswith("layer '")]
    assert fallen[0] == "mm2" and "mm0" not in fallen and "mm1" not in fallen, notes
    gains = [float(n.split("gain ")[1].split(" ")[0]) for n in notes if n.startswith("layer '")]
    assert gains[0] > 10 * max(gains[1:], default=0)  # the planted layer recovers nearly everything
    assert stats["fallback_nodes"] == len(fallen) and stats["quantized_MatMul"] == 4 - len(fallen)
    assert stats["guard_min_cosine_ppm"] >= 990000 and stats["guard_argmax_agreement_ppm"] >= 990000
    curve = next(n for n in notes if n.startswith("size/accuracy trade curve"))
    units = {"bytes": 1, "KiB": 1024, "MiB": 2**20}
    sizes = [float(p.split()[0]) * units[p.split()[1]] for p in curve.split(": ", 1)[1].split("; ")]
    assert len(sizes) == len(fallen) + 1 and sizes == sorted(sizes) and len(set(sizes)) == len(sizes), curve
    assert "note (qdq): size/accuracy trade curve" in result.summary()


def test_guard_scores_argmax_agreement_on_class_and_sequence_outputs_only():
    g = qdq_module.guard
    seq = make_model([node("MatMul", ["x", "w"], ["l"]), node("Softmax", ["l"], ["p"], axis=-1),
                      node("Identity", ["x"], ["e"])],
                     [vi("x", ["N", 5, 4])], [vi("p", ["N", 5, 6]), vi("e", ["N", 5, 4])],
                     [init("w", np.ones((4, 6)))])
    assert g.score_outputs(seq) == {"p"}  # the embedding-like pass-through is not class scores
    logits = make_model([node("MatMul", ["x", "w"], ["y"])], [vi("x", ["N", 4])], [vi("y", ["N", 6])],
                        [init("w", np.ones((4, 6)))])
    assert g.score_outputs(logits) == set()  # raw MatMul output: maybe a regression, cosine only
    check = object.__new__(g.Guard)
    check.target, check.min_agreement = 0.99, 0.99
    assert check.holds(g.Score(0.995, 0.995)) and not check.holds(g.Score(0.995, 0.98))
    assert check.holds(g.Score(0.995, None))
    assert check.shortfall(g.Score(0.98, 0.97)) == pytest.approx(2.0 + 3.0)
    # a sequence is judged per position: one flip in sample 1 (of 2 samples, 6 positions) is 1 of 12
    ref = np.eye(3)[np.zeros((2, 6), int)]
    got = ref.copy()
    got[1, 4] = [0, 1, 0]
    assert g._agreeing(ref, got).tolist() == [True] * 10 + [False, True]
    assert g._agreeing(ref.transpose(1, 0, 2), got.transpose(1, 0, 2)).sum() == 11  # time-major
    assert g._agreeing(ref[:, 0], got[:, 4]).tolist() == [True, False]  # class scores: one per sample


def test_only_quantizes_the_named_nodes():
    """only= names the nodes quantized; every other node stays float (digits MLP, three Gemms)."""
    calib = dict(np.load("models/digits_calib.npz"))
    model = onnx.load("models/digits_mlp.onnx")
    result = onnxopt.optimize(model, "qdq(mode=static,only=/3/Gemm)", calibration=calib, validate=False)
    stats = next(r for r in result.records if r.name == "qdq").stats
    assert stats["quantized_Gemm"] == 1
    graph = result.model.graph
    dq_outputs = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = {n.name for n in graph.node if n.op_type == "Gemm" and n.input[1] in dq_outputs}
    assert quantized == {"/3/Gemm"}
