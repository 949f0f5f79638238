"""What dedup compares: scopes that see their parents' values, and the entries for nodes and constants."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import graph as G

from .keys import (
    _ATTRIBUTE_REF,
    _CACHE_BYTES,
    _digest,
    _equal_raw,
    _hash,
    _payload,
    _raw,
    _to_bytes,
)


class _Scope:
    """A table of values and nodes visible in one graph, chained to the enclosing graph's."""

    def __init__(self, parent: Optional["_Scope"], graph: gs.Graph) -> None:
        self.parent = parent
        self.graph = graph
        self.table: dict[tuple, list] = {}

    def find(self, key: tuple, match: Callable[[Any], bool]) -> tuple[Any, Optional["_Scope"]]:
        scope: Optional[_Scope] = self
        while scope is not None:
            for entry in scope.table.get(key, ()):
                if match(entry):
                    return entry, scope
            scope = scope.parent
        return None, None

    def add(self, key: tuple, entry: Any) -> None:
        self.table.setdefault(key, []).append(entry)


@dataclass
class _NodeEntry:
    node: gs.Node
    tensors: list


@dataclass
class _ConstEntry:
    """A constant value: the tensor consumers read, its key, and how to get its bytes again."""

    tensor: gs.Tensor
    key: tuple
    nbytes: int
    load: Callable[[], Optional[np.ndarray]]
    cached: Optional[np.ndarray] = None

    @classmethod
    def of_tensor(cls, tensor: gs.Constant, digests: dict) -> Optional["_ConstEntry"]:
        info = _digest(tensor, digests)
        if info is None:
            return None
        key, nbytes, payload = info
        return cls(tensor, key, nbytes, lambda: _payload(tensor), payload)

    @classmethod
    def of_node(cls, node: gs.Node, digests: dict) -> Optional["_ConstEntry"]:
        """A Constant node's value; None for sparse values, attribute references or unknown forms."""
        if len(node.attrs) != 1:
            return None
        (attr, value), = node.attrs.items()
        if attr == "value":
            if not isinstance(value, gs.Constant):
                return None
            entry = cls.of_tensor(value, digests)
            if entry is not None:
                entry.tensor = node.outputs[0]
            return entry
        array = _scalar_attr_value(attr, value)
        if array is None:
            return None
        dtype = (onnx.TensorProto.STRING if array.dtype.kind == "O"
                 else onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
        raw = _raw(array)
        key = ("const", int(dtype), tuple(array.shape), _hash(raw))
        return cls(node.outputs[0], key, len(raw) if isinstance(raw, bytes) else int(raw.nbytes),
                   lambda: array, array)

    def trimmed(self) -> "_ConstEntry":
        """Kept in a table: large payloads are dropped, and decoded again on a match."""
        if self.nbytes > _CACHE_BYTES:
            self.cached = None
        return self

    def same_as(self, other: "_ConstEntry") -> bool:
        a = self.cached if self.cached is not None else self.load()
        b = other.cached if other.cached is not None else other.load()
        return a is not None and b is not None and _equal_raw(_raw(a), _raw(b))


def _lonely_shapes(graph: gs.Graph) -> set[tuple]:
    """Shapes that exactly one constant in the model has (initializers and Constant values, all
    scopes and functions): such a constant cannot equal another, so its bytes need no hash."""
    counts: Counter = Counter()
    seen: set[int] = set()
    for g in G.iter_graphs(graph):
        for node in g.nodes:
            tensors = [t for t in node.inputs if isinstance(t, gs.Constant)]
            if node.op == "Constant":
                for attr, value in node.attrs.items():
                    if isinstance(value, gs.Constant):
                        tensors.append(value)
                    else:
                        array = _scalar_attr_value(attr, value)
                        counts[tuple(array.shape) if array is not None else None] += 2
            for t in tensors:
                if id(t) not in seen:
                    seen.add(id(t))
                    counts[tuple(t._values.shape)] += 1
        for t in g.outputs:
            if isinstance(t, gs.Constant) and id(t) not in seen:
                seen.add(id(t))
                counts[tuple(t._values.shape)] += 1
    return {shape for shape, n in counts.items() if n == 1}


def _scalar_attr_value(attr: str, value: Any) -> Optional[np.ndarray]:
    """The tensor a Constant node's value_float(s)/value_int(s)/value_string(s) attribute makes."""
    if isinstance(value, _ATTRIBUTE_REF):
        return None
    try:
        if attr == "value_float":
            return np.array(value, np.float32)
        if attr == "value_floats":
            return np.array(list(value), np.float32).reshape(-1)
        if attr == "value_int":
            return np.array(value, np.int64)
        if attr == "value_ints":
            return np.array(list(value), np.int64).reshape(-1)
        if attr == "value_string":
            return np.array(_to_bytes(value), dtype=object)
        if attr == "value_strings":
            out = np.empty(len(value), dtype=object)
            out[:] = [_to_bytes(v) for v in value]
            return out
    except (TypeError, ValueError, OverflowError):
        return None
    return None
