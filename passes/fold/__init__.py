"""Constant folding."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxopt import graph as G
from onnxopt.options import option
from onnxopt.pipeline import Pass, PassContext, PassResult, growth_limit, register_pass
from onnxopt.report import human_bytes

from .evaluate import _Evaluator, _run_ort
from .guard import _Guard, _Plan, _value_key
from .scopes import _DEFAULT_DOMAINS, _fresh, _infer_shapes, _scopes, _topo
from .values import _EXOTIC, _const_value, _loadable, _make_constant, _nbytes, _onnx_type

# Ops whose result changes from run to run (default domain); in other domains any op whose
# name says random or dropout.
_RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
_DEQUANTIZE_OPS = {"DequantizeLinear", "DynamicDequantizeLinear"}
_MAX_ROUNDS = 8


@dataclass
class FoldOptions:
    max_growth_bytes: Optional[int] = option(None, help="the most one run may add (it only tightens the pipeline's max_growth)")
    fold_shapes: bool = option(True, help="fold Shape/Size of values whose shape is statically known")
    fold_dequantize: bool = option(False, help="also fold DequantizeLinear of constants (undoes weight quantization)")


@register_pass
class ConstantFolding(Pass):
    """Evaluate nodes whose inputs are all constant and store their results as constants. Exact.

    Constant inputs are initializers, ``Constant`` nodes, results of other folded
    nodes and, with ``fold_shapes``, ``Shape``/``Size`` of values whose shape onnx
    shape inference (from the graph inputs, never from declared value_info or
    output shapes) knows statically. All foldable nodes of the model, every scope
    included, are evaluated together in one ONNX Runtime session (graph
    optimizations off); nodes it cannot run are found by bisection and evaluated
    alone, by ONNX Runtime or else ``onnx.reference``. Values read from an outer
    scope count as constant inside If/Loop/Scan bodies; inside loop bodies only
    values from outside the loop give static shapes. Rounds repeat while folding
    may make more shapes static.

    ``Constant`` nodes become initializers (their data moved, not copied) and
    Identity nodes of an initializer are bypassed to it (``constant_nodes_replaced``
    counts the former; both count in ``nodes_folded``). A folded value that is a
    graph output (any scope) keeps its tensor, name, type and declared shape,
    made by a ``Constant`` node; so are all folded values of IR < 4 models, where
    an initializer must be a graph input. Only values some remaining node reads
    are stored: ``constants_created``, ``bytes_created`` (new data; values moved
    out of ``Constant`` nodes are not new).

    Size guard: folding never grows the model past its growth allowance (the pipeline's
    ``max_growth`` left to this pass, or ``growth_limit`` of the graph when run alone,
    tightened by ``max_growth_bytes``). A node's growth is the bytes of the outputs it
    would store less the stored constants (initializers, Constant nodes) nothing would
    read any more, found through the chain of folded producers; the net growth of the
    nodes folded adds up against the allowance, and a folded value equal to another one
    folded is stored once. A weight read by several foldable nodes (sliced into gates,
    say) frees only when all of them fold: the plan assumes they do, and is made again
    counting only certain frees if it would pass the allowance. So a dequantization over narrow weights,
    (Cast(int8 W) - zero point) * scale, a Cast of fp16 weights to float, a Tile/Expand that
    blows up a constant, or a Transpose of a weight another node also reads (a tied
    embedding, which would store a second copy) stays unless it is tiny
    (``skipped_too_large``, with a note; a small result computed from such a node
    still folds). Left alone also: random ops and training-mode Dropout (``skipped_nondeterministic``),
    nodes holding subgraphs (``skipped_control_flow``), DequantizeLinear unless
    ``fold_dequantize`` (``skipped_dequantize``), nodes neither runtime
    can evaluate, that read constants it cannot read (4-bit types, unloaded external
    data), or whose result is no storable tensor (sequences: ``skipped_unsupported``), custom ops without inputs, model-local function
    bodies, and initializers the importer records as overridable graph inputs
    (``graph.initializer_inputs``).
    """

    name = "fold"
    Options = FoldOptions
    leaves_dangling = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats = {"nodes_folded": 0, "constant_nodes_replaced": 0, "constants_created": 0, "bytes_created": 0,
                 "rounds": 0, "skipped_too_large": 0, "skipped_nondeterministic": 0, "skipped_dequantize": 0,
                 "skipped_control_flow": 0, "skipped_unsupported": 0}
        folder = _Folder(graph, ctx, self.options, stats)
        for _ in range(_MAX_ROUNDS):
            stats["rounds"] += 1
            folded, shapes_may_improve = folder.round()
            if not folded or not shapes_may_improve:
                break
        notes = []
        if folder.refused:
            notes.append(f"{len(folder.refused)} node(s) left unfolded for size: folding the largest would grow "
                         f"the model by {human_bytes(max(folder.refused))}, over the {human_bytes(folder.allowance)} "
                         f"it may grow by (raise it with --max-growth)")
        return PassResult(stats["nodes_folded"] > 0, stats, notes)



def _is_default(node: gs.Node) -> bool:
    return (node.domain or "") in _DEFAULT_DOMAINS



# ----------------------------------------------------------------- the folder

class _Folder:
    def __init__(self, graph: gs.Graph, ctx: PassContext, options: FoldOptions, stats: dict) -> None:
        self.graph = graph
        self.ctx = ctx
        self.options = options
        self.stats = stats
        self.rejected: dict[int, gs.Node] = {}  # decided once not to fold; not retried (held: ids stay theirs)
        self.opset = ctx.opset or graph.opset or 0
        imported = getattr(graph, "import_domains", None)
        domains = {op.domain or "": op.version for op in (imported or [])}
        if self.opset:
            domains[""] = self.opset
        self.domains = domains
        # Before IR 4 every initializer must also be a graph input: make Constant nodes instead.
        self.as_nodes = bool(getattr(graph, "ir_version", None)) and graph.ir_version < 4
        # A model importing no default-domain opset (ai.onnx.ml only) cannot take Constant nodes.
        self.no_nodes = imported is not None and not any((op.domain or "") in _DEFAULT_DOMAINS for op in imported)
        self.functions = {(f.domain or "", f.name): f for f in getattr(graph, "functions", [])}
        # Initializers also listed as graph inputs (IR >= 4) are defaults a user may override:
        # not constants. onnx-graphsurgeon drops that listing; the importer may record it here.
        self.overridable = set(vars(graph).get("initializer_inputs") or ())
        # Bytes of tensor data this run may still add; the growth each refused node would have made.
        allowance, own = ctx.growth_allowance, options.max_growth_bytes
        if own is not None:
            allowance = own if allowance is None else min(allowance, own)
        if allowance is None:  # run alone: the default limit for this graph
            allowance = growth_limit(G.sizes(graph)[2]) or 0
        self.allowance = self.left = allowance
        self.refused: list[int] = []

    # ------------------------------------------------------------- one round

    def round(self) -> tuple[bool, bool]:
        """Analyse every scope, evaluate, rewrite. Returns (folded anything, shapes may improve)."""
        scopes = _scopes(self.graph)
        self._shapes: Optional[dict[str, list]] = None
        consumers: dict[int, list[gs.Node]] = {}
        interface: set[int] = set()  # graph outputs of some scope: keep their tensor, name and type
        for g, _ in scopes:
            interface.update(id(t) for t in g.outputs)
            for node in g.nodes:
                for t in node.inputs:
                    consumers.setdefault(id(t), []).append(node)

        values: dict[int, Any] = {}  # tensor id -> array, known before evaluation (loaded on demand)
        sources: dict[int, gs.Constant] = {}  # tensor id -> the constant holding its data
        pending: set[int] = set()  # tensor ids an evaluated node will make
        to_eval: list[gs.Node] = []
        analysed: list[gs.Node] = []  # nodes that may fold, producers before consumers
        keep: set[int] = set()  # evaluated for their consumers, never replaced
        held: set[int] = set()  # Constant nodes and Identity-of-initializer: fold without a copy
        shape_nodes_left = False

        def known(t: gs.Tensor) -> bool:
            if isinstance(t, gs.Constant) and t.name in self.overridable:
                return False
            source = t if isinstance(t, gs.Constant) else sources.get(id(t))
            if source is None:
                return (not t.name) or id(t) in values or id(t) in pending
            if id(t) not in values:
                value = _const_value(source)
                if value is None or _onnx_type(value) is None:
                    return False
                values[id(t)] = value
            return True

        for g, loop_local in scopes:
            for node in _topo(g.nodes):
                if id(node) in self.rejected:
                    continue
                default = _is_default(node)
                untouchable = self.as_nodes or any(id(t) in interface for t in node.outputs)
                if untouchable and self.no_nodes:
                    continue
                if node.op == "Constant" and default:
                    attr = node.attrs.get("value")
                    if isinstance(attr, gs.Constant) and len(node.outputs) == 1 and _loadable(attr):
                        sources[id(node.outputs[0])] = attr
                        if not untouchable:  # becomes an initializer
                            held.add(id(node))
                            analysed.append(node)
                    elif node.attrs and not isinstance(attr, gs.Constant):  # value_float(s), value_int(s)...
                        to_eval.append(node)
                        analysed.append(node)
                        pending.update(id(t) for t in node.outputs if t.name)
                        if untouchable:
                            keep.add(id(node))
                    continue
                if (default and node.op == "Identity" and len(node.inputs) == 1
                        and isinstance(node.inputs[0], gs.Constant)
                        and node.inputs[0].name not in self.overridable and _loadable(node.inputs[0])):
                    # Exporters share one weight through Identity nodes: read the constant itself, no copy.
                    sources[id(node.outputs[0])] = node.inputs[0]
                    if not untouchable:
                        held.add(id(node))
                        analysed.append(node)
                    continue
                if default and node.op in ("Shape", "Size") and node.inputs and (
                        isinstance(node.inputs[0], gs.Constant) or not known(node.inputs[0])):
                    value = self._static_shape_value(node, loop_local)
                    if value is None:  # folding may yet make its shape static, unless in a loop
                        shape_nodes_left |= self.options.fold_shapes and id(node.inputs[0]) not in loop_local
                        continue
                    values[id(node.outputs[0])] = value
                    analysed.append(node)
                    continue
                if not all(known(t) for t in sorted(node.inputs, key=lambda t: isinstance(t, gs.Constant))):
                    # variables first: a large weight is only loaded when it may be folded
                    if all(known(t) or self._unreadable(t) for t in node.inputs):
                        self.stats["skipped_unsupported"] += 1  # reads packed (4-bit) or external data
                        self.rejected[id(node)] = node
                    continue
                if not node.inputs and not default:
                    continue  # a custom op without inputs: a source of its own, maybe stateful
                reason = self._skip_reason(node, values)
                if reason:
                    self.stats[reason] += 1
                    self.rejected[id(node)] = node
                    continue
                to_eval.append(node)
                analysed.append(node)
                pending.update(id(t) for t in node.outputs if t.name)

        if not analysed:
            return False, False
        results, failed, blocked = self._evaluate(to_eval, values)
        results.update(values)
        for node in to_eval:
            if id(node) in failed:
                self.stats["skipped_unsupported"] += 1
                self.rejected[id(node)] = node

        # Decide, consumers before producers: an output is materialised only when some
        # node that stays reads it, or it is a graph output of some scope.
        candidates = [n for n in analysed if id(n) not in keep]
        context = (candidates, results, failed | blocked, consumers, interface, sources, held)
        # First assume that the other readers of a weight fold too (its parts sliced apart
        # for LSTM gates, say, free it together); if the plan then grows the model past
        # the allowance, decide again counting only what each fold frees for certain.
        plan = self._decide(*context, optimistic=True)
        if plan.growth > self.left:
            plan = self._decide(*context, optimistic=False)
        self.left -= plan.growth
        self.refused.extend(plan.refused)
        for reason, nodes in (("skipped_unsupported", plan.unsupported), ("skipped_too_large", plan.too_large)):
            self.stats[reason] += len(nodes)
            self.rejected.update((id(n), n) for n in nodes)
        folded = plan.folded

        if not folded:
            return False, False
        self._rerun_half_precision(to_eval, folded, values, results, failed | blocked)
        self._apply(scopes, candidates, folded, results, consumers, interface, sources, held)
        return True, shape_nodes_left

    def _decide(self, candidates, results, left_out, consumers, interface, sources, held,
                optimistic: bool) -> _Plan:
        """Which candidates fold, consumers before producers: an output is materialised only
        when some node that stays reads it, or it is a graph output of some scope."""
        plan = _Plan()
        guard = _Guard(self, candidates, left_out, consumers, interface, sources, held, plan.folded, optimistic)
        for node in reversed(candidates):
            if id(node) in left_out:
                continue
            guard.decided.add(id(node))
            needed = [t for t in node.outputs if t.name and (
                id(t) in interface or any(id(c) not in plan.folded for c in consumers.get(id(t), [])))]
            if id(node) not in held:
                if any(_onnx_type(results.get(id(t))) is None for t in needed):
                    plan.unsupported.append(node)
                    continue
                stored = guard.stored_bytes(node, [(t, results[id(t)]) for t in needed])
                if stored and not guard.admit(node, stored):
                    plan.too_large.append(node)
                    continue
            plan.folded[id(node)] = needed
        plan.refused = guard.refused
        plan.growth = guard.exact_growth(candidates)
        return plan

    # ------------------------------------------------------------- rules

    def _skip_reason(self, node: gs.Node, values: dict[int, Any]) -> Optional[str]:
        if G.subgraphs_of(node):
            return "skipped_control_flow"
        if _is_default(node):
            if node.op in _RANDOM_OPS:
                return "skipped_nondeterministic"
            if node.op == "Dropout" and _dropout_trains(node, values, self.opset):
                return "skipped_nondeterministic"
        else:
            lowered = node.op.lower()
            if "random" in lowered or "dropout" in lowered:
                return "skipped_nondeterministic"
        if node.op in _DEQUANTIZE_OPS and not self.options.fold_dequantize:
            return "skipped_dequantize"
        return None

    def _unreadable(self, t: gs.Tensor) -> bool:
        """A constant whose data fold cannot read (4-bit packed types, data left external)."""
        return isinstance(t, gs.Constant) and t.name not in self.overridable and not _loadable(t)

    def _static_shape_value(self, node: gs.Node, loop_local: set[int]) -> Optional[np.ndarray]:
        """Shape/Size of a value onnx shape inference knows statically, else None."""
        source = node.inputs[0]
        if isinstance(source, gs.Constant) and source.name in self.overridable:
            return None
        if isinstance(source, gs.Constant):
            dims = [int(d) for d in source._values.shape]  # no need to load the data
        elif not self.options.fold_shapes or id(source) in loop_local or not source.name:
            return None  # off, or a loop body value whose shape may change from one iteration to the next
        else:
            if self._shapes is None:
                self._shapes = _infer_shapes(self.graph, self.domains, self.ctx)
            dims = self._shapes.get(source.name)
        if dims is None:
            return None
        if node.op == "Size":
            return np.array(math.prod(dims), np.int64) if all(isinstance(d, int) for d in dims) else None
        start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
        picked = dims[start:end]  # python slicing clamps like Shape-15's start/end
        if not all(isinstance(d, int) for d in picked):
            return None
        return np.array(picked, np.int64)

    # ------------------------------------------------------------- evaluation

    def _evaluate(self, nodes: list[gs.Node], values: dict[int, Any]) -> tuple[dict[int, Any], set[int], set[int]]:
        """Run ``nodes`` (in order) on known ``values``: all at once in ORT, splitting on failure.

        Returns (tensor id -> value, ids of nodes neither runtime could run, ids of nodes
        left out because an input could not be made).
        """
        evaluator = _Evaluator(self, values)
        if nodes:
            evaluator.run(nodes)
        return evaluator.results, evaluator.failed, evaluator.blocked

    def _rerun_half_precision(self, to_eval, folded, values, results, left_out) -> None:
        """Recompute the stored values of fp16/bf16 chains asking ORT for those values only.

        ORT runs some half-precision ops in float32 and rounds only the values it hands
        back; asking for every intermediate value (to decide what to fold) rounds each one.
        The model at run time rounds only where a value leaves the chain, as the folded
        model will, so the stored values come from a session that returns only them.
        """
        half = (np.dtype(np.float16), *[d for t, d in _EXOTIC.values() if t == onnx.TensorProto.BFLOAT16])
        ran = [n for n in to_eval if id(n) not in left_out]
        if not any(isinstance(results.get(id(t)), np.ndarray) and results[id(t)].dtype in half
                   for n in ran for t in [*n.inputs, *n.outputs]):
            return
        wanted = {id(t) for n in ran if id(n) in folded for t in folded[id(n)]}
        if not wanted:
            return
        evaluator = _Evaluator(self, values)
        model, feeds, outputs = evaluator._model(ran, wanted)
        try:
            got = _run_ort(model, feeds, [name for name, _ in outputs])
        except Exception:  # noqa: BLE001 - some node needed onnx.reference: keep the first values
            return
        for (_, t), value in zip(outputs, got):
            if _onnx_type(value) is not None and value.dtype == results[id(t)].dtype:
                results[id(t)] = value

    # ------------------------------------------------------------- rewriting

    def _apply(self, scopes, candidates, folded, results, consumers, interface, sources, held) -> None:
        taken = {n.name for g, _ in scopes for n in g.nodes if n.name}
        replacement: dict[int, list[gs.Node]] = {}
        made: dict[Any, gs.Constant] = {}  # values -> the constant made for them
        for node in candidates:
            needed = folded.get(id(node))
            if needed is None:
                continue
            self.stats["nodes_folded"] += 1
            self.stats["constant_nodes_replaced"] += int(node.op == "Constant")
            pairs = []
            for t in needed:
                if id(node) in held:
                    source = sources[id(t)]
                    if node.op == "Identity":
                        pairs.append((t, source))  # consumers read the initializer itself
                        continue
                    data = source._values  # the Constant node's data, shared when gs holds it unloaded
                    const = gs.Constant(t.name, data) if isinstance(data, LazyValues) else \
                        _make_constant(t.name, np.asarray(data))
                else:
                    value = results[id(t)]
                    key = _value_key(value) if id(t) not in interface and not self.as_nodes else None
                    if key is not None and key in made:
                        pairs.append((t, made[key]))  # the same values folded elsewhere: one constant
                        continue
                    const = _make_constant(t.name, value)
                    if key is not None:
                        made[key] = const
                    self.stats["bytes_created"] += _nbytes(value)
                self.stats["constants_created"] += 1
                pairs.append((t, const))
            node.inputs.clear()
            node.outputs.clear()
            new_nodes = []
            for t, const in pairs:
                if id(t) in interface or self.as_nodes:
                    name = _fresh(taken, f"{t.name}_folded")
                    new_nodes.append(gs.Node("Constant", name=name, attrs={"value": const}, outputs=[t]))
                else:
                    for consumer in consumers.get(id(t), []):
                        if id(consumer) not in folded:
                            G.rewire_input(consumer, t, const)
            replacement[id(node)] = new_nodes
        for g, _ in scopes:
            if any(id(n) in replacement for n in g.nodes):
                rebuilt = []
                for n in g.nodes:
                    rebuilt.extend(replacement.get(id(n), [n]))
                g.nodes = rebuilt


def _dropout_trains(node: gs.Node, values: dict[int, Any], opset: int) -> bool:
    """Dropout in training mode draws a random mask."""
    if opset and opset < 7:
        return node.attrs.get("is_test", 0) == 0
    if len(node.inputs) > 2 and node.inputs[2].name:
        mode = values.get(id(node.inputs[2]))
        return mode is None or bool(np.any(mode))
    return False

