"""Benchmark onnxopt's `qdq` pass against onnxruntime.quantization.quantize_static and onnxsim's
quantize_static, in one run, on the same models, calibration data and method.

Setup: the anchors live in /work/venv-bench (see tools/bench_cleanup.py: onnxsim 0.8.1,
onnxruntime, onnxopt installed editable). Benchmark models: tools/export_models.py
(~/.cache/onnxopt/models).

Run (from the repo root):

    /work/venv-bench/bin/python tools/bench_qdq.py [--models digits_cnn,digits_mlp,resnet18,mobilenetv2,bert]
        [--methods minmax,entropy,percentile] [--tools onnxopt,ort,onnxsim] [--samples 64]
        [--out BENCHMARKS.md] [--json results.json]

Method.
- Input models: the shipped digits models after onnxopt's `cleanup` (BatchNormalization
  folded; same float outputs), and the exported <name>.onnx (constant folding on, so Conv+BN
  are fused already). Every tool gets the same float model file.
- Calibration data: digits: the first --samples rows of models/digits_calib.npz (360 max);
  exported models: --samples seeded synthetic samples (images N(0,1); token ids uniform in
  [2, 970), attention mask 1), the same arrays for every tool, cut into batches of 8.
- Evaluation data: digits: models/digits_test.npz (360 labelled samples, top-1 accuracy);
  exported models: 16 other seeded samples; cosine and SNR (10 log10 sum(ref^2)/sum(err^2))
  of the first output against the float model. Both float and quantized models run in ONNX
  Runtime on CPU with graph optimizations ON (ORT_ENABLE_ALL), where Q/DQ pairs become
  integer kernels: the way they are deployed.
- Each (model, method, tool) quantization runs in a fresh subprocess; "calib s" is the
  quantize call alone (calibration and rewriting), "peak RSS" the child's VmHWM at exit
  (includes the interpreter, imports and the model; the row "(load only)" is that floor).
- Latency: batch-1 input, one intra-op thread, ORT_ENABLE_ALL, median of 30 runs after 5
  warm-up runs; size is the saved file.
- The tools: onnxopt `onnxopt.optimize(model, "qdq(method=M,samples=N,percentile=99.99)",
  calibration=npz, validate=False)`; ort `quantize_static(..., quant_format=QDQ,
  per_channel=True, activation_type=QUInt8, weight_type=QInt8, calibrate_method=M,
  extra_options={CalibPercentile: 99.99})` (no mse method); onnxsim
  `onnxsim.quantize_static(model, calibration_data=batches, method=M, per_channel=True,
  percentile=99.99)`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks_md import write_section  # tools/ is on the path when a script runs
from onnxopt.validate import latency_ms

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = Path(os.path.expanduser("~/.cache/onnxopt/models"))
SECTION = "## Quantization (qdq)"
TOOLS = ("onnxopt", "ort", "onnxsim")
BATCH = 8


# =========================================================================== child

def _vmhwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _batches(npz: str) -> list[dict]:
    with np.load(npz) as d:
        arrays = {k: d[k] for k in d.files}
    n = len(next(iter(arrays.values())))
    return [{k: v[i:i + BATCH] for k, v in arrays.items()} for i in range(0, n, BATCH)]


def child_main(argv: list[str]) -> int:
    tool, method, model_path, calib, out_path, samples = argv
    import onnx

    result = {"tool": tool, "method": method}
    try:
        if tool == "none":
            model = onnx.load(model_path)
            start = time.perf_counter()
            onnx.save(model, out_path)
        elif tool == "onnxopt":
            import onnxopt

            model = onnx.load(model_path)
            start = time.perf_counter()
            res = onnxopt.optimize(model, f"qdq(method={method},samples={samples},percentile=99.99)",
                                   calibration=calib, validate=False)
            result["stats"] = next(r.stats for r in res.records if r.name == "qdq")
            onnx.save(res.model, out_path)
        elif tool == "ort":
            from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                                  QuantType, quantize_static)

            methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}
            if method not in methods:
                raise ValueError(f"no {method} method in onnxruntime.quantization")
            feeds = _batches(calib)

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.it = iter(feeds)

                def get_next(self):
                    return next(self.it, None)

            start = time.perf_counter()
            quantize_static(model_path, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=methods[method], extra_options={"CalibPercentile": 99.99})
        elif tool == "onnxsim":
            import onnxsim

            feeds = _batches(calib)
            model = onnx.load(model_path)
            start = time.perf_counter()
            q = onnxsim.quantize_static(model, calibration_data=feeds, method=method, per_channel=True,
                                        percentile=99.99)
            onnx.save(q, out_path)
        else:
            raise ValueError(f"unknown tool {tool}")
        result["calib_s"] = time.perf_counter() - start
    except Exception as exc:  # a failing tool is recorded, the benchmark goes on
        result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    result["rss_mib"] = _vmhwm_mib()
    print("RESULT " + json.dumps(result, default=float))
    return 0


# =========================================================================== parent

def _session(path_or_bytes, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path_or_bytes), so, providers=["CPUExecutionProvider"])


def prepare(name: str, work: Path, samples: int) -> dict:
    """Float model path, calibration npz, evaluation feeds (+labels), latency feed."""
    import onnx

    import onnxopt

    if name.startswith("digits"):
        res = onnxopt.optimize(str(ROOT / "models" / f"{name}.onnx"), "cleanup", validate=False)
        path = work / f"{name}.float.onnx"
        onnx.save(res.model, path)
        with np.load(ROOT / "models" / "digits_calib.npz") as d:
            calib = {"input": d["input"][:samples]}
        with np.load(ROOT / "models" / "digits_test.npz") as d:
            evals = [{"input": d["input"][i:i + 60]} for i in range(0, 360, 60)]
            labels = d["labels"]
        lat = {"input": calib["input"][:1]}
    else:
        path = MODEL_DIR / f"{name}.onnx"
        with np.load(MODEL_DIR / f"{name}.inputs.npz") as d:
            example = {k: d[k] for k in d.files}

        def synth(n: int, seed: int) -> dict:
            rng = np.random.default_rng(seed)
            out = {}
            for k, v in example.items():
                shape = (n,) + v.shape[1:]
                if v.dtype.kind == "f":
                    out[k] = rng.standard_normal(shape).astype(v.dtype)
                elif k == "attention_mask":
                    out[k] = np.ones(shape, v.dtype)
                else:
                    out[k] = rng.integers(2, 970, size=shape).astype(v.dtype)
            return out

        calib = synth(samples, 1)
        ev = synth(16, 2)
        evals = [{k: v[i:i + 4] for k, v in ev.items()} for i in range(0, 16, 4)]
        labels = None
        lat = example
    calib_path = work / f"{name}.calib.npz"
    np.savez(calib_path, **calib)
    return {"path": Path(path), "calib": calib_path, "evals": evals, "labels": labels, "lat": lat}


def outputs(path, evals) -> list[np.ndarray]:
    sess = _session(path)
    first = sess.get_outputs()[0].name
    return [sess.run([first], f)[0] for f in evals]


def int8_share(path) -> float:
    """Share of the weight elements (initializers of rank >= 2) stored as 8-bit integers."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path))
    total = q = 0
    for t in model.graph.initializer:
        if len(t.dims) < 2:
            continue
        n = int(np.prod(t.dims))
        total += n
        if t.data_type in (TensorProto.INT8, TensorProto.UINT8):
            q += n
    return q / total if total else 0.0


def latency(path, feed, runs: int = 30) -> float:
    return latency_ms(_session(path, threads=1), feed, runs, warmup=5)


def metrics(ref: list[np.ndarray], got: list[np.ndarray], labels) -> dict:
    r = np.concatenate([a.reshape(len(a), -1) for a in ref]).astype(np.float64)
    g = np.concatenate([a.reshape(len(a), -1) for a in got]).astype(np.float64)
    err = r - g
    out = {"snr_db": float(10 * np.log10((r ** 2).sum() / max((err ** 2).sum(), 1e-30))),
           "cosine": float((r * g).sum() / max(np.linalg.norm(r) * np.linalg.norm(g), 1e-30))}
    if labels is not None:
        out["acc_float"] = float((r.argmax(1) == labels).mean() * 100)
        out["acc"] = float((g.argmax(1) == labels).mean() * 100)
    return out


def run_child(python: str, tool: str, method: str, model: Path, calib: Path, out: Path, samples: int,
              timeout: float) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--child", tool, method, str(model), str(calib), str(out), str(samples)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"tool": tool, "method": method, "error": f"timed out after {timeout:.0f} s"}
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"tool": tool, "method": method, "error": f"child failed: {tail[:200]}"}
    res = json.loads(line[7:])
    res["child_s"] = time.perf_counter() - start
    return res


def fmt(v, spec=".1f", none="-"):
    return none if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def render(results: list[dict], meta: dict) -> str:
    out = [SECTION, "",
           "onnxopt's `qdq` pass beside `onnxruntime.quantization.quantize_static` (QDQ, per-channel, "
           "uint8 activations, int8 weights) and onnxsim 0.8's `quantize_static`, same float model, same "
           "calibration batches and method, in one run of `tools/bench_qdq.py` (method in its docstring). "
           "Accuracy is measured in ONNX Runtime with graph optimizations ON, where Q/DQ pairs become "
           "integer kernels.", "",
           f"- Date: {meta['date']}", f"- Machine: {meta['machine']}", f"- Command: `{meta['command']}`",
           f"- Versions: {meta['versions']}", f"- Calibration samples: {meta['samples']} "
           "(digits: rows of digits_calib.npz; others: seeded synthetic), batches of 8",
           f"- Total benchmark time: {meta['total_s']:.0f} s",
           "- Latency and calib s are wall-clock figures on a shared 2-core machine (other benchmarks may run at "
           "the same time): models with the same graph (same tool, different method) show the noise; SNR, "
           "cosine, top-1, size and RSS are not affected.", ""]
    if meta.get("notes"):
        out += ["Found in this run (generated):", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    out += ["Columns: *top-1* on digits_test.npz (float model's in brackets); *SNR*/*cosine* of the first "
            "output against the float model; *int8 weights* the share of weight elements (initializers of rank "
            ">= 2) stored as 8-bit integers; *calib s* the quantize call alone; *peak RSS* the child process's "
            "VmHWM; *latency* batch 1, one thread, float model's in brackets; *speed-up* float / quantized.", "",
            "| model | method | tool | top-1 % (float) | SNR dB | cosine | int8 weights | calib s | peak RSS MiB | "
            "size KiB | latency ms (float) | speed-up |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r.get("error"):
            out.append(f"| {r['model']} | {r['method']} | {r['tool']} | error: {r['error']} | | | | | | | | |")
            continue
        acc = f"{fmt(r.get('acc'), '.2f')} ({fmt(r.get('acc_float'), '.2f')})" if "acc" in r else "-"
        speed = r["lat_float"] / r["lat"] if r.get("lat") else None
        out.append(f"| {r['model']} | {r['method']} | {r['tool']} | {acc} | {fmt(r.get('snr_db'))} | "
                   f"{fmt(r.get('cosine'), '.5f')} | {fmt(r.get('int8_share', 0) * 100, '.0f')}% | {fmt(r.get('calib_s'), '.2f')} | {fmt(r.get('rss_mib'), '.0f')} | "
                   f"{fmt(r.get('size', 0) / 1024, '.0f')} | {fmt(r.get('lat'), '.2f')} ({fmt(r.get('lat_float'), '.2f')}) | "
                   f"{fmt(speed, '.2f')}x |")
    if meta.get("flat"):
        out += ["", "Peak RSS against the number of calibration samples (entropy; ORT only where it fits):", "",
                "| model | tool | samples | calib s | peak RSS MiB |", "|---|---|---:|---:|---:|"]
        for r in meta["flat"]:
            out.append(f"| {r['model']} | {r['tool']} | {r['samples']} | "
                       f"{fmt(r.get('calib_s'), '.2f') if not r.get('error') else r['error']} | {fmt(r.get('rss_mib'), '.0f')} |")
    return "\n".join(out) + "\n"


def findings(results: list[dict]) -> list[str]:
    notes = []
    by = {}
    for r in results:
        if not r.get("error") and r["tool"] != "none":
            by.setdefault((r["model"], r["method"]), {})[r["tool"]] = r
    for (model, method), tools in sorted(by.items()):
        ours = tools.get("onnxopt")
        if not ours:
            continue
        anchors = [t for k, t in tools.items() if k != "onnxopt" and t.get("snr_db") is not None]
        for t in anchors:
            if t.get("int8_share", 0) < 0.9 * ours.get("int8_share", 0):
                notes.append(f"{model} {method}: {t['tool']} stores only {t['int8_share']:.0%} of the weights as "
                             f"int8 (onnxopt {ours['int8_share']:.0%}); its SNR is not comparable")
        anchors = [t for t in anchors if t.get("int8_share", 0) >= 0.9 * ours.get("int8_share", 0)]
        if anchors:
            best = max(anchors, key=lambda t: t["snr_db"])
            verdict = "at least" if ours["snr_db"] >= best["snr_db"] - 0.05 else "BELOW"
            notes.append(f"{model} {method}: onnxopt SNR {ours['snr_db']:.1f} dB, {verdict} the best anchor "
                         f"({best['tool']} {best['snr_db']:.1f} dB)")
        ort_r = tools.get("ort")
        if ort_r and ort_r.get("rss_mib") and method != "minmax":
            notes.append(f"{model} {method}: peak RSS onnxopt {ours['rss_mib']:.0f} MiB vs ort {ort_r['rss_mib']:.0f} MiB "
                         f"({ours['rss_mib'] / ort_r['rss_mib']:.2f}x)")
        if "acc" in ours:
            notes.append(f"{model} {method}: top-1 drop {ours['acc_float'] - ours['acc']:.2f} points")
    for (model, method), tools in sorted(by.items()):
        ort_r, ort_mm = tools.get("ort"), by.get((model, "minmax"), {}).get("ort")
        if method == "entropy" and ort_r and ort_mm and abs(ort_r["snr_db"] - ort_mm["snr_db"]) < 1e-6:
            notes.append(f"{model}: ort's entropy result is its minmax result (same SNR {ort_r['snr_db']:.2f} dB)")
    return notes


def flat_notes(flat: list[dict], work_sizes: dict) -> list[str]:
    ours = [r for r in flat if r["tool"] == "onnxopt" and r.get("rss_mib")]
    if len(ours) < 2:
        return []
    a, b = ours[0], ours[-1]
    extra = (work_sizes.get(b["samples"], 0) - work_sizes.get(a["samples"], 0)) / 2**20
    return [f"{a['model']} entropy: onnxopt peak RSS {a['rss_mib']:.0f} MiB at {a['samples']} samples, "
            f"{b['rss_mib']:.0f} MiB at {b['samples']} ({b['rss_mib'] / a['rss_mib'] - 1:+.0%}); the calibration "
            f".npz grows by {extra:.0f} MiB between the two and is read whole (one file); without it "
            f"{(b['rss_mib'] - extra) / a['rss_mib'] - 1:+.0%}"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="digits_cnn,digits_mlp,resnet18,mobilenetv2,bert")
    ap.add_argument("--methods", default="minmax,entropy,percentile")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--samples", type=int, default=64, help="calibration samples (digits: at most 360)")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--rss-flat", default="mobilenetv2:50:400",
                    help="MODEL:N1:N2: onnxopt entropy calibration at N1 and N2 samples, to show peak RSS flat in "
                         "the sample count ('' to skip)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import onnx
    import onnxruntime

    import onnxopt

    t0 = time.perf_counter()
    results = []
    work = Path(tempfile.mkdtemp(prefix="bench_qdq_"))
    for name in args.models.split(","):
        prep = prepare(name, work, args.samples)
        ref = outputs(prep["path"], prep["evals"])
        lat_float = latency(prep["path"], prep["lat"])
        size_float = prep["path"].stat().st_size
        floor = run_child(args.python, "none", "-", prep["path"], prep["calib"], work / "none.onnx", args.samples,
                          args.timeout)
        results.append({"model": name, "method": "-", "tool": "(load only)", "rss_mib": floor.get("rss_mib"),
                        "size": size_float, "lat": lat_float, "lat_float": lat_float,
                        **metrics(ref, ref, prep["labels"])})
        for method in args.methods.split(","):
            for tool in args.tools.split(","):
                out = work / f"{name}.{method}.{tool}.onnx"
                res = run_child(args.python, tool, method, prep["path"], prep["calib"], out, args.samples, args.timeout)
                res.update(model=name, method=method, tool=tool)
                if not res.get("error"):
                    try:
                        res.update(metrics(ref, outputs(out, prep["evals"]), prep["labels"]))
                        res["size"] = out.stat().st_size
                        res["int8_share"] = int8_share(out)
                        res["lat"] = latency(out, prep["lat"])
                        res["lat_float"] = lat_float
                    except Exception as exc:
                        res["error"] = f"ORT cannot run the result: {str(exc).strip().splitlines()[0][:150]}"
                print(json.dumps({k: v for k, v in res.items() if k != "stats"}, default=float), flush=True)
                results.append(res)
    flat, flat_sizes = [], {}
    if args.rss_flat:
        name, *counts = args.rss_flat.split(":")
        for n in map(int, counts):
            prep = prepare(name, work, n)
            flat_sizes[n] = prep["calib"].stat().st_size
            for tool in ("onnxopt",) + (("ort",) if n <= 64 else ()):
                res = run_child(args.python, tool, "entropy", prep["path"], prep["calib"], work / "flat.onnx", n,
                                args.timeout)
                res.update(model=name, samples=n)
                print(json.dumps({k: v for k, v in res.items() if k != "stats"}, default=float), flush=True)
                flat.append(res)
    import onnxsim

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{_cpu()}, {os.cpu_count()} cores, {_mem_gib()} GiB RAM, Linux {platform.release()}, "
                   f"Python {platform.python_version()}",
        "command": "/work/venv-bench/bin/python tools/bench_qdq.py " + " ".join(argv),
        "versions": f"onnxopt {getattr(onnxopt, '__version__', '?')}, onnxruntime {onnxruntime.__version__}, "
                    f"onnxsim {getattr(onnxsim, '__version__', '?')}, onnx {onnx.__version__}, numpy {np.__version__}",
        "samples": args.samples, "total_s": time.perf_counter() - t0, "notes": findings(results) + flat_notes(flat, flat_sizes), "flat": flat,
    }
    text = render(results, meta)
    print(text)
    if args.out:
        write_section(args.out, SECTION, text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _mem_gib() -> int:
    try:
        kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        return round(kb / 1024 / 1024)
    except Exception:
        return 0


if __name__ == "__main__":
    sys.exit(main())
