"""TuneResult: what ``tune`` chose and measured, as the JSON report (schema ``onnxopt.tune/1``)
and a summary for people."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import onnx

from ..report import OptimizeResult, format_comparison, write_text_atomic
from .search import Outcome, Point
from .target import Budget, Target

SCHEMA = "onnxopt.tune/1"


@dataclass
class TuneResult:
    """The chosen pipeline, whether it meets the target within the budget, every point measured,
    and the final model, made by running ``pipeline`` through ``optimize`` (``final``)."""

    target: Target
    budget: Budget
    metric: str
    met: bool
    message: str
    pipeline: str
    baseline: dict
    result: dict
    layers: list[dict]
    points: list[dict]
    final: Optional[OptimizeResult]
    evaluations: int
    executor: str
    workers: int
    seed: int
    seconds: float = 0.0
    source: Optional[str] = None
    output: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    @property
    def model(self) -> Optional[onnx.ModelProto]:
        return self.final.model if self.final is not None else None

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write the tuned model atomically; refuses a point that did not meet the target unless ``force``."""
        from ..errors import ValidationFailed

        if not self.met and not force:
            raise ValidationFailed(f"not saving: {self.message}")
        written = self.final.save(path, force=True)
        self.output = str(written)
        return written

    def to_dict(self) -> dict[str, Any]:
        budget: dict[str, Any] = {"metric": self.metric, "max_drop": self.budget.max_drop}
        if self.budget.tolerance is not None:
            budget["tolerance"] = str(self.budget.tolerance)
        final = self.final
        return {
            "schema": SCHEMA,
            "source": self.source,
            "output": self.output,
            "target": self.target.to_dict(),
            "budget": budget,
            "met": self.met,
            "message": self.message,
            "pipeline": self.pipeline,
            "baseline": self.baseline,
            "result": self.result,
            "layers": self.layers,
            "points": self.points,
            "validation": final.validation.to_dict() if final is not None and final.validation else None,
            "evaluations": self.evaluations,
            "executor": self.executor,
            "workers": self.workers,
            "seed": self.seed,
            "seconds": round(self.seconds, 3),
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def write_report(self, path: str | os.PathLike) -> None:
        write_text_atomic(Path(path), self.to_json() + "\n")

    def summary(self) -> str:
        lines = [f"onnxopt tune: {self.source or 'model'}: target {self.target}, budget "
                 f"{budget_text(self.budget, self.metric)}"]
        lines.append(f"pipeline: {self.pipeline}")
        lines.append(("met: " if self.met else "NOT MET: ") + self.message)
        lines.append("")
        lines.append(f"{'layer':<40} {'op':<8} {'params':>10}  {'chosen':<16} measured alone (setting: drop, saved)")
        for row in self.layers:
            cands = "; ".join(
                f"{c['setting']}: " + ("error" if c.get("error") else
                                       "no saving" if c["drop"] is None else
                                       f"{c['drop']:+.2f}, " + (f"{c['bytes_saved']:,} B" if self.target.kind == "size"
                                                                else f"~{c['ms_saved']:.3f} ms"))
                for c in row["candidates"])
            lines.append(f"{_cut(row['name'], 40):<40} {row['op']:<8} {row['params']:>10,}  {row['chosen']:<16} {cands}")
        lines.append("")
        lines.append(f"points measured: {len(self.points)}; evaluations: {self.evaluations} "
                     f"(executor {self.executor}, {self.workers} worker(s)); {self.seconds:.1f} s")
        for note in self.notes:
            lines.append(f"note: {note}")
        if self.final is not None and self.final.validation is not None:
            lines.extend(format_comparison(self.final.validation))
        return "\n".join(lines)


def budget_text(budget: Budget, metric: str) -> str:
    parts = []
    if budget.max_drop is not None:
        parts.append(f"{metric} drop <= {budget.max_drop:g} point(s)")
    if budget.tolerance is not None:
        parts.append(f"tolerance {budget.tolerance}")
    return " and ".join(parts)


def point_dict(p: Point) -> dict:
    return {"label": p.label, "pipeline": "cleanup" + ("," + p.spec if p.spec else ""), "size_ratio": round(p.size_ratio, 4),
            "latency_ratio": None if p.latency_ratio is None else round(p.latency_ratio, 4),
            "drop": None if p.drop == float("inf") else round(p.drop, 4), "cosine": round(p.cosine, 6),
            "within_budget": p.within_budget, "meets_target": p.meets_target, "chosen": p.chosen}


def layer_rows(layers: list, outcome: Outcome) -> list[dict]:
    chosen = outcome.chosen.choice if outcome.chosen else {}
    return [{"name": x.name, "op": x.op, "params": x.params, "bytes": x.bytes,
             "chosen": chosen.get(x.name, "float"),
             "candidates": [c.to_dict() for c in outcome.candidates.get(x.name, [])]} for x in layers]


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]
