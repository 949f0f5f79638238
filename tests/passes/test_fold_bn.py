"""The ``fold_bn`` pass: BatchNormalization and per-channel Mul/Add/Sub/Div folded into
Conv, ConvTranspose, Gemm and MatMul(+bias).

fold_bn is exact within float rounding. Every case that rewrites runs through
``onnxopt.optimize`` (pass manager, contracts, checker, validation in ORT with its
own optimizations on) and directly through the pass (ORT optimizations off); both
must agree on the stats and match the original within 1e-5 relative. Cases that
must not fold assert that the graph is untouched.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from collections import Counter

from helpers import (BOOL, all_nodes, init, interface, iter_graph_protos, make_model, node, ops, random_feed,
                     run_model, run_pass_direct, subgraph, vi)

FLOAT16 = TensorProto.FLOAT16

ZERO = {"bn_folded": 0, "mul_folded": 0, "add_folded": 0, "sub_folded": 0, "div_folded": 0,
        "layers_changed": 0, "biases_added": 0, "shared_weights_copied": 0,
        "skipped_training_mode": 0, "skipped_unsupported_bn": 0, "skipped_non_constant_params": 0,
        "skipped_invalid_constant": 0, "skipped_unsupported_producer": 0, "skipped_outer_scope": 0,
        "skipped_shared_output": 0, "skipped_non_constant_weights": 0, "skipped_unsupported_dtype": 0,
        "skipped_not_per_channel": 0, "skipped_shared_weights": 0}


def rand(shape, seed, dtype=np.float32, low=None):
    rng = np.random.default_rng(seed)
    if low is not None:
        return (low + rng.random(shape)).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def bn_inits(prefix: str, c: int, seed: int, dtype=np.float32) -> list[onnx.TensorProto]:
    """Scale, bias, mean, var (var in [0.5, 1.5)) for a BatchNormalization over c channels."""
    return [init(f"{prefix}_scale", rand(c, seed), dtype), init(f"{prefix}_bias", rand(c, seed + 1), dtype),
            init(f"{prefix}_mean", rand(c, seed + 2), dtype), init(f"{prefix}_var", rand(c, seed + 3, low=0.5), dtype)]


def bn(x: str, y: str, prefix: str, **attrs) -> onnx.NodeProto:
    return node("BatchNormalization", [x, f"{prefix}_scale", f"{prefix}_bias", f"{prefix}_mean", f"{prefix}_var"],
                [y], name=prefix, **{"epsilon": 1e-3, **attrs})


def check_stats(st_: dict, max_error: float = 1e-6, **expected: int) -> None:
    ints = {k: v for k, v in st_.items() if k != "max_weight_error"}
    assert ints == {**ZERO, **expected}
    assert 0.0 <= st_["max_weight_error"] <= max_error


def assert_close(reference: dict, candidate: dict, rel: float = 1e-5) -> None:
    assert list(reference) == list(candidate)
    for name in reference:
        ref, got = np.asarray(reference[name]), np.asarray(candidate[name])
        assert ref.dtype == got.dtype and ref.shape == got.shape, name
        scale = max(1.0, float(np.max(np.abs(ref.astype(np.float64)), initial=0.0)))
        err = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64)), initial=0.0))
        assert err <= rel * scale, f"output {name}: max abs error {err:.3g} > {rel:g} * {scale:.3g}"


def spec(options: dict) -> str:
    if not options:
        return "fold_bn"
    return "fold_bn(" + ",".join(f"{k}={str(v).lower()}" for k, v in options.items()) + ")"


def fold(model: onnx.ModelProto, feeds=None, tolerance=None, rel: float = 1e-5, **options):
    """Run fold_bn through optimize() and directly; both must agree and match the original.

    Returns (optimized model, stats, modified); the optimized model has had the automatic dce.
    """
    feeds = list(feeds) if feeds is not None else [random_feed(model, seed=s) for s in range(2)]
    result = onnxopt.optimize(model, spec(options), inputs=feeds, tolerance=tolerance)
    assert result.validation is not None and result.passed, result.validation.headline()
    record = result.records[0]
    assert record.name == "fold_bn"
    direct, direct_result = run_pass_direct(model, "fold_bn", **options)
    assert direct_result.stats == record.stats
    assert direct_result.modified == record.modified
    assert user_interface(result.model) == user_interface(model)
    assert user_interface(direct) == user_interface(model)
    for feed in feeds:
        reference = run_model(model, feed)
        assert_close(reference, run_model(direct, feed), rel)
        assert_close(reference, run_model(result.model, feed, "all"), rel)
    return result.model, dict(record.stats), record.modified


def user_interface(model: onnx.ModelProto):
    """The graph inputs and outputs a user feeds and reads: ``interface`` without the initializers
    that models before IR 4 must also list as inputs."""
    inits = {i.name for i in model.graph.initializer}
    return ([v.SerializeToString() for v in model.graph.input if v.name not in inits],
            [v.SerializeToString() for v in model.graph.output])


def structure(model: onnx.ModelProto):
    """Everything about the graph a pass could change: nodes and initializers, all scopes.

    (Export places an initializer in the scope that reads it, so scopes are not compared.)
    """
    return ([(n.op_type, n.name, list(n.input), list(n.output)) for n in all_nodes(model)],
            sorted((i.name, i.SerializeToString()) for g in iter_graph_protos(model.graph) for i in g.initializer))


def assert_untouched(model: onnx.ModelProto, **options) -> dict:
    out, result = run_pass_direct(model, "fold_bn", **options)
    assert result.modified is False
    assert structure(out) == structure(model)
    return dict(result.stats)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


# ----------------------------------------------------------------- Conv

def conv_bn_model(cin=4, cout=6, group=1, bias=True, kernel=(3, 3), spatial=(6, 6)) -> onnx.ModelProto:
    inits = [init("W", rand((cout, cin // group, *kernel), 1))] + bn_inits("bn", cout, 10)
    if bias:
        inits.append(init("B", rand(cout, 2)))
    pads = [k // 2 for k in kernel] * 2
    return make_model(
        [node("Conv", ["x", "W", "B"] if bias else ["x", "W"], ["c"], name="conv", group=group, pads=pads),
         bn("c", "bnout", "bn"), node("Relu", ["bnout"], ["y"], name="relu")],
        [vi("x", ["batch", cin, *spatial])], [vi("y", ["batch", cout, *spatial])], inits)


@pytest.mark.parametrize("case", [
    dict(bias=True), dict(bias=False), dict(cin=4, cout=6, group=2), dict(cin=4, cout=4, group=4, bias=False),
    dict(cin=3, cout=5, kernel=(3,), spatial=(8,)), dict(cin=2, cout=3, kernel=(1, 1, 3), spatial=(2, 3, 4))],
    ids=["bias", "no_bias", "groups", "depthwise", "conv1d", "conv3d"])
def test_conv_bn_folds_into_conv(case):
    model = conv_bn_model(**case)
    out, st_, modified = fold(model)
    assert ops(out) == ["Conv", "Relu"]
    assert modified is True
    check_stats(st_, bn_folded=1, layers_changed=1, biases_added=0 if case.get("bias", True) else 1)
    conv = out.graph.node[0]
    assert list(conv.output) == ["bnout"] and len(conv.input) == 3
    # The known answer: W' = W * a, B' = (B - mean) * a + bias, a = scale / sqrt(var + eps).
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "W")).astype(np.float64)
    s, b, m, v = (numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer[1:5])
    a = s / np.sqrt(v + 1e-3)
    b0 = numpy_helper.to_array(model.graph.initializer[5]).astype(np.float64) if case.get("bias", True) else 0.0
    np.testing.assert_allclose(initializer(out, conv.input[1]), w * a.reshape((-1,) + (1,) * (w.ndim - 1)), rtol=1e-6)
    np.testing.assert_allclose(initializer(out, conv.input[2]), (b0 - m) * a + b, rtol=1e-6, atol=1e-7)
    assert {i.name for i in out.graph.initializer} == {conv.input[1], conv.input[2]}


def test_bn_on_graph_output_keeps_the_name():
    model = make_model([node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]), bn("c", "y", "bn")],
                       [vi("x", [1, 3, 5, 5])], [vi("y", [1, 4, 5, 5])],
                       [init("W", rand((4, 3, 3, 3), 1))] + bn_inits("bn", 4, 20))
    out, st_, _ = fold(model)
    assert ops(out) == ["Conv"]
    assert list(out.graph.node[0].output) == ["y"]
    assert [o.name for o in out.graph.output] == ["y"]
    check_stats(st_, bn_folded=1, layers_changed=1, biases_added=1)


def test_chain_conv_bn_mul_add_becomes_one_conv():
    """Conv -> BN -> Mul(per-channel) -> Add(per-channel) -> Sub(scalar) -> Div(per-channel): one Conv."""
    c = 5
    model = make_model(
        [node("Conv", ["x", "W", "B"], ["c0"], name="conv"), bn("c0", "c1", "bn"),
         node("Mul", ["c1", "gamma"], ["c2"], name="mul"), node("Add", ["beta", "c2"], ["c3"], name="add"),
         node("Sub", ["c3", "shift"], ["c4"], name="sub"), node("Div", ["c4", "div"], ["y"], name="div")],
        [vi("x", [2, 3, 4, 4])], [vi("y", [2, c, 2, 2])],
        [init("W", rand((c, 3, 3, 3), 1)), init("B", rand(c, 2)), init("gamma", rand((1, c, 1, 1), 3)),
         init("beta", rand((c, 1, 1), 4)), init("shift", 0.25), init("div", rand((c, 1, 1), 5, low=0.5))]
        + bn_inits("bn", c, 30))
    out, st_, _ = fold(model)
    assert ops(out) == ["Conv"] and list(out.graph.node[0].output) == ["y"]
    check_stats(st_, bn_folded=1, mul_folded=1, add_folded=1, sub_folded=1, div_folded=1, layers_changed=1)
    assert len(out.graph.initializer) == 2


@pytest.mark.parametrize("op,const_first,shape,key", [
    ("Mul", False, (1, 4, 1, 1), "mul_folded"), ("Mul", True, (4, 1, 1), "mul_folded"),
    ("Mul", False, (), "mul_folded"), ("Add", False, (4, 1, 1), "add_folded"), ("Add", True, (1,), "add_folded"),
    ("Sub", False, (1, 4, 1, 1), "sub_folded"), ("Sub", True, (4, 1, 1), "sub_folded"),
    ("Div", False, (4, 1, 1), "div_folded")])
def test_conv_then_per_channel_constant_folds(op, const_first, shape, key):
    k = rand(shape, 7, low=0.5) if op == "Div" else rand(shape, 7)
    model = make_model(
        [node("Conv", ["x", "W", "B"], ["c"], name="conv"),
         node(op, ["k", "c"] if const_first else ["c", "k"], ["y"], name="elementwise")],
        [vi("x", [1, 3, 5, 5])], [vi("y", [1, 4, 3, 3])],
        [init("W", rand((4, 3, 3, 3), 1)), init("B", rand(4, 2)), init("k", k)])
    out, st_, _ = fold(model)
    assert ops(out) == ["Conv"]
    check_stats(st_, layers_changed=1, **{key: 1})


def test_conv_mul_add_per_channel_without_conv_bias():
    """The scale/shift pair exporters emit for a decomposed BN: Conv (no bias) -> Mul -> Add."""
    model = make_model(
        [node("Conv", ["x", "W"], ["c"], name="conv"), node("Mul", ["c", "s"], ["m"], name="mul"),
         node("Add", ["m", "t"], ["y"], name="add")],
        [vi("x", ["n", 3, 5, 5])], [vi("y", ["n", 4, 3, 3])],
        [init("W", rand((4, 3, 3, 3), 1)), init("s", rand((1, 4, 1, 1), 2)), init("t", rand((1, 4, 1, 1), 3))])
    out, st_, _ = fold(model)
    assert ops(out) == ["Conv"]
    check_stats(st_, mul_folded=1, add_folded=1, layers_changed=1, biases_added=1)


@pytest.mark.parametrize("op,shape,reason", [
    ("Mul", (4,), "skipped_not_per_channel"),            # aligned to the last (spatial) axis, also 4 wide
    ("Mul", (1, 1, 4, 4), "skipped_not_per_channel"),    # spatial map
    ("Add", (2, 4, 1, 1), "skipped_not_per_channel"),    # broadcasts the batch axis
    ("Mul", (1, 1, 4, 1, 1), "skipped_not_per_channel"),  # adds a dimension
    ("Div", (4, 1, 1), "skipped_invalid_constant")])     # division by zero
def test_not_per_channel_constants_left_alone(op, shape, reason):
    k = np.zeros(shape, np.float32) if reason == "skipped_invalid_constant" else rand(shape, 7)
    model = make_model(
        [node("Conv", ["x", "W", "B"], ["c"], name="conv"), node(op, ["c", "k"], ["y"], name="elementwise")],
        [vi("x", [1, 3, 6, 6])], [vi("y", np.broadcast_shapes((1, 4, 4, 4), shape))],
        [init("W", rand((4, 3, 3, 3), 1)), init("B", rand(4, 2)), init("k", k)])
    check_stats(assert_untouched(model), **{reason: 1})


def test_elementwise_nodes_that_are_not_candidates_are_not_counted():
    """c / x is not affine; Mul(c, c) has no constant; Add (even of a -inf mask) after Relu is no
    producer; a -inf mask Add after a bare MatMul is a bias: no stats at all."""
    mask = np.where(np.tril(np.ones((5, 5))) > 0, 0.0, -np.inf).astype(np.float32)
    model = make_model(
        [node("Conv", ["x", "W"], ["c"], name="conv"), node("Div", ["k", "c"], ["d"], name="div"),
         node("Relu", ["x"], ["r"], name="relu"), node("Add", ["r", "k3"], ["e"], name="add"),
         node("Conv", ["x", "W"], ["c2"], name="conv2"), node("Mul", ["c2", "c2"], ["f"], name="square"),
         node("Add", ["r", "inf"], ["g"], name="mask_relu"),
         node("MatMul", ["x", "W5"], ["mm"], name="matmul"), node("Add", ["mm", "mask"], ["h"], name="mask_matmul")],
        [vi("x", [1, 3, 5, 5])],
        [vi("d", [1, 4, 3, 3]), vi("e", [1, 3, 5, 5]), vi("f", [1, 4, 3, 3]), vi("g", [1, 3, 5, 5]),
         vi("h", [1, 3, 5, 5])],
        [init("W", rand((4, 3, 3, 3), 1)), init("k", rand((4, 1, 1), 2)), init("k3", rand((3, 1, 1), 3)),
         init("inf", [-np.inf]), init("W5", rand((5, 5), 4)), init("mask", mask)])
    check_stats(assert_untouched(model))


# ----------------------------------------------------------------- ConvTranspose

@pytest.mark.parametrize("group,bias", [(1, True), (1, False), (2, True), (3, False)])
def test_conv_transpose_bn_folds(group, bias):
    cin, per = 6, 2  # output channels: per * group
    cout = per * group
    inits = [init("W", rand((cin, per, 3, 3), 1))] + bn_inits("bn", cout, 40)
    inits += [init("B", rand(cout, 2))] if bias else []
    model = make_model(
        [node("ConvTranspose", ["x", "W", "B"] if bias else ["x", "W"], ["c"], name="deconv", group=group,
              strides=[2, 2], output_padding=[1, 1]),
         bn("c", "y", "bn")],
        [vi("x", [1, cin, 3, 3])], [vi("y", [1, cout, 8, 8])], inits)
    out, st_, _ = fold(model)
    assert ops(out) == ["ConvTranspose"]
    check_stats(st_, bn_folded=1, layers_changed=1, biases_added=0 if bias else 1)


# ----------------------------------------------------------------- Gemm

@pytest.mark.parametrize("trans_b,alpha,beta,c_shape", [
    (0, 1.0, 1.0, (5,)), (1, 1.0, 1.0, (5,)), (1, 0.5, 2.5, (1, 5)), (0, 2.0, 0.5, (3, 5)),
    (1, 1.0, 3.0, (3, 1)), (0, 1.0, 1.5, ()), (1, 0.7, 1.0, None), (0, 1.0, 0.0, (5,))])
def test_gemm_bn_folds(trans_b, alpha, beta, c_shape):
    w = rand((5, 4) if trans_b else (4, 5), 1)
    inits = [init("W", w)] + bn_inits("bn", 5, 50) + ([init("C", rand(c_shape, 2))] if c_shape is not None else [])
    model = make_model(
        [node("Gemm", ["a", "W", "C"] if c_shape is not None else ["a", "W"], ["g"], name="gemm",
              transB=trans_b, alpha=alpha, beta=beta),
         bn("g", "y", "bn")],
        [vi("a", [3, 4])], [vi("y", [3, 5])], inits)
    out, st_, _ = fold(model)
    assert ops(out) == ["Gemm"]
    gemm = out.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs["beta"] == 1.0 and attrs["alpha"] == pytest.approx(alpha) and attrs["transB"] == trans_b
    check_stats(st_, bn_folded=1, layers_changed=1, biases_added=1 if c_shape is None else 0)


def test_gemm_then_per_feature_mul_add_folds_and_per_row_does_not():
    model = make_model(
        [node("Gemm", ["a", "W", "C"], ["g"], name="gemm", transB=1),
         node("Mul", ["g", "s"], ["m"], name="mul"), node("Add", ["m", "t"], ["y"], name="add"),
         node("Gemm", ["a", "W2"], ["g2"], name="gemm2"), node("Mul", ["g2", "rows"], ["z"], name="row_mul")],
        [vi("a", [3, 4])], [vi("y", [3, 5]), vi("z", [3, 5])],
        [init("W", rand((5, 4), 1)), init("C", rand(5, 2)), init("s", rand((1, 5), 3)), init("t", rand(5, 4)),
         init("W2", rand((4, 5), 5)), init("rows", rand((3, 1), 6))])
    out, st_, _ = fold(model)
    assert ops(out) == ["Gemm", "Gemm", "Mul"]
    check_stats(st_, mul_folded=1, add_folded=1, layers_changed=1, skipped_not_per_channel=1)


# ----------------------------------------------------------------- MatMul with bias

def test_matmul_add_bn_folds_into_matmul_with_bias():
    model = make_model(
        [node("MatMul", ["a", "W"], ["mm"], name="matmul"), node("Add", ["mm", "b"], ["h"], name="bias"),
         bn("h", "y", "bn")],
        [vi("a", ["n", 4])], [vi("y", ["n", 5])], [init("W", rand((4, 5), 1)), init("b", rand(5, 2))]
        + bn_inits("bn", 5, 60))
    out, st_, _ = fold(model)
    assert ops(out) == ["MatMul", "Add"]
    assert list(out.graph.node[1].output) == ["y"]
    check_stats(st_, bn_folded=1, layers_changed=1)


def test_bare_matmul_bn_becomes_matmul_with_bias():
    model = make_model(
        [node("MatMul", ["a", "W"], ["mm"], name="matmul"), bn("mm", "y", "bn")],
        [vi("a", [3, 4])], [vi("y", [3, 5])], [init("W", rand((4, 5), 1))] + bn_inits("bn", 5, 60))
    out, st_, _ = fold(model)
    assert ops(out) == ["MatMul", "Add"]
    check_stats(st_, bn_folded=1, layers_changed=1, biases_added=1)


def test_bare_matmul_then_constant_minus_x_becomes_matmul_with_bias():
    model = make_model(
        [node("MatMul", ["a", "W"], ["mm"], name="matmul"), node("Sub", ["k", "mm"], ["y"], name="sub")],
        [vi("a", ["n", 4])], [vi("y", ["n", 5])], [init("W", rand((4, 5), 1)), init("k", rand(5, 2))])
    out, st_, _ = fold(model)
    assert ops(out) == ["MatMul", "Add"]
    check_stats(st_, sub_folded=1, layers_changed=1, biases_added=1)


def test_matmul_bias_layerscale_folds_on_rank3():
    """Transformer-style [batch, tokens, features]: MatMul + bias, then LayerScale Mul and a shift Add."""
    model = make_model(
        [node("MatMul", ["a", "W"], ["mm"], name="matmul"), node("Add", ["b", "mm"], ["h"], name="bias"),
         node("Mul", ["h", "gamma"], ["m"], name="layerscale"), node("Add", ["m", "shift"], ["y"], name="shift")],
        [vi("a", ["n", 7, 4])], [vi("y", ["n", 7, 5])],
        [init("W", rand((4, 5), 1)), init("b", rand(5, 2)), init("gamma", rand(5, 3)),
         init("shift", rand((1, 1, 5), 4))])
    out, st_, _ = fold(model)
    assert ops(out) == ["MatMul", "Add"]
    check_stats(st_, mul_folded=1, add_folded=1, layers_changed=1)
    assert initializer(out, out.graph.node[1].input[0]).shape == (5,)  # the bias stays per feature


def test_matmul_rank3_bn_is_not_per_feature():
    """BN normalises axis 1 (tokens), the MatMul's features are the last axis: no fold."""
    model = make_model(
        [node("MatMul", ["a", "W"], ["mm"], name="matmul"), node("Add", ["mm", "b"], ["h"], name="bias"),
         bn("h", "y", "bn")],
        [vi("a", [2, 7, 4])], [vi("y", [2, 7, 5])],
        [init("W", rand((4, 5), 1)), init("b", rand(5, 2))] + bn_inits("bn", 7, 60))
    check_stats(assert_untouched(model), skipped_not_per_channel=1)


def test_matmul_with_computed_weight_is_counted_not_folded():
    """Attention scores (x @ k^T) / sqrt(d): the weight is not a constant."""
    model = make_model(
        [node("MatMul", ["q", "k"], ["s"], name="scores"), node("Div", ["s", "d"], ["y"], name="scale"),
         node("MatMul", ["q", "W"], ["p"], name="proj"), node("Add", ["p", "b"], ["z"], name="bias")],
        [vi("q", [2, 3, 4]), vi("k", [2, 4, 3])], [vi("y", [2, 3, 3]), vi("z", [2, 3, 5])],
        [init("d", 2.0), init("W", rand((4, 5), 1)), init("b", rand(5, 2))])
    check_stats(assert_untouched(model), skipped_non_constant_weights=1)


# ----------------------------------------------------------------- fp16

def test_fp16_conv_bn_folds_in_float64_and_stays_fp16():
    c = 4
    inits = [init("W", rand((c, 3, 3, 3), 1), np.float16), init("B", rand(c, 2), np.float16)] \
        + bn_inits("bn", c, 70, np.float16)
    model = make_model([node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]), bn("c", "y", "bn")],
                       [vi("x", [1, 3, 6, 6], FLOAT16)], [vi("y", [1, c, 6, 6], FLOAT16)], inits)
    out, st_, _ = fold(model, tolerance="atol=2e-2,rtol=2e-2", rel=1e-2)
    assert ops(out) == ["Conv"]
    assert {i.data_type for i in out.graph.initializer} == {TensorProto.FLOAT16}
    check_stats(st_, max_error=5e-3, bn_folded=1, layers_changed=1)
    assert st_["max_weight_error"] > 0  # fp16 rounding, measured against the float64 reference
    # The folded weights are the float64 fold rounded once to fp16.
    w = numpy_helper.to_array(inits[0]).astype(np.float64)
    s, b, m, v = (numpy_helper.to_array(i).astype(np.float64) for i in inits[2:6])
    a = s / np.sqrt(v + np.float64(np.float32(1e-3)))
    expected = (w * a[:, None, None, None]).astype(np.float16)
    np.testing.assert_array_equal(initializer(out, out.graph.node[0].input[1]), expected)


# ----------------------------------------------------------------- what must not fold

def test_producer_output_with_second_consumer_is_not_folded():
    model = make_model(
        [node("Conv", ["x", "W", "B"], ["c"], name="conv"), bn("c", "y", "bn"),
         node("Relu", ["c"], ["z"], name="relu")],
        [vi("x", [1, 3, 5, 5])], [vi("y", [1, 4, 3, 3]), vi("z", [1, 4, 3, 3])],
        [init("W", rand((4, 3, 3, 3), 1)), init("B", rand(4, 2))] + bn_inits("bn", 4, 80))
    check_stats(assert_untouched(model), skipped_shared_output=1)


def test_producer_output_that_is_a_graph_output_is_not_folded():
    model = make_model(
        [node("Conv", ["x", "W"], ["c"], name="conv"), node("Mul", ["c", "s"], ["y"], name="mul")],
        [vi("x", [1, 3, 5, 5])], [vi("c", [1, 4, 3, 3]), vi("y", [1, 4, 3, 3])],
        [init("W", rand((4, 3, 3, 3), 1)), init("s", rand((4, 1, 1), 2))])
    check_stats(assert_untouched(model), skipped_shared_output=1)


def shared_weight_model() -> onnx.ModelProto:
    """Two Convs read the same W; only the first is followed by BN."""
    return make_model(
        [node("Conv", ["x", "W"], ["c1"], name="conv1"), bn("c1", "y1", "bn"),
         node("Conv", ["x", "W"], ["y2"], name="conv2")],
        [vi("x", [1, 3, 5, 5])], [vi("y1", [1, 4, 3, 3]), vi("y2", [1, 4, 3, 3])],
        [init("W", rand((4, 3, 3, 3), 1))] + bn_inits("bn", 4, 90))


def test_shared_weight_gets_a_copy_and_the_other_reader_keeps_the_original():
    model = shared_weight_model()
    out, st_, _ = fold(model)
    assert ops(out) == ["Conv", "Conv"]
    conv1, conv2 = out.graph.node
    assert conv2.input[1] == "W" and conv1.input[1] != "W"
    np.testing.assert_array_equal(initializer(out, "W"), initializer(model, "W"))
    assert len(out.graph.initializer) == 3  # W, W folded, new bias
    check_stats(st_, bn_folded=1, layers_changed=1, biases_added=1, shared_weights_copied=1)


def test_shared_weight_left_alone_when_copies_are_off():
    check_stats(assert_untouched(shared_weight_model(), copy_shared=False), skipped_shared_weights=1)


def test_large_shared_weight_is_not_copied_past_the_growth_limit():
    """A copy of a 288 KiB weight is half this model: over the default limit (1%, at least
    64 KiB) the BN stays; once the user lifts the limit the layer gets its copy."""
    c = 128
    model = make_model(
        [node("Conv", ["x", "W"], ["c1"], name="conv1", pads=[1, 1, 1, 1]), bn("c1", "y1", "bn"),
         node("Conv", ["x", "W"], ["y2"], name="conv2", pads=[1, 1, 1, 1])],
        [vi("x", [1, c, 3, 3])], [vi("y1", [1, c, 3, 3]), vi("y2", [1, c, 3, 3])],
        [init("W", rand((c, c, 3, 3), 1))] + bn_inits("bn", c, 90))
    check_stats(assert_untouched(model), skipped_shared_weights=1)
    kept = onnxopt.optimize(model, "fold_bn", inputs=[random_feed(model)])
    assert kept.passed and ops(kept.model) == ops(model)
    assert kept.model.ByteSize() < model.ByteSize() + 1024
    copied = onnxopt.optimize(model, "fold_bn", inputs=[random_feed(model)], max_growth="none")
    assert copied.passed and ops(copied.model) == ["Conv", "Conv"]
    assert copied.records[0].stats["shared_weights_copied"] == 1


def test_training_mode_bn_left_alone():
    c = 4
    model = make_model(
        [node("Conv", ["x", "W"], ["c"], name="conv"),
         node("BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["y", "rm", "rv"],
              name="bn", training_mode=1)],
        [vi("x", [2, 3, 5, 5])], [vi("y", [2, c, 3, 3]), vi("rm", [c]), vi("rv", [c])],
        [init("W", rand((c, 3, 3, 3), 1))] + bn_inits("bn", c, 100))
    check_stats(assert_untouched(model), skipped_training_mode=1)


def test_bn_after_unsupported_producer_or_with_computed_params_is_counted():
    model = make_model(
        [node("Relu", ["x"], ["r"], name="relu"), bn("r", "y", "bn"),
         node("Conv", ["x", "W"], ["c"], name="conv"),
         node("BatchNormalization", ["c", "scale_in", "bn_bias", "bn_mean", "bn_var"], ["z"], name="bn2")],
        [vi("x", [1, 3, 5, 5]), vi("scale_in", [3])], [vi("y", [1, 3, 5, 5]), vi("z", [1, 3, 3, 3])],
        [init("W", rand((3, 3, 3, 3), 1))] + bn_inits("bn", 3, 110))
    check_stats(assert_untouched(model), skipped_unsupported_producer=1, skipped_non_constant_params=1)


def test_conv_weight_from_a_graph_input_is_counted_not_folded():
    model = make_model([node("Conv", ["x", "W"], ["c"], name="conv"), bn("c", "y", "bn")],
                       [vi("x", [1, 3, 5, 5]), vi("W", [4, 3, 3, 3])], [vi("y", [1, 4, 3, 3])], bn_inits("bn", 4, 120))
    check_stats(assert_untouched(model), skipped_non_constant_weights=1)


def test_initializers_that_are_also_graph_inputs_are_not_folded():
    """IR >= 4: an initializer listed as a graph input is a default the caller may override."""
    for name in ("W", "bn_scale"):
        model = conv_bn_model(bias=False)
        listed = next(i for i in model.graph.initializer if i.name == name)
        model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(listed.dims)))
        skipped = "skipped_non_constant_weights" if name == "W" else "skipped_non_constant_params"
        check_stats(assert_untouched(model), **{skipped: 1})


def test_options_turn_each_kind_off():
    model = make_model(
        [node("Conv", ["x", "W"], ["c"], name="conv"), bn("c", "b", "bn"), node("Mul", ["b", "s"], ["y"], name="mul")],
        [vi("x", [1, 3, 5, 5])], [vi("y", [1, 4, 3, 3])],
        [init("W", rand((4, 3, 3, 3), 1)), init("s", rand((4, 1, 1), 2))] + bn_inits("bn", 4, 130))
    check_stats(assert_untouched(model, batchnorm=False, elementwise=False))
    out, st_, _ = fold(model, batchnorm=False)
    assert ops(out) == ["Conv", "BatchNormalization", "Mul"]  # the Mul follows the BN, no producer
    check_stats(st_)
    out, st_, _ = fold(model, elementwise=False)
    assert ops(out) == ["Conv", "Mul"]
    check_stats(st_, bn_folded=1, layers_changed=1, biases_added=1)


def test_ir3_model_with_initializers_as_inputs():
    inits = [init("W", rand((4, 3, 3, 3), 1))] + bn_inits("bn", 4, 10)
    model = make_model([node("Conv", ["x", "W"], ["c"], name="conv"), bn("c", "y", "bn")],
                       [vi("x", [1, 3, 5, 5])] + [vi(i.name, list(i.dims)) for i in inits], [vi("y", [1, 4, 3, 3])],
                       inits, opsets={"": 8}, ir_version=3)
    out, st_, _ = fold(model, [{"x": rand((1, 3, 5, 5), 2)}])
    assert ops(out) == ["Conv"]
    check_stats(st_, bn_folded=1, layers_changed=1, biases_added=1)


def test_second_run_changes_nothing():
    once, _ = run_pass_direct(conv_bn_model(), "fold_bn")
    twice, result = run_pass_direct(once, "fold_bn")
    assert result.modified is False
    assert structure(twice) == structure(once)


# ----------------------------------------------------------------- Constant nodes, subgraphs

def test_weights_in_constant_nodes_fold_and_the_constants_go():
    """Paddle-style: the Conv weight and the BN parameters come from Constant nodes (one via value_floats)."""
    c = 4
    bn_vals = bn_inits("bn", c, 140)
    nodes = [node("Constant", [], ["W"], name="const_w",
                  value=numpy_helper.from_array(rand((c, 3, 3, 3), 1), "w_value"))]
    for t in bn_vals[:3]:
        nodes.append(node("Constant", [], [t.name], name=f"const_{t.name}", value=t))
    nodes.append(node("Constant", [], ["bn_var"], name="const_var",
                      value_floats=[float(v) for v in numpy_helper.to_array(bn_vals[3])]))
    nodes += [node("Conv", ["x", "W"], ["c"], name="conv"), bn("c", "y", "bn")]
    model = make_model(nodes, [vi("x", [1, 3, 5, 5])], [vi("y", [1, c, 3, 3])])
    out, st_, _ = fold(model)
    assert ops(out) == ["Conv"]
    assert len(out.graph.initializer) == 2
    check_stats(st_, bn_folded=1, layers_changed=1, biases_added=1)


def if_model() -> onnx.ModelProto:
    """If(cond): then Conv(W) -> BN; else Conv(W) -> Mul(per-channel). W is an outer initializer both read."""
    then = helper.make_graph([node("Conv", ["x", "W"], ["tc"], name="then_conv"), bn("tc", "t", "bn")],
                             "then", [], [vi("t", [1, 4, 3, 3])])
    els = helper.make_graph([node("Conv", ["x", "W"], ["ec"], name="else_conv"),
                             node("Mul", ["ec", "s"], ["e"], name="else_mul")], "else", [], [vi("e", [1, 4, 3, 3])])
    return make_model([node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=els)],
                      [vi("cond", [], BOOL), vi("x", [1, 3, 5, 5])], [vi("y", [1, 4, 3, 3])],
                      [init("W", rand((4, 3, 3, 3), 1)), init("s", rand((4, 1, 1), 2))] + bn_inits("bn", 4, 150))


def test_folds_inside_if_branches():
    model = if_model()
    x = rand((1, 3, 5, 5), 9)
    feeds = [{"cond": np.array(True), "x": x}, {"cond": np.array(False), "x": x}]
    out, st_, _ = fold(model, feeds)
    assert ops(out) == ["If"]
    then, els = subgraph(out, "If", "then_branch"), subgraph(out, "If", "else_branch")
    assert ops(then) == ["Conv"] and list(then.node[0].output) == ["t"]
    assert ops(els) == ["Conv"] and list(els.node[0].output) == ["e"]
    check_stats(st_, bn_folded=1, mul_folded=1, layers_changed=2, biases_added=1, shared_weights_copied=1)


def test_bn_in_a_branch_after_an_outer_conv_is_left_alone():
    then = helper.make_graph([bn("c", "t", "bn")], "then", [], [vi("t", [1, 4, 3, 3])])
    els = helper.make_graph([node("Relu", ["c"], ["e"], name="relu")], "else", [], [vi("e", [1, 4, 3, 3])])
    model = make_model([node("Conv", ["x", "W"], ["c"], name="conv"),
                        node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=els)],
                       [vi("cond", [], BOOL), vi("x", [1, 3, 5, 5])], [vi("y", [1, 4, 3, 3])],
                       [init("W", rand((4, 3, 3, 3), 1))] + bn_inits("bn", 4, 160))
    check_stats(assert_untouched(model), skipped_outer_scope=1)


def test_folds_inside_a_loop_body():
    """Loop: v <- Relu(BN(Conv(v, W))) n times; W and the BN parameters are outer initializers."""
    body = helper.make_graph(
        [node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
         node("Conv", ["v_in", "W"], ["bc"], name="body_conv", pads=[1, 1, 1, 1]), bn("bc", "bb", "bn"),
         node("Relu", ["bb"], ["v_out"], name="body_relu")],
        "body", [vi("i", [], TensorProto.INT64), vi("cond_in", [], BOOL), vi("v_in", [1, 4, 5, 5])],
        [vi("cond_out", [], BOOL), vi("v_out", [1, 4, 5, 5])])
    model = make_model([node("Loop", ["n", "", "v0"], ["y"], name="loop", body=body)],
                       [vi("n", [], TensorProto.INT64), vi("v0", [1, 4, 5, 5])], [vi("y", [1, 4, 5, 5])],
                       [init("W", rand((4, 4, 3, 3), 1) * 0.3)] + bn_inits("bn", 4, 170))
    feeds = [{"n": np.array(k, np.int64), "v0": rand((1, 4, 5, 5), 9)} for k in (0, 3)]
    out, st_, _ = fold(model, feeds)
    assert ops(subgraph(out.graph.node[0], "body")) == ["Identity", "Conv", "Relu"]
    check_stats(st_, bn_folded=1, layers_changed=1, biases_added=1)


def test_folds_inside_a_model_local_function():
    """Functions hold their weights in Constant nodes; the folded weight becomes one again."""
    fn = helper.make_function(
        "local", "Block", ["fx"], ["fy"],
        [node("Constant", [], ["fw"], name="fw_const", value=numpy_helper.from_array(rand((4, 3, 3, 3), 1), "w")),
         node("Constant", [], ["fs"], name="fs_const", value=numpy_helper.from_array(rand((4, 1, 1), 2), "s")),
         node("Conv", ["fx", "fw"], ["fc"], name="f_conv"), node("Mul", ["fc", "fs"], ["fy"], name="f_mul")],
        [helper.make_opsetid("", 17)])
    model = make_model([node("Block", ["x"], ["y"], name="block", domain="local")],
                       [vi("x", [1, 3, 5, 5])], [vi("y", [1, 4, 3, 3])], functions=[fn], opsets={"": 17, "local": 1})
    out, st_, _ = fold(model)
    assert [n.op_type for n in out.functions[0].node] == ["Constant", "Conv"]
    assert list(out.functions[0].output) == ["fy"]
    check_stats(st_, mul_folded=1, layers_changed=1)


# ----------------------------------------------------------------- the shipped CNN

def test_digits_cnn_three_conv_bn_pairs_fold():
    before = onnx.load("models/digits_cnn.onnx")
    assert len(before.graph.node) == 13
    result = onnxopt.optimize("models/digits_cnn.onnx", "fold_bn,dce", inputs="models/digits_test.npz")
    assert result.passed, result.validation.headline()
    assert len(result.model.graph.node) == 10
    assert "BatchNormalization" not in ops(result.model)
    out = result.validation.outputs[0]
    assert out.accuracy_candidate == out.accuracy_reference
    assert out.top1_agreement == 1.0
    stats = result.records[0].stats
    check_stats(stats, bn_folded=3, layers_changed=3, biases_added=3)


# ----------------------------------------------------------------- random producers and chains

def producer_nodes(draw):
    """(nodes, initializers, input value, output name, channels, output shape, BN foldable)."""
    kind = draw(st.sampled_from(["conv", "convtranspose", "gemm", "matmul"]))
    if kind == "conv":
        group, bias = draw(st.sampled_from([1, 2])), draw(st.booleans())
        inits = [init("W", rand((6, 4 // group, 3, 3), 1))] + ([init("B", rand(6, 2))] if bias else [])
        n = node("Conv", ["x", "W", "B"] if bias else ["x", "W"], ["p"], name="producer", group=group)
        return [n], inits, vi("x", [2, 4, 5, 5]), 6, (2, 6, 3, 3), True
    if kind == "convtranspose":
        group = draw(st.sampled_from([1, 2]))
        n = node("ConvTranspose", ["x", "W"], ["p"], name="producer", group=group, strides=[2, 2])
        return [n], [init("W", rand((4, 3, 2, 2), 1))], vi("x", [2, 4, 3, 3]), 3 * group, (2, 3 * group, 6, 6), True
    if kind == "gemm":
        trans_b = draw(st.sampled_from([0, 1]))
        c_shape = draw(st.sampled_from([None, (5,), (1, 5), (3, 5), (3, 1), ()]))
        inits = [init("W", rand((5, 4) if trans_b else (4, 5), 1))]
        if c_shape is not None:
            inits.append(init("C", rand(c_shape, 2)))
        alpha, beta = draw(st.sampled_from([1.0, 0.5])), draw(st.sampled_from([1.0, 2.0, 0.0]))
        n = node("Gemm", ["a", "W", "C"] if c_shape is not None else ["a", "W"], ["p"], name="producer",
                 transB=trans_b, alpha=alpha, beta=beta)
        return [n], inits, vi("a", [3, 4]), 5, (3, 5), True
    rank = draw(st.sampled_from([2, 3]))
    shape = (3, 4) if rank == 2 else (2, 3, 4)
    nodes = [node("MatMul", ["a", "W"], ["mm"], name="producer"), node("Add", ["mm", "b"], ["p"], name="bias")]
    inits = [init("W", rand((4, 5), 1)), init("b", rand(5, 2))]
    return nodes, inits, vi("a", list(shape)), 5, shape[:-1] + (5,), rank == 2


@st.composite
def affine_chains(draw):
    """A producer followed by 1-4 affine nodes; some constants broadcast wrongly (the chain stops folding there)."""
    nodes, inits, x, c, out_shape, bn_ok = producer_nodes(draw)
    rank = len(out_shape)
    from_end = rank - 1 if nodes[0].op_type.startswith("Conv") else 1  # the channel axis, counted from the end
    good = [(), (1,)] + [(1,) * (length - from_end) + (c,) + (1,) * (from_end - 1)
                         for length in range(from_end, rank + 1)]
    bad = [out_shape, (out_shape[0],) + (1,) * (rank - 1)]
    prev, expected, first_bad = "p", Counter(), None
    for i in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["BN", "Mul", "Add", "Sub", "SubRev", "Div"]))
        out = f"v{i}"
        if op == "BN":
            channels = out_shape[1]
            inits += bn_inits(f"bn{i}", channels, 200 + 10 * i)
            nodes.append(bn(prev, out, f"bn{i}"))
            ok = bn_ok
        else:
            ok = draw(st.integers(0, 5)) > 0
            shape = draw(st.sampled_from(good if ok else bad))
            inits.append(init(f"k{i}", rand(shape, 300 + i, low=0.5 if op == "Div" else None)))
            const_first = op == "SubRev" or (op in ("Mul", "Add") and draw(st.booleans()))
            inputs = [f"k{i}", prev] if const_first else [prev, f"k{i}"]
            nodes.append(node("Sub" if op == "SubRev" else op, inputs, [out], name=f"op{i}"))
        if first_bad is None and ok:
            expected[{"BN": "bn", "SubRev": "sub"}.get(op, op.lower())] += 1
        elif first_bad is None:
            first_bad = len(nodes) - 1
        prev = out
    model = make_model(nodes, [x], [vi(prev, out_shape)], inits)
    n_producer = 2 if nodes[0].op_type == "MatMul" else 1
    kept = [n.op_type for n in nodes[:n_producer]] + ([n.op_type for n in nodes[first_bad:]] if first_bad else [])
    return model, expected, kept, first_bad is not None


RANDOM_SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                           suppress_health_check=[HealthCheck.too_slow])


@RANDOM_SETTINGS
@given(affine_chains())
def test_random_producers_and_chains(case):
    model, expected, kept, stopped = case
    out, result = run_pass_direct(model, "fold_bn")
    assert ops(out) == kept
    for kind in ("bn", "mul", "add", "sub", "div"):
        assert result.stats[f"{kind}_folded"] == expected[kind]
    assert result.stats["skipped_not_per_channel"] == int(stopped)
    assert result.modified == bool(sum(expected.values()))
    assert interface(out) == interface(model)
    feed = random_feed(model, seed=3)
    assert_close(run_model(model, feed), run_model(out, feed))
