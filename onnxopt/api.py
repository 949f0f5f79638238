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
from .data import Dataset, load_dataset, synthetic_dataset
from .errors import InputError
from .pipeline import (EXACT, Pass, PassContext, PassManager, Pipeline, Tolerance, VerifyFailed)
from .report import OptimizeResult, write_text_atomic
from .validate import compare

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
    latency_runs: int = 0,
    repro_dir: Union[str, os.PathLike, None] = None,
    prerequisites: Optional[bool] = None,
) -> OptimizeResult:
    """Rewrite a model with a pipeline and validate it against the original in ONNX Runtime.

    ``passes`` is a pipeline string (``"dce,prune(sparsity=0.5)"``), a list, or a
    Pipeline; ``recipe`` a YAML file or mapping. Explicit arguments win over
    the recipe. Validation data comes from ``inputs``, else the calibration
    data, else seeded synthetic inputs. The result is returned even when
    validation fails (``result.passed`` is False; ``result.save`` refuses it).
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
    ctx = PassContext(calibration=calibration, seed=seed, dims=dims, log=log)

    data: Optional[Dataset] = None
    if validate or verify_each or rec.verify_each:
        data = _validation_data(original, inputs if inputs is not None else rec.inputs, calibration, dims, seed)
    verify = None
    if verify_each if verify_each is not None else rec.verify_each:
        user_tol = Tolerance.parse(tolerance) or Tolerance.parse(rec.tolerance)

        def verify(candidate: onnx.ModelProto, ran: list[Pass]):
            step_tol = user_tol or default_tolerance(Pipeline(ran))
            return compare(original, candidate, data, step_tol, ort_opt_level=level)

    prerequisites = rec.prerequisites if prerequisites is None else prerequisites
    manager = PassManager(pipeline, ctx, verify, prerequisites=bool(prerequisites))
    try:
        optimized = manager.run(original)
    except VerifyFailed as failure:
        if repro_dir is not None:
            failure.repro_dir = str(save_reproducer(failure, repro_dir))
        raise
    result = OptimizeResult(optimized, original, manager.canonical(), manager.records, source=source)
    if data is not None and data.synthetic:
        result.warnings.append("validated on synthetic inputs: give real data with --inputs or --calib")
    if validate:
        result.validation = compare(original, optimized, data, tol, ort_opt_level=level, latency_runs=latency_runs)
    result.seconds = time.perf_counter() - start
    return result


def _validation_data(model: onnx.ModelProto, inputs: Any, calibration: Any, dims: dict, seed: int) -> Dataset:
    if inputs is not None:
        return load_dataset(inputs, model, what="validation data")
    if calibration is not None and isinstance(calibration, (str, os.PathLike, dict)):
        return load_dataset(calibration, model, limit=VALIDATION_SAMPLES, what="calibration data")
    return synthetic_dataset(model, dims=dims, seed=seed)


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
