"""qdq's mixed precision: layers go back to float in order of measured accuracy recovered per byte kept float.

Every quantized layer is left out of the fully quantized model in turn and the outputs measured
end to end (the Guard: cosine, and argmax agreement on class scores or per sequence position): its
gain. Layers then return to float best gain per byte first, the assembled model re-measured after
each, until the tolerance holds; when a round ends short of the tolerance the gains are measured
again on the assembled model, so the loop stops only when no layer left is worth its bytes (or the
time budget is spent, which a note says).

A layer is worth its bytes when the share of the first shortfall it removes (measured with the
others already float) is at least the share of all the bytes quantization saves that it keeps
float: returning every layer removes the whole shortfall for all of those bytes, so a layer below
that line buys accuracy dearer than the average layer does. A big layer with a small gain is then
left quantized however long the tolerance is missed, and cheap layers go first; below the line a
layer is taken only when it makes the tolerance hold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from onnxopt import progress

from .guard import Guard, Score


@dataclass
class Candidate:
    pos: int        # the node's index in the graph (the key Plan's keep_float takes)
    name: str
    cost: int       # bytes its weight takes in float over int8
    gain: float = 0.0  # shortfall removed when it alone is float (measured), or 0 when not measured
    measured: bool = False

    @property
    def ratio(self) -> float:
        return self.gain / max(self.cost, 1024)  # layers without weights are not free: 1 KiB at least


@dataclass
class Outcome:
    built: tuple            # (graph, plan, writer) of the chosen model
    score: Score
    fallen: list[Candidate] = field(default_factory=list)
    curve: list[tuple[int, Score]] = field(default_factory=list)  # (weight bytes, score), one per step
    measured: int = 0
    seconds: float = 0.0
    capped: bool = False


def worth(c: Candidate, gain: float, first_loss: float, savings: int) -> bool:
    """Whether removing ``gain`` of the first shortfall is worth the bytes ``c`` keeps float: its
    share of the shortfall at least its share of ``savings``, the bytes quantization saves over
    every candidate (each counted at 1 KiB at least, as layers without weights are)."""
    if gain <= 0:
        return False
    return gain / max(first_loss, 1e-9) >= max(c.cost, 1024) / max(savings, 1)


def weight_bytes(plan, float_bytes: int) -> int:
    """Bytes of the model's weights with this plan: the float total less 3 bytes per quantized value."""
    return float_bytes - sum(3 * int(w[0].size) for w in plan.weights.values() if w is not None)


def mixed_precision(build: Callable, check: Guard, export: Callable, float_bytes: int, notes: list[str],
                    budget_s: float = 300.0, weights_stay: bool = False) -> Outcome:
    """Return layers to float until ``check`` holds or no layer helps. ``build(keep_float_positions)``
    makes (graph, plan, writer); ``export(graph)`` the ModelProto the guard runs. ``weights_stay``:
    a layer taken back keeps its int8 weights (only its activations go float), so it keeps no bytes
    float and every layer costs the same."""
    start = time.monotonic()
    built = build(())
    score = check.measure(export(built[0]))
    out = Outcome(built, score)
    out.curve.append((weight_bytes(built[1], float_bytes), score))
    if check.holds(score):
        return out
    plan = built[1]
    names = {plan.position[id(n)]: n.name or n.outputs[0].name for n in plan.nodes}
    costs = {plan.position[id(n)]: 3 * int(plan.weights[id(n)][0].size) if id(n) in plan.weights and not weights_stay
             else 0 for n in plan.nodes}
    what = "activations back to float (weights stay int8)" if weights_stay else "back to float"
    weighted = {plan.position[id(n)] for n in plan.nodes if id(n) in plan.weights}
    # measure in order of local error (the likeliest first), so a time cap cuts the least likely
    order = [pos for pos, _, _ in check.sensitivities(*built)]
    order += [p for p in names if p not in order]
    candidates = [Candidate(p, names[p], costs[p]) for p in order]
    loss = first_loss = check.shortfall(score)
    savings = sum(max(c.cost, 1024) for c in candidates)  # each layer counted as worth() counts it

    def over() -> bool:
        return time.monotonic() - start > budget_s

    rounds = taken = 0
    while not check.holds(out.score) and not (rounds and over()):
        rounds += 1
        left = [c for c in candidates if c not in out.fallen]
        base = [c.pos for c in out.fallen]
        quick = check.shortfall(check.measure(export(out.built[0]), quick=True))
        for c in progress.iterate(left, f"qdq: measuring layers (round {rounds})", unit="layer"):
            # each layer's gain with the layers already float left float (first batch only)
            c.measured = False
            if over():
                out.capped = True
                break
            c.gain = quick - check.shortfall(check.measure(export(build(base + [c.pos])[0]), quick=True))
            c.measured = True
            out.measured += 1
        helpful = sorted((c for c in left if c.measured and c.gain > 0), key=lambda c: -c.ratio)
        taken = 0
        for c in helpful:  # re-measured on every guard sample as they join the float layers
            if check.holds(out.score):
                break
            trial = build([f.pos for f in out.fallen] + [c.pos])
            now = check.measure(export(trial[0]))
            new_loss = check.shortfall(now)
            out.measured += 1
            # a layer that keeps no bytes float (weights_stay) is worth any gain; else worth() judges
            free = weights_stay and new_loss < loss
            if not (free or worth(c, loss - new_loss, first_loss, savings) or (new_loss < loss and check.holds(now))):
                continue  # not worth its bytes with the others already float: skip it, not a reason to stop
            notes.append(f"layer '{c.name}' {what if c.pos in weighted else 'back to float'}: {now} (shortfall {loss:.3f} -> {new_loss:.3f}; "
                         f"gain {c.gain:+.3f} alone), {c.cost} bytes kept float")
            out.fallen.append(c)
            out.built, out.score, loss = trial, now, new_loss
            out.curve.append((weight_bytes(trial[1], float_bytes), now))
            taken += 1
        if not taken:
            break  # no layer left helps with the others float
    if taken and over() and not check.holds(out.score):
        out.capped = True  # another round might have found more
    if weights_stay and not check.holds(out.score):  # a few measurements (log2 of the layers left), budget or not
        _sweep_rest(out, candidates, build, check, export, float_bytes, notes, what)
    out.seconds = time.monotonic() - start
    _report(out, len(candidates), rounds, float_bytes, budget_s, notes)
    return out


def _sweep_rest(out: Outcome, candidates: list[Candidate], build: Callable, check: Guard, export: Callable,
                float_bytes: int, notes: list[str], what: str) -> None:
    """When no single layer helps any more and taking layers back costs no bytes: take the rest back
    in order of local error in doubling groups (1, 2, 4, ... then all) until the tolerance holds, so
    the guard's promise stands whenever int8 weights alone meet it."""
    rest = [c for c in candidates if c not in out.fallen]
    loss = check.shortfall(out.score)
    size = 1
    while rest:
        group = rest[:size]
        trial = build([f.pos for f in out.fallen] + [c.pos for c in group])
        now = check.measure(export(trial[0]))
        out.measured += 1
        if check.holds(now) or (len(group) == len(rest) and check.shortfall(now) < loss):
            names = ", ".join(f"'{c.name}'" for c in group[:8]) + (f" and {len(group) - 8} more" if len(group) > 8 else "")
            notes.append(f"{len(group)} more layers {what} at once (in order of local error; none helped alone): "
                         f"{names}: {now}")
            out.fallen.extend(group)
            out.built, out.score = trial, now
            out.curve.append((weight_bytes(trial[1], float_bytes), now))
            return
        if len(group) == len(rest):
            return
        size = min(2 * size, len(rest))


def _report(out: Outcome, total: int, rounds: int, float_bytes: int, budget: float, notes: list[str]) -> None:
    notes.append(f"mixed precision: measured {out.measured} times over {total} layers in {rounds} round(s), "
                 f"{out.seconds:.0f} s; {len(out.fallen)} layers back to float")
    if out.capped:
        notes.append(f"mixed precision: the {budget:.0f} s budget for measuring gains ran out with layers "
                     "unmeasured (measured first: those adding most error locally); exclude= the layers above "
                     "and run again to go on")
    points = _curve_points(out.curve)
    notes.append("size/accuracy trade curve (weights, score; exclude= the layers above to pick a point): " +
                 "; ".join(f"{_size(b)} (x{b / max(float_bytes, 1):.2f}) {s}" for b, s in points))


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} bytes"


def _curve_points(curve: list[tuple[int, Score]], most: int = 6) -> list[tuple[int, Score]]:
    """A few points of the curve: the first, the last and some evenly between."""
    if len(curve) <= most:
        return curve
    step = (len(curve) - 1) / (most - 1)
    return [curve[round(i * step)] for i in range(most)]
