"""Input feeds: .npz/.npy readers, checks against the model's inputs, synthetic data, batching.

A *feed* is a dict input name -> array holding one batch. Data files hold
arrays named after the model's inputs, batched (leading sample axis) or a
single sample; an array named ``labels`` that is not a model input is taken as
the class labels for accuracy.
"""

from __future__ import annotations

import logging
import os
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


def iter_arrays(path: Union[str, os.PathLike]) -> Iterator[dict[str, np.ndarray]]:
    """Groups of arrays, read one file at a time.

    In a folder, every .npz is one group of arrays; .npy files are grouped
    together, each named after the input it feeds (``input_ids.npy``).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such data file or folder")
    if path.is_dir():
        npzs, npys = sorted(path.glob("*.npz")), sorted(path.glob("*.npy"))
        if not npzs and not npys:
            raise InputError(f"{path}: folder holds no .npz or .npy files")
        for p in npzs:
            yield _read_npz(p)
        if npys:
            yield {p.stem: _read_npy(p) for p in npys}
        return
    if path.suffix == ".npz":
        yield _read_npz(path)
    elif path.suffix == ".npy":
        yield {"": _read_npy(path)}
    else:
        raise InputError(f"{path}: expected a .npz or .npy file or a folder of them")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise InputError(f"{path}: cannot read .npz file: {exc}") from None


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

    Files are read one at a time, so a folder of many .npz files streams in
    bounded memory. Stops once ``limit`` samples have been given.
    """
    specs = input_specs(model)
    label = source_label(source)
    if isinstance(source, (str, os.PathLike)):
        groups: Iterable[dict] = iter_arrays(source)
    elif isinstance(source, dict):
        groups = [source]
    else:
        groups = source
    samples = 0
    for group in groups:
        group = dict(group)
        if "" in group and len(specs) == 1:
            group[specs[0].name] = group.pop("")
        group_labels = group.pop(LABELS, None) if LABELS not in {s.name for s in specs} else None
        arrays = _checked(group, specs, label, what)
        n = _count(arrays, specs)
        if group_labels is not None and len(group_labels) != n:
            raise InputError(f"{label}: {len(group_labels)} labels for {n} samples")
        start = 0
        for feed in _batches(arrays, specs, n, batch_size):
            rows = _count(feed, specs)
            feed_labels = None if group_labels is None else np.asarray(group_labels).reshape(-1)[start:start + rows]
            start += rows
            samples += rows
            yield feed, feed_labels, rows
            if limit is not None and samples >= limit:
                return
    if samples == 0:
        raise InputError(f"{label}: no samples in {what}")


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
        array = np.asarray(group[spec.name])
        if array.dtype != spec.dtype:
            raise InputError(f"{label}: input '{spec.name}' must be {spec.dtype}, {what} has {array.dtype}")
        out[spec.name] = _batched(array, spec, label, what)
    return out


def _batched(array: np.ndarray, spec: InputSpec, label: str, what: str) -> np.ndarray:
    rank = len(spec.shape)
    if array.ndim == rank - 1 and rank > 0:
        array = array[None]  # a single sample
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


def _batches(arrays: dict[str, np.ndarray], specs: list[InputSpec], n: int, batch_size: int) -> Iterator[dict]:
    """Cut along the sample axis; a fixed leading dimension (batch 1 exports) sets the step."""
    fixed = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
    step = fixed.pop() if len(fixed) == 1 else batch_size
    same_n = all(a.ndim and a.shape[0] == n for a in arrays.values())
    if not same_n or n <= step:
        yield arrays
        return
    for start in range(0, n, step):
        yield {k: v[start:start + step] for k, v in arrays.items()}


def synthetic_dataset(model: onnx.ModelProto, *, dims: Optional[dict[str, int]] = None, seed: int = 0,
                      batches: int = 1) -> Dataset:
    """Seeded random feeds from the inputs' shapes and dtypes; symbolic dims from ``dims`` or 1."""
    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    unbound: set[str] = set()
    feeds = []
    for _ in range(batches):
        feed = {}
        for spec in input_specs(model):
            shape = []
            for d in spec.shape:
                if isinstance(d, int) and d > 0:
                    shape.append(d)
                else:
                    key = d if isinstance(d, str) else "?"
                    if key not in dims:
                        unbound.add(key)
                    shape.append(int(dims.get(key, 1)))
            feed[spec.name] = random_array(rng, spec.dtype, shape)
        feeds.append(feed)
    notes = [f"symbolic dimensions bound to 1: {', '.join(sorted(unbound))} (set with --dim NAME=VALUE)"] if unbound else []
    samples = sum(_count(feed, input_specs(model)) for feed in feeds)
    return Dataset(feeds, None, source=f"synthetic (seed {seed})", synthetic=True, samples=samples, notes=notes)


def random_array(rng: np.random.Generator, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    """Standard normal floats, small non-negative integers (safe as indices), random booleans."""
    if dtype == np.bool_:
        return np.asarray(rng.random(shape) < 0.5)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 8, size=shape).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "US" or dtype == np.object_:
        return np.array(rng.choice(["a", "b", "c"], size=shape), dtype=object)
    raise InputError(f"cannot make synthetic data of type {dtype}; give data with --inputs")
