"""Input feeds: .npz/.npy readers, checks against the model's inputs, synthetic data, batching.

A *feed* is a dict input name -> array holding one batch. Data files hold
arrays named after the model's inputs, batched (leading sample axis) or a
single sample; an array named ``labels`` that is not a model input is taken as
the class labels for accuracy.
"""

from __future__ import annotations

import logging
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import numpy as np
import onnx

from .errors import InputError

log = logging.getLogger("onnxopt")

LABELS = "labels"


@dataclass
class InputSpec:
    """A graph input as the data must match it."""

    name: str
    dtype: np.dtype
    shape: list[Union[int, str, None]]  # ints fixed, strings symbolic, None unknown


@dataclass
class Dataset:
    """Feeds ready to run, one per batch, with labels aligned to them when given."""

    feeds: list[dict[str, np.ndarray]]
    labels: Optional[np.ndarray] = None
    source: str = "synthetic"
    synthetic: bool = False
    samples: int = 0
    notes: list[str] = field(default_factory=list)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (initializers listed as inputs excluded)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise InputError(f"input '{value.name}' is not a tensor; onnxopt feeds tensors only")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        shape: list[Union[int, str, None]] = []
        if tensor_type.HasField("shape"):
            for dim in tensor_type.shape.dim:
                shape.append(dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None))
        specs.append(InputSpec(value.name, np.dtype(dtype), shape))
    return specs


def read_arrays(path: Union[str, os.PathLike]) -> list[dict[str, np.ndarray]]:
    """Arrays from one .npz, one .npy (single-input models), or a folder of them."""
    return list(iter_arrays(path))


def iter_arrays(path: Union[str, os.PathLike], *, lazy: bool = False) -> Iterator[dict[str, Any]]:
    """Groups of arrays, read one file at a time.

    In a folder, every .npz is one group of arrays; .npy files are grouped
    together, each named after the input it feeds (``input_ids.npy``).

    With ``lazy=True`` the arrays stay on disk as :class:`DiskArray` (shape and
    dtype from the header; rows read on demand), so a file of any size costs
    memory for the rows asked for only. Otherwise each array is read whole.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such data file or folder")
    if path.is_dir():
        npzs, npys = sorted(path.glob("*.npz")), sorted(path.glob("*.npy"))
        if not npzs and not npys:
            raise InputError(f"{path}: folder holds no .npz or .npy files")
        for p in npzs:
            yield _group(_open_npz(p), lazy)
        if npys:
            yield _group({p.stem: _open_npy(p) for p in npys}, lazy)
        return
    if path.suffix == ".npz":
        yield _group(_open_npz(path), lazy)
    elif path.suffix == ".npy":
        yield _group({"": _open_npy(path)}, lazy)
    else:
        raise InputError(f"{path}: expected a .npz or .npy file or a folder of them")


def _group(group: dict[str, Any], lazy: bool) -> dict[str, Any]:
    if lazy:
        return group
    try:
        return {k: _whole(v) for k, v in group.items()}
    finally:
        _close(group.values())


def _whole(array: Any) -> Any:
    return array.read() if isinstance(array, DiskArray) else array


def _close(arrays: Iterable[Any]) -> None:
    for array in arrays:
        if isinstance(array, DiskArray):
            array.close()


class DiskArray:
    """An array in a .npy file or a .npz member, read in rows along its first axis on demand.

    ``shape``, ``dtype`` and ``ndim`` come from the file's header; ``rows(start,
    stop)`` (or ``array[start:stop]``) reads those rows into a fresh array,
    ``read()`` (or ``np.asarray(array)``) the whole array. Data stored
    uncompressed (.npy, np.savez) is read at its offset in the file, with plain
    reads rather than a memory map, so rows already handed out do not stay in
    the process's memory; members of np.savez_compressed files are
    decompressed as a stream, skipping forward, and reopened when rows are
    asked for out of order.
    """

    def __init__(self, path: Path, kind: str, member: str, shape: tuple, dtype: np.dtype) -> None:
        self.path, self.kind, self.member = Path(path), kind, member
        self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d array")
        return self.shape[0]

    def __repr__(self) -> str:
        where = f"{self.path}" + (f" [{self.member}]" if self.member else "")
        return f"DiskArray({where}, shape={self.shape}, dtype={self.dtype})"

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the first axis (clipped as a slice is), read from the file."""
        if not self.shape:
            return self.read()
        start, stop, _ = slice(start, stop).indices(self.shape[0])
        return self._read(max(stop - start, 0), start * self.row_bytes)

    def read(self) -> np.ndarray:
        """The whole array."""
        if not self.shape:
            return self._read(None, 0)
        return self.rows(0, self.shape[0])

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice) and key.step in (None, 1) and self.shape:
            return self.rows(0 if key.start is None else key.start,
                             self.shape[0] if key.stop is None else key.stop)
        return self.read()[key]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.read()
        return array if dtype is None else array.astype(dtype)

    def close(self) -> None:
        """Release open files (reading again reopens them)."""

    def _read(self, count: Optional[int], pos: int) -> np.ndarray:
        out = np.empty(() if count is None else (count,) + self.shape[1:], self.dtype)
        if out.nbytes:
            buf = memoryview(out.reshape(-1).view(np.uint8))
            try:
                self._read_into(buf, pos)
            except InputError:
                raise
            except Exception as exc:
                raise self._error(f"cannot be read ({type(exc).__name__}: {exc})") from None
        return out

    def _read_into(self, buf: memoryview, pos: int) -> None:
        raise NotImplementedError

    def _error(self, problem: str) -> InputError:
        what = f"member '{self.member}'" if self.member else "data"
        return InputError(f"{self.path}: cannot read {self.kind} file: {what} {problem}")


class _StoredArray(DiskArray):
    """Uncompressed data at a fixed offset: .npy files and np.savez members.

    When rows are read in order from the first, the member's CRC-32 (a .npz
    records one) is checked once the last row has been read.
    """

    def __init__(self, path: Path, kind: str, member: str, shape: tuple, dtype: np.dtype, offset: int,
                 crc: Optional[int] = None, header: bytes = b"") -> None:
        super().__init__(path, kind, member, shape, dtype)
        self.offset, self.crc = offset, crc
        self._header_crc = zlib.crc32(header)
        self._crc_pos, self._crc_value = 0, self._header_crc

    def _read_into(self, buf: memoryview, pos: int) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.offset + pos)
            got = 0
            while got < len(buf):
                n = f.readinto(buf[got:])
                if not n:
                    raise self._error(f"is truncated (ends {self.nbytes - pos - got} bytes early)")
                got += n
        if self.crc is None:
            return
        if pos == 0:
            self._crc_pos, self._crc_value = 0, self._header_crc
        if pos != self._crc_pos:
            self._crc_pos = -1  # read out of order: no check this time
            return
        self._crc_value = zlib.crc32(buf, self._crc_value)
        self._crc_pos += len(buf)
        if self._crc_pos == self.nbytes and self._crc_value != self.crc:
            raise self._error("is corrupt (its CRC-32 does not match the archive's)")


class _StreamedArray(DiskArray):
    """A compressed .npz member (np.savez_compressed), decompressed as a stream in row order."""

    SKIP = 1 << 20

    def __init__(self, path: Path, member: str, shape: tuple, dtype: np.dtype, header_len: int) -> None:
        super().__init__(path, ".npz", member, shape, dtype)
        self.header_len = header_len
        self._zip: Optional[zipfile.ZipFile] = None
        self._stream: Any = None
        self._pos = 0

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        if self._zip is not None:
            self._zip.close()
        self._zip = self._stream = None

    def __del__(self) -> None:
        self.close()

    def _read_into(self, buf: memoryview, pos: int) -> None:
        if self._stream is None or pos < self._pos:
            self.close()
            self._zip = zipfile.ZipFile(self.path)
            self._stream = self._zip.open(self.member)
            self._pos = -self.header_len
        while self._pos < pos:  # skip forward in bounded pieces
            n = len(self._stream.read(min(self.SKIP, pos - self._pos)))
            if not n:
                raise self._error(f"is truncated (ends {self.nbytes - self._pos} bytes early)")
            self._pos += n
        got = 0
        while got < len(buf):
            n = self._stream.readinto(buf[got:])
            if not n:
                raise self._error(f"is truncated (ends {self.nbytes - pos - got} bytes early)")
            got += n
        self._pos = pos + got
        if self._pos >= self.nbytes:
            self.close()


def _npy_header(fp: Any) -> Optional[tuple[tuple, np.dtype]]:
    """Shape and dtype from a .npy header, or None when it must be read whole by np.load
    (not an array, an unknown format version, Fortran order, object dtypes)."""
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            return None
    except Exception:
        return None
    if fortran or dtype.hasobject:
        return None
    return tuple(shape), dtype


def _open_npz(path: Path) -> dict[str, Any]:
    """Every member of a .npz as a DiskArray (or, where it cannot stay on disk, as np.load reads it)."""
    try:
        archive = zipfile.ZipFile(path)
    except Exception as exc:
        raise InputError(f"{path}: cannot read .npz file: {exc}") from None
    out: dict[str, Any] = {}
    try:
        size = path.stat().st_size
        members = {(info.filename[:-4] if info.filename.endswith(".npy") else info.filename): info
                   for info in archive.infolist()}
        with open(path, "rb") as f:
            for key, info in members.items():
                array = _npz_member(path, archive, f, info, size)
                out[key] = array if array is not None else _eager_member(path, key)
    except InputError:
        _close(out.values())
        raise
    except Exception as exc:
        _close(out.values())
        raise InputError(f"{path}: cannot read .npz file: {exc}") from None
    finally:
        archive.close()
    return out


def _npz_member(path: Path, archive: zipfile.ZipFile, f: Any, info: zipfile.ZipInfo,
                size: int) -> Optional[DiskArray]:
    def error(problem: str) -> InputError:
        return InputError(f"{path}: cannot read .npz file: member '{info.filename}' {problem}")

    if info.flag_bits & 0x1:
        return None  # encrypted: np.load says so
    if info.compress_type == zipfile.ZIP_STORED:
        f.seek(info.header_offset)
        local = f.read(zipfile.sizeFileHeader)
        if len(local) < zipfile.sizeFileHeader:
            raise error("is truncated")
        fields = struct.unpack(zipfile.structFileHeader, local)
        if fields[0] != zipfile.stringFileHeader:
            raise error("has a bad local header (file corrupt)")
        start = info.header_offset + zipfile.sizeFileHeader + fields[-2] + fields[-1]
        f.seek(start)
        head = _npy_header(f)
        if head is None:
            return None
        header_len = f.tell() - start
        f.seek(start)
        header = f.read(header_len)
        array: DiskArray = _StoredArray(path, ".npz", info.filename, head[0], head[1], start + header_len,
                                        crc=info.CRC, header=header)
    else:
        try:
            with archive.open(info) as stream:
                head = _npy_header(stream)
                header_len = stream.tell()
        except Exception:
            return None  # unsupported compression or a broken stream: np.load names the problem
        if head is None:
            return None
        array = _StreamedArray(path, info.filename, head[0], head[1], header_len)
        start = None
    if header_len + array.nbytes != info.file_size:
        raise error(f"holds {info.file_size - header_len} bytes of data, its header says {array.nbytes} (file corrupt)")
    if start is not None and start + info.file_size > size:
        raise error(f"is truncated (the file ends {start + info.file_size - size} bytes early)")
    return array


def _eager_member(path: Path, key: str) -> Any:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz[key]
    except Exception as exc:
        raise InputError(f"{path}: cannot read .npz file: {exc}") from None


def _open_npy(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            head = _npy_header(f)
            offset = f.tell()
        size = path.stat().st_size
    except Exception as exc:
        raise InputError(f"{path}: cannot read .npy file: {exc}") from None
    if head is None:
        return _read_npy(path)
    array = _StoredArray(path, ".npy", "", head[0], head[1], offset)
    if offset + array.nbytes > size:
        raise InputError(f"{path}: cannot read .npy file: data is truncated (holds {size - offset} bytes, "
                         f"its header says {array.nbytes})")
    return array


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"{path}: cannot read .npy file: {exc}") from None


def load_dataset(source: Any, model: onnx.ModelProto, *, batch_size: int = 32, limit: Optional[int] = None,
                 what: str = "data") -> Dataset:
    """Check data against the model's inputs and cut it into feeds, all held in memory.

    ``source`` is a path (.npz, .npy, folder), a dict of arrays, or an iterable
    of such dicts (the Python API's calibration iterables).
    """
    feeds, labels, samples = [], [], 0
    for feed, feed_labels, n in iter_feeds(source, model, batch_size=batch_size, limit=limit, what=what):
        feeds.append(feed)
        samples += n
        if feed_labels is not None:
            labels.append(feed_labels)
    all_labels = np.concatenate(labels)[:samples] if labels else None
    return Dataset(feeds, all_labels, source=source_label(source), samples=samples)


def source_label(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "given data"


def iter_feeds(source: Any, model: onnx.ModelProto, *, batch_size: int = 32, limit: Optional[int] = None,
               what: str = "data") -> Iterator[tuple[dict[str, np.ndarray], Optional[np.ndarray], int]]:
    """Checked feeds one batch at a time, as (feed, labels or None, samples in it).

    Files are read batch by batch (uncompressed data at its offset, compressed
    .npz members as a stream), so memory does not grow with the size of a file
    or the number of files. Stops once ``limit`` samples have been given.
    """
    specs = input_specs(model)
    label = source_label(source)
    if isinstance(source, (str, os.PathLike)):
        groups: Iterable[dict] = iter_arrays(source, lazy=True)
    elif isinstance(source, dict):
        groups = [source]
    else:
        groups = source
    samples = 0
    for group in groups:
        group = dict(group)
        try:
            if "" in group and len(specs) == 1:
                group[specs[0].name] = group.pop("")
            group_labels = _whole(group.pop(LABELS, None)) if LABELS not in {s.name for s in specs} else None
            arrays = _checked(group, specs, label, what)
            n = _count(arrays, specs)
            if group_labels is not None and np.ndim(group_labels) == 0:
                raise InputError(f"{label}: '{LABELS}' holds a single value; it needs one label per sample")
            if group_labels is not None and len(group_labels) != n:
                raise InputError(f"{label}: {len(group_labels)} labels for {n} samples")
            start = 0
            if group_labels is not None:  # one row per sample: [N] class labels, [N, T] text ids
                group_labels = np.asarray(group_labels)
                if group_labels.ndim == 2 and group_labels.shape[1] == 1:
                    group_labels = group_labels.reshape(-1)
            for feed in _batches(arrays, specs, n, batch_size):
                rows = _count(feed, specs)
                if what == "calibration data":
                    _check_finite(feed, label, samples)
                feed_labels = None if group_labels is None else group_labels[start:start + rows]
                start += rows
                samples += rows
                yield feed, feed_labels, rows
                if limit is not None and samples >= limit:
                    return
        finally:
            _close(group.values())
    if samples == 0:
        raise InputError(f"{label}: no samples in {what}")


def _check_finite(feed: dict[str, np.ndarray], label: str, first: int) -> None:
    """Calibration ranges and statistics from NaN/Inf would be NaN themselves: refuse such samples."""
    for name, array in feed.items():
        if not np.issubdtype(array.dtype, np.floating):
            continue
        bad = ~np.isfinite(array)
        if bad.any():
            row = first + int(np.argwhere(bad)[0][0])
            kind = "NaN" if np.isnan(array[bad]).any() else "Inf"
            raise InputError(f"{label}: calibration data input '{name}' holds {kind} "
                             f"(sample {row}); calibration needs finite values")


def _checked(group: dict, specs: list[InputSpec], label: str, what: str) -> dict[str, np.ndarray]:
    names = [s.name for s in specs]
    unknown = [k for k in group if k not in names]
    if unknown:
        raise InputError(f"{label}: {what} has array '{unknown[0]}' but the model's inputs are: {', '.join(names)}")
    missing = [n for n in names if n not in group]
    if missing:
        raise InputError(f"{label}: {what} lacks input '{missing[0]}' (model inputs: {', '.join(names)})")
    out = {}
    for spec in specs:
        array = group[spec.name]
        if not isinstance(array, DiskArray):
            array = np.asarray(array)
        if array.dtype != spec.dtype:
            raise InputError(f"{label}: input '{spec.name}' must be {spec.dtype}, {what} has {array.dtype}")
        out[spec.name] = _batched(array, spec, label, what)
    return out


def _batched(array: np.ndarray, spec: InputSpec, label: str, what: str) -> np.ndarray:
    rank = len(spec.shape)
    if array.ndim == rank - 1 and rank > 0:
        array = _whole(array)[None]  # a single sample
    if array.ndim != rank:
        raise InputError(f"{label}: input '{spec.name}' must have {rank} dimensions {_fmt(spec.shape)}, "
                         f"{what} has shape {list(array.shape)}")
    for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
        if isinstance(want, int) and want > 0 and want != got and not (axis == 0 and got % want == 0):
            raise InputError(f"{label}: input '{spec.name}' has shape {_fmt(spec.shape)}, "
                             f"{what} has shape {list(array.shape)} (dimension {axis} differs)")
    return array


def _fmt(shape: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _count(arrays: dict[str, np.ndarray], specs: list[InputSpec]) -> int:
    batched = [arrays[s.name].shape[0] for s in specs if s.shape and arrays[s.name].ndim]
    return max(batched) if batched else 1


def _spans(arrays: dict[str, np.ndarray], specs: list[InputSpec], n: int, batch_size: int) -> Optional[range]:
    """Where ``_batches`` cuts the sample axis (the start of each batch, and its step), or None
    when the arrays go as one feed; a fixed leading dimension (batch 1 exports) sets the step."""
    fixed = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
    step = fixed.pop() if len(fixed) == 1 else batch_size
    same_n = all(a.ndim and a.shape[0] == n for a in arrays.values())
    return None if not same_n or n <= step else range(0, n, step)


def _batches(arrays: dict[str, np.ndarray], specs: list[InputSpec], n: int, batch_size: int) -> Iterator[dict]:
    """Cut along the sample axis (see ``_spans``)."""
    spans = _spans(arrays, specs, n, batch_size)
    if spans is None:
        yield {k: _whole(v) for k, v in arrays.items()}
        return
    for start in spans:
        yield {k: v[start:start + spans.step] for k, v in arrays.items()}


def count_samples(source: Any, model: onnx.ModelProto, *, batch_size: int = 32,
                  limit: Optional[int] = None) -> Optional[int]:
    """The samples ``iter_feeds`` gives for these arguments, from the arrays' shapes (file headers,
    no data read), for progress bars; None for a one-shot iterable or data it would refuse."""
    if not isinstance(source, (str, os.PathLike, dict, list, tuple)):
        return None
    specs = input_specs(model)
    groups = iter_arrays(source, lazy=True) if isinstance(source, (str, os.PathLike)) else (
        [source] if isinstance(source, dict) else source)
    total = 0
    try:
        for group in groups:
            group = dict(group)
            try:
                if "" in group and len(specs) == 1:
                    group[specs[0].name] = group.pop("")
                if LABELS not in {s.name for s in specs}:
                    group.pop(LABELS, None)
                arrays = _checked(group, specs, source_label(source), "data")
                n = _count(arrays, specs)
                spans = _spans(arrays, specs, n, batch_size)
                for start in spans if spans is not None else [0]:
                    total += n - start if spans is None else min(spans.step, n - start)
                    if limit is not None and total >= limit:
                        return total
            finally:
                _close(group.values())
    except Exception:  # the real read will say what is wrong
        return None
    return total


def synthetic_dataset(model: onnx.ModelProto, *, dims: Optional[dict[str, int]] = None, seed: int = 0,
                      batches: int = 1) -> Dataset:
    """Seeded feeds from the inputs' shapes and dtypes; symbolic dims from ``dims`` or 1.

    Values follow what the graph says each input is (see onnxopt.synthetic):
    indices stay below the rows of the tables they index, masks are ones, RNN
    states zeros. To find dims the model runs on, use ``synthetic.find_inputs``.
    """
    from .synthetic import Candidate, dim_key, make_feed, read_graph

    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    specs = input_specs(model)
    facts = read_graph(model, specs)
    binding, unbound = {}, set()
    for spec in specs:
        for axis, d in enumerate(spec.shape):
            if not (isinstance(d, int) and d > 0):
                name = d if isinstance(d, str) else "?"
                key, named = dim_key(spec.name, axis, d)
                value = dims.get(name, dims.get(key, dims.get("?")))
                if value is None:
                    unbound.add(name)
                binding[key] = int(value or 1)
    cand = Candidate(binding, {name: values[0] for name, values in facts.choices.items()})
    feeds = [make_feed(specs, facts, cand, rng) for _ in range(batches)]
    notes = [f"symbolic dimensions bound to 1: {', '.join(sorted(unbound))} (set with --dim NAME=VALUE)"] if unbound else []
    samples = sum(_count(feed, specs) for feed in feeds)
    return Dataset(feeds, None, source=f"synthetic (seed {seed})", synthetic=True, samples=samples, notes=notes)
