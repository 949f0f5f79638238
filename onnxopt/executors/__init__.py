"""Executors: where independent evaluations run (in this process, or on Ray workers).

``tune`` and other sweeps hand an executor a top-level function, one shared value (calibration
statistics, the model bytes) and a list of items. Every executor returns the results in item order,
so the same seed gives the same choices whichever executor ran them.

    ex = make_executor("local")           # or "ray", "ray://host:10001"
    shared = ex.share(big_value)           # stored once (Ray: in the object store)
    results = ex.map(evaluate, shared, items)   # evaluate(shared_value, item) -> result
    ex.close()

``fn`` must be a module-level function and items and results picklable, so that an out-of-process
executor can ship them. Ray is an optional extra: only ``make_executor("ray...")`` imports it.
An out-of-process executor reports a task that raised as one ``TaskFailed`` naming the item.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Sequence, TypeVar

from ..errors import InputError, OnnxoptError
from .local import LocalExecutor

R = TypeVar("R")


class TaskFailed(OnnxoptError):
    """One item of a ``map`` raised on a worker: the message names the item and the worker's error.

    ``cause`` is the worker's exception, ``details`` what the executor knows beyond the message (the
    worker's traceback); the exit code is the cause's for an onnxopt error (bad input stays 2), else
    3 as for any internal error."""

    def __init__(self, message: str, index: int, cause: BaseException, details: str = ""):
        super().__init__(message)
        self.index = index
        self.cause = cause
        self.details = details
        self.exit_code = cause.exit_code if isinstance(cause, OnnxoptError) else 3


class Executor(Protocol):
    """What ``tune`` needs from an executor."""

    name: str
    workers: int

    def share(self, value: Any) -> Any:
        """Store ``value`` once for every later ``map``; returns a handle to pass to ``map``."""

    def map(self, fn: Callable[[Any, Any], R], shared: Any, items: Sequence[Any],
            progress: Optional[Callable[[int, int], None]] = None) -> list[R]:
        """``[fn(value of shared, item) for item in items]``, in item order; ``progress(done, total)``
        is called in this process as results arrive."""

    def close(self) -> None:
        """Release workers and stored values."""


def make_executor(spec: str = "local", workers: Optional[int] = None) -> Executor:
    """``local`` (in this process), ``ray`` (join or start a local Ray instance), or ``ray://HOST:PORT``
    (join a cluster). ``workers`` caps concurrent tasks (default: what the executor has)."""
    spec = (spec or "local").strip()
    if spec == "local":
        return LocalExecutor()
    if spec == "ray" or spec.startswith("ray://"):
        try:
            from .ray_executor import RayExecutor
        except ImportError as exc:
            raise InputError(f"--executor {spec} needs Ray: pip install 'onnxopt[ray]' ({exc})") from None
        return RayExecutor(address=None if spec == "ray" else spec, workers=workers)
    raise InputError(f"unknown executor {spec!r}: use local, ray or ray://HOST:PORT")


__all__ = ["Executor", "LocalExecutor", "TaskFailed", "make_executor"]
