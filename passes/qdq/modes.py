"""qdq's modes: static (calibrated Q/DQ pairs, SmoothQuant before it on transformers), dynamic (int8
weights, activations quantized at run time), and auto (both built, measured on the calibration
data, the smallest that meets the tolerance kept). Embedding tables become int8 in every mode."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import TYPE_CHECKING, Optional

import onnx
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt import holdout
from onnxopt.batching import symbolic_batch
from onnxopt.calibrate import calibration_set
from onnxopt.holdout import Part
from onnxopt.io import tensor_bytes
from onnxopt.pipeline import PassContext, PassResult
from onnxopt.serialize import serialized_size

from .dynamic import DYNAMIC_OPSET, DynamicPlan, apply_dynamic
from .embeddings import quantize_embeddings
from .guard import Guard, InputTap
from .options import _ALREADY_QUANTIZED, DEFAULT_OP_TYPES
from .plan import _transformer_like
from .writer import weight_qparams

if TYPE_CHECKING:
    from . import Qdq

# sizes within this share of each other are a tie, decided by accuracy
SIZE_TIE = 0.02
# stats of a candidate not kept that still say something about the input (layers left float until cleanup runs)
ADVICE = ("skipped_batchnorm_not_folded", "skipped_weight_not_folded")
# samples per batch when the dynamic mode's guard runs (run-time ranges span the batch, as deployed)
DYNAMIC_BATCH = 8
# MatMuls the dynamic mode's guard measures end to end, each left float alone (the most local error first)
DYNAMIC_MEASURED = 8


def run_mode(qdq: "Qdq", graph: gs.Graph, ctx: PassContext) -> PassResult:
    o = qdq.options
    ctx = held_out_context(graph, ctx, o)
    if o.mode == "static" or not quantizable(graph, ctx):
        return run_static(qdq, graph, ctx)  # says why not in its stats
    if o.mode == "dynamic":
        return run_dynamic(qdq, graph, ctx)
    return run_auto(qdq, graph, ctx)


def quantizable(graph: gs.Graph, ctx: PassContext) -> bool:
    """Opset 10 or later and no quantized op yet (else static mode says which in its stats)."""
    opset = ctx.opset or int(getattr(graph, "opset", 0) or 0)
    if opset and opset < 10:
        return False
    return not any(n.op in _ALREADY_QUANTIZED or n.op.startswith("QLinear") for n in G.find_nodes(graph))


def run_static(qdq: "Qdq", graph: gs.Graph, ctx: PassContext) -> PassResult:
    o = qdq.options
    if not quantizable(graph, ctx):
        return qdq._run_static(graph, ctx)
    notes: list[str] = []
    smooth_stats: dict = {}
    if o.smooth == "true" or (o.smooth == "auto" and list(o.op_types) == DEFAULT_OP_TYPES and _transformer_like(graph)):
        from .smooth import smooth_graph

        smooth_graph(graph, ctx, o, smooth_stats, notes)
    result = qdq._run_static(graph, ctx)
    stats = {**smooth_stats, **result.stats}
    notes = notes + list(result.notes or [])
    embedded = _embeddings(graph, ctx, o, stats)
    return PassResult(result.modified or embedded > 0 or smooth_stats.get("smoothed_layers", 0) > 0, stats, notes)


def run_dynamic(qdq: "Qdq", graph: gs.Graph, ctx: PassContext) -> PassResult:
    from . import _reduce_range

    o = qdq.options
    stats: dict = {"dynamic_nodes": 0}
    notes: list[str] = []
    opset = ctx.opset or int(getattr(graph, "opset", 0) or 0)
    if opset and opset < DYNAMIC_OPSET:
        stats["skipped_opset_below_11"] = 1
        return PassResult(False, stats)
    reduce_range, _ = _reduce_range(o.reduce_range)
    wmax = 64 if reduce_range else 127
    stats["reduce_range"] = int(reduce_range)
    skips: Counter = Counter()
    model = ctx.export(graph)
    plan = DynamicPlan(graph, set(o.op_types), o.exclude, skips, only=o.only)
    codes = dynamic_codes(graph, model, ctx, o, wmax, plan, stats)
    apply_dynamic(graph, plan, wmax, stats, codes)
    embedded = _embeddings(graph, ctx, o, stats)
    if o.guard and plan.nodes and ctx.calibration is not None:
        # activations are quantized per tensor over the whole batch: checked on batches of DYNAMIC_BATCH
        check = guard_for(model, ctx, o, qdq.tolerance.min_cosine or 0.99, DYNAMIC_BATCH)
        if isinstance(ctx.calibration, Part):
            stats["guard_held_out_samples"] = len(ctx.calibration.held_ids)
        cosine = check.cosine(ctx.export(graph))
        if cosine < check.target:
            cosine = _dynamic_fallback(model, o, wmax, check, ctx, cosine, graph, stats, notes, codes)
        stats["guard_min_cosine_ppm"] = int(round(cosine * 1e6))
    stats.update({f"skipped_{k}": v for k, v in sorted(skips.items())})
    return PassResult(bool(plan.nodes) or embedded > 0, stats, notes)


def dynamic_codes(graph: gs.Graph, model: onnx.ModelProto, ctx: PassContext, o, wmax: int, plan: DynamicPlan,
                  stats: dict) -> Optional[dict]:
    """GPTQ codes for the dynamic mode's weights (rounding=gptq, or auto with real calibration data)."""
    if o.rounding == "nearest" or ctx.calibration is None or not plan.nodes:
        return None
    if o.rounding == "auto" and calibration_set(ctx, model, o.samples).synthetic:
        return None
    from .dynamic import stored_axis
    from .rounding import count_rounding, gptq_codes, weight_key

    every = DynamicPlan(graph, set(o.op_types), [], Counter())
    stored = {id(n): (w.T if stored_axis(n) == 0 else w, stored_axis(n)) for n, w in
              ((n, every.weights[id(n)]) for n in every.nodes)}
    codes = gptq_codes(ctx, model, every.nodes, stored, True, wmax, o.samples)
    count_rounding(stats, [weight_key(n, stored_axis(n)) for n in plan.nodes], codes)
    return codes


def _dynamic_fallback(model, o, wmax, check: Guard, ctx, cosine, graph, stats, notes, codes=None) -> float:
    """Return MatMuls to float while each raises the output cosine: the DYNAMIC_MEASURED adding most
    local error (simulated on one guard batch) are each measured end to end left float alone, then
    returned best first."""
    def build(keep) -> tuple[gs.Graph, DynamicPlan]:
        g = G.import_graph(model)
        p = DynamicPlan(g, set(o.op_types), o.exclude, Counter(), frozenset(keep), only=o.only)
        apply_dynamic(g, p, wmax, {}, codes)
        _embeddings(g, ctx, o, {})
        return g, p

    base = DynamicPlan(G.import_graph(model), set(o.op_types), o.exclude, Counter(), only=o.only)
    local = local_errors(model, base, wmax, check.first) if check.first else {}
    ranked = sorted(base.nodes, key=lambda n: -local.get(id(n), 0.0))[:DYNAMIC_MEASURED]
    gains = []
    for node in ranked:
        pos = base.position[id(node)]
        gains.append((check.cosine(ctx.export(build([pos])[0])) - cosine, pos, node.name or node.outputs[0].name))
    gains.sort(key=lambda r: -r[0])
    fallen: list[int] = []
    for gain, pos, name in gains:
        if cosine >= check.target or gain <= 0:
            break
        trial, _ = build(fallen + [pos])
        now = check.cosine(ctx.export(trial))
        if now <= cosine:
            continue
        fallen.append(pos)
        notes.append(f"layer '{name}' back to float: output cosine +{now - cosine:.4f}")
        cosine = now
        _replace(graph, trial)
    stats["fallback_nodes"] = len(fallen)
    stats["dynamic_nodes"] -= len(fallen)
    if cosine < check.target:
        notes.append(f"dynamic: cosine {cosine:.5f} on calibration data is still below {check.target:.3g} "
                     f"after returning {len(fallen)} layers to float")
    return cosine


def local_errors(model: onnx.ModelProto, plan: DynamicPlan, wmax: int, feed: dict, rows: int = 1024) -> dict[int, float]:
    """id(node) -> relative error of its output with its input quantized as DynamicQuantizeLinear
    does (uint8 over the batch's range) and its weight int8 per column, on sampled rows of one batch."""
    import numpy as np
    import onnxruntime as ort

    from onnxopt.calibrate import with_outputs

    names = sorted({n.inputs[0].name for n in plan.nodes})
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    sess = ort.InferenceSession(with_outputs(model, names).SerializeToString(), so, providers=["CPUExecutionProvider"])
    values = dict(zip(names, sess.run(names, feed)))
    rng = np.random.default_rng(0)
    out = {}
    for node in plan.nodes:
        w = plan.weights[id(node)].astype(np.float64)
        x = np.asarray(values[node.inputs[0].name], np.float64).reshape(-1, w.shape[0])
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        scale = (hi - lo) / 255.0 or 1.0
        zp = np.clip(np.round(-lo / scale), 0, 255)
        x = x[rng.choice(len(x), size=min(rows, len(x)), replace=False)]
        xq = (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale
        ws, wq = weight_qparams(w.astype(np.float32), 1, wmax)
        ref = x @ w
        err = xq @ (wq.astype(np.float64) * ws.astype(np.float64)) - ref
        out[id(node)] = float((err ** 2).sum() / max(float((ref ** 2).sum()), 1e-30))
    return out


def run_auto(qdq: "Qdq", graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Build the static and the dynamic model, measure both on the same calibration batches, keep
    the smallest that meets the pass's min_cosine (sizes within SIZE_TIE are a tie, and a tie, or
    both missing it, goes to the more accurate)."""
    o = qdq.options
    model = ctx.export(graph)
    target = qdq.tolerance.min_cosine or 0.99
    if ctx.calibration is not None:  # read by both candidates and the comparison: a one-shot iterator is kept
        ctx = dataclasses.replace(ctx, calibration=calibration_set(ctx, model, o.samples))
    built: list[tuple[str, gs.Graph, PassResult, onnx.ModelProto, int]] = []
    tried: list[PassResult] = []
    for mode in ("static", "dynamic") if ctx.calibration is not None else ("dynamic", "static"):
        if built and ctx.calibration is None:
            break  # without data static ranges would be guesses: dynamic needs none, static only as a last resort
        g = G.import_graph(model)
        sub = type(qdq)(dataclasses.replace(o, mode=mode))
        result = run_mode(sub, g, ctx)
        tried.append(result)
        if result.modified:
            m = ctx.export(g)
            built.append((mode, g, result, m, tensor_bytes(m)))
    if not built:
        return unchanged(tried)
    check = guard_for(model, ctx, o, target, DYNAMIC_BATCH)
    scored = [(mode, g, r, check.cosine(m), size) for mode, g, r, m, size in built]
    mode, g, result, cosine, size = choose(scored, target)
    before, after = serialized_size(model), serialized_size(next(b[3] for b in built if b[0] == mode))
    if after >= before:  # a tiny model: Q/DQ nodes and scales outweigh the bytes the weights save
        kept = unchanged(tried)
        kept.stats["skipped_no_saving"] = 1
        kept.notes = list(kept.notes or []) + [
            f"mode=auto: the {mode} model would be {after:,} bytes, the float one {before:,}: left float"]
        return kept
    _replace(graph, g)
    stats = dict(result.stats)
    stats[f"auto_chose_{mode}"] = 1
    for m, _, _, c, s in scored:
        stats[f"auto_{m}_cosine_ppm"] = int(round(c * 1e6))
        stats[f"auto_{m}_bytes"] = s
    notes = list(result.notes or [])
    for m, _, r, _, _ in scored:  # advice on the input holds whichever mode is kept
        if r is result:
            continue
        for key in ADVICE:
            if r.stats.get(key):
                stats[key] = max(stats.get(key, 0), r.stats[key])
        notes += [n for n in r.notes or [] if "run 'cleanup' first" in n and n not in notes]
    notes.append("mode=auto -> {}: {}".format(mode, "; ".join(
        f"{m} cosine {c:.5f}{'' if c >= target else f' (below {target:.3g})'}, {s / 1024:.0f} KiB"
        for m, _, _, c, s in scored)) + f" ({why(scored, mode, target)})")
    return PassResult(True, stats, notes)


def unchanged(tried: list[PassResult]) -> PassResult:
    """Neither mode applied: what each left alone and why (a static-only skip such as a Conv in an
    If body must not vanish behind the dynamic mode's empty stats)."""
    stats: dict = {}
    notes: list[str] = []
    for r in tried:
        for key, value in r.stats.items():
            stats[key] = max(stats.get(key, 0), value) if key.startswith("skipped_") else stats.get(key, value)
        notes += [n for n in r.notes or [] if n not in notes]
    return PassResult(False, stats, notes)


def choose(scored: list, target: float):
    """The entry kept by auto: the smallest meeting ``target``, ties on size by accuracy."""
    meets = [s for s in scored if s[3] >= target]
    if not meets:
        return max(scored, key=lambda s: s[3])
    smallest = min(s[4] for s in meets)
    tied = [s for s in meets if s[4] <= smallest * (1 + SIZE_TIE)]
    return max(tied, key=lambda s: s[3])


def why(scored: list, mode: str, target: float) -> str:
    meets = [s for s in scored if s[3] >= target]
    if len(scored) == 1:
        return "the only candidate that applies"
    if not meets:
        return "none meets the tolerance: the most accurate"
    if len(meets) == 1:
        return "the only one that meets the tolerance"
    sizes = [s[4] for s in meets]
    if max(sizes) <= min(sizes) * (1 + SIZE_TIE):
        return f"both meet the tolerance at sizes within {SIZE_TIE:.0%}: the more accurate"
    return "both meet the tolerance: the smaller"


def guard_for(model: onnx.ModelProto, ctx: PassContext, o, target: float, batch: int = 1) -> Guard:
    """The guard on the calibration samples held out of fitting (all of them when none are)."""
    data = calibration_set(ctx, model, o.samples)
    held = data.held_out if isinstance(data, Part) else None
    tap = InputTap(held or data, [], lambda batch: None)
    tap.max_batch = batch if symbolic_batch(model) else 0  # fixed: feeds stay as the data gives them
    return Guard(model, tap, ctx, target, split=bool(tap.max_batch))


def held_out_context(graph: gs.Graph, ctx: PassContext, o) -> PassContext:
    """``ctx`` reading the fitting part of its calibration data, the guard the held-out rest
    (onnxopt/holdout.py); unchanged without the guard, data, or enough samples to split."""
    if not o.guard or ctx.calibration is None or isinstance(ctx.calibration, Part):
        return ctx
    model = ctx.export(graph)
    data = calibration_set(ctx, model, o.samples)
    fit = holdout.split(data, symbolic_batch(model))
    return dataclasses.replace(ctx, calibration=fit or data)


def _embeddings(graph: gs.Graph, ctx: PassContext, o, stats: dict) -> int:
    if not o.embeddings:
        return 0
    skips: Counter = Counter()
    opset = int(getattr(graph, "opset", 0) or 0) or ctx.opset
    n = quantize_embeddings(graph, opset, stats, skips, o.exclude, o.only)
    stats.update({f"skipped_{k}": v for k, v in skips.items()})
    return n


def _replace(graph: gs.Graph, new: gs.Graph) -> None:
    graph.nodes, graph.inputs, graph.outputs = new.nodes, new.inputs, new.outputs
    graph.functions = new.functions
    opset: Optional[int] = getattr(new, "opset", None)
    if opset:
        graph.opset = opset
    for key in ("initializer_inputs", "unread_initializers"):
        if key in vars(new):
            setattr(graph, key, vars(new)[key])
