"""Tolerance: how close a rewritten model's outputs must stay to the original's (absolute, relative,
cosine, agreement, metric drops), parsed from a spec string, a dict or a recipe."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Union

from ..errors import InputError
from ..options import split_kv, split_top


@dataclass
class Tolerance:
    """What 'still computes the same thing' means; unset fields are not checked.

    ``atol``/``rtol`` are checked elementwise as in numpy.allclose; the others
    on each output as a whole; for float16/bfloat16 outputs atol and rtol are
    widened 10x/100x, as those types round that much coarser than float32.
    ``max_top1_drop`` is in accuracy points when labels are given, else in
    points of top-1 agreement lost. ``floor_multiple`` raises atol, per output,
    to that multiple of ONNX Runtime's own noise on it (the difference between
    the original run with all optimizations and with none): a rewrite is not
    held to more precision than the runtime has. It widens nothing else.
    ``max_metric_drop`` bounds named metrics (the user's metric hook, ``perplexity``): name ->
    how far the candidate may fall below the original (rise above it, for a lower-is-better
    figure), in the metric's own units; ``*`` bounds every metric. Spelled
    ``max_metric_drop=NAME:VALUE`` (repeatable) or ``max_metric_drop=VALUE`` in a spec.
    """

    atol: Optional[float] = None
    rtol: Optional[float] = None
    min_cosine: Optional[float] = None
    min_snr_db: Optional[float] = None
    max_top1_drop: Optional[float] = None
    floor_multiple: Optional[float] = None
    max_metric_drop: Optional[dict[str, float]] = None

    @classmethod
    def parse(cls, spec: Union[str, dict, "Tolerance", None]) -> Optional["Tolerance"]:
        """From 'atol=1e-4,min_cosine=0.999', a mapping, or a Tolerance."""
        if spec is None or isinstance(spec, Tolerance):
            return spec
        metric_drops: dict[str, float] = {}
        if isinstance(spec, str):
            items = [split_kv(item, "tolerance") for item in split_top(spec) if item.strip()]
            for key, raw in items:
                if key == "max_metric_drop":  # may repeat, one metric each
                    metric_drops.update(_metric_drops(raw))
            spec = dict(items)
        if not isinstance(spec, dict):
            raise InputError(f"tolerance: expected 'key=value,...' or a mapping, got {type(spec).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in spec.items():
            if key not in known:
                raise InputError(f"tolerance has no field '{key}'; its fields: {', '.join(sorted(known))}")
            if key == "max_metric_drop":
                values[key] = metric_drops or _metric_drops(raw)
                continue
            try:
                values[key] = float(raw)
            except (TypeError, ValueError):
                raise InputError(f"tolerance '{key}': expected a number, got {raw!r}") from None
        return cls(**values)

    def merged(self, other: "Tolerance") -> "Tolerance":
        """The looser of two tolerances, field by field."""
        out = {}
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a is None or b is None:
                out[f.name] = a if b is None else b
            elif isinstance(a, dict):
                out[f.name] = {k: max(a.get(k, -math.inf), b.get(k, -math.inf)) for k in {**a, **b}}
            elif f.name.startswith("min_"):
                out[f.name] = min(a, b)
            else:
                out[f.name] = max(a, b)
        return Tolerance(**out)

    def __str__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                parts.extend(f"{f.name}={k}:{v:g}" if k != "*" else f"{f.name}={v:g}" for k, v in value.items())
            elif value is not None and not (f.name == "min_cosine" and value <= -1.0):  # bounds nothing
                parts.append(f"{f.name}={value:g}")
        return ",".join(parts) or "none"


def _metric_drops(raw: Any) -> dict[str, float]:
    """'NAME:VALUE', 'VALUE' (every metric) or a mapping -> {name: limit}."""
    if isinstance(raw, dict):
        items = list(raw.items())
    elif isinstance(raw, (int, float)) and not isinstance(raw, bool):
        items = [("*", raw)]
    else:
        name, sep, value = str(raw).rpartition(":")
        items = [(name.strip() if sep else "*", value)]
    out = {}
    for name, value in items:
        try:
            out[str(name)] = float(value)
        except (TypeError, ValueError):
            raise InputError(f"tolerance 'max_metric_drop': expected NAME:NUMBER or NUMBER, got {raw!r}") from None
        if not name:
            raise InputError(f"tolerance 'max_metric_drop': empty metric name in {raw!r}")
    return out


# Exact passes: float32 rounding, or within 8x the runtime's own noise. Their error and the
# floor are both differences between two roundings of the same computation (fused or not,
# weights folded or not); 8x (3 bits) leaves room for a floor measured where ORT fuses
# little while a rewrite reorders more, and stays far below what a wrong rewrite does (a
# changed constant or axis moves outputs by their own scale, ~1e3x the floor or more).
FLOOR_MULTIPLE = 8.0
EXACT = Tolerance(atol=1e-5, rtol=1e-4, floor_multiple=FLOOR_MULTIPLE)
