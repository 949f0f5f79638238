"""Which weights go: the sparsity budget and the masks that spend it.

``sparsity=s`` asks for a fraction s of every weight the pass could prune to be zero
(structured: removed), the layers it keeps dense (the first and last, ``exclude``, layers a
pattern cannot follow) included. Those layers' share goes to the layers it prunes, each up to
its capacity (``max_layer_sparsity`` of its weights, never less than ``s``). When the capacities
cannot hold the request, the pass prunes what they hold and reports requested against achieved.
Within a layer: the lowest scores (per layer, per row, or under one global threshold), the n
largest of every m (N:M), or per-layer ratios with the least estimated output error (``auto``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .units import _Unit


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


class Masking:
    def nm_mask(self, u: _Unit, s: np.ndarray) -> Optional[np.ndarray]:
        n, m = (2, 4) if self.o.pattern == "2:4" else (4, 8)
        o, k = s.shape
        if u.kind == "conv" and (u.shape[1] % m == 0):
            c, kern = u.shape[1], int(np.prod(u.shape[2:]))
            view = s.reshape(o, c, kern).transpose(0, 2, 1)  # groups along input channels
            keep = _nm_keep(view.reshape(-1, m), n).reshape(o, kern, c).transpose(0, 2, 1).reshape(o, k)
            return keep
        if k % m:
            return None
        return _nm_keep(s.reshape(-1, m), n).reshape(o, k)

    def allocate(self, units, weights, scores, stats) -> dict[int, float]:
        """Per-layer ratios reaching ``target`` overall with the least summed estimated output error."""
        top = self.cap()
        grid = np.unique(np.round(np.append(np.arange(0, top, 0.05), top), 4))
        curves = {}
        for u in units:
            w, s = weights[id(u)], scores[id(u)]
            energy = w * w
            if u.grams:
                per = w.shape[0] // u.groups
                diag = np.concatenate([np.repeat(np.diag(u.gram(gi)[0])[None, :], per, 0) for gi in range(u.groups)])
                energy = energy * diag
            order = np.argsort(s, axis=None, kind="stable")
            cum = np.concatenate([[0.0], np.cumsum(energy.ravel()[order])])
            total = max(cum[-1], 1e-30)
            curves[id(u)] = np.array([cum[int(round(r * u.size))] / total for r in grid])
        step = {id(u): 0 for u in units}
        sizes = {id(u): u.size for u in units}
        need = float(self.want())  # the target over every prunable weight, dense layers included
        pruned = 0.0
        limit = self.o.tolerance
        while pruned < need - 1e-9:
            best, best_cost = None, None
            for u in units:
                i = step[id(u)]
                if i + 1 >= len(grid):
                    continue
                err = curves[id(u)][i + 1]
                if limit is not None and err > limit:
                    continue
                cost = (err - curves[id(u)][i]) / (sizes[id(u)] * (grid[i + 1] - grid[i]))
                if best_cost is None or cost < best_cost:
                    best, best_cost = u, cost
            if best is None:
                break
            i = step[id(best)]
            gain = sizes[id(best)] * (grid[i + 1] - grid[i])
            if pruned + gain > need:  # the last step stops exactly at the target
                ratio = grid[i] + (need - pruned) / sizes[id(best)]
                best.ratio = float(ratio)
                pruned = need
                step[id(best)] = -1 - i  # marks a fractional ratio
                break
            step[id(best)] = i + 1
            pruned += gain
        ratios = {}
        for u in units:
            i = step[id(u)]
            ratios[id(u)] = u.ratio if i < 0 else float(grid[i])
        self.ctx.log.info("prune: sparsity=auto ratios: %s",
                          ", ".join(f"{u.name}={ratios[id(u)]:.3f}" for u in units))
        stats["auto_ratios"] = ";".join(f"{u.name}={ratios[id(u)]:.3f}" for u in units)
        return ratios


def _keep_lowest_per_row(scores: np.ndarray, drops) -> np.ndarray:
    """Mask keeping all but the ``drops`` lowest scores of every output row (one count, or one per
    row; ties by position)."""
    rank = np.empty(scores.shape, np.int64)
    np.put_along_axis(rank, np.argsort(scores, axis=1, kind="stable"), np.arange(scores.shape[1])[None, :], axis=1)
    return rank >= np.reshape(np.asarray(drops, np.int64), (-1, 1))


def _floor(x: float) -> int:
    """floor, forgiving the float error of products like 0.95 * 100."""
    return int(np.floor(x + 1e-9))


def _keep_lowest_out(scores: np.ndarray, drop: int) -> np.ndarray:
    """Mask keeping all but the ``drop`` lowest scores (ties broken by position)."""
    keep = np.ones(scores.size, bool)
    if drop > 0:
        keep[np.argsort(scores, axis=None, kind="stable")[:drop]] = False
    return keep.reshape(scores.shape)


def _nm_keep(groups: np.ndarray, n: int) -> np.ndarray:
    """For rows of m scores: True at the n largest of each row."""
    order = np.argsort(-groups, axis=1, kind="stable")
    keep = np.zeros(groups.shape, bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    return keep
