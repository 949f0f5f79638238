"""Models whose weights stay in their external data file: references through load, passes,
export, validation, save; and (marker `big`) a model past protobuf's 2 GiB limit end to end.

The fast tests force the large-model path on small models by lowering the thresholds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import api, graph as G, io, runtime, serialize
from onnxopt.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _model(n: int = 64, seed: int = 0) -> onnx.ModelProto:
    """x[batch,n] -> MatMul(w1) -> Add(b1) -> Identity -> MatMul(w2) -> Dropout -> y (and an unread scalar)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
             helper.make_node("Identity", ["hb"], ["hi"], name="identity"),
             helper.make_node("MatMul", ["hi", "w2"], ["z"], name="mm2"),
             helper.make_node("Dropout", ["z"], ["y"], name="dropout")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def lazy(tmp_path, monkeypatch):
    """A model saved with external data, and thresholds that make load keep w1/w2 in their file."""
    monkeypatch.setattr(io, "LAZY_MODEL_BYTES", 0)
    monkeypatch.setattr(io, "LAZY_TENSOR_BYTES", 1024)
    model = _model()
    path = tmp_path / "in" / "m.onnx"
    path.parent.mkdir()
    onnx.save_model(model, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    return path


def _inline(path: Path) -> onnx.ModelProto:
    """The model with its data read in, w1/w2 as load_external_data leaves them but for the
    data_location field it sets to DEFAULT (written inline, a reference has no such field)."""
    full = onnx.load(str(path))
    for tensor in full.graph.initializer:
        if tensor.name in ("w1", "w2"):
            tensor.ClearField("data_location")
    return full


def _run(path_or_model, x: np.ndarray) -> np.ndarray:
    sess = runtime.session_for(path_or_model) if isinstance(path_or_model, onnx.ModelProto) else \
        runtime.session_for(io.load(path_or_model))
    return sess.run(None, {"x": x})[0]


def _x(n: int = 64) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((2, n)).astype(np.float32)


def test_load_keeps_large_tensors_as_references_and_reads_small_ones(lazy):
    model = io.load(lazy)
    refs = {t.name: io.external_ref(t) for t in model.graph.initializer}
    assert refs["w1"] is not None and refs["w2"] is not None and refs["b1"] is None and refs["one"] is None
    assert Path(refs["w1"].path) == (lazy.parent / "m.onnx.data").resolve()
    assert not model.graph.initializer[0].HasField("raw_data")
    full = _inline(lazy)
    np.testing.assert_array_equal(np.frombuffer(refs["w2"].read(), np.float32).reshape(64, 64),
                                  numpy_helper.to_array(full.graph.initializer[2]))
    # sizes as if the data were inline, without reading it
    assert serialize.serialized_size(model) == full.ByteSize()
    assert io.tensor_bytes(model) == io.tensor_bytes(full)


def test_write_model_inlines_references_byte_for_byte(lazy, tmp_path):
    model = io.load(lazy)
    serialize.write_model(model, tmp_path / "one.onnx")
    assert (tmp_path / "one.onnx").read_bytes() == _inline(lazy).SerializeToString()


def test_import_maps_references_and_export_keeps_them_until_rewritten(lazy):
    model = io.load(lazy)
    graph = G.import_graph(model)
    w1 = next(t for t in G.constants(graph) if t.name == "w1")
    assert isinstance(w1._values, G.MappedValues)
    values = w1.values  # a read-only map of the file
    assert isinstance(values, np.memmap) and not values.flags.writeable
    with pytest.raises(ValueError):
        values[0, 0] = 1.0
    out = G.export_model(graph, model)
    assert io.external_ref(next(t for t in out.graph.initializer if t.name == "w1")) is not None
    w1.values = np.asarray(values) * 2  # rewritten: exported inline
    out = G.export_model(graph, model)
    rewritten = next(t for t in out.graph.initializer if t.name == "w1")
    assert io.external_ref(rewritten) is None
    np.testing.assert_array_equal(numpy_helper.to_array(rewritten), np.asarray(values) * 2)


def test_sessions_hard_link_the_input_data_and_leave_nothing(lazy, tmp_path):
    model = io.load(lazy)
    before = set(os.listdir(lazy.parent))
    held = runtime.RuntimeModel(model)
    try:
        assert held.on_disk and list(held.links.values()) == [str((lazy.parent / "m.onnx.data").resolve())]
        linked = held.folder / next(iter(held.links))
        assert os.stat(linked).st_ino == os.stat(lazy.parent / "m.onnx.data").st_ino  # no copy
        assert not (held.folder / "model.data").exists() or (held.folder / "model.data").stat().st_size < 4096
        back = held.load()  # references again
        assert io.external_ref(next(t for t in back.graph.initializer if t.name == "w2")) is not None
    finally:
        held.close()
    expected = _model()
    np.testing.assert_allclose(_run(model, _x()), _run(expected, _x()), rtol=1e-6, atol=1e-6)
    assert set(os.listdir(lazy.parent)) == before


def test_sessions_copy_the_data_where_no_link_can_be_made(lazy, monkeypatch):
    model = io.load(lazy)

    def refuse(*args, **kwargs):
        raise OSError("links not supported here")

    monkeypatch.setattr(os, "link", refuse)
    held = runtime.RuntimeModel(model)
    try:
        assert held.links == {} and (held.folder / "model.data").stat().st_size >= 2 * 64 * 64 * 4
        got = held.session(runtime.session_options("disable")).run(None, {"x": _x()})[0]
    finally:
        held.close()
    np.testing.assert_allclose(got, _run(_model(), _x()), rtol=1e-6, atol=1e-6)


def test_calibration_session_takes_a_model_with_references(lazy):
    from onnxopt import calibrate

    sess = calibrate._session(io.load(lazy))
    np.testing.assert_allclose(sess.run(None, {"x": _x()})[0], _run(_model(), _x()), rtol=1e-6, atol=1e-6)


def test_optimize_validates_and_saves_without_loading_the_weights(lazy, capsys, monkeypatch):
    data = lazy.parent / "m.onnx.data"
    stamp = (data.stat().st_mtime_ns, data.read_bytes())
    out = lazy.parent.parent / "out" / "o.onnx"
    out.parent.mkdir()
    code = main(["optimize", str(lazy), "-o", str(out), "--latency-runs", "0"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "PASSED" in text
    assert (out.parent / "o.onnx.data").exists()  # the weights stay external
    np.testing.assert_allclose(_run(out, _x()), _run(_model(), _x()), rtol=1e-5, atol=1e-5)
    written = onnx.load(str(out))
    assert [n.op_type for n in written.graph.node].count("Identity") == 0
    assert (data.stat().st_mtime_ns, data.read_bytes()) == stamp  # the input is never modified
    # the API: the result still holds references after validation
    result = api.optimize(str(lazy))
    assert result.passed and any(io.external_ref(t) for t in result.model.graph.initializer)


def test_fold_rewrites_a_referenced_weight_and_keeps_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "LAZY_MODEL_BYTES", 0)
    monkeypatch.setattr(io, "LAZY_TENSOR_BYTES", 1024)
    model = _model()
    model.graph.node[0].input[1] = "w1t"  # MatMul reads Transpose(w1): fold makes it a new constant
    model.graph.node.insert(0, helper.make_node("Transpose", ["w1"], ["w1t"], name="t", perm=[1, 0]))
    sess = runtime.session_for(model)  # before saving: save_model moves the data out of the proto
    onnx.save_model(model, str(tmp_path / "t.onnx"), save_as_external_data=True, location="t.data",
                    size_threshold=0)
    result = api.optimize(str(tmp_path / "t.onnx"), latency_runs=0)
    assert result.passed and "Transpose" not in [n.op_type for n in result.model.graph.node]
    kept = {t.name: io.external_ref(t) is not None for t in result.model.graph.initializer}
    assert kept["w2"] and sum(kept.values()) == 1  # the folded weight is new data, w2 still a reference
    result.save(tmp_path / "out.onnx")
    np.testing.assert_allclose(_run(tmp_path / "out.onnx", _x()), sess.run(None, {"x": _x()})[0], rtol=1e-5,
                               atol=1e-5)


def test_dedup_keys_a_referenced_weight_from_its_file_as_it_keys_the_same_bytes_in_memory(lazy, monkeypatch):
    from onnxopt.passes.dedup import keys as dedup

    monkeypatch.setattr(dedup, "SAMPLE_ABOVE", 1000)  # the sampled key, on a 16 KiB weight
    graph = G.import_graph(io.load(lazy))
    w1 = next(t for t in G.constants(graph) if t.name == "w1")
    ref = io.external_ref(w1._values.tensor)
    inline = dedup._hash(dedup._raw(np.asarray(w1._values.load())))
    assert dedup._file_hash(ref, chunk=509 * 3) == dedup._file_hash(ref) == inline


def test_dedup_merges_two_references_to_equal_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "LAZY_MODEL_BYTES", 0)
    monkeypatch.setattr(io, "LAZY_TENSOR_BYTES", 1024)
    model = _model()
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(model.graph.initializer[0]),
                                                                "w2"))
    onnx.save_model(model, str(tmp_path / "d.onnx"), save_as_external_data=True, location="d.data",
                    size_threshold=0)
    result = api.optimize(str(tmp_path / "d.onnx"), "dedup,dce", latency_runs=0)
    assert result.passed and result.records[0].stats["constants_merged"] == 1
    assert [t.name for t in result.model.graph.initializer if io.external_ref(t)] == ["w1"]


def test_verify_each_checks_and_validates_a_model_with_references(lazy):
    result = api.optimize(str(lazy), "noop,dce", verify_each=True, latency_runs=0)
    assert result.passed and all(r.verify["passed"] for r in result.records if r.verify)
    assert any(r.verify for r in result.records)


def test_save_refuses_to_overwrite_the_data_it_reads(lazy):
    model = io.load(lazy)
    with pytest.raises(io.InputError, match="external data"):
        io.save(model, lazy.parent / "m.onnx", in_place=False, input_path=None)


def test_save_inlines_references_when_asked_for_one_file(lazy, tmp_path):
    model = io.load(lazy)
    io.save(model, tmp_path / "single.onnx", external_data=False)
    assert not (tmp_path / "single.onnx.data").exists()
    np.testing.assert_allclose(_run(tmp_path / "single.onnx", _x()), _run(_model(), _x()), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------- past 2 GiB (marker `big`)

def _write_big(folder: Path, n: int) -> Path:
    """Two n x n float32 weights as external data, written a block of rows at a time."""
    rng = np.random.default_rng(0)
    model = _model(8)
    del model.graph.initializer[:]
    offset = 0
    with open(folder / "big.onnx.data", "wb") as data:
        for name in ("w1", "w2"):
            for start in range(0, n, 2048):
                rows = min(2048, n - start)
                data.write((rng.standard_normal((rows, n), dtype=np.float32) * np.float32(n ** -0.5)).tobytes())
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[n, n],
                                 data_location=TensorProto.EXTERNAL)
            for key, value in (("location", "big.onnx.data"), ("offset", str(offset)), ("length", str(n * n * 4))):
                tensor.external_data.add(key=key, value=value)
            model.graph.initializer.append(tensor)
            offset += n * n * 4
    model.graph.initializer.extend([numpy_helper.from_array(np.zeros(n, np.float32), "b1"),
                                    numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[1].dim_value = n
    (folder / "big.onnx").write_bytes(model.SerializeToString())
    return folder / "big.onnx"


@pytest.mark.big
def test_a_model_past_2_gib_round_trips_through_optimize_with_validation(tmp_path):
    n = 16400  # 2 x 16400^2 x 4 bytes = 2.15 GB > 2 GiB
    path = _write_big(tmp_path, n)
    assert (tmp_path / "big.onnx.data").stat().st_size > 2**31
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxopt", "optimize", str(path), "-o", str(out)],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASSED" in proc.stdout
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((1, n)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
