"""Benchmark `onnxopt tune`: the four targets of its design, one run, one BENCHMARKS.md section.

    PYTHONPATH=. python tools/bench_tune.py [--executor local|ray|ray://HOST:PORT] [--cases digits,resnet18,minilm,ocr]
                                           [--ray-cases digits] [--ray-workers 2] [--out BENCHMARKS.md] [--json FILE]

--ray-cases reruns those cases on a local Ray instance with --ray-workers workers and says whether
the chosen pipeline is the one the first run chose (it must be: the same seed, the same choices).

Cases (each `tune(...)` in this process, seed 0):
- digits: models/digits_cnn.onnx, calibration models/digits_calib.npz, budget on the labelled
  test split models/digits_test.npz (accuracy), `size=0.25`, at most 1 point.
- resnet18: ~/.cache/onnxopt/models/resnet18.onnx (exported, random weights), seeded normal
  images (32 for calibration, seed 1; 16 to measure, seed 2), `latency=0.5`; the logits are
  judged as `other` (cosine x 100: random weights make top-1 agreement a coin toss), at most 1 point.
- minilm: the float all-MiniLM-L6-v2 of the corpus (~/.cache/onnxopt-corpus/minilm_l6_float), its
  retrieval calibration texts (128) and 64 of its retrieval documents (embedding: mean vector
  cosine x 100), `size=0.30`, at most 1 point.
- ocr: PP-OCRv4 recognizer (corpus ppocr_v4_rec), rendered text lines from
  tools/bench_ocr_qdq.make_data (128 calibration, 64 to measure; sequence: per-position top-1
  agreement), `size=0.30`, at most 1 point, at most 300 evaluations (`max_evaluations`; each
  costs a few seconds on 2 cores).

For resnet18 the tuned pipeline is also set beside fixed pipelines (FIXED): each run through
`optimize` on the same data, size ratio of the file, latency ratio from optimize's validation,
and the logits' cosine against the original on the 16 measured images (ORT, optimizations on).

Columns: whether the target was met within the budget, the size and latency ratios of the final
model (from optimize's validation of the printed pipeline against the original), the budget
metric's drop, evaluations (single-layer and assembled), and wall time. Latency on this machine is
measured while other work may run (see the machine line).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from benchmarks_md import machine, write_section  # noqa: E402

SECTION = "## Tuning to a target (tools/bench_tune.py)"
CORPUS = Path.home() / ".cache" / "onnxopt-corpus"
EXPORTED = Path.home() / ".cache" / "onnxopt" / "models"
DATA = Path.home() / ".cache" / "onnxopt" / "bench_tune"


def prepare(name: str) -> dict | None:
    """Model, calibration, inputs, target and extra tune arguments of a case; None when missing."""
    DATA.mkdir(parents=True, exist_ok=True)
    if name == "digits":
        return {"model": ROOT / "models/digits_cnn.onnx", "calib": ROOT / "models/digits_calib.npz",
                "inputs": ROOT / "models/digits_test.npz", "target": "size=0.25", "kw": {}}
    if name == "resnet18":
        model = EXPORTED / "resnet18.onnx"
        if not model.exists():
            return None
        for split, seed, n in (("calib", 1, 32), ("eval", 2, 16)):
            path = DATA / f"resnet18_{split}.npz"
            if not path.exists():
                x = np.random.default_rng(seed).standard_normal((n, 3, 224, 224)).astype(np.float32)
                np.savez(path, input=x)
        import onnx

        output = onnx.load(str(model), load_external_data=False).graph.output[0].name
        return {"model": model, "calib": DATA / "resnet18_calib.npz", "inputs": DATA / "resnet18_eval.npz",
                "target": "latency=0.5", "kw": {"output_kinds": {output: "other"}}}
    if name == "minilm":
        folder = CORPUS / "minilm_l6_float"
        if not (folder / "retrieval" / "eval.npz").exists():
            return None
        inputs = DATA / "minilm_eval.npz"
        if not inputs.exists():
            with np.load(folder / "retrieval" / "eval.npz") as d:
                np.savez(inputs, **{k[2:]: d[k][:64] for k in d.files if k.startswith("d_")})
        return {"model": folder / "model.onnx", "calib": folder / "retrieval" / "calib.npz", "inputs": inputs,
                "target": "size=0.30", "kw": {}}
    if name == "ocr":
        if not (CORPUS / "ppocr_v4_rec" / "model.onnx").exists():
            return None
        import bench_ocr_qdq

        bench_ocr_qdq.make_data("ppocr_v4_rec", DATA, ROOT / "tools", counts=(128, 64))
        return {"model": CORPUS / "ppocr_v4_rec" / "model.onnx", "calib": DATA / "ppocr_v4_rec_calib.npz",
                "inputs": DATA / "ppocr_v4_rec_eval.npz", "target": "size=0.30",
                "kw": {"max_evaluations": 300}}  # the run stops at the best point found by then
    raise SystemExit(f"unknown case {name}")


# fixed pipelines the tuned resnet18 is compared with (the design target: the best cosine at its size)
FIXED = ["cleanup,qdq(mode=static)", "cleanup,prune(pattern=structured,sparsity=0.5)",
         "cleanup,prune(pattern=structured,sparsity=0.25),qdq(mode=static)"]


def pipeline_row(prep: dict, pipeline: str, label: str) -> dict:
    """Size and latency ratios (optimize's validation) and the first output's cosine of one pipeline."""
    import onnx
    import onnxruntime as ort

    import onnxopt
    from onnxopt.serialize import serialized_size

    res = onnxopt.optimize(str(prep["model"]), pipeline, calibration=str(prep["calib"]), inputs=str(prep["inputs"]),
                           latency_runs=20)
    comp = res.validation
    original = onnx.load(str(prep["model"]))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    feed = dict(np.load(prep["inputs"]))
    ref, got = (ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]
                .astype(np.float64).ravel() for m in (original, res.model))
    return {"label": label, "pipeline": pipeline, "size_ratio": serialized_size(res.model) / serialized_size(original),
            "latency_ratio": (comp.latency_candidate_ms / comp.latency_reference_ms
                              if comp is not None and comp.latency_reference_ms and comp.latency_candidate_ms else None),
            "cosine": float(ref @ got / np.sqrt((ref @ ref) * (got @ got)))}


def run_case(name: str, executor: str, workers: int | None = None) -> dict | None:
    from onnxopt.tune import tune

    prep = prepare(name)
    if prep is None:
        print(f"{name}: model or data missing, skipped", file=sys.stderr)
        return None
    start = time.perf_counter()
    r = tune(str(prep["model"]), str(prep["calib"]), inputs=str(prep["inputs"]), target=prep["target"],
             max_drop=1.0, executor=executor, workers=workers, seed=0, **prep["kw"])
    wall = time.perf_counter() - start
    d = r.to_dict()
    print(f"{name}: {'met' if r.met else 'NOT met'}: {r.message} ({wall:.0f} s)\n  {r.pipeline}", file=sys.stderr)
    return {"case": name, "target": prep["target"], "metric": d["budget"]["metric"], "met": d["met"],
            "size_ratio": d["result"]["size_ratio"], "latency_ratio": d["result"]["latency_ratio"],
            "drop": d["result"]["drop"], "evaluations": d["evaluations"], "points": len(d["points"]),
            "seconds": round(wall, 1), "executor": d["executor"], "workers": d["workers"],
            "pipeline": d["pipeline"], "message": d["message"],
            "fixed": [pipeline_row(prep, p, label) for p, label in
                      ([(r.pipeline, "tuned")] + [(p, "fixed") for p in FIXED])] if name == "resnet18" and
            executor == "local" else []}


def section(rows: list[dict], executor: str, ray_rows: list[dict] = ()) -> str:
    m = machine()
    lines = [SECTION, "",
             f"One run of `PYTHONPATH=. python tools/bench_tune.py --executor {executor}` on "
             f"{_dt.date.today().isoformat()}; {m['cpu']}, {m['cores']} cores, {m['memory']}, {m['os']}, "
             f"Python {m['python']}. Method in the script's docstring; budget: at most 1 point of the "
             "budget metric, seed 0.", "",
             "| case | target | budget metric | met | size | latency | drop (points) | evaluations | wall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = "" if r["latency_ratio"] is None else f"{r['latency_ratio']:.2f}x"
        lines.append(f"| {r['case']} | `{r['target']}` | {r['metric']} | {'yes' if r['met'] else 'no'} | "
                     f"{r['size_ratio']:.3f}x | {lat} | {r['drop']:.2f} | {r['evaluations']} | {r['seconds']:.0f} s |")
    lines += ["", "Chosen pipelines:", ""]
    lines += [f"- {r['case']}: `{r['pipeline']}`" for r in rows]
    for r in rows:
        if not r.get("fixed"):
            continue
        lines += ["", f"{r['case']}: the tuned pipeline beside fixed ones, each through `optimize` on the same data "
                  "(size of the file; latency from optimize's validation; cosine of the first output against the "
                  "original on the measured inputs):", "", "| pipeline | size | latency | cosine |", "|---|---|---|---|"]
        for f in r["fixed"]:
            lat = "" if f["latency_ratio"] is None else f"{f['latency_ratio']:.2f}x"
            name = "tuned (above)" if f["label"] == "tuned" else f"`{f['pipeline']}`"
            lines.append(f"| {name} | {f['size_ratio']:.3f}x | {lat} | {f['cosine']:.6f} |")
    if ray_rows:
        local = {r["case"]: r for r in rows}
        lines += ["", "The same cases again on a local Ray instance the script starts (`executor=\"ray\"`), against "
                  "the run above:", "", "| case | executor | workers | evaluations | wall | same pipeline |",
                  "|---|---|---|---|---|---|"]
        for r in ray_rows:
            loc = local[r["case"]]
            lines.append(f"| {r['case']} | {loc['executor']} | {loc['workers']} | {loc['evaluations']} | "
                         f"{loc['seconds']:.0f} s | |")
            lines.append(f"| {r['case']} | {r['executor']} | {r['workers']} | {r['evaluations']} | {r['seconds']:.0f} s | "
                         f"{'yes' if r['pipeline'] == loc['pipeline'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--executor", default="local")
    ap.add_argument("--cases", default="digits,resnet18,minilm,ocr")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--ray-cases", default="", help="cases rerun on a local Ray instance (e.g. digits)")
    ap.add_argument("--ray-workers", type=int, default=2)
    args = ap.parse_args()
    rows = [r for r in (run_case(c, args.executor) for c in args.cases.split(",")) if r]
    done = {r["case"] for r in rows}
    ray_rows = [r for r in (run_case(c, "ray", args.ray_workers) for c in args.ray_cases.split(",") if c in done) if r]
    if args.json:
        Path(args.json).write_text(json.dumps(rows + ray_rows, indent=2) + "\n")
    if rows and args.out:
        write_section(Path(args.out), SECTION, section(rows, args.executor, ray_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
