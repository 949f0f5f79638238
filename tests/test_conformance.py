"""Conformance: every ONNX backend node-test case (and the data cases the onnx wheel ships)
through the ``dce`` pass, run in ONNX Runtime before and after, outputs bit-identical.

The onnx wheel ships the node-test *definitions* (``onnx.backend.test.case.node``) but
not their data; onnx's own writer (``onnx.backend.test.cmd_tools.generate_data``) turns
them into ``node/<case>/model.onnx`` + ``test_data_set_0/{input,output}_*.pb``. That is
done once into a cache folder (``$ONNXOPT_CACHE`` or ``~/.cache/onnxopt``), named after
the onnx version, written to a temporary folder and renamed into place so an interrupted
run never leaves half a cache. The ``simple``, ``pytorch-converted`` and
``pytorch-operator`` cases the wheel ships with data are added as they are.

Only two kinds of case are skipped, both decided at run time: the original model is
rejected by ``onnxopt.load`` (the ONNX checker), or ONNX Runtime cannot load or run the
original. Every other case must come out of ``dce`` with the same graph inputs and
outputs (names, order, declared types) and bit-identical ORT results on its
test_data_set_0 (np.array_equal with equal_nan, same dtypes and shapes; raw bytes for
bfloat16/float8/int4...). A case whose original gives different results on two runs
(random ops) is only checked for output types and shapes.

Run it alone with ``pytest -m conformance -s tests/test_conformance.py`` to see the counts.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxopt

ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.conformance

# Float outputs after lossy-free but reordering passes (fold_bn) must agree within rounding.
CLOSE_RTOL, CLOSE_ATOL = 1e-4, 1e-5

# Pipelines run over the corpus, and whether their outputs must be bit-identical.
PIPELINES = {"dce": True, "cleanup": False}

# Originals that break the spec in a way ORT tolerates only until a rewrite exposes it.
# Each entry must still fail exactly so; when one stops failing, the test says to drop it.
# (pipeline, case) -> why the original breaks the spec in a way only an optimized form exposes.
# The affine_grid cases once were here (a Range fed 1-element tensors inside an If that ORT
# inlined once fold made its condition constant); cleanup now resolves those shapes itself.
SPEC_BREAKING_ORIGINALS: dict[tuple[str, str], str] = {}

MIN_CASES_RUN = 1400  # of ~2,020 cases, ~1,860 run in ORT (onnx 1.23, onnxruntime 1.32)
SHIPPED_KINDS = ("simple", "pytorch-converted", "pytorch-operator")

# Element types ORT's Python binding cannot turn into numpy arrays (inputs go in as
# OrtValues, outputs come back as raw bytes).
_NON_NUMPY = {
    getattr(onnx.TensorProto, name) for name in (
        "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ",
        "UINT4", "INT4", "FLOAT4E2M1", "FLOAT8E8M0", "UINT2", "INT2")
    if hasattr(onnx.TensorProto, name)
}

# Run in a fresh interpreter: collecting the cases imports ~200 modules, mutates module
# globals of onnx.backend.test.case.node and prints numpy warnings.
_GENERATE = r"""
import argparse, sys, types, warnings
warnings.simplefilter("ignore")
import onnx.backend.test.case.node as node_test
from onnx.backend.test import cmd_tools
cases = node_test.collect_testcases()
# generate_data writes whatever cmd_tools.model_test.collect_testcases() returns;
# point it at the node cases only.
cmd_tools.model_test = types.SimpleNamespace(collect_testcases=lambda: cases)
cmd_tools.generate_data(argparse.Namespace(output=sys.argv[1]))
print(len(cases))
"""


# ----------------------------------------------------------------- the corpus

def _cache_root(fallback: Path) -> Path:
    root = Path(os.environ.get("ONNXOPT_CACHE") or Path.home() / ".cache" / "onnxopt")
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError:
        return fallback
    return root


def _node_cases_dir(root: Path) -> tuple[Path, float]:
    """The generated node cases, made on first use; returns (folder, seconds spent generating)."""
    final = root / f"onnx-node-cases-{onnx.__version__}"
    if (final / "node").is_dir():
        return final, 0.0
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        proc = subprocess.run([sys.executable, "-c", _GENERATE, str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"generating the onnx node-test data failed:\n{proc.stderr[-4000:]}")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "node").is_dir():  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, time.perf_counter() - start


def _case_dirs(node_root: Path) -> list[Path]:
    dirs = sorted(p for p in (node_root / "node").iterdir() if (p / "model.onnx").is_file())
    shipped = Path(onnx.__file__).parent / "backend" / "test" / "data"
    for kind in SHIPPED_KINDS:
        if (shipped / kind).is_dir():
            dirs += sorted(p for p in (shipped / kind).iterdir() if (p / "model.onnx").is_file())
    return dirs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[Path], float]:
    root = _cache_root(tmp_path_factory.mktemp("onnxopt-cache"))
    node_root, seconds = _node_cases_dir(root)
    return _case_dirs(node_root), seconds


# ----------------------------------------------------------------- running a case

def _read_proto(path: Path, proto: Any) -> Any:
    proto.ParseFromString(path.read_bytes())
    return proto


def _load_value(path: Path, type_proto: onnx.TypeProto) -> Any:
    """One input_*.pb as ORT takes it, read as the model's declared input type says."""
    if type_proto.HasField("sequence_type"):
        return numpy_helper.to_list(_read_proto(path, onnx.SequenceProto()))
    if type_proto.HasField("optional_type"):
        return numpy_helper.to_optional(_read_proto(path, onnx.OptionalProto()))
    if type_proto.HasField("map_type"):
        return numpy_helper.to_dict(_read_proto(path, onnx.MapProto()))
    tensor = _read_proto(path, onnx.TensorProto())
    array = numpy_helper.to_array(tensor)
    if tensor.data_type in _NON_NUMPY:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, tensor.data_type)
    return array


def _feeds(case: Path, model: onnx.ModelProto) -> dict[str, Any]:
    """test_data_set_0's inputs, matched to graph inputs by position as onnx's runner does."""
    data = case / "test_data_set_0"
    count = len(list(data.glob("input_*.pb")))
    inputs = model.graph.input
    return {inputs[i].name: _load_value(data / f"input_{i}.pb", inputs[i].type) for i in range(count)}


@dataclass
class RawTensor:
    """An ORT output numpy cannot hold: its element type, shape and bytes."""

    elem_type: str
    shape: tuple
    data: bytes


def _raw(value: Any) -> Any:
    if not value.is_tensor():
        raise TypeError("non-tensor output beside a non-numpy tensor output")
    size = value.tensor_size_in_bytes()
    data = ctypes.string_at(value.data_ptr(), size) if size else b""
    return RawTensor(value.data_type(), tuple(value.shape()), data)


def _session(model: Any) -> Any:
    options = ort.SessionOptions()
    options.log_severity_level = 4  # only silences the log; optimisation settings stay default
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _run(model_source: Any, model: onnx.ModelProto, feeds: dict[str, Any]) -> list[Any]:
    session = _session(model_source)
    names = [o.name for o in model.graph.output]
    raw = any(o.type.tensor_type.elem_type in _NON_NUMPY for o in model.graph.output
              if o.type.HasField("tensor_type"))
    if not raw:
        return session.run(names, feeds)
    ort_feeds = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v)
                 for k, v in feeds.items()}
    outs = session.run_with_ort_values(names, ort_feeds)
    return [_raw(outs[i]) for i in range(len(names))]


def _difference(a: Any, b: Any, where: str = "output", close: bool = False) -> str | None:
    """Why two ORT results are not identical (``close``: not equal within float rounding), or None."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
            return f"{where}: {type(a).__name__} vs {type(b).__name__}"
        if a.dtype != b.dtype:
            return f"{where}: dtype {a.dtype} vs {b.dtype}"
        if a.shape != b.shape:
            return f"{where}: shape {a.shape} vs {b.shape}"
        nan_ok = a.dtype.kind in "fc"
        if close and nan_ok:
            scale = 10.0 if a.dtype == np.float16 else 1.0
            if np.allclose(a, b, rtol=scale * CLOSE_RTOL, atol=scale * CLOSE_ATOL, equal_nan=True):
                return None
        if not np.array_equal(a, b, equal_nan=nan_ok):
            if a.dtype.kind in "fciub":
                same = (a == b) | (np.isnan(a) & np.isnan(b)) if nan_ok else (a == b)
                return f"{where}: {int(a.size - np.count_nonzero(same))} of {a.size} values differ"
            return f"{where}: values differ"
        return None
    if isinstance(a, RawTensor) or isinstance(b, RawTensor):
        if a != b:
            return f"{where}: raw tensors differ ({getattr(a, 'elem_type', a)} vs {getattr(b, 'elem_type', b)})"
        return None
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return f"{where}: sequence {type(a).__name__}[{len(a) if hasattr(a, '__len__') else '?'}] vs " \
                   f"{type(b).__name__}[{len(b) if hasattr(b, '__len__') else '?'}]"
        for i, (x, y) in enumerate(zip(a, b)):
            problem = _difference(x, y, f"{where}[{i}]", close)
            if problem:
                return problem
        return None
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)) or a.keys() != b.keys():
            return f"{where}: map keys differ"
        for key in a:
            problem = _difference(a[key], b[key], f"{where}[{key!r}]", close)
            if problem:
                return problem
        return None
    if type(a) is not type(b) or a != b:
        return f"{where}: {a!r} vs {b!r}"
    return None


def _differences(ref: list, got: list, names: list[str], close: bool = False) -> str | None:
    if len(ref) != len(got):
        return f"{len(ref)} outputs vs {len(got)}"
    for name, a, b in zip(names, ref, got):
        problem = _difference(a, b, f"output '{name}'", close)
        if problem:
            return problem
    return None


def _shape_difference(a: Any, b: Any) -> str | None:
    """For nondeterministic originals: the types and shapes must still agree."""
    def sig(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            return ("array", str(v.dtype), v.shape)
        if isinstance(v, RawTensor):
            return ("raw", v.elem_type, v.shape)
        if isinstance(v, (list, tuple)):
            return ("seq", tuple(sig(x) for x in v))
        if isinstance(v, dict):
            return ("map", tuple(sorted((repr(k), sig(x)) for k, x in v.items())))
        return (type(v).__name__,)
    return None if [sig(x) for x in a] == [sig(x) for x in b] else "output types or shapes differ"


def _interface_difference(original: onnx.ModelProto, optimized: onnx.ModelProto) -> str | None:
    """dce must keep the graph's inputs and outputs: names, order and declared types."""
    for role in ("input", "output"):
        before = [(vi.name, vi.type) for vi in getattr(original.graph, role)]
        after = [(vi.name, vi.type) for vi in getattr(optimized.graph, role)]
        if [n for n, _ in before] != [n for n, _ in after]:
            return f"graph {role}s {[n for n, _ in before]} became {[n for n, _ in after]}"
        for (name, a), (_, b) in zip(before, after):
            if a != b:
                text = lambda t: " ".join(str(t).split()) or "no type"  # noqa: E731
                return f"graph {role} '{name}': type {text(a)} became {text(b)}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _ort_category(exc: BaseException) -> str:
    """A short bucket for why ORT could not run an original."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if m := re.search(r"Could not find an implementation for (\w+)\((\d+)\)", text):
        return f"no CPU kernel for {m.group(1)}({m.group(2)})"
    if m := re.search(r"Failed to find kernel for (\w+)\((\d+)\)", text):
        return f"no CPU kernel for {m.group(1)}({m.group(2)})"
    if "No corresponding Numpy type" in text or "can't be converted to MLDataType" in text:
        return "input/output type not supported by the Python binding"
    if m := re.search(r"\[ONNXRuntimeError\] : \d+ : (\w+) :", text):
        detail = re.sub(r"Load model from \S+ failed:|/onnxruntime_src/\S+", "", text.split(" : ", 3)[-1])
        return f"{m.group(1)}: {detail.strip()[:90]}"
    return f"{type(exc).__name__}: {text[:90]}"


def _load_category(exc: BaseException, path: Path) -> str:
    text = str(exc).replace(str(path) + ": ", "")
    return text.split(": ")[0][:90]


@contextlib.contextmanager
def _quiet():
    """Silence onnxopt's and onnx-graphsurgeon's warnings for the run; restore after."""
    saved = logging.getLogger("onnxopt").level
    logging.getLogger("onnxopt").setLevel(logging.ERROR)
    gs_logger = None
    try:
        from onnx_graphsurgeon.logger import G_LOGGER as gs_logger
        gs_saved = gs_logger.severity
        gs_logger.severity = gs_logger.ERROR
    except (ImportError, AttributeError):
        gs_logger = None
    try:
        yield
    finally:
        logging.getLogger("onnxopt").setLevel(saved)
        if gs_logger is not None:
            gs_logger.severity = gs_saved


@dataclass
class Tally:
    cases: int = 0
    run: int = 0
    identical: int = 0
    nondeterministic: int = 0
    ort_skipped: collections.Counter = field(default_factory=collections.Counter)
    load_rejected: collections.Counter = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)

    pipeline: str = "dce"
    expected_failures: int = 0

    def summary(self, seconds: float, generated: float) -> str:
        lines = [
            f"onnx {onnx.__version__}, onnxruntime {ort.__version__}: '{self.pipeline}' conformance",
            f"  cases                                     {self.cases}",
            f"  run (original and optimized in ORT)       {self.run}",
            f"  {'identical' if PIPELINES[self.pipeline] else 'equal within float rounding':<42}{self.identical}",
            f"  known spec-breaking originals (failed)    {self.expected_failures}",
            f"  nondeterministic original (types/shapes)  {self.nondeterministic}",
            f"  skipped, ORT cannot run the original      {sum(self.ort_skipped.values())}",
            f"  skipped, onnxopt.load rejects original    {sum(self.load_rejected.values())}",
            f"  failed                                    {len(self.failures)}",
            f"  time {seconds:.1f}s (of which generating the corpus {generated:.1f}s)",
        ]
        for title, counter in (("onnxopt.load rejected the original", self.load_rejected),
                               ("ORT cannot run the original", self.ort_skipped)):
            if counter:
                lines.append(f"  {title}, by reason:")
                lines += [f"    {n:4d}  {reason}" for reason, n in counter.most_common()]
        return "\n".join(lines)


def _check_case(case: Path, tally: Tally) -> None:
    name = f"{case.parent.name}/{case.name}"
    path = case / "model.onnx"
    try:
        original = onnxopt.load(path)
    except onnxopt.InputError as exc:
        tally.load_rejected[_load_category(exc, path)] += 1
        return
    try:
        feeds = _feeds(case, original)
        reference = _run(str(path), original, feeds)
    except Exception as exc:  # noqa: BLE001 - whatever stops ORT on the original skips the case
        tally.ort_skipped[_ort_category(exc)] += 1
        return
    try:
        optimized = onnxopt.optimize(original, tally.pipeline, validate=False).model
        result = _run(optimized.SerializeToString(), optimized, feeds)
    except Exception as exc:  # noqa: BLE001 - any error after this point is onnxopt's
        if (tally.pipeline, case.name) in SPEC_BREAKING_ORIGINALS:
            tally.expected_failures += 1
            return
        tally.failures.append(f"{name}: {_first_line(exc)}")
        return
    if (tally.pipeline, case.name) in SPEC_BREAKING_ORIGINALS:
        tally.failures.append(f"{name}: listed in SPEC_BREAKING_ORIGINALS but now passes; drop the entry")
    tally.run += 1
    problem = _interface_difference(original, optimized)
    if problem is not None:
        tally.failures.append(f"{name}: {problem}")
        return
    names = [o.name for o in original.graph.output]
    problem = _differences(reference, result, names, close=not PIPELINES[tally.pipeline])
    if problem is None:
        tally.identical += 1
        return
    again = _run(str(path), original, feeds)
    if _differences(reference, again, names) is not None:  # the original disagrees with itself
        tally.nondeterministic += 1
        problem = _shape_difference(reference, result)
        if problem is None:
            return
    tally.failures.append(f"{name}: {problem}")


@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_node_corpus(corpus, pipeline):
    cases, generated = corpus
    start = time.perf_counter()
    tally = Tally(cases=len(cases), pipeline=pipeline)
    with _quiet():
        for case in cases:
            _check_case(case, tally)
    summary = tally.summary(time.perf_counter() - start + generated, generated)
    print("\n" + summary)
    if tally.failures:
        pytest.fail(f"{len(tally.failures)} case(s) fail through {pipeline}:\n  " + "\n  ".join(tally.failures)
                    + "\n" + summary, pytrace=False)
    if tally.run < MIN_CASES_RUN:
        pytest.fail(f"only {tally.run} cases ran (expected at least {MIN_CASES_RUN})\n{summary}", pytrace=False)
