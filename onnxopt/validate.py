"""Validation: run the original and the rewritten model in ONNX Runtime on the same inputs.

Sessions use ORT's full graph optimizations by default, as models are
deployed: fused kernels can differ numerically from the unfused graph, and
that difference is what users will see. Metrics are accumulated batch by
batch, so memory does not grow with the number of samples.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx

from .data import Dataset
from .errors import InputError, ValidationFailed
from .io import fits_in_proto
from .pipeline import Tolerance

# onnxruntime is imported where a session is made: importing it costs ~30 MB of
# memory that runs which never validate should not pay.
OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def make_session(model: onnx.ModelProto, opt_level: str = "all", threads: int = 0) -> ort.InferenceSession:
    """A CPU session for an in-memory model (through a temporary file past 2 GB)."""
    if opt_level not in OPT_LEVELS:
        raise InputError(f"unknown ORT optimization level '{opt_level}'; choose one of {', '.join(OPT_LEVELS)}")
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # ORT's own warnings never reach the terminal
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[opt_level])
    options.intra_op_num_threads = threads
    options.log_severity_level = 4  # errors come back as exceptions, worded by onnxopt; no raw ORT lines
    if fits_in_proto(model):
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(copy, str(path), save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# Half-precision outputs round about 10x (float16) or 100x (bfloat16) coarser than
# float32; atol/rtol, chosen for float32, are widened by that factor for them.
HALF_SCALE = {"float16": 10.0, "bfloat16": 100.0}


@dataclass
class OutputMetrics:
    """Differences on one output over every sample."""

    name: str
    dtype: str
    elements: int = 0
    max_abs: float = 0.0
    mean_abs: float = 0.0
    max_rel: float = 0.0
    cosine: float = 1.0
    snr_db: float = math.inf
    mismatches: int = 0
    identical: bool = True
    top1_agreement: Optional[float] = None
    accuracy_reference: Optional[float] = None
    accuracy_candidate: Optional[float] = None
    passed: bool = True
    failures: list[str] = field(default_factory=list)


class _Accumulator:
    """Running sums for one output; reduced each batch, nothing kept."""

    def __init__(self, name: str, tol: Tolerance) -> None:
        self.name, self.tol = name, tol
        self.dtype = ""
        self.n = self.mismatch = 0
        self.sum_abs = self.max_abs = self.max_rel = self.worst_excess = 0.0
        self.dot = self.ref_sq = self.cand_sq = self.err_sq = 0.0
        self.rows = self.agree = 0
        self.ref_correct = self.cand_correct = 0
        self.classes = False

    def add(self, ref: np.ndarray, cand: np.ndarray, labels: Optional[np.ndarray]) -> None:
        self.dtype = str(ref.dtype)
        if ref.shape != cand.shape:
            self.mismatch += max(ref.size, cand.size)
            self.n += max(ref.size, cand.size)
            self.max_abs = math.inf
            return
        if ref.dtype.kind not in "biuf":
            diff_count = int(np.sum(ref != cand))
            self.mismatch += diff_count
            self.n += ref.size
            return
        a, b = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        diff = np.where(same, 0.0, np.abs(a - b))
        diff = np.where(np.isnan(diff), np.inf, diff)
        self.n += a.size
        self.mismatch += int(np.count_nonzero(diff))
        with np.errstate(invalid="ignore", over="ignore"):
            self._add_errors(a, diff)
        self._add_sums(a, b, same)
        if ref.ndim == 2 and ref.shape[1] > 1 and ref.dtype.kind == "f":
            self._add_classes(ref, cand, labels)

    def _add_errors(self, a: np.ndarray, diff: np.ndarray) -> None:
        scale = HALF_SCALE.get(self.dtype, 1.0)
        if a.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.sum_abs += float(diff.sum())
            self.max_rel = max(self.max_rel, float((diff / np.maximum(np.abs(a), 1e-6)).max()))
            allowed = scale * ((self.tol.atol or 0.0) + (self.tol.rtol or 0.0) * np.abs(np.where(np.isfinite(a), a, 0)))
            self.worst_excess = max(self.worst_excess, float(np.nan_to_num((diff - allowed), nan=np.inf).max()))

    def _add_sums(self, a: np.ndarray, b: np.ndarray, same: np.ndarray) -> None:
        fa, fb = np.where(np.isfinite(a), a, 0.0), np.where(np.isfinite(b), b, 0.0)
        self.dot += float(fa @ fb)
        self.ref_sq += float(fa @ fa)
        self.cand_sq += float(fb @ fb)
        fd = np.where(same, 0.0, fa - fb)
        self.err_sq += float(fd @ fd)

    def _add_classes(self, ref: np.ndarray, cand: np.ndarray, labels: Optional[np.ndarray]) -> None:
        self.classes = True
        top_ref, top_cand = ref.argmax(axis=1), cand.argmax(axis=1)
        self.rows += len(top_ref)
        self.agree += int(np.sum(top_ref == top_cand))
        if labels is not None and len(labels) == len(top_ref):
            self.ref_correct += int(np.sum(top_ref == labels))
            self.cand_correct += int(np.sum(top_cand == labels))

    def finish(self, with_labels: bool) -> OutputMetrics:
        m = OutputMetrics(self.name, self.dtype, self.n)
        m.max_abs, m.max_rel, m.mismatches = self.max_abs, self.max_rel, self.mismatch
        m.mean_abs = self.sum_abs / self.n if self.n else 0.0
        m.identical = self.mismatch == 0
        if self.ref_sq > 0 and self.cand_sq > 0:
            m.cosine = self.dot / math.sqrt(self.ref_sq * self.cand_sq)
        elif self.ref_sq != self.cand_sq:
            m.cosine = 0.0
        if self.err_sq > 0:
            m.snr_db = 10 * math.log10(self.ref_sq / self.err_sq) if self.ref_sq > 0 else -math.inf
        if self.classes and self.rows:
            m.top1_agreement = self.agree / self.rows
            if with_labels:
                m.accuracy_reference = self.ref_correct / self.rows
                m.accuracy_candidate = self.cand_correct / self.rows
        self._judge(m)
        return m

    def _judge(self, m: OutputMetrics) -> None:
        tol, fails = self.tol, m.failures
        if m.dtype and np.dtype(m.dtype).kind not in "f" and m.mismatches:
            share = 100.0 * m.mismatches / max(m.elements, 1)
            if tol.max_top1_drop is None or share > tol.max_top1_drop:
                fails.append(f"{m.mismatches} of {m.elements} values differ in non-float output")
        if m.max_abs == math.inf:
            fails.append("shapes differ or a value became NaN/inf")
        if (tol.atol is not None or tol.rtol is not None) and self.worst_excess > 0:
            scale = HALF_SCALE.get(m.dtype, 1.0)
            fails.append(f"max abs error {m.max_abs:.3g} exceeds atol={scale * (tol.atol or 0):g} + "
                         f"rtol={scale * (tol.rtol or 0):g}*|ref|" + (f" (widened {scale:g}x for {m.dtype})" if scale > 1 else ""))
        if tol.min_cosine is not None and m.cosine < tol.min_cosine:
            fails.append(f"cosine {m.cosine:.6f} below {tol.min_cosine:g}")
        if tol.min_snr_db is not None and m.snr_db < tol.min_snr_db:
            fails.append(f"SNR {m.snr_db:.1f} dB below {tol.min_snr_db:g} dB")
        if tol.max_top1_drop is not None and m.top1_agreement is not None:
            if m.accuracy_reference is not None:
                drop = 100.0 * (m.accuracy_reference - m.accuracy_candidate)
                what = "accuracy"
            else:
                drop, what = 100.0 * (1.0 - m.top1_agreement), "top-1 agreement"
            if drop > tol.max_top1_drop:
                fails.append(f"{what} dropped {drop:.2f} points (limit {tol.max_top1_drop:g})")
        m.passed = not fails


@dataclass
class Comparison:
    """The outcome of running both models on the same inputs."""

    outputs: list[OutputMetrics]
    tolerance: Tolerance
    samples: int
    batches: int
    data: str
    synthetic: bool
    ort_opt_level: str
    size_reference: int = 0
    size_candidate: int = 0
    latency_reference_ms: Optional[float] = None
    latency_candidate_ms: Optional[float] = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def identical(self) -> bool:
        return all(o.identical for o in self.outputs)

    def headline(self) -> str:
        """One line: the first failure, or the worst figures when all passed."""
        for o in self.outputs:
            if o.failures:
                return f"output '{o.name}': {o.failures[0]} (tolerance {self.tolerance})"
        if self.identical:
            return "outputs identical"
        worst = max(self.outputs, key=lambda o: o.max_abs)
        return (f"max abs error {worst.max_abs:.3g}, cosine {min(o.cosine for o in self.outputs):.6f}, "
                f"within tolerance {self.tolerance}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tolerance"] = {k: v for k, v in asdict(self.tolerance).items() if v is not None}
        out["passed"], out["identical"] = self.passed, self.identical
        return _json_safe(out)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def compare(reference: onnx.ModelProto, candidate: onnx.ModelProto, data: Dataset,
            tolerance: Tolerance, *, ort_opt_level: str = "all", latency_runs: int = 0) -> Comparison:
    """Run both models on every feed and judge the differences against ``tolerance``."""
    ref_sess = _session(reference, ort_opt_level, "original")
    cand_sess = _session(candidate, ort_opt_level, "optimized")
    names = [o.name for o in ref_sess.get_outputs()]
    cand_names = [o.name for o in cand_sess.get_outputs()]
    if names != cand_names:
        raise ValidationFailed(f"outputs differ: original has {names}, optimized has {cand_names}")
    accs = [_Accumulator(n, tolerance) for n in names]
    offset = 0
    for feed in data.feeds:
        ref_out = _run(ref_sess, feed, "original")
        cand_out = _run(cand_sess, feed, "optimized")
        rows = _rows(ref_out)
        labels = data.labels[offset:offset + rows] if data.labels is not None else None
        offset += rows
        for acc, r, c in zip(accs, ref_out, cand_out):
            acc.add(np.asarray(r), np.asarray(c), labels)
    result = Comparison([a.finish(data.labels is not None) for a in accs], tolerance, data.samples,
                        len(data.feeds), data.source, data.synthetic, ort_opt_level,
                        reference.ByteSize(), candidate.ByteSize(), notes=list(data.notes))
    if latency_runs > 0:
        result.latency_reference_ms = latency_ms(ref_sess, data.feeds[0], latency_runs)
        result.latency_candidate_ms = latency_ms(cand_sess, data.feeds[0], latency_runs)
    return result


def _rows(outputs: list) -> int:
    for out in outputs:
        out = np.asarray(out)
        if out.ndim == 2:
            return out.shape[0]
    return 1


def _session(model: onnx.ModelProto, level: str, which: str) -> ort.InferenceSession:
    try:
        return make_session(model, level)
    except InputError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if which == "original":
            raise InputError(f"ONNX Runtime cannot load the original model: {first}") from None
        raise ValidationFailed(f"ONNX Runtime cannot load the optimized model: {first}") from None


def _run(sess: ort.InferenceSession, feed: dict, which: str) -> list:
    try:
        return sess.run(None, feed)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if which == "original":
            raise InputError(f"ONNX Runtime cannot run the original model on these inputs: {first}") from None
        raise ValidationFailed(f"ONNX Runtime cannot run the optimized model: {first}") from None


def latency_ms(sess: ort.InferenceSession, feed: dict, runs: int, warmup: int = 2) -> float:
    """Median wall time of one run, in milliseconds."""
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)
