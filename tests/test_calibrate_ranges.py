"""Streaming range statistics for quantization (calibrate.RangeStats): each method against a
numpy reference on known distributions, methods that differ, memory flat in the sample count."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from onnxopt.calibrate import RangeStats, TensorRanges, entropy_threshold, mse_threshold


def _smooth(p, eps=1e-4):
    zeros = (p == 0).astype(np.float64)
    nonzeros = 1 - zeros
    return p + eps * zeros - eps * zeros.sum() / nonzeros.sum() * nonzeros


def reference_entropy(absx: np.ndarray, bins: int = 2048, levels: int = 128) -> float:
    """TensorRT's KL calibration as in MXNet's/ORT's reference code, loop by loop, no stride."""
    hist, edges = np.histogram(absx, bins=bins, range=(0, absx.max()))
    best, best_i = np.inf, bins
    for i in range(levels, bins + 1):
        sliced = hist[:i].astype(np.float64)
        p = sliced.copy()
        p[i - 1] += hist[i:].sum()
        nz = p != 0
        merged = i // levels
        q = np.zeros(i)
        for j in range(levels):
            a, b = j * merged, (i if j == levels - 1 else (j + 1) * merged)
            if nz[a:b].sum():
                q[a:b] = sliced[a:b].sum() / nz[a:b].sum()
        q[~nz] = 0
        p, q = _smooth(p / p.sum()), _smooth(q / q.sum())
        if (p <= 0).any() or (q <= 0).any():
            continue
        kl = np.sum(p * np.log(p / q))
        if kl < best:
            best, best_i = kl, i
    return float(edges[best_i])


def reference_mse(x: np.ndarray, threshold: float, levels: int, one_sided: bool) -> float:
    """Mean squared error of really quantizing x to [0 or -T, T] with ``levels`` steps (per side)."""
    step = threshold / levels
    lo = 0.0 if one_sided else -threshold
    q = np.clip(np.round(x / step) * step, lo, threshold)
    return float(np.mean((x - q) ** 2))


def distributions():
    rng = np.random.default_rng(0)
    n = 300_000
    return {
        "gaussian": rng.standard_normal(n).astype(np.float32),
        "laplace_outliers": np.concatenate([rng.laplace(size=n), [40.0, -25.0, 31.0]]).astype(np.float32),
        "relu": np.maximum(rng.standard_normal(n) * 2 + 0.5, 0).astype(np.float32),
    }


def streamed(x: np.ndarray, parts: int = 12, histogram: bool = True) -> RangeStats:
    stats = RangeStats(histogram=histogram)
    for part in np.array_split(x, parts):  # ranges grow batch by batch: the histogram re-bins
        stats.update(part)
    return stats


DISTS = distributions()


@pytest.mark.parametrize("name", list(DISTS))
def test_minmax_and_percentile_match_numpy(name):
    x = DISTS[name]
    stats = streamed(x)
    assert stats.range("minmax") == (float(x.min()), float(x.max()))
    assert stats.count == x.size
    lo, hi = stats.range("percentile", percentile=99.9)
    want_lo, want_hi = np.percentile(x, [0.1, 99.9])
    tol = 2 * stats.width
    assert abs(lo - want_lo) <= tol and abs(hi - want_hi) <= tol
    lo, hi = stats.range("percentile", percentile=99.99)
    want_lo, want_hi = np.percentile(x, [0.01, 99.99])
    assert abs(lo - want_lo) <= tol and abs(hi - want_hi) <= tol


@pytest.mark.parametrize("name", list(DISTS))
def test_entropy_matches_tensorrt_reference(name):
    x = DISTS[name]
    one_sided = x.min() >= 0
    levels = 255 if one_sided else 128
    # exact zeros (40% of the ReLU data) are quantized exactly and left out of the search
    nonzero = np.abs(x[x != 0])
    want = reference_entropy(nonzero, levels=levels)
    # on the same histogram (stride 1) the search is exactly the reference's
    hist, edges = np.histogram(nonzero, bins=2048, range=(0, nonzero.max()))
    assert entropy_threshold(hist, edges[1], levels, stride=1) == pytest.approx(want, rel=1e-6)
    # streamed in batches, with re-binning and strided candidates: the KL minimum is flat, so
    # within 8% (minmax is 25% or more away on all three)
    lo, hi = streamed(x).range("entropy")
    assert hi == pytest.approx(min(want, x.max()), rel=0.08)
    assert abs(hi - x.max()) > 0.2 * x.max()
    assert lo == (0.0 if one_sided else -hi)


@pytest.mark.parametrize("name", list(DISTS))
def test_mse_threshold_minimises_real_quantization_error(name):
    x = DISTS[name]
    one_sided = x.min() >= 0
    levels = 255 if one_sided else 127
    lo, hi = streamed(x).range("mse")
    t = max(abs(lo), abs(hi))
    got = reference_mse(x, t, levels, one_sided)
    grid = np.linspace(0.05, 1.0, 200) * np.abs(x).max()
    best = min(reference_mse(x, g, levels, one_sided) for g in grid)
    assert got <= best * 1.05


def test_methods_really_differ():
    stats = streamed(DISTS["laplace_outliers"])
    his = {m: stats.range(m)[1] for m in ("minmax", "percentile", "entropy", "mse")}
    assert his["minmax"] == 40.0
    assert his["mse"] < 0.6 * his["minmax"]  # clips the outliers, not the body
    assert max(his["percentile"], his["entropy"]) < 0.5 * his["mse"]
    relu = streamed(DISTS["relu"])
    his = {m: relu.range(m)[1] for m in ("minmax", "percentile", "entropy", "mse")}
    order = [his[m] for m in ("entropy", "percentile", "mse", "minmax")]
    assert all(a < 0.95 * b for a, b in zip(order, order[1:])), his


def test_relu_ranges_are_one_sided_and_symmetric_on_request():
    stats = streamed(DISTS["relu"])
    for method in ("minmax", "percentile", "entropy", "mse"):
        lo, hi = stats.range(method)
        assert lo == pytest.approx(0.0, abs=stats.width) and hi > 0
    lo, hi = stats.range("entropy", symmetric=True)
    assert lo == -hi


def test_histogram_rebins_exactly_when_the_range_doubles():
    stats = RangeStats(bins=8, oversample=1)
    stats.update(np.array([0.1, 0.9, -0.5], np.float32))  # limit 0.9, bins of 0.1125
    assert stats.limit == pytest.approx(0.9)
    stats.update(np.array([3.0], np.float32))  # 0.9 -> 1.8 -> 3.6
    assert stats.limit == pytest.approx(3.6)
    assert stats.pos.sum() == 3 and stats.neg.sum() == 1
    # 0.9 sat in the last bin (7), merged twice into bin 1; 0.1 in bin 0; 3.0 lands in bin 6 of 0.45
    assert list(stats.pos) == [1, 1, 0, 0, 0, 0, 1, 0]
    assert list(stats.neg) == [0, 1, 0, 0, 0, 0, 0, 0]  # -0.5: bin 4 of 0.1125, merged twice


def test_exact_zeros_do_not_move_the_threshold_searches():
    x = DISTS["relu"]
    with_zeros, without = streamed(x), streamed(x[x > 0])
    assert with_zeros.zeros == int((x == 0).sum()) > 0.3 * x.size
    for method in ("entropy", "mse"):
        assert with_zeros.range(method)[1] == pytest.approx(without.range(method)[1], rel=0.02)


def test_entropy_on_too_few_values_keeps_the_whole_range():
    x = np.abs(np.random.default_rng(5).standard_normal(3000)).astype(np.float32)  # < 16 per bin x 510 bins
    stats = streamed(x, parts=3)
    assert stats.range("entropy") == (float(x.min()), float(x.max()))
    big = streamed(np.abs(np.random.default_rng(5).standard_normal(200_000)).astype(np.float32))
    assert big.range("entropy")[1] < 0.8 * big.range("minmax")[1]


def test_zeros_then_values_and_non_finite_are_ignored():
    stats = RangeStats()
    stats.update(np.zeros(10, np.float32))
    stats.update(np.array([np.nan, np.inf, 1.0, -2.0], np.float32))
    assert stats.count == 12 and stats.range("minmax") == (-2.0, 1.0)
    assert stats.pos[0] == 10 and stats.pos.sum() == 11 and stats.neg.sum() == 1


def test_memory_is_flat_in_the_number_of_samples():
    rng = np.random.default_rng(3)
    names = [f"t{i}" for i in range(4)]

    def run(batches: int) -> tuple[int, int]:
        ranges = TensorRanges(names, "entropy")
        tracemalloc.start()
        for b in range(batches):
            ranges({n: rng.standard_normal(4096).astype(np.float32) * (1 + b) for n in names})
            if b == 1:
                tracemalloc.reset_peak()
                base = tracemalloc.get_traced_memory()[0]
        now = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return ranges.nbytes(), now - base

    small_bytes, small_growth = run(5)
    big_bytes, big_growth = run(60)
    assert small_bytes == big_bytes == 4 * 2 * 4096 * 8
    assert big_growth < 64 * 1024 and small_growth < 64 * 1024


def test_tensor_ranges_reduce_for_stream_tensors():
    ranges = TensorRanges(["a", "b"], "minmax")
    ranges({"a": np.array([1.0, -3.0]), "b": np.array([2.0]), "unknown": np.array([9.0])})
    ranges({"a": np.array([5.0])})
    assert ranges.ranges() == {"a": (-3.0, 5.0), "b": (2.0, 2.0)}
    assert ranges.ranges(symmetric=True)["a"] == (-5.0, 5.0)
    with pytest.raises(ValueError, match="unknown range method"):
        TensorRanges(["a"], "kl")
    with pytest.raises(ValueError, match="needs histograms"):
        ranges.stats["a"].range("entropy")


def test_mse_and_entropy_on_degenerate_histograms():
    assert mse_threshold(np.zeros(16), 0.1) == 0.0
    assert entropy_threshold(np.zeros(16), 0.1) == 0.0
    h = np.zeros(2048)
    h[:10] = 5
    assert entropy_threshold(h, 0.01, 128) == pytest.approx(0.1)  # fewer bins than levels: keep all
