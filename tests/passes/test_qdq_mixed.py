"""qdq's mixed precision (passes/qdq/mixed.py): which layers return to float, in which order.

The loop's rules are checked on a guard whose scores add up known per-layer errors, so each case
is exact; the loop end to end in ONNX Runtime on planted graphs is in test_qdq.py.
"""

from __future__ import annotations

import numpy as np

mixed = __import__("passes.qdq.mixed", fromlist=["mixed"])
guard = __import__("passes.qdq.guard", fromlist=["guard"])


class Layer:
    def __init__(self, name: str) -> None:
        self.name, self.outputs = name, []


class FakePlan:
    """Layers with weights of the given sizes; keep_float leaves some out."""

    def __init__(self, layers: dict[str, int], keep: frozenset) -> None:
        self.nodes = [Layer(n) for i, n in enumerate(layers) if i not in keep]
        self.position = {id(node): list(layers).index(node.name) for node in self.nodes}
        self.weights = {id(node): (np.zeros(layers[node.name], np.float32), 0) for node in self.nodes}


def run(layers: dict[str, tuple[int, float]], target: float = 0.99, weights_stay: bool = False, score=None):
    """mixed_precision over layers name -> (weight values, cosine lost while quantized); ``score``
    (positions kept float -> cosine) replaces the sum of the layers' losses."""
    sizes = {n: v for n, (v, _) in layers.items()}
    errors = [e for _, e in layers.values()]
    check = object.__new__(guard.Guard)
    check.target, check.min_agreement = target, None
    check.measure = lambda keep, quick=False: guard.Score(
        score(keep) if score else 1.0 - sum(e for i, e in enumerate(errors) if i not in keep), None)
    check.sensitivities = lambda g, plan, writer: []

    def build(keep):
        keep = frozenset(keep)
        return keep, FakePlan(sizes, keep), None

    notes: list[str] = []
    out = mixed.mixed_precision(build, check, lambda g: g, 4 * sum(sizes.values()), notes, weights_stay=weights_stay)
    return [c.name for c in out.fallen], out.score, notes


def test_a_cheap_layer_goes_back_before_a_big_one_of_the_same_gain():
    fallen, score, _ = run({"big": (100_000, 0.01), "small": (100, 0.01), "rest": (1000, 0.0)})
    assert fallen == ["small"] and score.cosine >= 0.99


def test_a_big_layer_below_the_line_stays_quantized_though_the_tolerance_is_missed():
    """Returning 'small' removes 40% of the shortfall for almost no bytes; each big layer would
    remove 30% of it for half the bytes quantization saves, and neither makes the tolerance hold:
    both stay quantized, and the note says the tolerance is still missed."""
    fallen, score, notes = run({"big1": (100_000, 0.015), "small": (100, 0.02), "big2": (100_000, 0.015)})
    assert fallen == ["small"] and abs(score.cosine - 0.97) < 1e-9
    assert any(n.startswith("layer 'small' back to float") for n in notes)


def test_a_big_layer_that_makes_the_tolerance_hold_is_taken():
    fallen, score, _ = run({"big": (100_000, 0.02), "small": (100, 0.001)}, target=0.985)
    assert "big" in fallen and score.cosine >= 0.985


def test_worth_compares_shares_of_the_shortfall_and_of_the_bytes():
    c = mixed.Candidate(0, "layer", cost=30_000)
    assert mixed.worth(c, 3.0, 10.0, 100_000) and not mixed.worth(c, 2.9, 10.0, 100_000)
    assert not mixed.worth(mixed.Candidate(1, "free", cost=0), 0.0, 10.0, 100_000)  # no gain: never
    assert mixed.worth(mixed.Candidate(1, "free", cost=0), 0.11, 10.0, 100_000)  # counted as 1 KiB


def test_with_weights_staying_int8_a_big_layer_with_a_small_gain_is_taken_too():
    """The case above with fallback=weights: a layer taken back keeps no bytes float, so any gain is
    worth it and the loop goes on until the tolerance holds."""
    layers = {"big1": (100_000, 0.015), "small": (100, 0.02), "big2": (100_000, 0.015)}
    fallen, score, notes = run(layers, weights_stay=True)
    assert sorted(fallen) == ["big1", "big2", "small"] and score.cosine >= 0.99
    assert any(n.startswith("layer 'small' activations back to float (weights stay int8)") for n in notes)


def test_layers_that_only_help_together_are_taken_back_in_doubling_groups():
    """No layer helps alone (the error needs three of them float to go): with weights staying int8
    the rest goes back in groups of 1, 2, 4 (all) until the tolerance holds; taking whole layers
    back, nothing is taken and the note says the tolerance is missed."""
    layers = {"a": (1000, 0.0), "b": (1000, 0.0), "c": (1000, 0.0), "d": (1000, 0.0), "e": (1000, 0.0)}

    def score(keep):
        return 1.0 if len(keep) >= 3 else 0.9

    fallen, got, notes = run(layers, weights_stay=True, score=score)
    assert len(fallen) == 4 and got.cosine == 1.0  # groups of 1 and 2 missed; 4 made it hold
    assert any(n.startswith("4 more layers activations back to float (weights stay int8) at once") for n in notes)
    fallen, got, notes = run(layers, score=score)
    assert fallen == [] and got.cosine == 0.9
    assert not any(n.startswith("layer '") or " at once" in n for n in notes)
