"""HTML reports: one self-contained file (plotly.js inline, works offline) per `optimize` or `tune` run,
rendered from the same dict the JSON report holds.

plotly is an optional extra (`pip install 'onnxopt[html]'`): it is imported only when a page is
written; callers check ``require_plotly()`` before any work so a missing extra costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError

NEEDS_PLOTLY = "--html needs plotly: pip install 'onnxopt[html]'"


def require_plotly() -> None:
    """InputError (exit 2) with the install line unless plotly can be imported."""
    try:
        import plotly.graph_objects  # noqa: F401
    except ImportError:
        raise InputError(NEEDS_PLOTLY) from None


def render_optimize_report(report: dict) -> str:
    require_plotly()
    from . import optimize

    return optimize.build(report).render()


def render_tune_report(report: dict) -> str:
    require_plotly()
    from . import tune

    return tune.build(report).render()


def write_optimize_report(report: dict, path: str | os.PathLike) -> Path:
    """The page of an `optimize` run (``OptimizeResult.to_dict()``), written atomically."""
    return _write(render_optimize_report(report), path)


def write_tune_report(report: dict, path: str | os.PathLike) -> Path:
    """The page of a `tune` run (``TuneResult.to_dict()``), written atomically."""
    return _write(render_tune_report(report), path)


def _write(text: str, path: str | os.PathLike) -> Path:
    from ..report import write_text_atomic

    target = Path(path)
    write_text_atomic(target, text)
    return target
