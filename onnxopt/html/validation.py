"""The validation section both pages share: per-output figures as the summary prints them,
the user's metrics, the verdict, latency, and a chart of each output's error beside the runtime's noise."""

from __future__ import annotations

from typing import Any, Optional

from . import charts
from .page import (DASH, Page, Raw, arrow, bullet_list, finite, human_bytes, join, note, num, percent, section,
                   table, tag)


def tolerance_text(tol: Optional[dict]) -> str:
    if not tol:
        return "none"
    parts = []
    for key, value in tol.items():
        if isinstance(value, dict):
            parts += [f"{key}={name}:{limit:g}" if finite(limit) else f"{key}={name}:{limit}"
                      for name, limit in value.items()]
        else:
            parts.append(f"{key}={value:g}" if finite(value) else f"{key}={value}")
    return ",".join(parts)


def _state(o: dict) -> Raw:
    if not o.get("passed", True):
        return tag("span", "FAIL", cls="state-bad")
    return tag("span", "identical" if o.get("identical") else "ok", cls="state-ok")


def _kind_figures(o: dict) -> str:
    """The figures that fit the output's kind, worded as in the summary."""
    parts = []
    if o.get("top1_agreement") is not None:
        what = "top-1 agreement" if o.get("kind") == "classes" else "per-position top-1 agreement"
        parts.append(f"{what} {percent(o['top1_agreement'])}")
    if o.get("sequence_match") is not None:
        parts.append(f"sequence match {percent(o['sequence_match'])}")
    if o.get("accuracy_reference") is not None:
        parts.append(f"accuracy {arrow(percent(o['accuracy_reference']), percent(o.get('accuracy_candidate')))}")
    if o.get("vector_cosine_mean") is not None:
        parts.append(f"per-vector cosine mean {num(o['vector_cosine_mean'], '.6f')} "
                     f"(worst {num(o.get('vector_cosine_min'), '.6f')})")
    if o.get("perplexity_reference") is not None:
        ref, cand = num(o["perplexity_reference"], ".6g"), num(o.get("perplexity_candidate"), ".6g")
        parts.append(f"perplexity {arrow(ref, cand)}")
    return "; ".join(parts) or DASH


def _output_rows(outputs: list[dict]) -> tuple[list[list[Any]], list[Optional[str]]]:
    rows, classes = [], []
    for o in outputs:
        kind = tag("span", o.get("kind", "?"), title=o.get("kind_reason"))
        failures = bullet_list(o.get("failures") or [])
        if o.get("elements") and not o.get("compared") and o.get("nonfinite_reference"):
            figures = [DASH] * 5 + ["no finite value to compare"]
        else:
            figures = [num(o.get("max_abs")), num(o.get("floor_max_abs")), num(o.get("mean_abs")),
                       num(o.get("cosine"), ".6f"), num(o.get("snr_db"), ".1f") + " dB", _kind_figures(o)]
        name = join([tag("code", o.get("name")), failures])
        rows.append([name, kind, _state(o), *figures])
        classes.append(None if o.get("passed", True) else "fail")
    return rows, classes


def _metric_rows(metrics: list[dict]) -> list[list[Any]]:
    return [[m.get("name"), m.get("source"), "lower is better" if m.get("lower_is_better") else "higher is better",
             arrow(num(m.get("reference"), ".6g"), num(m.get("candidate"), ".6g")), num(m.get("drop"), ".4g"),
             num(m.get("limit"), "g"), _state(m)] for m in metrics]


def validation_section(page: Page, v: Optional[dict], not_run: Optional[str] = None,
                       inputs_text: Optional[str] = None) -> Raw:
    if not v:
        reason = f"not run ({not_run})" if not_run else "skipped"
        return section("Validation", note(f"validation: {reason}"))
    source = "synthetic inputs" if v.get("synthetic") else v.get("data")
    verdict = tag("span", "PASSED" if v.get("passed") else "FAILED",
                  cls="state-ok" if v.get("passed") else "state-bad")
    head = tag("p", join([verdict, f" (tolerance {tolerance_text(v.get('tolerance'))}): ONNX Runtime "
                                   f"(optimization level '{v.get('ort_opt_level')}'), {v.get('samples')} sample(s) "
                                   f"from {source}"]))
    rows, classes = _output_rows(v.get("outputs") or [])
    blocks = [head, note(f"validation inputs: {inputs_text}") if inputs_text else "",
              table(["output", "kind", "state", "max abs", "runtime noise", "mean abs", "cosine", "SNR",
                     "agreement / accuracy"], rows, numeric=(3, 4, 5, 6, 7), row_classes=classes)]
    if v.get("floor_level"):
        blocks.append(note(f"runtime noise: the original's own max abs difference between optimization levels "
                           f"'{v.get('ort_opt_level')}' and '{v['floor_level']}'"))
    if v.get("metrics"):
        blocks.append(table(["metric", "source", "", "original \u2192 optimized", "drop", "limit", "state"],
                            _metric_rows(v["metrics"]), numeric=(3, 4, 5)))
    blocks.append(_sizes_and_latency(v))
    blocks.append(bullet_list(f"note: {n}" for n in v.get("notes") or []))
    fig = charts.output_errors(v.get("outputs") or [])
    if fig is not None:
        blocks.append(page.figure(fig))
    return section("Validation", *blocks)


def _sizes_and_latency(v: dict) -> Raw:
    parts = []
    if v.get("size_reference"):
        parts.append(f"size {arrow(human_bytes(v['size_reference']), human_bytes(v.get('size_candidate')))}")
    ref, cand = v.get("latency_reference_ms"), v.get("latency_candidate_ms")
    if finite(ref) and finite(cand):
        speed = f" ({ref / cand:.2f}x speed-up)" if cand else ""
        parts.append(f"latency (median) {arrow(f'{ref:.3f} ms', f'{cand:.3f} ms')}{speed}")
    return note("; ".join(parts)) if parts else Raw("")
