"""The page of one `onnxopt optimize` run, from its JSON report (OptimizeResult.to_dict())."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..pipeline import PassRecord
from ..report import _did, _merge_repeats
from . import charts
from .page import (Page, arrow, badge, bullet_list, card, cards, change, count, details, facts, finite, human_bytes,
                   note, num, percent, pipeline_block, section, table, tag)
from .validation import validation_section


def _records(passes: list[dict]) -> list[PassRecord]:
    fields = {f.name for f in dataclasses.fields(PassRecord)}
    return [PassRecord(**{k: v for k, v in p.items() if k in fields}) for p in passes]


def pass_rows(passes: list[dict]) -> list[dict[str, Any]]:
    """One row per pass as the summary shows it (runs of a fixed-point group summed)."""
    rows = []
    for r, runs in _merge_repeats(_records(passes)):
        label = r.name + (" (auto)" if r.auto else "") + (f" x{runs}" if runs > 1 else "")
        rows.append({"label": label, "canonical": r.canonical, "seconds": r.seconds, "modified": r.modified,
                     "nodes_before": r.nodes_before, "nodes_after": r.nodes_after,
                     "params_before": r.params_before, "params_after": r.params_after,
                     "bytes_before": r.bytes_before, "bytes_after": r.bytes_after, "did": _did(r)})
    return rows


def _header(report: dict) -> list[Any]:
    v = report.get("validation")
    if v:
        state = badge("PASSED" if report.get("passed") else "FAILED", bool(report.get("passed")))
    else:
        state = badge("validation not run" if report.get("validation_not_run") else "validation skipped", None)
    where = f"{report.get('source') or 'model'}" + (f" \u2192 {report['output']}" if report.get("output") else
                                                    " (nothing written)")
    return [tag("h1", f"onnxopt optimize: {where}"), state,
            facts({"passes run": len(report.get("passes") or []), "time": f"{num(report.get('seconds'), '.2f')} s"}),
            tag("div", "pipeline (reproduces this run with --passes):", cls="note"),
            pipeline_block(report.get("pipeline", ""), "pipeline")]


def _cards(report: dict) -> Any:
    b, a = report.get("before") or {}, report.get("after") or {}
    items = [card("file size", arrow(human_bytes(b.get("file_bytes")), human_bytes(a.get("file_bytes"))),
                  change(b.get("file_bytes"), a.get("file_bytes"))),
             card("nodes", arrow(count(b.get("nodes")), count(a.get("nodes")))),
             card("parameters", arrow(count(b.get("parameters")), count(a.get("parameters"))),
                  change(b.get("parameters"), a.get("parameters")))]
    v = report.get("validation") or {}
    ref, cand = v.get("latency_reference_ms"), v.get("latency_candidate_ms")
    if finite(ref) and finite(cand):
        items.append(card("latency (median)", arrow(f"{ref:.3f} ms", f"{cand:.3f} ms"),
                          f"{ref / cand:.2f}x speed-up" if cand else ""))
    for o in [o for o in v.get("outputs") or [] if o.get("accuracy_reference") is not None][:2]:
        items.append(card(f"accuracy ({o.get('name')})",
                          arrow(percent(o["accuracy_reference"]), percent(o.get("accuracy_candidate")))))
    return cards(items)


def _passes_section(page: Page, report: dict) -> Any:
    passes = report.get("passes") or []
    if not passes:
        return section("Passes", note("no pass ran"))
    rows = pass_rows(passes)
    cells = [[tag("code", r["label"], cls="name", title=r["canonical"]), f"{r['seconds'] * 1000:.1f} ms",
              arrow(count(r["nodes_before"]), count(r["nodes_after"])),
              arrow(count(r["params_before"]), count(r["params_after"])),
              arrow(count(r["bytes_before"]), count(r["bytes_after"])), r["did"]] for r in rows]
    notes = dict.fromkeys(f"note ({p.get('name')}): {n}" for p in passes for n in p.get("notes") or [])
    every = table(["pass", "options"], [[p.get("name"), tag("code", p.get("canonical"))] for p in passes])
    return section("Passes", page.figure(charts.pass_bytes(rows, report.get("before"), report.get("after"))),
                   table(["pass", "time", "nodes", "parameters", "tensor bytes", "what it did"], cells,
                         numeric=(1, 2, 3, 4)),
                   bullet_list(notes), details(f"every run with its options ({len(passes)})", every))


def build(report: dict) -> Page:
    page = Page(f"onnxopt optimize: {report.get('source') or 'model'}")
    page.add(*_header(report), _cards(report), _passes_section(page, report))
    inputs = report.get("validation_inputs") or {}
    page.add(validation_section(page, report.get("validation"), report.get("validation_not_run"), inputs.get("text")))
    if report.get("warnings"):
        page.add(section("Warnings", bullet_list(report["warnings"])))
    return page
