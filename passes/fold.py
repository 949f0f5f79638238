"""Constant folding."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from onnxopt import graph as G
from onnxopt.io import iter_graph_protos
from onnxopt.options import option
from onnxopt.pipeline import Pass, PassContext, PassResult, register_pass

try:  # onnx depends on ml_dtypes; ORT hands these types back as raw bytes
    import ml_dtypes

    _EXOTIC = {
        "tensor(bfloat16)": (onnx.TensorProto.BFLOAT16, np.dtype(ml_dtypes.bfloat16)),
        "tensor(float8e4m3fn)": (onnx.TensorProto.FLOAT8E4M3FN, np.dtype(ml_dtypes.float8_e4m3fn)),
        "tensor(float8e4m3fnuz)": (onnx.TensorProto.FLOAT8E4M3FNUZ, np.dtype(ml_dtypes.float8_e4m3fnuz)),
        "tensor(float8e5m2)": (onnx.TensorProto.FLOAT8E5M2, np.dtype(ml_dtypes.float8_e5m2)),
        "tensor(float8e5m2fnuz)": (onnx.TensorProto.FLOAT8E5M2FNUZ, np.dtype(ml_dtypes.float8_e5m2fnuz)),
    }
except ImportError:  # pragma: no cover - ml_dtypes ships with onnx
    _EXOTIC = {}
_EXOTIC_BY_DTYPE = {dtype: onnx_type for onnx_type, dtype in _EXOTIC.values()}

# Element types held packed (several per byte) or without a numpy form: never read nor made.
_PACKED = {getattr(onnx.TensorProto, n) for n in ("UINT4", "INT4", "FLOAT4E2M1", "UINT2", "INT2", "FLOAT8E8M0")
           if hasattr(onnx.TensorProto, n)}

# Ops whose result changes from run to run (default domain); in other domains any op whose
# name says random or dropout.
_RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
_DEQUANTIZE_OPS = {"DequantizeLinear", "DynamicDequantizeLinear"}
_LOOP_OPS = {"Loop", "Scan"}
_DEFAULT_DOMAINS = ("", "ai.onnx")
_MAX_ROUNDS = 8


@dataclass
class FoldOptions:
    max_growth_bytes: int = option(1 << 20, help="skip a node whose folding would grow the model by more")
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

    Left alone: random ops and training-mode Dropout (``skipped_nondeterministic``),
    nodes holding subgraphs (``skipped_control_flow``), DequantizeLinear unless
    ``fold_dequantize`` (``skipped_dequantize``), nodes whose folding would grow the
    model by more than ``max_growth_bytes``: the outputs stored, less the inputs nothing
    reads afterwards, so a Tile/Expand that blows up a constant, or a Transpose of a weight
    another node also reads (a tied embedding), which would store a second copy
    (``skipped_too_large``; a small result computed from such a node still folds), nodes neither runtime
    can evaluate or whose result is no storable tensor (sequences, 4-bit types:
    ``skipped_unsupported``), custom ops without inputs, model-local function
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
        return PassResult(stats["nodes_folded"] > 0, stats)


# ----------------------------------------------------------------- values

def _const_value(tensor: gs.Constant) -> Optional[np.ndarray]:
    """A constant's values without caching them on the tensor (gs would re-encode them on export)."""
    values = tensor._values
    if isinstance(values, SparseValues):
        return None
    if isinstance(values, LazyValues):
        proto = values.tensor
        if proto.data_type in _PACKED or proto.data_location == onnx.TensorProto.EXTERNAL:
            return None
        try:
            return numpy_helper.to_array(proto)
        except Exception:  # noqa: BLE001 - unreadable data: not a usable constant
            return None
    return np.asarray(values)


def _onnx_type(value: Any) -> Optional[int]:
    """The ONNX element type of an array we can feed and store, else None."""
    if not isinstance(value, np.ndarray):
        return None
    if value.dtype in _EXOTIC_BY_DTYPE:
        return _EXOTIC_BY_DTYPE[value.dtype]
    if value.dtype == object:
        return onnx.TensorProto.STRING if all(isinstance(v, (str, bytes)) for v in value.flat) else None
    try:
        onnx_type = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
    except Exception:  # noqa: BLE001 - complex or other unmapped numpy types
        return None
    return None if onnx_type in _PACKED else onnx_type


def _nbytes(value: Any) -> int:
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return int(sum(len(v) for v in value.flat if isinstance(v, (str, bytes))))
        return int(value.nbytes)
    return 0


def _make_constant(name: str, value: np.ndarray) -> gs.Constant:
    """A gs.Constant exported from its own TensorProto: dtype (fp16, bf16, strings...) and shape kept."""
    return gs.Constant(name, LazyValues(numpy_helper.from_array(value, name)))


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
                    continue  # variables first: a large weight is only loaded when it may be folded
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
        folded: dict[int, list[gs.Tensor]] = {}
        for node in reversed(candidates):
            if id(node) in failed or id(node) in blocked:
                continue
            needed = [t for t in node.outputs if t.name and (
                id(t) in interface or any(id(c) not in folded for c in consumers.get(id(t), [])))]
            if id(node) not in held:
                if any(_onnx_type(results.get(id(t))) is None for t in needed):
                    self.stats["skipped_unsupported"] += 1
                    self.rejected[id(node)] = node
                    continue
                # Growth of the model: the outputs stored, less the inputs nothing reads afterwards
                # (a weight another node still reads stays, and its folded copy would be extra).
                inputs = {id(t): t for t in node.inputs if t.name}
                freed = sum(_nbytes(results.get(k)) for k, t in inputs.items()
                            if k not in interface
                            and all(c is node or id(c) in folded for c in consumers.get(k, [])))
                grown = sum(_nbytes(results[id(t)]) for t in needed) - freed
                if grown > self.options.max_growth_bytes:
                    self.stats["skipped_too_large"] += 1
                    self.rejected[id(node)] = node
                    continue
            folded[id(node)] = needed

        if not folded:
            return False, False
        self._rerun_half_precision(to_eval, folded, values, results, failed | blocked)
        self._apply(scopes, candidates, folded, results, consumers, interface, sources, held)
        return True, shape_nodes_left

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
                    const = _make_constant(t.name, value)
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


class _Evaluator:
    """Evaluates a list of nodes on known values; bisects on failure, single nodes fall back to onnx.reference."""

    def __init__(self, folder: _Folder, values: dict[int, Any]) -> None:
        self.folder = folder
        self.values = values
        self.results: dict[int, Any] = {}
        self.failed: set[int] = set()
        self.blocked: set[int] = set()

    def value(self, t: gs.Tensor) -> Any:
        return self.results.get(id(t), self.values.get(id(t)))

    def run(self, nodes: list[gs.Node]) -> None:
        ready, made = [], set()
        for node in nodes:
            ok = all((not t.name) or id(t) in made or _onnx_type(self.value(t)) is not None for t in node.inputs)
            if ok:
                ready.append(node)
                made.update(id(t) for t in node.outputs if t.name)
            else:
                self.blocked.add(id(node))
        if not ready:
            return
        model, feeds, outputs = self._model(ready)
        try:
            got = _run_ort(model, feeds, [name for name, _ in outputs])
        except Exception:  # noqa: BLE001 - find the node(s) ORT cannot run
            if len(ready) == 1:
                try:
                    got = _run_reference(model, feeds, [name for name, _ in outputs])
                except Exception:  # noqa: BLE001
                    self.failed.add(id(ready[0]))
                    return
            else:
                half = len(ready) // 2
                self.run(ready[:half])
                self.run(ready[half:])
                return
        for (_, t), value in zip(outputs, got):
            self.results[id(t)] = value

    def _model(self, nodes: list[gs.Node], wanted: Optional[set[int]] = None
               ) -> tuple[onnx.ModelProto, dict[str, Any], list[tuple[str, gs.Tensor]]]:
        """A model of ``nodes`` whose inputs are the known values they read (fed, not stored) and
        whose outputs are every value they make, or those in ``wanted`` (tensor ids)."""
        names: dict[int, str] = {}

        def name_of(t: gs.Tensor) -> str:
            if not t.name:
                return ""
            if id(t) not in names:
                names[id(t)] = f"v{len(names)}"
            return names[id(t)]

        protos, outputs, made = [], [], set()
        for node in nodes:
            proto = OnnxExporter.export_node(node)
            del proto.input[:]
            proto.input.extend(name_of(t) for t in node.inputs)
            del proto.output[:]
            proto.output.extend(name_of(t) for t in node.outputs)
            protos.append(proto)
            for t in node.outputs:
                if t.name:
                    made.add(id(t))
                    if wanted is None or id(t) in wanted:
                        outputs.append((name_of(t), t))
        feeds, graph_inputs, seen = {}, [], set()
        for node in nodes:
            for t in node.inputs:
                if t.name and id(t) not in made and id(t) not in seen:
                    seen.add(id(t))
                    value = self.value(t)
                    feeds[name_of(t)] = value
                    graph_inputs.append(onnx.helper.make_tensor_value_info(name_of(t), _onnx_type(value), value.shape))
        domains = dict(self.folder.domains)
        for node in nodes:
            if node.domain and node.domain not in domains:
                domains[node.domain] = 1
        functions = []
        if any((node.domain or "", node.op) in self.folder.functions for node in nodes):
            for func in self.folder.functions.values():  # all of them: functions may call functions
                functions.append(OnnxExporter.export_function(func))
                domains.setdefault(func.domain or "", 1)
        graph = onnx.helper.make_graph(protos, "fold", graph_inputs,
                                       [onnx.helper.make_empty_tensor_value_info(n) for n, _ in outputs])
        opsets = [onnx.helper.make_opsetid(d, v) for d, v in domains.items()]
        model = onnx.helper.make_model(graph, opset_imports=opsets, functions=functions)
        try:
            model.ir_version = max(8, onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True))
        except Exception:  # noqa: BLE001 - an opset this onnx does not know
            model.ir_version = onnx.IR_VERSION
        return model, feeds, outputs


# ----------------------------------------------------------------- runtimes

def _run_ort(model: onnx.ModelProto, feeds: dict[str, Any], outputs: list[str]) -> list[Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    exotic = any(o.type in _EXOTIC for o in session.get_outputs()) or any(
        isinstance(v, np.ndarray) and v.dtype in _EXOTIC_BY_DTYPE for v in feeds.values())
    if not exotic:
        return session.run(outputs, feeds)
    ort_feeds = {}
    for name, value in feeds.items():
        if value.dtype in _EXOTIC_BY_DTYPE:
            ort_feeds[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(value, _EXOTIC_BY_DTYPE[value.dtype])
        else:
            ort_feeds[name] = ort.OrtValue.ortvalue_from_numpy(value)
    got = session.run_with_ort_values(outputs, ort_feeds)
    return [_from_ort(got[i]) for i in range(len(outputs))]


def _from_ort(value: Any) -> Any:
    if not value.is_tensor():
        return None  # sequences and optionals are evaluated but never stored
    kind = value.data_type()
    if kind not in _EXOTIC:
        return value.numpy()
    import ctypes

    size = value.tensor_size_in_bytes()
    data = ctypes.string_at(value.data_ptr(), size) if size else b""
    return np.frombuffer(data, dtype=_EXOTIC[kind][1]).reshape(value.shape()).copy()


def _run_reference(model: onnx.ModelProto, feeds: dict[str, Any], outputs: list[str]) -> list[Any]:
    from onnx.reference import ReferenceEvaluator

    got = ReferenceEvaluator(model).run(outputs, feeds)
    return [np.asarray(v) if isinstance(v, np.ndarray) or np.isscalar(v) else None for v in got]


# ----------------------------------------------------------------- graph walking

def _scopes(graph: gs.Graph) -> list[tuple[gs.Graph, set[int]]]:
    """Every graph (no function bodies), outer before inner, with the ids of values made inside
    an enclosing Loop/Scan body (their shapes may change from one iteration to the next)."""
    found: list[tuple[gs.Graph, set[int]]] = []

    def visit(g: gs.Graph, loop_local: set[int]) -> None:
        found.append((g, loop_local))
        for node in g.nodes:
            for sub in G.subgraphs_of(node):
                inner = loop_local | _defined(sub) if node.op in _LOOP_OPS else loop_local
                visit(sub, inner)

    visit(graph, set())
    return found


def _defined(graph: gs.Graph) -> set[int]:
    """Ids of values a graph and its nested graphs take as inputs or make."""
    ids = set()
    for g in G.iter_graphs(graph, functions=False):
        ids.update(id(t) for t in g.inputs)
        for node in g.nodes:
            ids.update(id(t) for t in node.outputs)
    return ids


def _topo(nodes: list[gs.Node]) -> list[gs.Node]:
    """Nodes in dependency order (the given order when already sorted); nodes in cycles last."""
    made = {id(t): i for i, n in enumerate(nodes) for t in n.outputs}
    waiting = [0] * len(nodes)
    users: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        deps = {made[id(t)] for t in node.inputs if id(t) in made and made[id(t)] != i}
        waiting[i] = len(deps)
        for d in deps:
            users.setdefault(d, []).append(i)
    ready = [i for i in range(len(nodes)) if waiting[i] == 0]
    ready.reverse()
    order = []
    while ready:
        i = ready.pop()
        order.append(i)
        for u in reversed(users.get(i, [])):
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    placed = set(order)
    order += [i for i in range(len(nodes)) if i not in placed]
    return [nodes[i] for i in order]


def _fresh(taken: set[str], base: str) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def _loadable(tensor: gs.Constant) -> bool:
    """Whether a constant's data can be read as an array we can feed and store (without loading it)."""
    values = tensor._values
    if isinstance(values, SparseValues):
        return False
    if isinstance(values, LazyValues):
        proto = values.tensor
        return (proto.data_type not in _PACKED and proto.data_type != onnx.TensorProto.UNDEFINED
                and proto.data_location != onnx.TensorProto.EXTERNAL)
    return _onnx_type(np.asarray(values)) is not None


def _dropout_trains(node: gs.Node, values: dict[int, Any], opset: int) -> bool:
    """Dropout in training mode draws a random mask."""
    if opset and opset < 7:
        return node.attrs.get("is_test", 0) == 0
    if len(node.inputs) > 2 and node.inputs[2].name:
        mode = values.get(id(node.inputs[2]))
        return mode is None or bool(np.any(mode))
    return False


def _infer_shapes(graph: gs.Graph, domains: dict[str, int], ctx: PassContext) -> dict[str, list]:
    """Name -> dims (int, or None when unknown) from onnx shape inference with data propagation.

    Declared shapes of graph outputs and value_info are dropped first: exporters get
    them wrong. Large initializers become graph inputs (their shapes are all that
    inference needs) so the model stays small.
    """
    template = onnx.helper.make_model(onnx.helper.make_graph([], "t", [], []),
                                      opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in domains.items()])
    try:
        model = G.export_model(graph, template)
        for g in iter_graph_protos(model.graph):
            del g.value_info[:]
            for out in g.output:
                if out.type.HasField("tensor_type"):
                    out.type.tensor_type.ClearField("shape")
            for n in g.node:  # loop-carried values change shape: trust no declared body input shape
                if n.op_type in _LOOP_OPS and (n.domain or "") in _DEFAULT_DOMAINS:
                    for attr in n.attribute:
                        for vi in (attr.g.input if attr.HasField("g") else []):
                            if vi.type.HasField("tensor_type"):
                                vi.type.tensor_type.ClearField("shape")
        top = model.graph
        kept = []
        for init in top.initializer:
            if init.data_type == onnx.TensorProto.INT64 and _elements(init) <= 4096:
                kept.append(init)
            else:
                top.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        del top.initializer[:]
        top.initializer.extend(kept)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - no static shapes then
        ctx.log.debug("fold: shape inference failed: %s", exc)
        return {}
    shapes: dict[str, list] = {}
    for g in iter_graph_protos(inferred.graph):
        for vi in [*g.input, *g.value_info, *g.output]:
            t = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
            if t is None or not t.HasField("shape"):
                continue
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                               for d in t.shape.dim]
    return shapes


def _elements(init: onnx.TensorProto) -> int:
    return math.prod(init.dims)



