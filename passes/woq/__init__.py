"""Weight-only quantization: MatMul/Gemm into com.microsoft.MatMulNBits, embeddings into GatherBlockQuantized."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt import progress
from onnxopt.calibrate import gram_request, layer_grams
from onnxopt.pipeline import CONSTANTS_FOLDED, Pass, PassContext, PassResult, Tolerance, register_pass

from .layers import SKIPS, Target, find_layers
from .options import WoqOptions
from .quantize import Blocks, Hessian, gptq, hessian, hqq, rtn
from .writer import DOMAIN, _act_dtype, write_gather, write_matmul

__all__ = ["Woq", "WoqOptions"]


@register_pass
class Woq(Pass):
    """Weight-only int4/int8: MatMul/Gemm weights into com.microsoft.MatMulNBits blocks, embedding tables into GatherBlockQuantized. Lossy.

    A MatMul whose right-hand side is a constant 2-D float weight W [K, N] (initializer or
    Constant node) becomes MatMulNBits(A, B, scales, zero_points): W quantized in blocks of
    ``block_size`` consecutive input channels per output, ``bits`` bits a weight packed
    into uint8 [N, K/block, block*bits/8], one scale per block and a uint8 zero point per
    block packed the same way (none when ``symmetric``; float for hqq). Activations stay
    float; ``accuracy_level`` is handed to ONNX Runtime (4: A quantized to int8 per block
    inside the kernel, the fast path on CPU). A Gemm maps exactly when transA=0: transB
    is read as W's transpose, alpha goes into the scales and beta*C into MatMulNBits'
    bias when C is a constant [N] (or scalar) vector.

    Algorithms (``algo``): ``rtn`` rounds each block to nearest from its min and max;
    ``hqq`` fits each block's zero point by half-quadratic optimisation of the lp-norm
    (p=0.7) weight error (HQQ, no data); ``gptq`` quantizes input channels one at a time
    and compensates the error through the inverse Hessian XᵀX of the layer's input, from
    one streaming pass over the calibration data (calibrate.GramStats: K×K per distinct
    input, whatever the number of samples). Without calibration data gptq runs as rtn,
    with a note, and the canonical pipeline says ``algo=rtn``; layers inside If/Loop
    bodies, which calibration does not reach, get rtn (``gptq_as_rtn``).

    With ``embeddings`` (default), a Gather on a constant float table [rows, width]
    (axis 0) becomes GatherBlockQuantized with rtn blocks along the width (its zero
    points are integers, so hqq's float ones do not fit; out-of-range indices give
    zero rows where Gather fails).

    Weights are read, quantized and written one layer at a time: the float copy of a
    weight is dropped before the next is read, so a model with external data is never
    held twice.

    Left alone and counted (``skipped_<reason>``): excluded names, MatMuls without a
    constant weight (attention), weights that are not 2-D or not float16/float32, Gemm
    with transA or a bias that is not a constant [N] vector, 1-D inputs, layers inside
    model-local functions, embeddings when ``embeddings=false``, Gathers on axis 1, tables
    whose rows do not fill whole bytes.
    """

    name = "woq"
    Options = WoqOptions
    exact = False
    tolerance = Tolerance(min_cosine=0.99)
    leaves_dangling = True  # Constant, Identity and Transpose nodes that held replaced weights
    requires = (CONSTANTS_FOLDED,)  # a weight still computed from constants (beyond a Transpose) is folded first

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opts: WoqOptions = self.options
        skips: Counter = Counter()
        notes: list[str] = []
        layers = find_layers(graph, opts, skips)
        grams: dict[str, Any] = {}   # layer input -> XᵀX, then its Hessian once a layer needs it
        if opts.algo == "gptq":
            dense = [l for l in layers if l.kind != "gather" and l.top]
            if ctx.calibration is None:
                notes.append("algo=gptq needs calibration data (--calib): ran rtn instead")
                opts = dataclasses.replace(opts, algo="rtn")
            elif dense:
                start = time.perf_counter()
                grams = collect_grams(graph, dense, ctx, opts.samples)
                notes.append(f"gptq: input statistics of {len(grams)} distinct layer inputs in "
                             f"{time.perf_counter() - start:.1f} s")
        self.resolved = opts
        stats: dict[str, Any] = {"quantized_matmul": 0, "quantized_gemm": 0, "quantized_gather": 0,
                                 "gptq_as_rtn": 0, "shared_weights": 0, "bytes_before": 0, "bytes_after": 0}
        errors: list[float] = []
        names = G.Names(graph)
        written: dict[tuple, gs.Node] = {}   # a tied weight (an unrolled RNN's steps) is quantized and stored once
        for layer in progress.iterate(layers, f"woq: int{opts.bits} weights", unit="weight"):
            key = share_key(layer, opts)
            stats[f"quantized_{layer.kind}"] += 1
            if key in written:
                stats["shared_weights"] += 1
                (write_gather if layer.kind == "gather" else write_matmul)(layer, None, names, opts.accuracy_level,
                                                                           like=written[key])
                continue
            stats["bytes_before"] += layer.nbytes
            blocks, error = quantize_layer(layer, opts, grams, stats)
            node = (write_gather(layer, blocks, names) if layer.kind == "gather"
                    else write_matmul(layer, blocks, names, opts.accuracy_level))
            written[key] = node
            stats["bytes_after"] += sum(int(t._values.nbytes) for t in node.inputs if isinstance(t, gs.Constant))
            errors.append(error)
        stats.update({f"skipped_{k}": skips[k] for k in SKIPS})
        stats["max_weight_error"] = float(f"{max(errors, default=0.0):.4g}")
        if layers:
            _import_domain(graph)
        if skips["dynamic_weight"]:
            notes.append(f"{skips['dynamic_weight']} MatMul/Gemm without a constant weight (activation x activation) stay float")
        return PassResult(bool(layers), stats, notes)


# Columns (outputs) are quantized in chunks of about this many weights: blocks of different outputs
# are independent (GPTQ's too: its updates stay within an output row), so the temporaries of the
# range search never exceed a few copies of one chunk, whatever the layer's size.
CHUNK = 1 << 22


def quantize_layer(layer: Target, opts: WoqOptions, grams: dict[str, Any],
                   stats: dict[str, Any]) -> tuple[Blocks, float]:
    """Read one weight, quantize it chunk by chunk, and return the blocks with the relative weight
    error ‖W-Ŵ‖/‖W‖; the float weight is dropped on return."""
    w = layer.read()
    if layer.kind == "gather":
        w = w.T   # a block per table row, along the width
    algo = "rtn" if layer.kind == "gather" else opts.algo
    gram = grams.get(layer.x.name) if algo == "gptq" and layer.top else None
    if algo == "gptq" and gram is None:
        stats["gptq_as_rtn"] += 1
        algo = "rtn"
    if algo == "gptq" and not isinstance(gram, Hessian):
        gram = grams[layer.x.name] = hessian(gram, opts.damp, opts.act_order)   # once per distinct input
    k, n = w.shape
    step = max(1, CHUNK // max(k, 1))
    parts, err2, norm2 = [], 0.0, 0.0
    for start in range(0, n, step):
        chunk = w[:, start:start + step]
        if algo == "gptq":
            blocks = gptq(chunk, gram, opts.bits, opts.block_size, opts.symmetric)
        elif algo == "hqq":
            blocks = hqq(chunk, opts.bits, opts.block_size)
        else:
            blocks = rtn(chunk, opts.bits, opts.block_size, opts.symmetric)
        diff = blocks.dequantize() - chunk
        err2 += float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))
        norm2 += float(np.einsum("ij,ij->", chunk, chunk, dtype=np.float64))
        parts.append(blocks)
    del w
    blocks = parts[0] if len(parts) == 1 else Blocks(
        np.concatenate([b.codes for b in parts]), np.concatenate([b.scales for b in parts]),
        None if parts[0].zeros is None else np.concatenate([b.zeros for b in parts]), k, opts.bits)
    return blocks, (err2 / norm2) ** 0.5 if norm2 > 0 else 0.0


def share_key(layer: Target, opts: WoqOptions) -> tuple:
    """Layers with equal keys get the same quantized constants: the same stored weight read the same
    way, scaled alike, for the same activation type (and, with gptq, the same input statistics)."""
    orientation = layer.layer.layout if layer.layer is not None else "table"
    by_input = layer.x.name if opts.algo == "gptq" and layer.kind != "gather" else None
    return (id(layer.const), layer.kind == "gather", orientation, layer.alpha, str(_act_dtype(layer)), by_input)


def collect_grams(graph: gs.Graph, layers: list[Target], ctx: PassContext, samples: int) -> dict[str, np.ndarray]:
    """XᵀX of every distinct layer input (calibrate.layer_grams: one streaming run, shared with the
    other passes of the run while the model is unchanged)."""
    requests = {id(t): gram_request(t.layer) for t in layers}
    wanted = [r for r in requests.values() if r is not None]
    if not wanted:
        return {}
    grams = layer_grams(ctx, ctx.export(graph), wanted, samples=samples)
    return {t.x.name: grams.stats[r][0].gram for t in layers if (r := requests[id(t)]) is not None
            and grams.stats[r][0].rows}


def _import_domain(graph: gs.Graph) -> None:
    """The exported model imports com.microsoft (opset 1) for the new nodes."""
    domains = list(getattr(graph, "import_domains", None) or [])
    if any(getattr(d, "domain", None) == DOMAIN for d in domains):
        return
    import onnx

    domains.append(onnx.helper.make_opsetid(DOMAIN, 1))
    graph.import_domains = domains
