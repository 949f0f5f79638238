"""Calibration samples held out of fitting (onnxopt/holdout.py): the parts, and the qdq guard reading them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

import onnxopt
from onnxopt import holdout
from onnxopt.calibrate import CalibrationSet, shared

ROOT = Path(__file__).resolve().parent.parent


def _values(part) -> list[float]:
    return [float(v) for feed in part for v in feed["input"][:, 0, 0, 0]]


def _numbered(n: int, batch: int) -> list[dict]:
    """n samples, each image filled with its own index, in feeds of ``batch``."""
    x = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 8, 8), np.float32)
    return [{"input": x[i:i + batch]} for i in range(0, n, batch)]


def test_the_parts_cover_the_set_once_and_the_same_way_every_read():
    model = onnxopt.load(ROOT / "models" / "digits_mlp.onnx")
    data = CalibrationSet(_numbered(90, 32), model, samples=90)
    fit = holdout.split(data, rows=True)
    held = fit.held_out
    assert len(held.held_ids) == 30  # one in three
    fit_values, held_values = _values(fit), _values(held)
    assert sorted(fit_values + held_values) == list(range(90))
    assert not set(fit_values) & set(held_values)
    assert held_values == _values(held) and fit_values == _values(fit)  # re-read: the same samples
    # spread over the set, not its tail: the held-out samples' indices step by three
    assert np.diff(held_values).max() == 3 and held_values[0] < 3
    assert fit.part == "fit" and held.part == "held-out" and data.part == "all"


def test_large_sets_hold_out_at_most_what_the_guard_reads_and_small_ones_nothing():
    model = onnxopt.load(ROOT / "models" / "digits_mlp.onnx")
    big = holdout.split(CalibrationSet(_numbered(600, 50), model, samples=600), rows=True)
    assert len(big.held_out.held_ids) == holdout.MAX_HELD and len(_values(big)) == 600 - holdout.MAX_HELD
    assert holdout.split(CalibrationSet(_numbered(31, 8), model, samples=31), rows=True) is None
    assert holdout.split(CalibrationSet(None, model), rows=True) is None  # synthetic data: nothing to hold out
    assert holdout.split(big, rows=True) is None  # already split


def test_a_fixed_batch_holds_out_whole_feeds():
    model = onnxopt.load(ROOT / "models" / "digits_mlp.onnx")
    feeds = _numbered(40 * 4, 4)  # 40 feeds of a fixed batch of 4
    fit = holdout.split(CalibrationSet(feeds, model, samples=1000), rows=False)
    assert len(fit.held_out.held_ids) == 16  # at least MIN_HELD feeds
    assert all(len(f["input"]) == 4 for part in (fit, fit.held_out) for f in part)
    assert len(list(fit)) + len(list(fit.held_out)) == 40


def test_statistics_fitted_on_a_part_are_not_shared_with_the_whole_set():
    model = onnxopt.load(ROOT / "models" / "digits_mlp.onnx")
    data = CalibrationSet(_numbered(64, 8), model, samples=64)

    class Ctx:
        def __init__(self, calibration):
            self.calibration, self.cache = calibration, {}

    ctx = Ctx(data)
    shared(ctx, model, ("ranges",))["x"] = 1
    ctx.calibration = holdout.split(data, rows=True)
    assert "x" not in shared(ctx, model, ("ranges",))


def test_the_qdq_guard_judges_on_samples_the_ranges_never_saw():
    """A planted outlier: the held-out samples hold a value 50x the fitted range, so the model the
    ranges fit clips it; the guard, reading the held-out samples, sees the loss and takes the layer
    back, where a guard on the fitted samples would pass it."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor("w", TensorProto.FLOAT, [16, 16], w.ravel())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((96, 16)).astype(np.float32)
    ids = sorted(holdout.split(CalibrationSet([{"x": x}], model, samples=96), rows=True).held_out.held_ids)
    x[ids, 3] = 50.0  # only the held-out samples carry the large channel
    result = onnxopt.optimize(model, "qdq(mode=static,method=minmax)", calibration=[{"x": x}], validate=False)
    stats = result.records[0].stats
    assert stats["guard_held_out_samples"] == 32
    assert stats["fallback_nodes"] == 1


def test_each_part_counts_its_own_samples_for_progress():
    model = onnxopt.load(ROOT / "models" / "digits_mlp.onnx")
    fit = holdout.split(CalibrationSet(ROOT / "models" / "digits_calib.npz", model, samples=360), rows=True)
    assert fit.expected_samples() == len(_values(fit)) == 264
    assert fit.held_out.expected_samples() == len(_values(fit.held_out)) == 96
