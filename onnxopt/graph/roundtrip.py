"""Model <-> onnx-graphsurgeon graph, losslessly: import, export with large weights stubbed out, and
the fixes for what graphsurgeon drops or rewrites on the way (types, attributes, opsets, initializer inputs)."""

from __future__ import annotations

import collections
from typing import Callable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from ..io import external_ref, iter_graph_protos, iter_tensors

from .surgery import constants, iter_graphs, outer_reads, subgraphs_of, MappedValues


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
