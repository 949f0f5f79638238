"""Which inputs validate a run: the user's, held-out calibration samples, or synthetic inputs the
original runs on; and whether a run with none may still be written."""

from __future__ import annotations

import collections
import os
from typing import Any, Optional

import numpy as np
import onnx

from .calibrate import DEFAULT_SAMPLES
from .data import Dataset, iter_feeds, load_dataset, source_label
from .errors import ValidationFailed
from .pipeline import Pipeline
from .synthetic import find_inputs

VALIDATION_SAMPLES = 256  # cap when validation borrows the calibration set


def validation_data(model: onnx.ModelProto, inputs: Any, calibration: Any, pipeline: Pipeline,
                     dims: dict, seed: int, level: str) -> tuple[Optional[Dataset], dict[str, Any]]:
    """The validation feeds and what they are (the report's ``validation_inputs``).

    Given inputs win. Calibration data validates an exact pipeline as is; a
    lossy one on samples it did not calibrate on. Else synthetic inputs the
    original runs on; when none does, no data and the reason (``not_run``).
    """
    if inputs is not None:
        data = load_dataset(inputs, model, what="validation data")
        return data, {"kind": "inputs", "source": data.source, "samples": data.samples}
    if calibration is not None and isinstance(calibration, (str, os.PathLike, dict)):
        if all(p.exact for p in pipeline.passes()):
            data = load_dataset(calibration, model, limit=VALIDATION_SAMPLES, what="calibration data")
            return data, {"kind": "calibration", "source": data.source, "samples": data.samples}
        return held_out(calibration, model, _calibration_samples(pipeline))
    probe = find_inputs(model, dims=dims, seed=seed, opt_level=level)
    if not probe.found:
        return None, {"kind": "none", "not_run": probe.error, "attempts": probe.attempts}
    data = probe.dataset(seed)
    return data, {"kind": "synthetic", "source": data.source, "samples": data.samples, "dims": probe.dims,
                  "shapes": {k: [str(v.dtype), list(v.shape)] for k, v in probe.feed.items()},
                  "attempts": probe.attempts, "text": f"synthetic ({probe.description})", "binding": probe.binding}


def refuse_unvalidated(reason: str, pipeline: Pipeline, strict: bool) -> None:
    """An unvalidated model is only written for an exact pipeline, and not under --strict."""
    if strict:
        raise ValidationFailed(f"validation not run ({reason}); give --inputs (--strict refuses to write "
                               "an unvalidated model)")
    if not all(p.exact for p in pipeline.passes()):
        raise ValidationFailed(f"validation not run ({reason}); a lossy pipeline is not written unvalidated: "
                               "give --inputs or --calib (or --no-validate to skip validation)")


def _calibration_samples(pipeline: Pipeline) -> int:
    """Samples the lossy passes read from the start of the calibration set."""
    counts = [getattr(p.options, "samples", 0) for p in pipeline.passes() if not p.exact]
    return max([c for c in counts if isinstance(c, int)] + [0]) or DEFAULT_SAMPLES


def held_out(source: Any, model: onnx.ModelProto, used: int) -> tuple[Dataset, dict[str, Any]]:
    """Calibration samples past the first ``used`` (which calibration reads), up to VALIDATION_SAMPLES;
    when the set is no longer than that, its last quarter, and the report says they were calibrated on."""
    held: list = []
    tail: collections.deque = collections.deque()
    seen = 0
    for feed, labels, n in iter_feeds(source, model, what="calibration data"):
        start, seen = seen, seen + n
        if start >= used:
            held.append((feed, labels, n))
            if sum(h[2] for h in held) >= VALIDATION_SAMPLES:
                break
            continue
        tail.append((feed, labels, n))
        while sum(t[2] for t in tail) - tail[0][2] >= VALIDATION_SAMPLES:
            tail.popleft()
    label = source_label(source)
    if held:
        chosen = held
        count = sum(h[2] for h in held)
        text = (f"{count} held-out calibration samples ({used}-{used + count - 1} of {label}; "
                f"calibration reads the first {used})")
        kind = "calibration held out"
    else:
        keep = max(1, seen // 4)
        while len(tail) > 1 and sum(t[2] for t in tail) - tail[0][2] >= keep:
            tail.popleft()
        chosen = list(tail)
        extra = sum(t[2] for t in chosen) - keep
        if chosen and 0 < extra < chosen[0][2]:
            chosen[0] = _drop_rows(*chosen[0], extra)
        count = sum(t[2] for t in chosen)
        text = (f"the last {count} of {seen} calibration samples in {label}: calibration read them too "
                f"(give --inputs, or more than {used} calibration samples, for held-out data)")
        kind = "calibration tail"
    labels = [c[1] for c in chosen]
    all_labels = np.concatenate(labels)[:count] if labels and all(x is not None for x in labels) else None
    data = Dataset([c[0] for c in chosen], all_labels, source=label, samples=count)
    return data, {"kind": kind, "source": label, "samples": count, "text": text}


def _drop_rows(feed: dict, labels: Any, n: int, drop: int) -> tuple[dict, Any, int]:
    """The feed without its first ``drop`` samples, when every array has them on its first axis."""
    if not all(getattr(v, "ndim", 0) and v.shape[0] == n for v in feed.values()):
        return feed, labels, n
    return ({k: v[drop:] for k, v in feed.items()}, None if labels is None else labels[drop:], n - drop)
