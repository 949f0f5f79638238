"""Input data: readers, checks against the model, batching, synthetic inputs."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.data import input_specs, load_dataset, read_arrays, synthetic_dataset
from onnxopt.errors import InputError
from models_for_tests import mlp


def test_npz_batches_and_labels(tmp_path):
    x = np.arange(70 * 4, dtype=np.float32).reshape(70, 4)
    np.savez(tmp_path / "d.npz", x=x, labels=np.arange(70))
    ds = load_dataset(tmp_path / "d.npz", mlp(), batch_size=32)
    assert [f["x"].shape[0] for f in ds.feeds] == [32, 32, 6]
    assert ds.samples == 70 and np.array_equal(ds.labels, np.arange(70))
    assert np.array_equal(np.concatenate([f["x"] for f in ds.feeds]), x)


def test_single_sample_gets_a_batch_axis_and_folder_of_npy(tmp_path):
    np.save(tmp_path / "x.npy", np.ones(4, np.float32))
    ds = load_dataset(tmp_path, mlp())
    assert ds.feeds[0]["x"].shape == (1, 4)


def test_fixed_batch_one_models_get_one_sample_per_feed(tmp_path):
    model = mlp(batch=1)
    ds = load_dataset({"x": np.zeros((5, 4), np.float32)}, model)
    assert len(ds.feeds) == 5 and all(f["x"].shape == (1, 4) for f in ds.feeds)


def test_limit_and_iterables():
    batches = ({"x": np.full((10, 4), i, np.float32)} for i in range(100))
    ds = load_dataset(batches, mlp(), limit=25)
    assert ds.samples == 30 and len(ds.feeds) == 3  # stops after the batch that reaches the limit


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((2, 4), np.int64)}, "input 'x' must be float32, given data has int64"),
    ({"x": np.zeros((2, 2, 4), np.float32)}, "input 'x' must have 2 dimensions [batch, 4]"),
    ({}, "lacks input 'x'"),
])
def test_bad_data_is_named(arrays, message):
    with pytest.raises(InputError) as info:
        load_dataset(arrays, mlp(), what="given data")
    assert message in str(info.value)


def test_synthetic_is_seeded_and_binds_dims():
    a = synthetic_dataset(mlp(), dims={"batch": 3}, seed=1)
    b = synthetic_dataset(mlp(), dims={"batch": 3}, seed=1)
    assert a.synthetic and a.feeds[0]["x"].shape == (3, 4)
    assert np.array_equal(a.feeds[0]["x"], b.feeds[0]["x"])
    c = synthetic_dataset(mlp())
    assert c.feeds[0]["x"].shape == (1, 4) and "batch" in c.notes[0]


def test_input_specs_skip_initializers_listed_as_inputs():
    model = mlp()
    model.graph.input.append(model.graph.initializer[0].name and
                             __import__("onnx").helper.make_tensor_value_info("W1", 1, [4, 8]))
    assert [s.name for s in input_specs(model)] == ["x"]


def test_read_arrays_errors(tmp_path):
    with pytest.raises(InputError, match="no such data file"):
        read_arrays(tmp_path / "none.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot read .npz file"):
        read_arrays(tmp_path / "bad.npz")
