"""What each graph output is, read from the graph (and, where it says nothing, from the data).

Kinds decide which figures fit an output:

- ``classes``: one vector of class scores per sample (``[B, C]``): top-1 agreement,
  accuracy against class labels.
- ``sequence``: class scores per position (``[B, T, C]`` or ``[T, B, C]``: CTC heads, token
  logits, per-pixel classes): per-position argmax agreement and the share of samples
  whose whole argmax sequence agrees.
- ``lm``: a sequence whose classes are the vocabulary read by a token-id input (a language
  model's logits): as ``sequence``, plus next-token perplexity when text ids are given as labels.
- ``embedding``: vectors compared by direction: cosine, overall and per vector.
- ``other``: boxes, regressions, probability maps, states, ids: error figures and SNR only.

Every kind also gets the element-wise error figures. The reason for each decision is kept
for the report, and the user can override any of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import onnx

KINDS = ("classes", "sequence", "lm", "embedding", "other")
CLASS_KINDS = ("classes", "sequence", "lm")

# ops that keep what a tensor is (layout, scale or type only) when walking back from an output
_PASS_THROUGH = {"Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Dropout",
                 "CastLike", "Expand"}
_AFFINE = {"Add", "Sub", "Mul"}  # with a constant operand: a bias or scale after the op that decides
_SOFTMAX = {"Softmax", "LogSoftmax"}
_NORMALIZE = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
              "SkipSimplifiedLayerNormalization", "LpNormalization", "GroupNormalization", "RMSNormalization"}
_POOL = {"ReduceMean", "GlobalAveragePool", "GlobalMaxPool", "ReduceMax"}
_LINEAR = {"Gemm", "MatMul", "MatMulInteger", "MatMulNBits", "QGemm", "QLinearMatMul", "FusedMatMul"}
_ML_CLASSIFIERS = {"TreeEnsembleClassifier", "LinearClassifier", "SVMClassifier", "Normalizer", "ZipMap"}
_OTHER_OPS = {"Sigmoid", "Concat", "LSTM", "GRU", "RNN", "If", "Loop", "Scan", "TreeEnsembleRegressor",
              "LinearRegressor", "SVMRegressor", "Clip", "Relu", "Tanh", "NonMaxSuppression", "Resize"}

_CLASS_NAME = re.compile(r"logit|score|prob|class|cls|softmax|predict", re.I)
_EMBED_NAME = re.compile(r"embed|hidden|pool|feature|vector|encod|sentence", re.I)
_BATCH_DIM = re.compile(r"batch|^n$|^b$|^bs$", re.I)
_IDS_NAME = re.compile(r"ids|token", re.I)


@dataclass
class OutputKind:
    """How one output is judged: its kind, the axes that matter, and why."""

    name: str
    kind: str = "other"
    reason: str = "nothing in the graph says it holds class scores or vectors"
    class_axis: int = -1
    batch_axis: int = 0
    decided_by: str = "graph"  # graph | data | user
    batch_named: bool = False  # the batch axis comes from a dim name, which the data does not overrule

    def describe(self) -> str:
        return f"{self.kind} ({self.reason})"


# ----------------------------------------------------------------- the graph

class _Graph:
    def __init__(self, graph: onnx.GraphProto, opset: int) -> None:
        self.opset = opset
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.constants = {t.name for t in graph.initializer}
        self.constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
        self.inputs = [v for v in graph.input if v.name not in self.constants]
        self.tables = {t.name: list(t.dims) for t in graph.initializer}

    def const(self, name: str) -> bool:
        return name in self.constants or (name in self.producer and self.producer[name].op_type in ("Constant",))

    def walk(self, name: str) -> tuple[Optional[onnx.NodeProto], list[onnx.NodeProto]]:
        """The op that decides what ``name`` holds, and the pass-through ops on the way."""
        path = []
        for _ in range(64):
            node = self.producer.get(name)
            if node is None:
                return None, path
            if node.op_type in _PASS_THROUGH and node.input:
                path.append(node)
                name = node.input[0]
            elif node.op_type in _AFFINE and len(node.input) == 2 and self._one_const(node):
                path.append(node)
                name = node.input[1] if self.const(node.input[0]) else node.input[0]
            elif node.op_type == "Mul" and self._integer_product(node) is not None:
                path.append(node)  # dequantizing an integer MatMul/Conv by a computed scale
                name = self._integer_product(node)
            else:
                return node, path
        return None, path

    def _integer_product(self, node: onnx.NodeProto) -> Optional[str]:
        """The input of a Mul that is Cast(MatMulInteger | ConvInteger): dynamic quantization's output."""
        for name in node.input:
            cast = self.producer.get(name)
            if cast is not None and cast.op_type == "Cast" and cast.input:
                source = self.producer.get(cast.input[0])
                if source is not None and source.op_type in ("MatMulInteger", "ConvInteger"):
                    return name
        return None

    def _one_const(self, node: onnx.NodeProto) -> bool:
        return self.const(node.input[0]) != self.const(node.input[1])

    def is_softmax_div(self, node: onnx.NodeProto) -> bool:
        """Div(Exp(x), ReduceSum(Exp(x))): a softmax written out."""
        if node.op_type != "Div" or len(node.input) != 2:
            return False
        num, den = self.producer.get(node.input[0]), self.producer.get(node.input[1])
        return bool(num is not None and den is not None and num.op_type == "Exp" and den.op_type == "ReduceSum")

    def is_normalize_div(self, node: onnx.NodeProto) -> bool:
        """Div(x, norm) with the divisor a root, norm or mean: LayerNorm or L2 normalization written out."""
        if node.op_type != "Div" or len(node.input) != 2:
            return False
        den, _ = self.walk(node.input[1])
        return den is not None and den.op_type in {"Sqrt", "ReduceL2", "Max", "Clip", "ReduceMean", "Pow",
                                                   "ReduceSumSquare", "Expand"}

    def vocab_sizes(self) -> set[int]:
        """Rows of the tables that integer graph inputs index (token embeddings)."""
        sizes = set()
        int_inputs = {v.name for v in self.inputs
                      if v.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)}
        for name in int_inputs:
            for node in self._reach(name):
                if node.op_type == "Gather" and node.input[0] in self.tables and len(self.tables[node.input[0]]) == 2:
                    sizes.add(self.tables[node.input[0]][0])
        return sizes

    def _reach(self, name: str, depth: int = 4) -> list[onnx.NodeProto]:
        found, frontier = [], [name]
        for _ in range(depth):
            nxt = []
            for t in frontier:
                for n in self.consumers.get(t, []):
                    found.append(n)
                    if n.op_type in _PASS_THROUGH:
                        nxt.extend(n.output)
            frontier = nxt
        return found

    def attr(self, node: onnx.NodeProto, key: str, default: Any) -> Any:
        for a in node.attribute:
            if a.name == key:
                return onnx.helper.get_attribute_value(a)
        return default


def _shape(value: onnx.ValueInfoProto) -> Optional[list]:
    t = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def _float(value: onnx.ValueInfoProto) -> bool:
    return value.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                                                onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def _mapped_axis(axis: int, rank: int, path: list[onnx.NodeProto], g: _Graph) -> int:
    """The class axis as the output sees it, through Transposes between the decider and the output;
    -1 (last) when a reshape on the way makes it unknowable."""
    axis = axis % rank if rank else -1
    for node in reversed(path):  # path runs from the output back; replay it forwards
        if node.op_type == "Transpose":
            perm = list(g.attr(node, "perm", list(range(rank)))[::1])
            if axis in perm:
                axis = perm.index(axis)
        elif node.op_type not in ("Identity", "Cast", "Dropout", "CastLike", "Add", "Sub", "Mul"):
            return -1
    return axis


def _batch_axis(shape: list) -> Optional[int]:
    for i, d in enumerate(shape[:2]):
        if isinstance(d, str) and _BATCH_DIM.search(d):
            return i
    return None


def input_batch_axes(model: onnx.ModelProto) -> dict[str, int]:
    """Per graph input, the axis a dim name marks as the batch (time-major inputs: 1), else 0."""
    return {v.name: _batch_axis(_shape(v) or []) or 0 for v in model.graph.input}


def _class_kind(value: onnx.ValueInfoProto, shape: list, vocab: set[int], g: _Graph) -> str:
    if len(shape) <= 2:
        return "classes"
    last = shape[-1]
    if isinstance(last, int) and last in vocab:
        return "lm"
    if vocab and _CLASS_NAME.search(value.name) and any(_IDS_NAME.search(v.name) for v in g.inputs):
        return "lm" if not isinstance(last, int) else "sequence"
    return "sequence"


def detect(model: onnx.ModelProto) -> dict[str, OutputKind]:
    """Each graph output's kind, from the graph alone (``decided_by='graph'``; undecided ones are
    ``other`` with ``decided_by='none'`` so that the data may still decide)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    g = _Graph(model.graph, opset)
    vocab = g.vocab_sizes()
    return {v.name: _detect_one(v, g, vocab) for v in model.graph.output}


def _detect_one(value: onnx.ValueInfoProto, g: _Graph, vocab: set[int]) -> OutputKind:
    shape = _shape(value)
    out = OutputKind(value.name)
    from .kv import kv_role  # a cache tensor is state, whatever produced it

    role = kv_role(value.name)
    if role is not None:
        out.reason = f"KV cache (layer {role[0]}, {role[1]})"
        return out
    if not _float(value):
        out.reason = "not float: compared value by value"
        return out
    if shape is None or len(shape) < 2:
        out.reason, out.decided_by = "rank below 2 or unknown", "none"
        return out
    rank = len(shape)
    named = _batch_axis(shape) if rank > 2 else None
    out.batch_axis, out.batch_named = named or 0, named is not None
    node, path = g.walk(value.name)
    verdict = _from_consumers(value.name, g, rank) or _from_producer(node, path, g, rank)
    if verdict is None:
        verdict = _from_name(value.name, shape, node)
    if verdict is None:
        out.decided_by = "none"
        return out
    kind, axis, reason = verdict
    if kind == "classes":
        kind = _class_kind(value, shape, vocab, g)
        if kind == "lm":
            reason += f"; {shape[-1]} classes = the vocabulary a token-id input indexes"
    classes = shape[axis] if -rank <= axis < rank else None
    if kind != "other" and isinstance(classes, int) and classes < 2:
        out.reason = f"{reason}, but one value per {'position' if rank > 2 else 'sample'}"
        return out
    out.kind, out.class_axis, out.reason = kind, axis, reason
    return out


def _from_consumers(name: str, g: _Graph, rank: int) -> Optional[tuple[str, int, str]]:
    for node in g.consumers.get(name, []):
        if node.op_type in _SOFTMAX | {"ArgMax", "TopK"}:
            axis = g.attr(node, "axis", -1 if node.op_type != "ArgMax" else 0)
            if node.op_type in _SOFTMAX and g.opset < 13:
                axis = -1
            return "classes", axis % rank - rank, f"the graph also feeds it to {node.op_type}"
    return None


def _from_producer(node: Optional[onnx.NodeProto], path: list, g: _Graph, rank: int) -> Optional[tuple[str, int, str]]:
    if node is None:
        return None
    op = node.op_type
    if op in _SOFTMAX or g.is_softmax_div(node):
        axis = g.attr(node, "axis", -1 if g.opset >= 13 else 1) if op in _SOFTMAX else -1
        if op in _SOFTMAX and g.opset < 13:
            axis = -1  # before opset 13 Softmax flattens from `axis` on: per row of the last axis in practice
        if op == "Div":
            reduce = g.producer[node.input[1]]
            axes = g.attr(reduce, "axes", None)
            axis = axes[0] if axes else -1
        mapped = _mapped_axis(axis, rank, path, g)
        what = op if op in _SOFTMAX else "a softmax written as Exp / ReduceSum"
        return "classes", mapped - rank if mapped >= 0 else -1, f"made by {what}"
    if op in _ML_CLASSIFIERS:
        return "classes", -1, f"made by the classifier op {op}"
    if op in _NORMALIZE or g.is_normalize_div(node):
        return "embedding", -1, f"made by {op if op in _NORMALIZE else 'a division by a norm'} (normalized vectors)"
    if op in _POOL:
        return "embedding", -1, f"made by {op} (pooled vectors)"
    if op in _OTHER_OPS:
        return "other", -1, f"made by {op}"
    if op in _LINEAR and rank == 2:
        return "classes", -1, f"a final {op} to N outputs"
    return None


def _from_name(name: str, shape: list, node: Optional[onnx.NodeProto]) -> Optional[tuple[str, int, str]]:
    if _EMBED_NAME.search(name):
        return "embedding", -1, "named like an embedding"
    if _CLASS_NAME.search(name):
        return "classes", -1, "named like class scores"
    return None


# ----------------------------------------------------------------- the data

def refine(kind: OutputKind, first: Any, rows: Optional[int], labels: Optional[np.ndarray]) -> OutputKind:
    """Decide an output the graph said nothing about from its first batch in the original:
    rows of probabilities (or log-probabilities) are class scores, unit-norm rows are embeddings.
    Also places the batch axis of a rank-3 output by the batch size when the graph left it open."""
    array = np.asarray(first)
    if kind.decided_by == "user" or array.dtype.kind != "f" or array.ndim < 2:
        return kind
    if kind.kind != "other" and array.shape[kind.class_axis % array.ndim] < 2:
        kind.kind, kind.reason = "other", f"{kind.reason}, but one value per row at run time"
        return kind
    if kind.kind in ("classes", "sequence") and (array.ndim > 2) != (kind.kind == "sequence"):
        kind.kind = "sequence" if array.ndim > 2 else "classes"  # the declared rank was wrong
        kind.reason += f"; rank {array.ndim} at run time"
    if kind.kind in CLASS_KINDS and array.ndim == 3 and rows and not kind.batch_named:
        if array.shape[kind.batch_axis] != rows and array.shape[1 - kind.batch_axis] == rows:
            kind.batch_axis = 1 - kind.batch_axis
    if kind.decided_by != "none" or array.shape[-1] < 2:
        return kind
    flat = array.reshape(-1, array.shape[-1]).astype(np.float64)
    if not np.isfinite(flat).all() or flat.size == 0:
        return kind
    sums = flat.sum(axis=1)
    kinds = "classes" if array.ndim == 2 else "sequence"
    if flat.min() >= 0 and flat.max() <= 1 and np.allclose(sums, 1, atol=1e-3):
        _set(kind, kinds, "its rows are probabilities (in [0, 1], summing to 1)")
    elif flat.max() <= 0 and np.allclose(np.exp(flat).sum(axis=1), 1, atol=1e-3):
        _set(kind, kinds, "its rows are log-probabilities")
    elif np.allclose(np.linalg.norm(flat, axis=1), 1, atol=1e-3):
        _set(kind, "embedding", "its rows are unit vectors")
    elif (labels is not None and array.ndim == 2 and np.ndim(labels) == 1 and np.asarray(labels).dtype.kind in "iu"
          and len(labels) and 0 <= np.min(labels) and np.max(labels) < array.shape[1]):
        _set(kind, "classes", "class labels in its range were given")
    return kind


def _set(kind: OutputKind, name: str, reason: str) -> None:
    kind.kind, kind.reason, kind.decided_by, kind.class_axis = name, reason, "data", -1


def override(kinds: dict[str, OutputKind], chosen: Optional[dict[str, str]]) -> dict[str, OutputKind]:
    """Apply the user's ``output_kinds`` (checked by :func:`check_overrides`)."""
    for name, kind in (chosen or {}).items():
        k = kinds[name]
        k.kind, k.reason, k.decided_by = kind, "set by the user", "user"
        if kind in CLASS_KINDS:
            k.class_axis = -1 if k.class_axis is None else k.class_axis
    return kinds


def check_overrides(chosen: Any, outputs: list[str]) -> dict[str, str]:
    """``{"name": "kind"}`` or ``["name=kind", ...]`` -> a checked mapping, or one InputError."""
    from ..errors import InputError

    if chosen is None:
        return {}
    if isinstance(chosen, (list, tuple)):
        pairs = {}
        for item in chosen:
            name, sep, kind = str(item).rpartition("=")
            if not sep or not name:
                raise InputError(f"--output-kind expects NAME=KIND, got '{item}'")
            pairs[name] = kind
        chosen = pairs
    if not isinstance(chosen, dict):
        raise InputError(f"output_kinds: expected a mapping output name -> kind, got {type(chosen).__name__}")
    for name, kind in chosen.items():
        if kind not in KINDS:
            raise InputError(f"output kind '{kind}' for '{name}' is not one of: {', '.join(KINDS)}")
        if outputs and name not in outputs:
            raise InputError(f"output_kinds names '{name}', which is not an output of the model; "
                             f"its outputs: {', '.join(outputs)}")
    return dict(chosen)
