"""Figures that fit each output, and the user's own metric.

``kinds`` reads from the graph (and the data where the graph says nothing) what each output
is: class scores, a sequence of class scores, language-model logits, an embedding, or other;
``scores`` holds the streaming figures each kind gets; ``hook`` loads the user's metric and
labels; ``kv`` recognizes KV-cache tensors by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .hook import MetricHook, MetricRun, load_labels, load_metric, primary
from .kinds import CLASS_KINDS, KINDS, OutputKind, check_overrides, detect, input_batch_axes, override, refine
from .kv import group as group_kv, kv_role
from .scores import ClassAgreement, Perplexity, VectorCosine

__all__ = ["KINDS", "CLASS_KINDS", "OutputKind", "detect", "refine", "override", "check_overrides", "input_batch_axes",
           "MetricHook", "MetricRun", "load_metric", "load_labels", "primary", "kv_role", "group_kv",
           "ClassAgreement", "VectorCosine", "Perplexity", "MetricValue", "metric_drop"]


@dataclass
class MetricValue:
    """A named figure on the original and the candidate, and what the tolerance says about it."""

    name: str
    reference: float
    candidate: float
    drop: float  # reference - candidate; candidate - reference where lower is better
    lower_is_better: bool = False
    source: str = "metric"  # the hook's spec, or the output a built-in figure comes from
    limit: Optional[float] = None
    passed: bool = True


def metric_drop(name: str, reference: float, candidate: float, lower_is_better: bool, source: str,
                limits: Optional[dict[str, float]]) -> MetricValue:
    drop = (candidate - reference) if lower_is_better else (reference - candidate)
    limits = limits or {}
    limit = limits.get(name, limits.get("*"))
    value = MetricValue(name, reference, candidate, drop, lower_is_better, source, limit)
    if limit is not None:
        value.passed = drop <= limit  # NaN fails
    return value
