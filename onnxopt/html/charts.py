"""The figures of the reports, as plotly figures built from the JSON reports' plain data."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import plotly.graph_objects as go

from .page import finite, ratio

GREEN, RED, BLUE, GREY, AMBER = "#15803d", "#b91c1c", "#2563eb", "#9ca3af", "#d97706"
SETTING_COLORS = ["#2563eb", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#ea580c", "#4b5563",
                  "#0d9488", "#9333ea"]
MAX_SENSITIVITY_LAYERS = 60  # a bar chart past that is unreadable; the table lists every layer


def _layout(fig: go.Figure, height: int, **extra: Any) -> go.Figure:
    fig.update_layout(template="plotly_white", height=height, margin=dict(l=10, r=10, t=36, b=10),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="left", x=0),
                      font=dict(size=12), **extra)
    return fig


def _short(text: str, width: int = 110) -> str:
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def pareto(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (smaller x, smaller drop), by x."""
    front, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def tradeoff(points: list[dict], axis: str, axis_title: str, target: Optional[float],
             max_drop: Optional[float], metric: str) -> go.Figure:
    """Size (or latency) ratio vs accuracy drop of every point tried, the original at (1, 0),
    the best trade-offs joined, the chosen point a star, the target and the budget as lines."""
    fig = go.Figure()
    tried = [p for p in points if finite(p.get(axis)) and finite(p.get("drop"))]
    hover = [f"<b>{p.get('label', '')}</b><br>size {ratio(p.get('size_ratio'))}, latency "
             f"{ratio(p.get('latency_ratio'))}<br>drop {p['drop']:.2f}"
             + (f", cosine {p['cosine']:.4f}" if finite(p.get("cosine")) else "")
             + f"<br>{_short(str(p.get('pipeline', '')))}" for p in tried]
    front = pareto([(p[axis], p["drop"]) for p in tried] + [(1.0, 0.0)])  # the original is a trade-off too
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=[x for x, _ in front], y=[y for _, y in front], mode="lines",
                                 line=dict(color=GREY, dash="dot"), name="best trade-offs", hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=[p[axis] for p in tried], y=[p["drop"] for p in tried], mode="markers",
                             marker=dict(color=BLUE, size=8, opacity=0.75), name="points tried",
                             text=hover, hoverinfo="text"))
    fig.add_trace(go.Scatter(x=[1.0], y=[0.0], mode="markers", name="original",
                             marker=dict(color="#111827", size=9, symbol="diamond"), hoverinfo="name"))
    chosen = [i for i, p in enumerate(tried) if p.get("chosen")]
    if chosen:
        fig.add_trace(go.Scatter(x=[tried[i][axis] for i in chosen], y=[tried[i]["drop"] for i in chosen],
                                 mode="markers", name="chosen", text=[hover[i] for i in chosen], hoverinfo="text",
                                 marker=dict(color=GREEN, size=18, symbol="star", line=dict(color="#064e3b", width=1))))
    if finite(target):
        fig.add_vline(x=target, line=dict(color=AMBER, dash="dash"), annotation_text=f"target {ratio(target)}",
                      annotation_position="top left")
    if finite(max_drop):
        fig.add_hline(y=max_drop, line=dict(color=RED, dash="dash"), annotation_text=f"budget {max_drop:g}",
                      annotation_position="bottom right")
    fig.update_xaxes(title_text=axis_title, rangemode="tozero")
    fig.update_yaxes(title_text=f"{metric} drop (points, lower is better)", zeroline=True)
    return _layout(fig, 460)


def sensitivity(layers: list[dict], metric: str) -> tuple[go.Figure, int]:
    """Per-layer drop of each candidate setting measured alone, the most sensitive layer (the one
    whose gentlest setting costs most) on top; the chosen setting's bar outlined. Returns the
    figure and how many layers it shows."""
    def least(layer: dict) -> float:
        drops = [c["drop"] for c in layer.get("candidates") or [] if finite(c.get("drop"))]
        return min(drops, default=float("-inf"))

    shown = sorted((layer for layer in layers if layer.get("candidates")), key=least, reverse=True)
    shown = shown[:MAX_SENSITIVITY_LAYERS][::-1]  # plotly draws the first category at the bottom
    settings = list(dict.fromkeys(c.get("setting", "?") for layer in shown for c in layer["candidates"]))
    names = [str(layer.get("name", "?")) for layer in shown]
    fig = go.Figure()
    for k, setting in enumerate(settings):
        rows = [(name, next((c for c in layer["candidates"] if c.get("setting") == setting), None), layer)
                for name, layer in zip(names, shown)]
        rows = [(name, c, layer) for name, c, layer in rows if c is not None and finite(c.get("drop"))]
        if not rows:
            continue
        fig.add_trace(go.Bar(
            y=[name for name, _, _ in rows], x=[c["drop"] for _, c, _ in rows], orientation="h", name=setting,
            marker=dict(color=SETTING_COLORS[k % len(SETTING_COLORS)],
                        line=dict(color="#111827", width=[2.5 if layer.get("chosen") == setting else 0
                                                          for _, _, layer in rows])),
            customdata=[[c.get("bytes_saved"), c.get("ms_saved"), "chosen" if layer.get("chosen") == setting else ""]
                        for _, c, layer in rows],
            hovertemplate=f"%{{y}}: {setting}<br>drop %{{x:.3f}}<br>bytes saved %{{customdata[0]:,}}"
                          "<br>ms saved %{customdata[1]}<br>%{customdata[2]}<extra></extra>"))
    fig.update_yaxes(categoryorder="array", categoryarray=names, automargin=True)
    fig.update_xaxes(title_text=f"{metric} drop when only this layer changes (points)")
    per_layer = max(18, 7 * len(settings))
    return _layout(fig, min(2600, 140 + per_layer * len(shown)), barmode="group"), len(shown)


def pass_bytes(rows: list[dict], before: Optional[dict] = None, after: Optional[dict] = None) -> go.Figure:
    """Tensor bytes through the pipeline: the original, the change of each pass that changed them, the result."""
    changed = [r for r in rows if r["bytes_after"] != r["bytes_before"]]
    start = rows[0]["bytes_before"] if rows else (before or {}).get("tensor_bytes", 0)
    end = rows[-1]["bytes_after"] if rows else (after or {}).get("tensor_bytes", start)
    x = ["original"] + [r["label"] for r in changed] + ["result"]
    y = [start] + [r["bytes_after"] - r["bytes_before"] for r in changed] + [end]
    measure = ["absolute"] + ["relative"] * len(changed) + ["total"]
    fig = go.Figure(go.Waterfall(
        x=x, y=y, measure=measure, connector=dict(line=dict(color=GREY, width=1)),
        decreasing=dict(marker=dict(color=GREEN)), increasing=dict(marker=dict(color=RED)),
        totals=dict(marker=dict(color=BLUE)), hovertemplate="%{x}: %{y:,} B<extra></extra>"))
    fig.update_yaxes(title_text="tensor bytes")
    fig.update_layout(title=dict(text="tensor bytes, pass by pass (passes that changed them)", font=dict(size=13)))
    return _layout(fig, 320, showlegend=False)


def output_errors(outputs: list[dict]) -> Optional[go.Figure]:
    """Max abs error of each output beside ONNX Runtime's own noise on it (log scale), an output a row."""
    rows = [o for o in outputs if finite(o.get("max_abs"))][::-1]  # plotly draws the first row at the bottom
    if not rows:
        return None
    names = [str(o.get("name")) for o in rows]
    fig = go.Figure()
    floors = [o.get("floor_max_abs") for o in rows]
    if any(finite(f) for f in floors):
        fig.add_trace(go.Bar(y=names, x=[max(f, 1e-12) if finite(f) else None for f in floors], orientation="h",
                             name="runtime noise floor", marker_color=GREY,
                             customdata=[f if finite(f) else None for f in floors],
                             hovertemplate="%{y}: runtime noise %{customdata:.3g}<extra></extra>"))
    fig.add_trace(go.Bar(y=names, x=[max(o["max_abs"], 1e-12) for o in rows], orientation="h", name="max abs error",
                         marker_color=[GREEN if o.get("passed", True) else RED for o in rows],
                         customdata=[o["max_abs"] for o in rows],
                         hovertemplate="%{y}: max abs %{customdata:.3g}<extra></extra>"))
    fig.update_xaxes(type="log", title_text="max abs error vs the runtime's own noise (log)")
    fig.update_yaxes(automargin=True)
    return _layout(fig, min(2000, 150 + 44 * len(rows)), barmode="group", legend_traceorder="reversed")
