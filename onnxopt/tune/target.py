"""What ``tune`` aims at: a size or latency target, and the accuracy budget it may spend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ..errors import InputError
from ..pipeline import Tolerance

KINDS = ("size", "latency")


@dataclass(frozen=True)
class Target:
    """``size``: file bytes, ``latency``: median ms, each as a ratio of the original (0.25 = a quarter)."""

    kind: str
    value: float

    @classmethod
    def parse(cls, spec: Union[str, "Target"]) -> "Target":
        """From ``size=0.25`` or ``latency=0.5`` (a percentage such as ``size=25%`` too)."""
        if isinstance(spec, Target):
            return spec
        text = str(spec or "").strip()
        kind, sep, raw = text.partition("=")
        kind, raw = kind.strip(), raw.strip()
        if not sep or kind not in KINDS:
            raise InputError(f"target '{text}': expected size=RATIO or latency=RATIO (for example size=0.25)")
        try:
            value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
        except ValueError:
            raise InputError(f"target '{text}': {raw!r} is not a number") from None
        if not 0.0 < value < 1.0:
            raise InputError(f"target '{text}': the ratio of the original must be in (0, 1), got {value:g}")
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value}


@dataclass(frozen=True)
class Budget:
    """The accuracy a tuned model may lose: ``max_drop`` points of the budget metric, and/or a
    validation tolerance every chosen point must pass."""

    max_drop: Optional[float] = None
    tolerance: Optional[Tolerance] = None

    @classmethod
    def make(cls, max_drop: Optional[float] = None, tolerance: Union[str, dict, Tolerance, None] = None) -> "Budget":
        tol = Tolerance.parse(tolerance)
        if max_drop is not None:
            try:
                max_drop = float(max_drop)
            except (TypeError, ValueError):
                raise InputError(f"max_drop: expected a number of points, got {max_drop!r}") from None
            if not 0.0 <= max_drop < 100.0:
                raise InputError(f"max_drop: points of the metric in [0, 100), got {max_drop:g}")
        if max_drop is None and tol is None:
            max_drop = 1.0
        return cls(max_drop, tol)

    def holds(self, drop: float, passed: bool) -> bool:
        """Whether a point with this drop (and this outcome under the tolerance) is within budget."""
        if self.max_drop is not None and drop > self.max_drop + 1e-9:
            return False
        return passed if self.tolerance is not None else True

    def validation_tolerance(self) -> Tolerance:
        """The tolerance the final model is validated with: the given one, else one that bounds
        nothing (the budget is judged on the budget metric)."""
        return self.tolerance or Tolerance(min_cosine=-1.0)
