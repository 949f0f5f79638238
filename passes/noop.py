"""Removal of operations that do nothing."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt.options import option
from onnxopt.pipeline import Pass, PassContext, PassResult, register_pass

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


@dataclass
class NoopOptions:
    infer_shapes: bool = option(True, help="learn static shapes/dtypes by ONNX shape inference on an exported copy")


@register_pass
class NoopElimination(Pass):
    """Remove operations that do nothing (Identity, Dropout, same-type Cast, x+0, x*1, no-op Reshape...). Exact.

    Every rewrite is taken only when it is provably a no-op: constant operands
    and statically known shapes and dtypes. Shapes come from constants, the
    top-level graph inputs, ONNX shape inference on a copy of the graph from
    which every declared intermediate/output shape was stripped, and, where
    inference says nothing, the graph's own value_info; declared graph-output
    shapes and shapes inside Loop/Scan bodies and functions are never trusted.
    Initializers the model also lists as graph inputs (overridable defaults)
    are not constants.

    Removed, each counted under its own stat: Identity; Dropout in inference
    mode whose mask is unused; Cast/CastLike to the input's own type;
    Reshape/Flatten/Squeeze that keep the shape; Expand/Tile that keep the
    shape; Transpose with the identity permutation, and Transpose pairs (both
    go when they cancel, merged into one otherwise); Pad with all-zero pads;
    Add/Sub of zeros and Mul/Div by ones whose constant does not broadcast the
    other operand (``x + 0.0`` turns -0.0 into +0.0, which compares equal);
    Slice over the whole tensor; Concat/Sum/Mean/Max/Min of one input, Split
    into one output; Where with an all-true/all-false constant condition.
    Reshape after Reshape/Flatten/Squeeze/Unsqueeze reads the first one's input
    (``reshape_chain_collapsed``).

    Works in every scope. Graph input/output names never change: a no-op
    feeding a graph output is removed by giving its producer the output's
    name; when that is impossible (its input is a graph input, an initializer,
    another output, or a value from an outer scope) it stays and is counted in
    ``kept_graph_io``. Candidates left for lack of shape or type information
    are counted in ``skipped_unknown_shape``/``skipped_unknown_type``; Dropout
    in training mode or with its mask read in ``skipped_dropout``.
    """

    name = "noop"
    Options = NoopOptions
    leaves_dangling = True  # Constant nodes that fed removed nodes

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        rewriter = _Rewriter(graph, ctx, self.options)
        modified = rewriter.run()
        return PassResult(modified, rewriter.stats())


# ----------------------------------------------------------------- facts about values

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


# ----------------------------------------------------------------- shape reasoning

def _broadcast_keeps(base: Shape, other: Shape) -> Optional[bool]:
    """Does broadcasting ``other`` against ``base`` leave ``base``'s shape? None when unknown.

    An unknown dim of ``other`` facing a static dim other than 1 is fine: in a
    model that runs it can only be 1 or that dim.
    """
    if other is not None and len(other) == 0:
        return True
    if base is None or other is None:
        return None
    if len(other) > len(base):
        return False
    unknown = False
    for d, o in zip(base[len(base) - len(other):], other):
        if o == 1 or (d is not None and o is not None and o == d):
            continue
        if d is not None and o is None and d != 1:
            continue
        if d is not None and o is not None:
            return False
        unknown = True
    return None if unknown else True


def _reshape_keeps(shape: Shape, target: list[int], allowzero: bool) -> Optional[bool]:
    if shape is None:
        return None
    if len(target) != len(shape):
        return False
    minus = None
    unknown = False
    for i, (d, t) in enumerate(zip(shape, target)):
        if t == 0 and not allowzero:
            continue  # copies the input dim
        if t == -1:
            if minus is not None:
                return False
            minus = i
            continue
        if d is None:
            unknown = True
        elif d != t:
            return False
    if unknown:
        return None
    if minus is not None:
        # Every other dim equals the input's, so -1 recovers the input dim wherever the
        # original runs (it fails when the other dims multiply to 0).
        if any(shape[j] == 0 for j in range(len(shape)) if j != minus):
            return False
    return True


def _perm(node: gs.Node, facts: _Facts) -> Optional[list[int]]:
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    shape = facts.shape(node.inputs[0])
    return list(reversed(range(len(shape)))) if shape is not None else None


def _merge_unsqueeze(rank: int, first: list[int], second: list[int]) -> Optional[list[int]]:
    """Axes of one Unsqueeze equal to Unsqueeze(first) then Unsqueeze(second) on a rank-``rank`` input."""
    mid_rank, out_rank = rank + len(first), rank + len(first) + len(second)
    a1 = sorted(a + mid_rank if a < 0 else a for a in first)
    a2 = sorted(a + out_rank if a < 0 else a for a in second)
    if len(set(a1)) != len(a1) or len(set(a2)) != len(a2) or not all(0 <= a < mid_rank for a in a1) \
            or not all(0 <= a < out_rank for a in a2):
        return None
    new_mid = iter([i in a1 for i in range(mid_rank)])
    marks = [True if i in a2 else next(new_mid) for i in range(out_rank)]
    return [i for i, new in enumerate(marks) if new]


def _is_identity_perm(perm: list[int]) -> bool:
    return list(perm) == list(range(len(perm)))


# ----------------------------------------------------------------- the rewriter

class _Rewriter:
    def __init__(self, graph: gs.Graph, ctx: PassContext, options: NoopOptions) -> None:
        self.graph = graph
        self.opset = ctx.opset or getattr(graph, "opset", 0) or 0
        self.facts = _Facts(graph, options.infer_shapes)
        self.counts = {k: 0 for k in STAT_KEYS}
        self.flagged: dict[str, set[int]] = defaultdict(set)  # reason -> ids of the nodes left for it
        self.removed: set[int] = set()
        self.rules: dict[str, Callable[[gs.Graph, gs.Node], bool]] = {
            "Identity": self._identity, "Dropout": self._dropout, "Cast": self._cast, "CastLike": self._castlike,
            "Reshape": self._reshape, "Flatten": self._flatten, "Squeeze": self._squeeze,
            "Unsqueeze": self._unsqueeze,
            "Expand": self._expand, "Tile": self._tile, "Transpose": self._transpose, "Pad": self._pad,
            "Add": self._arith, "Sub": self._arith, "Mul": self._arith, "Div": self._arith,
            "Slice": self._slice, "Concat": self._concat, "Split": self._split,
            "Sum": self._single_input, "Mean": self._single_input, "Max": self._single_input,
            "Min": self._single_input, "Where": self._where,
        }

    def run(self) -> bool:
        modified = False
        for _ in range(_MAX_ROUNDS):
            changed = False
            self.flagged.clear()  # the last round, which changes nothing, says what is left
            for g in self.facts.graphs:
                for node in list(g.nodes):
                    if id(node) in self.removed or not node.outputs:
                        continue
                    rule = self.rules.get(node.op)
                    if rule is None or not _default_domain(node) or _has_attr_refs(node):
                        continue
                    if rule(g, node):
                        changed = True
            modified |= changed
            if not changed:
                break
        return modified

    def stats(self) -> dict[str, int]:
        out = dict(self.counts)
        out["kept_graph_io"] = len(self.flagged["kept_graph_io"])
        for reason in ("skipped_unknown_shape", "skipped_unknown_type", "skipped_dropout"):
            out[reason] = len(self.flagged[reason])
        return out

    # ------------------------------------------------------------- plumbing

    def _const(self, tensor: Optional[gs.Tensor], max_elems: int = _MAX_LOAD) -> Optional[np.ndarray]:
        return G.const_value(tensor, self.facts.overridable, max_elems)

    def _ints(self, tensor: Optional[gs.Tensor]) -> Optional[list[int]]:
        return _ints(tensor, self.facts.overridable)

    def _flag(self, reason: str, node: gs.Node) -> bool:
        self.flagged[reason].add(id(node))
        return False

    def _unused(self, tensor: gs.Tensor) -> bool:
        return not tensor.outputs and not self.facts.is_output(tensor)

    def _can_bypass(self, graph: gs.Graph, src: gs.Tensor, out: gs.Tensor) -> bool:
        """What onnxopt.graph.bypass needs, checked before touching the node; also refuses
        when ``out`` is an output of another scope (a branch returning an outer value)."""
        owners = self.facts.output_of.get(id(out), [])
        if any(g != id(graph) for g in owners):
            return False
        return G.can_bypass(graph, G.producer(out), src)

    def _remove(self, graph: gs.Graph, node: gs.Node, src: gs.Tensor, stat: str) -> bool:
        """Bypass ``node`` (its first output equals ``src``) unless the interface forbids it."""
        if len(node.outputs) > 1 and any(not self._unused(t) for t in node.outputs[1:]):
            return False
        out = node.outputs[0]
        if not self._can_bypass(graph, src, out):
            return self._flag("kept_graph_io", node)
        if len(node.inputs) != 1 or node.inputs[0] is not src:
            node.inputs.clear()
            node.inputs.append(src)
        was_output = bool(G.positions(graph.outputs, out))
        if not G.bypass(graph, node, src):  # pragma: no cover - _can_bypass mirrors bypass
            return self._flag("kept_graph_io", node)
        if was_output:  # src now stands in the graph's outputs
            self.facts.output_of.pop(id(out), None)
            self.facts.output_of[id(src)].append(id(graph))
        self.removed.add(id(node))
        self.flagged["kept_graph_io"].discard(id(node))
        self.counts[stat] += 1
        return True

    def _drop_if_dead(self, node: gs.Node) -> bool:
        """Remove a node (from whichever scope holds it) whose outputs nothing reads any more."""
        if id(node) in self.removed or not all(self._unused(t) for t in node.outputs):
            return False
        if G.subgraphs_of(node):
            return False
        owner = self.facts.graph_of.get(id(node))
        if owner is None or not G.positions(owner.nodes, node):
            return False
        G.remove_node(owner, node)
        self.removed.add(id(node))
        return True

    def _producer_op(self, tensor: gs.Tensor, ops: tuple[str, ...]) -> Optional[gs.Node]:
        maker = G.producer(tensor)
        if (maker is None or maker.op not in ops or not _default_domain(maker) or _has_attr_refs(maker)
                or id(maker) in self.removed):
            return None
        return maker

    # ------------------------------------------------------------- rules

    def _identity(self, graph: gs.Graph, node: gs.Node) -> bool:
        return bool(node.inputs) and self._remove(graph, node, node.inputs[0], "identity_removed")

    def _dropout(self, graph: gs.Graph, node: gs.Node) -> bool:
        if not node.inputs:
            return False
        if len(node.outputs) > 1 and not self._unused(node.outputs[1]):
            return self._flag("skipped_dropout", node)  # the mask is read
        if "is_test" in node.attrs:
            inference = int(node.attrs["is_test"]) == 1
        elif 0 < self.opset < 7:
            inference = False  # opset 1-6: is_test defaults to 0 (training)
        else:
            mode = _present(node, 2)
            value = self._const(mode, 1) if mode is not None else np.array(False)
            inference = value is not None and value.size == 1 and not bool(value.reshape(-1)[0])
        if not inference:
            return self._flag("skipped_dropout", node)
        return self._remove(graph, node, node.inputs[0], "dropout_removed")

    def _cast(self, graph: gs.Graph, node: gs.Node) -> bool:
        if not node.inputs or "to" not in node.attrs:
            return False
        have = self.facts.dtype(node.inputs[0])
        if have is None:
            return self._flag("skipped_unknown_type", node)
        if have != int(node.attrs["to"]):
            return False
        return self._remove(graph, node, node.inputs[0], "cast_removed")

    def _castlike(self, graph: gs.Graph, node: gs.Node) -> bool:
        if len(node.inputs) < 2:
            return False
        have, want = self.facts.dtype(node.inputs[0]), self.facts.dtype(node.inputs[1])
        if have is None or want is None:
            return self._flag("skipped_unknown_type", node)
        return have == want and self._remove(graph, node, node.inputs[0], "cast_removed")

    def _reshape(self, graph: gs.Graph, node: gs.Node) -> bool:
        if not node.inputs:
            return False
        data = node.inputs[0]
        target = self._ints(_present(node, 1)) if len(node.inputs) > 1 else (
            [int(v) for v in node.attrs["shape"]] if "shape" in node.attrs else None)
        if target is None:
            return False
        allowzero = bool(int(node.attrs.get("allowzero", 0)))
        # Reshape of a reshape-like op: read that op's input, when the target does not copy dims (0).
        first = self._producer_op(data, ("Reshape", "Flatten", "Squeeze", "Unsqueeze"))
        if (first is not None and first.inputs and (allowzero or 0 not in target)
                and len(data.outputs) == 1 and not self.facts.is_output(data)):
            node.inputs[0] = first.inputs[0]
            self._drop_if_dead(first)
            self.counts["reshape_chain_collapsed"] += 1
            return True
        keeps = _reshape_keeps(self.facts.shape(data), target, allowzero)
        if keeps is None:
            return self._flag("skipped_unknown_shape", node)
        return keeps and self._remove(graph, node, data, "reshape_removed")

    def _flatten(self, graph: gs.Graph, node: gs.Node) -> bool:
        if not node.inputs:
            return False
        shape = self.facts.shape(node.inputs[0])
        if shape is None:
            return self._flag("skipped_unknown_shape", node)
        if len(shape) != 2:
            return False
        axis = int(node.attrs.get("axis", 1))
        axis = axis + 2 if axis < 0 else axis
        keeps = axis == 1 or (axis == 0 and shape[0] == 1) or (axis == 2 and shape[1] == 1)
        return keeps and self._remove(graph, node, node.inputs[0], "reshape_removed")

    def _squeeze(self, graph: gs.Graph, node: gs.Node) -> bool:
        if not node.inputs or _present(node, 1) is not None or "axes" in node.attrs:
            return False  # with axes it always drops a dim
        shape = self.facts.shape(node.inputs[0])
        if shape is None or (None in shape and 1 not in shape):
            return self._flag("skipped_unknown_shape", node)
        if 1 in shape:
            return False
        return self._remove(graph, node, node.inputs[0], "reshape_removed")

    def _unsqueeze(self, graph: gs.Graph, node: gs.Node) -> bool:
        """Unsqueeze of an Unsqueeze (``mask[:, None, None, :]``) becomes one Unsqueeze."""
        if not node.inputs:
            return False
        mid = node.inputs[0]
        first = self._producer_op(mid, ("Unsqueeze",))
        if first is None or not first.inputs or len(mid.outputs) != 1 or self.facts.is_output(mid):
            return False
        rank = self.facts.shape(first.inputs[0])
        a1, a2 = self._unsqueeze_axes(first), self._unsqueeze_axes(node)
        if rank is None or a1 is None or a2 is None:
            return False
        axes = _merge_unsqueeze(len(rank), a1, a2)
        if axes is None:
            return False
        node.inputs[0] = first.inputs[0]
        if "axes" in node.attrs:
            node.attrs["axes"] = axes
        else:
            node.inputs[1] = gs.Constant(f"{node.outputs[0].name}_axes", np.array(axes, np.int64))
        self._drop_if_dead(first)
        self.counts["unsqueeze_merged"] += 1
        return True

    def _unsqueeze_axes(self, node: gs.Node) -> Optional[list[int]]:
        if "axes" in node.attrs:
            return [int(a) for a in node.attrs["axes"]]
        return self._ints(_present(node, 1)) if len(node.inputs) > 1 else None

    def _expand(self, graph: gs.Graph, node: gs.Node) -> bool:
        target = self._ints(_present(node, 1))
        if target is None or any(t < 0 for t in target):
            return False
        keeps = _broadcast_keeps(self.facts.shape(node.inputs[0]), tuple(target))
        if keeps is None:
            return self._flag("skipped_unknown_shape", node)
        return keeps and self._remove(graph, node, node.inputs[0], "expand_removed")

    def _tile(self, graph: gs.Graph, node: gs.Node) -> bool:
        repeats = self._ints(_present(node, 1))
        if repeats is None or any(r != 1 for r in repeats):
            return False
        return self._remove(graph, node, node.inputs[0], "tile_removed")

    def _transpose(self, graph: gs.Graph, node: gs.Node) -> bool:
        if not node.inputs:
            return False
        perm = _perm(node, self.facts)
        if perm is None:
            return self._flag("skipped_unknown_shape", node)
        if _is_identity_perm(perm):
            return self._remove(graph, node, node.inputs[0], "transpose_removed")
        mid = node.inputs[0]
        first = self._producer_op(mid, ("Transpose",))
        if first is None or not first.inputs:
            return False
        p1 = _perm(first, self.facts)
        if p1 is None or len(p1) != len(perm):
            return False
        composed = [p1[p] for p in perm]
        first_dies = len(mid.outputs) == 1 and not self.facts.is_output(mid)
        if _is_identity_perm(composed) and self._can_bypass(graph, first.inputs[0], node.outputs[0]):
            self._remove(graph, node, first.inputs[0], "transpose_removed")
            if self._drop_if_dead(first):
                self.counts["transpose_removed"] += 1
            return True
        if not first_dies:
            return False
        node.inputs[0] = first.inputs[0]
        node.attrs["perm"] = composed
        self._drop_if_dead(first)
        self.counts["transpose_merged"] += 1
        return True

    def _pad(self, graph: gs.Graph, node: gs.Node) -> bool:
        if not node.inputs:
            return False
        if len(node.inputs) > 1:
            pads = self._ints(_present(node, 1))
        else:
            raw = node.attrs.get("pads", node.attrs.get("paddings"))
            pads = [int(p) for p in raw] if raw is not None else None
        if pads is None or any(p != 0 for p in pads):
            return False
        return self._remove(graph, node, node.inputs[0], "pad_removed")

    def _arith(self, graph: gs.Graph, node: gs.Node) -> bool:
        if len(node.inputs) != 2:
            return False
        neutral = 0 if node.op in ("Add", "Sub") else 1
        slots = (1,) if node.op in ("Sub", "Div") else (1, 0)
        unknown = False
        for k in slots:
            value = self._const(node.inputs[k])
            if value is None or value.dtype.kind not in "fiu" or not np.all(value == neutral):
                continue
            other = node.inputs[1 - k]
            keeps = _broadcast_keeps(self.facts.shape(other), tuple(value.shape))
            if keeps:
                return self._remove(graph, node, other, "arith_removed")
            unknown |= keeps is None
        return self._flag("skipped_unknown_shape", node) if unknown else False

    def _slice(self, graph: gs.Graph, node: gs.Node) -> bool:
        if not node.inputs:
            return False
        if len(node.inputs) > 1:
            starts, ends = self._ints(_present(node, 1)), self._ints(_present(node, 2))
            axes_t, steps_t = _present(node, 3), _present(node, 4)
            axes = self._ints(axes_t) if axes_t is not None else None
            steps = self._ints(steps_t) if steps_t is not None else None
            if starts is None or ends is None or (axes_t is not None and axes is None) or \
                    (steps_t is not None and steps is None):
                return False
        else:
            if "starts" not in node.attrs or "ends" not in node.attrs:
                return False
            starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
            axes = list(node.attrs["axes"]) if "axes" in node.attrs else None
            steps = None
        axes = axes if axes is not None else list(range(len(starts)))
        steps = steps if steps is not None else [1] * len(starts)
        if not (len(starts) == len(ends) == len(axes) == len(steps)):
            return False
        if any(s != 1 for s in steps):
            return False
        shape = self.facts.shape(node.inputs[0])
        unknown = False
        for axis, start, end in zip(axes, starts, ends):
            if axis < 0:
                if shape is None:
                    unknown = True
                    continue
                axis += len(shape)
            dim = shape[axis] if shape is not None and 0 <= axis < len(shape) else None
            if start < 0 and (dim is None or start + dim > 0):
                unknown |= dim is None
                if dim is not None:
                    return False
                continue
            if start > 0:
                return False
            if dim is not None:
                if end < dim:
                    return False
            elif end < INT32_MAX:
                unknown = True
        if unknown:
            return self._flag("skipped_unknown_shape", node)
        return self._remove(graph, node, node.inputs[0], "slice_removed")

    def _concat(self, graph: gs.Graph, node: gs.Node) -> bool:
        return len(node.inputs) == 1 and self._remove(graph, node, node.inputs[0], "concat_removed")

    def _split(self, graph: gs.Graph, node: gs.Node) -> bool:
        return len(node.outputs) == 1 and bool(node.inputs) and \
            self._remove(graph, node, node.inputs[0], "split_removed")

    def _single_input(self, graph: gs.Graph, node: gs.Node) -> bool:
        return len(node.inputs) == 1 and self._remove(graph, node, node.inputs[0], "single_input_removed")

    def _where(self, graph: gs.Graph, node: gs.Node) -> bool:
        if len(node.inputs) != 3:
            return False
        cond = self._const(node.inputs[0])
        if cond is None or cond.dtype != np.bool_ or cond.size == 0:
            return False
        if cond.all():
            chosen, other = node.inputs[1], node.inputs[2]
        elif not cond.any():
            chosen, other = node.inputs[2], node.inputs[1]
        else:
            return False
        base = self.facts.shape(chosen)
        keeps = [_broadcast_keeps(base, tuple(cond.shape)), _broadcast_keeps(base, self.facts.shape(other))]
        if False in keeps:
            return False
        if None in keeps:
            return self._flag("skipped_unknown_shape", node)
        return self._remove(graph, node, chosen, "where_removed")
