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


# ---------------------------------------------------------------- streaming reads (files read batch by batch)

def _two_inputs(width: int = 6, batch="n"):
    """Inputs x[n,width] float32 and ids[n,3] int64 (iter_feeds reads the inputs only)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "two",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, width]),
                               helper.make_tensor_value_info("ids", TensorProto.INT64, [batch, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, width])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _arrays(n=101, width=6):
    rng = np.random.default_rng(3)
    return {"x": rng.standard_normal((n, width)).astype(np.float32),
            "ids": rng.integers(0, 1000, (n, 3)).astype(np.int64), "labels": rng.integers(0, 10, n)}


def _write(kind, folder, arrays):
    if kind == "savez":
        np.savez(folder / "d.npz", **arrays)
    elif kind == "compressed":
        np.savez_compressed(folder / "d.npz", **arrays)
    elif kind == "fortran":
        np.savez(folder / "d.npz", **{k: np.asfortranarray(v) for k, v in arrays.items()})
    elif kind in ("npy", "npy_fortran"):
        for k, v in arrays.items():
            if k != "labels":
                np.save(folder / f"{k}.npy", np.asfortranarray(v) if kind == "npy_fortran" else v)
        return folder
    return folder / "d.npz"


@pytest.mark.parametrize("kind", ["savez", "compressed", "fortran", "npy", "npy_fortran"])
@pytest.mark.parametrize("batch_size", [1, 7, 32, 500])
def test_streamed_reads_match_the_eager_read(tmp_path, kind, batch_size):
    arrays = _arrays()
    path = _write(kind, tmp_path, arrays)
    eager = {k: v for k, v in arrays.items() if k != "labels" or not kind.startswith("npy")}
    want = load_dataset(dict(eager), _two_inputs(), batch_size=batch_size)
    got = load_dataset(path, _two_inputs(), batch_size=batch_size)
    assert len(got.feeds) == len(want.feeds) and got.samples == want.samples == 101
    for g, w in zip(got.feeds, want.feeds):
        assert set(g) == set(w)
        for k in w:
            assert type(g[k]) is np.ndarray and g[k].dtype == w[k].dtype and np.array_equal(g[k], w[k])
    assert np.array_equal(got.labels, want.labels) if want.labels is not None else got.labels is None
    [group] = read_arrays(path)  # the eager reader gives plain arrays, as np.load does
    for k, v in group.items():
        assert type(v) is np.ndarray and np.array_equal(v, eager[k])


def test_disk_arrays_read_rows_in_any_order(tmp_path):
    from onnxopt.data import DiskArray, iter_arrays

    arrays = _arrays(n=50)
    for kind in ("savez", "compressed"):
        [group] = iter_arrays(_write(kind, tmp_path, arrays), lazy=True)
        x = group["x"]
        assert isinstance(x, DiskArray) and x.shape == (50, 6) and x.dtype == np.float32 and len(x) == 50
        for start, stop in [(40, 50), (0, 3), (10, 30), (45, 99), (7, 7)]:
            assert np.array_equal(x[start:stop], arrays["x"][start:stop])
        assert np.array_equal(np.asarray(x), arrays["x"]) and np.array_equal(x[5], arrays["x"][5])
        for v in group.values():
            v.close()
        (tmp_path / "d.npz").unlink()


def test_limit_stops_reading_and_single_samples_in_files(tmp_path):
    arrays = _arrays()
    np.savez_compressed(tmp_path / "d.npz", **arrays)
    ds = load_dataset(tmp_path / "d.npz", _two_inputs(), batch_size=10, limit=25)
    assert ds.samples == 30 and np.array_equal(np.concatenate([f["x"] for f in ds.feeds]), arrays["x"][:30])
    np.savez(tmp_path / "one.npz", x=arrays["x"][0], ids=arrays["ids"][0])
    ds = load_dataset(tmp_path / "one.npz", _two_inputs())
    assert ds.feeds[0]["x"].shape == (1, 6) and np.array_equal(ds.feeds[0]["ids"][0], arrays["ids"][0])


def test_streamed_checks_name_the_problem_before_reading(tmp_path):
    arrays = _arrays()
    np.savez(tmp_path / "d.npz", x=arrays["x"].astype(np.float64), ids=arrays["ids"])
    with pytest.raises(InputError, match="input 'x' must be float32, data has float64"):
        load_dataset(tmp_path / "d.npz", _two_inputs())
    np.savez(tmp_path / "d.npz", x=arrays["x"], ids=arrays["ids"], extra=arrays["ids"])
    with pytest.raises(InputError, match="has array 'extra' but the model's inputs are: x, ids"):
        load_dataset(tmp_path / "d.npz", _two_inputs())
    np.savez(tmp_path / "d.npz", x=arrays["x"][:, :5], ids=arrays["ids"])
    with pytest.raises(InputError, match=r"dimension 1 differs"):
        load_dataset(tmp_path / "d.npz", _two_inputs())
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="folder holds no .npz or .npy files"):
        load_dataset(tmp_path / "empty", _two_inputs())


@pytest.mark.parametrize("kind", ["savez", "compressed"])
def test_truncated_npz_gets_a_clear_error(tmp_path, kind):
    path = _write(kind, tmp_path, _arrays(n=2000))
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 100):
        path.write_bytes(data[:cut])
        with pytest.raises(InputError, match=r"d\.npz: cannot read \.npz file"):
            load_dataset(path, _two_inputs())


def test_short_member_and_truncated_npy_and_corrupt_data(tmp_path):
    import zipfile

    x = np.arange(4000 * 6, dtype=np.float32).reshape(4000, 6)
    for mode in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):  # an intact archive whose x.npy lacks 1000 rows
        with zipfile.ZipFile(tmp_path / "short.npz", "w", mode) as z:
            with z.open("x.npy", "w") as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (4000, 6)})
                f.write(x[:3000].tobytes())
            with z.open("ids.npy", "w") as f:
                np.lib.format.write_array(f, np.zeros((4000, 3), np.int64))
        with pytest.raises(InputError, match=r"short\.npz: cannot read \.npz file: member 'x.npy' holds 72000 bytes "
                                             r"of data, its header says 96000 \(file corrupt\)"):
            load_dataset(tmp_path / "short.npz", _two_inputs())
    np.savez(tmp_path / "d.npz", x=x, ids=np.zeros((4000, 3), np.int64))
    data = bytearray((tmp_path / "d.npz").read_bytes())
    with zipfile.ZipFile(tmp_path / "d.npz") as z:
        info = z.getinfo("x.npy")
    data[data.find(b"\x93NUMPY", info.header_offset) + 5000] ^= 0xFF  # one byte of x changed
    (tmp_path / "bad.npz").write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"bad\.npz: cannot read \.npz file: member 'x.npy' is corrupt \(its CRC-32"):
        load_dataset(tmp_path / "bad.npz", _two_inputs(), batch_size=1000)  # found once every row is read
    np.savez_compressed(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((4000, 6)).astype(np.float32),
                        ids=np.zeros((4000, 3), np.int64))
    data = bytearray((tmp_path / "c.npz").read_bytes())
    with zipfile.ZipFile(tmp_path / "c.npz") as z:
        info = z.getinfo("x.npy")
    data[info.header_offset + 20000] ^= 0xFF  # inside the compressed stream
    (tmp_path / "c.npz").write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"c\.npz: cannot read \.npz file: member 'x.npy' cannot be read \(BadZipFile"):
        load_dataset(tmp_path / "c.npz", _two_inputs(), batch_size=1000)
    np.save(tmp_path / "x.npy", x)
    raw = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "x.npy").write_bytes(raw[:len(raw) - 100])
    with pytest.raises(InputError, match=r"x\.npy: cannot read \.npy file: data is truncated"):
        read_arrays(tmp_path / "x.npy")


def test_object_arrays_fall_back_to_np_load_and_its_error(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.array([{"a": 1}], dtype=object), ids=np.zeros((1, 3), np.int64))
    with pytest.raises(InputError, match="cannot read .npz file: Object arrays cannot be loaded"):
        load_dataset(tmp_path / "d.npz", _two_inputs())


def _big_npz(path, rows, width, compressed=False):
    """A .npz of one float32 array [rows, width] written piece by piece (never whole in memory)."""
    import zipfile

    mode = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
              "shape": (rows, width)}
    piece = np.zeros((64, width), np.float32)
    piece[:, 0] = np.arange(64)  # with the piece's first row added: column 0 holds the row's index
    with zipfile.ZipFile(path, "w", mode, compresslevel=1) as z, z.open("x.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_2_0(f, header)
        for start in range(0, rows, 64):
            f.write((piece[:min(64, rows - start)] + start).tobytes())
    return rows * width * 4


@pytest.mark.parametrize("compressed, rows", [(False, 3200), (True, 640)])
def test_memory_does_not_grow_with_the_file(tmp_path, compressed, rows):
    """Peak traced memory while iterating a 200 MB (compressed: 40 MB) file stays near one batch."""
    import tracemalloc

    from onnxopt.data import iter_feeds

    width = 16384  # 64 KiB a row
    size = _big_npz(tmp_path / "big.npz", rows, width, compressed)
    model = _two_inputs(width=width)
    model.graph.input.pop()  # x only
    tracemalloc.start()
    try:
        seen, last = 0, None
        for feed, _, n in iter_feeds(tmp_path / "big.npz", model, batch_size=32):
            last = feed["x"]
            assert last[0, 0] == seen and last[-1, 0] == seen + n - 1
            seen += n
            del feed
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == rows and last.shape == (rows % 32 or 32, width)
    batch = 32 * width * 4  # 2 MiB
    assert peak < 4 * batch + (2 << 20), f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB file"
