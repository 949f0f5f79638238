"""Which nodes qdq quantizes, which tensors get a Q/DQ pair, and which share another's scale."""

from __future__ import annotations

from collections import Counter
from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt import layers as L

from .options import (_FOLDED, _NEEDS_OUTPUT_Q, _SHAPE_OPS, _SHARE_SCALE, _WEIGHTED, DEFAULT_OP_TYPES, QdqOptions)


class Plan:
    """Which nodes are quantized, which tensors get a Q/DQ pair, which share another's scale."""

    def __init__(self, graph: gs.Graph, o: QdqOptions, skips: Counter, keep_float: frozenset = frozenset()) -> None:
        self.graph = graph
        self.skips = skips
        explicit_ops = list(o.op_types) != DEFAULT_OP_TYPES
        ops = set(o.op_types)
        self.transformer = not explicit_ops and _transformer_like(graph)
        outputs = {id(t) for t in graph.outputs}
        overridable = set(vars(graph).get("initializer_inputs", []))
        for sub in list(G.iter_graphs(graph))[1:]:
            skips["subgraph"] += sum(1 for n in sub.nodes if n.op in ops and (n.domain or "") in ("", "ai.onnx"))

        self.nodes: list[gs.Node] = []          # quantized compute nodes, in graph order
        self.act_inputs: dict[int, list[int]] = {}  # id(node) -> input slots read through DQ
        self.tensors: dict[int, gs.Tensor] = {}  # id -> tensor that gets a Q/DQ pair
        self.all_consumers: set[int] = set()     # ids of tensors whose every reader reads the DQ
        self.readers: dict[int, set[int]] = {}   # id(tensor) -> ids of nodes that read its DQ
        self.share_of: dict[int, Optional[gs.Tensor]] = {}  # id(tensor) -> root tensor whose scale it takes
        self.folded = 0
        self.folded_ids: set[int] = set()       # Relu/Clip outputs that took their producer's place
        self.weights: dict[int, tuple[np.ndarray, int]] = {}  # id(node) -> (float weight, axis)
        self.shared_nodes: list[gs.Node] = []   # MaxPool/Resize run on 8-bit data between quantized tensors
        self.weight_only: list[gs.Node] = []    # int8 weights (read as Cast * scale), float activations

        self.position: dict[int, int] = {}       # id(node) -> index in graph.nodes (stable: Q/DQ are appended)
        for pos, node in enumerate(graph.nodes):
            if node.op not in ops or (node.domain or "") not in ("", "ai.onnx"):
                continue
            asked = bool(o.weight_only) and not L.left_out([node.name or ""], (), o.weight_only)
            if pos in keep_float or asked:
                # returned to float by the accuracy guard: its activations, or (fallback=float) all of it
                if (asked or o.fallback == "weights") and node.op in _WEIGHTED and not L.left_out([node.name or ""], o.exclude, o.only) \
                        and self._activation_slots(node, overridable, Counter()) == [0] and id(node) in self.weights:
                    self.weight_only.append(node)
                continue
            if node.op in _SHARE_SCALE:
                continue  # quantized only between quantized tensors (see _share_chains)
            if L.left_out([node.name or ""], o.exclude, o.only):
                skips["excluded"] += 1
                continue
            slots = self._activation_slots(node, overridable, skips)
            if slots is None:
                continue
            if not all(_float32_or_unknown(node.inputs[s]) for s in slots) or not _float32_or_unknown(node.outputs[0]):
                skips["dtype"] += 1
                self.weights.pop(id(node), None)
                continue
            self.nodes.append(node)
            self.position[id(node)] = pos
            self.act_inputs[id(node)] = slots
            for s in slots:
                self._want(node.inputs[s], node)
            if node.op in _NEEDS_OUTPUT_Q:
                out = self._fold(node.outputs[0], outputs)
                self._want(out, None)
                self.all_consumers.add(id(out))
        self._share_chains(ops, o.exclude, o.only)

    def _activation_slots(self, node: gs.Node, overridable: set, skips: Counter) -> Optional[list[int]]:
        op = node.op
        if op in _WEIGHTED:
            if len(node.inputs) < 2 or not _is_activation(node.inputs[0]):
                skips["dynamic_weight" if op != "MatMul" else "constant_input"] += 1
                return None
            if node.op in ("Conv", "ConvTranspose", "Gemm") and _feeds_batchnorm(node):
                skips["batchnorm_not_folded"] += 1  # run fold_bn (cleanup) first: Conv -> BN cannot fuse
                return None
            w_tensor = node.inputs[1]
            found = L.resolve_weight(w_tensor)  # overridable weights are counted below, by name
            w = found.array() if isinstance(found, L.Weight) and not found.transposed else None  # Transpose: fold first
            if w is None:
                if _foldable(w_tensor):
                    skips["weight_not_folded"] += 1  # run fold (cleanup) first
                    return None
                if op == "MatMul" and _is_activation(w_tensor):
                    if self.transformer:
                        skips["fragile"] += 1
                        return None
                    return [0, 1]
                skips["dynamic_weight"] += 1
                return None
            if w_tensor.name in overridable:
                skips["overridable_weight"] += 1
                return None
            if w.dtype != np.float32:
                skips["weight_dtype"] += 1
                return None
            axis = L.weight_axis(node.op, w.ndim, bool(int(node.attrs.get("transB", 0))))
            if axis is None:
                skips["weight_rank"] += 1
                return None
            self.weights[id(node)] = (w, axis)
            return [0]
        if op in ("Add", "Mul"):
            if len(node.inputs) != 2 or not all(_is_activation(t) for t in node.inputs):
                skips["constant_input"] += 1
                return None
            if self.transformer:
                skips["fragile"] += 1
                return None
            if node.inputs[0] is node.inputs[1]:
                return [0, 1]
            return [0, 1]
        if op == "Concat":
            if not node.inputs or not all(_is_activation(t) for t in node.inputs):
                skips["constant_input"] += 1
                return None
            return list(range(len(node.inputs)))
        if op in ("AveragePool", "GlobalAveragePool"):
            return [0] if node.inputs and _is_activation(node.inputs[0]) else None
        return None

    def _fold(self, out: gs.Tensor, graph_outputs: set) -> gs.Tensor:
        """A Relu/Clip that is the only reader of ``out`` takes its place (its range is what ORT quantizes)."""
        readers = list(out.outputs)
        if len(readers) == 1 and readers[0].op in _FOLDED and (readers[0].domain or "") in ("", "ai.onnx") \
                and readers[0].inputs and readers[0].inputs[0] is out and id(out) not in graph_outputs:
            act = readers[0]
            if act.op == "Clip" and not all(_is_const(t) for t in act.inputs[1:] if t.name):
                return out
            if id(act.outputs[0]) in graph_outputs:
                return out
            self.folded += 1
            self.folded_ids.add(id(act.outputs[0]))
            return act.outputs[0]
        return out

    def _want(self, tensor: gs.Tensor, reader: Optional[gs.Node]) -> None:
        self.tensors[id(tensor)] = tensor
        self.share_of.setdefault(id(tensor), None)
        if reader is not None:
            self.readers.setdefault(id(tensor), set()).add(id(reader))

    def _share_chains(self, ops: set, exclude: list[str], only: list[str] = ()) -> None:
        """Inputs of quantized nodes made by shape ops (and MaxPool/Resize) from a quantized tensor
        take that tensor's scale, every link of the chain quantized, so ORT runs the chain on 8-bit data."""
        for tensor in list(self.tensors.values()):
            chain: list[tuple[gs.Node, gs.Tensor]] = []
            t = tensor
            while True:
                maker = G.producer(t)
                if maker is None or (maker.domain or "") not in ("", "ai.onnx") or not maker.inputs:
                    break
                if not (maker.op in _SHAPE_OPS or (maker.op in _SHARE_SCALE and maker.op in ops)):
                    break
                if L.left_out([maker.name or ""], exclude, only):
                    break
                if maker.op == "Resize" and len(maker.outputs) != 1:
                    break
                src = maker.inputs[0]
                if not _is_activation(src) or len(maker.outputs) != 1 or maker.outputs[0] is not t:
                    break
                chain.append((maker, src))
                t = src
            if not chain:
                continue
            root = t
            if id(root) not in self.tensors:
                continue  # the chain starts at a float tensor: the last link calibrates itself
            for maker, src in chain:
                out = maker.outputs[0]
                if out is not tensor:
                    self.tensors[id(out)] = out
                self.share_of[id(out)] = root
                self.readers.setdefault(id(src), set()).add(id(maker))
                if maker.op in _SHARE_SCALE:
                    self.shared_nodes.append(maker)

    def drop_tensors(self, names: set) -> None:
        """Leave float every node one of whose quantized tensors turned out not to be float32."""
        if not names:
            return
        bad = {id(t) for t in self.tensors.values() if t.name in names}
        bad |= {key for key, root in self.share_of.items() if root is not None and id(root) in bad}
        keep = []
        for node in self.nodes:
            touched = [node.inputs[s] for s in self.act_inputs[id(node)]]
            if node.op in _NEEDS_OUTPUT_Q:
                touched.append(node.outputs[0])
            if any(id(t) in bad for t in touched):
                self.skips["dtype"] += 1
                for t in touched:
                    self.readers.get(id(t), set()).discard(id(node))
                continue
            keep.append(node)
        self.nodes = keep
        for key in bad:
            self.tensors.pop(key, None)
            self.all_consumers.discard(key)


# ----------------------------------------------------------------- writing


def _transformer_like(graph: gs.Graph) -> bool:
    ops = {n.op for n in graph.nodes}
    return bool(ops & {"Softmax", "LayerNormalization", "Attention", "SkipLayerNormalization"}) or (
        "ReduceMean" in ops and bool(ops & {"Pow", "Sqrt"}))


def _feeds_batchnorm(node: gs.Node) -> bool:
    readers = list(node.outputs[0].outputs) if node.outputs else []
    return len(readers) == 1 and readers[0].op == "BatchNormalization"


def _foldable(tensor: gs.Tensor, depth: int = 0) -> bool:
    """A value computed from constants only by a short chain of layout ops (an unfolded weight)."""
    maker = G.producer(tensor)
    if maker is None or depth > 4 or maker.op not in ("Transpose", "Reshape", "Identity", "Cast", "Unsqueeze",
                                                       "Squeeze", "Flatten"):
        return False
    src = maker.inputs[0] if maker.inputs else None
    return src is not None and (_is_const(src) or _foldable(src, depth + 1)) and all(
        _is_const(t) for t in maker.inputs[1:] if t.name)


def _float32_or_unknown(tensor: gs.Tensor) -> bool:
    dtype = getattr(tensor, "dtype", None)
    if dtype is None:
        return True
    try:
        return np.dtype(dtype) == np.float32
    except TypeError:
        return False


def _is_activation(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Variable) and bool(tensor.name) and not _is_const(tensor)


def _dq_source(tensor: gs.Tensor) -> Optional[gs.Tensor]:
    """The float tensor a DequantizeLinear output stands for (the input of its QuantizeLinear)."""
    dq = G.producer(tensor)
    if dq is None or dq.op != "DequantizeLinear":
        return None
    q = G.producer(dq.inputs[0])
    if q is None or q.op != "QuantizeLinear":
        return None
    return q.inputs[0]


def _is_const(tensor: Optional[gs.Tensor]) -> bool:
    """Whether a tensor has a fixed value, without loading it."""
    return G.constant_source(tensor) is not None
