"""Benchmark the `svd` pass: parameters, FLOPs, ORT latency and output error at several budgets,
plain SVD against activation-aware (whitened) SVD at equal parameter count.

Run (from the repo root; any venv with onnxopt importable, e.g. the bench venv):

    /work/venv-bench/bin/python tools/bench_svd.py [--models bert,gpt2,digits_mlp] [--out BENCHMARKS.md]
        [--json /tmp/bench_svd.json] [--no-synthetic]

Models: ~/.cache/onnxopt/models/{bert,gpt2}.onnx (random weights, see tools/README.md) and the
shipped models/digits_mlp.onnx (trained). Data:
  digits_mlp  calibration models/digits_calib.npz (360 images), test models/digits_test.npz
              (360 labelled images: accuracy/top-1).
  bert, gpt2  random token ids (uniform over the vocabulary, attention mask all ones),
              64 sequences of 32 for calibration (seed 1) and 32 others for test (seed 2).
              The weights are random too, so these figures show the mechanics (error per budget,
              plain against aware), not what a trained transformer would lose.

Each configuration is one `onnxopt.optimize(model, spec, calibration=..., inputs=test)` call;
the validation it runs (ORT, CPU, all graph optimizations) gives cosine, SNR and top-1 on the
first output, and latency (median of --runs runs on the first test batch: 32 images, or 16 x 32
tokens). Parameters are the whole model's (every initializer and Constant element). MatMul
MFLOPs = 2 * sum over MatMul/Gemm nodes of (output elements x reduction length), measured on
that batch's real shapes (attention MatMuls included). Budgets: `rank_ratio` (same rank in
every layer, so plain and aware have exactly the same parameter count) and `param_ratio`
(per-layer ranks by the greedy budget over calibration error curves; the ratio is of the
factorable layers' parameters). Those rows run with latency_gate=false so both arms keep the
same layers; one row per model shows the gate at its default.

The synthetic section reproduces the issue's experiment: a 1024x1024 MatMul whose input has 1% of
channels 30x larger (correlated Gaussian rows, 2048 for calibration, 512 held out); relative
output error ||Y - Y'||^2 / ||Y||^2 of plain and aware SVD at each rank, and the latency gate's
timings at batch 64.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import onnxopt  # noqa: E402
from onnxopt.calibrate import with_outputs  # noqa: E402

from benchmarks_md import write_section  # tools/ is on the path when a script runs

SECTION = "## Low-rank factorization (svd)"
MODEL_DIR = Path(os.path.expanduser("~/.cache/onnxopt/models"))


# ----------------------------------------------------------------- data

def token_feeds(model: onnx.ModelProto, sequences: int, seq: int, seed: int) -> dict:
    """Random token ids over the embedding's vocabulary; masks all ones."""
    inits = {t.name: t for t in model.graph.initializer}
    ids = [vi.name for vi in model.graph.input if "mask" not in vi.name]
    vocab = min((inits[n.input[0]].dims[0] for n in model.graph.node  # the embedding the ids index
                 if n.op_type == "Gather" and n.input[0] in inits and n.input[1] in ids), default=100)
    rng = np.random.default_rng(seed)
    feed = {}
    for vi in model.graph.input:
        if "mask" in vi.name:
            feed[vi.name] = np.ones((sequences, seq), np.int64)
        else:
            feed[vi.name] = rng.integers(0, vocab, size=(sequences, seq)).astype(np.int64)
    return feed


def data_for(name: str, model: onnx.ModelProto):
    if name == "digits_mlp":
        return str(REPO / "models/digits_calib.npz"), str(REPO / "models/digits_test.npz")
    return token_feeds(model, 64, 32, seed=1), [token_feeds(model, 16, 32, seed=2), token_feeds(model, 16, 32, seed=3)]


def first_feed(model: onnx.ModelProto, test) -> dict:
    if isinstance(test, list):
        return test[0]
    arrays = dict(np.load(test))
    return {model.graph.input[0].name: arrays[model.graph.input[0].name][:32]}


# ----------------------------------------------------------------- measures

def matmul_flops(model: onnx.ModelProto, feed: dict) -> int:
    """2 * Σ output elements × reduction length over MatMul/Gemm nodes, on this feed's shapes."""
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    wanted = sorted({t for n in nodes for t in (n.input[0], n.output[0]) if t not in inits and t not in feed})
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(with_outputs(model, wanted).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    shapes = dict(zip(wanted, (np.shape(v) for v in sess.run(wanted, feed))))
    shapes.update({k: np.shape(v) for k, v in feed.items()})
    shapes.update(inits)
    total = 0
    for n in nodes:
        a, out = shapes[n.input[0]], shapes[n.output[0]]
        trans_a = any(at.name == "transA" and at.i for at in n.attribute)
        k = a[0] if (n.op_type == "Gemm" and trans_a) else a[-1]
        total += 2 * int(np.prod(out)) * int(k)
    return total


def run_config(name: str, model: onnx.ModelProto, spec: str, calib, test, feed: dict, runs: int) -> dict:
    start = time.perf_counter()
    result = onnxopt.optimize(model, spec, calibration=calib, inputs=test, tolerance="min_cosine=0",
                              latency_runs=runs)
    seconds = time.perf_counter() - start
    out = result.validation.outputs[0]
    stats = result.records[0].stats if result.records and result.records[0].name == "svd" else {}
    d = result.to_dict()
    row = {
        "spec": spec, "seconds": round(seconds, 2),
        "params": d["after"]["parameters"], "params_before": d["before"]["parameters"],
        "mflops": matmul_flops(result.model, feed) / 1e6,
        "ms": result.validation.latency_candidate_ms, "ms_before": result.validation.latency_reference_ms,
        "cosine": out.cosine, "snr_db": out.snr_db, "top1": out.top1_agreement,
        "acc_before": out.accuracy_reference, "acc": out.accuracy_candidate,
        "factorized": stats.get("layers_factorized", 0), "slower": stats.get("skipped_slower", 0),
        "ranks": [l.get("rank") if l.get("status") == "factorized" else None for l in stats.get("layers", [])],
        "layers": stats.get("layers", []),
        "param_ratio_achieved": stats.get("param_ratio_achieved"),
    }
    return row


CONFIGS = [
    ("rank_ratio", "0.5"), ("rank_ratio", "0.25"), ("rank_ratio", "0.125"),
    ("param_ratio", "0.6"), ("param_ratio", "0.4"),
]


def bench_model(name: str, path: Path, runs: int, log) -> dict:
    model = onnxopt.load(str(path))
    calib, test = data_for(name, model)
    feed = first_feed(model, test)
    base = onnxopt.optimize(model, "dce", calibration=calib, inputs=test, tolerance="min_cosine=0", latency_runs=runs)
    rows = [{"spec": "(dense)", "params": base.to_dict()["before"]["parameters"],
             "mflops": matmul_flops(model, feed) / 1e6, "ms": base.validation.latency_reference_ms,
             "cosine": 1.0, "snr_db": float("inf"), "top1": 1.0 if base.validation.outputs[0].top1_agreement is not None else None,
             "acc": base.validation.outputs[0].accuracy_reference, "factorized": 0, "slower": 0}]
    for key, value in CONFIGS:
        for aware in ("false", "true"):
            spec = f"svd({key}={value},aware={aware},latency_gate=false)"
            rows.append(run_config(name, model, spec, calib, test, feed, runs))
            log(f"{name}: {spec}: cosine {rows[-1]['cosine']:.4f}  params {rows[-1]['params']}")
    spec = "svd(tolerance=0.05,aware=true)"
    rows.append(run_config(name, model, spec, calib, test, feed, runs))
    log(f"{name}: {spec}: cosine {rows[-1]['cosine']:.4f}  factorized {rows[-1]['factorized']}")
    return {"model": name, "path": str(path), "rows": rows}


def synthetic(log) -> dict:
    from onnx import helper, numpy_helper
    k = n = 1024
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], "synthetic",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(w, "W")]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    outliers = rng.choice(k, k // 100, replace=False)

    def rows(m: int) -> np.ndarray:
        x = rng.standard_normal((m, k)) @ mix
        x[:, outliers] *= 30.0
        return x.astype(np.float32)

    calib, test = rows(2048), rows(512)
    ref = test.astype(np.float64) @ w.astype(np.float64)
    out = {"k": k, "n": n, "outliers": len(outliers), "ranks": []}
    for rank in (64, 128, 256, 384):
        errs = {}
        for aware in ("false", "true"):
            res = onnxopt.optimize(model, f"svd(rank={rank},aware={aware},latency_gate=false,samples=2048)",
                                   calibration={"x": calib}, inputs={"x": test[:64]}, tolerance="min_cosine=0")
            sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
            got = sess.run(None, {"x": test})[0].astype(np.float64)
            errs[aware] = float(np.sum((ref - got) ** 2) / np.sum(ref ** 2))
        out["ranks"].append({"rank": rank, "plain": errs["false"], "aware": errs["true"],
                             "ratio": errs["true"] / errs["false"]})
        log(f"synthetic rank {rank}: plain {errs['false']:.4g} aware {errs['true']:.4g}")
    out["gate"] = []
    for rank in (128, 256, 384):
        res = onnxopt.optimize(model, f"svd(rank={rank})", dims={"batch": 64}, validate=False)
        (layer,) = res.records[0].stats["layers"]
        out["gate"].append({"rank": rank, "ms_original": layer["ms_original"], "ms_factorized": layer["ms_factorized"],
                            "status": layer["status"], "rows": layer["timing_rows"]})
        log(f"gate rank {rank}: {layer}")
    return out


# ----------------------------------------------------------------- report

def _f(x, fmt="{:.4f}"):
    if x is None:
        return "-"
    if isinstance(x, float) and np.isinf(x):
        return "inf"
    return fmt.format(x)


def model_table(result: dict) -> list[str]:
    rows = result["rows"]
    dense = rows[0]
    digits = result["model"] == "digits_mlp"
    head = "| config | params | vs dense | MatMul MFLOPs | latency ms | speed-up | cosine | SNR dB | " + \
        ("accuracy |" if digits else "top-1 agree |") + " layers factorized |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        speed = dense["ms"] / r["ms"] if r.get("ms") else None
        quality = _f(r.get("acc"), "{:.2%}") if digits else _f(r.get("top1"), "{:.2%}")
        layers = str(r["factorized"]) + (f" ({r['slower']} slower, kept dense)" if r.get("slower") else "")
        lines.append(f"| `{r['spec']}` | {r['params']:,} | {r['params'] / dense['params']:.2f}x | {r['mflops']:.1f} | "
                     f"{_f(r.get('ms'), '{:.3f}')} | {_f(speed, '{:.2f}x')} | {_f(r['cosine'])} | "
                     f"{_f(r['snr_db'], '{:.1f}')} | {quality} | {layers} |")
    return lines


def pairs(result: dict) -> list[str]:
    """Plain vs aware at equal parameter count: SNR gain."""
    rows = {r["spec"]: r for r in result["rows"]}
    out = []
    for key, value in CONFIGS:
        p = rows.get(f"svd({key}={value},aware=false,latency_gate=false)")
        a = rows.get(f"svd({key}={value},aware=true,latency_gate=false)")
        if p and a:
            out.append(f"{key}={value}: SNR {p['snr_db']:.1f} -> {a['snr_db']:.1f} dB "
                       f"({a['snr_db'] - p['snr_db']:+.1f} dB; params {p['params']:,} vs {a['params']:,})")
    return out


def render(results: list[dict], synth: dict | None, meta: dict) -> str:
    lines = [SECTION, "",
             "The `svd` pass (low-rank factorization of MatMul/Gemm weights) at several budgets, plain SVD "
             "against activation-aware (whitened, SVD-LLM style) SVD at equal parameter count, generated by "
             "`tools/bench_svd.py` (method in its docstring).", "",
             f"- Date: {meta['date']}",
             f"- Machine: {meta['machine']}",
             f"- Versions: {meta['versions']}",
             f"- Command: `{meta['command']}`",
             f"- Total benchmark time: {meta['seconds']:.0f} s; 1-minute load average {_f(meta['load'][0], '{:.1f}')} at "
             f"the start, {_f(meta['load'][1], '{:.1f}')} at the end (other work shared the machine: latencies "
             "are indicative, the error figures are not affected)", "",
             "Rows: `(dense)` is the original. `rank_ratio` keeps the same fraction of min(K, N) in every layer "
             "(plain and aware then have exactly the same parameters); `param_ratio` lets the greedy budget choose "
             "per-layer ranks from calibration error curves (the ratio is of the factorable layers' parameters). "
             "Those run with `latency_gate=false`; the last row of each model has the gate on (its default). "
             "Parameters are the whole model's. Cosine/SNR on the first output against the dense model in ORT; "
             "latency is ORT (CPU, all optimizations) median on one test batch. bert and gpt2 have random "
             "weights and random tokens: their flat singular spectra make any truncation costly, so read them for "
             "plain vs aware and the budget's behaviour, not for what a trained model would lose.", ""]
    for res in results:
        lines += [f"### {res['model']}", ""]
        lines += model_table(res)
        lines += ["", "Plain vs aware at equal parameters: " + "; ".join(pairs(res)) + ".", ""]
        budget = next((r for r in res["rows"] if r["spec"] == "svd(param_ratio=0.4,aware=true,latency_gate=false)"), None)
        if budget:
            ranks = [f"{l['node']}={l['rank'] if l['status'] == 'factorized' else 'dense'}" for l in budget["layers"]]
            lines += ["Ranks chosen by `param_ratio=0.4,aware=true`: " + ", ".join(ranks) + ".", ""]
    if synth:
        lines += ["### Synthetic layer with 1% outlier input channels", "",
                  f"A {synth['k']}x{synth['n']} MatMul, {synth['outliers']} input channels 30x larger; relative "
                  "output error on 512 held-out rows.", "",
                  "| rank | plain | aware | aware / plain |", "|---:|---:|---:|---:|"]
        for r in synth["ranks"]:
            lines.append(f"| {r['rank']} | {r['plain']:.4g} | {r['aware']:.4g} | {r['ratio']:.3f} |")
        lines += ["", "Latency gate on this layer at batch 64 (ORT, the gate's own isolated timing; margin 5%):", "",
                  "| rank | original ms | factorized ms | speed-up | gate |", "|---:|---:|---:|---:|---|"]
        for g in synth["gate"]:
            lines.append(f"| {g['rank']} | {g['ms_original']:.3f} | {g['ms_factorized']:.3f} | "
                         f"{g['ms_original'] / g['ms_factorized']:.2f}x | {g['status']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits_mlp,bert,gpt2")
    ap.add_argument("--model-dir", default=str(MODEL_DIR))
    ap.add_argument("--runs", type=int, default=30, help="latency runs per model")
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--out", default=None, help="BENCHMARKS.md to update (its svd section only)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    results = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        path = REPO / "models/digits_mlp.onnx" if name == "digits_mlp" else Path(args.model_dir) / f"{name}.onnx"
        if not path.exists():
            log(f"{name}: {path} not found, skipped")
            continue
        results.append(bench_model(name, path, args.runs, log))
    synth = None if args.no_synthetic else synthetic(log)
    import importlib.metadata as md
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "versions": ", ".join(f"{p} {md.version(p)}" for p in ("onnx", "onnxruntime", "onnx-graphsurgeon", "numpy")),
            "command": " ".join([Path(sys.executable).as_posix(), "tools/bench_svd.py", *(argv or sys.argv[1:])]),
            "seconds": time.perf_counter() - start,
            "load": (load_start, os.getloadavg()[0] if hasattr(os, "getloadavg") else None)}
    text = render(results, synth, meta)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "synthetic": synth, "meta": meta}, indent=1,
                                              default=str))
    if args.out:
        write_section(Path(args.out), SECTION, text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
