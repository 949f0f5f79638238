"""Deduplication: merge identical constants and identical nodes."""

from __future__ import annotations

import functools
from collections import Counter
import hashlib
import heapq
import struct
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

try:
    from onnx_graphsurgeon.ir.tensor import SparseValues
except ImportError:  # onnx-graphsurgeon before sparse initializers
    class SparseValues:  # type: ignore[no-redef]
        pass

from onnxopt import graph as G, io
from onnxopt.options import option
from onnxopt.pipeline import Pass, PassContext, PassResult, register_pass


@dataclass
class DedupOptions:
    constants: bool = option(True, help="merge byte-identical initializers and Constant-node values")
    nodes: bool = option(True, help="merge nodes computing the same thing (common-subexpression elimination)")
    domains: list[str] = option(factory=lambda: ["com.microsoft"], help="op domains besides the ONNX ones whose nodes may be merged (others merge only when they call a model-local function made of mergeable ops)")


_DEFAULT_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})

# Ops whose every run may give another result, or that act outside the graph: never merged.
_NONDETERMINISTIC = frozenset({
    ("", "RandomNormal"), ("", "RandomUniform"), ("", "RandomNormalLike"), ("", "RandomUniformLike"),
    ("", "Multinomial"), ("", "Bernoulli"),
    ("com.microsoft", "BiasDropout"), ("com.microsoft", "BitmaskDropout"),
    ("com.microsoft", "BitmaskBiasDropout"),
    ("com.microsoft", "PythonOp"), ("com.microsoft", "PythonOpGrad"), ("com.microsoft", "YieldOp"),
    ("com.microsoft", "RecordEvent"), ("com.microsoft", "WaitEvent"), ("com.microsoft", "Send"),
    ("com.microsoft", "Recv"),
})

# A node attribute that refers to an attribute of the enclosing function (gs >= 0.5).
_ATTRIBUTE_REF = getattr(gs.Node, "AttributeRef", ())

# Payloads up to this size are kept for byte comparisons; larger ones are decoded again on a match.
_CACHE_BYTES = 1 << 20


@register_pass
class Dedup(Pass):
    """Merge byte-identical constants and identical nodes (common-subexpression elimination). Exact.

    Constants: initializers and Constant-node values with the same element type, shape and bytes
    (hashed, then compared byte for byte) become one tensor that every consumer reads; an
    initializer is kept over a Constant node. Initializers are merged across all scopes (a
    subgraph may read any outer value); a Constant node is merged into an identical value
    visible from its scope (its own or an enclosing one, made before it).

    Nodes: a node with the same op, domain, attributes (values compared exactly, tensor
    attributes by bytes) and the very same input values as an earlier node visible from its
    scope is dropped, its consumers reading the kept node's outputs. Nodes are visited in
    topological order, so chains of duplicates collapse in one run; a subgraph node may reuse an
    outer node made before the node holding the subgraph.

    Never merged (each count is one duplicate left in place): random ops, Dropout in training
    mode, ops with side effects and functions holding them (``skipped_nondeterministic``); ops of
    domains other than ONNX's and ``domains``, unless they call a model-local function made of
    mergeable ops (``skipped_custom_domain``); ops whose attributes the graph importer drops, e.g.
    Optional (``skipped_unsupported``); nodes holding subgraphs (their bodies are deduplicated
    inside). When a duplicate's output is a graph output, the kept node's output takes over its
    name and declared type if it can (same scope, not an output itself); otherwise both stay
    (``kept_graph_io``, also counted for constants that are graph outputs).

    Merged Constant nodes and duplicate nodes are removed; ``bytes_saved`` counts the bytes of the
    constants merged away.
    """

    name = "dedup"
    Options = DedupOptions
    leaves_dangling = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        self.stats = {"constants_merged": 0, "bytes_saved": 0, "nodes_merged": 0,
                      "skipped_nondeterministic": 0, "skipped_custom_domain": 0, "skipped_unsupported": 0,
                      "kept_graph_io": 0}
        self.renamed = 0
        self.allowed = _DEFAULT_DOMAINS | {_domain(d) for d in self.options.domains}
        self.functions = _function_kinds(graph, self.allowed)
        self.digests: dict[int, tuple] = {}
        self.lonely = _lonely_shapes(graph)
        # Where each value is a graph output, every scope: id(tensor) -> [(graph, index)].
        self.out_slots: dict[int, list[tuple[gs.Graph, int]]] = {}
        for g in G.iter_graphs(graph):
            for i, t in enumerate(g.outputs):
                self.out_slots.setdefault(id(t), []).append((g, i))

        root = _Scope(None, graph)
        if self.options.constants:
            self._merge_initializers(graph, root)
        self._walk(graph, root)
        for func in getattr(graph, "functions", []):
            self._walk(func, _Scope(None, func))
        modified = bool(self.stats["constants_merged"] or self.stats["nodes_merged"] or self.renamed)
        # The per-run tables reference the graph's tensors: a pipeline keeps its pass objects,
        # and must not keep the graph (and the model it came from) alive with them.
        self.digests = self.out_slots = self.functions = self.lonely = None
        return PassResult(modified, dict(self.stats))

    # ------------------------------------------------------------- constants

    def _merge_initializers(self, graph: gs.Graph, root: "_Scope") -> None:
        """Initializers (gs.Constant inputs) of every scope but functions: one object per value.

        gs writes a Constant into every graph whose nodes read it, so an initializer is
        visible from any scope and merging them is safe across scopes. Initializers the model
        also lists as graph inputs (``graph.initializer_inputs``) may be overridden at run time:
        they are neither merged nor kept for others.
        """
        # (vars(): gs.Graph.__getattr__ logs an error for any name it lacks)
        overridable = set(vars(graph).get("initializer_inputs") or ())
        seen: set[int] = set()
        for g in G.iter_graphs(graph, functions=False):
            candidates = [t for node in g.nodes for t in node.inputs] + list(g.outputs)
            for tensor in candidates:
                if not isinstance(tensor, gs.Constant) or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                if tuple(tensor._values.shape) in self.lonely:
                    continue  # no other constant has its shape: nothing to merge with, nothing to hash
                entry = _ConstEntry.of_tensor(tensor, self.digests)
                if entry is None:
                    continue
                if tensor.name in overridable:
                    self.stats["kept_graph_io"] += root.find(entry.key, entry.same_as)[0] is not None
                    continue
                self._merge_constant(root, entry, tensor)

    def _constant_node(self, node: gs.Node, scope: "_Scope", doomed: list[gs.Node]) -> None:
        if len(node.outputs) != 1 or not node.outputs[0].name or node.inputs:
            return
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant) and tuple(value._values.shape) in self.lonely:
            return
        entry = _ConstEntry.of_node(node, self.digests)
        if entry is None:
            return
        if self._merge_constant(scope, entry, node.outputs[0]):
            doomed.append(node)

    def _merge_constant(self, scope: "_Scope", entry: "_ConstEntry", tensor: gs.Tensor) -> bool:
        """Point the readers of ``tensor`` at an equal constant already kept in ``scope``.
        False when it is kept instead: the first of its value, or a graph output."""
        kept, _ = scope.find(entry.key, entry.same_as)
        if kept is None:
            scope.add(entry.key, entry.trimmed())
            return False
        if id(tensor) in self.out_slots:
            self.stats["kept_graph_io"] += 1
            return False
        for consumer in list(tensor.outputs):
            G.rewire_input(consumer, tensor, kept.tensor)
        self.stats["constants_merged"] += 1
        self.stats["bytes_saved"] += entry.nbytes
        return True

    # ------------------------------------------------------------- nodes

    def _walk(self, g: gs.Graph, parent: "_Scope") -> None:
        scope = parent if parent.graph is g else _Scope(parent, g)
        doomed: list[gs.Node] = []
        for node in _topological(g):
            if node.op == "Constant" and _domain(node.domain) == "":
                if self.options.constants:
                    self._constant_node(node, scope, doomed)
                continue
            subgraphs = G.subgraphs_of(node)
            if subgraphs:
                for sub in subgraphs:
                    self._walk(sub, scope)
                continue
            if self.options.nodes:
                self._cse(g, node, scope, doomed)
        if doomed:
            G.remove_nodes(g, doomed)

    def _cse(self, g: gs.Graph, node: gs.Node, scope: "_Scope", doomed: list[gs.Node]) -> None:
        if not node.outputs or not any(t.name for t in node.outputs):
            return
        tensors: list[gs.Constant] = []
        try:
            attrs = tuple(sorted((k, _attr_key(v, tensors, self.digests)) for k, v in node.attrs.items()))
        except _Unhashable:
            return
        domain = _domain(node.domain)
        key = ("node", domain, node.op, attrs,
               tuple(id(t) if t.name else None for t in node.inputs),
               tuple(bool(t.name) for t in node.outputs))

        def same(entry: "_NodeEntry") -> bool:
            return all(_same_bytes(a, b) for a, b in zip(tensors, entry.tensors))

        kept, where = scope.find(key, same)
        if kept is None:
            scope.add(key, _NodeEntry(node, tensors))
            return
        reason = self._cannot_merge(node, domain)
        if reason:
            self.stats[reason] += 1
            return
        if not self._take_over_outputs(g, node, kept.node, where.graph is g):
            self.stats["kept_graph_io"] += 1
            return
        for dup, keep in zip(node.outputs, kept.node.outputs):
            if dup.name:
                for consumer in list(dup.outputs):
                    G.rewire_input(consumer, dup, keep)
        doomed.append(node)
        self.stats["nodes_merged"] += 1

    def _cannot_merge(self, node: gs.Node, domain: str) -> Optional[str]:
        kind = self.functions.get((domain, node.op))
        if (domain, node.op) in _NONDETERMINISTIC or _random_dropout(node, domain) or kind == "random":
            return "skipped_nondeterministic"
        if kind != "pure" and (kind is not None or domain not in self.allowed):
            return "skipped_custom_domain"
        if (domain, node.op) in _ops_with_dropped_attributes():
            return "skipped_unsupported"
        return None

    def _take_over_outputs(self, g: gs.Graph, dup: gs.Node, keep: gs.Node, same_scope: bool) -> bool:
        """Where ``dup``'s outputs are graph outputs, hand their names to ``keep``'s outputs.

        Only done when every such output is an output of ``dup``'s own graph once, the kept
        node lives in that graph, and its output is no graph output itself; else nothing changes.
        """
        moves = []
        for d_out, k_out in zip(dup.outputs, keep.outputs):
            slots = self.out_slots.get(id(d_out), []) if d_out.name else []
            if not slots:
                continue
            if (len(slots) != 1 or slots[0][0] is not g or not same_scope
                    or id(k_out) in self.out_slots):
                return False
            moves.append((d_out, k_out, slots[0][1]))
        for d_out, k_out, idx in moves:
            name = d_out.name
            d_out.name = f"{name}__dedup_dropped"
            k_out.name, k_out.dtype, k_out.shape = name, d_out.dtype, d_out.shape
            g.outputs[idx] = k_out
            self.out_slots[id(k_out)] = self.out_slots.pop(id(d_out))
            self.renamed += 1
        return True


# ----------------------------------------------------------------- scopes and entries

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


# ----------------------------------------------------------------- bytes

def _payload(tensor: gs.Constant) -> Optional[np.ndarray]:
    """The values, decoded from the TensorProto for lazily held ones without caching them in gs
    (``Constant.values`` would keep them, and cast types numpy lacks)."""
    values = tensor._values
    if isinstance(values, SparseValues):
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


# ----------------------------------------------------------------- ops

def _domain(domain: Optional[str]) -> str:
    return "" if domain in (None, "", "ai.onnx") else domain


def _random_dropout(node: gs.Node, domain: str) -> bool:
    """Dropout in training mode (a training_mode input that is not a constant false) is random."""
    if domain != "" or node.op != "Dropout" or len(node.inputs) < 3 or not node.inputs[2].name:
        return False
    mode = node.inputs[2]
    if isinstance(mode, gs.Constant):
        values = _payload(mode)
        return values is None or values.size != 1 or bool(values.reshape(-1)[0])
    return True


@functools.lru_cache(maxsize=1)
def _ops_with_dropped_attributes() -> frozenset:
    """ONNX ops with attribute kinds onnx-graphsurgeon does not import (type protos, sparse
    tensors, lists of tensors or graphs): two such nodes may look alike when they are not."""
    dropped = {onnx.AttributeProto.TYPE_PROTO, onnx.AttributeProto.TYPE_PROTOS, onnx.AttributeProto.TENSORS,
               onnx.AttributeProto.GRAPHS, onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS}
    return frozenset((_domain(s.domain), s.name) for s in onnx.defs.get_all_schemas_with_history()
                     if any(int(a.type) in dropped for a in s.attributes.values()))


def _function_kinds(graph: gs.Graph, allowed: frozenset) -> dict:
    """(domain, name) of each model-local function -> "pure" when its body only holds mergeable
    ops, "random" when it holds (or calls a function holding) a nondeterministic op, else "unknown"."""
    functions = {(_domain(f.domain), f.name): f for f in getattr(graph, "functions", [])}
    ops = {key: [(_domain(n.domain), n.op, n) for g in G.iter_graphs(f, functions=False) for n in g.nodes]
           for key, f in functions.items()}
    kinds = {key: "unknown" for key in functions}
    for key, body in ops.items():
        if any((d, o) in _NONDETERMINISTIC or _random_dropout(n, d) for d, o, n in body):
            kinds[key] = "random"
    changed = True
    while changed:
        changed = False
        for key, body in ops.items():
            if kinds[key] != "unknown":
                continue
            called = [kinds.get((d, o)) for d, o, _ in body]
            if "random" in called:
                kinds[key] = "random"
                changed = True
            elif all(k == "pure" or (k is None and d in allowed) for k, (d, _, _) in zip(called, body)):
                kinds[key] = "pure"
                changed = True
    return kinds


def _topological(g: gs.Graph) -> list[gs.Node]:
    """The graph's nodes in topological order: as they are when sorted, else a stable sort."""
    if G.is_sorted(g):
        return list(g.nodes)
    maker = {id(t): i for i, n in enumerate(g.nodes) for t in n.outputs}
    users: list[list[int]] = [[] for _ in g.nodes]
    pending = [0] * len(g.nodes)
    for i, node in enumerate(g.nodes):
        reads = list(node.inputs)
        for sub in G.subgraphs_of(node):
            reads.extend(G.outer_reads(sub))
        deps = {maker[id(t)] for t in reads if id(t) in maker} - {i}
        pending[i] = len(deps)
        for d in deps:
            users[d].append(i)
    ready = [i for i in range(len(g.nodes)) if pending[i] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(g.nodes[i])
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    return order if len(order) == len(g.nodes) else list(g.nodes)
