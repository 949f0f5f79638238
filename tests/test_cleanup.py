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


# ----------------------------------------------------------------- older IR versions and opsets

def _typed_only(name: str) -> onnx.ValueInfoProto:
    entry = onnx.ValueInfoProto(name=name)
    entry.type.tensor_type.elem_type = TensorProto.FLOAT
    return entry


def _old_model(ir_version: int, opset: int, nodes, inputs, output, inits) -> onnx.ModelProto:
    """An old exporter's model: every value listed in value_info by type only; before IR 4
    every initializer is also a graph input."""
    if ir_version < 4:
        inputs = [*inputs, *(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits)]
    graph = helper.make_graph(nodes, "old", inputs, [output], initializer=inits)
    graph.value_info.extend(_typed_only(o) for n in nodes for o in n.output)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def _conv_bn_upsample(ir_version: int) -> onnx.ModelProto:
    """Opset 7: BatchNormalization with the spatial attribute, Upsample with a scales attribute."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("w", rng.standard_normal((4, 3, 3, 3))), ("b", rng.standard_normal(4)), ("s", rng.uniform(0.5, 2, 4)),
        ("o", rng.standard_normal(4)), ("m", rng.standard_normal(4)), ("v", rng.uniform(0.5, 2, 4)))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("BatchNormalization", ["c", "s", "o", "m", "v"], ["bn"], spatial=1, epsilon=1e-5),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("Upsample", ["r"], ["y"], scales=[1.0, 1.0, 2.0, 2.0], mode="nearest")]
    return _old_model(ir_version, 7, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                      helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16]), inits)


def _upsample9() -> onnx.ModelProto:
    """Opset 9: Upsample takes its scales as an input, here computed from constants."""
    inits = [numpy_helper.from_array(np.array([1.0, 1.0, 1.0, 1.0], np.float32), "one"),
             numpy_helper.from_array(np.array([0.0, 0.0, 1.0, 2.0], np.float32), "extra"),
             numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2), "a")]
    nodes = [helper.make_node("Add", ["one", "extra"], ["scales"]), helper.make_node("Add", ["x", "a"], ["t"]),
             helper.make_node("Upsample", ["t", "scales"], ["y"], mode="nearest")]
    return _old_model(4, 9, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2, 2])],
                      helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 6]), inits)


def _reshape(ir_version: int, opset: int) -> onnx.ModelProto:
    """Reshape with a shape attribute (opsets 1-4) or a shape input (5+), of a constant and of the input."""
    a = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(2, 6), "a")
    if opset < 5:
        inits = [a]
        reshapes = [helper.make_node("Reshape", ["a"], ["ar"], shape=[3, 4]),
                    helper.make_node("Reshape", ["x"], ["xr"], shape=[3, 4])]
    else:
        inits = [a, numpy_helper.from_array(np.array([3, 4], np.int64), "shape")]
        reshapes = [helper.make_node("Reshape", ["a", "shape"], ["ar"]),
                    helper.make_node("Reshape", ["x", "shape"], ["xr"])]
    nodes = [*reshapes, helper.make_node("Concat", ["xr", "ar"], ["y"], axis=0)]
    return _old_model(ir_version, opset, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [12])],
                      helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 4]), inits)


@pytest.mark.parametrize("build, folded_ops", [
    (lambda: _conv_bn_upsample(4), ["Conv", "Relu", "Upsample"]),
    (lambda: _conv_bn_upsample(3), ["Conv", "Relu", "Upsample"]),
    (_upsample9, ["Add", "Upsample"]),
    (lambda: _reshape(3, 4), ["Constant", "Reshape", "Concat"]),
    (lambda: _reshape(4, 4), ["Reshape", "Concat"]),
    (lambda: _reshape(4, 5), ["Reshape", "Concat"]),
], ids=["ir4-opset7-bn-upsample", "ir3-opset7-bn-upsample", "ir4-opset9-upsample", "ir3-opset4-reshape",
        "ir4-opset4-reshape", "ir4-opset5-reshape"])
def test_older_ir_versions_and_opsets_round_trip(build, folded_ops):
    """cleanup keeps the IR version, the opset and the interface, folds what it can, and the
    result passes the full checker and computes the same outputs in ONNX Runtime."""
    model = build()
    x = np.random.default_rng(2).standard_normal([d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim])
    result = onnxopt.optimize(model, "cleanup", inputs={"x": x.astype(np.float32)})
    assert result.passed, result.summary()
    out = result.model
    assert [n.op_type for n in out.graph.node] == folded_ops
    assert out.ir_version == model.ir_version and list(out.opset_import) == list(model.opset_import)
    assert list(out.graph.output) == list(model.graph.output)
    assert [i.name for i in out.graph.input][:1] == ["x"]
    if model.ir_version < 4:
        assert {t.name for t in out.graph.initializer} <= {i.name for i in out.graph.input}
    onnx.checker.check_model(out, full_check=True)
    assert result.validation.outputs[0].max_abs < 1e-4
