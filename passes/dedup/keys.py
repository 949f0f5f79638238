"""Hashable keys: constant payloads by digest (bytes compared on a match) and node attributes."""

from __future__ import annotations

import hashlib
import struct
from typing import Any, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxopt import graph as G, io

# A node attribute that refers to an attribute of the enclosing function (gs >= 0.5).
_ATTRIBUTE_REF = getattr(gs.Node, "AttributeRef", ())

# Payloads up to this size are kept for byte comparisons; larger ones are decoded again on a match.
_CACHE_BYTES = 1 << 20





def _payload(tensor: gs.Constant) -> Optional[np.ndarray]:
    """The values, decoded from the TensorProto for lazily held ones without caching them in gs
    (``Constant.values`` would keep them, and cast types numpy lacks)."""
    values = tensor._values
    if isinstance(values, G.SparseValues):
        return None
    try:
        if isinstance(values, G.MappedValues):  # left in the input's file: read through a map, no copy
            return values.load()
        if isinstance(values, LazyValues):
            return numpy_helper.to_array(values.tensor)
        return np.asarray(values)
    except Exception:  # undecodable data (e.g. external data not loaded): leave it alone
        return None


def _onnx_dtype(tensor: gs.Constant, payload: np.ndarray) -> Any:
    values = tensor._values
    if isinstance(values, LazyValues):
        return int(values.tensor.data_type)
    export = getattr(tensor, "_export_dtype", None)
    try:
        if export is not None:
            if isinstance(export, int):
                return int(export)
            return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(export)))
        if payload.dtype.kind in "OUS":
            return int(onnx.TensorProto.STRING)
        return int(onnx.helper.np_dtype_to_tensor_dtype(payload.dtype))
    except (KeyError, TypeError, ValueError):
        return ("numpy", payload.dtype.str)


def _digest(tensor: gs.Constant, digests: dict) -> Optional[tuple]:
    """(key, nbytes, payload or None) for a constant; the key is computed once per tensor."""
    if id(tensor) in digests:
        key, nbytes = digests[id(tensor)][:2]
        return key, nbytes, None
    proto = _reference(tensor)
    if proto is not None:  # left in the input's file: keyed from the file, nothing kept
        ref = io.external_ref(proto)
        key = ("const", int(proto.data_type), tuple(int(d) for d in proto.dims), _file_hash(ref))
        digests[id(tensor)] = (key, ref.length, tensor)
        return key, ref.length, None
    payload = _payload(tensor)
    if payload is None:
        return None
    raw = _raw(payload)
    nbytes = len(raw) if isinstance(raw, bytes) else int(raw.nbytes)
    key = ("const", _onnx_dtype(tensor, payload), tuple(payload.shape), _hash(raw))
    digests[id(tensor)] = (key, nbytes, tensor)  # the tensor keeps its id from being reused
    return key, nbytes, payload


def _raw(array: np.ndarray) -> Any:
    """The bytes that identify an array's values: a uint8 view, or length-prefixed strings."""
    array = np.ascontiguousarray(array)
    if array.dtype.kind in "OUS":
        parts = []
        for item in array.reshape(-1).tolist():
            data = _to_bytes(item)
            parts.append(struct.pack("<Q", len(data)) + data)
        return b"".join(parts)
    return array.reshape(-1).view(np.uint8)


def _to_bytes(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    return repr(item).encode("utf-8")


SAMPLE_ABOVE = 1 << 20  # bytes; bigger tensors are keyed by a sample of their bytes


def _hash(raw: Any) -> bytes:
    """A key for the bytes. Past 1 MiB only every 509th byte and the tail are hashed: equal keys
    are always confirmed by a full comparison before merging, and distinct weights almost never
    agree on the sample, so this only saves reading every byte of every large weight."""
    if not isinstance(raw, bytes) and raw.size > SAMPLE_ABOVE:
        sample = np.concatenate([raw[::509], raw[-4096:]])
        return hashlib.blake2b(sample.tobytes(), digest_size=16).digest() + raw.size.to_bytes(8, "little")
    return hashlib.blake2b(raw, digest_size=16).digest()


def _reference(tensor: gs.Constant) -> Optional[onnx.TensorProto]:
    """The TensorProto of a constant whose data is still the reference to the input's file."""
    values = tensor._values
    proto = values.tensor if isinstance(values, G.MappedValues) else getattr(values, "onnx_reference", None)
    return proto if proto is not None and io.external_ref(proto) is not None else None


def _file_hash(ref: io.ExternalRef, chunk: int = 509 * 32768) -> bytes:
    """:func:`_hash` of the bytes a reference points at, read a chunk at a time through the page
    cache: sampling a map would bring every page of the weight into this process's memory."""
    if ref.length <= SAMPLE_ABOVE:
        return _hash(ref.read())
    parts = []
    with open(ref.path, "rb") as handle:
        handle.seek(ref.offset)
        done = 0
        while done < ref.length:  # chunks are multiples of 509: the samples fall where _hash takes them
            block = handle.read(min(chunk, ref.length - done))
            if not block:
                break
            parts.append(np.frombuffer(block, np.uint8)[::509].copy())
            done += len(block)
        handle.seek(ref.offset + ref.length - 4096)
        parts.append(np.frombuffer(handle.read(4096), np.uint8))
    sample = np.concatenate(parts)
    return hashlib.blake2b(sample.tobytes(), digest_size=16).digest() + ref.length.to_bytes(8, "little")


def _equal_raw(a: Any, b: Any) -> bool:
    if isinstance(a, bytes) or isinstance(b, bytes):
        return isinstance(a, bytes) and isinstance(b, bytes) and a == b
    return a.shape == b.shape and bool(np.array_equal(a, b))


def _same_bytes(a: gs.Constant, b: gs.Constant) -> bool:
    if a is b:
        return True
    pa, pb = _payload(a), _payload(b)
    return pa is not None and pb is not None and _equal_raw(_raw(pa), _raw(pb))


# ----------------------------------------------------------------- attributes

class _Unhashable(Exception):
    """An attribute value this pass cannot compare (a subgraph, an unknown object)."""


def _attr_key(value: Any, tensors: list, digests: dict) -> tuple:
    """A hashable, exact description of an attribute value; tensors are keyed by their bytes'
    hash and collected in ``tensors`` for a byte comparison on a match."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int):
        return ("i", value)
    if isinstance(value, float):
        return ("f", struct.pack("<d", value))  # -0.0 differs from 0.0, NaN payloads kept
    if isinstance(value, str):
        return ("s", value)
    if isinstance(value, bytes):
        return ("y", value)
    if isinstance(value, gs.Constant):
        info = _digest(value, digests)
        if info is None:
            raise _Unhashable
        tensors.append(value)
        return ("t", info[0])
    if isinstance(value, _ATTRIBUTE_REF):
        return ("r", value.name, repr(value.type))
    if isinstance(value, (list, tuple)):
        return ("l", tuple(_attr_key(v, tensors, digests) for v in value))
    if isinstance(value, np.ndarray):
        raw = _raw(value)
        return ("a", value.dtype.str, value.shape, raw if isinstance(raw, bytes) else raw.tobytes())
    if isinstance(value, np.generic):
        return ("n", value.dtype.str, value.tobytes())
    if isinstance(value, (type, np.dtype)):
        try:
            return ("d", np.dtype(value).str)
        except TypeError:
            raise _Unhashable from None
    if value is None:
        return ("none",)
    raise _Unhashable
