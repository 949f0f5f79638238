"""Validation metrics against numpy references, and tolerance judgement."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.data import Dataset
from onnxopt.pipeline import Tolerance
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
    snr = compare(_affine(1, 0), _affine(-1, 0), data, Tolerance(min_snr_db=10, max_top1_drop=5))
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
