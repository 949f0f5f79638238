"""Graph helpers over onnx-graphsurgeon: import/export, walking, everyday surgery.

Passes receive an ``onnx_graphsurgeon.Graph``. Tensors are shared objects:
a value read by an If/Loop/Scan body from the outer scope is the same
``Tensor`` object in both graphs, so rewiring or renaming it is seen in every
scope at once.
"""

from __future__ import annotations

import collections
import fnmatch
import math
import sys
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from .io import PACKED_TYPES, external_ref, iter_graph_protos, iter_tensors

__all__ = [
    "import_graph", "export_model", "iter_graphs", "subgraphs_of", "find_nodes",
    "rewire_input", "insert_after", "can_bypass", "bypass", "remove_node", "remove_nodes", "outer_reads", "positions",
    "constants", "node_count", "Names", "param_count", "param_bytes", "producer",
    "constant_node_value", "constant_source", "const_value", "const_array", "sizes", "export_onnx", "fill_stubs",
    "new_constant",
]


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import a model once; passes then work on the returned graph.

    onnx-graphsurgeon drops initializers that nothing reads; their names are
    kept in ``graph.unread_initializers`` so ``dce`` can report them.
    """
    graph = gs.import_onnx(model)
    _declare_interface(graph, model.graph)
    for tensor in constants(graph):
        values = tensor._values
        if type(values) is LazyValues and external_ref(values.tensor) is not None:
            tensor._values = MappedValues(values.tensor)
    read = {name for g in iter_graphs(graph) for name in g.tensors()}
    listed = {vi.name for vi in model.graph.input}
    graph.unread_initializers = [t.name for t in model.graph.initializer
                                 if t.name not in read and t.name not in listed]
    # Initializers also listed as graph inputs are defaults a caller may override:
    # passes must not treat their values as fixed (read with vars(graph).get).
    # Before IR 4 every initializer had to be listed as an input, and none is overridable.
    graph.initializer_inputs = ([t.name for t in model.graph.initializer if t.name in listed]
                                if model.ir_version >= 4 else [])
    return graph


def _declare_interface(graph: gs.Graph, proto: onnx.GraphProto) -> None:
    """Give every graph input and output (all scopes) the type and shape its graph declares.

    gs reads value_info before the inputs and outputs and keeps the first entry of a
    name: a value_info entry that repeats an output with less (an older exporter's,
    without a shape) would replace the declaration, and the exported model would then
    fail the checker. The declaration wins wherever it says more.
    """
    if proto.value_info:
        initializers = {t.name for t in proto.initializer}
        declared = {vi.name: vi for vi in [*proto.input, *proto.output] if vi.name not in initializers}
        for tensor in [*graph.inputs, *graph.outputs]:
            vi = declared.get(tensor.name)
            if isinstance(tensor, gs.Variable) and vi is not None and vi.type.HasField("tensor_type"):
                read = OnnxImporter.import_tensor(vi)  # gs's own reading of types and shapes
                tensor.dtype = read.dtype if read.dtype is not None else tensor.dtype
                tensor.shape = read.shape if read.shape is not None else tensor.shape
    for gs_node, node_proto in zip(graph.nodes, proto.node):
        for attr in node_proto.attribute:
            held = gs_node.attrs.get(attr.name)
            if attr.type == onnx.AttributeProto.GRAPH and isinstance(held, gs.Graph):
                _declare_interface(held, attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS and isinstance(held, (list, tuple)):
                for sub, sub_proto in zip(held, attr.graphs):
                    if isinstance(sub, gs.Graph):
                        _declare_interface(sub, sub_proto)


def export_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export a graph, keeping the model-level fields of ``template``.

    Passes may append nodes anywhere; the graph is sorted topologically only
    when some node reads a value made after it, so untouched graphs keep
    their node order.
    """
    if not all(is_sorted(g) for g in iter_graphs(graph)):
        graph.toposort()
    hidden = _hide_unexportable_types(graph)
    empty = _hide_empty_list_attrs(graph)
    try:
        model, stubs = export_onnx(graph)
    finally:
        for tensor, dtype in hidden:
            tensor.dtype = dtype
        for node, name, value in empty:
            node.attrs[name] = value
    _restore_value_types(model, template)
    _hoist_outer_initializers(model, template)
    _restore_initializer_inputs(model, template)
    _restore_dropped_attributes(model, template)
    _drop_outer_copies(model.graph)
    _drop_unusable_value_info(model.graph)
    model.ir_version = template.ir_version
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(template, field))
    model.metadata_props.extend(template.metadata_props)
    model.training_info.extend(template.training_info)
    _keep_opsets(model, template, getattr(graph, "opset", 0) or 0)
    fill_stubs(model, stubs)
    return model


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


# Tensors at least this big are exported through a stub (see export_onnx).
_STUB_BYTES = 1024
_STUB_MARK = STUB_MARK = "\x00onnxopt-stub:"  # doc_string of a stub


class _Stub(LazyValues):
    """Stands in for a constant's data while gs exports the graph: dims and type, no data."""

    def __init__(self, index: int, name: str, data_type: int, shape: tuple, dtype, nbytes: int) -> None:
        self.tensor = onnx.TensorProto(name=name, data_type=data_type, dims=shape,
                                       doc_string=f"{_STUB_MARK}{index}")
        self.shape, self.dtype, self.nbytes = shape, dtype, nbytes


def export_onnx(graph: gs.Graph) -> tuple[onnx.ModelProto, list]:
    """gs.export_onnx, with the data of large constants left out: returns the model and
    the stubs to give to :func:`fill_stubs`.

    gs copies every tensor two to four times on export (array to bytes, bytes to
    proto, proto into the graph, graph into the model). Exporting dims-only stubs
    and copying each tensor once into its final place afterwards makes export
    several times cheaper on large models; shape inference needs no filling at all.
    """
    stubs: list[tuple[gs.Constant, object]] = []
    for tensor in _big_constants(graph):
        original = tensor._values
        if isinstance(original, np.ndarray):
            if original.dtype.kind not in "biuf" or tensor.export_dtype != tensor.dtype:
                continue  # strings and dtype conversions take gs's own path
            data_type = onnx.helper.np_dtype_to_tensor_dtype(original.dtype)
        else:
            data_type = original.tensor.data_type
        tensor._values = _Stub(len(stubs), tensor.name, data_type, tuple(original.shape),
                               original.dtype, original.nbytes)
        stubs.append((tensor, original))
    try:
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for tensor, original in stubs:
            tensor._values = original
    return model, stubs


def _big_constants(graph: gs.Graph) -> Iterator[gs.Constant]:
    """Initializers and Constant-node values of at least _STUB_BYTES, each once (not in functions)."""
    seen: set[int] = set()
    for g in iter_graphs(graph, functions=False):
        found = [t for t in g.tensors().values() if isinstance(t, gs.Constant)]
        found += [n.attrs["value"] for n in g.nodes
                  if n.op == "Constant" and isinstance(n.attrs.get("value"), gs.Constant)]
        for tensor in found:
            values = tensor._values
            if (id(tensor) not in seen and not isinstance(values, SparseValues)
                    and values.nbytes >= _STUB_BYTES):
                seen.add(id(tensor))
                yield tensor


def fill_stubs(model: onnx.ModelProto, stubs: list, keep: Callable[[onnx.TensorProto], bool] | None = None) -> None:
    """Put the data of the tensors :func:`export_onnx` stubbed into the model, one copy each.

    With ``keep``, stubs for which it returns False stay dims-only."""
    if not stubs:
        return
    for proto in iter_tensors(model.graph):
        if not proto.doc_string.startswith(_STUB_MARK) or (keep is not None and not keep(proto)):
            continue
        original = stubs[int(proto.doc_string[len(_STUB_MARK):])][1]
        reference = getattr(original, "onnx_reference", None)  # a MappedValues map, as loaded
        if reference is not None:
            name = proto.name
            proto.CopyFrom(reference)
            proto.name = name
        elif isinstance(original, np.ndarray):
            proto.doc_string = ""
            proto.raw_data = np.ascontiguousarray(original).tobytes()
        else:
            name = proto.name
            proto.CopyFrom(original.tensor)
            proto.name = name


# Value kinds onnx-graphsurgeon writes back as it read them; it cannot export
# optional/map/opaque types (UnboundLocalError) and flattens nested sequences.
_GS_ROUND_TRIPS = ("tensor_type", "sparse_tensor_type")


def _hide_unexportable_types(graph: gs.Graph) -> list[tuple[gs.Tensor, object]]:
    """Blank the dtype of values whose type gs cannot write; export_model restores them."""
    hidden = []
    for g in iter_graphs(graph):
        for tensor in g.tensors().values():
            if (isinstance(tensor, gs.Variable) and tensor.dtype is not None
                    and getattr(tensor, "type", "tensor_type") not in _GS_ROUND_TRIPS):
                hidden.append((tensor, tensor.dtype))
                tensor.dtype = None
    return hidden


def _restore_value_types(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """Give graph inputs/outputs (all scopes) that gs wrote without a type, or as a
    sequence, the type the original declared for that name."""
    declared: dict[str, onnx.TypeProto] = {}
    for g in iter_graph_protos(template.graph):
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.type.WhichOneof("value") not in (None, "tensor_type"):
                declared.setdefault(vi.name, vi.type)
    if not declared:
        return
    for g in iter_graph_protos(model.graph):
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.name in declared and vi.type.WhichOneof("value") in (None, "sequence_type"):
                vi.type.CopyFrom(declared[vi.name])


def _hoist_outer_initializers(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """gs writes an outer initializer that only subgraphs read into each subgraph reading it;
    put the ones the original kept in the main graph back there, once. So too a constant
    that several subgraphs read (one a pass shared between If branches): the main graph
    is visible from every subgraph, and one copy is what the model's size counted."""
    subgraphs = list(iter_graph_protos(model.graph))[1:]
    written = collections.Counter(t.name for g in subgraphs for t in g.initializer)
    top = {t.name for t in template.graph.initializer} | {name for name, n in written.items() if n > 1}
    if not top:
        return
    have = {t.name for t in model.graph.initializer}
    for g in subgraphs:
        moved = [t for t in g.initializer if t.name in top]
        if not moved:
            continue
        keep = [t for t in g.initializer if t.name not in top]
        for t in moved:
            if t.name not in have:
                model.graph.initializer.append(t)
                have.add(t.name)
        del g.initializer[:]
        g.initializer.extend(keep)


def _drop_outer_copies(graph: onnx.GraphProto, outer: frozenset = frozenset()) -> None:
    """gs writes an initializer, and a value_info entry, into every graph whose nodes read an
    outer value; a subgraph reads outer values by name, so those copies are dropped."""
    if outer:
        for field in (graph.initializer, graph.value_info):
            keep = [t for t in field if t.name not in outer]
            if len(keep) != len(field):
                del field[:]
                field.extend(keep)
    visible = (outer | {t.name for t in graph.initializer} | {v.name for v in graph.input}
               | {o for n in graph.node for o in n.output})
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                _drop_outer_copies(attr.g, visible)
            for sub in attr.graphs:
                _drop_outer_copies(sub, visible)


def _drop_unusable_value_info(graph: onnx.GraphProto) -> None:
    """Drop value_info entries (all scopes) that say nothing or that ONNX Runtime rejects.

    An entry without a type says nothing; one whose tensor element type is undefined
    (gs writes those for a value whose shape it knows but not its type) makes ONNX
    Runtime refuse the model ("Invalid tensor data type 0"); one that repeats a graph
    input, output or initializer is a second declaration of the same name. Nothing
    reads value_info but shape inference, which recomputes what is dropped.
    """
    for g in iter_graph_protos(graph):
        declared = {vi.name for vi in [*g.input, *g.output]} | {t.name for t in g.initializer}
        keep = [vi for vi in g.value_info if vi.name and vi.name not in declared and _says_something(vi.type)]
        if len(keep) != len(g.value_info):
            del g.value_info[:]
            g.value_info.extend(keep)


def _says_something(t: onnx.TypeProto) -> bool:
    """A type with a kind whose element types are all defined."""
    kind = t.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        return getattr(t, kind).elem_type != onnx.TensorProto.UNDEFINED
    if kind == "sequence_type":
        return _says_something(t.sequence_type.elem_type)
    if kind == "optional_type":
        return _says_something(t.optional_type.elem_type)
    if kind == "map_type":
        return _says_something(t.map_type.value_type)
    return kind is not None


def _restore_initializer_inputs(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """Initializers the original also listed as graph inputs (required before IR 4,
    overridable defaults after) stay listed, in the original order. gs imports them as
    plain constants and drops them from the inputs. Graph inputs are interface: one that
    no node reads any more keeps its original default value. Before IR 4 every
    initializer must be a graph input, so new ones are listed too."""
    inits = {t.name: t for t in template.graph.initializer}
    old_ir = template.ir_version < 4
    if not old_ir and not any(vi.name in inits for vi in template.graph.input):
        return
    kept = {t.name for t in model.graph.initializer}
    current = {vi.name: vi for vi in model.graph.input}
    inputs = []
    for vi in template.graph.input:
        if vi.name in current:
            inputs.append(current.pop(vi.name))
        elif vi.name in inits:
            inputs.append(vi)
            if vi.name not in kept:
                model.graph.initializer.append(inits[vi.name])
    inputs.extend(current.values())
    if old_ir:
        listed = {vi.name for vi in inputs}
        inputs.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                      for t in model.graph.initializer if t.name not in listed)
    del model.graph.input[:]
    model.graph.input.extend(inputs)


# Attribute kinds gs imports; it drops the rest (TYPE_PROTO(S), TENSORS, GRAPHS,
# SPARSE_TENSOR(S)) with a warning.
_GS_ATTRS = {onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT, onnx.AttributeProto.STRING,
             onnx.AttributeProto.TENSOR, onnx.AttributeProto.GRAPH, onnx.AttributeProto.FLOATS,
             onnx.AttributeProto.INTS, onnx.AttributeProto.STRINGS}


def _all_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    for g in iter_graph_protos(model.graph):
        yield from g.node
    for func in model.functions:
        yield from func.node


def _hide_empty_list_attrs(graph: gs.Graph) -> list[tuple[gs.Node, str, object]]:
    """Take out empty list attributes, whose type gs cannot tell on export; they come back
    from the template (``_restore_dropped_attributes``), typed, and on the graph after export."""
    hidden = []
    for g in iter_graphs(graph):
        for node in g.nodes:
            for name, value in list(node.attrs.items()):
                if isinstance(value, (list, tuple)) and len(value) == 0:
                    hidden.append((node, name, node.attrs.pop(name)))
    return hidden


def _empty_list(attr: onnx.AttributeProto) -> bool:
    return attr.type in (onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS, onnx.AttributeProto.STRINGS) and \
        not (attr.ints or attr.floats or attr.strings)


def _restore_dropped_attributes(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """Put back the attributes gs could not import, on the same node (op and outputs)."""
    dropped = {}
    for node in _all_nodes(template):
        lost = [a for a in node.attribute if (a.type not in _GS_ATTRS or _empty_list(a)) and not a.ref_attr_name]
        if lost:
            dropped[(node.domain, node.op_type, tuple(node.output))] = lost
    if not dropped:
        return
    for node in _all_nodes(model):
        lost = dropped.get((node.domain, node.op_type, tuple(node.output)))
        if lost:
            have = {a.name for a in node.attribute}
            node.attribute.extend(a for a in lost if a.name not in have)


def is_sorted(graph: gs.Graph) -> bool:
    """True when every node comes after the nodes of this graph whose outputs it reads."""
    position = {id(t): i for i, node in enumerate(graph.nodes) for t in node.outputs}
    for i, node in enumerate(graph.nodes):
        reads = list(node.inputs)
        for sub in subgraphs_of(node):
            reads.extend(outer_reads(sub))
        if any(position.get(id(t), -1) >= i for t in reads):
            return False
    return True


def _keep_opsets(model: onnx.ModelProto, template: onnx.ModelProto, graph_opset: int = 0) -> None:
    """Keep every opset the original imported, at its version; add new domains only.

    A pass may raise the default domain's opset by setting ``graph.opset``
    (e.g. to 13 for per-channel QuantizeLinear); it is never lowered.
    """
    wanted = {op.domain or "": op.version for op in template.opset_import}
    if graph_opset > wanted.get("", 0) and "" in wanted:
        wanted[""] = graph_opset
    for op in model.opset_import:
        wanted.setdefault(op.domain or "", op.version)
    del model.opset_import[:]
    for domain, version in wanted.items():
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))


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
