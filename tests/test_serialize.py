"""Encoding large models piece by piece: the same bytes as SerializeToString, and ORT's mapped copy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import io, serialize
from onnxopt.validate import make_session

from models_for_tests import mlp


def _with_extras() -> onnx.ModelProto:
    """An MLP plus fields on both sides of the graph and of the initializers, and a typed-data tensor."""
    model = mlp()
    model.doc_string = "doc"
    helper.set_model_props(model, {"k": "v"})
    model.graph.doc_string = "graph doc"
    model.graph.initializer[0].doc_string = "weight doc"
    typed = helper.make_tensor("typed", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])
    model.graph.initializer.append(typed)
    return model


@pytest.mark.parametrize("build", [mlp, _with_extras])
def test_streamed_bytes_and_size_equal_serialize_to_string(tmp_path, monkeypatch, build):
    model = build()
    monkeypatch.setattr(serialize, "STREAM_BYTES", -1)
    path = tmp_path / "m.onnx"
    serialize.write_model(model, path)
    assert path.read_bytes() == model.SerializeToString()
    assert serialize.serialized_size(model) == model.ByteSize()
    io.save(model, tmp_path / "saved.onnx")  # the save path streams too
    assert (tmp_path / "saved.onnx").read_bytes() == model.SerializeToString()


def test_mapped_copy_runs_like_the_model(tmp_path, monkeypatch):
    model = mlp()
    monkeypatch.setattr(serialize, "EXTERNAL_TENSOR_BYTES", 0)
    path = serialize.write_mapped(model, tmp_path)
    light = onnx.load_model(str(path), load_external_data=False)
    external = [t for t in light.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external and all(int(dict((e.key, e.value) for e in t.external_data)["offset"]) % 4096 == 0
                            for t in external)
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((4, *[d.dim_value or 1 for d in
                                                       model.graph.input[0].type.tensor_type.shape.dim][1:]))
    feed = {model.graph.input[0].name: x.astype(np.float32)}
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    want = make_session(model).run(None, feed)
    np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("build", [mlp, _with_extras])
def test_mapped_copy_reads_back_to_the_same_model(tmp_path, monkeypatch, build):
    model = build()
    monkeypatch.setattr(serialize, "EXTERNAL_TENSOR_BYTES", 0)
    back = serialize.read_mapped(serialize.write_mapped(model, tmp_path))
    assert back.SerializeToString() == model.SerializeToString()
