"""Quantization side by side: onnxopt's default and each of its modes against ONNX Runtime's
quantize_static, quantize_dynamic and matmul_nbits_quantizer, per model, in one run.

Run (from the repo root; the anchors need onnx-ir, which /work/venv-bench has):

    PYTHONPATH=. /work/venv-bench/bin/python tools/bench_quant.py [--models digits_cnn,resnet18,ppocr_v4_rec,...]
        [--tools default,static,dynamic,woq4,woq8,ort_static,ort_dynamic,ort_nbits4] [--samples 64]
        [--data DIR] [--out BENCHMARKS.md] [--json results.json]

Models. The shipped digits CNN (labels: accuracy); exported random-weight ResNet-18 and BERT
(tools/export_models.py, ~/.cache/onnxopt/models); real-weight models of the corpus
(tools/corpus.py, ~/.cache/onnxopt-corpus): the PP-OCRv4 text recognizer (CTC), the PP-OCRv4 text
detector, and the MiniLM sentence embedder with its weights dequantized to float
(``minilm_l6_float``, made by tools/corpus_float.py where present). A model whose files are absent
is listed as skipped.

Data. Digits: --samples rows of models/digits_calib.npz, and models/digits_test.npz (360
labelled). Exported models: seeded synthetic samples (as tools/bench_qdq.py). Corpus models:
the corpus's own input recipes (tools/corpus_data.py) with seeds other than the corpus inputs'
(tools/bench_ocr_qdq.make_data), --samples calibration samples and 32 evaluation samples.

Tools. Every tool gets the same float model and calibration file and runs in a fresh subprocess
("quantize s": the call alone; "peak RSS": the child's VmHWM). onnxopt: `cleanup,qdq` (its
default, ``mode=auto`` where the pass has modes), `cleanup,qdq(mode=static)`,
`cleanup,qdq(mode=dynamic)`, `cleanup,woq(bits=4,block_size=32)`, `cleanup,woq(bits=8)`. ORT:
``quantize_static`` (QDQ, per-channel, uint8 activations, int8 weights, MinMax), ``quantize_dynamic``
(per-channel int8 weights) and ``MatMulNBitsQuantizer`` (RTN, 4 bits, block 32). A tool that does
not apply (no MatMul for weight-only) or fails is shown with its reason.

Metrics on the evaluation data, float vs quantized, both in ORT on CPU with graph optimizations on:
cosine and SNR of the first output; the task metric (digits: accuracy; CTC recognizer: share of
greedy decodes identical to the float model's; embedder: retrieval recall@1 on
tools/retrieval_eval.py's 400 query/document pairs (its calibration texts are the calibration data); exported models: cosine);
size of the saved file against the float one; latency: batch-1, one intra-op thread, median of
runs after warm-up.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import machine, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("ONNXOPT_CORPUS", "~/.cache/onnxopt-corpus")).expanduser()
EXPORTED = Path("~/.cache/onnxopt/models").expanduser()
SECTION = "## Quantization side by side"
MODELS = ["digits_cnn", "resnet18", "bert", "minilm_l6_float", "ppocr_v4_rec", "ppocr_v4_det"]
PIPELINES = {
    "default": "cleanup,qdq",
    "static": "cleanup,qdq(mode=static)",
    "dynamic": "cleanup,qdq(mode=dynamic)",
    "woq4": "cleanup,woq(bits=4,block_size=32)",
    "woq8": "cleanup,woq(bits=8)",
}
ANCHORS = ("ort_static", "ort_dynamic", "ort_nbits4")
TOOLS = list(PIPELINES) + list(ANCHORS)
EVAL_SAMPLES = 32


# =========================================================================== child

def child_main(tool: str, model: str, calib: str, out: str) -> int:
    """Quantize ``model`` with ``tool`` into ``out``; print one RESULT line."""
    result: dict = {"tool": tool}
    try:
        start = time.perf_counter()
        if tool in PIPELINES:
            import onnxopt

            res = onnxopt.optimize(model, PIPELINES[tool], calibration=calib, validate=False)
            stats = {r.name: r.stats for r in res.records}
            result["stats"] = stats
            result["notes"] = [n for r in res.records for n in (getattr(r, "notes", None) or [])][-6:]
            res.save(out)
        else:
            _anchor(tool, model, calib, out)
        result["quantize_s"] = time.perf_counter() - start
    except Exception as exc:  # a failing tool is recorded; the benchmark goes on
        text = str(exc).strip().splitlines()
        result["error"] = f"{type(exc).__name__}: {text[0][:200] if text else ''}"
    result["rss_mib"] = _vmhwm_mib()
    print("\nRESULT " + json.dumps(result, default=float))  # anchors print progress bars without a newline
    return 0


def _anchor(tool: str, model: str, calib: str, out: str) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    if tool == "ort_static":
        with np.load(calib) as d:
            arrays = {k: d[k] for k in d.files}
        n = len(next(iter(arrays.values())))

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter([{k: v[i:i + 1] for k, v in arrays.items()} for i in range(n)])

            def get_next(self):
                return next(self.it, None)

        quantize_static(model, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    elif tool == "ort_dynamic":
        quantize_dynamic(model, out, per_channel=True, weight_type=QuantType.QInt8)
    elif tool == "ort_nbits4":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer, RTNWeightOnlyQuantConfig

        quant = MatMulNBitsQuantizer(onnx.load(model), algo_config=RTNWeightOnlyQuantConfig(), block_size=32,
                                     is_symmetric=True)
        quant.process()
        quant.model.save_model_to_file(out, use_external_data_format=False)
    else:
        raise ValueError(f"unknown tool {tool}")


def _vmhwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# =========================================================================== data and metrics

def prepare(name: str, work: Path, data: Path, samples: int) -> dict | None:
    """Float model path, calibration .npz, evaluation batches (+labels), task, latency feed."""
    import bench_ocr_qdq
    import bench_qdq

    if name.startswith("digits") or (EXPORTED / f"{name}.onnx").exists() and not (CORPUS / name).exists():
        if not name.startswith("digits") and not (EXPORTED / f"{name}.onnx").exists():
            return None
        prep = bench_qdq.prepare(name, work, samples)
        task = "accuracy" if prep["labels"] is not None else "cosine"
        return {**prep, "task": task}
    path = CORPUS / name / "model.onnx"
    if not path.exists():
        return None
    retrieval = CORPUS / name / "retrieval"
    if (retrieval / "eval.npz").exists():  # a sentence embedder with its retrieval set (tools/retrieval_eval.py)
        with np.load(retrieval / "eval.npz") as d:
            docs = {k[2:]: d[k][:EVAL_SAMPLES] for k in d.files if k.startswith("d_")}
        evals_list = [{k: v[i:i + 4] for k, v in docs.items()} for i in range(0, EVAL_SAMPLES, 4)]
        return {"path": path, "calib": retrieval / "calib.npz", "evals": evals_list, "labels": None,
                "task": "recall", "retrieval": retrieval, "lat": {k: v[:1] for k, v in evals_list[0].items()}}
    manifest = ROOT / "tools" / "corpus_manifest.json"
    if any(m["name"] == name for m in json.loads(manifest.read_text())["models"]):
        bench_ocr_qdq.make_data(name, data, ROOT / "tools", counts=(samples, EVAL_SAMPLES))
        calib, evals = data / f"{name}_calib.npz", data / f"{name}_eval.npz"
    else:  # a derived corpus entry: its inputs.npz cut in two
        calib, evals = _split_inputs(CORPUS / name / "inputs.npz", data, name)
    with np.load(evals) as d:
        ev = {k: d[k][:EVAL_SAMPLES] for k in d.files}
    n = len(next(iter(ev.values())))
    evals_list = [{k: v[i:i + 4] for k, v in ev.items()} for i in range(0, n, 4)]
    first = evals_list[0]
    task = "ctc" if "rec" in name else "cosine"
    return {"path": path, "calib": calib, "evals": evals_list, "labels": None, "task": task,
            "lat": {k: v[:1] for k, v in first.items()}}


def _split_inputs(inputs: Path, data: Path, name: str) -> tuple[Path, Path]:
    with np.load(inputs) as d:
        arrays = {k: d[k] for k in d.files}
    n = len(next(iter(arrays.values())))
    half = max(1, n // 2)
    calib, evals = data / f"{name}_calib.npz", data / f"{name}_eval.npz"
    np.savez(calib, **{k: v[:half] for k, v in arrays.items()})
    np.savez(evals, **{k: v[half:] or v for k, v in arrays.items()})
    return calib, evals


def session(path: Path, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def first_outputs(path: Path, evals: list[dict]) -> list[np.ndarray]:
    sess = session(path)
    name = sess.get_outputs()[0].name
    return [sess.run([name], f)[0] for f in evals]


def measure(ref: list[np.ndarray], got: list[np.ndarray], task: str, labels) -> dict:
    import bench_ocr_qdq

    a = np.concatenate([r.ravel() for r in ref]).astype(np.float64)
    b = np.concatenate([g.ravel() for g in got]).astype(np.float64)
    out = {"cosine": float(a @ b / max(np.sqrt((a @ a) * (b @ b)), 1e-30)),
           "snr_db": float(10 * np.log10((a @ a) / max(((a - b) ** 2).sum(), 1e-30)))}
    if task == "accuracy" and labels is not None:
        r = np.concatenate([x.reshape(len(x), -1) for x in ref])
        g = np.concatenate([x.reshape(len(x), -1) for x in got])
        out["task_float"] = float((r.argmax(1) == labels).mean() * 100)
        out["task"] = float((g.argmax(1) == labels).mean() * 100)
    elif task == "ctc":
        n_per = [len(x) if x.ndim == 3 and x.shape[0] <= 8 else x.shape[1] for x in ref]
        m = bench_ocr_qdq.metrics(ref, got, n_per)
        out["task_float"], out["task"] = 100.0, m["agree"] * 100
    return out


def recall(path: Path, retrieval: Path) -> float:
    """Recall@1 (%) of a sentence embedder on tools/retrieval_eval.py's query/document pairs."""
    import retrieval_eval

    with np.load(retrieval / "eval.npz") as z:
        q = {k[2:]: z[k] for k in z.files if k.startswith("q_")}
        d = {k[2:]: z[k] for k in z.files if k.startswith("d_")}
    eq, ed = retrieval_eval.embed(str(path), q), retrieval_eval.embed(str(path), d)
    return float(np.mean(np.argmax(eq @ ed.T, axis=1) == np.arange(len(eq))) * 100)


def latency(path: Path, feed: dict) -> float:
    from onnxopt.validate import latency_ms

    return latency_ms(session(path, threads=1), feed, 20, warmup=3)


# =========================================================================== parent

def run_child(python: str, tool: str, model: Path, calib: Path, out: Path, timeout: float) -> dict:
    import subprocess

    cmd = [python, str(Path(__file__).resolve()), "--child", tool, str(model), str(calib), str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"tool": tool, "error": f"timed out after {timeout:.0f} s"}
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"tool": tool, "error": f"child failed: {tail[:200]}"}
    return json.loads(line[7:])


QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                 "MatMulNBits", "GatherBlockQuantized", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


def quantized_ops(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear") for n in model.graph.node)


def not_applied(res: dict, out: Path) -> str | None:
    """Why a tool left the model as it was (no quantized op in its result; for onnxopt, its pass's reasons)."""
    if quantized_ops(out):
        return None
    reasons = {k: v for name in ("qdq", "woq") for k, v in ((res.get("stats") or {}).get(name) or {}).items()
               if k.startswith("skipped_") and v}
    top = sorted(reasons, key=lambda k: -reasons[k])[:2]
    return "nothing quantized" + (f" ({', '.join(top)})" if top else "")


def bench_model(name: str, args, work: Path) -> list[dict]:
    prep = prepare(name, work, args.data, args.samples)
    if prep is None:
        print(f"{name}: model files absent, skipped", flush=True)
        return [{"model": name, "tool": "-", "error": "model files absent (build the corpus / exports)"}]
    ref = first_outputs(prep["path"], prep["evals"])
    size = prep["path"].stat().st_size
    lat_float = latency(prep["path"], prep["lat"])
    rows = [{"model": name, "tool": "float", "size": 1.0, "lat_ratio": 1.0, "lat_ms": lat_float,
             **measure(ref, ref, prep["task"], prep["labels"])}]
    if prep["task"] == "recall":
        rows[0]["task"] = recall(prep["path"], prep["retrieval"])
    for tool in args.tools.split(","):
        out = work / f"{name}.{tool}.onnx"
        res = run_child(args.python, tool, prep["path"], prep["calib"], out, args.timeout)
        res["model"] = name
        if not res.get("error"):
            res["error"] = not_applied(res, out)
        if not res.get("error"):
            try:
                res.update(measure(ref, first_outputs(out, prep["evals"]), prep["task"], prep["labels"]))
                if prep["task"] == "recall":
                    res["task"] = recall(out, prep["retrieval"])
                res["size"] = out.stat().st_size / size
                res["lat_ms"] = latency(out, prep["lat"])
                res["lat_ratio"] = res["lat_ms"] / lat_float
            except Exception as exc:
                res["error"] = f"ORT cannot run the result: {str(exc).strip().splitlines()[0][:150]}"
        print(json.dumps({k: v for k, v in res.items() if k != "stats"}, default=float), flush=True)
        rows.append(res)
        out.unlink(missing_ok=True)
    return rows


def fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def render(rows: list[dict], meta: dict) -> str:
    lines = [SECTION, "",
             f"{meta['date']}; {meta['machine']}; `{meta['command']}` ({meta['total_s'] / 60:.0f} min). "
             "Method in the script's docstring: same float model and calibration file for every tool, "
             f"{meta['samples']} calibration samples, {EVAL_SAMPLES} other evaluation samples (digits: 360 "
             "labelled); ORT CPU, optimizations on; size and latency (batch 1, one thread) against the float "
             "model. Task: digits accuracy %; CTC recognizer: greedy decodes identical to float's %; sentence embedder: retrieval recall@1 % on 400 query/document pairs (tools/retrieval_eval.py), its cosine over the token embeddings of 32 documents.", "",
             "| model | tool | cosine | SNR dB | task | size × | latency × | quantize s | peak RSS MiB | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['tool']} | | | | | | | | {r['error']} |")
            continue
        lines.append(f"| {r['model']} | {r['tool']} | {fmt(r.get('cosine'), '.4f')} | {fmt(r.get('snr_db'), '.1f')} "
                     f"| {fmt(r.get('task'), '.1f')} | {fmt(r.get('size'), '.2f')} | {fmt(r.get('lat_ratio'), '.2f')} "
                     f"| {fmt(r.get('quantize_s'), '.1f')} | {fmt(r.get('rss_mib'), '.0f')} | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(*argv[1:5])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "onnxopt-bench-quant")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    args.data.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_quant_") as tmp:
        for name in filter(None, args.models.split(",")):
            rows.extend(bench_model(name, args, Path(tmp)))
    m = machine()
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{m['cpu']}, {m['cores']} cores, {m['memory']}",
            "command": "PYTHONPATH=. /work/venv-bench/bin/python tools/bench_quant.py " + " ".join(argv),
            "samples": args.samples, "total_s": time.perf_counter() - t0}
    text = render(rows, meta)
    print(text)
    if args.out:
        write_section(args.out, SECTION, text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
