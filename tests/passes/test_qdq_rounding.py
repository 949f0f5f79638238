"""qdq's weight rounding (GPTQ on the calibration inputs, passes/qdq/rounding.py) and the guard's
weights-only fallback (a layer taken back keeps its int8 weights, its activations go float).
Every model is run in ONNX Runtime against the float one."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import onnx
from onnx import helper, numpy_helper

import onnxopt
from helpers import init, make_model, node, outlier_mlp, vi

rounding = __import__("passes.qdq.rounding", fromlist=["rounding"])
guard = __import__("passes.qdq.guard", fromlist=["guard"])


def correlated(n, k, seed):
    """Rows whose features move together (a few factors plus noise), as real activations do:
    where GPTQ's error compensation has something to work with."""
    loadings = np.random.default_rng(1234).standard_normal((4, k))  # one distribution for every seed
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 4)) @ loadings + 0.1 * rng.standard_normal((n, k))).astype(np.float32)


def run(model, feed):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


def weight_codes(model, name):
    """(int8 codes, scales) read by the DequantizeLinear that reads ``name``'s quantized weight."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
              and inits[n.input[0]].dtype == np.int8 and n.input[0].startswith(name))
    return inits[dq.input[0]], inits[dq.input[1]]


def quantize(model, options, data, **kw):
    result = onnxopt.optimize(model, f"qdq(mode=static,smooth=false,{options})", calibration=data,
                              inputs=data, **kw)
    return result, next(r for r in result.records if r.name == "qdq").stats


def matmul_model(k=32, n=16, seed=0):
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    return make_model([node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", ["N", k])], [vi("y", ["N", n])],
                      [init("w", w)]), w


def test_gptq_keeps_the_scales_and_lowers_the_output_error_of_the_weights():
    """Same scales, same size; the layer's output error on held-out rows from the same distribution
    (weights alone: codes x scales against the float weight) is well below round to nearest's."""
    model, w = matmul_model()
    data = [{"x": correlated(64, 32, s)} for s in range(4)]
    near, near_stats = quantize(model, "rounding=nearest,guard=false", data)
    gptq, gptq_stats = quantize(model, "rounding=gptq,guard=false", data)
    assert gptq_stats["rounding_gptq"] == 1 and "rounding_gptq" not in near_stats
    (qn, sn), (qg, sg) = weight_codes(near.model, "w"), weight_codes(gptq.model, "w")
    np.testing.assert_array_equal(sn, sg)
    assert np.abs(qg.astype(int)).max() <= 127 and (qn != qg).any()
    held_out = correlated(512, 32, 99)

    def err(q, s):
        return float(np.linalg.norm(held_out @ (q * s - w)))

    assert err(qg, sg) < 0.7 * err(qn, sn)
    assert len(gptq.model.SerializeToString()) == len(near.model.SerializeToString())
    # end to end in ORT (int8 activations too): the GPTQ model is closer to float on held-out rows
    ref = run(model, {"x": held_out})
    assert np.linalg.norm(run(gptq.model, {"x": held_out}) - ref) < np.linalg.norm(run(near.model, {"x": held_out}) - ref)


def test_gptq_on_grouped_and_spatial_convolutions_matches_the_writer_layout():
    """A 3x3 Conv and a depthwise Conv (one Gram matrix per group): codes in the weight's own shape,
    per-output-channel scales unchanged, and the output error in ORT below round to nearest's."""
    rng = np.random.default_rng(2)
    w1 = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    model = make_model([node("Conv", ["x", "w1"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
                        node("Relu", ["c1"], ["r1"], name="relu"),
                        node("Conv", ["r1", "w2"], ["y"], name="dw", pads=[1, 1, 1, 1], group=8)],
                       [vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 8, 8, 8])], [init("w1", w1), init("w2", w2)])

    def images(seed, n=8):
        mix = np.random.default_rng(1234).standard_normal((1, 4, 1, 1))  # one distribution for every seed
        r = np.random.default_rng(seed)
        base = np.cumsum(r.standard_normal((n, 1, 8, 8)), axis=3) / 3  # smooth along the width
        return {"x": (base * mix + 0.2 * r.standard_normal((n, 4, 8, 8))).astype(np.float32)}

    data = [images(s) for s in range(4)]
    near, _ = quantize(model, "rounding=nearest,guard=false", data)
    gptq, stats = quantize(model, "rounding=gptq,guard=false", data)
    assert stats["rounding_gptq"] == 2
    for name, w in (("w1", w1), ("w2", w2)):
        (qn, sn), (qg, sg) = weight_codes(near.model, name), weight_codes(gptq.model, name)
        assert qg.shape == w.shape and sg.shape == (8,) and (qn != qg).any()
        np.testing.assert_array_equal(sn, sg)
    held = images(50, 32)
    ref = run(model, held)
    assert np.linalg.norm(run(gptq.model, held) - ref) < np.linalg.norm(run(near.model, held) - ref)


def test_rounding_auto_uses_gptq_only_with_real_calibration_data():
    model, _ = matmul_model()
    _, with_data = quantize(model, "guard=false", [{"x": correlated(16, 32, s)} for s in range(2)])
    assert with_data["rounding_gptq"] == 1
    result = onnxopt.optimize(model, "qdq(mode=static,smooth=false,guard=false)", validate=False)
    stats = next(r for r in result.records if r.name == "qdq").stats
    assert stats["calibration_synthetic"] == 1 and "rounding_gptq" not in stats


def test_gptq_int8_spreads_the_error_and_stays_in_range():
    """The kernel alone: with H = XᵀX of correlated rows the output error ‖X(W-Ŵ)‖ is below round to
    nearest's at the same scales; codes stay within ±qmax (7-bit weights too)."""
    from passes.woq.quantize import hessian

    x = correlated(256, 24, 5).astype(np.float64)
    m = np.random.default_rng(6).standard_normal((10, 24))
    for qmax in (127, 64):
        scale = np.abs(m).max(1) / qmax
        codes = rounding.gptq_int8(m, scale, hessian(x.T @ x, 0.01, act_order=True), qmax)
        nearest = np.clip(np.round(m / scale[:, None]), -qmax, qmax)
        assert np.abs(codes.astype(int)).max() <= qmax
        assert np.linalg.norm(x @ (codes * scale[:, None] - m).T) < 0.8 * np.linalg.norm(x @ (nearest * scale[:, None] - m).T)


def sensitive_pair():
    """mm1 reads an input with one huge outlier feature (no weight reads it): its 8-bit input wipes
    out the other features, so only float activations save it; its weight quantizes fine."""
    model = outlier_mlp()
    data = [{"x": np.random.default_rng(i).standard_normal((8, 16)).astype(np.float32)} for i in range(4)]
    for f in data:
        f["x"][:, 0] = 0
    data[0]["x"][0, 0] = 5000.0
    return model, data


def test_guard_takes_back_activations_and_keeps_the_weights_int8():
    """fallback=weights (the default): mm1's input is read in float, its weight still int8, read as
    Cast * scale (no bytes kept float; the model as small as fully quantized); fallback=float
    keeps the whole layer float. Both meet the tolerance in ORT."""
    model, data = sensitive_pair()
    kept, stats = quantize(model, "method=minmax,rounding=nearest", data)
    assert kept.passed and stats["fallback_nodes"] == 1 and stats["weight_only_nodes"] == 1
    assert stats["fallback_bytes_kept_float"] == 0 and stats["guard_min_cosine_ppm"] >= 990000
    mm1 = next(n for n in kept.model.graph.node if n.name == "mm1")
    assert mm1.input[0] == "x"  # float activations
    assert int8_read_as_float(kept.model, mm1.input[1])
    notes = [n for r in kept.records for n in r.notes]
    assert any(n.startswith("layer 'mm1' activations back to float (weights stay int8)") for n in notes), notes
    whole, whole_stats = quantize(model, "method=minmax,rounding=nearest,fallback=float", data)
    assert whole.passed and whole_stats["fallback_nodes"] == 1 and "weight_only_nodes" not in whole_stats
    assert len(kept.model.SerializeToString()) < len(whole.model.SerializeToString()) - 300  # 16x16 float32 over int8, less the scales
    x = {"x": data[1]["x"]}
    ref = run(model, x)
    assert np.allclose(run(kept.model, x), ref, atol=0.05 * np.abs(ref).max())


def test_dynamic_mode_takes_the_gptq_codes_too():
    """mode=dynamic (MatMulInteger): GPTQ codes in the MatMulInteger weight, the per-column scales
    those of round to nearest, and the output in ORT closer to float on held-out rows."""
    model, w = matmul_model(seed=3)
    data = [{"x": correlated(64, 32, s)} for s in range(4)]

    def dynamic(rounding):
        result = onnxopt.optimize(model, f"qdq(mode=dynamic,guard=false,rounding={rounding})", calibration=data,
                                  inputs=data)
        return result, next(r for r in result.records if r.name == "qdq").stats

    (near, _), (gptq, stats) = dynamic("nearest"), dynamic("gptq")
    assert stats["rounding_gptq"] == 1 and stats["dynamic_nodes"] == 1

    def int8_weight(m):
        inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        mm = next(n for n in m.graph.node if n.op_type == "MatMulInteger")
        return inits[mm.input[1]]

    assert int8_weight(gptq.model).shape == (32, 16) and (int8_weight(gptq.model) != int8_weight(near.model)).any()
    held = {"x": correlated(512, 32, 77)}
    ref = run(model, held)
    # the run-time 8-bit activations add the same error to both; the weights' part is well below
    assert np.linalg.norm(run(gptq.model, held) - ref) < np.linalg.norm(run(near.model, held) - ref)
    scale = np.abs(w).max(0) / 127
    weight_err = [np.linalg.norm(held["x"] @ (int8_weight(m.model) * scale - w)) for m in (gptq, near)]
    assert weight_err[0] < 0.7 * weight_err[1]


def test_weight_only_option_keeps_the_named_layers_activations_float():
    """qdq(weight_only=mm1): mm1 reads its input in float and its int8 weight as Cast * scale; mm2 is
    quantized whole (as tune's int8w setting writes them)."""
    model, data = sensitive_pair()
    result, stats = quantize(model, "method=minmax,rounding=nearest,guard=false,weight_only=mm1", data,
                             tolerance="min_cosine=0.95")
    assert stats["weight_only_nodes"] == 1 and stats["quantized_MatMul"] == 1
    nodes = {n.name: n for n in result.model.graph.node}
    assert nodes["mm1"].input[0] == "x"
    producers = {o: n for n in result.model.graph.node for o in n.output}
    assert int8_read_as_float(result.model, nodes["mm1"].input[1])
    assert producers[nodes["mm2"].input[1]].op_type == "DequantizeLinear"  # mm2's weight: a QDQ unit
    assert producers[nodes["mm2"].input[0]].op_type == "DequantizeLinear"  # mm2's input quantized
    ref = run(model, {"x": data[1]["x"]})
    assert np.allclose(run(result.model, {"x": data[1]["x"]}), ref, atol=0.05 * np.abs(ref).max())


def test_weight_only_alone_still_writes_the_int8_weights():
    """Every named layer weight-only (only= and weight_only= the same, as tune's int8w writes a
    single layer): nothing gets an activation pair, yet the weight is stored as int8."""
    model, data = sensitive_pair()
    result, stats = quantize(model, "rounding=nearest,guard=false,only=mm1,weight_only=mm1", data,
                             tolerance="min_cosine=0.95")
    assert stats["weight_only_nodes"] == 1 and stats["qdq_pairs"] == 0
    assert not [n for n in result.model.graph.node if n.op_type == "DequantizeLinear"]
    assert int8_read_as_float(result.model, next(n for n in result.model.graph.node if n.name == "mm1").input[1])
    assert len(result.model.SerializeToString()) < len(model.SerializeToString()) - 300  # 16x16 float32 over int8


def int8_read_as_float(model, name: str) -> bool:
    """``name`` is Mul(Cast(int8 initializer to float), float scale)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    mul = producers.get(name)
    if mul is None or mul.op_type != "Mul":
        return False
    cast = producers.get(mul.input[0])
    return (cast is not None and cast.op_type == "Cast" and inits[cast.input[0]].dtype == np.int8
            and inits[mul.input[1]].dtype == np.float32)


def test_weight_only_layers_are_folded_by_onnx_runtime_at_load(tmp_path):
    """The point of Cast * scale over DequantizeLinear: ORT folds it into a float initializer when
    the session loads (a DequantizeLinear would run on every call), so a weight-only layer costs
    no time. Checked on the graph ORT itself writes after its optimizations, and the outputs
    equal those of the same codes through a DequantizeLinear."""
    model, data = sensitive_pair()
    result, _ = quantize(model, "rounding=nearest,guard=false,only=mm1,weight_only=mm1", data,
                         tolerance="min_cosine=0.95")
    src, optimized = tmp_path / "q.onnx", tmp_path / "ort.onnx"
    result.save(src)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(optimized)
    sess = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    assert "Cast" not in ops and "DequantizeLinear" not in ops, ops
    # the same codes and scales through a DequantizeLinear give the same outputs, bit for bit
    dq_model = onnx.ModelProto()
    dq_model.CopyFrom(result.model)
    g = dq_model.graph
    mm1 = next(n for n in g.node if n.name == "mm1")
    producers = {o: n for n in g.node for o in n.output}
    mul = producers[mm1.input[1]]
    cast = producers[mul.input[0]]
    scale = next(t for t in g.initializer if t.name == mul.input[1])
    axis = int(np.argmax(scale.dims))
    flat = numpy_helper.from_array(numpy_helper.to_array(scale).reshape(-1), mul.input[1] + "_flat")
    g.initializer.append(flat)
    g.node.remove(mul)
    g.node.remove(cast)
    g.node.insert(0, helper.make_node("DequantizeLinear", [cast.input[0], flat.name], [mm1.input[1]], axis=axis))
    x = {"x": data[1]["x"]}
    assert np.array_equal(sess.run(None, x)[0], run(dq_model, x))


def test_a_weight_read_by_several_inputs_gets_one_hessian(monkeypatch):
    """An unrolled RNN reads one weight at every step: GPTQ rounds it once, on the first reader's
    Gram matrix, and computes no Hessian (a Cholesky and an inverse) for the other readers."""
    k = 24
    w = np.random.default_rng(0).standard_normal((k, k)).astype(np.float32)
    steps = [node("MatMul", ["x", "w"], ["h1"], name="step1"), node("Tanh", ["h1"], ["t1"]),
             node("MatMul", ["t1", "w"], ["h2"], name="step2"), node("Tanh", ["h2"], ["t2"]),
             node("MatMul", ["t2", "w"], ["y"], name="step3")]
    model = make_model(steps, [vi("x", ["N", k])], [vi("y", ["N", k])], [init("w", w)])
    calls = []
    real = rounding.hessian
    monkeypatch.setattr(rounding, "hessian", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    data = [{"x": correlated(64, k, s)} for s in range(4)]
    result, stats = quantize(model, "rounding=gptq,guard=false", data)
    assert stats["rounding_gptq"] == 3 and len(calls) == 1  # three readers, one stored weight, one Hessian
    ref = run(model, {"x": correlated(256, k, 9)})
    got = run(result.model, {"x": correlated(256, k, 9)})
    assert float(np.sum(ref * got) / np.sqrt(np.sum(ref * ref) * np.sum(got * got))) > 0.99
