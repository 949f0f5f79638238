"""The search: per-layer sensitivity measured end to end, a greedy path by accuracy lost per byte
(or estimated millisecond) saved, then assembled models measured along it until the target holds
within the budget; when the assembled model loses more than its layers did alone, each changed
layer's cost is re-measured in the assembled model (left out one at a time) and the path rebuilt.

Choices depend only on measured bytes and metrics (rounded), in item order, so the same seed
gives the same pipeline on every executor. A latency target is the exception it cannot avoid:
the per-layer gains are estimated from each layer's share of the multiply-accumulates (no timing
in the workers), and only the assembled points are timed, in this process, to decide when the
target holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from . import measure
from .candidates import Layer, Passes, parts, tier
from .target import Budget, Target

COSINE_WEIGHT = 10.0  # points of loss per unit of cosine lost: ranks settings the discrete metric ties
MAX_WALK = 8          # assembled points measured per path
ROUNDS = 2            # re-measurements of the layers' costs in the assembled model
TIERS = (1, 2, 3)     # settings measured in tiers (candidates.tier): the next only when these fall short
MARGIN = 1.0          # a tier's predicted gain must pass what the target needs by this much
SPEEDUP = {"int8": 0.5, "int4": 0.3}  # share of a layer's time each setting is assumed to save


@dataclass
class Candidate:
    """One setting of one layer, measured with every other layer float."""

    layer: str
    setting: str
    bytes_saved: int = 0
    ms_saved: float = 0.0
    drop: Optional[float] = None
    cosine: Optional[float] = None
    passed: bool = True
    error: Optional[str] = None
    loss: float = 0.0  # what the greedy spends: drop (>= 0) plus the cosine lost, weighted

    def to_dict(self) -> dict:
        out = {"setting": self.setting, "drop": _r(self.drop), "bytes_saved": self.bytes_saved,
               "ms_saved": round(self.ms_saved, 4)}
        if self.cosine is not None:
            out["cosine"] = round(self.cosine, 6)
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class Point:
    """One assembled model, measured."""

    label: str
    choice: dict[str, str]
    spec: str
    bytes: int
    drop: float
    cosine: float
    value: float
    passed: bool
    latency_ms: Optional[float] = None
    size_ratio: float = 1.0
    latency_ratio: Optional[float] = None
    within_budget: bool = False
    meets_target: bool = False
    chosen: bool = False


@dataclass
class Outcome:
    candidates: dict[str, list[Candidate]] = field(default_factory=dict)
    points: list[Point] = field(default_factory=list)
    chosen: Optional[Point] = None
    met: bool = False
    evaluations: int = 0
    capped: bool = False  # the evaluation budget ran out before the search ended


class _OutOfEvaluations(Exception):
    """The search spent its evaluation budget; the closest point so far is chosen."""


class Search:
    def __init__(self, shared: measure.Shared, handle: Any, executor: Any, layers: list[Layer], passes: Passes,
                 target: Target, budget: Budget, base: dict, progress: Optional[Callable[[str, int, int], None]] = None,
                 max_evaluations: Optional[int] = None):
        self.shared, self.handle, self.ex = shared, handle, executor
        # counted in evaluations, not seconds, so that every executor stops at the same point
        self.max_evaluations = max_evaluations
        self.layers, self.passes, self.target, self.budget = layers, passes, target, budget
        self.base = base  # original bytes/latency_ms, cleaned bytes/latency_ms
        self.progress = progress
        self.out = Outcome()
        self.original = base.pop("original", None)  # latency targets: the original, timed beside each point
        self.by_name = {x.name: x for x in layers}

    # ------------------------------------------------------------- sensitivity

    def sensitivity(self, level: int) -> None:
        """Every setting of this tier, each layer alone, on the executor."""
        items, keys = [], []
        for layer in self.layers:
            for setting in layer.settings:
                if tier(setting) != level:
                    continue
                items.append((self.passes.pipeline({layer.name: setting}, self.layers), True))
                keys.append((layer.name, setting))
        if not items:
            return
        self._spend(len(items))
        results = self.ex.map(measure.evaluate, self.handle, items, progress=self._tick(f"sensitivity, tier {level}"))
        self.out.evaluations += sum(1 for r in results if "unchanged" not in r)
        for (name, setting), r in zip(keys, results):
            c = Candidate(name, setting)
            if "error" in r:
                c.error = r["error"]
            elif "unchanged" not in r:
                c.bytes_saved = int(self.base["clean_bytes"] - r["bytes"])
                c.drop, c.cosine, c.passed = float(r["drop"]), float(r["cosine"]), bool(r["passed"])
                c.loss = max(c.drop, 0.0) + COSINE_WEIGHT * max(0.0, 1.0 - c.cosine)
                c.ms_saved = self._ms_saved(self.by_name[name], setting)
            self.out.candidates.setdefault(name, []).append(c)

    def _ms_saved(self, layer: Layer, setting: str) -> float:
        """The estimated ms a setting saves: the layer's share of the MACs times what the setting removes."""
        total = self.base.get("macs") or 0.0
        ms = self.base.get("clean_latency_ms")
        if not total or not ms or not layer.macs:
            return 0.0
        kept = 1.0
        for name, value in parts(setting).items():
            if name == "prune":
                kept *= 1.0 - value
            elif name == "svd" and len(layer.shape) == 2:
                k, n = layer.shape
                rank = int(np.ceil(value * min(k, n) / 8) * 8)
                kept *= min(1.0, rank * (k + n) / (k * n))
            else:
                kept *= 1.0 - SPEEDUP.get(name, 0.0)
        return float(ms * layer.macs / total * (1.0 - kept))

    def _gain(self, c: Candidate) -> float:
        return float(c.bytes_saved) if self.target.kind == "size" else c.ms_saved

    def _usable(self, c: Candidate) -> bool:
        """Measured, saving something, and not past the budget alone (twice its drop: single layers are
        measured on fewer samples, whose metric moves in coarser steps)."""
        if c.error is not None or c.drop is None or self._gain(c) <= 0:
            return False
        loose = Budget(None if self.budget.max_drop is None else 2 * self.budget.max_drop, self.budget.tolerance)
        return loose.holds(c.drop, c.passed)

    # ------------------------------------------------------------- the greedy path

    def path(self) -> list[tuple[dict[str, str], float]]:
        """Choices in greedy order, each with the gain predicted for it (the sum over its layers)."""
        current = {x.name: None for x in self.layers}  # name -> Candidate chosen (None: float)
        steps: list[tuple[dict[str, str], float]] = []
        total = 0.0
        while True:
            best, best_key = None, None
            for index, layer in enumerate(self.layers):
                cur = current[layer.name]
                cur_gain, cur_loss = (self._gain(cur), cur.loss) if cur else (0.0, 0.0)
                for order, c in enumerate(self.out.candidates.get(layer.name, [])):
                    if not self._usable(c) or self._gain(c) <= cur_gain + 1e-12:
                        continue
                    gain = self._gain(c) - cur_gain
                    key = ((c.loss - cur_loss) / gain, -gain, index, order)
                    if best_key is None or key < best_key:
                        best, best_key = c, key
            if best is None:
                return steps
            cur = current[best.layer]
            total += self._gain(best) - (self._gain(cur) if cur else 0.0)
            current[best.layer] = best
            steps.append(({k: v.setting for k, v in current.items() if v is not None}, total))

    # ------------------------------------------------------------- measuring assembled models

    def measure(self, choice: dict[str, str], label: str) -> Point:
        spec = self.passes.pipeline(choice, self.layers)
        for p in self.out.points:  # the same pipeline is never measured twice
            if p.spec == spec:
                return p
        runs = measure.LATENCY_RUNS if self.target.kind == "latency" else 0
        self._spend(1)
        r = measure.evaluate_here(self.shared, spec, runs)
        self.out.evaluations += 1
        if "error" in r:
            point = Point(label, dict(choice), spec, 0, float("inf"), 0.0, 0.0, False)
            self.out.points.append(point)
            return point
        point = Point(label, dict(choice), spec, int(r["bytes"]), float(r["drop"]), float(r["cosine"]),
                      float(r["value"]), bool(r["passed"]), r.get("latency_ms"))
        point.size_ratio = point.bytes / self.base["bytes"]
        if point.latency_ms is not None and self.original is not None:
            # the original timed right after the candidate: the ratio holds while the machine's load drifts
            point.latency_ratio = point.latency_ms / measure.latency_of(self.original, self.shared.data.feeds[0])
        point.within_budget = self.budget.holds(point.drop, point.passed)
        ratio = point.size_ratio if self.target.kind == "size" else point.latency_ratio
        point.meets_target = ratio is not None and ratio <= self.target.value + 1e-12
        self.out.points.append(point)
        if self.progress:
            self.progress(label, len(self.out.points), 0)
        return point

    def _need(self) -> float:
        """The gain the target asks of the cleaned model (bytes or ms)."""
        if self.target.kind == "size":
            return self.base["clean_bytes"] - self.target.value * self.base["bytes"]
        return self.base["clean_latency_ms"] - self.target.value * self.base["latency_ms"]

    def _measured_gain(self, p: Point) -> float:
        if self.target.kind == "size":
            return self.base["clean_bytes"] - p.bytes
        return self.base["clean_latency_ms"] - (p.latency_ratio or 1.0) * self.base["latency_ms"]

    def walk(self, steps: list[tuple[dict[str, str], float]], label: str) -> Optional[Point]:
        """Measure along the path from the first step predicted to meet the target, correcting the
        prediction by what each measurement showed, until a point meets it (or the path ends)."""
        need, last = self._need(), None
        k = next((i for i, (_, g) in enumerate(steps) if g >= need), len(steps) - 1)
        for _ in range(MAX_WALK):
            if k < 0:
                return last
            choice, predicted = steps[k]
            last = self.measure(choice, f"{label} step {k + 1}")
            if last.meets_target or k == len(steps) - 1:
                return last
            short = need - self._measured_gain(last)  # what the measured gain lacks
            k = next((i for i, (_, g) in enumerate(steps) if i > k and g >= predicted + short), len(steps) - 1)
        return last

    def back_off(self, steps: list[tuple[dict[str, str], float]], upper: int, label: str) -> None:
        """Bisect the path below ``upper`` for the furthest point within budget (the closest point)."""
        lo, hi = -1, upper
        for _ in range(4):
            if hi - lo <= 1:
                return
            mid = (lo + hi) // 2
            p = self.measure(steps[mid][0], f"{label} step {mid + 1}")
            if p.within_budget:
                lo = mid
            else:
                hi = mid

    def recost(self, point: Point) -> bool:
        """Each changed layer of ``point`` left out in turn (one evaluation each, on the executor):
        the loss it adds in the assembled model replaces its alone-measured loss where larger.
        True when some cost rose."""
        names = [x.name for x in self.layers if x.name in point.choice]
        items = [(self.passes.pipeline({k: v for k, v in point.choice.items() if k != n}, self.layers), False)
                 for n in names]
        self._spend(len(items))
        results = self.ex.map(measure.evaluate, self.handle, items, progress=self._tick("re-measure"))
        self.out.evaluations += len(items)
        total = max(point.drop, 0.0) + COSINE_WEIGHT * max(0.0, 1.0 - point.cosine)
        rose = False
        for name, r in zip(names, results):
            if "error" in r:
                continue
            without = max(float(r["drop"]), 0.0) + COSINE_WEIGHT * max(0.0, 1.0 - float(r["cosine"]))
            in_context = round(total - without, 6)
            for c in self.out.candidates.get(name, []):
                if c.setting == point.choice[name] and in_context > c.loss + 1e-9:
                    c.loss, rose = in_context, True
        return rose

    def _spend(self, n: int) -> None:
        """Refuse work past the evaluation budget (the first point, cleanup only, is always measured)."""
        if self.max_evaluations is not None and self.out.points and self.out.evaluations + n > self.max_evaluations:
            raise _OutOfEvaluations

    def run(self) -> Outcome:
        self.measure({}, "cleanup only")
        try:
            for level in TIERS:
                self.sensitivity(level)
                steps = self.path()
                reachable = steps[-1][1] if steps else 0.0
                if level != TIERS[-1] and reachable < MARGIN * self._need():
                    continue  # these settings cannot reach the target: measure the next tier first
                if self.attempt(f"tier {level} " if level != TIERS[0] else ""):
                    break
        except _OutOfEvaluations:
            self.out.capped = True
        self.choose()
        return self.out

    def attempt(self, prefix: str) -> bool:
        """Walk the greedy path; when the point meeting the target breaks the budget, re-measure its
        layers' costs in place and walk the rebuilt path (ROUNDS times), then bisect for the
        closest point within budget. True when a point met the target within budget."""
        for round_ in range(ROUNDS + 1):
            steps = self.path()
            if not steps:
                return False
            label = prefix + ("greedy" if round_ == 0 else f"refined {round_}")
            p = self.walk(steps, label)
            if p is None:
                return False
            if p.meets_target and p.within_budget:
                return True
            if p.within_budget or round_ == ROUNDS or not self.recost(p):
                upper = next((i for i, (c, _) in enumerate(steps) if c == p.choice), len(steps))
                self.back_off(steps, upper, label + " back-off")
                return False
        return False

    def choose(self) -> None:
        """Met: the point meeting the target within budget with the least drop, then the smallest.
        Else the closest: within budget, the smallest ratio."""
        pts = [p for p in self.out.points if p.bytes]
        key_ratio = (lambda p: p.size_ratio) if self.target.kind == "size" else (lambda p: p.latency_ratio or 9e9)
        met = [p for p in pts if p.meets_target and p.within_budget]
        if met:
            best = min(met, key=lambda p: (p.drop, key_ratio(p), p.spec))
            self.out.met = True
        else:
            ok = [p for p in pts if p.within_budget] or pts
            best = min(ok, key=lambda p: (key_ratio(p), p.drop, p.spec))
        best.chosen = True
        self.out.chosen = best

    def _tick(self, what: str):
        if self.progress is None:
            return None
        return lambda done, total: self.progress(what, done, total)


def _r(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 4)
