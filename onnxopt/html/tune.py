"""The page of one `onnxopt tune` run, from its JSON report (TuneResult.to_dict(), schema onnxopt.tune/1)."""

from __future__ import annotations

import shlex
from typing import Any

from . import charts
from .page import (DASH, Page, arrow, badge, card, cards, count, details, facts, human_bytes, join, note, num,
                   pipeline_block, ratio, section, table, tag)
from .validation import validation_section

AXES = {"size": ("size_ratio", "size (x of the original file)"),
        "latency": ("latency_ratio", "latency (x of the original's median)")}


def drop(value: Any) -> str:
    """A drop in points as the page shows it: 0.55 -> '0.55'."""
    return num(value, ".2f")


def metric(value: Any) -> str:
    return num(value, ".4g")


def _header(report: dict) -> list[Any]:
    target, budget = report.get("target") or {}, report.get("budget") or {}
    met = report.get("met")
    where = f"{report.get('source') or 'model'}" + (f" \u2192 {report['output']}" if report.get("output") else
                                                    " (nothing written)")
    workers = report.get("workers")
    executor = f"{report.get('executor', DASH)}" + (f" ({workers} worker{'s' if workers != 1 else ''})"
                                                     if isinstance(workers, int) else "")
    command = f"onnxopt optimize {shlex.quote(str(report.get('source') or 'MODEL'))} --passes " \
              f"{shlex.quote(str(report.get('pipeline', '')))}"
    return [
        tag("h1", f"onnxopt tune: {where}"),
        badge("target met" if met else "target not met", bool(met)),
        tag("span", f"target {target.get('kind', '?')} \u2264 {ratio(target.get('value'))}, "
                    f"{budget.get('metric', 'metric')} drop \u2264 {num(budget.get('max_drop'), 'g')} points"),
        tag("p", report.get("message", ""), cls="message"),
        facts({"evaluations": count(report.get("evaluations")), "executor": executor,
               "seed": report.get("seed", DASH), "time": f"{num(report.get('seconds'), '.1f')} s"}),
        tag("div", "pipeline:", cls="note"), pipeline_block(report.get("pipeline", ""), "pipeline"),
        details("the command that reproduces the model", pipeline_block(command, "command")),
    ]


def _cards(report: dict) -> Any:
    base, res = report.get("baseline") or {}, report.get("result") or {}
    budget_metric = (report.get("budget") or {}).get("metric")
    items = [card("size", arrow(human_bytes(base.get("bytes")), human_bytes(res.get("bytes"))),
                  ratio(res.get("size_ratio")) + " of the original"),
             card("latency (median)", arrow(num(base.get("latency_ms"), ".3f") + " ms",
                                            num(res.get("latency_ms"), ".3f") + " ms"),
                  ratio(res.get("latency_ratio")) + " of the original")]
    for name, before in (base.get("metrics") or {}).items():
        after = (res.get("metrics") or {}).get(name)
        sub = f"drop {drop(res.get('drop'))} points" if name == budget_metric else ""
        items.append(card(name, arrow(metric(before), metric(after)), sub))
    return cards(items)


def _curve_section(page: Page, report: dict) -> Any:
    points = report.get("points") or []
    kind = (report.get("target") or {}).get("kind", "size")
    axis, title = AXES.get(kind, AXES["size"])
    budget = report.get("budget") or {}
    name = budget.get("metric", "metric")
    fig = charts.tradeoff(points, axis, title, (report.get("target") or {}).get("value"), budget.get("max_drop"), name)
    rows = [[i + 1, p.get("label"), ratio(p.get("size_ratio")), ratio(p.get("latency_ratio")), drop(p.get("drop")),
             num(p.get("cosine"), ".4f"), "chosen" if p.get("chosen") else "", tag("code", p.get("pipeline"))]
            for i, p in enumerate(points)]
    listing = table(["#", "point", "size", "latency", "drop", "cosine", "", "pipeline"], rows, numeric=(0, 2, 3, 4, 5),
                    row_classes=["chosen" if p.get("chosen") else None for p in points])
    return section(f"{'Size' if kind == 'size' else 'Latency'} vs {name} drop",
                   note(f"{len(points)} assembled model(s) measured, in search order; the star is the chosen one, "
                        f"the dashed lines the target and the budget."),
                   page.figure(fig), details(f"every point tried ({len(points)})", listing))


def _layers_section(page: Page, report: dict) -> list[Any]:
    layers = report.get("layers") or []
    if not layers:
        return [section("Per-layer sensitivity", note("no per-layer measurements in this report"))]
    name = (report.get("budget") or {}).get("metric", "metric")
    fig, shown = charts.sensitivity(layers, name)
    caption = (f"the {shown} most sensitive of {len(layers)} layers" if shown < len(layers)
               else f"{len(layers)} layers") + (": each setting measured on that layer alone, the layer whose "
                                                "gentlest setting costs most on top; the chosen setting's bar outlined")
    rows, classes = [], []
    for layer in layers:
        candidates = layer.get("candidates") or []
        chosen = next((c for c in candidates if c.get("setting") == layer.get("chosen")), {})
        others = join([f"{c.get('setting')} {drop(c.get('drop'))}" for c in candidates], " \u00b7 ")
        rows.append([tag("code", layer.get("name")), layer.get("op"), count(layer.get("params")),
                     count(layer.get("bytes")), tag("b", layer.get("chosen", "float")),
                     drop(chosen.get("drop")) if chosen else DASH,
                     count(chosen.get("bytes_saved")) if chosen else DASH,
                     num(chosen.get("ms_saved"), ".3f") if chosen else DASH, others])
        classes.append("chosen" if layer.get("chosen") not in (None, "float") else None)
    chosen_table = table(["layer", "op", "params", "bytes", "chosen", "drop alone", "bytes saved", "ms saved",
                          "settings measured (drop)"], rows, numeric=(2, 3, 5, 6, 7), row_classes=classes)
    return [section("Per-layer sensitivity", note(caption), page.figure(fig)),
            section("Chosen setting per layer", chosen_table)]


def build(report: dict) -> Page:
    page = Page(f"onnxopt tune: {report.get('source') or 'model'}")
    page.add(*_header(report), _cards(report), _curve_section(page, report))
    page.add(*_layers_section(page, report))
    page.add(validation_section(page, report.get("validation")))
    return page

