"""Validation: run the original and the rewritten model in ONNX Runtime on the same inputs.

Sessions use ORT's full graph optimizations by default, as models are
deployed: fused kernels can differ numerically from the unfused graph, and
that difference is what users will see. It is also measured: the original
runs a second time with ORT's optimizations off, and the largest difference
between the two runs of each output is the runtime's own noise on it (the
*floor*). An exact rewrite cannot be held to more precision than the runtime
has, so a tolerance with ``floor_multiple`` lets each output's error reach
that multiple of its floor; the floor is printed next to every error.

Only the original is run twice: an exact rewrite computes the same thing
rounded differently, so its own floor would be of the same size, and the
multiple leaves room for that; running it twice would double the cost of the
larger half of validation. A floor that is a large share of an output's
values (an unstable computation) is reported, as a check against it proves
little.

The models run one after the other, never two sessions at once; the
original's outputs are stored (spilled to disk past a budget) until the
rewrite has run, and metrics are accumulated batch by batch. NaN and inf are
counted, never compared: positions where the original is not finite are left
out of the metrics (and reported), a rewrite that turns a finite value into
NaN/inf fails, and an output with no finite value to compare fails as not
computable.

What else is figured depends on what each output is (``metrics.kinds``, read from the graph
before the run): top-1 agreement and accuracy for class scores only, per-position agreement
and whole-sequence agreement for sequences of class scores, next-token perplexity for a
language model's logits when text ids are given as labels, per-vector cosine for embeddings.
The user's metric (``metrics.hook``) runs on each model's outputs, batch by batch, and its
figures are bounded by ``max_metric_drop``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import numpy as np
import onnx

from . import metrics as M
from . import progress
from .data import Dataset
from .errors import InputError
from .pipeline import Tolerance
from .runtime import (OPT_LEVELS, OutputStore, RuntimeModel, latency_ms, latency_within, make_session,
                      open_session, run)

__all__ = ["OPT_LEVELS", "OutputMetrics", "Comparison", "Reference", "compare", "make_session", "latency_ms"]

# Half-precision outputs round about 10x (float16) or 100x (bfloat16) coarser than
# float32; atol/rtol, chosen for float32, are widened by that factor for them.
HALF_SCALE = {"float16": 10.0, "bfloat16": 100.0}
LATENCY_BUDGET_S = 2.0  # for both models together, when the run count is not given
UNSTABLE_FLOOR = 1e-2  # a floor past this share of an output's largest value is reported


@dataclass
class OutputMetrics:
    """Differences on one output over every sample.

    Error figures cover the ``compared`` positions, where both models are finite.
    ``floor_max_abs`` is ONNX Runtime's own difference on this output between
    two optimization levels of the original (None when not measured).
    """

    name: str
    dtype: str
    kind: str = "other"
    kind_reason: str = ""
    elements: int = 0
    max_abs: float = 0.0
    mean_abs: float = 0.0
    max_rel: float = 0.0
    cosine: float = 1.0
    snr_db: float = math.inf
    mismatches: int = 0
    identical: bool = True
    top1_agreement: Optional[float] = None  # per sample (classes) or per position (sequence, lm)
    sequence_match: Optional[float] = None  # share of samples whose whole argmax sequence agrees
    vector_cosine_mean: Optional[float] = None  # embeddings: cosine of each vector, mean and worst
    vector_cosine_min: Optional[float] = None
    perplexity_reference: Optional[float] = None  # lm with text ids as labels: next-token perplexity
    perplexity_candidate: Optional[float] = None
    accuracy_reference: Optional[float] = None
    accuracy_candidate: Optional[float] = None
    floor_max_abs: Optional[float] = None
    allowed_abs: Optional[float] = None
    compared: int = 0
    nonfinite_reference: int = 0
    nonfinite_candidate: int = 0
    passed: bool = True
    failures: list[str] = field(default_factory=list)


class _Floor:
    """Running max/mean of |a - b| over the positions where both are finite."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.measured = False

    def add(self, a: Any, b: Any) -> None:
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype.kind != "f":
            return
        self.measured = True
        a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        both = np.isfinite(a) & np.isfinite(b)
        if both.any():
            self.max_abs = max(self.max_abs, float(np.abs(a[both] - b[both]).max()))


class _Accumulator:
    """Running sums for one output; reduced each batch, nothing kept."""

    def __init__(self, name: str, tol: Tolerance, floor: Optional[float], kind: Optional[M.OutputKind] = None) -> None:
        self.name, self.tol, self.floor = name, tol, floor
        self.kind = kind or M.OutputKind(name)
        self.classes = M.ClassAgreement(self.kind) if self.kind.kind in M.CLASS_KINDS else None
        self.vectors = M.VectorCosine(self.kind) if self.kind.kind == "embedding" else None
        self.perplexity = M.Perplexity(self.kind) if self.kind.kind == "lm" else None
        self.dtype = ""
        self.n = self.mismatch = self.compared = 0
        self.ref_nonfinite = self.cand_nonfinite = 0
        self.sum_abs = self.max_abs = self.max_rel = self.worst_excess = self.ref_max = 0.0
        self.dot = self.ref_sq = self.cand_sq = self.err_sq = 0.0

    def allowed_abs(self) -> Optional[float]:
        """atol for this output: the tolerance's, raised to ``floor_multiple`` times the floor."""
        tol = self.tol
        if tol.atol is None and tol.rtol is None:
            return None
        base = HALF_SCALE.get(self.dtype, 1.0) * (tol.atol or 0.0)
        if tol.floor_multiple is not None and self.floor:
            return max(base, tol.floor_multiple * self.floor)
        return base

    def add(self, ref: Any, cand: Any, labels: Optional[np.ndarray], mask: Optional[np.ndarray] = None) -> None:
        ref, cand = np.asarray(ref), np.asarray(cand)
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
        fin_a, fin_b = np.isfinite(a), np.isfinite(b)
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        self.n += a.size
        self.mismatch += int(np.count_nonzero(~same))
        self.ref_nonfinite += int(np.count_nonzero(~fin_a))
        self.cand_nonfinite += int(np.count_nonzero(fin_a & ~fin_b))
        both = fin_a & fin_b
        self.compared += int(np.count_nonzero(both))
        a, b = a[both], b[both]
        if a.size:
            self._add_errors(a, np.abs(a - b))
            self._add_sums(a, b)
        if self.classes is not None:
            self.classes.add(ref, cand, labels)
        if self.vectors is not None:
            self.vectors.add(ref, cand)
        if self.perplexity is not None:
            self.perplexity.add(ref, cand, labels, mask)

    def _add_errors(self, a: np.ndarray, diff: np.ndarray) -> None:
        self.ref_max = max(self.ref_max, float(np.abs(a).max()))
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.sum_abs += float(diff.sum())
        self.max_rel = max(self.max_rel, float((diff / np.maximum(np.abs(a), 1e-6)).max()))
        allowed = self.allowed_abs()
        if allowed is not None:
            rtol = HALF_SCALE.get(self.dtype, 1.0) * (self.tol.rtol or 0.0)
            self.worst_excess = max(self.worst_excess, float((diff - allowed - rtol * np.abs(a)).max()))

    def _add_sums(self, a: np.ndarray, b: np.ndarray) -> None:
        self.dot += float(a @ b)
        self.ref_sq += float(a @ a)
        self.cand_sq += float(b @ b)
        d = a - b
        self.err_sq += float(d @ d)

    def finish(self, with_labels: bool) -> OutputMetrics:
        m = OutputMetrics(self.name, self.dtype, self.kind.kind, self.kind.reason, self.n)
        m.max_abs, m.max_rel, m.mismatches = self.max_abs, self.max_rel, self.mismatch
        m.mean_abs = self.sum_abs / self.compared if self.compared else 0.0
        m.identical = self.mismatch == 0
        m.compared, m.nonfinite_reference, m.nonfinite_candidate = self.compared, self.ref_nonfinite, self.cand_nonfinite
        m.floor_max_abs, m.allowed_abs = self.floor, self.allowed_abs()
        if self.cand_nonfinite:
            m.max_abs = math.inf
        if self.ref_sq > 0 and self.cand_sq > 0:
            m.cosine = self.dot / math.sqrt(self.ref_sq * self.cand_sq)
        elif self.ref_sq != self.cand_sq:
            m.cosine = 0.0
        if self.err_sq > 0:
            m.snr_db = 10 * math.log10(self.ref_sq / self.err_sq) if self.ref_sq > 0 else -math.inf
        if self.classes is not None:
            m.top1_agreement, m.sequence_match = self.classes.top1(), self.classes.sequence_match()
            if with_labels:
                m.accuracy_reference, m.accuracy_candidate = self.classes.accuracy()
        if self.vectors is not None:
            m.vector_cosine_mean, m.vector_cosine_min = self.vectors.result()
        if self.perplexity is not None:
            m.perplexity_reference, m.perplexity_candidate = self.perplexity.result()
        self._judge(m)
        return m

    def _judge(self, m: OutputMetrics) -> None:
        tol, fails = self.tol, m.failures
        floating = bool(m.dtype) and np.dtype(m.dtype).kind == "f"
        if m.dtype and not floating and m.mismatches:
            share = 100.0 * m.mismatches / max(m.elements, 1)
            if tol.max_top1_drop is None or share > tol.max_top1_drop:
                fails.append(f"{m.mismatches} of {m.elements} values differ in non-float output")
        if floating and m.elements and not self.compared and m.nonfinite_reference == m.elements:
            fails.append(f"not computable: all {m.elements} values of the original's output are NaN/inf, "
                         "so nothing can be compared")
            m.passed = False
            return
        if m.nonfinite_candidate:
            fails.append(f"{m.nonfinite_candidate} value(s) are NaN/inf in the optimized model where the "
                         "original is finite")
        elif m.max_abs == math.inf:
            fails.append("shapes differ")
        # Integer/bool outputs are labels, indices or flags: the share of changed values (above)
        # judges them; an error size, cosine or SNR over class ids measures nothing.
        if floating or not m.dtype:
            if m.allowed_abs is not None and self.worst_excess > 0:
                fails.append(self._excess_message(m))
            if tol.min_cosine is not None and m.cosine < tol.min_cosine:
                fails.append(f"cosine {m.cosine:.6f} below {tol.min_cosine:g}")
            if tol.min_snr_db is not None and m.snr_db < tol.min_snr_db:
                fails.append(f"SNR {m.snr_db:.1f} dB below {tol.min_snr_db:g} dB")
        if tol.max_top1_drop is not None and m.top1_agreement is not None:
            if m.accuracy_reference is not None:
                drop = 100.0 * (m.accuracy_reference - m.accuracy_candidate)
                what = "accuracy"
            else:
                drop = 100.0 * (1.0 - m.top1_agreement)
                what = "top-1 agreement" if m.kind == "classes" else "per-position top-1 agreement"
            if drop > tol.max_top1_drop:
                fails.append(f"{what} dropped {drop:.2f} points (limit {tol.max_top1_drop:g})")
        m.passed = not fails

    def _excess_message(self, m: OutputMetrics) -> str:
        tol, scale = self.tol, HALF_SCALE.get(m.dtype, 1.0)
        text = (f"max abs error {m.max_abs:.3g} exceeds atol={scale * (tol.atol or 0):g} + "
                f"rtol={scale * (tol.rtol or 0):g}*|ref|" + (f" (widened {scale:g}x for {m.dtype})" if scale > 1 else ""))
        if m.floor_max_abs is None:
            return text
        if tol.floor_multiple is not None:
            return text + f" and {tol.floor_multiple:g}x the runtime's own noise ({m.floor_max_abs:.3g})"
        return text + f" (the runtime's own noise on this output: {m.floor_max_abs:.3g})"


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
    latency_runs: Optional[list[int]] = None
    floor_level: Optional[str] = None
    inputs_nonfinite: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    metrics: list[M.MetricValue] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs) and all(m.passed for m in self.metrics)

    @property
    def identical(self) -> bool:
        return all(o.identical for o in self.outputs)

    def headline(self) -> str:
        """One line: the first failure, or the worst figures when all passed."""
        for o in self.outputs:
            if o.failures:
                return f"output '{o.name}': {o.failures[0]} (tolerance {self.tolerance})" + self._input_hint()
        for m in self.metrics:
            if not m.passed:
                return f"metric '{m.name}': {metric_failure(m)} (tolerance {self.tolerance})"
        if self.identical:
            return "outputs identical"
        worst = max(self.outputs, key=lambda o: o.max_abs)
        return (f"max abs error {worst.max_abs:.3g}, cosine {min(o.cosine for o in self.outputs):.6f}, "
                f"within tolerance {self.tolerance}")

    def _input_hint(self) -> str:
        if not self.inputs_nonfinite:
            return ""
        return "; the inputs hold NaN/inf: " + ", ".join(
            f"'{k}' {v['nan'] + v['inf']} of {v['values']}" for k, v in self.inputs_nonfinite.items())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tolerance"] = {k: v for k, v in asdict(self.tolerance).items() if v is not None}
        out["passed"], out["identical"] = self.passed, self.identical
        return _json_safe(out)


def metric_failure(m: M.MetricValue) -> str:
    way = "rose" if m.lower_is_better else "dropped"
    return f"{m.reference:.6g} -> {m.candidate:.6g}: {way} {abs(m.drop):.4g} (limit {m.limit:g})"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


class Reference:
    """The original model's side of a validation, run once and kept for any number of candidates.

    Runs the original on every feed at ``ort_opt_level`` and stores its outputs;
    runs it again at the other end of ORT's optimization levels to measure the
    floor; times it when asked (``latency_runs``: 0 none, N exactly N runs,
    None as many as fit in half of ``latency_budget``). Only one session is
    alive at a time and none is kept: a candidate's session can reuse the memory.
    """

    def __init__(self, model: Union[onnx.ModelProto, RuntimeModel], data: Dataset, *, ort_opt_level: str = "all",
                 latency_runs: Optional[int] = 0, latency_budget: float = LATENCY_BUDGET_S,
                 floor: bool = True, output_kinds: Any = None, metric: Any = None, labels: Any = None) -> None:
        self.data, self.level = data, ort_opt_level
        self.hook = M.load_metric(metric)
        self.labels = _labels(labels, data)
        self.latency_runs, self.latency_budget = latency_runs, latency_budget
        self.inputs_nonfinite = _count_nonfinite_inputs(data)
        self.store = OutputStore()
        self.latency: Optional[tuple[float, int]] = None
        self.notes: list[str] = []
        model = model if isinstance(model, RuntimeModel) else RuntimeModel(model)
        self.size = model.size
        try:
            graph = _graph_of(model)
            self.kinds = M.detect(graph)
            axes = M.input_batch_axes(graph)
            self.rows = [_feed_rows(feed, axes) for feed in data.feeds]
            del graph
            chosen = M.check_overrides(output_kinds, list(self.kinds))
            hook_run = self.hook.start() if self.hook else None
            with open_session(model, ort_opt_level, which="original") as sess, \
                    progress.task("validating: original", sum(self.rows), "sample") as bar:
                self.names = [o.name for o in sess.get_outputs()]
                for i, feed in enumerate(data.feeds):
                    outputs = run(sess, feed, "original")
                    if i == 0:
                        self._refine(outputs)
                    if hook_run is not None:
                        hook_run.update(dict(zip(self.names, outputs)), self._batch_labels(i), feed, self.rows[i])
                    self.store.add(outputs)
                    bar.advance(self.rows[i])
                bar.close()
                self.latency = _latency(sess, data.feeds[0], latency_runs, latency_budget / 2, "original")
            self.floor_level = "disable" if ort_opt_level != "disable" else "all"
            self.floors: Optional[list[Optional[float]]] = self._measure_floor(model) if floor else None
            M.override(self.kinds, chosen)
            self.metric_reference = hook_run.result() if hook_run is not None else None
        except BaseException:
            self.close()
            raise
        finally:
            model.close()  # the stored outputs are all that is needed from here on

    def _refine(self, outputs: list) -> None:
        labels = M.primary(self.labels)
        first = labels[:self.rows[0]] if labels is not None else None
        for name, out in zip(self.names, outputs):
            kind = self.kinds.setdefault(name, M.OutputKind(name, decided_by="none"))
            M.refine(kind, out, self.rows[0], first)

    def _batch_labels(self, i: int) -> Optional[dict[str, np.ndarray]]:
        if self.labels is None:
            return None
        start = sum(self.rows[:i])
        return {k: v[start:start + self.rows[i]] for k, v in self.labels.items()}

    def _measure_floor(self, model: RuntimeModel) -> Optional[list[Optional[float]]]:
        floors = [_Floor() for _ in self.names]
        try:
            with open_session(model, self.floor_level, which="original") as sess, \
                    progress.task(f"validating: noise floor ({self.floor_level})", sum(self.rows), "sample") as bar:
                for i, feed in enumerate(self.data.feeds):
                    _add_all(floors, self.store[i], run(sess, feed, "original"))
                    bar.advance(self.rows[i])
        except Exception as exc:  # the floor is a help, not a requirement: say why it is missing
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.notes.append(f"runtime noise floor not measured (the original does not run at "
                              f"'{self.floor_level}': {first})")
            return None
        return [fl.max_abs if fl.measured else None for fl in floors]

    def compare(self, candidate: Union[onnx.ModelProto, RuntimeModel], tolerance: Tolerance, *,
                latency: bool = True) -> Comparison:
        """Run ``candidate`` on the same feeds and judge its outputs against the stored ones."""
        if isinstance(candidate, RuntimeModel):
            return self._compare(candidate, tolerance, latency)
        cand = RuntimeModel(candidate)
        try:
            return self._compare(cand, tolerance, latency)
        finally:
            cand.close()

    def _compare(self, candidate: RuntimeModel, tolerance: Tolerance, latency: bool) -> Comparison:
        data = self.data
        floors = self.floors or [None] * len(self.names)
        accs = [_Accumulator(n, tolerance, f, self.kinds.get(n)) for n, f in zip(self.names, floors)]
        hook_run = self.hook.start() if self.hook else None
        cand_latency = None
        with open_session(candidate, self.level, which="optimized") as sess:
            cand_names = [o.name for o in sess.get_outputs()]
            if cand_names != self.names:
                from .errors import ValidationFailed
                raise ValidationFailed(f"outputs differ: original has {self.names}, optimized has {cand_names}")
            with progress.task("validating: optimized", sum(self.rows), "sample") as bar:
                for i, feed in enumerate(data.feeds):
                    labels = self._batch_labels(i)
                    outputs = run(sess, feed, "optimized")
                    if hook_run is not None:
                        hook_run.update(dict(zip(self.names, outputs)), labels, feed, self.rows[i])
                    _add_all(accs, self.store[i], outputs, M.primary(labels), feed.get("attention_mask"))
                    bar.advance(self.rows[i])
            if latency and self.latency is not None:
                cand_latency = _latency(sess, data.feeds[0], self.latency_runs, self.latency_budget / 2, "optimized")
        outputs = [a.finish(self.labels is not None) for a in accs]
        result = Comparison(outputs, tolerance, data.samples,
                            len(data.feeds), data.source, data.synthetic, self.level, self.size,
                            candidate.size, floor_level=self.floor_level if self.floors else None,
                            inputs_nonfinite=dict(self.inputs_nonfinite),
                            notes=list(data.notes) + self.notes + self._nonfinite_notes(accs),
                            metrics=self._metrics(outputs, hook_run, tolerance))
        if cand_latency is not None:
            result.latency_reference_ms, result.latency_candidate_ms = self.latency[0], cand_latency[0]
            result.latency_runs = [self.latency[1], cand_latency[1]]
        return result

    def _metrics(self, outputs: list[OutputMetrics], hook_run: Optional[M.MetricRun],
                 tolerance: Tolerance) -> list[M.MetricValue]:
        """The user's metric on both models, and perplexity where measured, judged by max_metric_drop."""
        limits = tolerance.max_metric_drop or {}
        values = []
        lms = [o for o in outputs if o.perplexity_reference is not None]
        for o in lms:
            name = "perplexity" if len(lms) == 1 else f"perplexity:{o.name}"
            values.append(M.metric_drop(name, o.perplexity_reference, o.perplexity_candidate, True, o.name, limits))
        if hook_run is not None:
            cand = hook_run.result()
            if set(cand) != set(self.metric_reference):
                raise self.hook.error(f"returned {sorted(self.metric_reference)} for the original and "
                                      f"{sorted(cand)} for the optimized model")
            values += [M.metric_drop(k, v, cand[k], k in self.hook.lower_is_better, self.hook.spec, limits)
                       for k, v in self.metric_reference.items()]
        unknown = [k for k in limits if k != "*" and k not in {v.name for v in values}]
        if unknown:
            measured = ", ".join(v.name for v in values) or "none (give --metric, or text ids as labels for perplexity)"
            raise InputError(f"tolerance max_metric_drop names '{unknown[0]}', which was not measured; "
                             f"metrics measured: {measured}")
        return values

    def _nonfinite_notes(self, accs: list[_Accumulator]) -> list[str]:
        notes = [f"ONNX Runtime itself is unstable on output '{a.name}': its optimization levels differ by "
                 f"{a.floor:.3g} on values up to {a.ref_max:.3g}, so a check against that noise proves little"
                 for a in accs if a.floor and a.ref_max and a.floor > UNSTABLE_FLOOR * a.ref_max]
        notes += [f"input '{k}' holds {v['nan']} NaN and {v['inf']} inf of {v['values']} values"
                 for k, v in self.inputs_nonfinite.items()]
        notes += [f"output '{a.name}' of the original is NaN/inf at {a.ref_nonfinite} of {a.n} positions; "
                  "those are not compared" for a in accs if a.ref_nonfinite]
        return notes

    def close(self) -> None:
        self.store.close()


def _add_all(accs: list, ref_out: list, other_out: list, labels: Optional[np.ndarray] = None,
             mask: Optional[np.ndarray] = None) -> None:
    """Add one feed's outputs to the accumulators. (A function of its own so that no output,
    a view of the session's memory, outlives the session.)"""
    for acc, ref, other in zip(accs, ref_out, other_out):
        if isinstance(acc, _Floor):
            acc.add(ref, other)
        else:
            acc.add(ref, other, labels, mask)


def _feed_rows(feed: dict, batch_axes: dict[str, int]) -> int:
    """Samples in one feed: the longest batch axis (the leading one unless a dim name says otherwise)."""
    rows = [np.shape(v)[batch_axes.get(k, 0)] for k, v in feed.items() if np.ndim(v) > batch_axes.get(k, 0)]
    return max(rows) if rows else 1


def _labels(labels: Any, data: Dataset) -> Optional[dict[str, np.ndarray]]:
    """The label arrays: given ones (a file or mapping) win over a ``labels`` array in the data."""
    if labels is not None:
        return M.load_labels(labels, data.samples)
    if data.labels is not None:
        return M.load_labels({"labels": data.labels}, None)
    return None


def _graph_of(model: RuntimeModel) -> onnx.ModelProto:
    """The graph without its weights (read from the mapped file when the model lives on disk)."""
    if model.model is not None:
        return model.model
    return onnx.load(str(model.path), load_external_data=False)


def _latency(sess, feed: dict, runs: Optional[int], budget_s: float, which: str) -> Optional[tuple[float, int]]:
    report = progress.callback(f"timing: {which}", unit="run")
    if runs is None:
        return latency_within(sess, feed, budget_s, progress=report)
    if runs > 0:
        return latency_ms(sess, feed, runs, progress=report), runs
    return None


def _count_nonfinite_inputs(data: Dataset) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for feed in data.feeds:
        for name, value in feed.items():
            value = np.asarray(value)
            if value.dtype.kind != "f":
                continue
            row = counts.setdefault(name, {"nan": 0, "inf": 0, "values": 0})
            row["nan"] += int(np.count_nonzero(np.isnan(value)))
            row["inf"] += int(np.count_nonzero(np.isinf(value)))
            row["values"] += value.size
    return {k: v for k, v in counts.items() if v["nan"] or v["inf"]}


def compare(reference: onnx.ModelProto, candidate: onnx.ModelProto, data: Dataset,
            tolerance: Tolerance, *, ort_opt_level: str = "all", latency_runs: Optional[int] = 0,
            latency_budget: float = LATENCY_BUDGET_S, output_kinds: Any = None, metric: Any = None,
            labels: Any = None) -> Comparison:
    """Run both models on every feed and judge the differences against ``tolerance``.

    ``latency_runs``: 0 skips timing, N times exactly N runs of each model,
    None as many as fit in ``latency_budget`` seconds for both together.
    ``output_kinds`` overrides what an output is judged as (``{"emb": "embedding"}``);
    ``metric`` is the user's metric (see ``onnxopt.metrics.hook``), ``labels`` a .npz/.npy
    file or a mapping of arrays with one row per sample.
    """
    ref = Reference(reference, data, ort_opt_level=ort_opt_level, latency_runs=latency_runs,
                    latency_budget=latency_budget, output_kinds=output_kinds, metric=metric, labels=labels)
    try:
        return ref.compare(candidate, tolerance)
    finally:
        ref.close()
