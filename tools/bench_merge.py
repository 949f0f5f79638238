"""Latency of sibling MatMuls (attention Q/K/V) in ONNX Runtime, separate vs merged by `merge`.

    python tools/bench_merge.py [--threads 2] [--runs 200]

Builds Q/K/V projections (MatMul + bias Add, three siblings reading one input) for a few
hidden sizes and sequence lengths, runs the graph and `merge(siblings=true)`'s output in ORT on CPU
(graph optimizations on, as deployed) with --threads intra-op threads, interleaved, and prints
the fastest and the median latency of each (on a shared machine the fastest run is the steadier
figure). Exits 0; read the table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import onnxopt  # noqa: E402


def qkv(hidden: int, siblings: int = 3, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, outs = [], [], []
    for i in range(siblings):
        w = numpy_helper.from_array(rng.standard_normal((hidden, hidden)).astype(np.float32) * 0.05, f"w{i}")
        b = numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), f"b{i}")
        inits += [w, b]
        nodes += [helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"y{i}"])]
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["batch", "seq", hidden]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])
    graph = helper.make_graph(nodes, "qkv", [x], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, {args.runs} interleaved runs; ms min (median)")
    print(f"{'hidden':>6} {'batch x seq':>11} {'separate':>16} {'merged':>16} {'merged/separate min':>20}")
    for hidden in (64, 256, 768):
        model = qkv(hidden)
        merged = onnxopt.optimize(model, "merge(siblings=true)", validate=False).model
        assert [n.op_type for n in merged.graph.node] == ["MatMul", "Add", "Split"]
        a, b = session(model, args.threads), session(merged, args.threads)
        for batch, seq in ((1, 1), (1, 128), (8, 128)):
            x = np.random.default_rng(1).standard_normal((batch, seq, hidden)).astype(np.float32)
            ref, got = a.run(None, {"x": x}), b.run(None, {"x": x})
            assert all(np.allclose(r, g, atol=1e-4, rtol=1e-4) for r, g in zip(ref, got))
            times: dict[str, list[float]] = {"a": [], "b": []}
            for _ in range(args.runs):
                for key, sess in (("a", a), ("b", b)):
                    t = time.perf_counter()
                    sess.run(None, {"x": x})
                    times[key].append(time.perf_counter() - t)
            (la, ma), (lb, mb) = ((min(times[k]) * 1e3, statistics.median(times[k]) * 1e3) for k in ("a", "b"))
            print(f"{hidden:>6} {f'{batch} x {seq}':>11} {f'{la:.4f} ({ma:.4f})':>16} "
                  f"{f'{lb:.4f} ({mb:.4f})':>16} {lb / la:>20.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
