"""Post-training pruning: onnxopt's ``prune`` beside onnxsim 0.8's pruning functions.

Method. Every figure is measured in the same run, on the same models, the same
calibration data and the same sparsities, post-training with no retraining:

* digits MLP and CNN (``models/``): top-1 accuracy on the 360 test images of
  ``digits_test.npz`` against sparsity 0..90%, calibration = the 360 images of
  ``digits_calib.npz``. onnxsim prunes every layer, so onnxopt runs with
  ``keep_first_last=false`` here (like for like). For each method the highest
  sparsity whose accuracy is within 1 point of dense is reported.
* BERT-style export (``~/.cache/onnxopt/models/bert.onnx``): cosine of
  ``last_hidden_state`` against the dense model on 16 held-out random token
  sequences; calibration = 32 other random sequences (seeded).
* structured: parameters, FLOPs (Conv/Gemm/MatMul multiply-adds x2, shapes from
  ONNX shape inference) and ORT latency (CPU, median of runs, 1 thread) before
  and after, on the digits CNN and the ResNet-18-like export.

onnxsim functions used: apply_magnitude_pruning (layer/global, n:m),
apply_wanda_pruning, apply_sparsegpt_pruning and apply_structured_pruning, each
with the calibration batches where it takes them (``num_samples`` = all of them).
onnxsim's structured ``sparsity`` is a share of channels per layer, onnxopt's a share
of all weights: onnxsim runs at the channel share (bisection) that removes the same
share of weights.
onnxopt gets the same samples, all of them (``samples=N`` is added to every
calibrated spec: prune reads at most ``samples``). Each onnxsim method is
compared with the onnxopt row of the same method and comparison group
(``findings``: printed, and listed in the section).

Run from the repo root with the bench venv (onnxsim installed, onnxopt editable):

    /work/venv-bench/bin/python tools/bench_prune.py --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxopt  # noqa: E402

from benchmarks_md import machine, write_section  # tools/ is on the path when a script runs
from onnxopt.validate import latency_ms

SECTION = "## Pruning (prune)"
CACHE = Path.home() / ".cache" / "onnxopt" / "models"
SPARSITIES = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


# ----------------------------------------------------------------- running

def session(model: onnx.ModelProto, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def with_samples(spec: str, calib) -> str:
    """``spec`` reading all of ``calib`` (prune's ``samples`` caps what it reads): the same data onnxsim gets."""
    if calib is None:
        return spec
    n = len(next(iter(calib.values())))
    head, sep, tail = spec.partition(")")
    return f"{head},samples={n}{sep}{tail}"


def onnxopt_prune(model: onnx.ModelProto, spec: str, calib) -> onnx.ModelProto:
    return onnxopt.optimize(model, with_samples(spec, calib), calibration=calib, validate=False).model


def onnxsim_fn(name: str):
    import onnxsim
    return getattr(onnxsim, name, None)


def methods(calib_batches, kind: str):
    """(label, family, callable(model, sparsity) -> model or None when the method does not apply)."""
    cal = calib_batches
    n = len(cal)

    def oo(spec, use_cal=False):
        def run(model, s):
            return onnxopt_prune(model, spec.format(s=s), cal_dict if use_cal else None)
        return run

    cal_dict = cal_concat(cal)
    base = "prune(sparsity={s},keep_first_last=false"
    rows = [
        ("magnitude, layer", "onnxopt", oo(base + ",reconstruct=false)")),
        ("magnitude, row", "onnxopt", oo(base + ",scope=row,reconstruct=false)")),
        ("magnitude, global", "onnxopt", oo(base + ",scope=global,reconstruct=false)")),
        ("magnitude, global, raw", "onnxopt", oo(base + ",scope=global,global_norm=none,reconstruct=false)")),
        ("wanda", "onnxopt", oo(base + ",score=wanda,reconstruct=false)", True)),
        ("wanda, layer", "onnxopt", oo(base + ",score=wanda,scope=layer,reconstruct=false)", True)),
        ("magnitude + reconstruction", "onnxopt", oo(base + ",reconstruct=true)", True)),
        ("wanda + reconstruction", "onnxopt", oo(base + ",score=wanda,reconstruct=true)", True)),
        ("obs + reconstruction", "onnxopt", oo(base + ",score=obs,reconstruct=true)", True)),
        ("obs, row + reconstruction", "onnxopt", oo(base + ",score=obs,scope=row,reconstruct=true)", True)),
        ("global + reconstruction", "onnxopt", oo(base + ",scope=global,reconstruct=true)", True)),
        ("reconstruction, one pass", "onnxopt", oo(base + ",reconstruct=true,sequential=false)", True)),
        ("global + reconstruction, first/last layers dense (default)", "onnxopt",
         oo("prune(sparsity={s},scope=global)", True)),
    ]
    sims = [
        # onnxsim's per-layer mode zeros the same share of every output row: compare with "magnitude, row"
        ("magnitude, row", "onnxsim", lambda m, s: onnxsim_fn("apply_magnitude_pruning")(m, sparsity=s)),
        ("magnitude, global", "onnxsim",
         lambda m, s: onnxsim_fn("apply_magnitude_pruning")(m, sparsity=s, global_sparsity=True)),
        ("wanda", "onnxsim", lambda m, s: onnxsim_fn("apply_wanda_pruning")(m, calibration_data=cal, num_samples=n,
                                                                            sparsity=s)),
        ("sparsegpt", "onnxsim", lambda m, s: onnxsim_fn("apply_sparsegpt_pruning")(m, calibration_data=cal,
                                                                                    num_samples=n, sparsity=s)),
    ]
    if kind == "structured":
        st = "prune(pattern=structured,sparsity={s}"
        rows = [("structured L2", "onnxopt", oo(st + ",keep_first_last=false,reconstruct=false)")),
                ("structured L2, removed bias not folded", "onnxopt",
                 oo(st + ",keep_first_last=false,reconstruct=false,fold_removed=false)")),
                ("structured L2 + refit", "onnxopt", oo(st + ",keep_first_last=false)", True)),
                ("structured L2, first/last layers dense (default)", "onnxopt", oo(st + ",reconstruct=false)")),
                ("structured L2 + refit, first/last layers dense (default)", "onnxopt", oo(st + ")", True))]
        sims = [("structured L2", "onnxsim", lambda m, s: onnxsim_structured_at(m, s, importance_norm="l2"))]
    return rows + sims


def nm_methods(calib_batches):
    cal, n = calib_batches, len(calib_batches)
    cal_dict = cal_concat(cal)
    base = "prune(pattern=2:4,keep_first_last=false"
    return [
        ("2:4 magnitude", "onnxopt", lambda m: onnxopt_prune(m, base + ",reconstruct=false)", None)),
        ("2:4 wanda", "onnxopt", lambda m: onnxopt_prune(m, base + ",score=wanda,reconstruct=false)", cal_dict)),
        ("2:4 + reconstruction", "onnxopt", lambda m: onnxopt_prune(m, base + ",reconstruct=true)", cal_dict)),
        ("2:4 obs + reconstruction", "onnxopt",
         lambda m: onnxopt_prune(m, base + ",score=obs,reconstruct=true)", cal_dict)),
        ("2:4 magnitude", "onnxsim", lambda m: onnxsim_fn("apply_magnitude_pruning")(m, sparsity=0.5, n=2, m=4)),
        ("2:4 wanda", "onnxsim", lambda m: onnxsim_fn("apply_wanda_pruning")(m, calibration_data=cal, num_samples=n,
                                                                             sparsity=0.5, n=2, m=4)),
        ("2:4 sparsegpt", "onnxsim", lambda m: onnxsim_fn("apply_sparsegpt_pruning")(
            m, calibration_data=cal, num_samples=n, sparsity=0.5, n=2, m=4)),
    ]


def cal_concat(batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def attempt(fn, *args):
    try:
        start = time.perf_counter()
        out = fn(*args)
        return out, time.perf_counter() - start, None
    except Exception as exc:  # an anchor that declines or fails is reported, not fatal
        return None, 0.0, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''}"


# ----------------------------------------------------------------- metrics

def fingerprint(model: onnx.ModelProto) -> list:
    """The weights, independent of names and order: a tool that declined leaves them as they were."""
    import hashlib
    return sorted((tuple(i.dims), hashlib.sha1(i.SerializeToString().replace(i.name.encode(), b"")).hexdigest())
                  for i in model.graph.initializer)


def accuracy(model, x, labels) -> float:
    logits = session(model).run(None, {"input": x})[0]
    return float((logits.argmax(1) == labels).mean() * 100)


def logit_error(model, x, ref: np.ndarray) -> float:
    """‖logits − dense logits‖ / ‖dense logits‖ on the test images: how far the pruned model moved."""
    logits = session(model).run(None, {"input": x})[0].astype(np.float64)
    return float(np.linalg.norm(logits - ref) / max(np.linalg.norm(ref), 1e-30))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def layer_weights(model: onnx.ModelProto) -> list[np.ndarray]:
    """The weights of Conv/Gemm/MatMul (initializers, dense or sparse_value Constants), as written."""
    from onnx import numpy_helper
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        elif n.op_type == "Constant" and n.attribute and n.attribute[0].name == "sparse_value":
            consts[n.output[0]] = _dense(n.attribute[0].sparse_tensor)
    return [consts[n.input[1]] for n in model.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in consts]


def zero_fraction(model: onnx.ModelProto) -> float:
    """Zeros among the weights of Conv/Gemm/MatMul, as written."""
    weights = layer_weights(model)
    return sum(int(np.count_nonzero(w == 0)) for w in weights) / max(sum(w.size for w in weights), 1)


def removed_fraction(original: onnx.ModelProto, pruned: onnx.ModelProto) -> float:
    """The share of the original's Conv/Gemm/MatMul weights that are gone (removed or zero) in ``pruned``."""
    total = sum(w.size for w in layer_weights(original))
    return 1.0 - sum(int(np.count_nonzero(w)) for w in layer_weights(pruned)) / max(total, 1)


def onnxsim_structured_at(model: onnx.ModelProto, s: float, **options) -> onnx.ModelProto:
    """onnxsim's structured pruning at the same share of weights removed as onnxopt's ``sparsity=s``:
    its ``sparsity`` is a share of channels per layer, so it is searched (bisection) for the channel
    share that removes the nearest to ``s`` of the weights."""
    fn = onnxsim_fn("apply_structured_pruning")
    if s <= 0:
        return fn(model, sparsity=s, **options)
    lo, hi, best = 0.0, 0.99, None
    for _ in range(10):
        mid = (lo + hi) / 2
        out = fn(model, sparsity=mid, **options)
        got = removed_fraction(model, out)
        if best is None or abs(got - s) < abs(best[1] - s):
            best = (out, got)
        lo, hi = (mid, hi) if got < s else (lo, mid)
    return best[0]


def _dense(sp) -> np.ndarray:
    from onnx import numpy_helper
    out = np.zeros(int(np.prod(sp.dims)), np.float32)
    out[numpy_helper.to_array(sp.indices)] = numpy_helper.to_array(sp.values)
    return out


def flops_params(model: onnx.ModelProto, feed: dict) -> tuple[int, int]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        if vi.name in feed:
            dims = vi.type.tensor_type.shape.dim
            for d, size in zip(dims, feed[vi.name].shape):
                d.Clear()
                d.dim_value = int(size)
    m = onnx.shape_inference.infer_shapes(m)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in
              [*m.graph.value_info, *m.graph.output, *m.graph.input]}
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    params = int(sum(np.prod(d) for d in inits.values()))
    flops = 0
    for n in m.graph.node:
        out = shapes.get(n.output[0])
        if not out or n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.input) < 2:
            continue
        w = inits.get(n.input[1]) or shapes.get(n.input[1])
        if not w:
            continue
        if n.op_type == "Conv":
            k = int(np.prod(w[1:]))
        elif n.op_type == "Gemm":
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            k = w[1] if trans_b else w[0]
        else:
            k = w[-2]
        flops += 2 * int(np.prod(out)) * k
    return flops, params


def latency(model, feed, runs: int) -> float:
    return latency_ms(session(model, threads=1), feed, runs)


# ----------------------------------------------------------------- benchmarks

def bench_digits(name: str, sparsities, log) -> dict:
    model = onnx.load(str(ROOT / "models" / f"{name}.onnx"))
    test = np.load(ROOT / "models" / "digits_test.npz")
    x, labels = test["input"], test["labels"]
    calib = np.load(ROOT / "models" / "digits_calib.npz")["input"]
    batches = [{"input": calib[i:i + 40]} for i in range(0, len(calib), 40)]
    dense = accuracy(model, x, labels)
    ref = session(model).run(None, {"input": x})[0].astype(np.float64)
    table = {"dense": dense, "rows": [], "nm": [], "structured": []}
    for kind, key in (("unstructured", "rows"), ("structured", "structured")):
        for label, family, fn in methods(batches, kind):
            row = {"method": label, "tool": family, "acc": {}, "errors": {}, "seconds": 0.0}
            for s in sparsities:
                if s == 0.0:
                    row["acc"][s] = dense
                    continue
                out, sec, err = attempt(fn, model, s)
                row["seconds"] += sec
                if out is None:
                    row["errors"][s] = err
                    continue
                row["acc"][s] = accuracy(out, x, labels)
                row.setdefault("err", {})[s] = logit_error(out, x, ref)
                if fingerprint(out) == fingerprint(model):
                    row.setdefault("unchanged", []).append(s)
                if key == "rows":
                    row.setdefault("zeros", {})[s] = zero_fraction(out)
            within = [s for s in sparsities if s in row["acc"] and row["acc"][s] >= dense - 1.0
                      and s not in row.get("unchanged", [])]
            row["best"] = max(within) if within else None
            log(f"{name} {family:8s} {label:28s} " + " ".join(f"{row['acc'].get(s, float('nan')):6.2f}" for s in sparsities)
                + (f"  errors: {sorted(set(row['errors'].values()))[:1]}" if row["errors"] else ""))
            table[key].append(row)
    for label, family, fn in nm_methods(batches):
        out, sec, err = attempt(fn, model)
        acc = accuracy(out, x, labels) if out is not None else None
        table["nm"].append({"method": label, "tool": family, "acc": acc, "error": err,
                            "err": logit_error(out, x, ref) if out is not None else None})
        log(f"{name} {family:8s} {label:28s} {acc}" + (f" error: {err}" if err else ""))
    return table


def bench_bert(sparsities, log) -> dict:
    path = CACHE / "bert.onnx"
    if not path.exists():
        return {"missing": str(path)}
    model = onnx.load(str(path))
    rng = np.random.default_rng(0)

    def batch(n, seq=32):
        return {"input_ids": rng.integers(1, 1000, size=(n, seq)).astype(np.int64),
                "attention_mask": np.ones((n, seq), np.int64)}

    calib = [batch(8) for _ in range(4)]
    test = batch(16)
    ref = session(model).run(None, test)[0]
    rows = []
    cal_dict = cal_concat(calib)
    oo = lambda spec, c=None: (lambda m, s: onnxopt_prune(m, spec.format(s=s), c))
    base = "prune(sparsity={s},keep_first_last=false"
    n = len(calib)
    candidates = [
        ("magnitude", "onnxopt", oo(base + ",reconstruct=false)")),
        ("magnitude, row", "onnxopt", oo(base + ",scope=row,reconstruct=false)")),
        ("wanda", "onnxopt", oo(base + ",score=wanda,reconstruct=false)", cal_dict)),
        ("wanda, layer", "onnxopt", oo(base + ",score=wanda,scope=layer,reconstruct=false)", cal_dict)),
        ("magnitude + reconstruction", "onnxopt", oo(base + ",reconstruct=true)", cal_dict)),
        ("obs + reconstruction", "onnxopt", oo(base + ",score=obs,reconstruct=true)", cal_dict)),
        ("magnitude", "onnxsim", lambda m, s: onnxsim_fn("apply_magnitude_pruning")(m, sparsity=s)),
        ("wanda", "onnxsim", lambda m, s: onnxsim_fn("apply_wanda_pruning")(m, calibration_data=calib,
                                                                            num_samples=n, sparsity=s)),
        ("sparsegpt", "onnxsim", lambda m, s: onnxsim_fn("apply_sparsegpt_pruning")(m, calibration_data=calib,
                                                                                    num_samples=n, sparsity=s)),
    ]
    nm = {"2:4 magnitude/onnxopt": lambda m: onnxopt_prune(m, "prune(pattern=2:4,keep_first_last=false,reconstruct=false)", None),
          "2:4 wanda/onnxopt": lambda m: onnxopt_prune(m, "prune(pattern=2:4,keep_first_last=false,score=wanda,reconstruct=false)", cal_dict),
          "2:4 reconstruction/onnxopt": lambda m: onnxopt_prune(m, "prune(pattern=2:4,keep_first_last=false)", cal_dict),
          "2:4 obs + reconstruction/onnxopt": lambda m: onnxopt_prune(
              m, "prune(pattern=2:4,keep_first_last=false,score=obs)", cal_dict),
          "2:4 magnitude/onnxsim": lambda m: onnxsim_fn("apply_magnitude_pruning")(m, sparsity=0.5, n=2, m=4),
          "2:4 wanda/onnxsim": lambda m: onnxsim_fn("apply_wanda_pruning")(m, calibration_data=calib, num_samples=n,
                                                                          sparsity=0.5, n=2, m=4),
          "2:4 sparsegpt/onnxsim": lambda m: onnxsim_fn("apply_sparsegpt_pruning")(m, calibration_data=calib,
                                                                                  num_samples=n, sparsity=0.5, n=2, m=4)}
    for label, family, fn in candidates:
        row = {"method": label, "tool": family, "cos": {}, "errors": {}, "seconds": 0.0}
        for s in sparsities:
            out, sec, err = attempt(fn, model, s)
            row["seconds"] += sec
            if out is None:
                row["errors"][s] = err
                continue
            row["cos"][s] = cosine(session(out).run(None, test)[0], ref)
        log(f"bert {family:8s} {label:28s} " + " ".join(f"{row['cos'].get(s, float('nan')):.4f}" for s in sparsities)
            + (f"  errors: {sorted(set(row['errors'].values()))[:1]}" if row["errors"] else ""))
        rows.append(row)
    nm_rows = []
    for key, fn in nm.items():
        out, sec, err = attempt(fn, model)
        c = cosine(session(out).run(None, test)[0], ref) if out is not None else None
        nm_rows.append({"method": key, "cos": c, "error": err})
        log(f"bert {key:30s} {c}" + (f" error: {err}" if err else ""))
    return {"rows": rows, "nm": nm_rows}


def bench_structured(log, runs: int) -> list:
    out_rows = []
    cases = []
    test = np.load(ROOT / "models" / "digits_test.npz")["input"]
    calib = np.load(ROOT / "models" / "digits_calib.npz")["input"]
    cases.append(("digits_cnn", onnx.load(str(ROOT / "models" / "digits_cnn.onnx")), {"input": test[:64]},
                  {"input": calib}, 0.5))
    rpath = CACHE / "resnet18.onnx"
    if rpath.exists():
        feed = dict(np.load(CACHE / "resnet18.inputs.npz"))
        rng = np.random.default_rng(1)
        rcal = {k: rng.standard_normal((8, *v.shape[1:])).astype(v.dtype) for k, v in feed.items()}
        cases.append(("resnet18", onnx.load(str(rpath)), feed, rcal, 0.5))
    for name, model, feed, cal, s in cases:
        base_flops, base_params = flops_params(model, feed)
        base_lat = latency(model, feed, runs)
        ref = session(model).run(None, feed)[0]
        for label, fn in (("onnxopt structured L2 + refit",
                           lambda m: onnxopt.optimize(m, with_samples(f"prune(pattern=structured,sparsity={s}),dce", cal),
                                                      calibration=cal, validate=False)),
                          ("onnxsim apply_structured_pruning",
                           lambda m: onnxsim_structured_at(m, s))):
            res, sec, err = attempt(fn, model)
            if res is None:
                out_rows.append({"model": name, "method": label, "error": err})
                log(f"structured {name} {label}: {err}")
                continue
            pruned = res.model if hasattr(res, "model") else res
            stats = res.records[0].stats if hasattr(res, "records") else {}
            flops, params = flops_params(pruned, feed)
            lat = latency(pruned, feed, runs)
            cos = cosine(session(pruned).run(None, feed)[0], ref)
            row = {"model": name, "method": label, "sparsity": s, "params": (base_params, params),
                   "flops": (base_flops, flops), "latency_ms": (base_lat, lat), "cosine": cos,
                   "layers": stats.get("layers_pruned"), "skips": {k: v for k, v in stats.items()
                                                                  if k.startswith("skipped_structured") and v}}
            out_rows.append(row)
            log(f"structured {name} {label}: params {base_params}->{params} flops {base_flops/1e6:.1f}M->{flops/1e6:.1f}M "
                f"latency {base_lat:.2f}->{lat:.2f} ms cos {cos:.4f} {row['skips']}")
    return out_rows


# ----------------------------------------------------------------- findings

# each onnxsim method and the onnxopt row it is compared with: the same method, comparison group and data
DIGITS_PAIRS = [
    ("magnitude, row", "magnitude, row", "both zero the same share of every output row"),
    ("magnitude, global", "magnitude, global, raw", "one threshold over the raw |W| of all layers (Han et al. 2015), as onnxsim's"),
    ("magnitude, global", "magnitude, global", "reference: onnxopt's default global threshold over LAMP-normalised scores"),
    ("wanda", "wanda", "Wanda's per-output comparison group (onnxopt's default for score=wanda), as onnxsim and the paper use"),
    ("wanda", "wanda, layer", "reference: one comparison group per layer, a different group"),
    ("sparsegpt", "obs + reconstruction", "SparseGPT's OBS saliency for the mask, then onnxopt's exact refit"),
    ("sparsegpt", "magnitude + reconstruction", "reference: onnxopt's default with calibration data"),
    ("structured L2", "structured L2, removed bias not folded", "data-free, the same method as onnxsim's"),
    ("structured L2", "structured L2", "reference: onnxopt's data-free default, the removed channels' bias folded into the next layer"),
    ("structured L2", "structured L2 + refit", "onnxopt's default with calibration data"),
]
NM_PAIRS = [("2:4 magnitude", "2:4 magnitude", True), ("2:4 wanda", "2:4 wanda", True),
            ("2:4 sparsegpt", "2:4 obs + reconstruction", True),
            ("2:4 sparsegpt", "2:4 + reconstruction", False)]  # False: a reference line (onnxopt's default)
BERT_PAIRS = [
    ("magnitude", "magnitude, row", "both zero the same share of every output row"),
    ("magnitude", "magnitude", "reference: onnxopt's default per-layer group"),
    ("wanda", "wanda", "Wanda's per-output comparison group (onnxopt's default for score=wanda)"),
    ("wanda", "wanda, layer", "reference: one comparison group per layer"),
    ("sparsegpt", "obs + reconstruction", "SparseGPT's OBS saliency for the mask, then onnxopt's exact refit"),
    ("sparsegpt", "magnitude + reconstruction", "reference: onnxopt's default with calibration data"),
]


def compare(sim: dict, opt: dict, skip=()) -> tuple[list, list]:
    """Points both have (sparsity > 0, onnxsim not declining) and those where onnxopt is lower."""
    points = [s for s in sim if s in opt and s and s not in skip and sim[s] is not None and opt[s] is not None]
    return points, [s for s in points if opt[s] < sim[s] - 1e-9]


def verdict(sim_label: str, opt_label: str, why: str, sim: dict, opt: dict, digits: int, skip=(),
            errors: tuple = ({}, {})) -> tuple[str, bool]:
    """One findings line; ``errors`` (onnxsim's, onnxopt's logit error by point) annotate the lower points."""
    points, lower = compare(sim, opt, skip)
    head = f"onnxsim {sim_label} vs onnxopt {opt_label} ({why}): "
    if not points:
        return head + "no comparable point" + (f" (onnxsim declined at {_pcts(skip)})" if skip else ""), True

    def err(s):
        e_sim, e_opt = errors[0].get(s), errors[1].get(s)
        return "" if e_sim is None or e_opt is None else f", logit error {e_opt:.3f} vs {e_sim:.3f}"

    if lower:
        body = "onnxopt LOWER at " + ", ".join(f"{_pct(s)} ({opt[s]:.{digits}f} vs {sim[s]:.{digits}f}{err(s)})"
                                               for s in lower)
    else:
        body = f"onnxopt >= onnxsim at every point ({_pcts(points)})"
    declined = [s for s in skip if s in opt and s]
    if declined:
        body += f"; onnxsim declined (weights unchanged) at {_pcts(declined)}"
    return head + body, not lower


def _pct(s) -> str:
    return f"{int(round(float(s) * 100))}%" if not isinstance(s, str) else s


def _pcts(points) -> str:
    return ", ".join(_pct(s) for s in sorted(points, key=lambda p: float(p) if not isinstance(p, str) else 0))


def findings(results: dict) -> list[tuple[str, bool, bool]]:
    """(line, onnxopt >= onnxsim, primary) for every onnxsim method and the onnxopt row it is compared with;
    primary: the like-for-like counterpart, not a reference line about a different comparison group."""
    out = []
    for name in ("digits_mlp", "digits_cnn"):
        t = results.get(name)
        if not t:
            continue
        rows = {(r["tool"], r["method"]): r for r in t["rows"] + t["structured"]}
        for sim_label, opt_label, why in DIGITS_PAIRS:
            sim, opt = rows.get(("onnxsim", sim_label)), rows.get(("onnxopt", opt_label))
            if sim and opt:
                line, ok = verdict(sim_label, opt_label, why.removeprefix("reference: "), sim["acc"], opt["acc"], 2,
                                   sim.get("unchanged", []),
                                   (sim.get("err", {}), opt.get("err", {})))
                out.append((f"{name}: {line}", ok, not why.startswith("reference")))
        nm = {(r["tool"], r["method"]): r["acc"] for r in t["nm"]}
        nm_err = {(r["tool"], r["method"]): r.get("err") for r in t["nm"]}
        for sim_label, opt_label, primary in NM_PAIRS:
            if ("onnxsim", sim_label) in nm and ("onnxopt", opt_label) in nm:
                line, ok = verdict(sim_label, opt_label, "2:4", {"2:4": nm[("onnxsim", sim_label)]},
                                   {"2:4": nm[("onnxopt", opt_label)]}, 2, (),
                                   ({"2:4": nm_err.get(("onnxsim", sim_label))},
                                    {"2:4": nm_err.get(("onnxopt", opt_label))}))
                out.append((f"{name}: {line}", ok, primary))
    b = results.get("bert") or {}
    if "rows" in b:
        rows = {(r["tool"], r["method"]): r["cos"] for r in b["rows"]}
        for sim_label, opt_label, why in BERT_PAIRS:
            if ("onnxsim", sim_label) in rows and ("onnxopt", opt_label) in rows:
                line, ok = verdict(sim_label, opt_label, why.removeprefix("reference: ") + ", output cosine",
                                   rows[("onnxsim", sim_label)],
                                   rows[("onnxopt", opt_label)], 4)
                out.append((f"bert: {line}", ok, not why.startswith("reference")))
        nm = {r["method"]: r["cos"] for r in b["nm"]}
        for sim_label, opt_label, primary in NM_PAIRS:
            sim_key = f"{sim_label}/onnxsim"
            opt_key = {"2:4 + reconstruction": "2:4 reconstruction"}.get(opt_label, opt_label) + "/onnxopt"
            if sim_key in nm and opt_key in nm:
                line, ok = verdict(sim_label, opt_key.split("/")[0], "2:4, output cosine", {"2:4": nm[sim_key]},
                                   {"2:4": nm[opt_key]}, 4)
                out.append((f"bert: {line}", ok, primary))
    by_model: dict = {}
    for r in results.get("structured") or []:
        if "error" not in r:
            by_model.setdefault(r["model"], {})["onnxsim" if r["method"].startswith("onnxsim") else "onnxopt"] = r
    for model, pair in by_model.items():
        if len(pair) != 2:
            continue
        sim, opt = pair["onnxsim"], pair["onnxopt"]
        if sim["params"][1] == sim["params"][0]:
            out.append((f"structured {model}: onnxsim apply_structured_pruning declined (parameters unchanged); "
                        f"onnxopt removed {1 - opt['params'][1] / opt['params'][0]:.0%} of the parameters at cosine "
                        f"{opt['cosine']:.4f}", True, True))
            continue
        ok = opt["cosine"] >= sim["cosine"] - 1e-12
        out.append((f"structured {model}: onnxsim apply_structured_pruning vs onnxopt structured L2 + refit: cosine "
                    f"{opt['cosine']:.4f} vs {sim['cosine']:.4f} at {opt['flops'][1] / opt['flops'][0]:.2f}x vs "
                    f"{sim['flops'][1] / sim['flops'][0]:.2f}x FLOPs: " + ("onnxopt >= onnxsim" if ok else "onnxopt LOWER"),
                    ok, True))
    return out


# ----------------------------------------------------------------- report

def fmt(v, digits=2):
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def render(results: dict, argv: list[str], seconds: float) -> str:
    mach = results["machine"]
    lines = [SECTION, "",
             "onnxopt's `prune` beside onnxsim 0.8.1's pruning functions, all measured in the same run by "
             "`tools/bench_prune.py` (method in its docstring). Post-training, no fine-tuning. onnxsim prunes "
             "every layer, so onnxopt runs with `keep_first_last=false` in the accuracy tables (its default keeps "
             "the first and last layers dense). *reconstruction* is the least-squares refit of the surviving "
             "weights, layer by layer on the inputs the already-pruned layers produce (`sequential`, the default); "
             "*one pass* refits every layer on the dense model's inputs; *global* is one LAMP threshold over all "
             "layers; *obs* masks by SparseGPT's OBS saliency w²/[(XᵀX+λI)⁻¹]_jj (per layer, or per output row "
             "where it says *row*) before the refit.", "",
             f"- Date: {results['date']}",
             f"- Machine: {mach['cpu']}, {mach['cores']} cores, {mach['os']}, Python {mach['python']}",
             f"- Command: `{' '.join(argv)}`",
             f"- Versions: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}",
             f"- Total benchmark time: {seconds:.0f} s", ""]
    sp = results["sparsities"]
    for name in ("digits_mlp", "digits_cnn"):
        t = results.get(name)
        if not t:
            continue
        lines += [f"### {name}: top-1 accuracy (%) against sparsity (dense {t['dense']:.2f}%)", "",
                  "| tool | method | " + " | ".join(f"{int(s * 100)}%" for s in sp) + " | highest within 1 pt |",
                  "|---|---|" + "---|" * len(sp) + "---|"]
        for row in t["rows"] + t["structured"]:
            cells = [fmt(row["acc"].get(s)) + (" (unchanged)" if s and s in row.get("unchanged", []) else "") for s in sp]
            lines.append(f"| {row['tool']} | {row['method']} | " + " | ".join(cells)
                         + " | " + ("—" if row["best"] is None else f"{int(row['best'] * 100)}%") + " |")
        lines += ["", "Sparsity is the share of all Conv/Gemm/MatMul weights zeroed or, structured, removed (the "
                  "producers' rows and the consumers' columns). onnxsim's structured `sparsity` is a share of "
                  "channels per layer: its row is run at the channel share (searched) that removes the nearest "
                  "share of weights. *(unchanged)*: the tool returned the weights as they were (it declined to "
                  "prune); such points do not count for *highest within 1 pt*. The *first/last layers dense* rows "
                  "are onnxopt's default (those layers' share goes to the others, each up to "
                  "`max_layer_sparsity=0.95`; where that cannot hold the request it prunes what it can); "
                  "the other onnxopt rows prune every layer, as onnxsim does. Every calibrated onnxopt row reads all "
                  "the calibration images (`samples=` their number), the same data as onnxsim's `num_samples`.",
                  "", "2:4 (50%): " + "; ".join(f"{r['tool']} {r['method']} {fmt(r['acc'])}" +
                                             (f" ({r['error']})" if r["error"] else "") for r in t["nm"]), ""]
        errs = {(r["tool"], r["method"]): sorted(set(r["errors"].values())) for r in t["rows"] + t["structured"]
                if r["errors"]}
        for (tool, method), msgs in errs.items():
            lines.append(f"- {tool} {method} failed: {msgs[0]}")
        if errs:
            lines.append("")
    b = results.get("bert")
    if b and "rows" in b:
        lines += ["### BERT-style export: output cosine against sparsity", "",
                  "| tool | method | " + " | ".join(f"{int(s * 100)}%" for s in results["bert_sparsities"]) + " |",
                  "|---|---|" + "---|" * len(results["bert_sparsities"])]
        for row in b["rows"]:
            lines.append(f"| {row['tool']} | {row['method']} | " +
                         " | ".join(fmt(row["cos"].get(s), 4) for s in results["bert_sparsities"]) + " |")
        lines += ["", "2:4: " + "; ".join(f"{r['method']} {fmt(r['cos'], 4)}" + (f" ({r['error']})" if r["error"] else "")
                                           for r in b["nm"]), ""]
    st = results.get("structured")
    if st:
        lines += ["### Structured: parameters, FLOPs, latency", "",
                  "| model | method | params | FLOPs | ORT latency ms (1 thread, median) | cosine | skipped |",
                  "|---|---|---|---|---|---|---|"]
        for r in st:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['method']} | — | — | — | — | {r['error']} |")
                continue
            p, f, l = r["params"], r["flops"], r["latency_ms"]
            lines.append(f"| {r['model']} | {r['method']} ({int(r['sparsity'] * 100)}%) | {p[0]:,} → {p[1]:,} | "
                         f"{f[0] / 1e6:.1f}M → {f[1] / 1e6:.1f}M ({f[1] / max(f[0], 1):.2f}x) | "
                         f"{l[0]:.2f} → {l[1]:.2f} ({l[1] / max(l[0], 1e-9):.2f}x) | {r['cosine']:.4f} | "
                         f"{', '.join(f'{k[8:]} {v}' for k, v in r['skips'].items()) or '—'} |")
        lines.append("")
    found = results.get("findings") or []
    if found:
        lines += ["### onnxopt against its onnxsim counterpart", "",
                  "Each onnxsim method beside the onnxopt row it is compared with (same method and comparison group "
                  "where onnxopt has one), at every sparsity both measured; points where onnxsim declined to prune "
                  "are left out.", ""]
        lines += [f"- {('ok' if ok else 'MISS') if primary else 'reference'}: {line}" for line, ok, primary in found]
        primaries = [ok for _, ok, primary in found if primary]
        misses = primaries.count(False)
        lines += ["", f"{len(primaries) - misses} of {len(primaries)} like-for-like comparisons: onnxopt >= onnxsim "
                  "at every point" + (f"; {misses} with a point where onnxopt is lower (logit error: relative "
                                      "L2 distance of the logits from the dense model's on the test images)."
                                      if misses else ".") +
                  " *reference* lines compare onnxsim with an onnxopt row of a different comparison group.", ""]
    lines += ["Notes:", "",
              "- Storage: unstructured zeros do not shrink a dense file. `prune` writes a pruned tensor as a "
              "`Constant` with a COO `sparse_value` (int64 indices, the only form onnx.checker accepts) only where "
              "that is smaller (above ~67% sparsity at fp32), and reports dense, written and gzip bytes. ONNX "
              "Runtime densifies sparse constants at load: no memory or speed gain on CPU from unstructured or 2:4 "
              "sparsity; structured pruning is what makes the model faster.", ""]
    for r in results.get("structured") or []:
        if "error" not in r and r["latency_ms"][1] / r["latency_ms"][0] > r["flops"][1] / max(r["flops"][0], 1) + 0.15:
            lines.append(f"- {r['model']} ({r['method']}): latency fell less than FLOPs "
                         f"({r['latency_ms'][1] / r['latency_ms'][0]:.2f}x vs {r['flops'][1] / r['flops'][0]:.2f}x).")
    rows = {(r["tool"], r["method"]): r["cos"] for r in (results.get("bert") or {}).get("rows", [])}
    if rows.get(("onnxsim", "wanda")) and rows.get(("onnxsim", "wanda")) == rows.get(("onnxsim", "magnitude")):
        lines.append("- onnxsim's apply_wanda_pruning gave the same cosines as its magnitude pruning on the BERT "
                     "export, with the calibration batches passed as `calibration_data`: it reads activation norms "
                     "of MatMul/Gemm inputs of rank 2 only and falls back to magnitude for the rank-3 "
                     "[batch, seq, hidden] inputs of a transformer (as its docstring says).")
    lines.append("")
    for note in results.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines).rstrip() + "\n"


def versions() -> dict:
    from importlib import metadata
    out = {}
    for pkg in ("onnxopt", "onnxsim", "onnx", "onnxruntime", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="BENCHMARKS.md to update (this script's section only)")
    parser.add_argument("--json", type=Path, help="raw results")
    parser.add_argument("--only", default="digits_mlp,digits_cnn,bert,structured")
    parser.add_argument("--quick", action="store_true", help="fewer sparsities (0, 50, 80, 90%%)")
    parser.add_argument("--runs", type=int, default=20, help="latency runs")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    only = set(args.only.split(","))
    sparsities = [0.0, 0.5, 0.8, 0.9] if args.quick else SPARSITIES
    results = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "machine": machine(), "versions": versions(), "sparsities": sparsities,
               "bert_sparsities": [0.3, 0.5, 0.7]}
    log = lambda msg: print(msg, flush=True)
    import onnxsim
    missing = [f for f in ("apply_magnitude_pruning", "apply_wanda_pruning", "apply_sparsegpt_pruning",
                           "apply_structured_pruning") if not hasattr(onnxsim, f)]
    if missing:
        results["notes"] = [f"onnxsim {versions()['onnxsim']} does not expose {', '.join(missing)}"]
    for name in ("digits_mlp", "digits_cnn"):
        if name in only:
            results[name] = bench_digits(name, sparsities, log)
    if "bert" in only:
        results["bert"] = bench_bert(results["bert_sparsities"], log)
    if "structured" in only:
        results["structured"] = bench_structured(log, args.runs)
    results["findings"] = findings(results)
    for line, ok, primary in results["findings"]:
        log(f"{('ok  ' if ok else 'MISS') if primary else 'ref '} {line}")
    seconds = time.perf_counter() - start
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    section = render(results, ["/work/venv-bench/bin/python", "tools/bench_prune.py", *(argv or sys.argv[1:])],
                     seconds)
    if args.out:
        write_section(args.out, SECTION, section)
    else:
        print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
