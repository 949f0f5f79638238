"""Findings on the corpus: onnxopt's default run against onnxsim, onnxslim and onnxoptimizer.

    PYTHONPATH=. /work/venv/bin/python tools/corpus_report.py [--cache DIR] [--only 'ppocr*']
        [--out corpus-findings.md] [--timeout 300] [--tools onnxsim,onnxslim,onnxoptimizer]

For every model in CACHE/manifest.json (built by tools/corpus.py), each step in its own subprocess
with a timeout:

  no data      `python -m onnxopt optimize MODEL -o OUT` (the first command a user types)
  real inputs  `python -m onnxopt optimize MODEL -o OUT --inputs inputs.npz --latency-runs 0 --report R`
  peers        onnxsim.simplify, onnxslim.slim, onnxoptimizer.optimize with their defaults; each
               result is run on the first feed of the real inputs against the original (ORT, CPU)
  floor        the original on that feed under ORT optimization level all against disable

and prints one markdown table: nodes before / onnxopt / each peer (every graph, If/Loop bodies
included), file size before and after onnxopt, exit code and first error line of the no-data run,
exit code and max abs error of the real-input run. Peer node counts and errors are cached in
CACHE/<name>/peers.json (tests/test_corpus.py reads them); --refresh-peers recomputes them.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from corpus import cache_dir  # noqa: E402

PEERS = ["onnxsim", "onnxslim", "onnxoptimizer"]

# Runs in a child: simplify with one peer tool, save, count nodes, compare on the first real feed.
_PEER_CHILD = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import numpy as np, onnx, onnxruntime as ort
tool, src, dst, inputs = sys.argv[1:5]
model = onnx.load(src)
if tool == "ort_floor":  # the runtime's own noise: the original under ORT 'all' against 'disable'
    sys.path.insert(0, sys.argv[5])
    from corpus_report import first_feed
    feed = first_feed(src, inputs)
    runs = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        opts = ort.SessionOptions(); opts.log_severity_level = 3; opts.graph_optimization_level = level
        runs.append(ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"]).run(None, feed))
    err = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) if np.size(x) else 0.0
              for x, y in zip(*runs) if np.asarray(x).dtype.kind in "fiu")
    print("RESULT " + json.dumps({"max_abs": err}))
    sys.exit(0)
if tool == "onnxsim":
    import onnxsim
    out, ok = onnxsim.simplify(model)
elif tool == "onnxslim":
    import onnxslim
    out = onnxslim.slim(model)
else:
    import onnxoptimizer
    out = onnxoptimizer.optimize(model)
onnx.save(out, dst)
sys.path.insert(0, sys.argv[5])
from corpus_report import count_nodes, first_feed
feed = first_feed(src, inputs)
opts = ort.SessionOptions(); opts.log_severity_level = 3
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
a = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"]).run(None, feed)
b = ort.InferenceSession(dst, opts, providers=["CPUExecutionProvider"]).run(None, feed)
err = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) if np.size(x) else 0.0
          for x, y in zip(a, b))
print("RESULT " + json.dumps({"nodes": count_nodes(dst), "size": __import__("os").path.getsize(dst), "max_abs": err}))
"""


def count_nodes(path: str | Path) -> int:
    """Nodes in every graph of the model: subgraphs of If/Loop/Scan and functions included."""
    import onnx
    m = onnx.load(str(path), load_external_data=False)

    def count(g: Any) -> int:
        return sum(1 + sum(count(a.g) + sum(count(s) for s in a.graphs) for a in n.attribute) for n in g.node)

    return count(m.graph) + sum(count(f) for f in m.functions)


def first_feed(model: str, inputs: str) -> dict:
    """The first feed onnxopt would cut from the inputs file."""
    import numpy as np
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tools"))
    from corpus import feeds_for
    with np.load(inputs) as z:
        arrays = {k: z[k] for k in z.files}
    return feeds_for(Path(model), arrays)[0]


def _first_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if ln.lower().startswith(("error", "onnxopt: error", "validation failed", "fail")) or "error" in ln.lower():
            return ln[:400]
    return (lines[-1] if lines else "")[:400]


def _short(error: str, width: int = 200) -> str:
    """An error for a table cell: ORT's '[ONNXRuntimeError] : 2 : INVALID_ARGUMENT :' prefix shortened."""
    error = re.sub(r"\[ONNXRuntimeError\] : \d+ : (\w+) :", r"ORT \1:", error)
    error = error.replace("onnxopt: error: ", "").replace("|", "/")
    return error[:width]


def _max_abs(report: Any) -> Optional[float]:
    """The largest max_abs anywhere in an onnxopt JSON report."""
    best = None
    if isinstance(report, dict):
        for k, v in report.items():
            if k == "max_abs" and isinstance(v, (int, float)):
                best = v if best is None else max(best, v)
            else:
                sub = _max_abs(v)
                if sub is not None:
                    best = sub if best is None else max(best, sub)
    elif isinstance(report, list):
        for v in report:
            sub = _max_abs(v)
            if sub is not None:
                best = sub if best is None else max(best, sub)
    return best


def _floor(report: Any) -> Optional[float]:
    """A measured runtime noise floor, if the report records one (any key containing 'floor')."""
    if isinstance(report, dict):
        for k, v in report.items():
            if "floor" in k and isinstance(v, (int, float)):
                return float(v)
            sub = _floor(v)
            if sub is not None:
                return sub
    elif isinstance(report, list):
        for v in report:
            sub = _floor(v)
            if sub is not None:
                return sub
    return None


def run_onnxopt(python: str, model: Path, out: Path, timeout: int, extra: list[str]) -> dict[str, Any]:
    cmd = [python, "-m", "onnxopt", "optimize", str(model), "-o", str(out)] + extra
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
        rc, text = proc.returncode, proc.stdout + "\n" + proc.stderr
    except subprocess.TimeoutExpired:
        rc, text = "timeout", f"timeout after {timeout} s"
    res: dict[str, Any] = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1)}
    if rc != 0:
        res["error"] = _first_error(text)
    if out.exists():
        res["nodes"] = count_nodes(out)
        res["size"] = out.stat().st_size
    return res


def run_peer(python: str, tool: str, model: Path, inputs: Path, tmp: Path, timeout: int) -> dict[str, Any]:
    dst = tmp / f"{tool}.onnx"
    cmd = [python, "-c", _PEER_CHILD, tool, str(model), str(dst), str(inputs), str(ROOT / "tools")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    for ln in proc.stdout.splitlines():
        if ln.startswith("RESULT "):
            return json.loads(ln[7:])
    return {"error": _first_error(proc.stderr or proc.stdout) or f"exit {proc.returncode}"}


def peers_for(python: str, entry: dict, cache: Path, tools: list[str], timeout: int, refresh: bool) -> dict:
    """Peer results (and the ORT noise floor, as 'ort_floor') for one model, cached in peers.json."""
    path = cache / entry["name"] / "peers.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    if old.get("sha256") != entry["sha256"]:
        old = {}
    todo = [t for t in tools + ["ort_floor"] if refresh or t not in old]
    if todo:
        with tempfile.TemporaryDirectory() as tmp:
            for tool in todo:
                old[tool] = run_peer(python, tool, cache / entry["name"] / "model.onnx",
                                     cache / entry["name"] / "inputs.npz", Path(tmp), timeout)
        old["sha256"] = entry["sha256"]
        path.write_text(json.dumps(old, indent=1) + "\n")
    return old


def _fmt_err(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2g}"


def table(rows: list[dict], tools: list[str]) -> str:
    head = ["model", "task", "nodes before", "onnxopt (real)"] + tools + [
        "size before", "size after", "no-data exit", "no-data first error", "real exit", "real max abs err",
        "floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        real, nodata = r["real"], r["nodata"]
        peer_cells = []
        for t in tools:
            p = r["peers"].get(t, {})
            peer_cells.append(str(p["nodes"]) if "nodes" in p else "fail: " + _short(p.get("error", "?"), 70))
        nodes_opt = real.get("nodes", nodata.get("nodes"))
        size_after = real.get("size", nodata.get("size"))
        best = min([p["nodes"] for t, p in r["peers"].items() if t in ("onnxsim", "onnxslim") and "nodes" in p]
                   or [None], key=lambda x: (x is None, x))
        mark = "" if nodes_opt is None or best is None or nodes_opt <= best else " ▲"
        growth = "-" if size_after is None else f"{size_after / 2**20:.2f} MiB ({(size_after / r['size'] - 1) * 100:+.1f}%)"
        cells = [r["name"], r["task"], str(r["nodes"]), ("-" if nodes_opt is None else str(nodes_opt)) + mark,
                 *peer_cells, f"{r['size'] / 2**20:.2f} MiB", growth, str(nodata["rc"]),
                 _short(nodata.get("error", "")), str(real["rc"]), _fmt_err(real.get("max_abs")),
                 _fmt_err(real.get("floor") if real.get("floor") is not None
                          else r["peers"].get("ort_floor", {}).get("max_abs"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    n = len(rows)
    nodata_ok = sum(r["nodata"]["rc"] == 0 for r in rows)
    real_ok = sum(r["real"]["rc"] == 0 for r in rows)
    grow = sum(1 for r in rows if "size" in r["real"] and r["real"]["size"] > r["size"] * 1.01)
    worse = 0
    for r in rows:
        best = [p["nodes"] for t, p in r["peers"].items() if t in ("onnxsim", "onnxslim") and "nodes" in p]
        if "nodes" in r["real"] and best and r["real"]["nodes"] > min(best):
            worse += 1
    return (f"{n} models. No data exits 0: {nodata_ok}/{n}. Real inputs pass validation: {real_ok}/{n}. "
            f"Grows > 1%: {grow}. More nodes than the best of onnxsim/onnxslim (▲): {worse}.")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache")
    ap.add_argument("--only", help="comma-separated name globs")
    ap.add_argument("--out", help="also write the markdown here")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per subprocess")
    ap.add_argument("--tools", default=",".join(PEERS))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--refresh-peers", action="store_true")
    ap.add_argument("--from-json", help="re-render the table of a previous --json file (no onnxopt runs)")
    args = ap.parse_args(argv)
    if args.from_json:  # peers (and floors) missing from the cache are computed now
        rows = json.loads(Path(args.from_json).read_text())
        entries = {e["name"]: e for e in json.loads((cache_dir(args.cache) / "manifest.json").read_text())}
        for row in rows:
            if row["name"] in entries:
                row["peers"] = peers_for(args.python, entries[row["name"]], cache_dir(args.cache),
                                         args.tools.split(","), args.timeout, False)
        md = _markdown(rows, args.tools.split(","), args.python)
        print(md)
        if args.out:
            Path(args.out).write_text(md)
        return 0
    cache = cache_dir(args.cache)
    manifest = cache / "manifest.json"
    if not manifest.exists():
        print(f"no corpus at {cache}: run tools/corpus.py first", file=sys.stderr)
        return 2
    tools = [t for t in args.tools.split(",") if t]
    globs = args.only.split(",") if args.only else ["*"]
    rows = []
    for entry in json.loads(manifest.read_text()):
        if not any(fnmatch.fnmatch(entry["name"], g) for g in globs):
            continue
        model = cache / entry["name"] / "model.onnx"
        inputs = cache / entry["name"] / "inputs.npz"
        with tempfile.TemporaryDirectory() as tmp:
            nodata = run_onnxopt(args.python, model, Path(tmp) / "nodata.onnx", args.timeout, [])
            report = Path(tmp) / "report.json"
            real = run_onnxopt(args.python, model, Path(tmp) / "real.onnx", args.timeout,
                               ["--inputs", str(inputs), "--latency-runs", "0", "--report", str(report)])
            if report.exists():
                data = json.loads(report.read_text())
                real["max_abs"], real["floor"] = _max_abs(data), _floor(data)
        peers = peers_for(args.python, entry, cache, tools, args.timeout, args.refresh_peers)
        row = {"name": entry["name"], "task": entry["task"], "nodes": count_nodes(model), "size": model.stat().st_size,
               "nodata": nodata, "real": real, "peers": peers}
        rows.append(row)
        if args.out:  # written after every model, so a long run shows its findings as it goes
            Path(args.out).write_text(_markdown(rows, tools, args.python))
        print(f"{entry['name']}: no-data {nodata['rc']} real {real['rc']} nodes {row['nodes']} -> "
              f"{real.get('nodes')} peers {[peers.get(t, {}).get('nodes') for t in tools]}", file=sys.stderr, flush=True)
    md = _markdown(rows, tools, args.python)
    print(md)
    if args.out:
        Path(args.out).write_text(md)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def _markdown(rows: list[dict], tools: list[str], python: str) -> str:
    return (f"## Corpus findings ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n{summary(rows)}\n\n"
          f"{table(rows, tools)}\n\nnodes: every graph incl. If/Loop bodies; onnxopt column = the real-input run "
          f"(no-data run when that wrote nothing); ▲ = more nodes than the best of onnxsim/onnxslim; "
          f"floor = the noise floor onnxopt reports, else the original's max abs difference between ORT "
          f"optimization levels all and disable on the first real feed. "
          f"Command: `PYTHONPATH=. {Path(python).name} tools/corpus_report.py`\n")


if __name__ == "__main__":
    sys.exit(main())
