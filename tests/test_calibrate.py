"""Calibration plumbing: re-iterable sets, streaming intermediate tensors, Gram statistics, im2col."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import onnxopt
from onnxopt.calibrate import CalibrationSet, GramStats, conv_rows, stream_tensors

ROOT = Path(__file__).resolve().parent.parent


def test_stream_tensors_matches_a_full_run_and_keeps_nothing():
    model = onnxopt.load(ROOT / "models" / "digits_cnn.onnx")
    data = CalibrationSet(ROOT / "models" / "digits_calib.npz", model, samples=100, batch_size=25)
    names = [n.output[0] for n in model.graph.node]
    seen: dict[str, float] = {}
    batches = stream_tensors(model, names, data, lambda v: seen.update(
        {k: max(seen.get(k, -np.inf), float(a.max())) for k, a in v.items()}), chunk=5)
    assert batches == 4  # 100 samples in batches of 25, once per chunk of tensors
    x = np.load(ROOT / "models" / "digits_calib.npz")["input"][:100]
    logits = ort.InferenceSession(str(ROOT / "models" / "digits_cnn.onnx")).run(None, {"input": x})[0]
    assert seen["logits"] == pytest.approx(float(logits.max()), rel=1e-6)
    assert set(seen) == set(names)


def test_one_shot_iterators_are_kept_for_re_reading():
    model = onnxopt.load(ROOT / "models" / "digits_mlp.onnx")
    gen = ({"input": np.full((4, 1, 8, 8), i, np.float32)} for i in range(10))
    data = CalibrationSet(gen, model, samples=12)
    first = [f["input"][0, 0, 0, 0] for f in data]
    assert first == [f["input"][0, 0, 0, 0] for f in data] == [0, 1, 2]


def test_synthetic_set_warns(caplog):
    model = onnxopt.load(ROOT / "models" / "digits_mlp.onnx")
    data = CalibrationSet(None, model, samples=64)
    assert data.synthetic and "no calibration data given" in caplog.text
    assert len(list(data)) == 2


def test_gram_stats_stream_equals_batch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 40, 6))
    stats = GramStats(6)
    for part in np.split(x, 3):
        stats.update(part)
    flat = x.reshape(-1, 6)
    assert np.allclose(stats.gram, flat.T @ flat) and stats.rows == 120
    assert np.allclose(stats.mean, flat.mean(0)) and np.allclose(stats.column_norms, np.linalg.norm(flat, axis=0))


@pytest.mark.parametrize("group", [1, 2])
def test_conv_rows_reproduce_ort_conv(group):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 9, 7)).astype(np.float32)
    w = rng.standard_normal((6, 4 // group, 3, 2)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 0, 2, 1], strides=[2, 1], dilations=[1, 2], group=group)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, None)],
                              [helper.make_tensor_value_info("y", 1, None)], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    per = 6 // group
    for g in range(group):
        rows = conv_rows(x, (3, 2), (1, 0, 2, 1), (2, 1), (1, 2), g, group)
        got = rows @ w[g * per:(g + 1) * per].reshape(per, -1).T
        want = y[:, g * per:(g + 1) * per].transpose(0, 2, 3, 1).reshape(-1, per)
        assert np.allclose(got, want, atol=1e-5)
