"""Results: the OptimizeResult object, its JSON report, and summaries for people."""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import onnx

from . import io
from .metrics import group_kv, kv_role
from .errors import ValidationFailed
from .pipeline import PassRecord
from .serialize import serialized_size
from .validate import Comparison

SCHEMA = "onnxopt.report/1"


@dataclass
class OptimizeResult:
    """What ``optimize`` returns: the rewritten model, what each pass did, and the validation."""

    model: onnx.ModelProto
    original: Optional[onnx.ModelProto] = field(repr=False)
    pipeline: str
    records: list[PassRecord]
    validation: Optional[Comparison] = None
    source: Optional[str] = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    output: Optional[str] = None
    inputs: Optional[dict[str, Any]] = None  # what validation ran on (kind, source, shapes, dims)
    not_run: Optional[str] = None  # why validation could not run, when it could not

    @property
    def passed(self) -> bool:
        """True unless validation ran and failed."""
        return self.validation is None or self.validation.passed

    def save(self, path: str | os.PathLike, *, external_data: Optional[bool] = None,
             in_place: bool = False, force: bool = False) -> Path:
        """Write the model atomically; refuses a model that failed validation unless ``force``."""
        if not self.passed and not force:
            raise ValidationFailed(f"not saving: validation failed ({self.validation.headline()})")
        written = io.save(self.model, path, external_data=external_data, input_path=self.source,
                          in_place=in_place)
        self.output = str(written)
        return written

    def release_original(self) -> None:
        """Drop the original model, keeping its statistics: ``original`` is None afterwards
        (reload it from ``source``). Frees memory while a large rewrite is validated."""
        _ = self.totals
        self.original = None

    @functools.cached_property
    def totals(self) -> tuple[dict[str, int], dict[str, int]]:
        """Nodes, parameters and bytes of the original and the result; computed once
        (walking a large model is not free, and the summary and the report both need them)."""
        return _totals(self.original), _totals(self.model)

    def to_dict(self) -> dict[str, Any]:
        before, after = self.totals
        return {
            "schema": SCHEMA,
            "source": self.source,
            "output": self.output,
            "pipeline": self.pipeline,
            "passed": self.passed,
            "seconds": round(self.seconds, 4),
            "before": before,
            "after": after,
            "passes": [asdict(r) for r in self.records],
            "validation": self.validation.to_dict() if self.validation else None,
            "validation_inputs": self.inputs,
            "validation_not_run": self.not_run,
            "warnings": list(self.warnings),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def write_report(self, path: str | os.PathLike) -> None:
        write_text_atomic(Path(path), self.to_json() + "\n")

    def summary(self) -> str:
        return format_summary(self)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=io.temp_prefix(), dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _totals(model: onnx.ModelProto) -> dict[str, int]:
    counts = op_histogram(model)
    return {"nodes": sum(counts.values()), "parameters": parameter_count(model),
            "tensor_bytes": io.tensor_bytes(model), "file_bytes": serialized_size(model)}


def op_histogram(model: onnx.ModelProto) -> collections.Counter:
    """Op type -> count over the graph, its subgraphs and model-local functions."""
    counts: collections.Counter = collections.Counter()
    for g in io.iter_graph_protos(model.graph):
        counts.update(_op_key(n) for n in g.node)
    for func in model.functions:
        counts.update(_op_key(n) for n in func.node)
    return counts


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def parameter_count(model: onnx.ModelProto) -> int:
    return io.parameter_count(model)


# ----------------------------------------------------------------- formatting

def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _change(before: float, after: float) -> str:
    if before == 0:
        return ""
    return f" ({100.0 * (after - before) / before:+.1f}%)"


def _did(record: PassRecord) -> str:
    """Non-zero counts; for a pass that changed nothing only what it skipped (and why)."""
    parts = [f"{k.replace('_', ' ')} {v}" for k, v in record.stats.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and v
             and (record.modified or k.startswith("skipped"))]
    if parts:
        return ", ".join(parts) if record.modified else "nothing changed; " + ", ".join(parts)
    return "changed the graph" if record.modified else "nothing to do"


def _merge_repeats(records: list[PassRecord]) -> list[tuple[PassRecord, int]]:
    """One row per pass for people: runs of a fixed-point group summed (the JSON keeps every run)."""
    rows: dict[tuple, tuple[PassRecord, int]] = {}
    for r in records:
        key = (r.canonical, r.auto)
        if key not in rows:
            rows[key] = (PassRecord(**{**r.__dict__, "stats": dict(r.stats), "notes": list(r.notes)}), 1)
            continue
        merged, runs = rows[key]
        merged.seconds += r.seconds
        merged.modified |= r.modified
        # before = the first run's; after = before plus every run's own change
        merged.nodes_after += r.nodes_after - r.nodes_before
        merged.params_after += r.params_after - r.params_before
        merged.bytes_after += r.bytes_after - r.bytes_before
        for k, v in r.stats.items():
            old = merged.stats.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(old, (int, float)):
                merged.stats[k] = max(old, v) if k.startswith("max_") else old + v
        rows[key] = (merged, runs + 1)
    return list(rows.values())


def format_summary(result: OptimizeResult) -> str:
    d = result.to_dict()
    lines = [f"onnxopt: {result.source or 'model'}" + (f" -> {result.output}" if result.output else ""),
             f"pipeline: {result.pipeline}"]
    if result.records:
        lines.append(f"  {'pass':<14} {'time':>9}  {'nodes':>13}  {'parameters':>23}  what it did")
        for r, runs in _merge_repeats(result.records):
            label = r.name + (" (auto)" if r.auto else "") + (f" x{runs}" if runs > 1 else "")
            lines.append(f"  {label:<14} {r.seconds * 1000:>7.1f}ms  {r.nodes_before:>5} -> {r.nodes_after:<5}"
                         f"  {r.params_before:>10,} -> {r.params_after:<10,}  {_did(r)}")
        # a pass run again by a fixed-point group often says the same again: once is enough
        lines.extend(dict.fromkeys(f"  note ({r.name}): {note}" for r in result.records for note in r.notes))
    b, a = d["before"], d["after"]
    lines.append(f"size: {human_bytes(b['file_bytes'])} -> {human_bytes(a['file_bytes'])}"
                 f"{_change(b['file_bytes'], a['file_bytes'])}   nodes: {b['nodes']} -> {a['nodes']}"
                 f"   parameters: {b['parameters']:,} -> {a['parameters']:,}")
    if result.inputs and result.inputs.get("text"):
        lines.append(f"validation inputs: {result.inputs['text']}")
    if result.validation:
        lines.extend(format_comparison(result.validation))
    elif result.not_run:
        lines.append(f"validation: not run ({result.not_run})")
    else:
        lines.append("validation: skipped")
    lines.extend(f"warning: {w}" for w in result.warnings)
    return "\n".join(lines)


def format_comparison(c: Comparison) -> list[str]:
    source = "synthetic inputs" if c.synthetic else c.data
    lines = [f"validation: ONNX Runtime (optimization level '{c.ort_opt_level}'), {c.samples} sample(s) from {source}"]
    for o in c.outputs:
        if o.elements and not o.compared and o.nonfinite_reference:
            lines.append(f"  {o.name}: FAIL: no finite value to compare")
            lines.extend(f"    {f}" for f in o.failures)
            continue
        figures = f"max abs {o.max_abs:.3g}"
        if o.floor_max_abs is not None:
            figures += f" (runtime noise {o.floor_max_abs:.3g})"
        figures += (f", mean abs {o.mean_abs:.3g}, max rel {o.max_rel:.3g}, "
                    f"cosine {o.cosine:.6f}, SNR {o.snr_db:.1f} dB")
        figures += _kind_figures(o)
        state = "FAIL" if not o.passed else ("identical" if o.identical else "ok")
        lines.append(f"  {o.name} [{o.kind}]: {state}: {figures}")
        lines.extend(f"    {f}" for f in o.failures)
    lines.append("  judged as: " + "; ".join(f"{o.name} {o.kind} ({o.kind_reason})" for o in c.outputs)
                 + " (override with --output-kind NAME=KIND)")
    lines.extend(_metric_lines(c))
    verdict = "PASSED" if c.passed else "FAILED"
    lines.append(f"  {verdict} (tolerance {c.tolerance})")
    if c.floor_level:
        lines.append(f"  runtime noise: the original's own max abs difference between optimization levels "
                     f"'{c.ort_opt_level}' and '{c.floor_level}'")
        lines.extend(_tighter_than_runtime(c))
    if c.latency_reference_ms is not None:
        ratio = c.latency_reference_ms / c.latency_candidate_ms if c.latency_candidate_ms else math.nan
        runs = f"; {c.latency_runs[0]} / {c.latency_runs[1]} runs" if c.latency_runs else ""
        lines.append(f"latency (median): {c.latency_reference_ms:.3f} ms -> {c.latency_candidate_ms:.3f} ms"
                     f" ({ratio:.2f}x speed-up{runs})")
    lines.extend(f"note: {n}" for n in c.notes)
    return lines


def _kind_figures(o) -> str:
    """The figures that fit the output's kind: top-1 for class scores only."""
    text = ""
    if o.top1_agreement is not None:
        what = "top-1 agreement" if o.kind == "classes" else "per-position top-1 agreement"
        text += f", {what} {100 * o.top1_agreement:.2f}%"
    if o.sequence_match is not None:
        text += f", sequence match {100 * o.sequence_match:.2f}%"
    if o.accuracy_reference is not None:
        text += f", accuracy {100 * o.accuracy_reference:.2f}% -> {100 * o.accuracy_candidate:.2f}%"
    if o.vector_cosine_mean is not None:
        text += f", per-vector cosine mean {o.vector_cosine_mean:.6f} (worst {o.vector_cosine_min:.6f})"
    if o.perplexity_reference is not None:
        text += f", perplexity {o.perplexity_reference:.6g} -> {o.perplexity_candidate:.6g}"
    return text


def _metric_lines(c: Comparison) -> list[str]:
    lines = []
    for m in c.metrics:
        way = "lower is better" if m.lower_is_better else "higher is better"
        limit = f", limit {m.limit:g}" if m.limit is not None else ""
        state = "FAIL" if not m.passed else "ok"
        lines.append(f"  metric {m.name} ({m.source}; {way}): {state}: {m.reference:.6g} -> {m.candidate:.6g}"
                     f" (drop {m.drop:.4g}{limit})")
    return lines


def _tighter_than_runtime(c: Comparison) -> list[str]:
    """A line per output whose atol, given without floor_multiple, asks for more than ORT has."""
    tol = c.tolerance
    if tol.atol is None or tol.floor_multiple is not None:
        return []
    return [f"  note: atol={tol.atol:g} is tighter than ONNX Runtime's own noise on '{o.name}' "
            f"({o.floor_max_abs:.3g}); add floor_multiple=N to the tolerance to allow N times that"
            for o in c.outputs if o.floor_max_abs is not None and o.floor_max_abs > tol.atol]


# ----------------------------------------------------------------- inspect

def inspect_model(path: str | os.PathLike) -> dict[str, Any]:
    """What ``onnxopt inspect`` shows, as data."""
    raw = io._read(Path(path))
    external = collections.Counter()
    for tensor in io._external_tensors(raw):
        info = {e.key: e.value for e in tensor.external_data}
        external[info.get("location", "?")] += int(info.get("length", 0) or 0)
    model = io.load(path)
    by_dtype: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"tensors": 0, "parameters": 0, "bytes": 0})
    for tensor in io.iter_tensors(model.graph):
        row = by_dtype[onnx.TensorProto.DataType.Name(tensor.data_type).lower()]
        row["tensors"] += 1
        row["parameters"] += math.prod(tensor.dims)
        row["bytes"] += io.stored_bytes(tensor)  # without copying the data out
    subgraphs = sum(1 for _ in io.iter_graph_protos(model.graph)) - 1
    hist = op_histogram(model)
    inputs = [_value(v) for v in model.graph.input if v.name not in {t.name for t in model.graph.initializer}]
    outputs = [_value(v) for v in model.graph.output]
    return {
        "path": str(path),
        "file_bytes": Path(path).stat().st_size,
        "ir_version": model.ir_version,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "nodes": sum(hist.values()),
        "ops": dict(hist.most_common()),
        "parameters": sum(r["parameters"] for r in by_dtype.values()),
        "by_dtype": dict(by_dtype),
        "inputs": inputs,
        "outputs": outputs,
        # a decoder's cache tensors, grouped by name pattern (layers, key/value roles)
        "kv_cache": {"inputs": group_kv(inputs), "outputs": group_kv(outputs)},
        "external_data": dict(external),
        "subgraphs": subgraphs,
        "functions": [f"{f.domain}.{f.name}" if f.domain else f.name for f in model.functions],
    }


def _value(v: onnx.ValueInfoProto) -> dict[str, Any]:
    t = v.type.tensor_type
    dims = ["?" if not (d.HasField("dim_value") or d.dim_param) else (d.dim_value if d.HasField("dim_value") else d.dim_param)
            for d in t.shape.dim] if t.HasField("shape") else None
    dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower() if v.type.HasField("tensor_type") else "non-tensor"
    out: dict[str, Any] = {"name": v.name, "dtype": dtype, "shape": dims}
    role = kv_role(v.name)
    if role is not None:
        out["kv_cache"] = {"layer": role[0], "role": role[1]}
    return out


def _shape_text(shape: Optional[list]) -> str:
    return "unknown" if shape is None else "[" + ", ".join(map(str, shape)) + "]"


def format_inspect(info: dict[str, Any]) -> str:
    opsets = ", ".join(f"{d} {v}" for d, v in info["opsets"].items())
    lines = [f"{info['path']}: {human_bytes(info['file_bytes'])}, IR version {info['ir_version']}, opsets: {opsets}",
             f"producer: {info['producer'] or '(none)'}",
             f"nodes: {info['nodes']}  (" + ", ".join(f"{k} {v}" for k, v in info["ops"].items()) + ")",
             f"parameters: {info['parameters']:,}"]
    for dtype, row in info["by_dtype"].items():
        lines.append(f"  {dtype}: {row['tensors']} tensors, {row['parameters']:,} values, {human_bytes(row['bytes'])}")
    for role in ("inputs", "outputs"):
        lines.append(f"{role}:")
        for v in info[role]:
            if "kv_cache" not in v:
                lines.append(f"  {v['name']}: {v['dtype']} {_shape_text(v['shape'])}")
        for g in info.get("kv_cache", {}).get(role, []):
            layers = g["layers"]
            span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"
            if len(layers) > 1 and layers != list(range(layers[0], layers[-1] + 1)):
                span = "layers " + ", ".join(map(str, layers))
            lines.append(f"  KV cache: {g['pattern']}: {g['tensors']} tensors, {span}, "
                         f"{' and '.join(g['roles'])}; {g['dtype']} {_shape_text(g['shape'])}")
    if info["external_data"]:
        lines.append("external data: " + ", ".join(f"{k} ({human_bytes(v)})" for k, v in info["external_data"].items()))
    lines.append(f"subgraphs: {info['subgraphs']}   functions: {len(info['functions'])}"
                 + (f" ({', '.join(info['functions'])})" if info["functions"] else ""))
    return "\n".join(lines)
