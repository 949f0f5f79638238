"""One evaluation: run a pipeline on the cleaned model, run the result in ONNX Runtime on the
evaluation samples, and return its bytes and the budget metric's drop.

``evaluate(shared, item)`` is what executors map (a module-level function; the shared value and
items are picklable). Each process builds its reference outputs once per shared value (keyed by
``Shared.token``); calibration statistics of the cleaned model travel in ``Shared.cache`` and are
copied into every run's PassContext, so no task recomputes them. Latency is never measured here:
timings depend on what else runs, so the parent measures it (``latency_of``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import onnx

from ..data import Dataset
from ..errors import OnnxoptError
from ..pipeline import PassContext, PassManager, Pipeline, Tolerance
from ..runtime import latency_ms, open_session
from ..serialize import serialized_size
from ..validate import Comparison, Reference

LATENCY_RUNS = 20


@dataclass
class Shared:
    """What every evaluation reads, stored once per executor (``Executor.share``)."""

    token: str
    model: bytes                     # the cleaned model every pipeline starts from
    calibration: list                # calibration feeds (dicts of arrays), the passes' data
    data: Dataset                    # evaluation feeds (and labels)
    tolerance: Optional[Tolerance]   # the budget's tolerance, when one is given
    labels: Any = None
    output_kinds: Optional[dict] = None
    seed: int = 0
    dims: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)  # calibration statistics of the cleaned model
    sensitivity_samples: int = 0     # single-layer evaluations read the first ones (0: all)


@dataclass
class Metric:
    """The budget metric on one comparison: its name, both values (points), the drop, the worst cosine."""

    name: str
    reference: float
    candidate: float
    drop: float
    cosine: float


def budget_metric(comp: Comparison) -> Metric:
    """Accuracy with labels; else per output kind: top-1 agreement (classes, per position for
    sequences), mean vector cosine x 100 (embeddings), cosine x 100 (other). The worst output decides."""
    cosine = min((o.cosine for o in comp.outputs), default=1.0)
    labelled = [o for o in comp.outputs if o.accuracy_reference is not None and o.accuracy_candidate is not None]
    if labelled:
        o = labelled[0]
        ref, cand = 100.0 * o.accuracy_reference, 100.0 * o.accuracy_candidate
        return Metric("accuracy", ref, cand, ref - cand, cosine)
    worst: Optional[Metric] = None
    for o in comp.outputs:
        if o.top1_agreement is not None:
            m = Metric("top-1 agreement", 100.0, 100.0 * o.top1_agreement, 0.0, cosine)
        elif o.kind == "embedding" and o.vector_cosine_mean is not None:
            m = Metric("cosine x 100", 100.0, 100.0 * o.vector_cosine_mean, 0.0, cosine)
        else:
            m = Metric("cosine x 100", 100.0, 100.0 * o.cosine, 0.0, cosine)
        m.drop = m.reference - m.candidate
        if worst is None or m.drop > worst.drop:
            worst = m
    return worst or Metric("cosine x 100", 100.0, 100.0, 0.0, cosine)


_STATE: dict[tuple[str, bool], tuple[onnx.ModelProto, Reference, int]] = {}


def _state(shared: Shared, small: bool = False) -> tuple[onnx.ModelProto, Reference, int]:
    """The cleaned model and its reference outputs (on every evaluation sample, or on the first
    ``sensitivity_samples`` when ``small``), built once per process and shared value."""
    key = (shared.token, small and 0 < shared.sensitivity_samples < shared.data.samples)
    if key not in _STATE:
        for old in [k for k in _STATE if k[0] != shared.token]:  # one tuning run at a time per process
            _STATE.pop(old)[1].close()
        model = onnx.load_from_string(shared.model)
        data, labels = shared.data, shared.labels
        if key[1]:
            data, labels = head(data, shared.sensitivity_samples), _cut(labels, shared.sensitivity_samples)
        ref = Reference(model, data, latency_runs=0, floor=False, output_kinds=shared.output_kinds, labels=labels)
        _STATE[key] = (model, ref, serialized_size(model))
    return _STATE[key]


def head(data: Dataset, n: int) -> Dataset:
    """The first ``n`` samples of a dataset (feeds cut along their first axis)."""
    feeds, count = [], 0
    for feed in data.feeds:
        rows = {int(np.shape(v)[0]) for v in feed.values() if np.ndim(v)}
        if len(rows) != 1:
            break
        take = min(rows.pop(), n - count)
        feeds.append({k: v[:take] for k, v in feed.items()})
        count += take
        if count >= n:
            break
    if not feeds:
        return data
    labels = None if data.labels is None else data.labels[:count]
    return Dataset(feeds, labels, source=data.source, synthetic=data.synthetic, samples=count)


def _cut(labels: Any, n: int) -> Any:
    return None if labels is None else {k: v[:n] for k, v in labels.items()}


def evaluate(shared: Shared, item: tuple[str, bool]) -> dict:
    """``item`` = (passes after cleanup, skip_unchanged). Returns bytes, drop, metric value, cosine,
    whether the budget's tolerance passed; ``unchanged`` when the pipeline saved no bytes and
    ``skip_unchanged`` spared the run; ``error`` when a pass refused."""
    return _run(shared, *item, small=True)[1]


def evaluate_here(shared: Shared, spec: str, latency_runs: int = 0) -> dict:
    """``evaluate`` in this process, with the median latency (ms) when ``latency_runs`` > 0."""
    candidate, out = _run(shared, spec, False)
    if candidate is not None and latency_runs > 0 and "error" not in out:
        out["latency_ms"] = latency_of(candidate, shared.data.feeds[0], latency_runs)
    return out


def _run(shared: Shared, spec: str, skip_unchanged: bool,
         small: bool = False) -> tuple[Optional[onnx.ModelProto], dict]:
    model, ref, base_bytes = _state(shared, small)
    candidate = model
    if spec:
        ctx = PassContext(calibration=shared.calibration, seed=shared.seed, dims=dict(shared.dims),
                          cache=dict(shared.cache))
        try:
            candidate = PassManager(Pipeline.parse(spec), ctx, max_growth=None).run(model)
        except OnnxoptError as exc:
            return None, {"error": str(exc).splitlines()[0]}
    nbytes = serialized_size(candidate)
    if skip_unchanged and nbytes >= base_bytes:
        return candidate, {"bytes": nbytes, "unchanged": True}
    try:
        comp = ref.compare(candidate, shared.tolerance or Tolerance(min_cosine=-1.0), latency=False)
    except OnnxoptError as exc:
        return None, {"error": str(exc).splitlines()[0]}
    m = budget_metric(comp)
    return candidate, {"bytes": nbytes, "drop": round(m.drop, 6), "value": round(m.candidate, 6),
                       "cosine": round(float(m.cosine), 8), "passed": bool(comp.passed)}


def latency_of(model: onnx.ModelProto, feed: dict, runs: int = LATENCY_RUNS) -> float:
    """Median ms of one run on ``feed`` (ORT, all optimizations), measured in this process."""
    with open_session(model, "all", which="optimized") as held:
        return float(latency_ms(held.sess, feed, runs, warmup=3))


def release() -> None:
    """Drop this process's reference outputs."""
    for old in list(_STATE):
        _STATE.pop(old)[1].close()


def baseline(shared: Shared) -> Metric:
    """The budget metric of the cleaned model against itself: its name and reference value."""
    model, ref, _ = _state(shared)
    return budget_metric(ref.compare(model, shared.tolerance or Tolerance(min_cosine=-1.0), latency=False))
