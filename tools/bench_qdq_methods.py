"""Benchmark onnxopt's `qdq` pass against onnxruntime.quantization.quantize_static and onnxsim's
quantize_static, in one run, on the same models, calibration data and method.

Setup: the anchors live in /work/venv-bench (see tools/bench_cleanup.py: onnxsim 0.8.1,
onnxruntime, onnxopt installed editable). Benchmark models: tools/export_models.py
(~/.cache/onnxopt/models).

Run (from the repo root):

    /work/venv-bench/bin/python tools/bench_qdq_methods.py [--models digits_cnn,digits_mlp,resnet18,mobilenetv2,bert]
        [--methods minmax,entropy,percentile] [--tools onnxopt,ort,onnxsim] [--samples 64]
        [--rss digits_cnn,mobilenetv2,resnet18] [--rss-methods entropy,percentile] [--rss-samples 50,800]
        [--rss-ort-samples 800|all] [--ort-cap-gib 8] [--out BENCHMARKS.md] [--json results.json]

Method.
- Input models: the shipped digits models after onnxopt's `cleanup` (BatchNormalization
  folded; same float outputs), and the exported <name>.onnx (constant folding on, so Conv+BN
  are fused already). Every tool gets the same float model file.
- Calibration data: digits: the first --samples rows of models/digits_calib.npz (360 max);
  exported models: --samples seeded synthetic samples (images N(0,1); token ids uniform in
  [2, 970), attention mask 1), the same arrays for every tool, cut into batches of 8 (of the largest divisor
  of the sample count up to 8 otherwise: ORT's histogram calibrators need equal batches).
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
- Peak RSS against the sample count (--rss models, --rss-methods, --rss-samples): for each
  count, the calibration data is ONE .npz (np.savez, uncompressed) in a temp folder, so the
  rows show how the data is read as well as how it is reduced. Digits: rows of
  digits_calib.npz, repeated past its 360 rows with a seeded jitter (N(0, 0.02) added, clipped
  to [0, 1]); exported models: seeded synthetic. onnxopt reads the file itself
  (`calibration=path`); ORT's data reader streams the same file batch by batch (up to 8 samples) with
  onnxopt.data's lazy reader, so neither tool holds the file. ORT keeps every activation
  of every sample for its histogram methods: its child is watched (VmRSS every 0.1 s) and
  killed above --ort-cap-gib; such a row shows the VmHWM when it was stopped, a lower bound
  ("> X (stopped)"), and the ratio against it an upper bound ("< r"). ORT runs in these rows at
  --rss-ort-samples only (default the largest count; its RSS at --samples is in the main table).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
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


def batch_size(n: int) -> int:
    """The largest divisor of ``n`` up to BATCH: ORT's histogram calibrators stack the batches, so they
    must all have the same size (a short last batch fails there)."""
    return next(b for b in range(min(BATCH, n), 0, -1) if n % b == 0)


def _batches(npz: str):
    """Batches of batch_size(n) samples read from the .npz one at a time (the file is never held whole)."""
    from onnxopt.data import iter_arrays

    for group in iter_arrays(npz, lazy=True):
        try:
            n = len(next(iter(group.values())))
            step = batch_size(n)
            for i in range(0, n, step):
                yield {k: v[i:i + step] for k, v in group.items()}
        finally:
            for v in group.values():
                v.close()


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
            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.it = _batches(calib)

                def get_next(self):
                    return next(self.it, None)

            start = time.perf_counter()
            quantize_static(model_path, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=methods[method], extra_options={"CalibPercentile": 99.99})
        elif tool == "onnxsim":
            import onnxsim

            feeds = list(_batches(calib))
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
            calib = {"input": digits_rows(d["input"], samples)}
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
    calib_path = work / f"{name}.calib{samples}.npz"
    if not calib_path.exists():
        np.savez(calib_path, **calib)
    return {"path": Path(path), "calib": calib_path, "evals": evals, "labels": labels, "lat": lat}


def digits_rows(rows: np.ndarray, samples: int) -> np.ndarray:
    """The first ``samples`` rows; past the end, the rows again with a seeded jitter (N(0, 0.02), clipped to [0, 1])."""
    if samples <= len(rows):
        return rows[:samples]
    out = rows[np.arange(samples) % len(rows)].copy()
    rng = np.random.default_rng(7)
    extra = out[len(rows):]
    out[len(rows):] = np.clip(extra + rng.normal(0, 0.02, extra.shape).astype(rows.dtype), 0, 1)
    return out


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
              timeout: float, cap_mib: float | None = None) -> dict:
    """One quantization in a fresh process; with ``cap_mib``, killed once its VmRSS passes the cap."""
    cmd = [python, str(Path(__file__).resolve()), "--child", tool, method, str(model), str(calib), str(out), str(samples)]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, text=True, cwd=str(ROOT))
        stopped = None
        while proc.poll() is None:
            if time.perf_counter() - start > timeout:
                proc.kill()
                proc.wait()
                return {"tool": tool, "method": method, "error": f"timed out after {timeout:.0f} s"}
            if cap_mib is not None:
                rss, hwm = _proc_mib(proc.pid)
                if rss is not None and rss > cap_mib:
                    proc.kill()
                    proc.wait()
                    stopped = {"tool": tool, "method": method, "stopped": True, "rss_mib": max(hwm or 0, rss),
                               "child_s": time.perf_counter() - start,
                               "error": f"stopped above {cap_mib / 1024:.0f} GiB"}
                    break
            time.sleep(0.1 if cap_mib is not None else 0.05)
        if stopped:
            return stopped
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read(), se.read()
    line = next((l for l in stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        return {"tool": tool, "method": method, "error": f"child failed: {tail[:200]}"}
    res = json.loads(line[7:])
    res["child_s"] = time.perf_counter() - start
    return res


def _proc_mib(pid: int) -> tuple[float | None, float | None]:
    """VmRSS and VmHWM of a running process, MiB."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None, None
    found = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            found[line.split(":")[0]] = int(line.split()[1]) / 1024
    return found.get("VmRSS"), found.get("VmHWM")


def fmt(v, spec=".1f", none="-"):
    return none if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def render(results: list[dict], meta: dict) -> str:
    out = [SECTION, "",
           "onnxopt's `qdq` pass beside `onnxruntime.quantization.quantize_static` (QDQ, per-channel, "
           "uint8 activations, int8 weights) and onnxsim 0.8's `quantize_static`, same float model, same "
           "calibration batches and method, in one run of `tools/bench_qdq_methods.py` (method in its docstring). "
           "Accuracy is measured in ONNX Runtime with graph optimizations ON, where Q/DQ pairs become "
           "integer kernels.", "",
           f"- Date: {meta['date']}", f"- Machine: {meta['machine']}", f"- Command: `{meta['command']}`",
           f"- Versions: {meta['versions']}", f"- Calibration samples: {meta['samples']} "
           "(digits: rows of digits_calib.npz; others: seeded synthetic), "
           f"batches of {batch_size(meta['samples'])}",
           f"- Total benchmark time: {meta['total_s']:.0f} s"
           + (f" (of which the peak-RSS-against-samples rows: {meta['rss_s']:.0f} s)" if meta.get("flat") else ""),
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
        out += ["", "Peak RSS against the number of calibration samples (one uncompressed .npz per count, "
                f"batches of up to {BATCH} for ORT (the largest divisor of the count: its histogram calibrators need "
                "equal batches); digits past 360 samples: digits_calib.npz rows repeated with a "
                f"seeded N(0, 0.02) jitter; others seeded synthetic). ORT is stopped once its RSS passes "
                f"{meta['cap_gib']:g} GiB: \"> X (stopped)\" is the peak it had reached, a lower bound:", "",
                "| model | method | tool | samples | calib .npz MiB | calib s | peak RSS MiB |",
                "|---|---|---|---:|---:|---:|---:|"]
        for r in meta["flat"]:
            if r.get("stopped"):
                secs, rss = f"stopped after {r['child_s']:.0f} s", f"> {r['rss_mib']:.0f} (stopped)"
            elif r.get("error"):
                secs, rss = f"error: {r['error']}", "-"
            else:
                secs, rss = fmt(r.get("calib_s"), ".2f"), fmt(r.get("rss_mib"), ".0f")
            out.append(f"| {r['model']} | {r['method']} | {r['tool']} | {r['samples']} | "
                       f"{fmt(r.get('file_mib'), '.1f')} | {secs} | {rss} |")
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


def flat_notes(flat: list[dict], results: list[dict] = ()) -> list[str]:
    """Peak RSS of onnxopt against ORT at each count, and onnxopt's growth from the fewest samples to the most."""
    floors = {r["model"]: r["rss_mib"] for r in results if r["tool"] == "(load only)" and r.get("rss_mib")}
    notes = []
    groups: dict = {}
    for r in flat:
        groups.setdefault((r["model"], r["method"]), []).append(r)
    for (model, method), rows in groups.items():
        ours = {r["samples"]: r for r in rows if r["tool"] == "onnxopt" and not r.get("error") and r.get("rss_mib")}
        for r in rows:
            mine = ours.get(r["samples"])
            if r["tool"] != "ort" or not mine or not r.get("rss_mib") or (r.get("error") and not r.get("stopped")):
                continue
            if r.get("stopped"):
                notes.append(f"{model} {method} at {r['samples']} samples: peak RSS onnxopt {mine['rss_mib']:.0f} MiB "
                             f"vs ort > {r['rss_mib']:.0f} MiB (stopped) (< {mine['rss_mib'] / r['rss_mib']:.2f}x)")
            else:
                floor = f"; loading the model alone peaks at {floors[model]:.0f} MiB" if model in floors else ""
                notes.append(f"{model} {method} at {r['samples']} samples: peak RSS onnxopt {mine['rss_mib']:.0f} MiB "
                             f"vs ort {r['rss_mib']:.0f} MiB ({mine['rss_mib'] / r['rss_mib']:.2f}x{floor})")
        if len(ours) >= 2:
            a, b = ours[min(ours)], ours[max(ours)]
            growth = b["rss_mib"] / a["rss_mib"] - 1
            notes.append(f"{model} {method}: flat: {a['samples']} vs {b['samples']} samples {growth:+.0%} "
                         f"(onnxopt {a['rss_mib']:.0f} -> {b['rss_mib']:.0f} MiB, "
                         f"{'within' if abs(growth) <= 0.10 else 'NOT within'} 10%; the calibration .npz grows "
                         f"{a.get('file_mib', 0):.1f} -> {b.get('file_mib', 0):.1f} MiB)")
    return notes


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
    ap.add_argument("--rss", default="digits_cnn,mobilenetv2,resnet18",
                    help="models whose peak RSS is measured against the sample count ('' to skip)")
    ap.add_argument("--rss-methods", default="entropy,percentile")
    ap.add_argument("--rss-samples", default="50,800", help="sample counts, one .npz each")
    ap.add_argument("--rss-tools", default="onnxopt,ort")
    ap.add_argument("--rss-ort-samples", default="800",
                    help="the counts at which ORT runs in these rows ('all'; its RSS at --samples is in the main table)")
    ap.add_argument("--ort-cap-gib", type=float, default=8,
                    help="stop an ORT calibration once its RSS passes this (its figure is then a lower bound)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import onnx
    import onnxruntime

    import onnxopt

    t0 = time.perf_counter()
    results = []
    work = Path(tempfile.mkdtemp(prefix="bench_qdq_"))
    for name in filter(None, args.models.split(",")):
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
    t_rss = time.perf_counter()
    flat = []
    cap_mib = args.ort_cap_gib * 1024
    for name in filter(None, args.rss.split(",")):
        for n in map(int, args.rss_samples.split(",")):
            prep = prepare(name, work, n)
            file_mib = prep["calib"].stat().st_size / 2**20
            for method in args.rss_methods.split(","):
                for tool in args.rss_tools.split(","):
                    if tool != "onnxopt" and args.rss_ort_samples != "all" and str(n) not in args.rss_ort_samples.split(","):
                        continue
                    res = run_child(args.python, tool, method, prep["path"], prep["calib"], work / "flat.onnx", n,
                                    args.timeout, cap_mib=cap_mib if tool == "ort" else None)
                    res.update(model=name, method=method, tool=tool, samples=n, file_mib=file_mib)
                    print(json.dumps({k: v for k, v in res.items() if k != "stats"}, default=float), flush=True)
                    flat.append(res)
            prep["calib"].unlink()
    t_rss = time.perf_counter() - t_rss
    shutil.rmtree(work, ignore_errors=True)
    import onnxsim

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{_cpu()}, {os.cpu_count()} cores, {_mem_gib()} GiB RAM, Linux {platform.release()}, "
                   f"Python {platform.python_version()}",
        "command": "/work/venv-bench/bin/python tools/bench_qdq_methods.py " + " ".join(argv),
        "versions": f"onnxopt {getattr(onnxopt, '__version__', '?')}, onnxruntime {onnxruntime.__version__}, "
                    f"onnxsim {getattr(onnxsim, '__version__', '?')}, onnx {onnx.__version__}, numpy {np.__version__}",
        "samples": args.samples, "total_s": time.perf_counter() - t0, "notes": findings(results) + flat_notes(flat, results), "flat": flat,
        "cap_gib": args.ort_cap_gib, "rss_s": t_rss,
    }
    text = render(results, meta)
    print(text)
    if args.out:
        write_section(args.out, SECTION, text)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "rss": flat}, indent=1, default=float))
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
