"""fold: evaluating nodes on known values, in one ONNX Runtime session, bisecting on failure,
single nodes falling back to onnx.reference."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxopt.runtime import session_for

from .values import _EXOTIC, _EXOTIC_BY_DTYPE, _onnx_type

if TYPE_CHECKING:
    from . import _Folder


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
    session = session_for(model, options)  # from files when the folded values are large
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

