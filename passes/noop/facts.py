"""What noop knows about each tensor: dtype and shape from the graph, value_info and onnx shape inference, constant values."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import graph as G


Shape = Optional[tuple]  # a tuple of ints (static dims) and None (unknown dims); None: rank unknown

INT32_MAX = 2**31 - 1
_MAX_LOAD = 1 << 24  # elements of a constant operand loaded to test for all-zeros/ones
_SMALL_INIT = 1024   # initializers above this many elements go to shape inference as typed inputs
_MAX_ROUNDS = 20

STAT_KEYS = (
    "identity_removed", "dropout_removed", "cast_removed", "reshape_removed", "reshape_chain_collapsed",
    "unsqueeze_merged",
    "expand_removed", "tile_removed", "transpose_removed", "transpose_merged", "pad_removed",
    "arith_removed", "slice_removed", "concat_removed", "split_removed", "single_input_removed",
    "where_removed", "kept_graph_io", "skipped_unknown_shape", "skipped_unknown_type", "skipped_dropout",
)


def _dim(value: Any) -> Optional[int]:
    return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0 else None


def _norm_shape(shape: Any) -> Shape:
    if shape is None:
        return None
    return tuple(_dim(d) for d in shape)


def _onnx_dtype(dtype: Any) -> Optional[int]:
    """An ONNX element type from what gs stores (a numpy dtype, or an ONNX enum for others)."""
    if dtype is None:
        return None
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        return int(dtype) or None
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    except Exception:  # noqa: BLE001 - a type we cannot name is an unknown type
        return None


def _default_domain(node: gs.Node) -> bool:
    return (node.domain or "") in ("", "ai.onnx")


def _has_attr_refs(node: gs.Node) -> bool:
    return any(isinstance(v, gs.Node.AttributeRef) for v in node.attrs.values())


def _present(node: gs.Node, index: int) -> Optional[gs.Tensor]:
    """The node's input at ``index`` unless it is absent or an omitted optional input."""
    if index < len(node.inputs) and node.inputs[index].name:
        return node.inputs[index]
    return None


def _source_meta(source: Any) -> tuple[Optional[int], Shape]:
    values = source._values if isinstance(source, gs.Constant) else source  # no lazy load
    return _onnx_dtype(values.dtype), tuple(int(d) for d in values.shape)


def _ints(tensor: Optional[gs.Tensor], overridable: frozenset = frozenset()) -> Optional[list[int]]:
    """A small constant integer tensor as a list of ints (0-D gives one item), or None."""
    value = G.const_value(tensor, overridable, 4096)
    if value is None or value.dtype.kind not in "iu":
        return None
    return [int(v) for v in value.reshape(-1)]


class _Facts:
    """Static dtypes and shapes of values, by tensor identity, and where values are graph outputs."""

    def __init__(self, graph: gs.Graph, infer: bool) -> None:
        # Initializers also listed as graph inputs may be fed at run time; import_graph records
        # their names (vars(): gs.Graph.__getattr__ logs an error for names it does not know).
        self.overridable = frozenset(vars(graph).get("initializer_inputs") or ())
        self.output_of: dict[int, list[int]] = defaultdict(list)  # id(tensor) -> ids of graphs listing it
        self.graph_of: dict[int, gs.Graph] = {}                    # id(node) -> its graph
        untrusted: set[int] = set()  # values whose declared shapes mean nothing (Loop/Scan bodies, functions)
        graphs: list[tuple[gs.Graph, bool]] = []

        def walk(g: gs.Graph, shaky: bool) -> None:
            graphs.append((g, shaky))
            for t in g.outputs:
                self.output_of[id(t)].append(id(g))
            if shaky:
                untrusted.update(id(t) for t in g.inputs)
            for node in g.nodes:
                self.graph_of[id(node)] = g
                if shaky:
                    untrusted.update(id(t) for t in node.outputs)
                fed = node.op != "If" or not _default_domain(node)  # bodies fed by their op (Loop, Scan...)
                for sub in G.subgraphs_of(node):
                    walk(sub, shaky or fed)

        walk(graph, False)
        for func in getattr(graph, "functions", []):
            walk(func, True)
        self.graphs = [g for g, _ in graphs]

        inferred = _infer(graph, self.overridable) if infer else {}
        top_inputs = {id(t) for t in graph.inputs}
        self.dtypes: dict[int, Optional[int]] = {}
        self.shapes: dict[int, Shape] = {}
        for g, _ in graphs:
            for tensor in [*g.inputs, *(t for n in g.nodes for t in [*n.inputs, *n.outputs]), *g.outputs]:
                key = id(tensor)
                if key in self.dtypes or not tensor.name:
                    continue
                self.dtypes[key], self.shapes[key] = self._describe(tensor, inferred, top_inputs, untrusted)

    def _describe(self, tensor: gs.Tensor, inferred: dict, top_inputs: set[int],
                  untrusted: set[int]) -> tuple[Optional[int], Shape]:
        if tensor.name in self.overridable:
            return _onnx_dtype(tensor.dtype), None
        source = G.constant_source(tensor, self.overridable)
        if source is not None:
            try:
                return _source_meta(source)
            except Exception:  # noqa: BLE001
                return None, None
        is_tensor = getattr(tensor, "type", "tensor_type") == "tensor_type"
        declared_dtype = _onnx_dtype(tensor.dtype) if is_tensor else None
        inf_dtype, inf_shape = inferred.get(tensor.name, (None, None))
        if inf_dtype is not None and declared_dtype is not None and inf_dtype != declared_dtype:
            dtype = None
        else:
            dtype = inf_dtype or declared_dtype
        key = id(tensor)
        if key in top_inputs:
            shape = _norm_shape(tensor.shape) if is_tensor else None
        elif key in untrusted or not is_tensor:
            shape = None
        elif inf_shape is not None:
            shape = inf_shape
        elif key in self.output_of:
            shape = None  # a declared output shape: it can be wrong
        else:
            shape = _norm_shape(tensor.shape)
        return dtype, shape

    def dtype(self, tensor: gs.Tensor) -> Optional[int]:
        return self.dtypes.get(id(tensor))

    def shape(self, tensor: gs.Tensor) -> Shape:
        return self.shapes.get(id(tensor))

    def is_output(self, tensor: gs.Tensor) -> bool:
        return id(tensor) in self.output_of


def _graph_protos(graph: onnx.GraphProto, top: bool = True):
    yield graph, top
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graph_protos(attr.g, False)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graph_protos(sub, False)


def _infer(graph: gs.Graph, overridable: frozenset = frozenset()) -> dict[str, tuple[Optional[int], Shape]]:
    """Name -> (dtype, shape) from ONNX shape inference on a copy stripped of declared shapes.

    Only the top-level inputs' shapes and the constants seed it, so what comes
    back is derived, not declared. Large and overridable initializers go in as
    typed inputs (their values say nothing about shapes, or may be replaced).
    Returns {} when the copy cannot be made or inferred (unsorted graph, types
    gs cannot export, over 2 GB).
    """
    if not all(G.is_sorted(g) for g in G.iter_graphs(graph)):
        return {}
    try:
        model, stubs = G.export_onnx(graph)
    except Exception:  # noqa: BLE001 - no inference, fall back to declared shapes
        return {}
    # Only the small constants' values matter to shape inference; large ones stay dims-only.
    G.fill_stubs(model, stubs, keep=lambda t: math.prod(t.dims) <= _SMALL_INIT and t.name not in overridable)
    top = model.graph
    small = []
    for init in top.initializer:
        if math.prod(init.dims) > _SMALL_INIT or init.name in overridable:
            top.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            small.append(init)
    if len(small) != len(top.initializer):
        kept = [onnx.TensorProto() for _ in small]
        for dst, src in zip(kept, small):
            dst.CopyFrom(src)
        del top.initializer[:]
        top.initializer.extend(kept)
    for g, is_top in _graph_protos(top):
        del g.value_info[:]
        declared = list(g.output) if is_top else [*g.input, *g.output]
        for vi in declared:
            if vi.type.HasField("tensor_type"):
                vi.type.tensor_type.ClearField("shape")
    try:
        if model.ByteSize() >= 2**31 - 1:
            return {}
        model = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001
        return {}
    found: dict[str, tuple[Optional[int], Shape]] = {}
    clash: set[str] = set()
    for g, is_top in _graph_protos(model.graph):
        for vi in [*(g.input if is_top else []), *g.value_info, *g.output]:
            if not vi.type.HasField("tensor_type"):
                continue
            tt = vi.type.tensor_type
            shape = None
            if tt.HasField("shape"):
                shape = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim)
            entry = (tt.elem_type or None, shape)
            if vi.name in found and found[vi.name] != entry:
                clash.add(vi.name)
            found[vi.name] = entry
    for name in clash:
        found[name] = (None, None)
    return found
