"""The Ray executor: one Ray task per item, on a local Ray instance or a cluster reached through Ray Client.

Imported only by ``make_executor("ray")`` / ``make_executor("ray://HOST:PORT")``: Ray is an optional
extra (``pip install 'onnxopt[ray]'``).

- ``share`` puts a value in Ray's object store once; every task of every later ``map`` reads it
  from there (numpy arrays arrive as read-only views of the store, not copies).
- Workers import onnxopt from a copy shipped with the job (Ray's ``runtime_env`` ``py_modules``),
  laid out as an installed package, so a run from a source checkout works on any worker, local or
  remote. The workers' Python needs onnxopt's dependencies (onnx, onnxruntime, ...).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import ray
from ray.exceptions import RayError, RayTaskError

from ..errors import InputError
from . import TaskFailed

R = TypeVar("R")

_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")
_AUTH_HINT = ("a cluster with token authentication needs RAY_AUTH_MODE=token and its token "
              "(RAY_AUTH_TOKEN or ~/.ray/auth_token) in this environment")


def ship_package(stage: Path, package: Optional[Path] = None) -> Path:
    """The onnxopt package folder to ship to workers, with ``passes`` inside it as installed.

    An installed onnxopt already holds ``onnxopt/passes``; a source checkout keeps ``passes/``
    beside ``onnxopt/`` (see ``onnxopt/_builtin_passes.py``), so it is copied into ``stage``
    with ``passes/`` moved inside. ``package``: the onnxopt folder (default: this one).
    """
    package = package or Path(__file__).resolve().parent.parent
    if (package / "passes" / "__init__.py").is_file():
        return package
    copy = stage / "onnxopt"
    shutil.copytree(package, copy, ignore=_IGNORE)
    shutil.copytree(package.parent / "passes", copy / "passes", ignore=_IGNORE)
    return copy


def _short(item: Any, limit: int = 80) -> str:
    text = repr(item)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _connect(address: Optional[str], workers: Optional[int], runtime_env: dict) -> bool:
    """Join the cluster at ``address``, or a running local Ray, or start one with ``workers`` CPUs;
    True when it started one."""
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False, "runtime_env": runtime_env}
    if address is not None:  # ray://HOST:PORT through Ray Client
        target = address
    elif os.environ.get("RAY_ADDRESS"):
        target = os.environ["RAY_ADDRESS"]
    else:
        target = "auto"  # a head started on this machine with `ray start --head`
    try:
        ray.init(address=target, **quiet)
        return False
    except ConnectionError:
        if target != "auto":
            raise InputError(f"cannot reach Ray at {target}: no running cluster answered; {_AUTH_HINT}") from None
    except Exception as exc:  # Ray raises several kinds (auth, version mismatch, bad address)
        raise InputError(f"cannot join Ray at {target}: {type(exc).__name__}: {exc}; {_AUTH_HINT}") from None
    try:
        ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, **quiet)
    except Exception as exc:
        raise InputError(f"cannot start a local Ray instance: {type(exc).__name__}: {exc}") from None
    return True


class RayExecutor:
    """Runs ``fn(shared, item)`` as one Ray task per item; results in item order.

    ``address``: None joins a running local Ray (``RAY_ADDRESS``, or a head started on this machine)
    or starts one with ``workers`` CPUs; ``ray://HOST:PORT`` joins a cluster through Ray Client.
    ``workers`` caps the tasks in flight (default: the cluster's CPUs, all tasks submitted at once).
    """

    name = "ray"

    def __init__(self, address: Optional[str] = None, workers: Optional[int] = None):
        if workers is not None and workers < 1:
            raise InputError(f"workers must be at least 1, got {workers}")
        self._limit = workers
        self._stage = Path(tempfile.mkdtemp(prefix="onnxopt-ray-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._stage), True)
        try:
            package = ship_package(self._stage)
            # Ray uploads local folders only for a whole job (ray.init). In a Ray session the caller
            # started, tasks get the shipped copy through PYTHONPATH instead (workers on this machine).
            self._owned = not ray.is_initialized()
            self._task_env: dict = {}
            self.started = False  # True when this executor started a local Ray instance
            if self._owned:
                job_env = {"py_modules": [str(package)], "excludes": ["__pycache__", "*.pyc"]}
                self.started = _connect(address, workers, job_env)
                self._cleanup()  # uploaded at init
            elif package.parent == self._stage:
                self._task_env = {"env_vars": {"PYTHONPATH": str(self._stage)}}
        except BaseException:
            self._cleanup()
            raise
        self.workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))

    def share(self, value: Any) -> Any:
        """Put ``value`` in the object store once; returns its reference for ``map``."""
        return ray.put(value)

    def map(self, fn: Callable[[Any, Any], R], shared: Any, items: Sequence[Any],
            progress: Optional[Callable[[int, int], None]] = None) -> list[R]:
        items = list(items)
        if not items:
            return []
        # A value not from share() is still put once for the whole map, not once per task.
        ref = shared if isinstance(shared, ray.ObjectRef) else ray.put(shared)
        options: dict[str, Any] = {"num_cpus": 1}
        if self._task_env:
            options["runtime_env"] = self._task_env
        task = ray.remote(fn).options(**options)
        limit = self._limit or len(items)
        results: list[Any] = [None] * len(items)
        pending: dict[Any, int] = {}
        submitted = done = 0
        try:
            while done < len(items):
                while submitted < len(items) and len(pending) < limit:
                    pending[task.remote(ref, items[submitted])] = submitted
                    submitted += 1
                ready, _ = ray.wait(list(pending), num_returns=1)
                index = pending.pop(ready[0])
                try:
                    results[index] = ray.get(ready[0])
                except RayError as exc:
                    raise _task_failed(index, items[index], exc) from None
                done += 1
                if progress is not None:
                    progress(done, len(items))
        except BaseException:  # a failed task, Ctrl-C: the others stop too
            for other in pending:
                ray.cancel(other, force=True)
            raise
        return results

    def close(self) -> None:
        """Shut Ray down if this executor started or joined it (a joined cluster keeps running);
        a Ray session the caller started is left as it was."""
        if self._owned and ray.is_initialized():
            ray.shutdown()
        self._owned = False
        self._cleanup()


def _task_failed(index: int, item: Any, exc: RayError) -> TaskFailed:
    """One onnxopt error naming the item, with the worker's own exception as its cause."""
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    where = f"item {index} ({_short(item)}) failed on a Ray worker"
    if isinstance(cause, RayError):
        text = str(cause).strip().splitlines()
        message = f"{where}: {type(cause).__name__}: {text[-1] if text else ''}"
    else:
        message = f"{where}: {type(cause).__name__}: {cause}"
    return TaskFailed(message, index=index, cause=cause, details=str(exc))
