"""Post-training int8 quantization: QuantizeLinear/DequantizeLinear pairs with calibrated ranges."""

from __future__ import annotations

import dataclasses
import platform
from collections import Counter
from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt.batching import symbolic_batch
from onnxopt.calibrate import TensorRanges, calibration_set, shared, stream_tensors
from onnxopt.pipeline import (BN_FOLDED, CONSTANTS_FOLDED, Pass, PassContext, PassResult, Tolerance,
                               register_pass)
from onnxopt.io import tensor_bytes

from .opset import PER_CHANNEL_OPSET, raise_opset
from .guard import Guard, InputTap, _drain
from .mixed import mixed_precision
from .options import _ALREADY_QUANTIZED, _SKIPS, DEFAULT_OP_TYPES, QdqOptions  # noqa: F401 (public)
from .plan import Plan
from .writer import Writer, activation_qparams, weight_qparams  # noqa: F401 (public)


@register_pass
class Qdq(Pass):
    """Post-training int8 quantization, static (Q/DQ pairs from calibration data) or dynamic. Lossy.

    ``mode`` (passes/qdq/modes.py): ``static`` is described below; ``dynamic``
    (passes/qdq/dynamic.py) quantizes MatMul/Gemm with constant weights as ORT
    deploys transformers on CPU: int8 weights per output column,
    DynamicQuantizeLinear + MatMulInteger + scale Mul (ORT fuses them into
    DynamicQuantizeMatMul), activations quantized at run time, no calibration
    needed (with data, a guard returns MatMuls to float while the output cosine
    is below 0.99); ``auto`` (the default) builds both, measures their output
    cosine on the same calibration batches and keeps the smallest that meets
    0.99 (sizes within 2% are a tie and go to the more accurate; when both miss,
    the more accurate), saying which and why in a note and the ``auto_*`` stats.
    In every mode ``embeddings=true`` stores Gather tables of 4096 values or more
    as int8 with one scale per row, gathered with the rows and applied by a Mul
    (passes/qdq/embeddings.py). In static mode ``smooth`` (auto: on for
    transformer-like graphs) first applies SmoothQuant (passes/qdq/smooth.py):
    per input-channel scales moved from MatMul activations into their weights,
    the strength searched per activation on calibration rows; exact in float.

    Static mode:
    Weights of Conv, ConvTranspose, MatMul and Gemm become int8 initializers
    (symmetric, per output channel: Conv axis 0, ConvTranspose axis 1, MatMul
    [K,N] axis 1, Gemm axis 0 or 1 after transB) read through a
    DequantizeLinear; Conv/ConvTranspose/Gemm biases become int32 with scale
    input scale x weight scale and zero point 0. Activations get one Q/DQ pair
    per tensor (uint8 asymmetric, or int8 symmetric) at the inputs of the
    quantized ops and at the outputs of ops ORT only fuses with a quantized
    output (Conv, ConvTranspose, Add, Mul, Concat, AveragePool,
    GlobalAveragePool); a Relu or Clip that is the only reader of such an
    output is folded into its range (the pair goes after it and ORT drops
    it; with int8 activations such a one-sided range gets zero point -128,
    as ORT needs). MaxPool, Resize and shape ops (Transpose, Reshape, Flatten, Squeeze,
    Unsqueeze, Slice, Gather on data) between quantized tensors keep their
    input's scale, so ORT runs them on 8-bit data. Everything else stays float
    and reads the float tensor.

    Weight codes: with real calibration data (``rounding=auto``; ``gptq`` or
    ``nearest`` to choose) GPTQ picks the int8 codes of each layer against
    its calibration inputs' XᵀX, so the layer's output error rather than each
    weight's is kept small; the scales, ops and size are those of round to
    nearest (passes/qdq/rounding.py; ``rounding_gptq``, ``rounding_nearest``).

    Ranges come from one streaming run over the calibration data
    (``ctx.calibration``; ``method`` minmax, percentile, entropy or mse, see
    onnxopt.calibrate.RangeStats; entropy is TensorRT's KL search with 256
    quantized bins for one-sided uint8 tensors, corrected for the number of
    independent values the histogram holds). Fragile patterns stay float unless
    ``op_types`` is set explicitly: in transformer-like graphs (Softmax,
    LayerNormalization or a decomposed LayerNorm present) Add and Mul
    (residuals, LayerNorm affine) and MatMuls of two activations (attention);
    Gather on embeddings is never quantized. ``reduce_range=auto`` picks 7-bit
    weights on x86 CPUs without VNNI, where ORT's u8s8 kernels can saturate.

    Accuracy guard: the result is compared with the float model on up to 96
    calibration samples that nothing was fitted to (with 32 samples or more,
    one in three is held out of the ranges, SmoothQuant and GPTQ:
    ``guard_held_out_samples``, onnxopt/holdout.py; judged on the samples the
    ranges came from, a model looked better than it was on other data),
    in ORT with graph optimizations on (where the pairs
    become integer kernels): output cosine, and for outputs that are class or
    sequence scores (a Softmax/LogSoftmax over the last axis) the share of
    argmax that agree (per sample; a sequence, CTC or tokens: per position),
    against the pass's own tolerance (min_cosine 0.99, max_top1_drop 1
    point); a slow model gets fewer samples (2 s of float runs at most). When it misses, mixed precision
    (passes/qdq/mixed.py) measures every quantized layer end to end on 16
    samples (left out of the fully quantized model; the likeliest first, by
    local error, within a time budget), returns layers to float best accuracy
    recovered per byte kept float first, re-measuring the assembled model on
    every guard sample after each, and measures again over the remaining
    layers when a round ends short. A layer goes back only when it is worth
    its bytes: the share of the first shortfall it removes is at least its
    share of the bytes quantization saves, or it makes the tolerance hold; the
    loop stops when the tolerance holds or no layer left is worth it. With
    ``fallback=weights`` (the default) a layer taken back keeps its int8
    weights, read as Cast(int8) * scale (which ONNX Runtime folds when the
    session loads, so the layer runs at float speed while the file keeps
    int8), and only its activations go float: it
    keeps no bytes float, so any measured gain is worth it and the loop runs
    until the tolerance holds; when no single layer helps any more, the rest
    go back in doubling groups (in order of local error) until it holds
    (``weight_only_nodes``);
    ``fallback=float`` takes the whole layer back. Notes give each float
    layer's measured gain and bytes, and the size/accuracy trade curve (a few
    points: weight bytes against the score as layers return to float), so
    another point can be picked with ``exclude=``; ``fallback_nodes``,
    ``fallback_bytes_kept_float``, ``guard_measurements``,
    ``guard_min_cosine_ppm`` and ``guard_argmax_agreement_ppm`` report the
    outcome.

    Only the top-level graph is quantized; ops in If/Loop/Scan bodies stay
    float (``skipped_subgraph``). Models that already hold quantized ops are
    left alone. Per-channel weights need opset >= 13: a model at opset 10-12
    is converted to opset 13 by onnx's version converter (``opset_raised_to_13``;
    one scale per tensor leaves the small channels of a BatchNorm-folded Conv a
    level or two, see passes/qdq/opset.py); where that fails, weights are per
    tensor (``per_tensor_low_opset``); below opset 10 nothing is done.
    """

    name = "qdq"
    Options = QdqOptions
    exact = False
    tolerance = Tolerance(min_cosine=0.99, max_top1_drop=1.0)
    leaves_dangling = True  # float weights and Constant nodes no longer read
    requires = (BN_FOLDED, CONSTANTS_FOLDED)  # a Conv feeding BatchNormalization, or a weight still computed, stays float

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        from .modes import run_mode  # static / dynamic / auto, embeddings, SmoothQuant

        return run_mode(self, graph, ctx)

    def _run_static(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        stats: dict[str, int] = {"quantized_nodes": 0, "qdq_pairs": 0, "weights_quantized": 0,
                                 "biases_quantized": 0, "activations_calibrated": 0, "scales_shared": 0,
                                 "relu_clip_folded": 0}
        skips: Counter = Counter()
        opset = ctx.opset or _opset(graph)
        if opset and opset < 10:
            stats["skipped_opset_below_10"] = 1
            return PassResult(False, stats)
        if any(n.op in _ALREADY_QUANTIZED or n.op.startswith("QLinear") for n in G.find_nodes(graph)):
            stats["skipped_already_quantized"] = 1
            return PassResult(False, stats)
        per_channel = o.per_channel
        notes: list[str] = []
        reduce_range, vnni = _reduce_range(o.reduce_range)
        stats["reduce_range"] = int(reduce_range)
        if vnni is not None:
            stats["cpu_int8_vnni"] = int(vnni)
            notes.append("reduce_range=auto -> {} ({})".format(
                str(reduce_range).lower(), "CPU has VNNI: full 8-bit weights" if vnni else
                "x86 CPU without VNNI: 7-bit weights, so ORT's u8s8 kernels do not saturate"
                if reduce_range else "not an x86 CPU"))

        plan = Plan(graph, o, skips)
        if skips["batchnorm_not_folded"] or skips["weight_not_folded"]:
            notes.append(f"{skips['batchnorm_not_folded'] + skips['weight_not_folded']} layers have unfolded "
                         "BatchNormalization or weights and stay float; run 'cleanup' first (--passes cleanup,qdq)")
        if not plan.nodes and not plan.weight_only:
            stats.update({f"skipped_{k}": skips[k] for k in _SKIPS})
            return PassResult(False, stats, notes)
        if per_channel and opset and opset < PER_CHANNEL_OPSET and plan.weights:
            # one scale per weight tensor can leave whole channels without levels: raise the opset instead
            why = raise_opset(graph, ctx.export(graph))
            if why is None:
                stats["opset_raised_to_13"] = 1
                notes.append(f"opset {opset} raised to {PER_CHANNEL_OPSET} for per-channel weight scales")
                skips = Counter()
                plan = Plan(graph, o, skips)
            else:
                per_channel = False
                stats["per_tensor_low_opset"] = 1
                notes.append(f"opset {opset}: weights quantized per tensor (per-channel needs opset "
                             f"{PER_CHANNEL_OPSET}, and the opset could not be raised: {why})")

        # ---- calibration: one streaming run over the data for every tensor that needs its own range
        model = ctx.export(graph)
        data = calibration_set(ctx, model, o.samples)
        own = [t for t in plan.tensors.values() if plan.share_of.get(id(t)) is None]
        inputs = {t.name for t in graph.inputs}
        # ranges measured on this very model earlier in the run (ctx.cache: tune's evaluations share them)
        known = shared(ctx, model, ("ranges", o.method, o.samples))
        wanted = [t.name for t in own]
        missing = [n for n in wanted if n not in known]
        ranges = TensorRanges(missing, o.method)
        dtypes: dict[str, np.dtype] = {n: known[n][1] for n in wanted if n in known and known[n][1] is not None}

        def reduce(batch: dict) -> None:
            for name, value in batch.items():
                dtypes.setdefault(name, np.asarray(value).dtype)
            ranges({k: v for k, v in batch.items() if np.asarray(v).dtype == np.float32})

        internal = [n for n in missing if n not in inputs]
        feeds_once = InputTap(data, [n for n in missing if n in inputs], reduce)
        if not symbolic_batch(model):
            feeds_once.max_batch = 0  # a fixed batch dimension: feeds stay as the data gives them
        batches = stream_tensors(model, internal, feeds_once, reduce) if internal else _drain(feeds_once)
        stats["calibration_batches"] = batches
        known.update({n: (ranges.stats[n], dtypes.get(n)) for n in missing})
        stats["calibration_synthetic"] = int(data.synthetic)

        # the threshold searches get the quantization grid each tensor will have: uint8 over [lo, hi]
        # (255 steps; 127 per side of 0 for signed data), int8 symmetric (127 steps per side; also for
        # one-sided data) except a folded Relu/Clip, which gets zero point -128 (255 steps)
        folded = {t.name for t in plan.tensors.values() if id(t) in plan.folded_ids}
        found = {n: s.range(o.method, o.percentile, symmetric=o.activation_type == "int8" and n not in folded)
                 for n, s in ((n, known[n][0]) for n in wanted)}
        not_float = {n for n, d in dtypes.items() if d != np.float32}
        plan.drop_tensors(not_float)
        if not plan.nodes and not plan.weight_only:
            stats.update({f"skipped_{k}": skips[k] for k in _SKIPS})
            return PassResult(False, stats)

        # ---- weight codes: GPTQ on the calibration inputs where asked (rounding.py), else round to nearest
        codes = None
        if o.rounding == "gptq" or (o.rounding == "auto" and not data.synthetic):
            from .rounding import count_rounding, gptq_codes, weight_key

            # every layer the options could pick, not only this plan's: one streaming run serves them all,
            # and later runs on the same model (tune's evaluations with other only=) read the cache
            every = Plan(graph, dataclasses.replace(o, only=[], exclude=[]), Counter())
            codes = gptq_codes(ctx, model, every.nodes, every.weights, per_channel, 64 if reduce_range else 127,
                               o.samples)
            count_rounding(stats, [weight_key(n, plan.weights[id(n)][1]) for n in plan.nodes if id(n) in plan.weights],
                           codes)

        # ---- rewrite
        writer = Writer(graph, o, per_channel, reduce_range, found, stats, codes)
        writer.apply(plan)

        # ---- accuracy guard: check on calibration samples in ORT with optimizations on (as deployed);
        # when the pass's own tolerance is missed, return layers to float by measured gain per byte
        if not o.guard:
            return self._done(plan, stats, skips)
        held = getattr(data, "held_out", None)  # samples not fitted to (onnxopt/holdout.py), when there are enough
        if held is not None:
            stats["guard_held_out_samples"] = len(held.held_ids)
            feeds_once = InputTap(held, [], lambda batch: None, max_batch=feeds_once.max_batch)
        base = dict(stats)
        top1 = self.tolerance.max_top1_drop
        check = Guard(model, feeds_once, ctx, self.tolerance.min_cosine or 0.99,
                      None if top1 is None else 1.0 - top1 / 100.0, split=bool(feeds_once.max_batch))
        score = check.measure(ctx.export(graph))
        _score_stats(stats, score)
        if not check.holds(score):
            def build(keep):
                return self._build(model, o, per_channel, reduce_range, found, not_float, frozenset(keep), dict(base),
                                   codes)

            outcome = mixed_precision(build, check, ctx.export, tensor_bytes(model), notes,
                                      weights_stay=o.fallback == "weights")
            current, cur_plan, cur_writer = outcome.built
            graph.nodes, graph.inputs, graph.outputs = current.nodes, current.inputs, current.outputs
            graph.functions = current.functions
            plan, stats = cur_plan, cur_writer.stats
            stats["fallback_nodes"] = len(outcome.fallen)
            stats["fallback_bytes_kept_float"] = sum(c.cost for c in outcome.fallen)
            stats["guard_measurements"] = outcome.measured
            _score_stats(stats, outcome.score)
            if not check.holds(outcome.score):
                notes.append(f"{outcome.score} on calibration data is still short of the tolerance after "
                             f"returning {len(outcome.fallen)} layers to float")
        return self._done(plan, stats, skips, notes)

    @staticmethod
    def _done(plan, stats: dict, skips: Counter, notes: Optional[list[str]] = None) -> PassResult:
        stats["quantized_nodes"] = len(plan.nodes)
        for op, n in sorted(Counter(n.op for n in plan.nodes).items()):
            stats[f"quantized_{op}"] = n
        stats["relu_clip_folded"] = plan.folded
        stats.update({f"skipped_{k}": skips[k] for k in _SKIPS})
        return PassResult(True, stats, notes or [])

    @staticmethod
    def _build(model, o, per_channel, reduce_range, found, not_float, keep_float, stats, codes=None):
        g = G.import_graph(model)
        plan = Plan(g, o, Counter(), keep_float)
        plan.drop_tensors(not_float)
        for key in ("qdq_pairs", "weights_quantized", "biases_quantized", "activations_calibrated", "scales_shared"):
            stats[key] = 0
        writer = Writer(g, o, per_channel, reduce_range, found, stats, codes)
        writer.apply(plan)
        return g, plan, writer


def _score_stats(stats: dict, score) -> None:
    stats["guard_min_cosine_ppm"] = int(round(score.cosine * 1e6))
    if score.agreement is not None:
        stats["guard_argmax_agreement_ppm"] = int(round(score.agreement * 1e6))


def _opset(graph: gs.Graph) -> int:
    return int(getattr(graph, "opset", 0) or 0)


def _reduce_range(option: str) -> tuple[bool, Optional[bool]]:
    """(reduce_range, whether the CPU has int8 VNNI or None when not asked)."""
    if option != "auto":
        return option == "true", None
    vnni = cpu_has_vnni()
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
    return (x86 and not vnni), vnni


def cpu_has_vnni() -> bool:
    """Whether the CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    except OSError:
        pass
    return False
