"""Walking and everyday surgery on onnx-graphsurgeon graphs (every scope), and reading their constants.

Tensors are shared objects: a value read by an If/Loop/Scan body from the outer scope is the same
``Tensor`` object in both graphs, so rewiring or renaming it is seen in every scope at once.
"""

from __future__ import annotations

import fnmatch
import math
import sys
from typing import Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from ..io import PACKED_TYPES, external_ref


class MappedValues(LazyValues):
    """A constant whose data stayed in the input's file (:func:`io.external_ref`): read as a
    read-only memory map, so a pass that reads it costs no copy, and exported as the same
    reference while the pass has not replaced it (writing into the map is refused)."""

    def load(self) -> np.ndarray:
        ref = external_ref(self.tensor)
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(self.tensor.data_type)
        except (KeyError, ValueError):
            dtype = None
        if dtype is None or self.tensor.data_type in PACKED_TYPES or dtype.kind not in "biufc":
            inline = onnx.TensorProto()
            inline.CopyFrom(self.tensor)
            inline.raw_data = ref.read()
            inline.ClearField("external_data")
            inline.ClearField("data_location")
            return np.array(onnx.numpy_helper.to_array(inline))
        array = np.memmap(ref.path, dtype=dtype.newbyteorder("<"), mode="r", offset=ref.offset,
                          shape=tuple(self.tensor.dims))
        array.onnx_reference = self.tensor  # export writes the reference back while this array stands
        return array



_GRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def subgraphs_of(node: gs.Node) -> list[gs.Graph]:
    """The graphs held in a node's attributes (If branches, Loop/Scan bodies)."""
    if (node.domain or "") in ("", "ai.onnx") and node.op not in _GRAPH_OPS:
        return []  # no other ONNX op has a graph attribute; this is called for every node of every walk
    found: list[gs.Graph] = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            found.append(value)
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], gs.Graph):
            found.extend(value)  # a GRAPHS attribute holds graphs only
    return found


def iter_graphs(graph: gs.Graph, functions: bool = True) -> Iterator[gs.Graph]:
    """The graph, every nested subgraph, and (optionally) model-local function bodies."""
    yield graph
    for node in graph.nodes:
        for sub in subgraphs_of(node):
            yield from iter_graphs(sub, functions=False)
    if functions:
        for func in getattr(graph, "functions", []):
            yield from iter_graphs(func, functions=False)


def find_nodes(graph: gs.Graph, op: str | Sequence[str] | None = None, name: str | None = None,
               recursive: bool = True) -> list[gs.Node]:
    """Nodes whose op type is ``op`` (one or several) and whose name matches the glob ``name``."""
    ops = {op} if isinstance(op, str) else set(op or ())
    graphs = iter_graphs(graph) if recursive else [graph]
    return [n for g in graphs for n in g.nodes
            if (not ops or n.op in ops) and (name is None or fnmatch.fnmatchcase(n.name, name))]


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that produces a tensor, or None for inputs and constants."""
    return tensor.inputs[0] if tensor.inputs else None


def rewire_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> int:
    """Make ``node`` read ``new`` wherever it read ``old``; returns how many slots changed."""
    changed = 0
    for i, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[i] = new
            changed += 1
    return changed


def insert_after(graph: gs.Graph, tensor: gs.Variable, op: str, attrs: dict | None = None,
                 extra_inputs: Sequence[gs.Tensor] = (), name: str | None = None) -> gs.Node:
    """Insert ``op`` right after ``tensor``: its consumers (and a graph output) now read the new node.

    A graph output keeps its name: the new node's output takes it, and the
    original tensor is renamed.
    """
    name = name or _fresh_name(graph, f"{tensor.name}_{op}")
    out = gs.Variable(_fresh_name(graph, f"{name}_out"), dtype=tensor.dtype, shape=tensor.shape)
    consumers = list(tensor.outputs)
    node = gs.Node(op, name=name, attrs=attrs or {}, inputs=[tensor, *extra_inputs], outputs=[out])
    for consumer in consumers:
        rewire_input(consumer, tensor, out)
    slots = positions(graph.outputs, tensor)
    if slots:
        out.name, tensor.name = tensor.name, _fresh_name(graph, f"{tensor.name}_pre_{op}")
    for idx in slots:
        graph.outputs[idx] = out
    graph.nodes.append(node)
    return node


def positions(items: Sequence, obj: object) -> list[int]:
    """Indices where ``obj`` itself sits in ``items``.

    onnx-graphsurgeon tensors compare equal by name and nodes by content, so
    ``in``, ``index`` and ``remove`` on its lists can match the wrong object.
    """
    return [i for i, item in enumerate(items) if item is obj]


class Names:
    """Fresh names for new values and nodes: ``base``, ``base_1``, ... unused in any scope."""

    def __init__(self, graph: gs.Graph) -> None:
        self.taken = {t for g in iter_graphs(graph) for t in g.tensors()}
        self.taken |= {n.name for n in find_nodes(graph) if n.name}

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name


def _fresh_name(graph: gs.Graph, base: str) -> str:
    return Names(graph).fresh(base)


def can_bypass(graph: gs.Graph, node: gs.Node, src: gs.Tensor | None = None) -> bool:
    """Whether ``bypass`` would remove ``node``, checked without touching anything."""
    if not node.outputs or (src is None and not node.inputs):
        return False
    src = node.inputs[0] if src is None else src
    slots = positions(graph.outputs, node.outputs[0])
    return not slots or (len(slots) == 1 and _renamable(graph, src))


def bypass(graph: gs.Graph, node: gs.Node, src: gs.Tensor | None = None) -> bool:
    """Remove a node whose first output equals ``src`` (default: its first input).

    For Identity, Dropout and other no-ops: consumers read ``src`` instead.
    When the output is a graph output, ``src`` takes the output's name and
    declared type, so the graph's interface is unchanged; that is only done
    when ``src`` is a value this graph produces itself. Returns False, leaving
    the graph alone, when the node cannot be removed safely.
    """
    if not can_bypass(graph, node, src):
        return False
    src = node.inputs[0] if src is None else src
    out = node.outputs[0]
    slots = positions(graph.outputs, out)
    if slots:
        src.name, out.name = out.name, f"{out.name}__bypassed"
        src.dtype, src.shape = out.dtype, out.shape
        graph.outputs[slots[0]] = src
    for consumer in list(out.outputs):
        rewire_input(consumer, out, src)
    remove_node(graph, node)
    return True


def _renamable(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """A tensor may take another name if this graph makes it and it is not part of the interface."""
    maker = producer(tensor)
    return (isinstance(tensor, gs.Variable) and maker is not None and bool(positions(graph.nodes, maker))
            and not positions(graph.inputs, tensor) and not positions(graph.outputs, tensor))


def remove_node(graph: gs.Graph, node: gs.Node) -> None:
    """Detach a node from its tensors and drop it from the graph."""
    remove_nodes(graph, [node])


def remove_nodes(graph: gs.Graph, nodes: Iterable[gs.Node]) -> None:
    """Detach several nodes and drop them in one sweep (by identity, not equality)."""
    doomed = {id(n) for n in nodes}
    for node in graph.nodes:
        if id(node) in doomed:
            node.inputs.clear()
            node.outputs.clear()
    graph.nodes = [n for n in graph.nodes if id(n) not in doomed]


def outer_reads(graph: gs.Graph) -> list[gs.Tensor]:
    """Tensors a subgraph's nodes read that the subgraph neither makes nor takes as input.

    Tracked by identity: gs.Tensor defines ``__eq__`` by name, so it is unhashable
    and ``in`` on lists compares names.
    """
    local = {id(t) for t in graph.inputs}
    for node in graph.nodes:
        local.update(id(t) for t in node.outputs)
    reads: dict[int, gs.Tensor] = {}
    for node in graph.nodes:
        for t in node.inputs:
            if not isinstance(t, gs.Constant) and t.name:
                reads.setdefault(id(t), t)
        for sub in subgraphs_of(node):
            for t in outer_reads(sub):
                reads.setdefault(id(t), t)
    for t in graph.outputs:
        if not isinstance(t, gs.Constant):
            reads.setdefault(id(t), t)
    return [t for key, t in reads.items() if key not in local]


def constants(graph: gs.Graph) -> list[gs.Constant]:
    """Every distinct constant tensor: initializers and Constant-node values, all scopes."""
    seen: dict[int, gs.Constant] = {}
    for g in iter_graphs(graph):
        for node in g.nodes:
            for tensor in node.inputs:
                if isinstance(tensor, gs.Constant):
                    seen[id(tensor)] = tensor
            if node.op == "Constant":
                for value in node.attrs.values():
                    if isinstance(value, gs.Constant):
                        seen[id(value)] = value
        for tensor in g.outputs:
            if isinstance(tensor, gs.Constant):
                seen[id(tensor)] = tensor
    return list(seen.values())


def _sparse_values(graph: gs.Graph) -> Iterator[onnx.SparseTensorProto]:
    """Constant(sparse_value) tensors, which gs keeps as protos."""
    for g in iter_graphs(graph):
        for node in g.nodes:
            value = node.attrs.get("sparse_value") if node.op == "Constant" else None
            if isinstance(value, onnx.SparseTensorProto):
                yield value


def sizes(graph: gs.Graph) -> tuple[int, int, int]:
    """(node_count, param_count, param_bytes); each constant read once, without loading its data."""
    params = nbytes = 0
    for tensor in constants(graph):
        values = tensor._values
        params += int(np.prod(values.shape, dtype=np.int64))
        nbytes += int(values.nbytes)
    for s in _sparse_values(graph):
        params += int(np.prod(s.dims, dtype=np.int64))
        nbytes += s.ByteSize()
    return node_count(graph), params, nbytes


def param_count(graph: gs.Graph) -> int:
    """Number of constant elements (weights) in all scopes; sparse ones at their dense size."""
    return sizes(graph)[1]


def param_bytes(graph: gs.Graph) -> int:
    """Bytes of constant data in all scopes, sparse tensors as stored (values and indices)."""
    return sizes(graph)[2]


def constant_node_value(node: gs.Node) -> "gs.Constant | np.ndarray | None":
    """What an ONNX ``Constant`` node holds: its tensor as a gs.Constant, ``value_float(s)`` as
    float32 and ``value_int(s)`` as int64 arrays; None for other forms (strings, sparse values,
    attribute references inside functions) and other ops."""
    if node.op != "Constant" or (node.domain or "") not in ("", "ai.onnx") or len(node.attrs) != 1:
        return None
    (key, value), = node.attrs.items()
    if key == "value":
        return value if isinstance(value, gs.Constant) else None
    kinds = {"value_float": (float, np.float32), "value_floats": (float, np.float32),
             "value_int": (int, np.int64), "value_ints": (int, np.int64)}
    if key not in kinds:
        return None
    kind, dtype = kinds[key]
    items = value if isinstance(value, (list, tuple)) else [value]
    if key.endswith("s") != isinstance(value, (list, tuple)) or not all(
            isinstance(v, (kind, int)) and not isinstance(v, bool) for v in items):
        return None
    return np.array(value, dtype)


def constant_source(tensor: "gs.Tensor | None", overridable: Iterable[str] = ()) -> "gs.Constant | np.ndarray | None":
    """The data behind a tensor, or None when it is not fixed.

    An initializer or a ``Constant`` node's output (through Identity nodes) gives the
    gs.Constant holding it, whose dtype and shape can be read without loading it
    (``_values.dtype``/``.shape``); a Constant node's scalar or list attribute gives an
    array. Initializers named in ``overridable`` (``graph.initializer_inputs``: also graph
    inputs, so a caller may feed them) are not fixed.
    """
    for _ in range(16):
        if tensor is None or tensor.name in overridable:
            return None
        if isinstance(tensor, gs.Constant):
            return tensor
        maker = producer(tensor)
        if maker is None:
            return None
        if maker.op != "Identity" or (maker.domain or "") not in ("", "ai.onnx") or not maker.inputs:
            return constant_node_value(maker)
        tensor = maker.inputs[0]
    return None


def const_value(tensor: "gs.Tensor | None", overridable: Iterable[str] = (),
                max_elems: int | None = None) -> np.ndarray | None:
    """The values behind a tensor (see :func:`constant_source`), or None: not fixed, sparse,
    more than ``max_elems`` elements, stored as a type numpy cannot hold, or exported as
    another type. May be a read-only view of the model's bytes: copy before writing."""
    source = constant_source(tensor, overridable)
    if source is None or isinstance(source, np.ndarray):
        return source
    values = source._values
    if isinstance(values, SparseValues):
        return None
    if max_elems is not None and math.prod(values.shape) > max_elems:
        return None
    try:
        array = np.asarray(const_array(source))
        export = source.export_dtype
        if isinstance(export, int):
            export = onnx.helper.tensor_dtype_to_np_dtype(export)
        if export is not None and np.dtype(export) != array.dtype:
            return None
    except Exception:  # noqa: BLE001 - a type numpy cannot hold
        return None
    return array


def const_array(tensor: gs.Constant) -> np.ndarray:
    """A constant's values, read without caching them in the tensor.

    gs's ``tensor.values`` copies a weight twice to load it (bytes out of the proto, then
    ``np.array``) and keeps the copy; this reads it once, as a read-only view of the
    proto's bytes where it can. Copy before writing to it.
    """
    values = tensor._values
    if isinstance(values, np.ndarray):
        return values
    if isinstance(values, MappedValues):  # a map of the file, dropped (unmapped) with the array
        return values.load()
    proto = values.tensor
    if (not isinstance(values, SparseValues) and isinstance(values.dtype, np.dtype)
            and values.dtype.kind in "biuf" and proto.HasField("raw_data") and sys.byteorder == "little"
            and proto.data_location != onnx.TensorProto.EXTERNAL
            and proto.data_type not in PACKED_TYPES):
        return np.frombuffer(proto.raw_data, dtype=values.dtype).reshape(tuple(values.shape))
    return tensor.values


def node_count(graph: gs.Graph) -> int:
    """Nodes in the graph and all nested subgraphs and functions."""
    return sum(len(g.nodes) for g in iter_graphs(graph))


def tensors_named(graph: gs.Graph, names: Iterable[str]) -> list[gs.Tensor]:
    """Look tensors up by name in the top-level graph."""
    table = graph.tensors()
    return [table[n] for n in names]


def new_constant(graph: gs.Graph, names: Names, base: str, values: np.ndarray) -> gs.Tensor:
    """A new constant value for a node input: an initializer, or before IR 4 (where every
    initializer must be a graph input) the output of a ``Constant`` node added to ``graph``."""
    array = np.asarray(values)
    if not (getattr(graph, "ir_version", None) and graph.ir_version < 4):
        return gs.Constant(names.fresh(base), array)
    out = gs.Variable(names.fresh(base), dtype=array.dtype, shape=list(array.shape))
    value = gs.Constant(names.fresh(f"{base}_value"), array)
    graph.nodes.append(gs.Node("Constant", names.fresh(f"{base}_node"), {"value": value}, [], [out]))
    return out
