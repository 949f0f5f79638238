"""Validation metrics against numpy references, and tolerance judgement."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt import runtime, serialize
from onnxopt.data import Dataset
from onnxopt.pipeline import EXACT, FLOOR_MULTIPLE, Tolerance
from onnxopt.report import format_comparison
from onnxopt.validate import compare, make_session


def _affine(scale: float, shift: float, classes: int = 5) -> onnx.ModelProto:
    """y = x * scale + shift, x float [batch, classes]."""
    nodes = [helper.make_node("Mul", ["x", "s"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])]
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"),
             numpy_helper.from_array(np.array(shift, np.float32), "b")]
    graph = helper.make_graph(nodes, "affine", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", classes])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", classes])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _data(seed=0, batches=3, rows=16, classes=5, labels=True):
    rng = np.random.default_rng(seed)
    feeds = [{"x": rng.standard_normal((rows, classes)).astype(np.float32)} for _ in range(batches)]
    lab = rng.integers(0, classes, batches * rows) if labels else None
    return Dataset(feeds, lab, source="test", samples=batches * rows)


def test_metrics_match_numpy():
    data = _data()
    result = compare(_affine(1, 0), _affine(1.1, 0.05), data, Tolerance(min_cosine=0.9))
    ref = np.concatenate([f["x"] for f in data.feeds]).astype(np.float64)
    cand = (np.concatenate([f["x"] for f in data.feeds]) * np.float32(1.1) + np.float32(0.05)).astype(np.float64)
    err = np.abs(ref - cand)
    m = result.outputs[0]
    assert m.max_abs == pytest.approx(err.max(), rel=1e-5)
    assert m.mean_abs == pytest.approx(err.mean(), rel=1e-5)
    assert m.cosine == pytest.approx(ref.ravel() @ cand.ravel() / np.linalg.norm(ref) / np.linalg.norm(cand), rel=1e-6)
    assert m.snr_db == pytest.approx(10 * math.log10((ref ** 2).sum() / ((ref - cand) ** 2).sum()), rel=1e-5)
    agree = np.mean(ref.argmax(1) == cand.argmax(1))
    assert m.top1_agreement == pytest.approx(agree)
    assert m.accuracy_reference == pytest.approx(np.mean(ref.argmax(1) == data.labels))
    assert result.passed and not result.identical


def test_tolerance_judgement():
    data = _data(labels=False)
    exact = compare(_affine(1, 0), _affine(1, 0), data, Tolerance(atol=0, rtol=0))
    assert exact.passed and exact.identical and exact.outputs[0].snr_db == math.inf
    off = compare(_affine(1, 0), _affine(1, 1e-3), data, Tolerance(atol=1e-4))
    assert not off.passed and "exceeds atol=0.0001" in off.headline()
    assert compare(_affine(1, 0), _affine(1, 1e-3), data, Tolerance(atol=2e-3)).passed
    snr = compare(_affine(1, 0), _affine(-1, 0), data, Tolerance(min_snr_db=10, max_top1_drop=5),
                  output_kinds={"y": "classes"})  # an affine map: class scores only when told
    fails = snr.outputs[0].failures
    assert any("SNR" in f for f in fails) and any("top-1 agreement dropped" in f for f in fails)


def test_nan_in_same_place_counts_as_equal_but_new_nan_fails():
    data = Dataset([{"x": np.array([[np.nan, 1.0, 2.0, 3.0, 4.0]], np.float32)}], source="t", samples=1)
    same = compare(_affine(1, 0), _affine(1, 0), data, Tolerance(atol=0))
    assert same.identical
    data.feeds[0]["x"][0, 0] = np.inf
    worse = compare(_affine(1, 0), _affine(0, 0), data, Tolerance(atol=1e-3))  # inf*0 = nan
    assert not worse.passed


def test_opt_level_is_applied():
    sess = make_session(_affine(1, 0), "disable")
    assert sess.get_session_options().graph_optimization_level.name == "ORT_DISABLE_ALL"
    with pytest.raises(onnxopt.InputError, match="unknown ORT optimization level"):
        make_session(_affine(1, 0), "max")


# ----------------------------------------------------------------- the runtime's own noise (floor)

def _conv_bn(shift: float = 0.0, c: int = 16) -> onnx.ModelProto:
    """Conv 1x1 + BatchNormalization (+ shift): ORT folds the BN at 'all', not at 'disable', so the
    original itself differs between the two levels by float rounding of large activations."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((c, c, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "g"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "m"),
             numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "v"),
             numpy_helper.from_array(np.array(shift, np.float32), "shift")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"]),
             helper.make_node("BatchNormalization", ["t", "g", "b", "m", "v"], ["u"]),
             helper.make_node("Add", ["u", "shift"], ["y"])]
    graph = helper.make_graph(nodes, "cbn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", c, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _large_inputs() -> Dataset:
    x = (np.random.default_rng(1).standard_normal((8, 16, 4, 4)) * 100).astype(np.float32)
    return Dataset([{"x": x}], source="t", samples=8)


def _floor(model: onnx.ModelProto, data: Dataset) -> float:
    feed = data.feeds[0]
    a = make_session(model, "all").run(None, feed)[0]
    b = make_session(model, "disable").run(None, feed)[0]
    return float(np.abs(a - b).max())


def test_floor_is_measured_reported_and_printed():
    data = _large_inputs()
    floor = _floor(_conv_bn(), data)
    assert floor > 1e-5  # the runtime differs by more than the fixed atol here
    result = compare(_conv_bn(), _conv_bn(), data, EXACT)
    out = result.outputs[0]
    assert out.floor_max_abs == pytest.approx(floor) and result.floor_level == "disable"
    assert out.allowed_abs == pytest.approx(FLOOR_MULTIPLE * floor)
    assert result.to_dict()["outputs"][0]["floor_max_abs"] == pytest.approx(floor)
    text = "\n".join(format_comparison(result))
    assert f"runtime noise {floor:.3g}" in text


def test_error_within_the_floor_passes_the_default_and_well_above_it_fails():
    data = _large_inputs()
    floor = _floor(_conv_bn(), data)
    within = compare(_conv_bn(), _conv_bn(shift=2 * floor), data, EXACT)
    assert within.passed and within.outputs[0].max_abs > 1e-4  # fails atol/rtol alone:
    assert not compare(_conv_bn(), _conv_bn(shift=2 * floor), data, Tolerance(atol=1e-5, rtol=1e-4)).passed
    above = compare(_conv_bn(), _conv_bn(shift=50 * floor), data, EXACT)
    assert not above.passed
    assert f"and {FLOOR_MULTIPLE:g}x the runtime's own noise ({floor:.3g})" in above.headline()


def test_explicit_tolerance_binds_and_says_it_is_tighter_than_the_runtime():
    data = _large_inputs()
    result = compare(_conv_bn(), _conv_bn(shift=2 * _floor(_conv_bn(), data)), data, Tolerance(atol=1e-5, rtol=1e-4))
    assert not result.passed and "the runtime's own noise on this output" in result.headline()
    assert "atol=1e-05 is tighter than ONNX Runtime's own noise on 'y'" in "\n".join(format_comparison(result))


def test_floor_multiple_never_loosens_lossy_checks():
    data = _large_inputs()
    tol = Tolerance(min_cosine=0.999999, floor_multiple=1e6)
    result = compare(_conv_bn(), _conv_bn(shift=1e3), data, tol)
    assert result.outputs[0].allowed_abs is None  # no atol/rtol: nothing to widen
    assert not result.passed and "cosine" in result.headline()


def test_default_tolerances_carry_the_floor_only_for_exact_pipelines():
    from onnxopt.api import default_tolerance
    from onnxopt.pipeline import Pipeline

    assert default_tolerance(Pipeline.parse("cleanup")).floor_multiple == FLOOR_MULTIPLE
    assert default_tolerance(Pipeline.parse("cleanup,qdq")).atol is None
    assert Tolerance.parse("atol=1e-4,floor_multiple=4").floor_multiple == 4


# ----------------------------------------------------------------- NaN and inf

def test_all_nan_inputs_fail_as_not_computable():
    data = Dataset([{"x": np.full((4, 5), np.nan, np.float32)}], source="t", samples=4)
    result = compare(_affine(1, 0), _affine(1, 0), data, EXACT)
    out = result.outputs[0]
    assert not result.passed and out.compared == 0 and out.nonfinite_reference == 20
    assert "not computable" in result.headline() and "'x' 20 of 20" in result.headline()
    assert result.to_dict()["inputs_nonfinite"] == {"x": {"nan": 20, "inf": 0, "values": 20}}
    assert "PASSED" not in "\n".join(format_comparison(result))


def test_partly_nan_inputs_compare_the_finite_positions_and_say_how_many_were_not():
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    x[0, :2] = np.nan
    x[1, 0] = np.inf
    data = Dataset([{"x": x}], source="t", samples=4)
    result = compare(_affine(1, 0), _affine(1, 1e-3), data, Tolerance(atol=2e-3))
    out = result.outputs[0]
    assert result.passed and out.nonfinite_reference == 3 and out.compared == 17
    assert out.max_abs == pytest.approx(1e-3, rel=1e-3) and math.isfinite(out.snr_db)
    notes = "\n".join(result.notes)
    assert "input 'x' holds 2 NaN and 1 inf of 20 values" in notes
    assert "NaN/inf at 3 of 20 positions; those are not compared" in notes


def test_candidate_nan_where_the_original_is_finite_fails():
    data = Dataset([{"x": np.array([[np.inf, 1.0, 2.0, 3.0, 4.0]], np.float32)}], source="t", samples=1)
    # the original keeps the inf in place and is finite elsewhere; the candidate divides by zero
    nodes = [helper.make_node("Div", ["x", "z"], ["y"])]
    graph = helper.make_graph(nodes, "div", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
                              [numpy_helper.from_array(np.zeros(5, np.float32), "z")])
    broken = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = compare(_affine(1, 0), broken, data, EXACT)
    assert not result.passed
    assert "4 value(s) are NaN/inf in the optimized model where the original is finite" in result.headline()


# ----------------------------------------------------------------- latency within a budget

class _FakeClockSession:
    """A session whose every run takes ``cost`` seconds of a fake clock."""

    def __init__(self, clock: list, cost: float) -> None:
        self.clock, self.cost, self.runs = clock, cost, 0

    def run(self, names, feed):
        self.clock[0] += self.cost
        self.runs += 1


def test_latency_run_count_adapts_to_the_budget(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: clock[0])
    slow, fast = _FakeClockSession(clock, 0.25), _FakeClockSession(clock, 0.001)
    assert runtime.latency_within(slow, {}, budget_s=1.0) == (250.0, 4)
    assert runtime.latency_within(slow, {}, budget_s=0.0)[1] == 1  # one run even past the budget
    assert runtime.latency_within(fast, {}, budget_s=1.0)[1] == runtime.MAX_LATENCY_RUNS


def test_compare_times_within_the_budget_unless_runs_are_given():
    data = _data(labels=False)
    adaptive = compare(_affine(1, 0), _affine(1, 0), data, EXACT, latency_runs=None, latency_budget=0.0)
    assert adaptive.latency_runs == [1, 1] and adaptive.latency_candidate_ms > 0
    fixed = compare(_affine(1, 0), _affine(1, 0), data, EXACT, latency_runs=3)
    assert fixed.latency_runs == [3, 3]
    assert compare(_affine(1, 0), _affine(1, 0), data, EXACT).latency_runs is None


# ----------------------------------------------------------------- one session at a time, large models

def test_large_model_path_maps_files_and_spills_outputs(monkeypatch):
    data = _data(labels=False)
    small = compare(_affine(1, 0), _affine(1.001, 0), data, Tolerance(min_cosine=0.9))
    monkeypatch.setattr(runtime, "FILE_SESSION_BYTES", -1)  # every model goes through mapped files
    monkeypatch.setattr(serialize, "EXTERNAL_TENSOR_BYTES", 0)
    monkeypatch.setattr(runtime.OutputStore, "__init__", lambda self, budget=0: _store_init(self))
    made = []
    real = runtime.RuntimeModel.__init__

    def spy(self, model):
        real(self, model)
        made.append(self.folder)

    monkeypatch.setattr(runtime.RuntimeModel, "__init__", spy)
    large = compare(_affine(1, 0), _affine(1.001, 0), data, Tolerance(min_cosine=0.9))
    assert len(made) == 2 and all(folder is not None and not folder.exists() for folder in made)
    a, b = small.outputs[0], large.outputs[0]
    assert (a.max_abs, a.mean_abs, a.cosine, a.snr_db) == (b.max_abs, b.mean_abs, b.cosine, b.snr_db)
    assert large.size_reference == _affine(1, 0).ByteSize()


def _store_init(store) -> None:
    store.budget, store.held, store.items, store.folder = 0, 0, [], None


def test_output_store_spills_past_its_budget_and_cleans_up():
    store = runtime.OutputStore(budget=100)
    small, big = np.arange(10, dtype=np.float32), np.arange(1000, dtype=np.float32)
    store.add([small, big])
    assert store.folder is not None and isinstance(store.items[0][1], Path)
    got = store[0]
    np.testing.assert_array_equal(got[0], small)
    np.testing.assert_array_equal(got[1], big)
    folder = store.folder
    store.close()
    assert not folder.exists()


def test_an_unstable_runtime_is_reported():
    from onnxopt.validate import Reference

    data = _data(labels=False)
    ref = Reference(_affine(1, 0), data)
    assert ref.floors == [0.0]  # an Add and a Mul: ORT computes them alike at every level
    quiet = ref.compare(_affine(1, 0), EXACT)
    ref.floors = [0.5]  # as if the runtime's levels differed by 0.5 on values of a few units
    noisy = ref.compare(_affine(1, 0), EXACT)
    ref.close()
    assert not any("unstable" in n for n in quiet.notes)
    assert any("ONNX Runtime itself is unstable on output 'y': its optimization levels differ by 0.5" in n
               for n in noisy.notes)


def test_a_batch_that_runs_past_the_time_limit_is_stopped_with_one_line(tmp_path, monkeypatch):
    """A Loop whose trip count is huge must not hang validation: the run stops and says why."""
    import time

    from onnxopt.errors import InputError

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Sin", ["v_in"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 4])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body)],
        "endless",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor("trips", TensorProto.INT64, [], [1 << 50]),
         helper.make_tensor("cond", TensorProto.BOOL, [], [True])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    monkeypatch.setattr(runtime, "RUN_TIMEOUT_S", 0.5)
    start = time.perf_counter()
    with pytest.raises(InputError, match="ran for more than 0.5 s and was stopped"):
        onnxopt.optimize(model, "dce", inputs={"x": np.ones((1, 4), np.float32)})
    assert time.perf_counter() - start < 30


def test_labels_keep_one_row_per_sample(tmp_path):
    """Text ids [N, T] stay per sample (perplexity needs them); [N, 1] class labels become [N]."""
    from onnxopt.data import load_dataset

    model = _affine(1, 0)
    x = np.zeros((6, 5), np.float32)
    np.savez(tmp_path / "ids.npz", x=x, labels=np.arange(18).reshape(6, 3))
    np.savez(tmp_path / "cls.npz", x=x, labels=np.arange(6).reshape(6, 1))
    assert load_dataset(tmp_path / "ids.npz", model, batch_size=4).labels.shape == (6, 3)
    assert load_dataset(tmp_path / "cls.npz", model, batch_size=4).labels.tolist() == list(range(6))


def test_kinds_are_reported_per_output_in_json():
    data = _data()
    result = compare(_affine(1, 0), _affine(1.1, 0), data, Tolerance(min_cosine=0.9))
    out = result.to_dict()["outputs"][0]
    assert out["kind"] == "classes" and out["kind_reason"] == "class labels in its range were given"
    plain = compare(_affine(1, 0), _affine(1.1, 0), _data(labels=False), Tolerance(min_cosine=0.9))
    assert plain.outputs[0].kind == "other" and plain.outputs[0].top1_agreement is None
    assert "top-1" not in "\n".join(format_comparison(plain))


def _labelled(bias: list) -> onnx.ModelProto:
    """y = x + b (float scores) and label = ArgMax(y) (int64), two outputs of different kinds."""
    nodes = [helper.make_node("Add", ["x", "b"], ["y"]),
             helper.make_node("ArgMax", ["y"], ["label"], axis=1, keepdims=0)]
    graph = helper.make_graph(nodes, "labelled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, ["n"]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
                              [numpy_helper.from_array(np.array(bias, np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_integer_labels_are_judged_by_the_share_that_changed_not_by_cosine():
    x = np.zeros((200, 5), np.float32)
    x[:, 0] = 5
    x[0] = [0, 5, 0, 0, 0]  # label 1
    x[1] = [1, 0, 0, 0, 0.9]  # label 0; 4 once b[4] > 0.1
    data = Dataset([{"x": x}], source="t", samples=200)
    tol = Tolerance(min_cosine=0.99, max_top1_drop=1.0)
    one = compare(_labelled([0] * 5), _labelled([0, 0, 0, 0, 0.2]), data, tol)
    label = next(o for o in one.outputs if o.name == "label")
    assert label.mismatches == 1 and label.cosine < 0.5  # ids 0/1/4: a cosine that means nothing
    assert label.passed and one.passed, label.failures  # 0.5% of labels changed, within 1 point
    x[2:40, 4] = 4.95  # 19% of the labels flip to 4 under the same bias
    many = compare(_labelled([0] * 5), _labelled([0, 0, 0, 0, 0.2]), data, tol)
    label = next(o for o in many.outputs if o.name == "label")
    assert not many.passed and label.failures == ["39 of 200 values differ in non-float output"]
