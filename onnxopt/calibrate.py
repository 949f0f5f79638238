"""Calibration: streaming over calibration data and the intermediate tensors it produces.

Data-hungry passes (qdq, prune, svd) read their data here, from
``PassContext.calibration``, never by opening files themselves. Everything is
streamed: each batch's intermediate tensors are handed to reducers (running
min/max, histograms, Gram matrices) and dropped, so memory does not grow
with the number of samples.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import onnx

from .data import iter_feeds, source_label, synthetic_dataset
from .errors import InputError

log = logging.getLogger("onnxopt")

DEFAULT_SAMPLES = 512


@dataclass
class CalibrationSet:
    """Re-iterable calibration feeds for one model.

    ``source`` is a path (.npz, .npy, folder), a dict of arrays, a list of such
    dicts, or a one-shot iterator (taken once into memory, up to ``samples``).
    Without a source, seeded synthetic data is used and a warning says that
    ranges computed from it will be wrong.
    """

    source: Any
    model: onnx.ModelProto
    samples: Optional[int] = DEFAULT_SAMPLES
    batch_size: int = 32
    dims: dict[str, int] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        self.synthetic = self.source is None
        if self.synthetic:
            log.warning("no calibration data given: using random inputs; activation ranges, sensitivities "
                        "and reconstructions computed from them will not match real data")
        elif not isinstance(self.source, (str, os.PathLike, dict, list, tuple)) and iter(self.source) is self.source:
            # a one-shot iterator (generator): keep what one pass yields so later passes can re-read it
            self.source = [dict(feed) for feed, _, _ in iter_feeds(
                self.source, self.model, batch_size=self.batch_size, limit=self.samples, what="calibration data")]
        self.label = "synthetic" if self.synthetic else source_label(self.source)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Feeds one batch at a time."""
        if self.synthetic:
            batches = max(1, (self.samples or self.batch_size) // self.batch_size)
            dims = {**self.dims}
            yield from synthetic_dataset(self.model, dims=dims, seed=self.seed, batches=min(batches, 8)).feeds
            return
        for feed, _, _ in iter_feeds(self.source, self.model, batch_size=self.batch_size, limit=self.samples,
                                     what="calibration data"):
            yield feed


def calibration_set(ctx: Any, model: onnx.ModelProto, samples: Optional[int] = None) -> CalibrationSet:
    """The calibration set for a pass, from its context (``ctx.calibration``)."""
    source = ctx.calibration
    if isinstance(source, CalibrationSet):
        return source
    return CalibrationSet(source, model, samples=samples or DEFAULT_SAMPLES, dims=dict(ctx.dims), seed=ctx.seed)


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs the named intermediate tensors."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    typed = {vi.name: vi for vi in copy.graph.value_info}
    for name in names:
        if name in present:
            continue
        copy.graph.output.append(typed[name] if name in typed else onnx.ValueInfoProto(name=name))
    return copy


def stream_tensors(model: onnx.ModelProto, names: Sequence[str], data: Iterable[dict[str, np.ndarray]],
                   reduce: Callable[[dict[str, np.ndarray]], None], *, chunk: int = 256,
                   on_batch: Optional[Callable[[int], None]] = None) -> int:
    """Run ``data`` through ``model`` and hand each batch's named tensors to ``reduce``.

    One ORT session per chunk of ``chunk`` tensors (not one per tensor);
    graph optimizations are off so every intermediate keeps its name. Nothing
    is kept after ``reduce`` returns. Returns the number of batches.
    """
    names = list(dict.fromkeys(names))
    batches = 0
    for start in range(0, max(len(names), 1), chunk):
        part = names[start:start + chunk]
        session = _session(with_outputs(model, part))
        wanted = [n for n in part]
        batches = 0
        for feed in data:
            values = session.run(wanted, feed)
            reduce(dict(zip(wanted, values)))
            batches += 1
            if on_batch is not None:
                on_batch(batches)
        if batches == 0:
            raise InputError("calibration data gave no batches")
    return batches


def _session(model: onnx.ModelProto) -> "ort.InferenceSession":
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"ONNX Runtime cannot run the model for calibration: {first}") from None


class GramStats:
    """Running XᵀX over the rows of a layer's input, for reconstruction, whitening and Wanda scores.

    ``update`` takes activations whose last axis (after ``to_rows``) is the
    reduction axis K of the layer; memory is K×K float64 whatever the number
    of samples.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.gram = np.zeros((k, k), np.float64)
        self.mean = np.zeros(k, np.float64)
        self.rows = 0

    def update(self, rows: np.ndarray) -> None:
        x = np.asarray(rows, np.float64).reshape(-1, self.k)
        self.gram += x.T @ x
        total = self.rows + len(x)
        if total:
            self.mean += (x.sum(axis=0) - len(x) * self.mean) / total
        self.rows = total

    @property
    def column_norms(self) -> np.ndarray:
        """‖X[:, j]‖₂ for each input column j (the Wanda activation norm)."""
        return np.sqrt(np.maximum(np.diag(self.gram), 0.0))

    def covariance(self) -> np.ndarray:
        """XᵀX / rows: the second moment used for output-error estimates."""
        return self.gram / max(self.rows, 1)


def matmul_rows(x: np.ndarray) -> np.ndarray:
    """Rows of a MatMul/Gemm input: every leading axis flattened, the last one kept."""
    return x.reshape(-1, x.shape[-1])


def conv_rows(x: np.ndarray, kernel: Sequence[int], pads: Sequence[int], strides: Sequence[int],
              dilations: Sequence[int], group: int = 0, groups: int = 1) -> np.ndarray:
    """im2col for a 2-D Conv input [N, C, H, W]: rows [N*OH*OW, C/groups*KH*KW] for one group.

    Columns are ordered (channel, kh, kw), matching ``W[o].reshape(-1)`` of a
    weight [O, C/groups, KH, KW], so ``rows @ W.reshape(O, -1).T`` is the conv.
    """
    n, c, h, w = x.shape
    cg = c // groups
    x = x[:, group * cg:(group + 1) * cg]
    kh, kw = kernel
    top, left, bottom, right = pads[0], pads[1], pads[2], pads[3]
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    sh, sw = strides
    dh, dw = dilations
    oh = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, cg, kh, kw, oh, ow), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = x[:, :, i * dh:i * dh + sh * oh:sh, j * dw:j * dw + sw * ow:sw]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * oh * ow, cg * kh * kw)


# ----------------------------------------------------------------- activation ranges (qdq)

RANGE_METHODS = ("minmax", "percentile", "entropy", "mse")
HIST_BINS = 2048


class RangeStats:
    """Streaming statistics of one tensor for picking a quantization range.

    Keeps the running min and max and, for the histogram methods, two
    fixed-size histograms over ``[0, limit]``: one of the non-negative values
    and one of the magnitudes of the negative ones, ``oversample * bins``
    bins each. When a batch exceeds ``limit`` the range doubles (as often as
    needed) and the counts merge pairwise, which re-bins exactly; so memory
    is a fixed number of counters whatever the number of samples. The
    threshold methods read a ``bins``-bin histogram of |x| over
    ``[0, max|x|]`` resampled from them (the fine bins keep at least
    ``bins`` bins over the data after any doubling). Non-finite values are
    ignored.
    """

    MIN_PER_BIN = 16  # entropy: fewest values per histogram bin on average

    def __init__(self, bins: int = HIST_BINS, histogram: bool = True, oversample: int = 2) -> None:
        self.bins = bins
        self.fine = bins * max(1, oversample)
        if self.fine % 2:
            raise ValueError("bins * oversample must be even")
        self.histogram = histogram
        self.min = np.inf
        self.max = -np.inf
        self.count = 0
        self.zeros = 0  # exact zeros: quantized exactly (the zero point), so left out of threshold searches
        self.limit = 0.0
        self.pos = np.zeros(self.fine, np.int64) if histogram else None
        self.neg = np.zeros(self.fine, np.int64) if histogram else None

    @property
    def width(self) -> float:
        """Width of the fine bins."""
        return self.limit / self.fine

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values)
        if x.dtype.kind != "f":
            x = x.astype(np.float32)
        x = x.reshape(-1)
        if x.size and not np.isfinite(x).all():
            x = x[np.isfinite(x)]
        if not x.size:
            return
        lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += int(x.size)
        if not self.histogram:
            return
        self.zeros += int(np.count_nonzero(x == 0))
        peak = max(abs(lo), abs(hi))
        if peak > self.limit:
            self._grow(peak)
        if self.limit <= 0:  # everything so far is exactly zero
            self.pos[0] += x.size
            return
        # one bincount over [pos bins | neg bins]: bin of |x|, shifted by `fine` for negative values
        idx = np.abs(x)
        idx *= self.fine / self.limit
        idx = np.minimum(idx, self.fine - 1, out=idx).astype(np.int32)
        idx += (x < 0).view(np.int8) * np.int32(self.fine)
        counts = np.bincount(idx, minlength=2 * self.fine)
        self.pos += counts[:self.fine]
        self.neg += counts[self.fine:]

    def _grow(self, peak: float) -> None:
        if self.limit <= 0:
            zeros = int(self.pos.sum())  # values seen so far were all 0: they stay in bin 0
            self.limit = peak
            self.pos[:] = 0
            self.pos[0] = zeros
            return
        limit = self.limit
        while limit < peak:
            limit *= 2
            for hist in (self.pos, self.neg):  # merge pairs into the lower half
                merged = hist.reshape(-1, 2).sum(axis=1)
                hist[:] = 0
                hist[:self.fine // 2] = merged
        self.limit = limit

    # ------------------------------------------------------------- ranges

    def abs_histogram(self, exact_zeros: bool = True, bins: Optional[int] = None) -> tuple[np.ndarray, float]:
        """(counts, bin width): ``bins`` bins of |x| over [0, max|x|], resampled from the fine bins
        (counts spread evenly within a fine bin); without the exact zeros when ``exact_zeros`` is false."""
        bins = bins or self.bins
        peak = max(abs(float(self.min)), abs(float(self.max))) if self.count else 0.0
        fine = (self.pos + self.neg).astype(np.float64)
        if not exact_zeros:
            fine[0] -= self.zeros
        if peak <= 0 or self.limit <= 0:
            out = np.zeros(bins)
            out[0] = fine.sum()
            return out, 0.0
        cum = np.concatenate([[0.0], np.cumsum(fine)])
        edges = np.linspace(0.0, peak, bins + 1) / self.width  # in fine-bin units
        at = np.interp(edges, np.arange(self.fine + 1), cum)
        at[-1] = cum[-1]
        return np.diff(at), peak / bins

    def range(self, method: str = "minmax", percentile: float = 99.99, symmetric: bool = False,
              levels: Optional[int] = None) -> tuple[float, float]:
        """(lo, hi) to quantize to. ``symmetric`` asks for a range centred on 0 (int8).

        minmax: the observed extremes. percentile: the ``percentile``-th and
        ``100 - percentile``-th percentiles. entropy: the |x| threshold whose
        quantized distribution is closest in KL divergence to the observed one
        (TensorRT's search over a 2048-bin histogram). mse: the |x| threshold
        that minimises the expected squared quantization error. The threshold
        methods clip both sides at the threshold, never past the observed
        extremes; ``levels`` is the number of quantization steps (default 255
        for one-sided data, else 127 per side).
        """
        if self.count == 0:
            return 0.0, 0.0
        lo, hi = float(self.min), float(self.max)
        if method == "minmax":
            pass
        elif method in ("percentile", "entropy", "mse"):
            if not self.histogram:
                raise ValueError(f"range method '{method}' needs histograms")
            one_sided = lo >= 0 and not symmetric
            if method == "percentile":
                lo, hi = self.percentile_range(percentile)
            else:
                # exact zeros (ReLU outputs, padding) are exact at any threshold: a spike of them in
                # the first bin would otherwise drive the KL search to clip far too much
                hist, width = self.abs_histogram(exact_zeros=False)
                if method == "entropy":  # TensorRT: 128 quantized bins for |x|; 255 for one-sided uint8
                    q_levels = min(levels or (255 if one_sided else 128), 255)
                    # KL over a sparse histogram follows noise: keep >= MIN_PER_BIN values per bin on
                    # average, and below 2 bins per quantized level keep the whole range
                    bins = min(self.bins, (self.count - self.zeros) // self.MIN_PER_BIN)
                    if bins < 2 * q_levels:
                        t = max(abs(lo), abs(hi))
                    else:
                        if bins < self.bins:
                            hist, width = self.abs_histogram(exact_zeros=False, bins=bins)
                        t = entropy_threshold(hist, width, q_levels)
                else:
                    t = mse_threshold(hist, width, levels or (255 if one_sided else 127))
                lo, hi = max(lo, -t), min(hi, t)
        else:
            raise ValueError(f"unknown range method '{method}'; known: {', '.join(RANGE_METHODS)}")
        if symmetric:
            m = max(abs(lo), abs(hi))
            return -m, m
        return lo, hi

    def percentile_range(self, p: float) -> tuple[float, float]:
        """The (100 - p)-th and p-th percentiles of the values seen, read off the histograms
        (within one bin width), never past the observed extremes."""
        n = self.count
        q = max(0.0, min(1.0, p / 100.0))
        # signed histogram from most negative to most positive
        signed = np.concatenate([self.neg[::-1], self.pos])
        edges = np.concatenate([-np.arange(self.fine, 0, -1), np.arange(0, self.fine + 1)]) * self.width
        cum = np.cumsum(signed)

        def at(fraction: float) -> float:
            target = fraction * (n - 1)
            i = int(np.searchsorted(cum, target, side="right"))
            i = min(i, len(signed) - 1)
            before = cum[i - 1] if i else 0
            inside = (target - before) / max(signed[i], 1)
            return float(edges[i] + min(max(inside, 0.0), 1.0) * self.width)

        lo, hi = at(1.0 - q), at(q)
        return max(float(self.min), lo), min(float(self.max), hi)


def entropy_threshold(hist: np.ndarray, width: float, levels: int = 128, stride: int = 0) -> float:
    """TensorRT's entropy calibration on a histogram of |x| with bins of ``width``.

    For each candidate threshold of i bins (from ``levels`` up to the last
    non-empty bin), the reference distribution P is hist[:i] with the counts
    beyond folded into its last bin; Q is hist[:i] merged into ``levels``
    quantized bins (the remainder into the last) and spread back over the
    bins where P is non-empty; both are smoothed (eps 1e-4) and the threshold
    minimising KL(P || Q) wins, as in TensorRT/MXNet/ONNX Runtime's
    reference code. ``stride`` steps the candidates (0: at most about 512).
    """
    hist = np.asarray(hist, np.float64)
    nonzero = np.nonzero(hist)[0]
    if not len(nonzero):
        return 0.0
    last = int(nonzero[-1]) + 1
    if last <= levels:
        return last * width
    stride = stride or max(1, -(-(last - levels) // 512))
    tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # tail[i] = sum(hist[i:])
    best, best_i = np.inf, last
    candidates = list(range(levels, last + 1, stride))
    if candidates[-1] != last:
        candidates.append(last)
    for i in candidates:
        ref = hist[:i]
        p = ref.copy()
        p[i - 1] += tail[i]
        nz = p > 0
        group = np.minimum(np.arange(i) // (i // levels), levels - 1)
        sums = np.bincount(group, weights=ref, minlength=levels)
        used = np.bincount(group, weights=nz.astype(np.float64), minlength=levels)
        q = np.where(nz, sums[group] / np.maximum(used[group], 1), 0.0)
        kl = _kl(p, q)
        if kl < best:
            best, best_i = kl, i
    return best_i * width


def _smooth(p: np.ndarray, eps: float = 1e-4) -> Optional[np.ndarray]:
    zeros = p == 0
    n_zeros = int(zeros.sum())
    n_nonzeros = p.size - n_zeros
    if not n_nonzeros:
        return None
    return p + eps * zeros - (eps * n_zeros / n_nonzeros) * ~zeros


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(P || Q) of unnormalised counts after normalising and smoothing both; inf when undefined."""
    ps, qs = p.sum(), q.sum()
    if ps <= 0 or qs <= 0:
        return np.inf
    p, q = _smooth(p / ps), _smooth(q / qs)
    if p is None or q is None or (p <= 0).any() or (q <= 0).any():
        return np.inf
    return float(np.sum(p * np.log(p / q)))


def mse_threshold(hist: np.ndarray, width: float, levels: int = 127) -> float:
    """The |x| threshold T minimising the expected squared error of quantizing with ``levels``
    steps over [0, T] and clipping beyond: for bin centres c, (c - T)^2 past T and step^2/12 within."""
    hist = np.asarray(hist, np.float64)
    nonzero = np.nonzero(hist)[0]
    if not len(nonzero):
        return 0.0
    last = int(nonzero[-1]) + 1
    h = hist[:last]
    centres = (np.arange(last) + 0.5) * width
    t = np.arange(1, last + 1) * width  # candidate thresholds at bin edges
    # suffix sums of counts, c*counts, c^2*counts for the clipped tail beyond each candidate
    s0 = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])
    s1 = np.concatenate([np.cumsum((h * centres)[::-1])[::-1], [0.0]])
    s2 = np.concatenate([np.cumsum((h * centres ** 2)[::-1])[::-1], [0.0]])
    k = np.arange(1, last + 1)
    clip = s2[k] - 2 * t * s1[k] + t ** 2 * s0[k]
    inside = (s0[0] - s0[k]) * (t / levels) ** 2 / 12.0
    return float(t[int(np.argmin(clip + inside))])


class TensorRanges:
    """RangeStats for many named tensors, fed one batch (a name -> array dict) at a time;
    a ``reduce`` for ``stream_tensors``."""

    def __init__(self, names: Iterable[str], method: str = "minmax", bins: int = HIST_BINS) -> None:
        if method not in RANGE_METHODS:
            raise ValueError(f"unknown range method '{method}'; known: {', '.join(RANGE_METHODS)}")
        self.method = method
        self.stats = {n: RangeStats(bins, histogram=method != "minmax") for n in names}

    def __call__(self, batch: dict[str, np.ndarray]) -> None:
        for name, value in batch.items():
            stats = self.stats.get(name)
            if stats is not None:
                stats.update(value)

    def ranges(self, percentile: float = 99.99, symmetric: bool = False) -> dict[str, tuple[float, float]]:
        return {n: s.range(self.method, percentile, symmetric) for n, s in self.stats.items()}

    def nbytes(self) -> int:
        """Memory held by the statistics: fixed by the number of tensors and bins."""
        return sum(0 if s.pos is None else s.pos.nbytes + s.neg.nbytes for s in self.stats.values())
