"""Shape-computation folding over symbolic dims."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from onnxopt import graph as G
from onnxopt import shapes as S
from onnxopt.options import option
from onnxopt.pipeline import Pass, PassContext, PassResult, register_pass

_DEFAULT_DOMAINS = ("", "ai.onnx")
_INT_TYPES = (np.dtype(np.int64), np.dtype(np.int32))
# Recurrent ops and the input slots of their initial states (zero when absent).
_STATE_SLOTS = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}
_CONTRIB_STATE_SLOTS = {"DynamicQuantizeLSTM": (5, 6)}  # com.microsoft


@dataclass
class ShapeFoldOptions:
    merge_symbols: bool = option(False, help="let inference equate symbols that broadcasting needs equal (ORT auto_merge)")
    reshape_targets: bool = option(True, help="computed Reshape targets -> constants with 0 (copy) and -1 (infer)")
    transposes: bool = option(True, help="Transposes that move only size-1 dims -> Reshape")
    rnn_states: bool = option(True, help="all-zero initial states of LSTM/GRU/RNN -> omitted (the default is zero)")
    if_branches: bool = option(True, help="If whose condition is now known -> the nodes of the branch taken")


@register_pass
class ShapeFold(Pass):
    """Resolve shape computations with symbolic shape inference, batch/sequence dims left symbolic. Exact.

    Shapes and shape-tensor contents come from ONNX Runtime's symbolic shape inference
    (``onnxopt.shapes``), run on the main graph with large weights left out. Rewrites:

    - an integer value computed from shapes that is fully known (``Shape`` of a value whose
      dims are known, ``Gather``/``Slice``/arithmetic on known dims, a whole
      Shape->Gather->Unsqueeze->Concat chain) becomes a constant (``values_folded``);
    - a Reshape target computed from shapes becomes a constant when every element is known,
      copies the input dim at its position (``0``; not with ``allowzero=1``), or is the one
      element left to infer (``-1``) (``reshapes_resolved``);
    - an If whose condition is thereby known (a rank or a known dim compared with a constant)
      is replaced by the nodes of the branch it takes, its outputs by Identity nodes of the
      branch's outputs (``ifs_inlined``; ``dce`` then removes the Identities it can);
    - a Transpose that moves only size-1 dims becomes a Reshape (``transposes_to_reshape``),
      which ``noop`` then merges with neighbouring Reshapes;
    - all-zero initial states of LSTM/GRU/RNN and ORT's DynamicQuantizeLSTM (ConstantOfShape(0), zero constants, and zeros expanded, reshaped or concatenated, built
      by tf2onnx and torch exporters from the batch size) are dropped: the default is zero
      (``rnn_states_dropped``).

    The shape chains left without readers are removed by ``dce``. The main graph and the
    branches of its If nodes (nested ones too) are rewritten, each with what inference knew
    in it; bodies of Loop/Scan are left alone. Dims with the same name are equal (as
    ONNX says), except '?' and 'None', which exporters write for any unknown dim. When inference fails on the model
    (an op it does not know, conflicting symbols) nothing changes (``skipped_no_inference``);
    Reshape targets with two or more unknown elements stay (``reshapes_unresolved``).
    """

    name = "shape_fold"
    Options = ShapeFoldOptions
    leaves_dangling = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats = {"values_folded": 0, "ifs_inlined": 0, "reshapes_resolved": 0, "reshapes_unresolved": 0,
                 "transposes_to_reshape": 0, "rnn_states_dropped": 0, "skipped_no_inference": 0}
        if self.options.rnn_states:
            _drop_zero_states(graph, stats)
        if not any(n.op in ("Shape", "Size", "Reshape", "Transpose") for n in G.find_nodes(graph)):
            return PassResult(stats["rnn_states_dropped"] > 0, stats)
        info = _infer(graph, self.options.merge_symbols)
        if info is None:
            stats["skipped_no_inference"] = 1
            return PassResult(stats["rnn_states_dropped"] > 0, stats)
        names = G.Names(graph)
        for scope, scope_info in _scopes(graph, info):
            self._rewrite(scope, scope_info, names, stats)
        modified = any(v for k, v in stats.items() if k not in ("reshapes_unresolved", "skipped_no_inference"))
        return PassResult(modified, stats)


    def _rewrite(self, graph: gs.Graph, info: S.SymbolicShapes, names: G.Names, stats: dict) -> None:
        if self.options.reshape_targets:
            _resolve_reshapes(graph, info, names, stats)
        if self.options.transposes:
            _transposes_to_reshape(graph, info, names, stats)
        _fold_known_values(graph, info, names, stats)
        if self.options.if_branches:
            _inline_known_ifs(graph, names, stats)


def _scopes(graph: gs.Graph, info: S.SymbolicShapes) -> list[tuple[gs.Graph, S.SymbolicShapes]]:
    """The graph and, innermost first, the If branches inference went into, each with what
    inference knew there (a branch's values hold whichever way the condition goes).
    Inner scopes come first: an If they inline may sit in a branch the outer scope inlines."""
    found: list[tuple[gs.Graph, S.SymbolicShapes]] = []
    for node in list(graph.nodes):
        if node.op != "If" or not _default(node) or not node.outputs:
            continue
        for attr in ("then_branch", "else_branch"):
            branch, branch_info = node.attrs.get(attr), info.branch(node.outputs[0].name, attr)
            if isinstance(branch, gs.Graph) and branch_info is not None:
                found.extend(_scopes(branch, branch_info))
    found.append((graph, info))
    return found


def _default(node: gs.Node) -> bool:
    return (node.domain or "") in _DEFAULT_DOMAINS


def _infer(graph: gs.Graph, merge_symbols: bool) -> Optional[S.SymbolicShapes]:
    """Inference on an export of the graph whose large constants carry dims but no data."""
    if not G.is_sorted(graph):
        graph.toposort()
    try:
        model, _stubs = G.export_onnx(graph)
    except Exception:  # noqa: BLE001 - a graph gs cannot export: no knowledge
        return None
    model.ir_version = min(model.ir_version or 10, 10)
    _stubs_as_inputs(model.graph, set(vars(graph).get("initializer_inputs") or ()))
    _unknown_dims_apart(model.graph)
    return S.infer(model, merge_symbols)


def _unknown_dims_apart(graph: onnx.GraphProto) -> None:
    """Dims named '?' (or 'None') mean "unknown", not "equal to every other '?'": name each apart."""
    count = 0
    for value in graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param.strip() in ("?", "None", ""):
                count += 1
                dim.dim_param = f"onnxopt_unknown_{count}"


def _stubs_as_inputs(graph: onnx.GraphProto, overridable: set[str]) -> None:
    """Large constants were exported with dims but no data: declare them as graph inputs, so
    inference knows their shapes and never tries to read their values. Initializers a caller
    may override are inputs too: their values are not fixed."""
    def stub(t: onnx.TensorProto) -> bool:
        return t.doc_string.startswith(G.STUB_MARK) or t.name in overridable

    kept = [t for t in graph.initializer if not stub(t)]
    listed = {i.name for i in graph.input}
    graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for t in graph.initializer if stub(t) and t.name not in listed)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = []
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
        if node.op_type == "Constant" and value is not None and stub(value):
            graph.input.append(helper.make_tensor_value_info(node.output[0], value.data_type, list(value.dims)))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _const(graph: gs.Graph, names: G.Names, base: str, values: Any, dtype: np.dtype) -> gs.Tensor:
    return G.new_constant(graph, names, base, np.asarray(values, dtype=dtype))


# ----------------------------------------------------------------- Reshape targets

def _resolve_reshapes(graph: gs.Graph, info: S.SymbolicShapes, names: G.Names, stats: dict) -> None:
    for node in graph.nodes:
        if node.op != "Reshape" or not _default(node) or len(node.inputs) < 2:
            continue
        target = node.inputs[1]
        if isinstance(target, gs.Constant) or G.const_value(target) is not None:
            continue
        value = info.value(target.name)
        if not isinstance(value, list):
            continue
        source = info.shape(node.inputs[0].name) or []
        resolved = _reshape_target(value, source, allow_copy=not node.attrs.get("allowzero", 0))
        if resolved is None:
            stats["reshapes_unresolved"] += 1
            continue
        dtype = _dtype(target, info) if _dtype(target, info) in _INT_TYPES else np.dtype(np.int64)
        node.inputs[1] = _const(graph, names, f"{target.name}_resolved", resolved, dtype)
        stats["reshapes_resolved"] += 1


def _reshape_target(value: list, source: list, allow_copy: bool) -> Optional[list[int]]:
    """Known elements as they are, input dims copied in place as 0, one unknown as -1; else None."""
    out: list[Optional[int]] = []
    for i, element in enumerate(value):
        known = S.as_int(element)
        if known is not None:
            out.append(known)
        elif allow_copy and i < len(source) and S.same(element, source[i]):
            out.append(0)
        else:
            out.append(None)
    if sum(1 for v in out if v is None or v == -1) > 1:
        return None
    return [-1 if v is None else v for v in out]


# ----------------------------------------------------------------- Transposes

def _transposes_to_reshape(graph: gs.Graph, info: S.SymbolicShapes, names: G.Names, stats: dict) -> None:
    for node in list(graph.nodes):
        if node.op != "Transpose" or not _default(node):
            continue
        dims = info.shape(node.inputs[0].name)
        if not dims or any(d is None for d in dims):
            continue
        perm = list(node.attrs.get("perm") or reversed(range(len(dims))))
        moved = [p for p in perm if S.as_int(dims[p]) != 1]
        if moved != sorted(moved) or perm == sorted(perm):
            continue  # the data order changes (or it is an identity, noop's job)
        target = _reshape_target([dims[p] for p in perm], dims, allow_copy=True)
        if target is None:
            continue
        node.op = "Reshape"
        node.attrs = {}
        node.inputs.append(_const(graph, names, f"{node.outputs[0].name}_shape", target, np.dtype(np.int64)))
        stats["transposes_to_reshape"] += 1


# ----------------------------------------------------------------- known values

def _fold_known_values(graph: gs.Graph, info: S.SymbolicShapes, names: G.Names, stats: dict) -> None:
    known: dict[str, np.ndarray] = {}
    for node in graph.nodes:
        if node.op == "Constant" or not _default(node):
            continue
        for out in node.outputs:
            array = _known_array(out, info)
            if array is not None:
                known[out.name] = array
    interface = {id(t) for t in graph.outputs}
    for node in list(graph.nodes):
        for out in node.outputs:
            if out.name not in known or id(out) in interface:
                continue
            readers = [c for c in list(out.outputs) if not all(o.name in known for o in c.outputs)]
            if not readers:
                continue
            const = _const(graph, names, f"{out.name}_value", known[out.name], known[out.name].dtype)
            for reader in readers:
                G.rewire_input(reader, out, const)
            stats["values_folded"] += 1


def _known_array(tensor: gs.Tensor, info: S.SymbolicShapes) -> Optional[np.ndarray]:
    """The tensor's value when it is an int64/int32 shape value that inference fully knows."""
    if not isinstance(tensor, gs.Variable):
        return None
    dtype = _dtype(tensor, info)
    if dtype not in _INT_TYPES and dtype != np.dtype(np.bool_):
        return None
    value, shape = info.value(tensor.name), info.shape(tensor.name)
    if value is None or shape is None:
        return None
    items = value if isinstance(value, list) else [value]
    ints = [S.as_bool(v) if dtype == np.dtype(np.bool_) else S.as_int(v) for v in items]
    if any(v is None for v in ints):
        return None
    if shape == [] and len(ints) == 1:  # a scalar (a Squeeze of a 1-element value may keep a list)
        return np.asarray(ints[0], dtype=dtype)
    if isinstance(value, list) and len(shape) == 1 and S.as_int(shape[0]) == len(ints):
        return np.asarray(ints, dtype=dtype)
    return None


def _dtype(tensor: gs.Tensor, info: S.SymbolicShapes) -> Optional[np.dtype]:
    """The tensor's element type: declared, else inferred."""
    if tensor.dtype is not None:
        return np.dtype(tensor.dtype) if isinstance(tensor.dtype, (type, np.dtype)) else None
    elem = info.types.get(tensor.name)
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem)) if elem else None
    except (KeyError, TypeError, ValueError):
        return None


# ----------------------------------------------------------------- RNN states

def _drop_zero_states(graph: gs.Graph, stats: dict) -> None:
    for node in graph.nodes:
        slots = (_STATE_SLOTS.get(node.op) if _default(node)
                 else _CONTRIB_STATE_SLOTS.get(node.op) if node.domain == "com.microsoft" else None)
        for slot in slots or ():
            if slot < len(node.inputs) and node.inputs[slot].name and _all_zero(node.inputs[slot]):
                node.inputs[slot] = gs.Variable.empty()
                stats["rnn_states_dropped"] += 1
        while node.op in _STATE_SLOTS and node.inputs and not node.inputs[-1].name:
            node.inputs.pop()  # trailing empty inputs may go


# Ops whose output is all zero when their data input(s) are: moves, copies, broadcasts.
_ZERO_KEEPING = {"Expand", "Tile", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Cast", "Transpose"}


def _all_zero(tensor: gs.Tensor, depth: int = 0) -> bool:
    """Whether a value is all zeros whatever the inputs: ConstantOfShape(0), a zero constant,
    or zeros moved, broadcast or concatenated (tf2onnx builds states as Concat(Unsqueeze(Expand(0))))."""
    maker = G.producer(tensor)
    if maker is not None and _default(maker) and depth < 16:
        if maker.op == "ConstantOfShape":
            fill = maker.attrs.get("value")
            if fill is None:
                return True
            fill = G.const_value(fill) if isinstance(fill, gs.Constant) else np.asarray(fill)
            return fill is not None and not np.any(fill)
        if maker.op in _ZERO_KEEPING and maker.inputs:
            return _all_zero(maker.inputs[0], depth + 1)
        if maker.op == "Concat" and maker.inputs:
            return all(_all_zero(t, depth + 1) for t in maker.inputs)
    value = G.const_value(tensor, max_elems=1 << 16)
    return value is not None and value.size > 0 and not np.any(value)


# ----------------------------------------------------------------- If with a known condition

def _inline_known_ifs(graph: gs.Graph, names: G.Names, stats: dict) -> None:
    for node in list(graph.nodes):
        if node.op != "If" or not _default(node) or not node.inputs:
            continue
        cond = G.const_value(node.inputs[0], vars(graph).get("initializer_inputs") or ())
        if cond is None or cond.size != 1:
            continue
        branch = node.attrs.get("then_branch" if bool(cond.reshape(-1)[0]) else "else_branch")
        if not isinstance(branch, gs.Graph) or branch.inputs or len(branch.outputs) != len(node.outputs):
            continue
        at = G.positions(graph.nodes, node)[0]
        results, made = list(node.outputs), list(branch.nodes)
        G.remove_node(graph, node)  # detaches the If's outputs
        for result, inner in zip(results, branch.outputs):
            made.append(gs.Node("Identity", names.fresh(f"{result.name}_branch"), {}, [inner], [result]))
        graph.nodes[at:at] = made
        stats["ifs_inlined"] += 1
