"""Streaming range statistics for quantization (calibrate.RangeStats): each method against a
numpy reference on known distributions (entropy: NVIDIA's TensorRT search, loop by loop), the
finite-sample rules of the entropy search, methods that differ, memory flat in the sample count."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from onnxopt.calibrate import RangeStats, TensorRanges, entropy_threshold, mse_threshold


def reference_entropy(hist: np.ndarray, levels: int, samples: float = 0) -> int:
    """TensorRT's KL calibration as NVIDIA's pytorch-quantization writes it (_compute_amax_entropy),
    loop by loop, stride 1: the number of bins of the threshold. Level of bin j: floor(j * levels / i)
    in integers (the reference's linspace + digitize, without its float rounding at the edges).
    ``samples``: subtract the Miller-Madow bias (occupied bins of P - occupied levels of Q) / 2n."""
    bins = np.asarray(hist, np.float64)
    last = int(np.nonzero(bins)[0][-1]) + 1
    best, best_i = np.inf, last
    for i in range(levels, last + 1):
        level = (np.arange(i) * levels) // i
        level[bins[:i] == 0] = -1  # Q is spread over the bins where hist[:i] is non-empty only
        full_bins = level != -1
        mass = np.bincount(level[full_bins], weights=bins[:i][full_bins], minlength=levels)
        used = np.bincount(level[full_bins], minlength=levels)
        q = np.where(full_bins, mass[level] / np.maximum(used[level], 1), 0.0)
        p = bins[:i].copy()
        p[i - 1] += bins[i:].sum()
        p, q = p / p.sum(), q / q.sum()
        full = p > 0
        if (q[full] == 0).any():
            continue  # outliers folded into an empty last bin: KL infinite
        kl = float(np.sum(p[full] * np.log(p[full] / q[full])))
        if samples:
            kl -= (full.sum() - (mass > 0).sum()) / (2 * samples)
        if kl <= best:  # the widest threshold on ties
            best, best_i = kl, i
    return best_i


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


def sparse_tail(n: int = 20_000) -> np.ndarray:
    """Exponential magnitudes: a tail of isolated values over most of the 2048 bins."""
    return np.random.default_rng(4).exponential(size=n).astype(np.float32)


@pytest.mark.parametrize("name", [*DISTS, "sparse_tail"])
@pytest.mark.parametrize("bias_corrected", [False, True])
def test_entropy_matches_tensorrt_reference(name, bias_corrected):
    x = sparse_tail() if name == "sparse_tail" else DISTS[name]
    levels = 256 if x.min() >= 0 else 128
    a = np.abs(x[x != 0])  # exact zeros (40% of the ReLU data) are quantized exactly: not in the search
    hist, edges = np.histogram(a, bins=2048, range=(0, a.max()))
    n = a.size if bias_corrected else 0
    want = reference_entropy(hist, levels, n)
    # on the same histogram, every candidate (stride 1): exactly the reference's threshold
    assert entropy_threshold(hist, edges[1], levels, stride=1, samples=n or None) == pytest.approx(
        want * edges[1], rel=1e-9)


def test_no_smoothing_that_drops_wide_candidates():
    """MXNet's / ONNX Runtime's eps smoothing turns the single-value bins of a sparse tail negative,
    which rejected every candidate past the first empty bins (0.56 of the max here, on 60000
    exponential values) where the plain KL search gives 0.69; with the bias correction for 60000
    samples, the whole range (an exponential tail has no outliers)."""
    x = sparse_tail(60_000)
    hist, edges = np.histogram(x, bins=2048, range=(0, x.max()))
    assert 0.65 * x.max() < entropy_threshold(hist, edges[1], 256) < 0.75 * x.max()
    assert entropy_threshold(hist, edges[1], 256, samples=x.size) == pytest.approx(x.max(), rel=1e-6)


def test_entropy_streamed_follows_the_reference():
    """Streamed in batches (re-binned as the range grows, resampled, strided candidates) the
    threshold stays close to the reference on the final histogram: the KL minimum is flat."""
    x = DISTS["laplace_outliers"]
    a = np.abs(x)
    hist, edges = np.histogram(a, bins=2048, range=(0, a.max()))
    want = reference_entropy(hist, 128, a.size) * edges[1]
    lo, hi = streamed(x).range("entropy")
    assert hi == pytest.approx(want, rel=0.1) and lo == -hi
    assert hi < 0.35 * x.max()  # the outliers (25..40) are clipped, the body (|x| < 13) is not
    assert hi > np.percentile(a, 99.99)


def test_entropy_post_relu_outliers_clipped_between_bulk_and_max():
    rng = np.random.default_rng(1)
    bulk = np.maximum(rng.standard_normal(200_000), 0).astype(np.float32)  # half zeros, half half-normal
    with_outliers = bulk.copy()
    with_outliers[:5] = [12, 15, 9, 20, 11]
    hi = streamed(with_outliers).range("entropy")[1]
    assert 0.9 * bulk.max() < hi < 0.3 * 20  # the whole bulk in range, the outliers clipped
    # without outliers the threshold is the max (the TensorRT search on a thin tail would clip it
    # at ~3.7 on 60k values: sampling noise, undone by the bias correction)
    assert streamed(bulk).range("entropy")[1] > 0.95 * bulk.max()
    # one-sided uint8 data: the search has 256 quantized bins, the range starts at 0
    assert streamed(with_outliers).range("entropy")[0] == 0.0


def test_dispersion_counts_repeated_values():
    rng = np.random.default_rng(2)
    iid = rng.standard_normal(200_000).astype(np.float32)
    assert 0.9 < streamed(iid).dispersion() < 1.3  # Poisson counts
    base = iid[:5000].copy()
    base[:4] = [30, -22, 25, 18]
    repeated = streamed(np.tile(base, 40))  # an activation that does not depend on the input
    assert 30 < repeated.dispersion() < 50
    # 5000 values, not 200000: a coarse histogram (312 bins), and the KL search clips far less than on
    # 200000 independent values with the same outliers
    iid[:4] = [30, -22, 25, 18]
    assert streamed(iid).range("entropy")[1] < 5
    assert repeated.range("entropy")[1] > 15
    pixels = np.random.default_rng(3).integers(0, 17, 100_000).astype(np.float32) / 16  # 17 levels
    assert streamed(pixels).range("entropy") == (0.0, 1.0)


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
    assert abs(his["entropy"] - his["percentile"]) > 0.1 * his["percentile"]
    relu = DISTS["relu"].copy()
    relu[:3] = [30.0, 24.0, 26.0]
    his = {m: streamed(relu).range(m)[1] for m in ("minmax", "percentile", "entropy", "mse")}
    order = [his[m] for m in ("percentile", "entropy", "mse", "minmax")]
    assert all(a < 0.95 * b for a, b in zip(order, order[1:])), his


def test_relu_ranges_are_one_sided_and_symmetric_on_request():
    stats = streamed(DISTS["relu"])
    for method in ("minmax", "percentile", "entropy", "mse"):
        lo, hi = stats.range(method)
        assert lo == pytest.approx(0.0, abs=stats.width) and hi > 0
    lo, hi = stats.range("entropy", symmetric=True)
    assert lo == -hi
    # the search gets the grid the tensor will have: 256 quantized bins for uint8 over [0, hi],
    # 128 for int8 symmetric
    relu = DISTS["relu"].copy()
    relu[:3] = [30.0, 24.0, 26.0]
    stats = streamed(relu)
    assert stats.range("entropy") == (0.0, stats.entropy_threshold(256))
    assert stats.range("entropy", symmetric=True)[1] == stats.entropy_threshold(128)


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
    rng = np.random.default_rng(5)
    x = np.abs(rng.standard_normal(3000)).astype(np.float32)  # < 16 per bin x 512 bins
    x[:2] = [9.0, 11.0]
    stats = streamed(x, parts=3)
    assert stats.range("entropy") == (float(x.min()), 11.0)
    big = np.abs(rng.standard_normal(200_000)).astype(np.float32)
    big[:2] = [9.0, 11.0]
    assert streamed(big).range("entropy")[1] < 0.5 * 11.0


def test_histogram_work_per_batch_is_bounded():
    x = np.random.default_rng(6).standard_normal(100_000).astype(np.float32)
    stats = RangeStats(max_values=10_000)
    stats.update(x)
    stats.update(x)
    assert stats.count == 200_000 and stats.sampled == 20_004
    assert stats.range("minmax") == (float(x.min()), float(x.max()))  # extremes from every value
    # an evenly strided subset, its offset moving from batch to batch, and the batch's extremes
    full = RangeStats()
    for offset in (0, 1):
        full.update(np.concatenate([x[offset::10], [x.min(), x.max()]]))
    assert np.array_equal(stats.hist, full.hist)
    lo, hi = stats.range("percentile", percentile=99.9)
    want_lo, want_hi = np.percentile(x, [0.1, 99.9])
    assert abs(lo - want_lo) < 0.1 and abs(hi - want_hi) < 0.1


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
