"""One self-contained HTML document: inline CSS, plotly.js inline (the file works offline), tables,
figures and a pipeline block with a copy button. Every text from a report is escaped here."""

from __future__ import annotations

import html
import math
from typing import Any, Iterable, Optional, Sequence

from ..report import human_bytes as report_bytes

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2937;
       margin: 0; background: #f6f7f9; }
main { max-width: 1180px; margin: 0 auto; padding: 20px 28px 40px; }
h1 { font-size: 22px; margin: 4px 0 8px; } h2 { font-size: 17px; margin: 28px 0 8px; }
section { background: #fff; border: 1px solid #e3e6ea; border-radius: 8px; padding: 4px 18px 14px;
          margin-top: 16px; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 12px; font-weight: 600; color: #fff;
         vertical-align: middle; margin-right: 8px; font-size: 13px; }
.ok { background: #15803d; } .bad { background: #b91c1c; } .neutral { background: #6b7280; }
.message { font-size: 15px; margin: 8px 0; }
.facts { color: #4b5563; margin: 4px 0 10px; } .facts span { margin-right: 18px; white-space: nowrap; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 12px 0 4px; }
.card { background: #fff; border: 1px solid #e3e6ea; border-radius: 8px; padding: 8px 14px; min-width: 170px; }
.card .label { color: #6b7280; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 18px; font-weight: 600; } .card .sub { color: #4b5563; font-size: 12px; }
.pipeline { display: flex; gap: 8px; align-items: flex-start; margin: 6px 0; }
.pipeline pre { flex: 1; margin: 0; background: #0f172a; color: #e2e8f0; padding: 8px 10px; border-radius: 6px;
                white-space: pre-wrap; word-break: break-all; font-size: 12.5px; }
button.copy { border: 1px solid #cbd5e1; background: #fff; border-radius: 6px; padding: 6px 10px; cursor: pointer; }
table { border-collapse: collapse; width: 100%; margin: 6px 0; font-size: 13px; }
th, td { padding: 4px 8px; border-bottom: 1px solid #edf0f3; text-align: left; vertical-align: top; }
th { background: #f3f4f6; font-weight: 600; position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.chosen td { background: #ecfdf5; } tr.fail td { background: #fef2f2; }
td code, li code { font-size: 12px; word-break: break-all; } td code.name { word-break: normal; white-space: nowrap; }
.state-ok { color: #15803d; font-weight: 600; } .state-bad { color: #b91c1c; font-weight: 600; }
.note { color: #4b5563; font-size: 13px; } details { margin: 8px 0; } summary { cursor: pointer; color: #1d4ed8; }
.figure { margin: 4px 0; }
"""

# Copy the pipeline: the clipboard API where the page may use it, else a selection and execCommand.
COPY_JS = """
function onnxoptCopy(id, button) {
  var text = document.getElementById(id).textContent;
  var done = function () {
    button.textContent = "copied"; setTimeout(function () { button.textContent = "copy"; }, 1500);
  };
  if (navigator.clipboard && window.isSecureContext) { navigator.clipboard.writeText(text).then(done); return; }
  var range = document.createRange(); range.selectNodeContents(document.getElementById(id));
  var sel = window.getSelection(); sel.removeAllRanges(); sel.addRange(range);
  try { document.execCommand("copy"); done(); } catch (e) {}
}
"""

# No logo link, no calls home: the page is a file people open offline.
PLOT_CONFIG = {"displaylogo": False, "responsive": True, "modeBarButtonsToRemove": ["select2d", "lasso2d"]}
DASH = "\u2013"  # shown where a figure does not apply


class Raw(str):
    """HTML that is already safe (built here); everything else is escaped."""


def esc(value: Any) -> str:
    return value if isinstance(value, Raw) else html.escape("" if value is None else str(value))


def tag(name: str, body: Any = "", cls: Optional[str] = None, **attrs: Any) -> Raw:
    parts = [name] + ([f'class="{esc(cls)}"'] if cls else [])
    parts += [f'{k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items() if v is not None]
    return Raw(f"<{' '.join(parts)}>{esc(body)}</{name}>")


def join(items: Iterable[Any], sep: str = "") -> Raw:
    return Raw(sep.join(esc(i) for i in items))


# ----------------------------------------------------------------- numbers as the page shows them

def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def num(value: Any, spec: str = ".3g") -> str:
    """A number in ``spec``; JSON's 'nan'/'inf' strings as they are; None as a dash."""
    if value is None:
        return DASH
    if isinstance(value, str):
        return value
    return format(value, spec)


def ratio(value: Any) -> str:
    """0.24 -> '0.24x' (three significant digits below 0.1)."""
    if not finite(value):
        return num(value)
    return f"{value:.2f}x" if abs(value) >= 0.1 else f"{value:.3g}x"


def percent(fraction: Any) -> str:
    """A fraction as the summary prints it: 0.99444 -> '99.44%'."""
    return f"{100 * fraction:.2f}%" if finite(fraction) else num(fraction)


def count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else num(value)


def human_bytes(n: Any) -> str:
    return report_bytes(n) if finite(n) else num(n)


def change(before: Any, after: Any) -> str:
    """'(-66.4%)', or '' where it means nothing."""
    if not (finite(before) and finite(after)) or before == 0:
        return ""
    return f"({100.0 * (after - before) / before:+.1f}%)"


def arrow(before: str, after: str) -> str:
    return f"{before} \u2192 {after}"


# ----------------------------------------------------------------- building blocks

def badge(text: str, good: Optional[bool]) -> Raw:
    return tag("span", text, cls="badge " + ("neutral" if good is None else "ok" if good else "bad"))


def card(label: str, value: str, sub: str = "") -> Raw:
    return tag("div", join([tag("div", label, cls="label"), tag("div", value, cls="value"),
                            tag("div", sub, cls="sub") if sub else ""]), cls="card")


def cards(items: Sequence[Raw]) -> Raw:
    return tag("div", join(items), cls="cards")


def facts(items: dict[str, Any]) -> Raw:
    return tag("div", join(tag("span", Raw(f"{esc(k)}: <b>{esc(v)}</b>")) for k, v in items.items()), cls="facts")


def pipeline_block(pipeline: str, element_id: str, label: str = "copy") -> Raw:
    """The pipeline (or command) in a block with a copy button."""
    button = Raw(f'<button class="copy" onclick="onnxoptCopy(\'{element_id}\', this)">{esc(label)}</button>')
    return tag("div", join([tag("pre", pipeline, id=element_id), button]), cls="pipeline")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = (),
          row_classes: Optional[Sequence[Optional[str]]] = None, cls: Optional[str] = None) -> Raw:
    """Headers and rows of cells (escaped unless Raw); columns in ``numeric`` align right."""
    numeric = set(numeric)
    head = join(tag("th", h, cls="num" if i in numeric else None) for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        cells = join(tag("td", c, cls="num" if i in numeric else None) for i, c in enumerate(row))
        body.append(tag("tr", cells, cls=row_classes[r] if row_classes else None))
    return tag("table", join([tag("thead", tag("tr", head)), tag("tbody", join(body))]), cls=cls)


def section(title: str, *body: Any) -> Raw:
    return tag("section", join([tag("h2", title), *body]))


def details(summary: str, *body: Any) -> Raw:
    return tag("details", join([tag("summary", summary), *body]))


def note(text: str) -> Raw:
    return tag("p", text, cls="note")


def bullet_list(items: Iterable[Any]) -> Raw:
    items = list(items)
    return tag("ul", join(tag("li", i) for i in items), cls="note") if items else Raw("")


class Page:
    """A document under construction: blocks in order, figures numbered, plotly.js once in the head."""

    def __init__(self, title: str):
        self.title = title
        self.blocks: list[Raw] = []
        self._figures = 0

    def add(self, *blocks: Any) -> None:
        self.blocks.extend(Raw(esc(b)) for b in blocks if b)

    def figure(self, fig: Any) -> Raw:
        """A plotly figure as a div and its script (plotly escapes the data it embeds)."""
        self._figures += 1
        div = fig.to_html(full_html=False, include_plotlyjs=False, config=PLOT_CONFIG,
                          div_id=f"figure-{self._figures}")
        return tag("div", Raw(div), cls="figure")

    def render(self) -> str:
        from plotly.offline import get_plotlyjs  # the whole library inline: no network needed to open it

        return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
                f"<title>{esc(self.title)}</title>\n<style>{CSS}</style>\n"
                f"<script type=\"text/javascript\">{COPY_JS}</script>\n"
                f"<script type=\"text/javascript\">{get_plotlyjs()}</script>\n"
                "</head>\n<body>\n<main>\n" + "\n".join(self.blocks) + "\n</main>\n</body>\n</html>\n")
