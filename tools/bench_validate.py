"""Benchmark a default `onnxopt optimize` run on a large model: peak RSS and wall time.

Builds a BERT-like encoder with random weights from plain onnx.helper (no torch): token and
position embeddings, N layers of LayerNorm, Q/K/V/out projections, softmax attention and an
erf-GELU FFN, with an inference Dropout and an Identity per layer so `cleanup` has work to
do. Hidden 768, FFN 3072, vocabulary 30522, 6 layers: ~260 MB of float32 weights.

Run (from the repo root; --checkout runs another onnxopt source tree, e.g. an older commit
unpacked with `git archive COMMIT | tar -x -C /tmp/before`):

    /work/venv/bin/python tools/bench_validate.py [--layers 6] [--samples 8] [--seq 128]
        [--checkout .] [--label after] [--work /tmp/bench-validate] [--out BENCHMARKS.md]

Method. The model and `inputs.npz` (int64 token ids, --samples rows of --seq tokens, batch
axis symbolic) are written to --work once (kept; rebuilt only when the options change).
Each run is a fresh subprocess: `python -m onnxopt optimize model.onnx --inputs inputs.npz
-o out.onnx --report report.json` with the checkout on PYTHONPATH and nothing else set (the
default pipeline `cleanup`, default validation and latency settings). Peak RSS is the child's
VmHWM at exit (its high-water mark since exec; read by a small wrapper around onnxopt's CLI
entry point so that it reflects onnxopt alone), wall time is measured by the parent around
the whole child. The table row for a label replaces an earlier row of the same label, so a
`before` run on the old commit and an `after` run on this one end up side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import machine, write_section  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Validation on a large model"

WRAPPER = r"""
import re, sys
from pathlib import Path
from onnxopt.cli import main
try:
    code = main(sys.argv[2:])
finally:
    hwm = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    Path(sys.argv[1]).write_text(hwm.group(1) if hwm else "")
sys.exit(code)
"""


# ------------------------------------------------------------------- the model

def build_model(layers: int, hidden: int = 768, ffn: int = 3072, heads: int = 12, vocab: int = 30522,
                max_len: int = 512, seed: int = 0):
    """A BERT-like encoder: input_ids [batch, seq] -> hidden states [batch, seq, hidden]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def weight(name: str, *shape: int, scale: float = 0.02) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def layer_norm(x: str, name: str) -> str:
        return node("LayerNormalization", [x, const(f"{name}.g", np.ones(hidden, np.float32)),
                                           const(f"{name}.b", np.zeros(hidden, np.float32))],
                    f"{name}.out", axis=-1, epsilon=1e-12)

    def linear(x: str, name: str, n_in: int, n_out: int) -> str:
        y = node("MatMul", [x, weight(f"{name}.w", n_in, n_out)], f"{name}.mm")
        return node("Add", [y, weight(f"{name}.b", n_out)], f"{name}.out")

    dh = hidden // heads
    split_shape = const("split_shape", np.array([0, 0, heads, dh], np.int64))
    merge_shape = const("merge_shape", np.array([0, 0, hidden], np.int64))
    scale = const("attn_scale", np.array(1.0 / np.sqrt(dh), np.float32))
    half, one = const("half", np.array(0.5, np.float32)), const("one", np.array(1.0, np.float32))
    rsqrt2 = const("rsqrt2", np.array(1 / np.sqrt(2), np.float32))

    tok = node("Gather", [weight("tok_emb", vocab, hidden), "input_ids"], "tok")
    shape = node("Shape", ["input_ids"], "ids_shape")
    seq = node("Slice", [shape, const("one_i", np.array([1], np.int64)), const("two_i", np.array([2], np.int64))], "seq")
    pos = node("Slice", [weight("pos_emb", max_len, hidden), const("zero_i", np.array([0], np.int64)), seq], "pos")
    x = layer_norm(node("Add", [tok, pos], "emb"), "emb_ln")
    for i in range(layers):
        p = f"l{i}"
        x = node("Identity", [x], f"{p}.in")

        def heads_of(t: str, perm: list[int], name: str) -> str:
            return node("Transpose", [node("Reshape", [t, split_shape], f"{name}.r")], f"{name}.t", perm=perm)

        q = heads_of(linear(x, f"{p}.q", hidden, hidden), [0, 2, 1, 3], f"{p}.qh")
        k = heads_of(linear(x, f"{p}.k", hidden, hidden), [0, 2, 3, 1], f"{p}.kh")
        v = heads_of(linear(x, f"{p}.v", hidden, hidden), [0, 2, 1, 3], f"{p}.vh")
        scores = node("Mul", [node("MatMul", [q, k], f"{p}.qk"), scale], f"{p}.scores")
        probs = node("Softmax", [scores], f"{p}.probs", axis=-1)
        ctx = node("MatMul", [probs, v], f"{p}.ctx")
        ctx = node("Reshape", [node("Transpose", [ctx], f"{p}.ctx.t", perm=[0, 2, 1, 3]), merge_shape], f"{p}.ctx.r")
        attn = linear(ctx, f"{p}.o", hidden, hidden)
        attn = node("Dropout", [attn], f"{p}.drop")
        x = layer_norm(node("Add", [x, attn], f"{p}.res1"), f"{p}.ln1")
        h = linear(x, f"{p}.f1", hidden, ffn)
        gelu = node("Mul", [node("Mul", [h, half], f"{p}.g0"),
                            node("Add", [node("Erf", [node("Mul", [h, rsqrt2], f"{p}.g1")], f"{p}.g2"), one], f"{p}.g3")],
                    f"{p}.gelu")
        x = layer_norm(node("Add", [x, linear(gelu, f"{p}.f2", ffn, hidden)], f"{p}.res2"), f"{p}.ln2")
    nodes.append(helper.make_node("Identity", [x], ["hidden"], name="hidden"))
    graph = helper.make_graph(
        nodes, "bert_like", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def prepare(work: Path, layers: int, samples: int, seq: int) -> tuple[Path, Path]:
    import onnx

    work.mkdir(parents=True, exist_ok=True)
    tag = f"l{layers}"
    model_path, inputs_path = work / f"bert_{tag}.onnx", work / f"bert_{tag}.s{samples}x{seq}.npz"
    if not model_path.exists():
        onnx.save(build_model(layers), str(model_path))
    if not inputs_path.exists():
        ids = np.random.default_rng(1).integers(0, 30522, (samples, seq)).astype(np.int64)
        np.savez(inputs_path, input_ids=ids)
    return model_path, inputs_path


# ------------------------------------------------------------------- measuring

def run_once(python: str, checkout: Path, model: Path, inputs: Path, work: Path) -> dict:
    hwm_path, report = work / "hwm.txt", work / "report.json"
    hwm_path.unlink(missing_ok=True)
    cmd = [python, "-c", WRAPPER, str(hwm_path), "optimize", str(model), "--inputs", str(inputs),
           "-o", str(work / "out.onnx"), "--report", str(report)]
    env = dict(os.environ, PYTHONPATH=str(checkout))
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=str(work), capture_output=True, text=True)
    wall = time.perf_counter() - start
    row = {"exit": proc.returncode, "wall_s": wall, "tail": (proc.stdout + proc.stderr).strip().splitlines()[-12:]}
    text = hwm_path.read_text() if hwm_path.exists() else ""
    row["peak_rss_mib"] = int(text) / 1024 if text else None
    if report.exists():
        validation = json.loads(report.read_text()).get("validation") or {}
        row["passed"] = validation.get("passed")
        row["latency_runs"] = validation.get("latency_runs")
    return row


def section(rows: dict[str, dict], model_mib: float, args: argparse.Namespace) -> str:
    m = machine()
    lines = [SECTION, "",
             f"A BERT-like encoder built by `tools/bench_validate.py` ({args.layers} layers, hidden 768, random "
             f"weights, {model_mib:.0f} MiB file), validated on {args.samples} samples of {args.seq} tokens: "
             "`onnxopt optimize model.onnx --inputs inputs.npz -o out.onnx` with every other setting at its "
             "default (pipeline `cleanup`). Peak RSS is the child's VmHWM; wall time is the whole process; "
             "load avg is the machine's 1-minute load average after the runs (the machine is shared: wall "
             "times are only comparable at similar load).",
             "", f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}; Python {m['python']}.", "",
             "| onnxopt | exit | wall s (median) | peak RSS MiB (max) | RSS / file | latency runs | load avg |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for label, r in rows.items():
        rss = r.get("peak_rss_mib")
        runs = " / ".join(map(str, r["latency_runs"])) if r.get("latency_runs") else "20 / 20 (fixed)"
        lines.append(f"| {label} | {r['exit']} | {r['wall_s']:.1f} | {rss:.0f} | {rss / model_mib:.2f}x | "
                     f"{runs} | {r.get('load', 0):.1f} |" if rss else
                     f"| {label} | {r['exit']} | {r['wall_s']:.1f} | - | - | - | - |")
    lines += ["", "Reproduce: `git archive <old commit> | tar -x -C /tmp/before`, then "
              f"`python tools/bench_validate.py --layers {args.layers} --samples {args.samples} --seq {args.seq} "
              "--checkout /tmp/before --label before`, and the same with `--checkout . --label after`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=1, help="runs; the median wall time and the largest peak RSS")
    parser.add_argument("--checkout", type=Path, default=REPO, help="onnxopt source tree to run")
    parser.add_argument("--label", default="after", help="row label in the table")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-validate"))
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="BENCHMARKS.md to update ('': none)")
    parser.add_argument("--json", type=Path, default=None, help="rows so far (default: WORK/rows.json)")
    args = parser.parse_args(argv)

    model, inputs = prepare(args.work, args.layers, args.samples, args.seq)
    model_mib = model.stat().st_size / 2**20
    runs = [run_once(args.python, args.checkout.resolve(), model, inputs, args.work) for _ in range(args.repeat)]
    row = dict(runs[-1], wall_s=statistics.median(r["wall_s"] for r in runs), walls=[r["wall_s"] for r in runs],
               peak_rss_mib=max((r["peak_rss_mib"] or 0) for r in runs) or None, load=os.getloadavg()[0])
    row["model_mib"] = model_mib
    print(json.dumps({args.label: row}, indent=2))
    rows_path = args.json or args.work / f"rows_l{args.layers}_s{args.samples}x{args.seq}.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else {}
    rows[args.label] = row
    rows_path.write_text(json.dumps(rows, indent=2))
    if args.out:
        write_section(Path(args.out), SECTION, section(rows, model_mib, args))
    return 0 if row["exit"] in (0, 1) else 1


if __name__ == "__main__":
    sys.exit(main())
