"""The user's metric: a function or class named ``module:attr`` or ``file.py:attr``, and labels.

Two forms, both streaming (one batch at a time, each model separately):

- a **function** ``f(outputs, labels) -> {name: number}`` is called on every batch; each
  number is averaged over the batches, weighted by their samples (right for means:
  accuracy, mean loss, mean error);
- a **class** (or an object) with ``update(outputs, labels)`` and ``result() -> {name: number}``
  gets every batch and answers once (for figures that are not means: recall@k over the whole
  set, F1, corpus-level scores); a class is made afresh for each model, an object copied.

``outputs`` maps output names to arrays of one batch (copies: keep them if you need them);
``labels`` maps the label file's array names to the same samples (None without labels).
A function or ``update`` that takes an ``inputs`` argument also gets the batch's inputs.
An attribute ``lower_is_better`` (names) marks figures where a rise, not a drop, is the loss.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import numbers
import sys
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..errors import InputError

LABELS = "labels"


class MetricHook:
    """A user metric resolved and ready: ``start()`` gives a fresh run for one model."""

    def __init__(self, target: Any, spec: str) -> None:
        self.target, self.spec = target, spec
        self.lower_is_better = set(getattr(target, "lower_is_better", ()) or ())
        self.streaming = inspect.isclass(target) or (hasattr(target, "update") and hasattr(target, "result"))
        if not self.streaming and not callable(target):
            raise InputError(f"metric {spec}: expected a function or a class with update() and result(), "
                             f"got {type(target).__name__}")
        if inspect.isclass(target) and not (hasattr(target, "update") and hasattr(target, "result")):
            raise InputError(f"metric {spec}: the class needs update(outputs, labels) and result() methods")
        self.wants_inputs = _takes(target.update if self.streaming else target, "inputs")

    def start(self) -> "MetricRun":
        try:
            state = self.target() if inspect.isclass(self.target) else (
                copy.deepcopy(self.target) if self.streaming else None)
        except Exception as exc:
            raise self.error("raised", exc) from None
        return MetricRun(self, state)

    def error(self, what: str, exc: Optional[BaseException] = None) -> InputError:
        """One line for the user: what the metric did (and the first line of what it raised)."""
        text = f"metric {self.spec} {what}"
        if exc is not None:
            text += f" {_exception_line(exc)}"
        return InputError(text)


class MetricRun:
    """One model's pass over the batches."""

    def __init__(self, hook: MetricHook, state: Any) -> None:
        self.hook, self.state = hook, state
        self.sums: dict[str, float] = {}
        self.rows = 0

    def update(self, outputs: dict[str, Any], labels: Optional[dict[str, np.ndarray]],
               inputs: dict[str, Any], rows: int) -> None:
        outputs = {k: np.array(v, copy=True) for k, v in outputs.items()}
        kwargs = {"inputs": inputs} if self.hook.wants_inputs else {}
        try:
            if self.state is not None:
                self.state.update(outputs, labels, **kwargs)
                return
            values = self.hook.target(outputs, labels, **kwargs)
        except InputError:
            raise
        except Exception as exc:
            raise self.hook.error("raised", exc) from None
        values = _numbers(values, self.hook)
        if self.sums and set(values) != set(self.sums):
            raise self.hook.error(f"returned {sorted(values)} for one batch and {sorted(self.sums)} for another")
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * rows
        self.rows += rows

    def result(self) -> dict[str, float]:
        if self.state is None:
            if not self.rows:
                raise self.hook.error("saw no batch")
            return {k: v / self.rows for k, v in self.sums.items()}
        try:
            values = self.state.result()
        except Exception as exc:
            raise self.hook.error("raised", exc) from None
        return _numbers(values, self.hook)


def _numbers(values: Any, hook: MetricHook) -> dict[str, float]:
    if not isinstance(values, dict) or not values:
        raise hook.error(f"returned {type(values).__name__ if not isinstance(values, dict) else 'an empty dict'}; "
                         "expected a dict of names to numbers")
    out = {}
    for k, v in values.items():
        if isinstance(v, np.ndarray) and v.ndim == 0:
            v = v.item()
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (numbers.Real, np.floating, np.integer)):
            raise hook.error(f"returned {k!r}: {type(v).__name__}; expected a dict of names to numbers")
        out[k] = float(v)
    return out


def _takes(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def load_metric(spec: Union[str, Any, None]) -> Optional[MetricHook]:
    """``"module:attr"``, ``"path/file.py:attr"``, a function, class or object -> a MetricHook."""
    if spec is None or isinstance(spec, MetricHook):
        return spec
    if not isinstance(spec, str):
        return MetricHook(spec, getattr(spec, "__qualname__", type(spec).__name__))
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise InputError(f"--metric expects module:function or file.py:function, got '{spec}'")
    module = _import(where, spec)
    target = module
    try:
        for part in attr.split("."):
            target = getattr(target, part)
    except AttributeError:
        raise InputError(f"metric {spec}: '{where}' has no '{attr}'") from None
    return MetricHook(target, spec)


def _import(where: str, spec: str) -> Any:
    path = Path(where)
    if where.endswith(".py") or path.is_file():
        if not path.is_file():
            raise InputError(f"metric {spec}: no such file '{where}'")
        name = f"onnxopt_metric_{abs(hash(str(path.resolve())))}"
        try:
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
            return module
        except Exception as exc:
            sys.modules.pop(name, None)
            raise InputError(f"metric {spec}: cannot import '{where}': {_exception_line(exc)}") from None
    try:
        return importlib.import_module(where)
    except Exception as exc:
        raise InputError(f"metric {spec}: cannot import '{where}': {_exception_line(exc)}") from None


def _exception_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# ----------------------------------------------------------------- labels

def load_labels(source: Any, samples: Optional[int] = None) -> Optional[dict[str, np.ndarray]]:
    """Labels from a .npz/.npy file or a mapping: arrays with one row per sample, in the order of the
    inputs. The array named ``labels`` (or a file's only array) gives class labels and text ids."""
    if source is None:
        return None
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file() or path.suffix not in (".npz", ".npy"):
            raise InputError(f"{path}: labels must be a .npz or .npy file")
        try:
            if path.suffix == ".npy":
                arrays = {LABELS: np.load(path, allow_pickle=False)}
            else:
                with np.load(path, allow_pickle=False) as npz:
                    arrays = {k: npz[k] for k in npz.files}
        except Exception as exc:
            raise InputError(f"{path}: cannot read labels: {exc}") from None
        label = str(path)
    elif isinstance(source, dict):
        arrays, label = {k: np.asarray(v) for k, v in source.items()}, "labels"
    else:
        arrays, label = {LABELS: np.asarray(source)}, "labels"
    if not arrays:
        raise InputError(f"{label}: holds no arrays")
    if LABELS not in arrays and len(arrays) == 1:
        arrays = {LABELS: next(iter(arrays.values())), **arrays}
    for name, array in arrays.items():
        if np.ndim(array) == 0:
            raise InputError(f"{label}: '{name}' holds a single value; it needs one row per sample")
        if samples is not None and len(array) != samples:
            raise InputError(f"{label}: '{name}' has {len(array)} rows for {samples} samples")
    return arrays


def primary(labels: Optional[dict[str, np.ndarray]]) -> Optional[np.ndarray]:
    """The class labels / text ids among the label arrays."""
    if not labels:
        return None
    array = labels.get(LABELS)
    if array is not None and array.ndim == 2 and array.shape[1] == 1:
        array = array.reshape(-1)
    return array
