"""``optimize``: load, run the pipeline, validate, and return an OptimizeResult; and recipes."""

from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np
import onnx

from . import io
from .calibrate import DEFAULT_SAMPLES
from .data import Dataset, iter_feeds, load_dataset, source_label
from .errors import InputError, ValidationFailed
from .pipeline import (EXACT, MAX_GROWTH, Pass, PassContext, PassManager, Pipeline, Tolerance, VerifyFailed,
                       parse_max_growth)
from .report import OptimizeResult, write_text_atomic
from .runtime import RuntimeModel, release_memory
from .synthetic import find_inputs
from .validate import LATENCY_BUDGET_S, Reference

log = logging.getLogger("onnxopt")

DEFAULT_PIPELINE = "cleanup"
VALIDATION_SAMPLES = 256  # cap when validation borrows the calibration set


@dataclass
class Recipe:
    """A pipeline with its data and tolerances, read from YAML.

    Paths inside a recipe are relative to the recipe file.
    """

    passes: Any = None
    calibration: Optional[str] = None
    inputs: Optional[str] = None
    tolerance: Optional[dict] = None
    verify_each: bool = False
    prerequisites: bool = True
    dims: dict[str, int] = field(default_factory=dict)
    ort_opt_level: Optional[str] = None
    seed: int = 0
    max_growth: Any = None

    @classmethod
    def load(cls, source: Union[str, os.PathLike, dict]) -> "Recipe":
        if isinstance(source, dict):
            return cls._from_dict(source, Path.cwd(), "recipe")
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{path}: no such recipe file")
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: a recipe is a mapping with at least 'passes'")
        return cls._from_dict(data, path.parent, str(path))

    @classmethod
    def _from_dict(cls, data: dict, base: Path, label: str) -> "Recipe":
        known = [f.name for f in fields(cls)]
        unknown = [k for k in data if k not in known]
        if unknown:
            raise InputError(f"{label}: unknown recipe key '{unknown[0]}'; known keys: {', '.join(known)}")
        recipe = cls(**data)
        for key in ("calibration", "inputs"):
            value = getattr(recipe, key)
            if value is not None:
                setattr(recipe, key, str(base / value))
        Pipeline.parse(recipe.passes)  # fail early on unknown passes or options
        if recipe.max_growth is not None:
            parse_max_growth(recipe.max_growth)
        return recipe


def default_tolerance(pipeline: Pipeline) -> Tolerance:
    """The loosest tolerance of the lossy passes, or of the exact ones when all are exact."""
    passes = pipeline.passes()
    lossy = [p.tolerance for p in passes if not p.exact]
    chosen = lossy or [p.tolerance for p in passes] or [EXACT]
    merged = chosen[0]
    for tol in chosen[1:]:
        merged = merged.merged(tol)
    return merged


def optimize(
    model: Union[str, os.PathLike, onnx.ModelProto],
    passes: Union[str, Iterable[Any], Pipeline, None] = None,
    *,
    recipe: Union[str, os.PathLike, dict, Recipe, None] = None,
    calibration: Any = None,
    inputs: Any = None,
    tolerance: Union[str, dict, Tolerance, None] = None,
    validate: bool = True,
    verify_each: Optional[bool] = None,
    dims: Optional[dict[str, int]] = None,
    seed: Optional[int] = None,
    ort_opt_level: Optional[str] = None,
    latency_runs: Optional[int] = 0,
    latency_budget: float = LATENCY_BUDGET_S,
    repro_dir: Union[str, os.PathLike, None] = None,
    max_growth: Union[float, str, None] = None,
    strict: bool = False,
    prerequisites: Optional[bool] = None,
) -> OptimizeResult:
    """Rewrite a model with a pipeline and validate it against the original in ONNX Runtime.

    ``passes`` is a pipeline string (``"dce,prune(sparsity=0.5)"``), a list, or a
    Pipeline; ``recipe`` a YAML file or mapping. Explicit arguments win over
    the recipe. Validation data comes from ``inputs``, else the calibration
    data (for a lossy pipeline, samples it did not calibrate on), else seeded
    synthetic inputs the original runs on (see ``onnxopt.synthetic``). When
    none run, an exact pipeline's result is returned unvalidated
    (``result.not_run`` says why); a lossy pipeline, or ``strict=True``, raises
    ValidationFailed. The result is returned even when validation fails
    (``result.passed`` is False; ``result.save`` refuses it).
    ``max_growth`` bounds how much larger than the input the result may be: a
    fraction (``0.05``) or percentage (``"5%"``) of the input's size, at least
    64 KiB; ``"none"`` for no limit; unset, the recipe's, else 1%.
    ``latency_runs``: 0 skips timing, N times N runs of each model, None as
    many as fit in ``latency_budget`` seconds. A large model read from a file
    is validated after ``result.original`` is released (None; its statistics
    are kept), so that the original and the rewrite are not both in memory.
    ``prerequisites=False`` stops passes from running the passes they need first
    (``fold_bn`` before ``qdq``); ``result.pipeline`` lists those that ran.
    """
    start = time.perf_counter()
    rec = recipe if isinstance(recipe, Recipe) else (Recipe.load(recipe) if recipe is not None else Recipe())
    source = None if isinstance(model, onnx.ModelProto) else str(model)
    original = io.load(model)
    pipeline = Pipeline.parse(passes if passes is not None else (rec.passes or DEFAULT_PIPELINE))
    dims = {**rec.dims, **(dims or {})}
    level = ort_opt_level or rec.ort_opt_level or "all"
    seed = rec.seed if seed is None else seed
    calibration = calibration if calibration is not None else rec.calibration
    tol = Tolerance.parse(tolerance) or Tolerance.parse(rec.tolerance) or default_tolerance(pipeline)
    growth = max_growth if max_growth is not None else rec.max_growth
    growth = MAX_GROWTH if growth is None else parse_max_growth(growth)

    data: Optional[Dataset] = None
    used: dict[str, Any] = {}
    if validate or verify_each or rec.verify_each:
        data, used = _validation_data(original, inputs if inputs is not None else rec.inputs, calibration,
                                      pipeline, dims, seed, level)
        if data is None:
            _refuse_unvalidated(used["not_run"], pipeline, strict)
        elif data.synthetic:
            dims = {**used.pop("binding"), **dims}  # calibrating passes read the same binding
    ctx = PassContext(calibration=calibration, seed=seed, dims=dims, log=log)
    reference: Optional[Reference] = None
    runnable: Optional[RuntimeModel] = None
    verify = verify_each if verify_each is not None else rec.verify_each
    if data is None:
        verify = False  # nothing to validate on: an exact pipeline is written unvalidated (refused above otherwise)
    opts = dict(ort_opt_level=level, latency_runs=latency_runs if validate else 0, latency_budget=latency_budget)
    try:
        if verify:  # the original's outputs are kept for every comparison that follows
            reference = Reference(original, data, **opts)
        elif validate:  # written for ORT now, while the original is the only model in memory
            runnable = RuntimeModel(original)
        result = _run_pipeline(original, pipeline, ctx, reference, tolerance, rec, verify, repro_dir, source,
                               growth, used, prerequisites)
        if data is not None and data.synthetic:
            result.warnings.append("validated on synthetic inputs: give real data with --inputs or --calib")
        if data is None and used:
            result.not_run = f"{used['not_run']}; give --inputs"
            result.warnings.append("validation not run: the model is written unchecked (give --inputs; "
                                   "--strict makes this an error)")
        elif validate:
            if source is not None and runnable is not None and runnable.on_disk:
                del original  # a large model read from a file: ORT reads it from its own copy on disk
                result.release_original()
                release_memory()
            # the rewrite too waits on disk while the sessions run, and is read back afterwards
            candidate = RuntimeModel(result.model)
            set_aside = source is not None and candidate.on_disk
            if set_aside:
                _ = result.totals  # counted while the model is in memory
                result.model = None
                release_memory()
            try:
                if reference is None:
                    reference = Reference(runnable, data, **opts)
                result.validation = reference.compare(candidate, tol)
            finally:
                if set_aside:
                    result.model = candidate.load()  # the same model, byte for byte
                candidate.close()
    finally:
        if reference is not None:
            reference.close()
        elif runnable is not None:  # failed before the Reference took it over
            runnable.close()
    result.seconds = time.perf_counter() - start
    return result


def _run_pipeline(original: onnx.ModelProto, pipeline: Pipeline, ctx: PassContext, reference: Optional[Reference],
                  tolerance: Any, rec: Recipe, verify_each: bool, repro_dir: Any,
                  source: Optional[str], growth: Optional[float], used: dict[str, Any],
                  prerequisites: Optional[bool]) -> OptimizeResult:
    verify = None
    if verify_each:
        user_tol = Tolerance.parse(tolerance) or Tolerance.parse(rec.tolerance)

        def verify(candidate: onnx.ModelProto, ran: list[Pass]):
            step_tol = user_tol or default_tolerance(Pipeline(ran))
            return reference.compare(candidate, step_tol, latency=False)

    prerequisites = rec.prerequisites if prerequisites is None else prerequisites
    manager = PassManager(pipeline, ctx, verify, max_growth=growth, prerequisites=bool(prerequisites))
    try:
        optimized = manager.run(original)
    except VerifyFailed as failure:
        if repro_dir is not None:
            failure.repro_dir = str(save_reproducer(failure, repro_dir))
        raise
    ctx.template = None  # the manager (and its graph) go with this frame; nothing else keeps the original
    return OptimizeResult(optimized, original, manager.canonical(), manager.records, source=source,
                          inputs=used or None)


def _validation_data(model: onnx.ModelProto, inputs: Any, calibration: Any, pipeline: Pipeline,
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
        return _held_out(calibration, model, _calibration_samples(pipeline))
    probe = find_inputs(model, dims=dims, seed=seed, opt_level=level)
    if not probe.found:
        return None, {"kind": "none", "not_run": probe.error, "attempts": probe.attempts}
    data = probe.dataset(seed)
    return data, {"kind": "synthetic", "source": data.source, "samples": data.samples, "dims": probe.dims,
                  "shapes": {k: [str(v.dtype), list(v.shape)] for k, v in probe.feed.items()},
                  "attempts": probe.attempts, "text": f"synthetic ({probe.description})", "binding": probe.binding}


def _refuse_unvalidated(reason: str, pipeline: Pipeline, strict: bool) -> None:
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


def _held_out(source: Any, model: onnx.ModelProto, used: int) -> tuple[Dataset, dict[str, Any]]:
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


def save_reproducer(failure: VerifyFailed, folder: Union[str, os.PathLike]) -> Path:
    """The model before the failing pass, and the one-pass pipeline that breaks it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    io.save(failure.model_before, folder / "before.onnx")
    text = failure.pass_.canonical()
    write_text_atomic(folder / "pipeline.txt", text + "\n")
    write_text_atomic(folder / "README.txt",
                      f"{failure}\nReproduce:\n  onnxopt optimize before.onnx --passes \"{text}\" -o after.onnx\n")
    return folder
