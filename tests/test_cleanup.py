"""End to end: the ``cleanup`` preset (fold, fold_bn, noop, dedup, dce to a fixed point)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.pipeline import Group, Pipeline

ROOT = Path(__file__).resolve().parent.parent


def test_cleanup_is_the_default_and_a_fixed_point_group():
    step = Pipeline.parse("cleanup").steps[0]
    assert isinstance(step, Group) and step.fixed_point
    assert [p.name for p in step.steps] == ["fold", "shape_fold", "fold_bn", "noop", "merge", "dedup", "dce"]
    result = onnxopt.optimize(ROOT / "models" / "digits_cnn.onnx", inputs=ROOT / "models" / "digits_test.npz")
    assert result.pipeline == "cleanup"
    assert result.to_dict()["before"]["nodes"] == 13 and result.to_dict()["after"]["nodes"] == 10
    out = result.validation.outputs[0]
    assert result.passed and out.accuracy_candidate == out.accuracy_reference == pytest.approx(358 / 360)
    assert out.max_abs < 1e-4


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name + "_value"))


def _paddle_style_branch(rng: np.random.Generator, tag: str) -> onnx.GraphProto:
    """Conv + BatchNorm with every weight in a Constant node, Dropout and Identity around, a
    Reshape computed from Shape, as older exporters write them; the input comes from outside."""
    c = 4
    nodes = [
        _const(f"{tag}_w", rng.standard_normal((c, 3, 3, 3)).astype(np.float32)),
        _const(f"{tag}_scale", rng.uniform(0.5, 1.5, c).astype(np.float32)),
        _const(f"{tag}_bias", rng.standard_normal(c).astype(np.float32)),
        _const(f"{tag}_mean", rng.standard_normal(c).astype(np.float32)),
        _const(f"{tag}_var", rng.uniform(0.5, 1.5, c).astype(np.float32)),
        helper.make_node("Identity", ["x"], [f"{tag}_xi"]),
        helper.make_node("Conv", [f"{tag}_xi", f"{tag}_w"], [f"{tag}_c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", [f"{tag}_c", f"{tag}_scale", f"{tag}_bias", f"{tag}_mean", f"{tag}_var"],
                         [f"{tag}_bn"]),
        helper.make_node("Dropout", [f"{tag}_bn"], [f"{tag}_d"]),
        helper.make_node("Shape", [f"{tag}_d"], [f"{tag}_shape"]),
        helper.make_node("Reshape", [f"{tag}_d", f"{tag}_shape"], [f"{tag}_out"]),
    ]
    return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(f"{tag}_out", TensorProto.FLOAT, None)])


def _if_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    node = helper.make_node("If", ["cond"], ["y"], then_branch=_paddle_style_branch(rng, "then"),
                            else_branch=_paddle_style_branch(rng, "else"))
    graph = helper.make_graph(
        [node], "paddle_like",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("cond", [True, False])
def test_layers_inside_if_branches_with_constant_node_weights(cond):
    model = _if_model()
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    result = onnxopt.optimize(model, "cleanup", inputs={"cond": np.array(cond), "x": x})
    assert result.passed, result.summary()
    ops = [n.op_type for b in result.model.graph.node[0].attribute for n in b.g.node]
    assert ops == ["Conv", "Conv"]  # BN folded, Identity/Dropout/Shape/Reshape gone, in both branches
    assert result.validation.outputs[0].max_abs < 1e-4


def test_external_data_model_survives(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    onnx.save_model(onnx.load(ROOT / "models" / "digits_cnn.onnx"), str(src / "cnn.onnx"),
                    save_as_external_data=True, location="cnn.weights", size_threshold=0)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    result = onnxopt.optimize(src / "cnn.onnx", inputs=ROOT / "models" / "digits_test.npz")
    assert result.passed
    result.save(tmp_path / "out.onnx", external_data=True)
    assert (tmp_path / "out.onnx.data").is_file()
    again = onnxopt.compare(result.model, onnxopt.load(tmp_path / "out.onnx"), result.validation and
                            onnxopt.load_dataset(ROOT / "models" / "digits_test.npz", result.model),
                            onnxopt.Tolerance(atol=0))
    assert again.identical
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # the input is never modified
