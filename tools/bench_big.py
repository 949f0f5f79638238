"""Benchmark onnxopt on a model past protobuf's 2 GB limit: peak RSS and wall time, beside onnxslim.

Builds, on the fly and into a temporary folder on disk (removed afterwards unless --keep), a
model saved with external data: two N x N float32 MatMul weights (N=17000 by default: 2.3 GB)
written to the data file a block of rows at a time (never whole in memory), and small ops for
`cleanup` to act on: a bias Add after each MatMul (merge makes Gemms of them), Relu, an Identity
and an inference Dropout (noop), a Reshape whose target is built by Shape -> Gather -> Concat with
Constant nodes (shape_fold/fold), and a duplicated Constant (dedup).

Run (from the repo root):

    PYTHONPATH=. /work/venv/bin/python tools/bench_big.py [--n 17000] [--work /tmp] [--keep]
        [--out BENCHMARKS.md]

Method. Each measured command is a fresh subprocess; peak RSS is its VmHWM at exit (the
high-water mark since exec, anonymous and file-backed pages alike, read by a small wrapper
around the entry point so it reflects the tool alone), wall time is measured by the parent
around the whole child. Measured:

- `onnxopt optimize big.onnx -o out.onnx` (default pipeline `cleanup`, validation on synthetic
  inputs, default latency budget),
- the same with `--no-validate`,
- `onnxopt inspect big.onnx`,
- onnxslim (`onnxslim.slim(path, output_model=...)`, its default pipeline) as the anchor.

Afterwards a separate process loads the original and every written model in ONNX Runtime from
their files, one after the other, runs them on the same seeded input and records the largest
absolute difference to the original's outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import machine, write_section  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Models past 2 GB"

WRAPPER = r"""
import re, sys
from pathlib import Path
def hwm():
    found = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    Path(sys.argv[1]).write_text(found.group(1) if found else "")
code = 3
try:
    if sys.argv[2] == "onnxslim":
        import onnxslim
        onnxslim.slim(sys.argv[3], output_model=sys.argv[4])
        code = 0
    else:
        from onnxopt.cli import main
        code = main(sys.argv[2:])
finally:
    hwm()
sys.exit(code)
"""

CHECK = r"""
import json, sys
import numpy as np
import onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = 1
paths, n = sys.argv[1:-1], int(sys.argv[-1])
x = np.random.default_rng(0).standard_normal((2, n)).astype(np.float32)
ref, out = None, {}
for path in paths:
    try:
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        got = sess.run(None, {"x": x})
        del sess
    except Exception as exc:
        out[path] = str(exc).splitlines()[0][:200]
        continue
    if ref is None:
        ref = got
    out[path] = max(float(np.max(np.abs(a - b))) for a, b in zip(ref, got))
print(json.dumps(out))
"""


# ------------------------------------------------------------------- the model

def build(folder: Path, n: int, seed: int = 0, align: bool = False) -> Path:
    """``big.onnx`` + ``big.onnx.data`` in ``folder``; the weights are written in row blocks, back to
    back as ``onnx.save_model(..., save_as_external_data=True)`` writes them, or with ``align`` at
    page-aligned offsets (which ORT maps instead of reading)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path, data_name = folder / "big.onnx", "big.onnx.data"
    rng = np.random.default_rng(seed)
    inits, offset = [], 0
    with open(folder / data_name, "wb") as data:
        for name in ("w1", "w2"):
            offset = -(-offset // 4096) * 4096 if align else offset
            data.seek(offset)
            for start in range(0, n, 1000):
                rows = min(1000, n - start)
                data.write((rng.standard_normal((rows, n), dtype=np.float32) * np.float32(n ** -0.5)).tobytes())
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[n, n],
                                 data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(n * n * 4))):
                tensor.external_data.add(key=key, value=value)
            inits.append(tensor)
            offset += n * n * 4
    inits += [numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(np.float32), "b1"),
              numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(np.float32), "b2")]

    def const(name: str, value) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(np.asarray(value)))

    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
        helper.make_node("Add", ["h1", "b1"], ["h1b"], name="add1"),
        helper.make_node("Relu", ["h1b"], ["r1"], name="relu1"),
        helper.make_node("Identity", ["r1"], ["r1i"], name="identity"),
        helper.make_node("Dropout", ["r1i"], ["r1d"], name="dropout"),
        helper.make_node("MatMul", ["r1d", "w2"], ["h2"], name="mm2"),
        helper.make_node("Add", ["h2", "b2"], ["h2b"], name="add2"),
        # Reshape target from the input's shape: [batch, 2, n/2] when n is even
        helper.make_node("Shape", ["h2b"], ["shp"], name="shape"),
        const("zero", np.array([0], np.int64)),
        helper.make_node("Gather", ["shp", "zero"], ["batch"], name="gather", axis=0),
        const("tail", np.array([2, -1], np.int64)),
        helper.make_node("Concat", ["batch", "tail"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["h2b", "target"], ["y3"], name="reshape"),
        const("one", np.array(1.0, np.float32)),
        const("one_again", np.array(1.0, np.float32)),
        helper.make_node("Mul", ["y3", "one"], ["y"], name="times_one"),
        helper.make_node("Mul", ["r1", "one_again"], ["hidden"], name="times_one_again"),
    ]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, n // 2]),
                               helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())  # small: the weights are references
    return path


def model_bytes(path: Path) -> int:
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + "*.data"))


# ------------------------------------------------------------------- measuring

def measure(label: str, args: list[str], folder: Path) -> dict:
    hwm = folder / f"hwm.{label}.txt"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(hwm), *args], env=env, cwd=str(folder),
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    text = hwm.read_text() if hwm.exists() else ""
    row = {"exit": proc.returncode, "wall_s": round(wall, 1), "peak_rss_mib": int(text) / 1024 if text else None,
           "tail": (proc.stdout + proc.stderr).strip().splitlines()[-6:]}
    print(f"{label}: exit {row['exit']}, {row['wall_s']} s, peak RSS {row['peak_rss_mib']} MiB", flush=True)
    return row


def check_outputs(paths: list[Path], n: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHECK, *map(str, paths), str(n)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {str(p): (proc.stderr.strip().splitlines() or ["failed"])[-1] for p in paths}
    return json.loads(proc.stdout)


def section(rows: dict[str, dict], size: int, n: int, checked: dict, align: bool) -> str:
    m = machine()
    mib = size / 2**20
    lines = [SECTION, "",
             f"A model built by `tools/bench_big.py`: two {n}x{n} float32 MatMul weights saved as external data "
             f"({'page-aligned' if align else 'back to back, as onnx.save_model writes them'}) "
             f"({mib:.0f} MiB in all, past protobuf's 2 GiB limit) and small ops for `cleanup` (bias Adds, an "
             "Identity, a Dropout, a Reshape target built from Shape/Gather/Concat, multiplications by one). "
             "Each command is a fresh process; peak RSS is its VmHWM (anonymous and mapped file pages); wall "
             "time is the whole process. `written model` is the largest absolute difference of its outputs from "
             "the original's, both run in ONNX Runtime from their files on one seeded input.",
             "", f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}; Python {m['python']}; "
             f"load average {os.getloadavg()[0]:.1f} after the runs.", "",
             "| command | exit | wall s | peak RSS MiB | RSS / model | target | written model |",
             "|---|---:|---:|---:|---:|---:|---|"]
    targets = {"onnxopt optimize": "≤ 2.5x", "onnxopt optimize --no-validate": "≤ 1.3x"}
    for label, r in rows.items():
        rss = r["peak_rss_mib"]
        out = r.get("output")
        diff = checked.get(out, "-") if out else "-"
        diff = f"max abs diff {diff:.2e}" if isinstance(diff, float) else str(diff)
        lines.append(f"| `{label}` | {r['exit']} | {r['wall_s']:.1f} | {rss:.0f} | {rss / mib:.2f}x | "
                     f"{targets.get(label, '')} | {diff} |" if rss else
                     f"| `{label}` | {r['exit']} | {r['wall_s']:.1f} | - | - | {targets.get(label, '')} | {diff} |")
    lines += ["", f"Reproduce: `PYTHONPATH=. python tools/bench_big.py --n {n}{' --align' if align else ''}` (needs about "
              f"{3 * mib / 1024:.0f} GiB free disk in --work).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=17000, help="rows and columns of each weight (even)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()), help="folder for the temporary files")
    parser.add_argument("--align", action="store_true", help="page-aligned weights in the data file")
    parser.add_argument("--keep", action="store_true", help="leave the temporary folder in place")
    parser.add_argument("--skip", default="", help="comma-separated labels not to run (onnxslim, inspect, ...)")
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="BENCHMARKS.md to update ('': none)")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench-big-", dir=args.work))
    try:
        model = build(folder, args.n, align=args.align)
        size = model_bytes(model)
        print(f"model: {size / 2**20:.0f} MiB in {folder}", flush=True)
        runs = {
            "onnxopt optimize": (["optimize", "big.onnx", "-o", "out.onnx"], "out.onnx"),
            "onnxopt optimize --no-validate": (["optimize", "big.onnx", "-o", "out_nv.onnx", "--no-validate"],
                                               "out_nv.onnx"),
            "onnxopt inspect": (["inspect", "big.onnx"], None),
            "onnxslim": (["onnxslim", "big.onnx", "slim.onnx"], "slim.onnx"),
        }
        skip = set(filter(None, args.skip.split(",")))
        rows = {}
        for label, (cmd, out) in runs.items():
            if label in skip or label.split()[-1] in skip:
                continue
            rows[label] = measure(label.replace(" ", "_"), cmd, folder)
            if out is not None:
                rows[label]["output"] = str(folder / out)
        written = [Path(r["output"]) for r in rows.values() if r.get("output") and Path(r["output"]).exists()]
        checked = check_outputs([model, *written], args.n)
        print(json.dumps({"model_bytes": size, "rows": rows, "outputs": checked}, indent=2))
        if args.out:
            write_section(Path(args.out), SECTION, section(rows, size, args.n, checked, args.align))
        return 0 if all(r["exit"] == 0 for r in rows.values()) else 1
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
