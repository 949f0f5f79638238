"""``tune``: meet a size or latency target within an accuracy budget, choosing a setting per layer.

    result = onnxopt.tune("models/digits_cnn.onnx", "models/digits_calib.npz",
                          inputs="models/digits_test.npz", target="size=0.25", max_drop=1)
    print(result.pipeline)        # cleanup,prune(...,only=/7/Conv),qdq(...,only=...)
    result.save("digits_cnn.tuned.onnx")

Parts: ``target`` (the target and the budget), ``candidates`` (the layers, their settings, the
pipeline string a choice is written as), ``measure`` (one evaluation, run by an executor),
``search`` (sensitivity, the greedy path, re-measuring), ``result`` (TuneResult and its report).
The chosen model is made by running the printed pipeline through ``optimize`` from the original
file, so ``onnxopt optimize MODEL --passes '<pipeline>' --calib DATA`` writes the same bytes.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from typing import Any, Callable, Optional, Union

import numpy as np
import onnx

from .. import api, io
from .. import progress as bars
from .. import graph as G
from .. import layers as L
from .. import metrics as M
from ..calibrate import gram_request, layer_grams, with_outputs
from ..data import load_dataset
from ..errors import InputError
from ..executors import make_executor
from ..pipeline import PassContext, PassManager, Pipeline, Tolerance
from ..runtime import open_session
from ..serialize import serialized_size
from ..validation_inputs import held_out
from . import measure
from .candidates import Layer, Passes, find, prunable_layers, settings_for
from .result import TuneResult, budget_text, layer_rows, point_dict
from .search import Search
from .target import Budget, Target

CALIBRATION_SAMPLES = 128
EVALUATION_SAMPLES = 512
MAX_MODEL_BYTES = 1 << 31
FINAL_LATENCY_RUNS = 20  # a size target's report still gives latency; a latency target's is timed longer
MAX_EVALUATIONS = 400  # single-layer and assembled evaluations; then the closest point found is reported

__all__ = ["tune", "TuneResult", "Target", "Budget"]


def tune(model: Union[str, os.PathLike, onnx.ModelProto], calibration: Any, *, inputs: Any = None,
         target: Union[str, Target], max_drop: Optional[float] = None,
         tolerance: Union[str, dict, Tolerance, None] = None, executor: Any = "local", seed: int = 0,
         workers: Optional[int] = None, labels: Any = None, output_kinds: Optional[dict[str, str]] = None,
         dims: Optional[dict[str, int]] = None, samples: int = EVALUATION_SAMPLES,
         calibration_samples: Optional[int] = None, int8: str = "auto",
         progress: Optional[Callable[[str, int, int], None]] = None,
         max_evaluations: Optional[int] = MAX_EVALUATIONS) -> TuneResult:
    """Choose per-layer settings (float, int8, int4, structured pruning, low rank) so that the model
    meets ``target`` (``size=0.25``: a quarter of the file; ``latency=0.5``: half the median time)
    while the budget metric drops by at most ``max_drop`` points (and/or every point passes
    ``tolerance``; neither given: 1 point).

    The budget metric is accuracy when labels are given (``labels``, or a ``labels`` array in
    ``inputs``), else the one that fits each output's kind: top-1 agreement (class scores; per
    position for sequences), mean vector cosine x 100 (embeddings: 1 point = cosine 0.99), cosine
    x 100 (other). It is measured on up to ``samples`` samples of ``inputs``, else on calibration
    samples the passes do not read. Passes read the first ``calibration_samples`` samples of
    ``calibration`` (default 128, 64 on models of a million parameters or more). ``executor``: ``local``, ``ray``, ``ray://HOST:PORT`` or an Executor (evaluations
    of single layers run there; the same seed gives the same pipeline on each). ``int8``: ``static``,
    ``dynamic`` or ``auto`` (static when the model has convolutions, else dynamic).

    Returns a TuneResult; ``met`` says whether the target holds within the budget, else
    ``pipeline`` is the closest point found (``save(force=True)`` writes it anyway).
    """
    start = time.perf_counter()
    goal = Target.parse(target)
    budget = Budget.make(max_drop, tolerance)
    if calibration is None:
        raise InputError("tune needs calibration data (--calib): the passes it chooses between read it")
    if int8 not in ("auto", "static", "dynamic"):
        raise InputError(f"int8 must be auto, static or dynamic, got {int8!r}")
    if samples < 1 or (calibration_samples is not None and calibration_samples < 1):
        raise InputError("samples and calibration_samples must be at least 1")
    source = None if isinstance(model, onnx.ModelProto) else str(model)
    original = io.load(model)
    ex = make_executor(executor, workers) if isinstance(executor, str) else executor  # a bad spec fails first
    try:
        orig_bytes = serialized_size(original)
        if orig_bytes >= MAX_MODEL_BYTES:
            raise InputError("tune measures models in memory: this one passes 2 GB (optimize it with fixed passes)")
        dims = dict(dims or {})
        kinds = M.check_overrides(output_kinds or {}, [o.name for o in original.graph.output])

        clean = PassManager(Pipeline.parse("cleanup"), PassContext(seed=seed, dims=dims)).run(original)
        if calibration_samples is None:  # by size, not by this machine's speed: the same run everywhere
            calibration_samples = CALIBRATION_SAMPLES if _params(clean) < 1_000_000 else CALIBRATION_SAMPLES // 2
        calib = load_dataset(calibration, original, limit=calibration_samples, what="calibration data")
        data, eval_labels, eval_text = _evaluation_data(original, inputs, calibration, labels, samples,
                                                        calibration_samples)
        layers = find(clean)
        if not layers:
            raise InputError("tune found no layer to change (Conv, MatMul, Gemm with fixed weights, embedding tables)")
        mode = int8 if int8 != "auto" else ("static" if any(x.kind in ("conv", "convtranspose") for x in layers)
                                            else "dynamic")
        passes = Passes(mode, calibration_samples)
        prunable = prunable_layers(clean, layers, calib.feeds, calibration_samples)
        for layer in layers:
            layer.prunable = layer.name in prunable
            layer.settings = settings_for(layer, goal.kind, mode)

        cache = _statistics(clean, calib.feeds, calibration_samples, seed, dims,
                            passes.pipeline({x.name: "int8" for x in layers if "int8" in x.settings}, layers)
                            if mode == "static" else "")
        shared = measure.Shared(uuid.uuid4().hex, clean.SerializeToString(), calib.feeds, data,
                                budget.tolerance, eval_labels, kinds, seed, dims, cache,
                                sensitivity_samples(sum(x.params for x in layers), data.samples))
        base = {"bytes": orig_bytes, "clean_bytes": serialized_size(clean)}
        notes = [f"budget metric measured on {eval_text} (single layers on the first "
                 f"{shared.sensitivity_samples or data.samples}); passes calibrate on the first "
                 f"{calib.samples} calibration samples"]
        if goal.kind == "latency":
            feed = data.feeds[0]
            base["latency_ms"] = measure.latency_of(original, feed)
            base["clean_latency_ms"] = measure.latency_of(clean, feed)
            _macs(clean, layers, feed)
            base["macs"] = float(sum(x.macs for x in layers))
            base["original"] = original
            notes.append("per-layer time saved is estimated from each layer's share of the multiply-accumulates; "
                         f"assembled models are timed in this process (median of {measure.LATENCY_RUNS} runs)")

        handle = ex.share(shared)
        reference = measure.baseline(shared)
        report = progress if progress is not None else bars.labelled("tune", unit="eval")
        if max_evaluations is not None and max_evaluations < 1:
            raise InputError("max_evaluations must be at least 1 (or None for no limit)")
        outcome = Search(shared, handle, ex, layers, passes, goal, budget, base, report, max_evaluations).run()
        if outcome.capped:
            notes.append(f"the search stopped at its budget of {max_evaluations} evaluations "
                         "(max_evaluations / --max-evaluations); the point reported is the best found by then")
    finally:
        if isinstance(executor, str):  # an executor the caller made is the caller's to close
            ex.close()
        measure.release()
    spec = dataclasses.replace(passes, rounding="auto").pipeline(outcome.chosen.choice, layers) if outcome.chosen else ""
    pipeline = "cleanup" + ("," + spec if spec else "")
    if "qdq(" in spec:
        notes.append("the search measured qdq with round-to-nearest weights; the pipeline is written with GPTQ "
                     "codes where calibration data allows (rounding=auto), and the result is that pipeline's, "
                     "validated as written")
    final = api.optimize(model if source is None else source, pipeline, calibration=calibration, inputs=inputs,
                         tolerance=budget.validation_tolerance(), seed=seed, dims=dims or None,
                         latency_runs=None if goal.kind == "latency" else FINAL_LATENCY_RUNS,
                         output_kinds=kinds or None, labels=labels)
    result = _result(final, goal, reference, outcome, orig_bytes)
    met, message = _judge(goal, budget, reference.name, result)
    tr = TuneResult(goal, budget, reference.name, met, message, pipeline,
                    {"bytes": orig_bytes, "latency_ms": _ms(final.validation.latency_reference_ms),
                     "metrics": {reference.name: result.pop("reference_value")}},
                    result, layer_rows(layers, outcome), [point_dict(p) for p in outcome.points], final,
                    outcome.evaluations, getattr(ex, "name", str(executor)), int(getattr(ex, "workers", 1)), seed,
                    source=source, notes=notes)
    tr.seconds = time.perf_counter() - start
    return tr


def _params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def sensitivity_samples(params: int, samples: int) -> int:
    """Samples a single-layer evaluation reads: fewer on larger models (by parameters, so the choice
    does not depend on how fast this machine is), all of them when there are few."""
    n = 64 if params < 1_000_000 else 32 if params < 5_000_000 else 16
    return min(samples, n)


def _evaluation_data(original, inputs, calibration, labels, samples, used):
    """The samples the budget metric is measured on, their labels, and a line saying what they are."""
    if inputs is not None:
        data = load_dataset(inputs, original, limit=samples, what="validation data")
        text = f"{data.samples} sample(s) of {data.source}"
    else:
        data, info = held_out(calibration, original, used)
        text = info["text"]
    given = M.load_labels(labels) if labels is not None else None
    if given is not None:
        given = {k: np.asarray(v)[:data.samples] for k, v in given.items()}
    return data, given, text


def _statistics(clean: onnx.ModelProto, feeds: list, samples: int, seed: int, dims: dict, int8: str) -> dict:
    """Every layer input's XᵀX on the cleaned model, in one streaming run (what prune, svd and woq's
    gptq read), and, for static int8, the activation ranges of every layer int8 may take (one qdq
    run over all of them): shared with every evaluation instead of measured again by each."""
    ctx = PassContext(calibration=feeds, seed=seed, dims=dims)
    graph = G.import_graph(clean)
    requests = [r for r in (gram_request(x) for x in L.find_layers(graph, check_input=True).layers
                            if x.top) if r is not None]
    if requests:
        try:
            layer_grams(ctx, clean, requests, samples=samples)
        except Exception:  # noqa: BLE001 - statistics are a saving, not a requirement
            return {}
    if int8:
        try:
            PassManager(Pipeline.parse(int8), ctx, max_growth=None).run(clean)
        except Exception:  # noqa: BLE001 - as above
            pass
    return ctx.cache


def _macs(clean: onnx.ModelProto, layers: list[Layer], feed: dict) -> None:
    """Each layer's multiply-accumulates on ``feed``: its output's size times its inputs per output."""
    graph = G.import_graph(clean)
    found = {x.node.name: x for x in L.find_layers(graph, check_input=True).layers}
    wanted = {x.name: found[x.name] for x in layers if x.name in found}
    names = [w.node.outputs[0].name for w in wanted.values()]
    if not names:
        return
    with open_session(with_outputs(clean, names), "disable") as held:
        outs = held.sess.run(names, feed)
    for (name, layer), out in zip(wanted.items(), outs):
        match = next(x for x in layers if x.name == name)
        match.macs = float(np.asarray(out).size) * float(layer.in_features)


def _result(final, goal, reference, outcome, orig_bytes) -> dict:
    """The final model's figures, from optimize's validation against the original."""
    comp = final.validation
    m = measure.budget_metric(comp) if comp is not None else None
    nbytes = serialized_size(final.model)
    out = {"bytes": nbytes, "latency_ms": _ms(comp.latency_candidate_ms) if comp else None,
           "metrics": {reference.name: round(m.candidate, 4) if m else None},
           "reference_value": round(m.reference, 4) if m else None,
           "size_ratio": round(nbytes / orig_bytes, 4), "latency_ratio": None,
           "drop": round(m.drop, 4) if m else None, "cosine": round(m.cosine, 6) if m else None,
           "passed": bool(comp.passed) if comp is not None else None}
    if comp is not None and comp.latency_reference_ms and comp.latency_candidate_ms:
        out["latency_ratio"] = round(comp.latency_candidate_ms / comp.latency_reference_ms, 4)
    chosen = outcome.chosen
    if goal.kind == "latency" and chosen is not None and chosen.latency_ratio is not None:
        out["search_latency_ratio"] = round(chosen.latency_ratio, 4)
    return out


def _judge(goal: Target, budget: Budget, metric: str, result: dict) -> tuple[bool, str]:
    """Met when the final model (as optimize validated it) reaches the target within the budget."""
    # latency: the search's ratio (candidate and original timed back to back, 20 runs each) decides;
    # the final validation's timing is reported beside it
    ratio = result["size_ratio"] if goal.kind == "size" else (result.get("search_latency_ratio") or result.get(
        "latency_ratio"))
    drop = result["drop"] if result["drop"] is not None else float("inf")
    value = result["metrics"].get(metric)
    ref = result.get("reference_value")
    unit = "%" if metric == "accuracy" else ""
    figures = (f"{goal.kind} {ratio:.3f}x" if ratio is not None else f"{goal.kind} not measured") + (
        f" with {metric} {ref:.2f}{unit} -> {value:.2f}{unit} (drop {drop:.2f})" if ref is not None else "")
    in_budget = budget.holds(drop, bool(result.get("passed", True)))
    reached = ratio is not None and ratio <= goal.value + 1e-9
    if reached and in_budget:
        limit = f" <= {budget.max_drop:g}" if budget.max_drop is not None else ""
        return True, figures.replace(f"{ratio:.3f}x", f"{ratio:.3f}x <= {goal.value:g}x").replace(
            f"(drop {drop:.2f})", f"(drop {drop:.2f}{limit})")
    why = (f"{goal} not reached within the budget ({budget_text(budget, metric)})" if not reached else
           f"{goal} reached only past the budget ({budget_text(budget, metric)})")
    return False, f"{why}; closest point: {figures}"


def _ms(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(float(x), 4)
