"""ONNX Runtime for validation: sessions that cost little memory, runs with one-line errors,
latency within a time budget, and a store for reference outputs.

A session made from serialised bytes holds the weights two or three times over
(the bytes, ORT's parsed copy, packed kernels). A large model is instead written,
tensor by tensor, to a private folder (:func:`serialize.write_mapped`): ORT maps
its data file instead of copying it, and no second copy of the model is made.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import re
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import onnx

from .io import external_ref, external_refs, temp_prefix, tensor_bytes
from .serialize import read_mapped, serialized_size, write_mapped
from .errors import InputError, ValidationFailed

OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

# Models past this many bytes get their sessions through mapped files (see the module doc).
FILE_SESSION_BYTES = 32 * 2**20
# The longest one validation batch may run (seconds); ONNXOPT_RUN_TIMEOUT overrides it.
RUN_TIMEOUT_S = float(os.environ.get("ONNXOPT_RUN_TIMEOUT", "600"))
# Upper bound on the runs of an adaptive latency measurement.
MAX_LATENCY_RUNS = 100


def session_options(opt_level: str, threads: int = 0):
    if opt_level not in OPT_LEVELS:
        raise InputError(f"unknown ORT optimization level '{opt_level}'; choose one of {', '.join(OPT_LEVELS)}")
    import onnxruntime as ort  # imported here: ~30 MB that runs which never validate should not pay

    ort.set_default_logger_severity(3)  # ORT's own warnings never reach the terminal
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[opt_level])
    options.intra_op_num_threads = threads
    options.log_severity_level = 4  # errors come back as exceptions, worded by onnxopt; no raw ORT lines
    return options


class RuntimeModel:
    """A model as ORT sessions take it: the ModelProto itself when small; when large, or when it
    holds references to its input's data file (:func:`io.external_ref`), a small graph file and a
    data file ORT maps (see :func:`write_mapped`) in a private folder, after which the caller may
    let the ModelProto go. References are hard-linked into the folder (ORT reads external data
    only from the model's own folder, symbolic links resolved), so weights a pass did not rewrite
    are never copied; where no link can be made they are copied file to file. ``close`` removes
    the folder (the input's data stays)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.size = serialized_size(model)
        self.model: Optional[onnx.ModelProto] = None
        self.folder: Optional[Path] = None
        self.links: dict[str, str] = {}  # local name -> the input's data file
        refs = sorted({external_ref(t).path for t in external_refs(model)})
        if tensor_bytes(model) <= FILE_SESSION_BYTES and not refs:
            self.model = model
            return
        try:
            self.folder, by_path = _folder_with_links(refs)
            self.links = {local: path for path, local in by_path.items()}
            self.path = write_mapped(model, self.folder, link=by_path.get)
        except BaseException:
            self.close()
            raise
        release_memory()  # the tensors' transient copies

    @property
    def on_disk(self) -> bool:
        return self.folder is not None

    def session(self, options):
        import onnxruntime as ort

        source = self.model.SerializeToString() if self.model is not None else str(self.path)
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])

    def load(self) -> onnx.ModelProto:
        """The model back as a ModelProto (read from its files when on disk; references stay references)."""
        return self.model if self.model is not None else read_mapped(self.path, self.links)

    def close(self) -> None:
        self.model = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def _folder_with_links(refs: list[str]) -> tuple[Path, dict[str, str]]:
    """A private folder and, for each data file in ``refs``, the name of a hard link to it there.

    Tried in the system's temporary folder, then beside each data file (same file system; named
    as onnxopt's temporaries, so a later run removes one a killed run left); when no folder
    takes every link, the system's temporary folder without links (the data is then copied)."""
    places: list[Optional[str]] = [None, *sorted({str(Path(r).parent) for r in refs})] if refs else [None]
    for place in places:
        try:
            folder = Path(tempfile.mkdtemp(prefix=temp_prefix() if place else "onnxopt-ort-", dir=place))
        except OSError:
            continue
        links = {}
        try:
            for i, path in enumerate(refs):
                os.link(path, folder / f"input{i}.data")
                links[path] = f"input{i}.data"
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)
            continue
        return folder, links
    return Path(tempfile.mkdtemp(prefix="onnxopt-ort-")), {}


def make_session(model: onnx.ModelProto, opt_level: str = "all", threads: int = 0):
    """A CPU session for an in-memory model; large models go through mapped files."""
    return session_for(model, session_options(opt_level, threads))


def session_for(model: Union[onnx.ModelProto, RuntimeModel], options: Any = None):
    """A CPU session for ``model`` with ``options`` (ORT's SessionOptions; defaults when None), the
    way every caller should make one: a small model from its bytes, a large one or one holding
    references to its input's data from files (:class:`RuntimeModel`), never from the bytes of a
    large model. The session keeps what it needs; the temporary files go when it is made."""
    import onnxruntime as ort

    if isinstance(model, RuntimeModel):
        return model.session(options or ort.SessionOptions())
    held = RuntimeModel(model)
    try:
        return held.session(options or ort.SessionOptions())
    finally:
        held.close()  # ORT has read or mapped the data by now; a mapping outlives the file's name


class _Held:
    """A session lent by :func:`open_session`; it lets go of the session when the block ends."""

    def __init__(self, sess) -> None:
        self.sess = sess

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sess, name)


@contextlib.contextmanager
def open_session(model: Union[onnx.ModelProto, RuntimeModel], opt_level: str = "all", threads: int = 0,
                 which: Optional[str] = None) -> Iterator[Any]:
    """A CPU session for ``model``, for the length of a ``with`` block: then it is dropped and
    its memory handed back to the system (and its temporary files removed, for a large
    ModelProto; a RuntimeModel keeps its files for the next session).

    With ``which`` ('original', 'optimized'), a model ORT cannot load is reported
    in one line: bad input for the original, a failed validation for a rewrite.
    """
    options = session_options(opt_level, threads)
    owned = RuntimeModel(model) if isinstance(model, onnx.ModelProto) else None
    held = None
    try:
        try:
            sess = (owned or model).session(options)
        except Exception as exc:
            if which is None:
                raise
            raise load_error(exc, which) from None
        held = _Held(sess)
        del sess
        yield held
    finally:
        if held is not None:
            held.sess = None
            release_memory()
        # ORT has mapped the data by now; on POSIX the mapping outlives the file's name.
        if owned is not None:
            owned.close()


def release_memory() -> None:
    """Hand freed memory back to the system (glibc keeps it otherwise, and the next session
    would count on top of the last one); a no-op elsewhere."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_error(exc: BaseException, which: str) -> Exception:
    """ORT could not load a model: bad input for the original, a failed validation for a rewrite."""
    first = ort_message(exc)
    if which == "original":
        return InputError(f"ONNX Runtime cannot load the original model: {first}")
    return ValidationFailed(f"ONNX Runtime cannot load the optimized model: {first}")


def run(sess, feed: dict, which: str) -> list:
    """One validation batch, stopped after ``RUN_TIMEOUT_S`` (a model whose Loop never ends must not hang a run)."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4
    timer = threading.Timer(RUN_TIMEOUT_S, lambda: setattr(options, "terminate", True))
    timer.start()
    try:
        return sess.run(None, feed, options)
    except Exception as exc:
        first = ort_message(exc)
        if options.terminate:
            first = (f"one batch ran for more than {RUN_TIMEOUT_S:g} s and was stopped "
                     f"(set ONNXOPT_RUN_TIMEOUT=SECONDS to allow longer)")
        if which == "original":
            raise InputError(f"ONNX Runtime cannot run the original model on these inputs: {first}") from None
        raise ValidationFailed(f"ONNX Runtime cannot run the {which} model: {first}") from None
    finally:
        timer.cancel()


_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_NODE = re.compile(r"Non-zero status code returned while running (\S+) node\. Name:'([^']*)' Status Message:\s*(.*)")


def ort_message(exc: BaseException) -> str:
    """ONNX Runtime's error in one line: the failing node and the message, without source paths."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    line = _PREFIX.sub("", line)
    match = _NODE.search(line)
    if not match:
        return line
    op, name, message = match.groups()
    message = re.sub(r"^\S+\.(cc|h|cpp):\d+\s+", "", message)
    message = _strip_signature(message)
    return f"node '{name}' ({op}): {message}" if name else f"a {op} node: {message}"


def _strip_signature(message: str) -> str:
    """Drop a leading C++ function signature ('onnxruntime::Status onnxruntime::F(...) const ')."""
    if "onnxruntime::" not in message.split("(", 1)[0]:
        return message
    depth = 0
    for i, ch in enumerate(message):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                rest = message[i + 1:].lstrip()
                return rest[len("const"):].lstrip() if rest.startswith("const") else rest
    return message


# ----------------------------------------------------------------- latency

def latency_ms(sess, feed: dict, runs: int, warmup: int = 2, progress: Optional[Callable] = None) -> float:
    """Median wall time of one run over exactly ``runs`` runs, in milliseconds
    (``progress(done, total)`` after each timed run)."""
    for _ in range(warmup):
        sess.run(None, feed)
    return statistics.median(_times(sess, feed, runs, progress))


def latency_within(sess, feed: dict, budget_s: float, max_runs: int = MAX_LATENCY_RUNS,
                   progress: Optional[Callable] = None) -> tuple[float, int]:
    """Median wall time (ms) of as many runs as fit in ``budget_s``, and how many ran.

    The session is expected to be warm (it has just run the validation feeds):
    one timed run sets how many more fit; at least one always runs.
    """
    first = _times(sess, feed, 1)
    more = max(0, min(int((budget_s - first[0] / 1000.0) // max(first[0] / 1000.0, 1e-6)), max_runs - 1))
    if progress is not None:
        progress(1, 1 + more)
    times = first + _times(sess, feed, more, progress, done=1)
    return statistics.median(times), len(times)


def _times(sess, feed: dict, runs: int, progress: Optional[Callable] = None, done: int = 0) -> list[float]:
    times = []
    for i in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
        if progress is not None:
            progress(done + i + 1, done + runs)
    return times


# ----------------------------------------------------------------- reference outputs

class OutputStore:
    """Outputs of one model, feed by feed, kept until the other model has run.

    Arrays stay in memory up to ``budget`` bytes; beyond that numeric arrays go
    to .npy files in a private folder and come back memory-mapped, so holding
    the reference outputs of a long validation set costs disk, not memory.
    """

    def __init__(self, budget: int = 256 * 2**20) -> None:
        self.budget, self.held = budget, 0
        self.items: list[list[Any]] = []
        self.folder: Optional[Path] = None

    def add(self, outputs: list) -> None:
        kept = []
        for j, out in enumerate(outputs):
            array = out if isinstance(out, np.ndarray) else None
            if array is not None and array.dtype.kind in "biuf" and self.held + array.nbytes > self.budget:
                kept.append(self._spill(array, len(self.items), j))
            else:
                self.held += array.nbytes if array is not None else 0
                # ORT's arrays are views of its own buffers: a copy lets the session's memory go
                kept.append(array.copy() if array is not None and not array.flags.owndata else out)
        self.items.append(kept)

    def _spill(self, array: np.ndarray, i: int, j: int) -> Path:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="onnxopt-outputs-"))
        path = self.folder / f"{i}_{j}.npy"
        np.save(path, array)
        return path

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> list:
        return [np.load(x, mmap_mode="r") if isinstance(x, Path) else x for x in self.items[i]]

    def close(self) -> None:
        self.items = []
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __del__(self) -> None:  # a store dropped without close() still leaves no files
        with contextlib.suppress(Exception):
            self.close()
