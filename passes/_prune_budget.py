"""Where ``prune`` takes its zeros from: one sparsity over all prunable weights, spread over the layers it prunes.

``sparsity=s`` asks for a fraction s of every weight the pass could prune to be zero
(structured: removed), the layers it keeps dense (the first and last, ``exclude``, layers a
pattern cannot follow) included. Those layers' share goes to the layers it prunes, each up to
its capacity (``max_layer_sparsity`` of its weights, never less than ``s``). When the capacities
cannot hold the request, the pass prunes what they hold and reports requested against achieved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


def layer_cap(max_layer_sparsity: float, sparsity: float) -> float:
    """The largest share of one layer's weights the budget may take: the cap, never below the request."""
    return max(max_layer_sparsity, sparsity)


def spread(sizes: list[int], capacities: list[int], total: int) -> list[int]:
    """Integer counts, each at most its capacity, summing to min(total, sum of capacities), in
    proportion to ``sizes`` (one ratio for every layer) where the capacities allow: a layer that
    reaches its capacity stops there and the ratio of the others rises (water filling), then the
    largest remainders take the rounding."""
    counts = [0] * len(sizes)
    remaining = min(int(total), int(sum(capacities)))
    pool = [i for i, s in enumerate(sizes) if s > 0 and capacities[i] > 0]
    while pool:
        ratio = remaining / sum(sizes[i] for i in pool)
        full = [i for i in pool if ratio * sizes[i] >= capacities[i]]
        if not full:
            break
        for i in full:
            counts[i] = capacities[i]
            remaining -= capacities[i]
        pool = [i for i in pool if i not in full]
    if pool and remaining > 0:
        size = sum(sizes[i] for i in pool)
        ideal = {i: remaining * sizes[i] / size for i in pool}
        for i in pool:
            counts[i] = int(math.floor(ideal[i]))
        left = remaining - sum(counts[i] for i in pool)
        for i in sorted(pool, key=lambda i: (counts[i] - ideal[i], i))[:left]:
            counts[i] += 1  # ideal < capacity, so floor + 1 still fits
    return counts


def row_drops(scores: np.ndarray, count: int) -> np.ndarray:
    """Per output row of ``scores`` [O, K]: how many weights it loses so that the rows lose ``count``
    together, as evenly as integers allow; the rows whose next weight scores lowest take the extra one."""
    o, k = scores.shape
    base, extra = divmod(int(count), o) if o else (0, 0)
    drops = np.full(o, base, np.int64)
    if extra:
        nxt = np.sort(scores, axis=1)[:, min(base, k - 1)]
        drops[np.argsort(nxt, kind="stable")[:extra]] += 1
    return drops


def global_pruned(scores: list[np.ndarray], total: int, capacities: list[int]) -> list[np.ndarray]:
    """One threshold over the (flattened, comparable) scores of every layer: the ``total`` lowest go.
    A layer that would lose more than its capacity loses its capacity (its lowest scores), and the
    threshold moves on among the others. Returns per layer a boolean array, True where pruned."""
    pruned = [np.zeros(s.size, bool) for s in scores]
    active = [i for i, s in enumerate(scores) if s.size]
    remaining = min(int(total), int(sum(capacities)))
    while active and remaining > 0:
        flat = np.concatenate([scores[i].reshape(-1) for i in active])
        owner = np.concatenate([np.full(scores[i].size, i) for i in active])
        where = np.concatenate([np.arange(scores[i].size) for i in active])
        chosen = np.argsort(flat, kind="stable")[:remaining]
        taken = np.bincount(owner[chosen], minlength=len(scores))
        full = [i for i in active if taken[i] > capacities[i]]
        if not full:
            for i in active:
                pruned[i][where[chosen][owner[chosen] == i]] = True
            break
        for i in full:
            pruned[i][np.argsort(scores[i].reshape(-1), kind="stable")[:capacities[i]]] = True
            remaining -= capacities[i]
        active = [i for i in active if i not in full]
    return pruned


# ----------------------------------------------------------------- structured

@dataclass
class ChannelPlan:
    """One producer's output channels: the weights that lose a row (the producer, depthwise Convs
    on the way) and a column (the consumer) with every channel removed. Keys name weight tensors."""

    channels: int
    cap: int  # the most channels it may lose
    outputs: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    drop: int = 0

    def drop_at(self, ratio: float) -> int:
        return min(int(round(ratio * self.channels)), self.cap)


def removed_by_tensor(plans: list[ChannelPlan], sizes: dict, drops: list[int]) -> dict:
    """Per tensor of ``sizes``: the weights it loses when each plan loses its number of channels."""
    out: dict = {}
    inp: dict = {}
    for plan, d in zip(plans, drops):
        for key in plan.outputs:
            out[key] = (plan.channels, d)
        for key in plan.inputs:
            inp[key] = (plan.channels, d)
    gone = {}
    for key, size in sizes.items():
        kept = size
        for axis in (out, inp):
            if key in axis:
                c, d = axis[key]
                kept = kept // c * (c - d)
        gone[key] = size - kept
    return gone


def removed_weights(plans: list[ChannelPlan], sizes: dict, drops: list[int]) -> int:
    return sum(removed_by_tensor(plans, sizes, drops).values())


def channel_drops(plans: list[ChannelPlan], sizes: dict, total: int) -> list[int]:
    """Channels each plan loses so that the weights removed come closest to ``total``: one ratio for
    all (the highest that stays at or under it; each plan within its cap), then one more channel at a
    time for the plan furthest behind that ratio while that comes closer (plans sharing a channel
    count move together under one ratio, too coarse a step on its own)."""
    if not plans or total <= 0:
        return [0] * len(plans)
    removed = lambda drops: removed_weights(plans, sizes, drops)  # noqa: E731
    at = lambda r: [p.drop_at(r) for p in plans]  # noqa: E731
    if removed(at(1.0)) <= total:
        return at(1.0)
    lo, hi = 0.0, 1.0  # removed(at(lo)) <= total < removed(at(hi))
    for _ in range(50):
        mid = (lo + hi) / 2
        if removed(at(mid)) <= total:
            lo = mid
        else:
            hi = mid
    drops = at(lo)
    current = removed(drops)
    while True:
        behind = [i for i, p in enumerate(plans) if drops[i] < p.cap]
        if not behind:
            return drops
        i = min(behind, key=lambda i: ((drops[i] + 1) / plans[i].channels, i))
        trial = drops[:i] + [drops[i] + 1] + drops[i + 1:]
        after = removed(trial)
        if after > total:
            return trial if after - total < total - current else drops
        drops, current = trial, after


def channel_step(plans: list[ChannelPlan], sizes: dict) -> int:
    """The most weights one more channel of any plan removes: how far the request may be missed."""
    return max((sum(sizes.get(k, 0) // p.channels for k in (*p.outputs, *p.inputs)) for p in plans), default=0)


def achieved(zeroed: int, prunable: int) -> float:
    return round(zeroed / prunable, 4) if prunable else 0.0


def unreached_note(requested: float, got: float, why: Optional[str]) -> str:
    return (f"sparsity {requested:g} requested over all prunable weights, {got:.4f} reached"
            + (f": {why}" if why else ""))
