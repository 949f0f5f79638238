"""Benchmark compression of decoder LMs with KV cache: perplexity, greedy-decode speed, size, memory.

Run (from the repo root, in the bench venv, which has ORT's matmul_nbits_quantizer and its onnx-ir):

    PYTHONPATH=. /work/venv-bench/bin/python tools/bench_lm.py [--out BENCHMARKS.md] [--json FILE]
        [--models lm,gpt2] [--only SUBSTR,...] [--only-gpt2 SUBSTR,...] [--threads 1] [--runs 5] [--prompt 64] [--new 33]
        [--ort-python /work/wt/lm-venv/bin/python]

Models (made by tools/train_lm.py, kept outside the repo):
  lm    ~/.cache/onnxopt/lm/small/model.onnx: the byte-level GPT trained on Python's standard
        library (6 layers, width 256, context 256); held-out text model.heldout.bin, calibration
        model.calib.npz (64 training-split windows of 256 bytes, empty past).
  gpt2  ~/.cache/onnxopt/lm/gpt2-small/model.onnx: GPT-2-small-sized (12 x 768, vocab 50257,
        context 1024, untied output projection) with random weights; calibration: 16 windows of
        64 random token ids (seed 1). No perplexity (its weights are random).

Each compressed model is made in a subprocess, timed, with its peak RSS (VmHWM of that process,
read by a small wrapper as it exits; a fork's ru_maxrss would count the benchmark's own pages):
  onnxopt  python -m onnxopt optimize MODEL -o OUT --passes SPEC --calib CALIB --no-validate
           (this script measures the quality itself, so the validation sessions are left out
           of the time and memory)
  ORT      (run by --ort-python: its GPTQ and HQQ configs import torch, which the bench venv lacks)
           onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer at the same
           bits and block size (32, asymmetric): DefaultWeightOnlyQuantConfig (blockwise RTN in
           MLAS), RTNWeightOnlyQuantConfig, GPTQWeightOnlyQuantConfig (same calibration windows,
           one at a time) and HQQWeightOnlyQuantConfig; MatMul weights only (its default op types).
A pass that this checkout does not have (woq, qdq's mode option) gives a "not available" row; a
compression running past --timeout seconds is killed and reported. `prune` reads 16 calibration
windows (4096 rows, `samples=16`): its sequential least-squares refit over all 64 did not finish in
8 minutes on the shared 2-core machine. --only-gpt2 limits the configurations run on gpt2.

Measures, ORT CPU, all graph optimizations, --threads intra-op threads:
  perplexity  exp(mean next-byte cross-entropy) over --windows non-overlapping held-out windows
              of context+1 bytes, each run as one full sequence (no KV cache, empty past);
              bits per byte = mean loss / ln 2.
  decode      batch 1 with KV cache: a prefill of --prompt tokens (the held-out text's start;
              gpt2: random ids), then --new greedy steps of one token each feeding back
              present.* as past_key_values.*; median over --runs runs after one warm-up of the
              prefill time and of the decode loop's time (tokens/s = new / median seconds).
              "greedy = fp32" counts the leading generated tokens equal to fp32's.
  size        the output's bytes on disk (external data included).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import machine, write_section

SECTION = "## Decoder LM: weight-only quantization, dynamic qdq, 2:4 pruning, svd (perplexity, decode speed)"
CACHE = Path(os.path.expanduser("~/.cache/onnxopt/lm"))
BLOCK = 32

# (label, tool, spec): tool "onnxopt" runs `onnxopt optimize --passes spec`; "ort" runs the ORT quantizer
CONFIGS = [
    ("fp32", "none", ""),
    ("woq(bits=8)", "onnxopt", f"woq(bits=8,block_size={BLOCK})"),
    ("ORT nbits default bits=8", "ort", "default,8"),
    ("woq(bits=4,algo=rtn)", "onnxopt", f"woq(bits=4,algo=rtn,block_size={BLOCK})"),
    ("woq(bits=4,algo=gptq)", "onnxopt", f"woq(bits=4,algo=gptq,block_size={BLOCK})"),
    ("woq(bits=4,algo=hqq)", "onnxopt", f"woq(bits=4,algo=hqq,block_size={BLOCK})"),
    # the anchor quantizes MatMul weights only: the same scope, embedding tables left float
    ("woq(bits=4,algo=rtn,embeddings=false)", "onnxopt", f"woq(bits=4,algo=rtn,block_size={BLOCK},embeddings=false)"),
    ("woq(bits=4,algo=gptq,embeddings=false)", "onnxopt", f"woq(bits=4,algo=gptq,block_size={BLOCK},embeddings=false)"),
    ("ORT nbits default bits=4 (RTN)", "ort", "default,4"),
    ("ORT nbits RTN bits=4", "ort", "rtn,4"),
    ("ORT nbits GPTQ bits=4", "ort", "gptq,4"),
    ("ORT nbits HQQ bits=4", "ort", "hqq,4"),
    ("qdq(mode=dynamic)", "onnxopt", "qdq(mode=dynamic)"),
    ("prune(pattern=2:4,reconstruct=true,samples=16)", "onnxopt", "prune(pattern=2:4,reconstruct=true,samples=16)"),
    ("svd(aware=true)", "onnxopt", "svd(aware=true)"),
]

ORT_QUANTIZE = r"""
import sys, numpy as np, onnx
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.quantization import matmul_nbits_quantizer as mq
src, dst, algo, bits, block, calib = sys.argv[1:7]
bits, block = int(bits), int(block)

class Reader(CalibrationDataReader):
    def __init__(self):
        data = np.load(calib)
        arrays = {k: data[k] for k in data.files}
        n = len(arrays["input_ids"])
        self.feeds = [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(n)]
        self.it = iter(self.feeds)
    def get_next(self):
        return next(self.it, None)
    def rewind(self):
        self.it = iter(self.feeds)

if algo == "default":
    cfg = mq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, bits=bits)
elif algo == "rtn":
    cfg = mq.RTNWeightOnlyQuantConfig()
elif algo == "gptq":
    cfg = mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader())
else:
    cfg = mq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
q = mq.MatMulNBitsQuantizer(src, bits=bits, block_size=block, is_symmetric=False, algo_config=cfg)
q.process()
q.model.save_model_to_file(dst, use_external_data_format=False)
"""


# Runs a module or script in this process and, at exit, writes its own peak RSS (VmHWM, KiB) to
# $BENCH_LM_PEAK. The kernel's ru_maxrss for a child is no good here: a forked child starts with
# the parent's resident pages (the benchmark's ORT sessions) counted in its high-water mark.
PEAK_WRAPPER = r"""
import atexit, os, re, runpy, sys
def _peak():
    with open("/proc/self/status") as f:
        kib = re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)
    with open(os.environ["BENCH_LM_PEAK"], "w") as f:
        f.write(kib)
atexit.register(_peak)
kind, target = sys.argv[1], sys.argv[2]
sys.argv = [target, *sys.argv[3:]]
if kind == "module":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    exec(compile(open(target).read(), target, "exec"), {"__name__": "__main__"})
"""


# ----------------------------------------------------------------- models and data

def lm_config(model_path: Path) -> dict:
    """Layers, heads, head_dim, vocab and context from the graph (and train_lm's metadata)."""
    model = onnx.load(str(model_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    cfg = json.loads(meta.get("onnxopt.lm_config", "{}"))
    past = [vi for vi in model.graph.input if vi.name.startswith("past_key_values.")]
    dims = [d.dim_value for d in past[0].type.tensor_type.shape.dim]
    logits = next(vi for vi in model.graph.output if vi.name == "logits")
    return {"past": [vi.name for vi in past], "heads": dims[1], "head_dim": dims[3],
            "vocab": logits.type.tensor_type.shape.dim[2].dim_value or cfg.get("vocab"),
            "context": cfg.get("context", 256)}


def feed(cfg: dict, ids: np.ndarray, past: list[np.ndarray] | None = None) -> dict:
    b, s = ids.shape
    plen = 0 if past is None else past[0].shape[2]
    out = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, plen + s), np.int64),
           "position_ids": np.broadcast_to(np.arange(plen, plen + s), (b, s)).astype(np.int64)}
    for i, name in enumerate(cfg["past"]):
        out[name] = np.zeros((b, cfg["heads"], 0, cfg["head_dim"]), np.float32) if past is None else past[i]
    return out


def random_calib(cfg: dict, path: Path, windows: int = 16, length: int = 64) -> Path:
    ids = np.random.default_rng(1).integers(0, cfg["vocab"], size=(windows, length))
    np.savez(path, **feed(cfg, ids))
    return path


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------- compression

def available_passes() -> str:
    """`onnxopt passes` of this checkout (what the subprocesses will run)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "onnxopt", "passes"], env=env, capture_output=True, check=False,
                          text=True, cwd=REPO).stdout


def missing(tool: str, spec: str, passes: str) -> str | None:
    """Why this checkout cannot run an onnxopt spec (its pass or one of its options is absent), or None."""
    if tool != "onnxopt":
        return None
    name = spec.split("(")[0]
    block = _pass_block(passes, name)
    if block is None:
        return f"pass `{name}` not in this checkout"
    keys = [item.split("=")[0].strip() for item in spec[len(name) + 1:-1].split(",") if "=" in item]
    absent = [k for k in keys if not any(line.startswith(f"    {k} = ") for line in block)]
    return f"`{name}` has no option {', '.join(absent)} in this checkout" if absent else None


def _pass_block(passes: str, name: str) -> list[str] | None:
    """The option lines of pass `name` in `onnxopt passes` output, None when it is not listed."""
    lines = passes.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f"{name} (")), None)
    if start is None:
        return None
    end = next((j for j in range(start + 1, len(lines)) if not lines[j].startswith(" ")), len(lines))
    return lines[start + 1:end]


def run_measured(cmd: list[str], log_path: Path, timeout: float) -> dict:
    """Run cmd; seconds, exit code and its peak RSS (written by PEAK_WRAPPER). Killed after `timeout` s."""
    peak_file = log_path.with_suffix(".peak")
    peak_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", BENCH_LM_PEAK=str(peak_file))
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        while True:
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                proc.kill()
                _, status, _ = os.wait4(proc.pid, 0)
                log.write(f"\ntimed out after {timeout:.0f} s\n")
                break
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak = int(peak_file.read_text()) / 1024 if peak_file.exists() else None
    return {"seconds": time.perf_counter() - start, "rc": proc.returncode, "peak_rss_mib": peak,
            "log_tail": log_path.read_text(errors="replace").strip().splitlines()[-3:]}


def compress(tool: str, spec: str, src: Path, dst: Path, calib: Path, ort_python: str,
             timeout: float) -> tuple[dict, list[str]]:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if tool == "onnxopt":
        args = ["optimize", str(src), "-o", str(dst), "--passes", spec, "--calib", str(calib), "--no-validate",
                "--max-growth", "none"]
        shown = [sys.executable, "-m", "onnxopt", *args]
        cmd = [sys.executable, "-c", PEAK_WRAPPER, "module", "onnxopt", *args]
    else:
        algo, bits = spec.split(",")
        script = dst.parent / "ort_quantize.py"
        script.write_text(ORT_QUANTIZE)
        args = [str(src), str(dst), algo, bits, str(BLOCK), str(calib)]
        shown = [ort_python, "ORT_QUANTIZE", *args]
        cmd = [ort_python, "-c", PEAK_WRAPPER, "script", str(script), *args]
    return run_measured(cmd, dst.with_suffix(".log"), timeout), shown


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix != ".log" and p.is_file())


# ----------------------------------------------------------------- quality and speed

def perplexity(path: Path, cfg: dict, held: np.ndarray, windows: int, threads: int) -> dict:
    length = cfg["context"] + 1
    n = min(windows, held.size // length)
    win = held[: n * length].reshape(n, length).astype(np.int64)
    sess = session(path, threads)
    total = 0.0
    for chunk in np.array_split(win, max(1, n // 16)):
        logits = sess.run(["logits"], feed(cfg, chunk[:, :-1]))[0].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= np.take_along_axis(logp, chunk[:, 1:, None], -1).sum()
    loss = total / (n * (length - 1))
    return {"perplexity": math.exp(loss), "bits_per_byte": loss / math.log(2), "windows": n,
            "tokens": n * (length - 1)}


def decode(path: Path, cfg: dict, prompt: np.ndarray, new: int, runs: int, threads: int) -> dict:
    sess = session(path, threads)
    outputs = ["logits"] + [n.replace("past_key_values.", "present.") for n in cfg["past"]]
    prefill, steps, tokens = [], [], None
    for r in range(runs + 1):
        t0 = time.perf_counter()
        out = sess.run(outputs, feed(cfg, prompt[None, :]))
        t1 = time.perf_counter()
        generated = [int(out[0][0, -1].argmax())]
        for _ in range(new - 1):
            out = sess.run(outputs, feed(cfg, np.array([[generated[-1]]]), out[1:]))
            generated.append(int(out[0][0, -1].argmax()))
        t2 = time.perf_counter()
        if r:  # the first run warms up
            prefill.append(t1 - t0)
            steps.append(t2 - t1)
        tokens = generated
    # new tokens: the first comes from the prefill's logits, the other new-1 from decode steps
    return {"prefill_ms": 1000 * float(np.median(prefill)), "decode_tok_s": (new - 1) / float(np.median(steps)),
            "tokens": tokens}


# ----------------------------------------------------------------- one model

def bench_model(name: str, path: Path, args, passes: str, log) -> dict:
    cfg = lm_config(path)
    work = Path(args.work) / name
    work.mkdir(parents=True, exist_ok=True)
    trained = (path.parent / "model.heldout.bin").exists()
    calib = path.parent / "model.calib.npz" if trained else random_calib(cfg, work / "calib.npz")
    held = np.frombuffer((path.parent / "model.heldout.bin").read_bytes(), np.uint8) if trained else None
    prompt = held[: args.prompt].astype(np.int64) if trained else \
        np.random.default_rng(3).integers(0, cfg["vocab"], size=args.prompt)
    chosen = args.only_gpt2 if name == "gpt2" and args.only_gpt2 else args.only
    only = [s.strip() for s in chosen.split(",")] if chosen else None
    rows, ref_tokens = [], None
    for label, tool, spec in CONFIGS:
        if only and label != "fp32" and not any(s in label for s in only):
            continue
        row = {"label": label, "tool": tool, "spec": spec}
        why = missing(tool, spec, passes)
        if why:
            row["status"] = f"not available ({why})"
            log(f"{name}: {label}: {row['status']}")
            rows.append(row)
            continue
        if tool == "none":
            out = path
        else:
            out = work / label.replace(" ", "_").replace("(", "_").replace(")", "").replace(",", "_").replace("=", "") \
                .replace(":", "-") / "model.onnx"
            res, cmd = compress(tool, spec, path, out, calib, args.ort_python, args.timeout)
            row.update(res, command=" ".join(cmd))
            if res["rc"] != 0 or not out.exists():
                row["status"] = f"failed (exit {res['rc']}): " + (res["log_tail"] or [""])[-1].strip()[-200:]
                log(f"{name}: {label}: {row['status']}")
                rows.append(row)
                continue
        row["status"] = "ok"
        row["bytes"] = path.stat().st_size if tool == "none" else disk_bytes(out.parent)
        try:
            if trained:
                row.update(perplexity(out, cfg, held, args.windows, args.threads))
            row.update(decode(out, cfg, prompt, args.new, args.runs, args.threads))
        except Exception as exc:  # a compressed model ORT cannot run is a result, not a crash
            row["status"] = f"ORT failed: {str(exc).splitlines()[0][:200]}"
        if tool == "none":
            ref_tokens = row.get("tokens")
        if ref_tokens and row.get("tokens"):
            same = next((i for i, (a, b) in enumerate(zip(ref_tokens, row["tokens"])) if a != b), len(ref_tokens))
            row["greedy_same"] = same
        log(f"{name}: {label}: " + ", ".join(f"{k} {row[k]:.4g}" for k in
                                           ("perplexity", "bytes", "prefill_ms", "decode_tok_s", "seconds",
                                            "peak_rss_mib") if isinstance(row.get(k), (int, float))))
        rows.append(row)
    return {"model": name, "path": str(path), "config": {k: v for k, v in cfg.items() if k != "past"},
            "layers": len(cfg["past"]) // 2, "trained": trained, "calib": str(calib), "rows": rows}


# ----------------------------------------------------------------- report

def _f(x, fmt: str) -> str:
    return "-" if x is None else fmt.format(x)


def table(result: dict) -> list[str]:
    rows = result["rows"]
    base = rows[0] if rows and rows[0]["label"] == "fp32" else {}
    trained = result["trained"]
    head = ("| config | tool | " + ("held-out ppl | bits/byte | ppl vs fp32 | " if trained else "")
            + "file MiB | vs fp32 | prefill ms | decode tok/s | vs fp32 | greedy = fp32 | compress s | peak RSS MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [f"`{r['label']}`" if r["tool"] == "onnxopt" else r["label"], r["tool"]]
        if r["status"] != "ok":
            lines.append("| " + " | ".join(cells) + f" | {r['status']} |" + " |" * (head.count("|") - 4))
            continue
        if trained:
            rel = r["perplexity"] / base["perplexity"] - 1 if base.get("perplexity") else None
            cells += [f"{r['perplexity']:.4f}", f"{r['bits_per_byte']:.4f}", _f(rel, "{:+.2%}")]
        cells += [f"{r['bytes'] / 2**20:.2f}", _f(r["bytes"] / base["bytes"] if base.get("bytes") else None, "{:.3f}x"),
                  _f(r.get("prefill_ms"), "{:.1f}"), _f(r.get("decode_tok_s"), "{:.1f}"),
                  _f(r["decode_tok_s"] / base["decode_tok_s"] if base.get("decode_tok_s") and r.get("decode_tok_s")
                     else None, "{:.2f}x"),
                  _f(r.get("greedy_same"), "{}") + (f"/{len(r['tokens'])}" if r.get("tokens") else ""),
                  _f(r.get("seconds"), "{:.1f}"), _f(r.get("peak_rss_mib"), "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(results: list[dict], meta: dict, args) -> str:
    m = meta["machine"]
    lines = [SECTION, "",
             "Decoder LMs with a KV cache (`input_ids`, `attention_mask`, `position_ids`, `past_key_values.*` in; "
             "`logits`, `present.*` out), made by `tools/train_lm.py`, compressed by onnxopt passes and by ONNX "
             "Runtime's `matmul_nbits_quantizer`, generated by `tools/bench_lm.py` (method in its docstring).", "",
             f"- Date: {meta['date']}",
             f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, {m['os']}, Python {m['python']}",
             f"- Versions: {meta['versions']}",
             f"- Command: `{meta['command']}`",
             f"- Total time {meta['seconds']:.0f} s; 1-minute load average {meta['load'][0]:.1f} at the start, "
             f"{meta['load'][1]:.1f} at the end (other work shared the machine: speeds are indicative, "
             "perplexities and sizes are not affected)",
             f"- ORT sessions: CPU, all graph optimizations, {args.threads} intra-op thread(s). Perplexity: "
             f"{args.windows} held-out windows of context+1 bytes, each one full sequence (no KV cache). "
             f"Decode: batch 1, prefill of {args.prompt} tokens, then {args.new} greedy tokens through the KV "
             f"cache; medians of {args.runs} runs after a warm-up. Block size {BLOCK}, asymmetric, for every "
             "4/8-bit row; ORT's quantizer leaves Gather (embeddings) in float, `woq` quantizes them too "
             "(its `embeddings=true` default).", ""]
    for res in results:
        c = res["config"]
        lines += [f"### {res['model']}: {res['layers']} layers, {c['heads']} heads x {c['head_dim']}, vocab "
                  f"{c['vocab']}" + (" (trained)" if res["trained"] else " (random weights)"), "",
                  f"Model `{res['path']}`; calibration `{res['calib']}`.", ""]
        lines += table(res)
        skipped = [label for label, _, _ in CONFIGS if label not in {r["label"] for r in res["rows"]}]
        if skipped:
            lines += ["", "Not run on this model in this run (`--only`): " + ", ".join(skipped) + "."]
        cmds = [f"- {r['label']}: `{r['command']}`" for r in res["rows"] if r.get("command")]
        if cmds:
            lines += ["", "Compression commands (ORT_QUANTIZE is the quantizer script in bench_lm.py):", ""] + cmds
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lm,gpt2", help="lm (trained, cache small/) and/or gpt2 (cache gpt2-small/)")
    ap.add_argument("--cache", default=str(CACHE))
    ap.add_argument("--work", default="/tmp/bench_lm", help="where compressed models are written")
    ap.add_argument("--only", default=None, help="comma-separated substrings of config labels (fp32 always runs)")
    ap.add_argument("--only-gpt2", default=None, help="like --only, for the gpt2 model (its compressions are slow)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900, help="seconds one compression may take")
    ap.add_argument("--ort-python", default=sys.executable,
                    help="interpreter for ORT's quantizer (its GPTQ and HQQ import torch; needs onnx-ir too)")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=33)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=None, help="BENCHMARKS.md to update (this script's section only)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    passes = available_passes()
    folders = {"lm": "small", "gpt2": "gpt2-small"}
    results = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        path = Path(args.cache) / folders[name] / "model.onnx"
        if not path.exists():
            log(f"{name}: {path} not found (make it with tools/train_lm.py), skipped")
            continue
        results.append(bench_model(name, path, args, passes, log))
    import importlib.metadata as md
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "versions": ", ".join(f"{p} {md.version(p)}" for p in ("onnx", "onnxruntime", "numpy")),
            "command": "PYTHONPATH=. " + " ".join([sys.executable, "tools/bench_lm.py", *(argv or sys.argv[1:])]),
            "seconds": time.perf_counter() - start, "load": (load0, os.getloadavg()[0])}
    text = render(results, meta, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "meta": meta}, indent=1, default=str))
    if args.out:
        write_section(Path(args.out), SECTION, text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
