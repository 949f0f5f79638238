"""The weighted layers of a graph, found once for every compression pass.

A *layer* is a Conv, ConvTranspose, MatMul or Gemm node (default domain) whose
second input is a fixed weight. :func:`find_layers` walks every scope (the top
graph, If/Loop/Scan bodies, model-local function bodies) and returns a
:class:`Found`: the layers in graph order, and what it passed over, counted in
one vocabulary (:data:`SKIPS`) that passes copy into their stats.

API (stable; passes build on it):

``find_layers(graph, ops=OPS, exclude=(), check_input=False, only=()) -> Found``
    ``Found.layers``: list of :class:`Layer`; ``Found.skips``: Counter of reasons;
    ``Found.skipped``: ``(node, scope, reason)`` for each node passed over.
``resolve_weight(tensor, overridable=()) -> Weight | str``
    where a weight lives, or the reason it is not fixed.
``as_matrix(w, layout, groups=1)``, ``from_matrix(m, layout, shape, groups=1)``
    the [out, in] view of a weight in a layout (below) and back.
``weight_axis(op, ndim, trans_b=False) -> int | None``
    the axis of the weight *as the node reads it* that indexes output channels
    (per-channel quantization axis); None for a rank the op cannot take.
``excluded(layer, patterns) -> bool``
    whether a glob matches the node's name or a name of its weight.
``left_out(names, exclude=(), only=()) -> bool``
    whether a pass's ``exclude``/``only`` globs pass over something known by ``names``: an
    exclude glob matches one of them, or ``only`` is given and none of its globs does.
``find_embeddings(graph, top_only=False) -> (list[Embedding], Counter)``
    Gathers (default domain) reading rows of a fixed float table of rank >= 2 (token,
    position and type embeddings): :class:`Embedding` has ``node``, ``graph``, ``top``,
    ``table`` (the gs.Constant holding it; ``shape``, ``dtype`` without loading it) and
    ``axis``. Tables that a caller may feed are counted as ``overridable_weight``.

:class:`Weight` (where the value lives):
    ``const`` the gs.Constant holding the values; ``holder`` the Constant node
    whose ``value`` it is (None for an initializer); ``stored`` the tensor holding
    it (the initializer, or the holder's output); ``identities`` Identity nodes
    between ``stored`` and what the layer reads; ``via`` a 2-D Transpose between
    them (exports without constant folding), ``transposed`` whether there is one;
    ``read`` the tensor the node reads. ``dtype``, ``shape`` (as read),
    ``stored_shape``; ``value()`` the array as the node reads it, ``array()`` the stored
    array without a copy (None when sparse or not a numpy type); ``single_use``
    whether nothing else reads the chain (so replacing the weight frees it).
    fp16/fp64 weights stay in their dtype; passes compute in float64.

:class:`Layer` (one node):
    ``node``, ``graph`` (the graph holding it), ``scope`` ("" for the top graph,
    else a path such as ``"If 'cond'/then_branch"`` or ``"function 'f'"``),
    ``top``, ``in_function``, ``index`` (position in ``graph.nodes``), ``kind``
    (conv | convtranspose | matmul | gemm), ``weight``, ``x`` (the activation
    input; for Gemm with ``trans_a`` it is read transposed), ``bias`` (Conv,
    ConvTranspose and Gemm C input, or None), ``groups``, ``trans_a``,
    ``trans_b``, ``alpha``, ``beta``.
    ``layout``: how the *stored* constant maps to the ``[out, in]`` matrix:
    ``conv`` (W[O, C/g, k...]), ``convtranspose`` (W[C, O/g, k...]), ``kn``
    (stored [K, N], out = N) or ``nk`` (stored [N, K]). ``matrix(values=None)``
    gives the stored values as ``[out, in]`` (for g groups, rows of group i take
    the inputs of group i: in = C/g x kernel), ``unmatrix(m)`` writes such a
    matrix back in the stored layout; ``out_features``, ``in_features`` (per
    group), ``size``; ``x_fixed`` whether the activation input is itself a
    constant; ``feeds_batchnorm`` whether its only reader is a BatchNormalization.

Replacing:
    ``Layer.replace_stored(values, names)`` writes new values (stored layout, same
    shape) where the weight lives: the holder's value, or a fresh initializer
    read by whatever read the old one (the Transpose stays; every reader of a shared weight
    sees the new values). ``Layer.replace_weight(
    values, names)`` makes the node read a fresh constant of the read shape (the
    old chain is left for dce). ``Layer.factor(a, b, names, opset)`` replaces a
    MatMul/Gemm W[K, N] by two nodes X·A·B (A [K, r], B [r, N]). ``Layer.replace(
    nodes)`` puts new nodes (for example a com.microsoft.MatMulNBits) in the
    node's place; they must write the node's outputs.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G

OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

# one vocabulary for every pass's ``skipped_<reason>`` stats
SKIPS = {
    "excluded": "the node or its weight matches an exclude glob (or `only` is given and names neither)",
    "dynamic_weight": "the weight is computed at run time (an activation)",
    "overridable_weight": "the weight is an initializer that is also a graph input (a caller may feed it)",
    "weight_not_folded": "the weight is computed from constants by a chain of layout ops (run fold first)",
    "constant_input": "the activation input is a constant too (left for fold)",
    "weight_dtype": "the weight is not a float type the pass handles",
    "weight_rank": "the weight's rank does not fit the op (Conv < 3-D, MatMul/Gemm not 2-D)",
    "shared_weight": "the weight is read by other nodes as well",
    "subgraph": "the layer is inside an If/Loop/Scan body the pass does not reach",
    "in_function": "the layer is inside a model-local function",
    "batchnorm_not_folded": "a BatchNormalization follows the layer (run fold_bn first)",
    "groups": "a grouping the pass does not handle",
    "old_opset": "the op's form at this opset is not handled",
}

_LAYOUT_OPS = ("Transpose", "Reshape", "Identity", "Cast", "Unsqueeze", "Squeeze", "Flatten")


# ----------------------------------------------------------------- weights

@dataclass(eq=False)
class Weight:
    """Where a layer's weight lives and how the layer reads it."""

    const: gs.Constant
    holder: gs.Node | None
    stored: gs.Tensor
    read: gs.Tensor
    via: gs.Node | None = None
    identities: list = field(default_factory=list)

    @property
    def transposed(self) -> bool:
        return self.via is not None

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.const._values.dtype)

    @property
    def stored_shape(self) -> tuple:
        return tuple(self.const._values.shape)

    @property
    def shape(self) -> tuple:
        return self.stored_shape[::-1] if self.transposed else self.stored_shape

    @property
    def single_use(self) -> bool:
        """Nothing but the layer reads the weight (nor the Transpose's input): replacing it frees it."""
        return len(self.read.outputs) == 1 and (self.via is None or len(self.via.inputs[0].outputs) == 1)

    @property
    def names(self) -> list[str]:
        return [n for n in (self.const.name, self.stored.name, self.read.name) if n]

    def array(self) -> np.ndarray | None:
        """The stored values as read from the model without a copy where possible (``graph.const_value``:
        None when sparse or of a type numpy cannot hold); read-only, not transposed."""
        return G.const_value(self.stored)

    def value(self) -> np.ndarray:
        """The values as the node reads them (a view; copy before writing)."""
        w = np.asarray(self.const.values)
        return w.T if self.transposed else w


def resolve_weight(tensor: gs.Tensor, overridable: Iterable[str] = ()) -> Weight | str:
    """The constant behind ``tensor``: an initializer or Constant node (through Identity), or a
    2-D Transpose of one; else the reason (``overridable_weight``, ``weight_not_folded``,
    ``dynamic_weight``)."""
    overridable = set(overridable)
    found = _fixed(tensor, overridable)
    if isinstance(found, Weight):
        return found
    maker = G.producer(tensor)
    if (maker is not None and maker.op == "Transpose" and (maker.domain or "") in ("", "ai.onnx")
            and len(maker.inputs) == 1):
        inner = _fixed(maker.inputs[0], overridable)
        if isinstance(inner, Weight) and len(inner.stored_shape) == 2 \
                and list(maker.attrs.get("perm", [1, 0])) == [1, 0]:
            inner.read, inner.via = tensor, maker
            return inner
        if isinstance(inner, str):
            return inner
    if found is not None:
        return found
    return "weight_not_folded" if _foldable(tensor) else "dynamic_weight"


def _fixed(tensor: gs.Tensor, overridable: set) -> Weight | str | None:
    """The Weight behind an initializer or a Constant node's output (through Identity); a reason, or None."""
    identities = []
    t = tensor
    for _ in range(16):
        if t is None:
            return None
        if isinstance(t, gs.Constant):
            if t.name in overridable:
                return "overridable_weight"
            return Weight(t, None, t, tensor, identities=identities)
        maker = G.producer(t)
        if maker is None:
            return None
        if maker.op == "Identity" and (maker.domain or "") in ("", "ai.onnx") and maker.inputs:
            identities.append(maker)
            t = maker.inputs[0]
            continue
        value = G.constant_node_value(maker)
        if isinstance(value, gs.Constant):
            return Weight(value, maker, t, tensor, identities=identities)
        return None
    return None


def _foldable(tensor: gs.Tensor, depth: int = 0) -> bool:
    """A value computed from constants only by a short chain of layout ops (an unfolded weight)."""
    maker = G.producer(tensor)
    if maker is None or depth > 4 or maker.op not in _LAYOUT_OPS:
        return False
    src = maker.inputs[0] if maker.inputs else None
    return src is not None and (G.constant_source(src) is not None or _foldable(src, depth + 1)) and all(
        G.constant_source(t) is not None for t in maker.inputs[1:] if t.name)


def weight_axis(op: str, ndim: int, trans_b: bool = False) -> int | None:
    """The axis of the weight as ``op`` reads it that indexes output channels; None for a rank it cannot take."""
    if op == "Conv" and ndim >= 3:
        return 0
    if op == "ConvTranspose" and ndim >= 3:
        return 1
    if op == "MatMul" and ndim == 2:
        return 1
    if op == "Gemm" and ndim == 2:
        return 0 if trans_b else 1
    return None


# ----------------------------------------------------------------- the [out, in] view

def as_matrix(w: np.ndarray, layout: str, groups: int = 1) -> np.ndarray:
    """A weight in ``layout`` (see :class:`Layer`) as [out, in]; for g groups the rows of group i
    take the inputs of group i (in = C/g x kernel)."""
    if layout == "conv":
        return w.reshape(w.shape[0], -1)
    if layout == "convtranspose":  # W[C, O/g, k...] -> [g*O/g, C/g*k]
        c, og = w.shape[0], w.shape[1]
        grouped = w.reshape(groups, c // groups, og, *w.shape[2:])
        return np.moveaxis(grouped, 2, 1).reshape(groups * og, -1)
    return w.T if layout == "kn" else w


def from_matrix(m: np.ndarray, layout: str, shape: tuple, groups: int = 1) -> np.ndarray:
    """Inverse of :func:`as_matrix`: an [out, in] matrix back as a weight of ``shape`` in ``layout``."""
    if layout == "conv":
        return m.reshape(shape)
    if layout == "convtranspose":
        grouped = m.reshape(groups, shape[1], shape[0] // groups, *shape[2:])
        return np.moveaxis(grouped, 1, 2).reshape(shape)
    return m.T if layout == "kn" else m


# ----------------------------------------------------------------- layers

@dataclass(eq=False)
class Layer:
    """One weighted node, its weight, and how to view and replace that weight."""

    node: gs.Node
    graph: gs.Graph
    scope: str
    kind: str
    weight: Weight
    x: gs.Tensor
    bias: gs.Tensor | None = None
    groups: int = 1
    trans_a: bool = False
    trans_b: bool = False
    alpha: float = 1.0
    beta: float = 1.0
    index: int = 0
    in_function: bool = False

    @property
    def top(self) -> bool:
        return self.scope == ""

    @property
    def layout(self) -> str:
        if self.kind in ("conv", "convtranspose"):
            return self.kind
        reads_kn = self.kind == "matmul" or not self.trans_b  # what the node reads is [K, N]
        return "kn" if reads_kn != self.weight.transposed else "nk"

    @property
    def shape(self) -> tuple:
        """The stored constant's shape."""
        return self.weight.stored_shape

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def out_features(self) -> int:
        s = self.shape
        if self.layout == "conv":
            return s[0]
        if self.layout == "convtranspose":
            return s[1] * self.groups
        return s[1] if self.layout == "kn" else s[0]

    @property
    def in_features(self) -> int:
        """Columns of the [out, in] matrix: inputs per group times the kernel size."""
        s = self.shape
        if self.layout == "conv":
            return int(np.prod(s[1:]))
        if self.layout == "convtranspose":
            return s[0] // self.groups * int(np.prod(s[2:]))
        return s[0] if self.layout == "kn" else s[1]

    @property
    def x_fixed(self) -> bool:
        return not isinstance(resolve_weight(self.x), str)

    @property
    def feeds_batchnorm(self) -> bool:
        readers = list(self.node.outputs[0].outputs) if self.node.outputs else []
        return len(readers) == 1 and readers[0].op == "BatchNormalization"

    def matrix(self, values: np.ndarray | None = None) -> np.ndarray:
        """The stored values (or ``values`` in the stored layout) as [out, in]; a view where it can be."""
        w = np.asarray(self.weight.const.values) if values is None else values
        return as_matrix(w, self.layout, self.groups)

    def unmatrix(self, m: np.ndarray) -> np.ndarray:
        """An [out, in] matrix back in the stored layout (inverse of :meth:`matrix`)."""
        return from_matrix(m, self.layout, self.shape, self.groups)

    # -------------------------------------------------------------- replacing

    def replace_stored(self, values: np.ndarray, names: G.Names, suffix: str = "new") -> gs.Constant:
        """Write ``values`` (stored layout and shape) where the weight lives; returns the new constant."""
        w = self.weight
        if tuple(values.shape) != w.stored_shape:
            raise ValueError(f"{self.node.name}: new weight shape {values.shape} != {w.stored_shape}")
        new = gs.Constant(names.fresh(f"{w.const.name}_{suffix}"), np.ascontiguousarray(values))
        if w.holder is not None:
            w.holder.attrs["value"] = new
            return new
        for reader in list(w.stored.outputs):
            G.rewire_input(reader, w.stored, new)
        return new

    def replace_weight(self, values: np.ndarray, names: G.Names, suffix: str = "new") -> gs.Constant:
        """Make the node read a fresh constant with ``values`` (read layout and shape)."""
        if tuple(values.shape) != self.weight.shape:
            raise ValueError(f"{self.node.name}: new weight shape {values.shape} != {self.weight.shape}")
        base = self.weight.read.name or self.node.name or "weight"
        new = gs.Constant(names.fresh(f"{base}_{suffix}"), np.ascontiguousarray(values))
        self.node.inputs[1] = new
        return new

    def factor(self, a: np.ndarray, b: np.ndarray, names: G.Names, opset: int = 17) -> gs.Node:
        """Replace W[K, N] (as ``op(B)`` multiplies, alpha included in ``a``) by X·A·B; returns the first node.

        MatMul: two MatMuls; Gemm: a Gemm (transA kept) into the original node, which keeps
        its bias C, beta and output but loses transA, transB and alpha.
        """
        if self.kind not in ("matmul", "gemm"):
            raise ValueError(f"{self.node.name}: factor applies to MatMul and Gemm, not {self.node.op}")
        r = a.shape[1]
        base = self.weight.read.name or self.node.name or "svd"
        const_a = gs.Constant(names.fresh(f"{base}_svd_a"), np.ascontiguousarray(a))
        const_b = gs.Constant(names.fresh(f"{base}_svd_b"), np.ascontiguousarray(b))
        node, x = self.node, self.x
        out_shape = None
        if x.shape is not None and self.kind == "matmul" and len(x.shape) >= 1:
            out_shape = [*x.shape[:-1], r]
        elif x.shape is not None and self.kind == "gemm" and len(x.shape) == 2:
            out_shape = [x.shape[1] if self.trans_a else x.shape[0], r]
        mid = gs.Variable(names.fresh(f"{node.name or base}_svd_mid"), dtype=x.dtype, shape=out_shape)
        first_name = names.fresh(f"{node.name or base}_svd_a")
        if self.kind == "matmul":
            first = gs.Node("MatMul", name=first_name, inputs=[x, const_a], outputs=[mid])
        else:
            inputs = [x, const_a]
            if opset < 11:  # C is required before opset 11
                inputs.append(gs.Constant(names.fresh(f"{base}_svd_zero"), np.zeros((1,), a.dtype)))
            first = gs.Node("Gemm", name=first_name, attrs={"transA": int(self.trans_a)}, inputs=inputs, outputs=[mid])
            for attr in ("transA", "transB", "alpha"):
                node.attrs.pop(attr, None)
        node.inputs[0] = mid
        node.inputs[1] = const_b
        self.graph.nodes.insert(G.positions(self.graph.nodes, node)[0], first)
        return first

    def replace(self, nodes: Sequence[gs.Node]) -> None:
        """Put ``nodes`` in the node's place; together they must write every output of the node."""
        made = {id(t) for n in nodes for t in n.outputs}
        missing = [t.name for t in self.node.outputs if id(t) not in made]
        if missing:
            raise ValueError(f"{self.node.name}: the new nodes do not write {', '.join(missing)}")
        idx = G.positions(self.graph.nodes, self.node)[0]
        self.node.inputs.clear()
        self.graph.nodes[idx:idx + 1] = list(nodes)


# ----------------------------------------------------------------- finding

@dataclass
class Found:
    layers: list[Layer]
    skips: Counter
    skipped: list[tuple[gs.Node, str, str]]


def find_layers(graph: gs.Graph, ops: Sequence[str] = OPS, exclude: Sequence[str] = (),
                check_input: bool = False, only: Sequence[str] = ()) -> Found:
    """Every layer among ``ops`` in every scope, in graph order (scope by scope).

    A node is passed over (counted in ``skips``) when ``exclude`` matches its name or
    ``only`` is given and does not (checked first, as ``excluded``), its weight is not fixed, ``check_input`` is set and its
    activation input is a constant, its weight is not fp16/32/64, or the weight's rank
    does not fit the op. What else a pass needs (single use, top scope, groups) it
    checks on the layers it gets, with the same reason names.
    """
    overridable = set(vars(graph).get("initializer_inputs", []) or [])
    layers: list[Layer] = []
    skips: Counter = Counter()
    skipped: list[tuple[gs.Node, str, str]] = []
    for g, scope, in_function in _scopes(graph):
        for index, node in enumerate(g.nodes):
            if node.op not in ops or (node.domain or "") not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            reason, layer = _layer(node, g, scope, index, in_function, overridable, exclude, check_input, only)
            if reason is not None:
                skips[reason] += 1
                skipped.append((node, scope, reason))
            else:
                layers.append(layer)
    return Found(layers, skips, skipped)


def _layer(node, g, scope, index, in_function, overridable, exclude, check_input, only=()):
    if left_out([node.name or ""], exclude, only):
        return "excluded", None
    weight = resolve_weight(node.inputs[1], overridable)
    if isinstance(weight, str):
        return weight, None
    if check_input and not isinstance(resolve_weight(node.inputs[0], overridable), str):
        return "constant_input", None
    if weight.dtype not in FLOATS:
        return "weight_dtype", None
    op = node.op
    trans_b = bool(int(node.attrs.get("transB", 0))) if op == "Gemm" else False
    if weight_axis(op, len(weight.shape), trans_b) is None:
        return "weight_rank", None
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    layer = Layer(node, g, scope, op.lower(), weight, node.inputs[0], bias, index=index, in_function=in_function,
                  groups=int(node.attrs.get("group", 1)) if op in ("Conv", "ConvTranspose") else 1,
                  trans_b=trans_b)
    if op == "Gemm":
        layer.trans_a = bool(int(node.attrs.get("transA", 0)))
        layer.alpha = float(node.attrs.get("alpha", 1.0))
        layer.beta = float(node.attrs.get("beta", 1.0))
    return None, layer


def _scopes(graph: gs.Graph) -> Iterator[tuple[gs.Graph, str, bool]]:
    """(graph, scope path, inside a function) for the graph, nested bodies and function bodies."""
    yield from _nested(graph, "", False)
    for func in getattr(graph, "functions", []) or []:
        yield from _nested(func, f"function '{func.name}'", True)


def _nested(graph: gs.Graph, scope: str, in_function: bool) -> Iterator[tuple[gs.Graph, str, bool]]:
    yield graph, scope, in_function
    for node in graph.nodes:
        if not G.subgraphs_of(node):
            continue
        for key, value in node.attrs.items():
            subs = [value] if isinstance(value, gs.Graph) else (
                list(value) if isinstance(value, (list, tuple)) and value and isinstance(value[0], gs.Graph) else [])
            for i, sub in enumerate(subs):
                label = f"{node.op} '{node.name}'/{key}" + (f"[{i}]" if len(subs) > 1 else "")
                yield from _nested(sub, f"{scope}/{label}" if scope else label, in_function)


def excluded(layer: Layer, patterns: Sequence[str]) -> bool:
    """Whether a glob matches the node's name or a name of its weight."""
    names = [layer.node.name or "", *layer.weight.names]
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def left_out(names: Sequence[str], exclude: Sequence[str] = (), only: Sequence[str] = ()) -> bool:
    """Whether ``exclude``/``only`` globs pass over something known by ``names`` (a node's name, its
    weight's): an exclude glob matches one of them, or ``only`` is given and none of its globs does."""
    if exclude and any(fnmatch.fnmatchcase(n or "", p) for p in exclude for n in names):
        return True
    return bool(only) and not any(fnmatch.fnmatchcase(n or "", p) for p in only for n in names)


# ----------------------------------------------------------------- embeddings

@dataclass(eq=False)
class Embedding:
    """A Gather reading rows of a fixed float table: a token, position or type embedding."""

    node: gs.Node
    graph: gs.Graph
    table: gs.Constant
    top: bool

    @property
    def shape(self) -> tuple:
        return tuple(self.table._values.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.table._values.dtype)

    @property
    def axis(self) -> int:
        return int(self.node.attrs.get("axis", 0))


def find_embeddings(graph: gs.Graph, top_only: bool = False) -> tuple[list[Embedding], Counter]:
    """Every Gather on a fixed float table of rank >= 2, in the top graph and (unless ``top_only``)
    If/Loop/Scan bodies; model-local functions are not entered. A Gather on data or on shapes is
    not an embedding and is not counted; a table a caller may feed is (``overridable_weight``)."""
    overridable = set(vars(graph).get("initializer_inputs", []) or [])
    found: list[Embedding] = []
    skips: Counter = Counter()
    graphs = [graph] if top_only else list(G.iter_graphs(graph, functions=False))
    for g in graphs:
        for node in g.nodes:
            if node.op != "Gather" or (node.domain or "") not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            table = G.constant_source(node.inputs[0])
            if not isinstance(table, gs.Constant) or isinstance(table._values, G.SparseValues):
                continue
            if np.dtype(table._values.dtype) not in FLOATS or len(table._values.shape) < 2:
                continue
            if node.inputs[0].name in overridable or table.name in overridable:
                skips["overridable_weight"] += 1
                continue
            found.append(Embedding(node, g, table, g is graph))
    return found, skips
