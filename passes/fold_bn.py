"""Fold BatchNormalization and per-channel Mul/Add/Sub/Div by constants into the layer before them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import SparseValues

from onnxopt import graph as G
from onnxopt.options import option
from onnxopt.pipeline import Pass, PassContext, PassResult, growth_limit, register_pass

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_ELEMENTWISE = ("Mul", "Add", "Sub", "Div")
_SKIPS = ("training_mode", "unsupported_bn", "non_constant_params", "invalid_constant", "unsupported_producer",
          "outer_scope", "shared_output", "non_constant_weights", "unsupported_dtype", "not_per_channel",
          "shared_weights")


@dataclass
class FoldBnOptions:
    batchnorm: bool = option(True, help="fold inference-mode BatchNormalization")
    elementwise: bool = option(True, help="fold Mul/Add/Sub/Div by per-channel or scalar constants")
    copy_shared: bool = option(True, help="fold into weights other nodes also read, by giving this layer its own copy")


@register_pass
class FoldBatchNorm(Pass):
    """Fold BatchNormalization and per-channel Mul/Add into the Conv, ConvTranspose, Gemm or MatMul before them. Exact.

    The scale and shift (BN: scale/sqrt(var+eps) and bias - mean*scale/sqrt(var+eps);
    Mul/Div/Add/Sub by a constant that broadcasts along the output-channel axis only,
    or a scalar) are computed in float64 and applied to the producer's weights and
    bias, stored back in the weights' own dtype (fp16 stays fp16). Chains fold one
    after another (Conv -> BN -> Mul -> Add becomes one Conv); the float64 values are
    kept between steps so rounding happens once. ``max_weight_error`` is the largest
    difference between the stored weights and that float64 reference.

    Producers: Conv (any rank, groups, depthwise; a bias is added when missing),
    ConvTranspose (any group), Gemm (transA/transB, alpha; beta folded into C, which
    may be [N], [1,N], [M,N], [M,1] or scalar, and is added when missing), MatMul with
    a constant right-hand weight, with or without a following bias Add (a bare MatMul
    followed by BN gets a bias Add in place of the BN; a bare MatMul followed by an Add
    already is MatMul-with-bias and is left as it is). BN after MatMul folds only when
    the MatMul output is known to be rank 2 (BN's channel axis is 1).

    Left alone and counted (``skipped_<reason>``): training-mode BN (``training_mode=1``
    or extra outputs), BN with spatial=0 or malformed parameters, non-constant BN or
    producer parameters, a producer output read by another node or a graph output, a
    producer in an outer scope, constants that are not per output channel, non-float
    weights, division by zero, and (with ``copy_shared=false``, or once the copies would
    grow the model past ``ctx.growth_allowance``) weights other nodes also
    read. Shared weights are never changed in place: the folded layer gets new
    constants. A BN after a node that is no supported producer is counted as
    ``skipped_unsupported_producer``; Mul/Add/Sub/Div are counted only when they follow
    a supported producer. Works in every scope (If/Loop/Scan bodies, functions); the
    folded node's output keeps its tensor, so graph output names never change.
    """

    name = "fold_bn"
    Options = FoldBnOptions
    leaves_dangling = True  # folded-away Constant nodes

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        allowance = ctx.growth_allowance  # copies of shared weights grow the model
        folder = _Folder(graph, self.options, growth_limit(G.sizes(graph)[2]) if allowance is None else allowance)
        for g in list(G.iter_graphs(graph)):
            while True:
                skips: Counter = Counter()
                if not folder.sweep(g, skips):
                    folder.skips.update(skips)
                    break
        stats = {f"{k}_folded": folder.folded[k] for k in ("bn", "mul", "add", "sub", "div")}
        stats["layers_changed"] = len(folder.layers)
        stats["biases_added"] = folder.biases_added
        stats["shared_weights_copied"] = folder.copied
        stats.update({f"skipped_{k}": folder.skips[k] for k in _SKIPS})
        stats["max_weight_error"] = float(f"{folder.max_weight_error():.3g}")
        return PassResult(any(folder.folded.values()), stats)


# ----------------------------------------------------------------- candidates and producers

@dataclass
class _Candidate:
    """An affine node y = x * scale + shift; BN gives per-channel vectors, the others raw constants."""

    node: gs.Node
    x: gs.Tensor
    kind: str  # bn, mul, add, sub, div
    scale: Optional[np.ndarray] = None
    shift: Optional[np.ndarray] = None
    problem: Optional[str] = None  # a skip reason to count once a producer is found


@dataclass
class _Unit:
    """A producer: the node holding the weight, and where its bias lives."""

    kind: str  # conv, convtranspose, gemm, matmul
    node: gs.Node
    out_node: gs.Node          # the node whose output the candidate reads (node, or MatMul's bias Add)
    weight: gs.Tensor
    bias_node: Optional[gs.Node]
    bias_slot: Optional[int]
    channels: int
    rank: Optional[int]        # output rank when known
    min_rank: int
    axis_from_end: int         # channel axis counted from the end (1 = last)


class _Folder:
    def __init__(self, graph: gs.Graph, options: FoldBnOptions, allowance: int) -> None:
        self.options = options
        self.left = allowance  # bytes the copies of shared weights may still add
        # initializers also listed as graph inputs may be fed at run time: not constants
        self.overridable = frozenset(vars(graph).get("initializer_inputs") or ())
        self.graph_outputs = {id(t) for g in G.iter_graphs(graph) for t in g.outputs}
        self.names = G.Names(graph)
        self.masters: dict[int, tuple[gs.Constant, np.ndarray]] = {}  # constants this pass made: float64 values
        self.folded: Counter = Counter({k: 0 for k in ("bn", "mul", "add", "sub", "div")})
        self.skips: Counter = Counter()
        self.layers: set[int] = set()
        self.biases_added = 0
        self.copied = 0

    def value(self, tensor: Optional[gs.Tensor], peek: bool = False) -> Optional[np.ndarray]:
        return _const_value(tensor, self.overridable, peek)

    def fresh(self, base: str) -> str:
        return self.names.fresh(base)

    # -------------------------------------------------------------- one sweep over a graph

    def sweep(self, g: gs.Graph, skips: Counter) -> bool:
        self.node_ids = {id(n) for n in g.nodes}
        self.replaced: dict[int, Optional[gs.Node]] = {}
        changed = False
        for node in list(g.nodes):
            if id(node) in self.replaced:
                continue
            cand = self.candidate(node)
            if cand is None:
                continue
            if isinstance(cand, str):
                skips[cand] += 1
                continue
            unit = self.unit(cand)
            if isinstance(unit, str):
                if unit != "silent" and (cand.kind == "bn" or unit != "unsupported_producer"):
                    skips[unit] += 1
                continue
            reason = cand.problem or self.fold(cand, unit)
            if reason:
                skips[reason] += 1
            else:
                changed = True
        if self.replaced:
            nodes = []
            for n in g.nodes:
                if id(n) in self.replaced:
                    if self.replaced[id(n)] is not None:
                        nodes.append(self.replaced[id(n)])
                else:
                    nodes.append(n)
            g.nodes = nodes
        return changed

    def candidate(self, node: gs.Node):
        """A _Candidate, a skip reason, or None when the node is nothing to fold."""
        if (node.domain or "") not in ("", "ai.onnx") or not node.outputs:
            return None
        if node.op == "BatchNormalization" and self.options.batchnorm and len(node.inputs) >= 5:
            if int(node.attrs.get("training_mode", 0)) == 1 or any(o.name for o in node.outputs[1:]):
                return "training_mode"
            if int(node.attrs.get("spatial", 1)) != 1:
                return "unsupported_bn"
            params = [self.value(t) for t in node.inputs[1:5]]
            if any(p is None for p in params):
                return "non_constant_params"
            if any(p.ndim != 1 or p.shape != params[0].shape for p in params):
                return "unsupported_bn"
            scale, bias, mean, var = (p.astype(np.float64) for p in params)
            eps = float(node.attrs.get("epsilon", 1e-5))
            with np.errstate(all="ignore"):
                a = scale / np.sqrt(var + eps)
                b = bias - mean * a
            if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
                return "invalid_constant"
            return _Candidate(node, node.inputs[0], "bn", a, b)
        if node.op in _ELEMENTWISE and self.options.elementwise and len(node.inputs) == 2:
            left, right = (self.value(t) for t in node.inputs)
            if (left is None) == (right is None):
                return None
            if right is not None:
                x, c, const_first = node.inputs[0], right, False
            else:
                x, c, const_first = node.inputs[1], left, True
            if c.dtype not in _FLOATS:
                return None
            c = c.astype(np.float64)
            kind = node.op.lower()
            if kind == "div" and const_first:  # c / x is not affine
                return None
            if not np.all(np.isfinite(c)) or (kind == "div" and not np.all(c != 0)):
                # counted only when it follows a producer (masks with -inf are common elsewhere)
                scales = kind in ("mul", "div") or (kind == "sub" and const_first)
                return _Candidate(node, x, kind, scale=np.array(1.0) if scales else None, problem="invalid_constant")
            if kind == "mul":
                return _Candidate(node, x, kind, scale=c)
            if kind == "add":
                return _Candidate(node, x, kind, shift=c)
            if kind == "sub":
                if const_first:  # c - x
                    return _Candidate(node, x, kind, scale=np.array(-1.0), shift=c)
                return _Candidate(node, x, kind, shift=-c)
            return _Candidate(node, x, kind, scale=1.0 / c)
        return None

    def single_use(self, tensor: gs.Tensor) -> bool:
        return len(tensor.outputs) == 1 and id(tensor) not in self.graph_outputs

    def unit(self, cand: _Candidate):
        """The producer of the candidate's input as a _Unit, or a skip reason ('silent': none)."""
        x = cand.x
        maker = G.producer(x)
        if maker is None or (maker.domain or "") not in ("", "ai.onnx") or maker.op not in (*_PRODUCERS, "Add"):
            return "unsupported_producer"
        if id(maker) not in self.node_ids:
            return "outer_scope"
        bias_add = bias_slot = None
        if maker.op == "Add":
            found = self.bias_add_of(maker)
            if found is None:
                return "unsupported_producer"
            bias_add, (maker, bias_slot) = maker, found
        elif maker.op == "MatMul" and cand.scale is None:
            return "silent"  # a bias after a bare MatMul: MatMul-with-bias already
        if not self.single_use(x):
            return "shared_output"
        op = maker.op
        if len(maker.inputs) < 2:
            return "unsupported_producer"
        w = self.value(maker.inputs[1], peek=True)
        if w is None:
            return "non_constant_weights"
        if w.dtype not in _FLOATS:
            return "unsupported_dtype"
        has_bias = len(maker.inputs) > 2 and not maker.inputs[2].is_empty()
        if op in ("Conv", "ConvTranspose", "Gemm") and has_bias:
            bias = self.value(maker.inputs[2], peek=True)
            if bias is None:
                return "non_constant_weights"
            if bias.dtype not in _FLOATS:
                return "unsupported_dtype"
        if op == "Conv":
            if w.ndim < 3:
                return "unsupported_producer"
            return _Unit("conv", maker, maker, maker.inputs[1], maker, 2, w.shape[0], w.ndim, w.ndim, w.ndim - 1)
        if op == "ConvTranspose":
            group = int(maker.attrs.get("group", 1))
            if w.ndim < 3 or group < 1 or w.shape[0] % group:
                return "unsupported_producer"
            return _Unit("convtranspose", maker, maker, maker.inputs[1], maker, 2, w.shape[1] * group,
                         w.ndim, w.ndim, w.ndim - 1)
        if op == "Gemm":
            if w.ndim != 2 or "broadcast" in maker.attrs:  # opset < 7 Gemm: leave alone
                return "unsupported_producer"
            n = w.shape[0] if int(maker.attrs.get("transB", 0)) else w.shape[1]
            return _Unit("gemm", maker, maker, maker.inputs[1], maker, 2, n, 2, 2, 1)
        # MatMul with a constant right-hand side
        if w.ndim < 2:
            return "unsupported_producer"
        rank, min_rank = _matmul_rank(maker, w)
        if bias_add is not None:
            return _Unit("matmul", maker, bias_add, maker.inputs[1], bias_add, bias_slot, w.shape[-1], rank,
                         min_rank, 1)
        return _Unit("matmul", maker, maker, maker.inputs[1], None, None, w.shape[-1], rank, min_rank, 1)

    def bias_add_of(self, add: gs.Node) -> Optional[tuple[gs.Node, int]]:
        """(the MatMul whose bias this Add adds, the Add's slot holding it), or None.

        The bias is a constant that broadcasts along the MatMul's last axis only.
        """
        if len(add.inputs) != 2:
            return None
        for slot in (0, 1):
            c = self.value(add.inputs[slot])
            other = add.inputs[1 - slot]
            mm = G.producer(other)
            if c is None or mm is None or mm.op != "MatMul" or (mm.domain or "") not in ("", "ai.onnx"):
                continue
            if id(mm) not in self.node_ids or not self.single_use(other) or len(mm.inputs) != 2:
                continue
            w = self.value(mm.inputs[1], peek=True)
            if w is None or w.dtype not in _FLOATS or c.dtype not in _FLOATS or w.ndim < 2:
                continue
            rank, min_rank = _matmul_rank(mm, w)
            if _per_channel(c, w.shape[-1], rank, min_rank, 1) is None:
                continue
            return mm, slot
        return None

    # -------------------------------------------------------------- the fold

    def fold(self, cand: _Candidate, unit: _Unit) -> Optional[str]:
        """Fold ``cand`` into ``unit``; returns None on success, else a skip reason."""
        c = unit.channels
        if cand.kind == "bn":
            if cand.scale.shape != (c,) or unit.rank is None or unit.axis_from_end != unit.rank - 1:
                return "not_per_channel"
            a, b = cand.scale, cand.shift
        else:
            a = b = None
            if cand.scale is not None:
                a = _per_channel(cand.scale, c, unit.rank, unit.min_rank, unit.axis_from_end)
                if a is None:
                    return "not_per_channel"
            if cand.shift is not None:
                b = _per_channel(cand.shift, c, unit.rank, unit.min_rank, unit.axis_from_end)
                if b is None:
                    return "not_per_channel"
        node, w_tensor = unit.node, unit.weight
        bias_tensor = None
        if unit.bias_node is not None and unit.bias_slot < len(unit.bias_node.inputs):
            bias_tensor = unit.bias_node.inputs[unit.bias_slot]
            if bias_tensor.is_empty():
                bias_tensor = None
        shared = [t for t in ([w_tensor] if a is not None else []) + ([bias_tensor] if bias_tensor is not None else [])
                  if id(t) not in self.masters and len(t.outputs) > 1]
        copied_bytes = sum(_nbytes(self.value(t, peek=True)) for t in shared)
        if shared and (not self.options.copy_shared or copied_bytes > self.left):
            return "shared_weights"

        w_dtype = self.value(w_tensor, peek=True).dtype
        w64 = self.load(w_tensor)
        bias64 = self.load(bias_tensor) if bias_tensor is not None else None
        b_dtype = self.value(bias_tensor, peek=True).dtype if bias_tensor is not None else w_dtype
        if unit.kind == "gemm" and bias64 is not None:
            beta = float(node.attrs.get("beta", 1.0))
            bias64 = bias64 * beta if beta != 0 else np.zeros_like(bias64)
        if unit.kind == "conv" and bias64 is not None and bias64.shape != (c,):
            return "unsupported_producer"
        if unit.kind == "convtranspose" and bias64 is not None and bias64.shape != (c,):
            return "unsupported_producer"

        if a is not None:
            w64 = _scale_weight(unit, node, w64, a)
            if bias64 is not None:
                bias64 = bias64 * a
        if b is not None:
            bias64 = b if bias64 is None else bias64 + b

        # Write back: new constants (shared ones untouched), or our own updated in place.
        self.copied += len(shared)
        self.left -= copied_bytes
        if a is not None:
            self.store(node, 1, w64, w_dtype, w_tensor.name)
        z = cand.node.outputs[0]
        self.detach(cand.node)
        if unit.kind == "matmul" and unit.bias_node is None:
            if bias64 is not None:
                bias = self.new_const(f"{w_tensor.name}_bias", bias64, w_dtype)
                add = gs.Node("Add", name=self.fresh(f"{node.name or 'MatMul'}_bias_add"),
                              inputs=[node.outputs[0], bias], outputs=[z])
                self.replaced[id(cand.node)] = add
                self.node_ids.add(id(add))
                self.biases_added += 1
            else:
                node.outputs[0] = z
        else:
            if bias64 is not None:
                if bias_tensor is None:
                    self.biases_added += 1
                self.store(unit.bias_node, unit.bias_slot, bias64, b_dtype,
                           bias_tensor.name if bias_tensor is not None else f"{w_tensor.name}_bias")
                if unit.kind == "gemm":
                    node.attrs["beta"] = 1.0
            unit.out_node.outputs[0] = z
        self.folded[cand.kind] += 1
        self.layers.add(id(node))
        return None

    def detach(self, node: gs.Node) -> None:
        node.inputs.clear()
        node.outputs.clear()
        self.replaced.setdefault(id(node), None)

    def load(self, tensor: gs.Tensor) -> np.ndarray:
        if id(tensor) in self.masters:
            return self.masters[id(tensor)][1]
        value = self.value(tensor)
        # float32 weights stay float32 (_scale_weight computes each product in float64 and
        # rounds once; a float64 copy of every weight would double the pass's memory and time).
        # The array may be a read-only view of the model's bytes: arithmetic makes new arrays.
        return value if value.dtype == np.float32 else value.astype(np.float64)

    def new_const(self, base: str, values64: np.ndarray, dtype: np.dtype) -> gs.Constant:
        const = gs.Constant(self.fresh(base if base.endswith("_folded") else f"{base}_folded"),
                            np.ascontiguousarray(values64.astype(dtype, copy=False)))
        self.masters[id(const)] = (const, values64)
        return const

    def store(self, node: gs.Node, slot: int, values64: np.ndarray, dtype: np.dtype, base: str) -> None:
        current = node.inputs[slot] if slot < len(node.inputs) else None
        if current is not None and id(current) in self.masters:
            current.values = np.ascontiguousarray(values64.astype(dtype, copy=False))
            self.masters[id(current)] = (current, values64)
            return
        const = self.new_const(base, values64, dtype)
        if current is None:
            while len(node.inputs) < slot:
                node.inputs.append(gs.Variable.empty())
            node.inputs.append(const)
        else:
            node.inputs[slot] = const

    def max_weight_error(self) -> float:
        """Largest difference between a stored weight and its float64 value.

        Measured for half-precision weights; for float32 it is the rounding bound
        (half an ulp, |w|·2⁻²⁴), which a float64 -> float32 cast never exceeds,
        computed without a float64 copy of every weight.
        """
        worst = 0.0
        for const, ref in self.masters.values():
            if not const.outputs:  # no longer in use
                continue
            stored = const.values
            if stored.dtype == np.float32:
                if ref.size:  # max |w| from max and min: no |w| temporary
                    worst = max(worst, max(float(ref.max()), -float(ref.min())) * 2.0 ** -24)
            else:
                worst = max(worst, float(np.max(np.abs(ref - stored), initial=0.0)))
        return worst


# ----------------------------------------------------------------- helpers

class _Peek(NamedTuple):
    """A constant's type and shape, read without loading its values."""

    dtype: np.dtype
    shape: tuple

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _const_value(tensor: Optional[gs.Tensor], overridable: frozenset = frozenset(),
                 peek: bool = False) -> Optional[np.ndarray]:
    """The value behind a tensor (G.const_value: initializer, Constant node, through Identity),
    else None. With ``peek``, a constant still held in the model proto comes back as a _Peek
    (dtype, shape, ndim) instead: checks that need no values do not load large weights."""
    if peek:
        source = G.constant_source(tensor, overridable)
        lazy = source._values if isinstance(source, gs.Constant) else None
        if lazy is not None and not isinstance(lazy, (np.ndarray, SparseValues)) and isinstance(lazy.dtype, np.dtype):
            return _Peek(lazy.dtype, tuple(lazy.shape))
    return G.const_value(tensor, overridable)

def _nbytes(value) -> int:
    """Bytes of an array or a _Peek."""
    return int(np.prod(value.shape, dtype=np.int64)) * value.dtype.itemsize


def _rank(tensor: gs.Tensor) -> Optional[int]:
    shape = getattr(tensor, "shape", None)
    return None if shape is None else len(shape)


def _matmul_rank(mm: gs.Node, w: np.ndarray) -> tuple[Optional[int], int]:
    """(output rank when known, smallest possible output rank) of MatMul(A, W)."""
    ra = _rank(mm.inputs[0])
    if ra is not None and ra >= 1:
        rank = max(ra, w.ndim) if ra >= 2 else w.ndim - 1
        return rank, rank
    return _rank(mm.outputs[0]) or None, max(w.ndim - 1, 1)


def _per_channel(c: np.ndarray, channels: int, rank: Optional[int], min_rank: int,
                 axis_from_end: int) -> Optional[np.ndarray]:
    """``c`` as a [channels] vector when it broadcasts along the channel axis only, else None."""
    if c.ndim > (rank if rank is not None else min_rank):
        return None
    for i, d in enumerate(reversed(c.shape), 1):
        if d != 1 and not (i == axis_from_end and d == channels):
            return None
    flat = np.asarray(c, np.float64).reshape(-1)
    return np.full(channels, flat[0]) if flat.size == 1 else flat.copy()


def _scale_weight(unit: _Unit, node: gs.Node, w: np.ndarray, a: np.ndarray) -> np.ndarray:
    """A new weight: output channel k of ``w`` times a[k] (float64 products, stored in w's dtype)."""
    out = np.empty(w.shape, w.dtype)
    if unit.kind == "conv":
        np.multiply(w, a.reshape((-1,) + (1,) * (w.ndim - 1)), out=out, casting="same_kind")
    elif unit.kind == "convtranspose":
        group = int(node.attrs.get("group", 1))
        cin, per = w.shape[0], w.shape[1]
        shape = (group, cin // group, per) + w.shape[2:]
        np.multiply(w.reshape(shape), a.reshape((group, 1, per) + (1,) * (w.ndim - 2)),
                    out=out.reshape(shape), casting="same_kind")
    elif unit.kind == "gemm":
        np.multiply(w, a[:, None] if int(node.attrs.get("transB", 0)) else a[None, :], out=out, casting="same_kind")
    else:
        np.multiply(w, a, out=out, casting="same_kind")  # MatMul: the last axis
    return out