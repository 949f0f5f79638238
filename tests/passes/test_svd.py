"""The ``svd`` pass: MatMul/Gemm weights factored into two low-rank matrices.

svd is lossy. Every case that rewrites runs through ``onnxopt.optimize`` (pass
manager, contracts, checker, validation in ORT with its own optimizations on) and
is checked against the original in ORT with optimizations off: exact (1e-5 relative)
where the weight is low-rank by construction and the kept rank covers it, within the
requested tolerance elsewhere. The latency gate is off unless a test is about it, so
results do not depend on timings. Cases that must not factor assert the graph is
untouched.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxopt
from helpers import (INT64, init, make_model, node, ops, random_feed, run_model, run_pass_direct, subgraph, vi)

FLOAT16 = TensorProto.FLOAT16

SKIPS = ("excluded", "no_constant_weight", "constant_input", "weight_not_2d", "unsupported_dtype", "shared_weight",
         "in_function", "uncalibrated", "not_beneficial", "slower", "old_opset")


def low_rank(k: int, n: int, r: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((k, r)) @ rng.standard_normal((r, n)) / np.sqrt(r)).astype(np.float32)


def decaying(k: int, n: int, seed: int, rate: float = 0.93) -> np.ndarray:
    """A full-rank weight with singular values rate**i."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((k, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    m = min(k, n)
    return (u[:, :m] * rate ** np.arange(m)) @ v[:, :m].T


def counts(stats: dict) -> dict:
    """The integer counters, without the per-layer list and the float error figures."""
    return {k: v for k, v in stats.items() if isinstance(v, int) and not isinstance(v, bool)}


def expect(**changes: int) -> dict:
    return {"layers_factorized": 0, "params_before": 0, "params_after": 0,
            **{f"skipped_{k}": 0 for k in SKIPS}, **changes}


def rel_error(ref: np.ndarray, got: np.ndarray) -> float:
    """‖ref − got‖² / ‖ref‖², the measure the tolerance mode bounds."""
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float(np.sum((ref - got) ** 2) / np.sum(ref ** 2))


def max_rel(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float(np.max(np.abs(ref - got)) / max(1.0, np.max(np.abs(ref))))


def svd(model: onnx.ModelProto, spec: str, feeds=None, calibration=None, tolerance="min_cosine=0.9"):
    """Run the pass through optimize(); the result must pass validation. Returns (model, stats)."""
    feeds = feeds if feeds is not None else [random_feed(model, seed=s) for s in range(2)]
    result = onnxopt.optimize(model, spec, inputs=feeds, calibration=calibration, tolerance=tolerance)
    assert result.validation is not None and result.passed, result.validation.headline()
    assert result.records[0].name == "svd"
    json.dumps(result.to_dict())  # the per-layer report is JSON-safe
    onnx.checker.check_model(result.model, full_check=True)
    return result.model, dict(result.records[0].stats)


def matmul_model(w: np.ndarray, x_shape=("batch", 3, None), dtype=TensorProto.FLOAT, bias: bool = False,
                 const_node: bool = False) -> onnx.ModelProto:
    k, n = w.shape
    x_shape = [k if d is None else d for d in x_shape]
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    nodes, inits = [], []
    if const_node:
        nodes.append(helper.make_node("Constant", [], ["W"], name="w_const",
                                      value=onnx.numpy_helper.from_array(w.astype(np_dtype), "W_value")))
    else:
        inits.append(init("W", w, np_dtype))
    nodes.append(node("MatMul", ["x", "W"], ["xw" if bias else "y"], name="fc"))
    if bias:
        inits.append(init("b", np.linspace(-1, 1, n), np_dtype))
        nodes.append(node("Add", ["xw", "b"], ["y"], name="bias"))
    return make_model(nodes, [vi("x", x_shape, dtype)], [vi("y", [*x_shape[:-1], n], dtype)], inits)


# ----------------------------------------------------------------- exact at a covering rank

def test_matmul_low_rank_weight_is_exact_at_its_rank():
    w = low_rank(64, 128, 8, seed=1)
    model = matmul_model(w)
    out, stats = svd(model, "svd(rank=8,latency_gate=false)")
    assert counts(stats) == expect(layers_factorized=1, params_before=64 * 128, params_after=8 * (64 + 128))
    assert ops(out) == ["MatMul", "MatMul"]
    assert sorted(tuple(i.dims) for i in out.graph.initializer) == [(8, 128), (64, 8)]
    assert stats["max_weight_error"] < 1e-10
    assert stats["layers"] == [{"node": "fc", "op": "MatMul", "k": 64, "n": 128, "rank": 8, "status": "factorized",
                                "weight_error": stats["max_weight_error"]}]
    feed = random_feed(model, seed=3, dims={"batch": 4})
    assert max_rel(run_model(model, feed)["y"], run_model(out, feed)["y"]) <= 1e-5
    # the same through the pass alone (no pass manager), with a symbolic batch kept in the mid value's shape
    direct, result = run_pass_direct(model, "svd", rank=8, latency_gate=False)
    assert result.modified and counts(result.stats) == counts(stats)
    mid = next(v for v in direct.graph.value_info if v.name.endswith("svd_mid"))
    assert [d.dim_param or d.dim_value for d in mid.type.tensor_type.shape.dim] == ["batch", 3, 8]


@pytest.mark.parametrize("spec", ["svd(energy=0.9999999,latency_gate=false)", "svd(rank_ratio=0.1,latency_gate=false)"])
def test_energy_and_rank_ratio_find_the_rank(spec):
    w = low_rank(80, 96, 8, seed=2)
    model = matmul_model(w, bias=True)
    out, stats = svd(model, spec)
    assert ops(out) == ["MatMul", "MatMul", "Add"]
    assert stats["layers"][0]["rank"] == 8  # energy: rank 8 holds it all; rank_ratio: ceil(0.1 * 80) = 8
    feed = random_feed(model, seed=4)
    assert max_rel(run_model(model, feed)["y"], run_model(out, feed)["y"]) <= 1e-5


def test_round_to_rounds_ranks_up():
    w = low_rank(64, 64, 4, seed=3)
    _, stats = svd(matmul_model(w), "svd(rank=5,latency_gate=false)")
    assert stats["layers"][0]["rank"] == 8
    _, stats = svd(matmul_model(w), "svd(rank=5,round_to=1,latency_gate=false)")
    assert stats["layers"][0]["rank"] == 5


def test_fp16_weights_stay_fp16():
    w = low_rank(64, 96, 8, seed=4)
    model = matmul_model(w, dtype=FLOAT16)
    out, stats = svd(model, "svd(rank=8,latency_gate=false)")
    assert stats["layers_factorized"] == 1
    assert {i.data_type for i in out.graph.initializer} == {FLOAT16}
    feed = random_feed(model, seed=5)
    assert max_rel(run_model(model, feed)["y"], run_model(out, feed)["y"]) <= 1e-2


def test_weight_in_constant_node():
    w = low_rank(48, 64, 8, seed=5)
    model = matmul_model(w, const_node=True)
    out, stats = svd(model, "svd(rank=8,latency_gate=false)")
    assert stats["layers_factorized"] == 1
    assert ops(out) == ["MatMul", "MatMul"]  # the Constant node went with the automatic dce
    feed = random_feed(model, seed=6)
    assert max_rel(run_model(model, feed)["y"], run_model(out, feed)["y"]) <= 1e-5


# ----------------------------------------------------------------- Gemm

@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta,c", [(1.0, 1.0, None), (0.5, 2.0, "row"), (2.0, 0.25, "full"), (1.0, 1.0, "scalar")])
def test_gemm_attributes(trans_a, trans_b, alpha, beta, c):
    m, k, n = 5, 48, 64
    w = low_rank(k, n, 8, seed=6)
    inits = [init("B", w.T if trans_b else w)]
    inputs = ["a", "B"]
    if c is not None:
        shape = {"row": (n,), "full": (m, n), "scalar": ()}[c]
        inits.append(init("C", np.random.default_rng(7).standard_normal(shape)))
        inputs.append("C")
    model = make_model([node("Gemm", inputs, ["y"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)],
                       [vi("a", [k, m] if trans_a else [m, k])], [vi("y", [m, n])], inits)
    out, stats = svd(model, "svd(rank=8,latency_gate=false)")
    assert counts(stats) == expect(layers_factorized=1, params_before=k * n, params_after=8 * (k + n))
    assert ops(out) == ["Gemm", "Gemm"]
    first, second = out.graph.node
    assert {a.name: helper.get_attribute_value(a) for a in first.attribute} == {"transA": trans_a}
    assert {a.name: helper.get_attribute_value(a) for a in second.attribute} == {"beta": beta}
    assert list(second.input[2:]) == (["C"] if c else [])
    feed = random_feed(model, seed=8)
    assert max_rel(run_model(model, feed)["y"], run_model(out, feed)["y"]) <= 1e-5


def test_gemm_before_opset_11_gets_a_zero_c():
    w = low_rank(32, 40, 8, seed=9)
    model = make_model([node("Gemm", ["a", "B", "C"], ["y"], name="gemm", transB=1)], [vi("a", [3, 32])],
                       [vi("y", [3, 40])], [init("B", w.T), init("C", np.ones(40))], opsets={"": 9}, ir_version=4)
    out, stats = svd(model, "svd(rank=8,latency_gate=false)")
    assert stats["layers_factorized"] == 1
    assert ops(out) == ["Gemm", "Gemm"] and len(out.graph.node[0].input) == 3
    feed = random_feed(model, seed=1)
    assert max_rel(run_model(model, feed)["y"], run_model(out, feed)["y"]) <= 1e-5


# ----------------------------------------------------------------- skip rules

def assert_untouched(model: onnx.ModelProto, spec_options: dict, **expected: int) -> None:
    out, result = run_pass_direct(model, "svd", **spec_options)
    assert not result.modified
    assert counts(result.stats) == expect(**expected)
    assert [(n.op_type, list(n.input)) for n in out.graph.node] == [(n.op_type, list(n.input)) for n in model.graph.node]
    assert sorted(i.name for i in out.graph.initializer) == sorted(i.name for i in model.graph.initializer)


def test_skip_when_rank_saves_nothing():
    # 64x64 at rank 32: 32 * 128 = 64 * 64, not fewer parameters
    assert_untouched(matmul_model(low_rank(64, 64, 8, 1)), {"rank": 32, "latency_gate": False},
                     skipped_not_beneficial=1)
    # the default (energy 0.99) on a flat-spectrum weight keeps nearly every singular value
    flat = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    assert_untouched(matmul_model(flat), {"latency_gate": False}, skipped_not_beneficial=1)


def test_skip_activation_matmul_weight_on_left_and_constant_input():
    w = low_rank(8, 8, 2, 1)
    model = make_model([node("MatMul", ["x", "z"], ["t"], name="act"), node("MatMul", ["W", "t"], ["u"], name="left"),
                        node("MatMul", ["W2", "W3"], ["c"], name="consts"), node("Add", ["u", "c"], ["y"])],
                       [vi("x", [8, 8]), vi("z", [8, 8])], [vi("y", [8, 8])],
                       [init("W", w), init("W2", w), init("W3", w)])
    assert_untouched(model, {"rank": 1, "round_to": 1, "latency_gate": False}, skipped_no_constant_weight=2,
                     skipped_constant_input=1)


def test_skip_shared_3d_integer_excluded_and_overridable_weights():
    w = low_rank(32, 32, 4, 2)
    model = make_model(
        [node("MatMul", ["x", "W"], ["a"], name="shared1"), node("MatMul", ["x", "W"], ["b"], name="shared2"),
         node("MatMul", ["x3", "W3"], ["c"], name="three"), node("MatMul", ["xi", "Wi"], ["d"], name="ints"),
         node("MatMul", ["x", "We"], ["e"], name="skip_me"), node("MatMul", ["x", "Wo"], ["f"], name="override")],
        [vi("x", [2, 32]), vi("x3", [2, 2, 32]), vi("xi", [2, 32], INT64), vi("Wo", [32, 32])],
        [vi("a", [2, 32]), vi("b", [2, 32]), vi("c", [2, 2, 32]), vi("d", [2, 32], INT64), vi("e", [2, 32]),
         vi("f", [2, 32])],
        [init("W", w), init("W3", np.stack([w, w])), init("Wi", np.ones((32, 32)), np.int64), init("We", w),
         init("Wo", w)])
    assert_untouched(model, {"rank": 4, "latency_gate": False, "exclude": ["skip_*"]}, skipped_shared_weight=2,
                     skipped_weight_not_2d=1, skipped_unsupported_dtype=1, skipped_excluded=1,
                     skipped_no_constant_weight=1)


def test_if_body_factored_without_calibration_and_skipped_with_it():
    w = low_rank(16, 32, 4, 3)
    then = helper.make_graph([node("MatMul", ["x", "Wt"], ["yt"], name="body_fc")], "then", [],
                             [vi("yt", [2, 32])], [init("Wt", w)])
    other = helper.make_graph([node("MatMul", ["x", "We"], ["ye"], name="else_fc")], "else", [],
                              [vi("ye", [2, 32])], [init("We", w)])
    model = make_model([node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=other)],
                       [vi("cond", [], TensorProto.BOOL), vi("x", [2, 16])], [vi("y", [2, 32])])
    feeds = [{"cond": np.array(c), "x": random_feed(model, seed=1)["x"]} for c in (True, False)]
    out, stats = svd(model, "svd(rank=4,latency_gate=false)", feeds=feeds)
    assert stats["layers_factorized"] == 2
    assert ops(subgraph(out, "If", "then_branch")) == ["MatMul", "MatMul"]
    for feed in feeds:
        assert max_rel(run_model(model, feed)["y"], run_model(out, feed)["y"]) <= 1e-5
    out, stats = svd(model, "svd(rank=4,aware=true,latency_gate=false)", feeds=feeds, calibration=feeds)
    assert counts(stats) == expect(skipped_uncalibrated=2)


def test_function_bodies_are_left_alone():
    w = low_rank(8, 16, 2, 4)
    func = helper.make_function("local", "Proj", ["x"], ["y"],
                                [helper.make_node("Constant", [], ["W"], value=onnx.numpy_helper.from_array(w)),
                                 helper.make_node("MatMul", ["x", "W"], ["y"])],
                                [helper.make_opsetid("", 17)])
    model = make_model([node("Proj", ["x"], ["y"], name="proj", domain="local")], [vi("x", [2, 8])],
                       [vi("y", [2, 16])], functions=[func], opsets={"": 17, "local": 1})
    _, result = run_pass_direct(model, "svd", rank=2, round_to=1, latency_gate=False)
    assert not result.modified and counts(result.stats) == expect(skipped_in_function=1)


# ----------------------------------------------------------------- options

@pytest.mark.parametrize("spec", ["svd(rank=8,energy=0.9)", "svd(tolerance=0.1,param_ratio=0.5)", "svd(rank=0)",
                                  "svd(energy=1.5)", "svd(tolerance=1.0)", "svd(round_to=0)"])
def test_bad_options(spec):
    with pytest.raises(onnxopt.errors.InputError):
        onnxopt.optimize(matmul_model(low_rank(8, 8, 2, 1)), spec)


# ----------------------------------------------------------------- calibration: tolerance, aware, budget

def correlated(rows: int, k: int, seed: int, outliers: int = 0, scale: float = 30.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    x = rng.standard_normal((rows, k)) @ mix
    if outliers:
        x[:, rng.choice(k, outliers, replace=False)] *= scale
    return x.astype(np.float32)


def two_d_model(w: np.ndarray) -> onnx.ModelProto:
    k, n = w.shape
    return make_model([node("MatMul", ["x", "W"], ["y"], name="fc")], [vi("x", ["batch", k])], [vi("y", ["batch", n])],
                      [init("W", w)])


@pytest.mark.parametrize("aware", [False, True])
def test_tolerance_bounds_the_output_error_on_calibration_data(aware):
    w = decaying(96, 128, seed=10)
    model = two_d_model(w)
    x = correlated(512, 96, seed=11, outliers=2)
    tol = 0.02
    out, stats = svd(model, f"svd(tolerance={tol},aware={str(aware).lower()},round_to=1,latency_gate=false,samples=512)",
                     feeds=[{"x": x[:64]}], calibration={"x": x})
    (layer,) = stats["layers"]
    rank = layer["rank"]
    assert stats["layers_factorized"] == 1 and 0 < rank < 96 * 128 / (96 + 128)
    measured = rel_error(run_model(model, {"x": x})["y"], run_model(out, {"x": x})["y"])
    assert measured <= tol
    assert abs(measured - layer["output_error"]) <= 1e-3 * max(tol, measured) + 1e-6  # the estimate is the measure
    # one rank less would not have met it
    fewer, _ = svd(model, f"svd(rank={rank - 1},aware={str(aware).lower()},round_to=1,latency_gate=false)",
                   feeds=[{"x": x[:64]}], calibration={"x": x}, tolerance="min_cosine=0.5")
    assert rel_error(run_model(model, {"x": x})["y"], run_model(fewer, {"x": x})["y"]) > tol


def test_aware_beats_plain_with_outlier_input_channels():
    k, n = 400, 256  # 1% of input channels (4) carry 30x larger activations
    rng = np.random.default_rng(12)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    model = two_d_model(w)
    calib, test = correlated(1024, k, seed=13, outliers=4), None
    rng2 = np.random.default_rng(13)  # same outlier channels as calib, fresh samples
    test = correlated(1024, k, seed=13, outliers=4)[rng2.permutation(1024)[:256]]
    ref = run_model(model, {"x": test})["y"]
    for rank in (32, 64, 128):
        errors = {}
        for aware in ("false", "true"):
            out, stats = svd(model, f"svd(rank={rank},aware={aware},latency_gate=false)", feeds=[{"x": test[:32]}],
                             calibration={"x": calib}, tolerance="min_cosine=0")
            assert stats["layers_factorized"] == 1
            errors[aware] = rel_error(ref, run_model(out, {"x": test})["y"])
        assert errors["true"] <= 0.7 * errors["false"], (rank, errors)


def test_aware_is_the_default_with_calibration_and_the_canonical_string_says_which_ran():
    k, n = 200, 128
    w = (np.random.default_rng(16).standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    model = two_d_model(w)
    calib = correlated(512, k, seed=17, outliers=3)
    test = {"x": calib[:64]}
    results = {}
    for spec, calibration in (("svd(rank=32,latency_gate=false)", {"x": calib}),
                              ("svd(rank=32,aware=true,latency_gate=false)", {"x": calib}),
                              ("svd(rank=32,latency_gate=false)", None),
                              ("svd(rank=32,aware=false,latency_gate=false)", {"x": calib})):
        result = onnxopt.optimize(model, spec, inputs=[test], calibration=calibration, tolerance="min_cosine=0")
        results[(spec, calibration is not None)] = result
    with_data = results[("svd(rank=32,latency_gate=false)", True)]
    without = results[("svd(rank=32,latency_gate=false)", False)]
    assert "aware=true" in with_data.to_dict()["pipeline"] and "aware=true" in with_data.records[0].canonical
    assert "aware=false" in without.to_dict()["pipeline"] and "aware=false" in without.records[0].canonical
    ref = run_model(model, test)["y"]
    got = {key: run_model(r.model, test)["y"] for key, r in results.items()}
    np.testing.assert_array_equal(got[("svd(rank=32,latency_gate=false)", True)],
                                  got[("svd(rank=32,aware=true,latency_gate=false)", True)])
    np.testing.assert_array_equal(got[("svd(rank=32,latency_gate=false)", False)],
                                  got[("svd(rank=32,aware=false,latency_gate=false)", True)])
    assert rel_error(ref, got[("svd(rank=32,latency_gate=false)", True)]) < \
        0.7 * rel_error(ref, got[("svd(rank=32,latency_gate=false)", False)])
    # the recorded string reproduces the run
    again = onnxopt.optimize(model, with_data.records[0].canonical, inputs=[test], calibration={"x": calib},
                             tolerance="min_cosine=0")
    np.testing.assert_array_equal(run_model(again.model, test)["y"], got[("svd(rank=32,latency_gate=false)", True)])


def test_aware_auto_stays_plain_when_calibration_has_fewer_rows_than_input_channels():
    k, n = 200, 128
    w = (np.random.default_rng(18).standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    model = two_d_model(w)
    calib = {"x": correlated(64, k, seed=19)}  # 64 rows for 200 input channels: XᵀX is singular
    auto = onnxopt.optimize(model, "svd(rank=32,latency_gate=false)", inputs=[calib], calibration=calib,
                            tolerance="min_cosine=0")
    plain = onnxopt.optimize(model, "svd(rank=32,aware=false,latency_gate=false)", inputs=[calib], calibration=calib,
                             tolerance="min_cosine=0")
    assert "aware=false" in auto.records[0].canonical
    assert auto.records[0].notes == ["aware=auto -> false: calibration gave fewer activation rows than input channels "
                                     "in 1 layer(s) (e.g. fc: 64 < 200); whitening would fit those rows only"]
    assert auto.records[0].stats == plain.records[0].stats
    np.testing.assert_array_equal(run_model(auto.model, calib)["y"], run_model(plain.model, calib)["y"])


def test_param_ratio_budget_spends_parameters_where_error_falls_most():
    # an easy layer (fast-decaying spectrum) and a hard one (slow): the budget goes to the hard one
    # (plain SVD: the spectra are the weights'; whitening by the correlated inputs would reshape them)
    easy, hard = decaying(64, 64, seed=14, rate=0.7), decaying(64, 64, seed=15, rate=0.97)
    model = make_model([node("MatMul", ["x", "We"], ["h"], name="easy"), node("MatMul", ["h", "Wh"], ["y"], name="hard")],
                       [vi("x", ["batch", 64])], [vi("y", ["batch", 64])], [init("We", easy), init("Wh", hard)])
    x = correlated(256, 64, seed=16)
    out, stats = svd(model, "svd(param_ratio=0.5,aware=false,latency_gate=false)", feeds=[{"x": x[:32]}], calibration={"x": x},
                     tolerance="min_cosine=0.5")
    ranks = {l["node"]: l["rank"] for l in stats["layers"]}
    assert ranks["easy"] < ranks["hard"]
    assert stats["param_ratio_achieved"] <= 0.5
    assert stats["params_after"] == sum(r * 128 for r in ranks.values())
    assert ops(out) == ["MatMul"] * 4


def test_latency_gate_times_every_layer_it_would_factor():
    w = low_rank(256, 256, 16, seed=17)
    model = matmul_model(w, x_shape=("batch", 16, None))
    _, result = run_pass_direct(model, "svd", rank=16)
    (layer,) = result.stats["layers"]
    assert layer["ms_original"] > 0 and layer["ms_factorized"] > 0 and layer["timing_rows"] == 16  # batch bound to 1
    assert layer["status"] in ("factorized", "skipped_slower")
    assert result.stats["layers_factorized"] + result.stats["skipped_slower"] == 1
    assert result.modified == (layer["status"] == "factorized")


def test_weight_read_through_a_transpose():
    # exporters without constant folding write torch's Linear as MatMul(x, Transpose(W[N, K]))
    w = low_rank(48, 64, 8, seed=18)
    model = make_model([node("Transpose", ["Wt"], ["W"], name="t", perm=[1, 0]), node("MatMul", ["x", "W"], ["y"], name="fc")],
                       [vi("x", ["batch", 48])], [vi("y", ["batch", 64])], [init("Wt", w.T)])
    out, stats = svd(model, "svd(rank=8,latency_gate=false)")
    assert counts(stats) == expect(layers_factorized=1, params_before=48 * 64, params_after=8 * (48 + 64))
    assert ops(out) == ["MatMul", "MatMul"]  # the Transpose went with the automatic dce
    feed = random_feed(model, seed=19)
    assert max_rel(run_model(model, feed)["y"], run_model(out, feed)["y"]) <= 1e-5
    # a transposed constant also read elsewhere is shared: factoring would not free it
    shared = make_model([node("Transpose", ["Wt"], ["W"], name="t", perm=[1, 0]), node("MatMul", ["x", "W"], ["y"], name="fc"),
                         node("Add", ["Wt", "Wt"], ["z"], name="other")],
                        [vi("x", ["batch", 48])], [vi("y", ["batch", 64]), vi("z", [64, 48])], [init("Wt", w.T)])
    assert_untouched(shared, {"rank": 8, "latency_gate": False}, skipped_shared_weight=1)


def test_warns_when_calibration_is_thinner_than_the_layer(caplog):
    w = low_rank(32, 48, 4, seed=20)
    model = two_d_model(w)
    x = correlated(8, 32, seed=21)
    with caplog.at_level("WARNING", logger="onnxopt"):
        svd(model, "svd(rank=4,aware=true,latency_gate=false)", feeds=[{"x": x}], calibration={"x": x})
    assert any("fewer activation rows than input channels" in r.getMessage() and "fc (8 < 32)" in r.getMessage()
               for r in caplog.records)


def test_svd_then_qdq_composes():
    if "qdq" not in onnxopt.pipeline.registered_passes():
        pytest.skip("no qdq pass registered")
    w1, w2 = decaying(64, 128, seed=22, rate=0.9), decaying(128, 32, seed=23, rate=0.9)
    model = make_model([node("MatMul", ["x", "W1"], ["h"], name="fc1"), node("Relu", ["h"], ["r"]),
                        node("MatMul", ["r", "W2"], ["y"], name="fc2")],
                       [vi("x", ["batch", 64])], [vi("y", ["batch", 32])],
                       [init("W1", w1.astype(np.float32)), init("W2", w2.astype(np.float32))])
    x = correlated(256, 64, seed=24)
    result = onnxopt.optimize(model, "svd(rank=24,aware=true,latency_gate=false),qdq(mode=static)", calibration={"x": x},
                              inputs={"x": x[:64]}, tolerance="min_cosine=0.97")
    assert result.passed, result.validation.headline()
    assert result.records[0].stats["layers_factorized"] == 2
    assert "DequantizeLinear" in ops(result.model)
    assert ops(result.model).count("MatMul") == 4


def test_only_factors_the_named_layers():
    """only= names the layers factored; the others keep their weights (digits MLP, three Gemms)."""
    model = onnx.load("models/digits_mlp.onnx")
    result = onnxopt.optimize(model, "svd(rank=8,latency_gate=false,only=/3/Gemm)", validate=False)
    stats = next(r for r in result.records if r.name == "svd").stats
    assert stats["layers_factorized"] == 1 and stats["skipped_excluded"] == 2
    weights = {i.name for i in result.model.graph.initializer}
    assert {"1.weight", "5.weight"} <= weights and "3.weight" not in weights
