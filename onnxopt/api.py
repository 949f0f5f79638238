"""``optimize``: load, run the pipeline, validate, and return an OptimizeResult; and recipes."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import onnx

from . import io
from . import metrics as M
from .data import Dataset
from .errors import InputError
from .pipeline import (EXACT, MAX_GROWTH, Pass, PassContext, PassManager, Pipeline, Tolerance, VerifyFailed,
                       parse_max_growth)
from .report import OptimizeResult, write_text_atomic
from .runtime import RuntimeModel, release_memory
from .validate import LATENCY_BUDGET_S, Reference
from .validation_inputs import refuse_unvalidated, validation_data

log = logging.getLogger("onnxopt")

DEFAULT_PIPELINE = "cleanup"


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
    output_kinds: dict[str, str] = field(default_factory=dict)
    metric: Optional[str] = None
    labels: Optional[str] = None

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
        for key in ("calibration", "inputs", "labels"):
            value = getattr(recipe, key)
            if value is not None:
                setattr(recipe, key, str(base / value))
        if isinstance(recipe.metric, str):  # a file named in it is relative to the recipe too
            where, sep, attr = recipe.metric.rpartition(":")
            if sep and where.endswith(".py"):
                recipe.metric = f"{base / where}:{attr}"
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
    output_kinds: Optional[dict[str, str]] = None,
    metric: Any = None,
    labels: Any = None,
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
    ``output_kinds`` overrides what validation judges an output as (``{"emb": "embedding"}``;
    kinds: classes, sequence, lm, embedding, other); ``metric`` is the user's metric
    (``"module:function"``, ``"file.py:Class"``, or the function/class itself; see
    ``onnxopt.metrics.hook``), bounded by the tolerance's ``max_metric_drop``; ``labels`` a
    .npz/.npy file or mapping of arrays, one row per validation sample, for accuracy,
    perplexity and the metric.
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
    # the user's metric and kinds are checked before any work, so a bad one costs nothing
    checks = dict(output_kinds=M.check_overrides({**(rec.output_kinds or {}), **(output_kinds or {})},
                                                 [o.name for o in original.graph.output]),
                  metric=M.load_metric(metric if metric is not None else rec.metric),
                  labels=M.load_labels(labels if labels is not None else rec.labels))

    data: Optional[Dataset] = None
    used: dict[str, Any] = {}
    if validate or verify_each or rec.verify_each:
        data, used = validation_data(original, inputs if inputs is not None else rec.inputs, calibration,
                                      pipeline, dims, seed, level)
        if data is None:
            refuse_unvalidated(used["not_run"], pipeline, strict)
        elif data.synthetic:
            dims = {**used.pop("binding"), **dims}  # calibrating passes read the same binding
    ctx = PassContext(calibration=calibration, seed=seed, dims=dims, log=log)
    reference: Optional[Reference] = None
    runnable: Optional[RuntimeModel] = None
    verify = verify_each if verify_each is not None else rec.verify_each
    if data is None:
        verify = False  # nothing to validate on: an exact pipeline is written unvalidated (refused above otherwise)
    opts = dict(ort_opt_level=level, latency_runs=latency_runs if validate else 0, latency_budget=latency_budget,
                **checks)
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
