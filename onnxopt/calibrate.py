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
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import onnx

from . import progress
from .batching import cut, leading_axis, symbolic_batch
from .data import count_samples, input_specs, iter_feeds, source_label, synthetic_dataset
from .errors import InputError

if TYPE_CHECKING:  # onnxruntime is imported where a session is made, not at import time
    import onnxruntime as ort

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
            dims = self._synthetic_dims()
            yield from synthetic_dataset(self.model, dims=dims, seed=self.seed, batches=min(batches, 8)).feeds
            return
        for feed, _, _ in iter_feeds(self.source, self.model, batch_size=self.batch_size, limit=self.samples,
                                     what="calibration data"):
            yield feed

    def _synthetic_dims(self) -> dict[str, int]:
        """The user's dims, and for the symbolic dims they leave open the binding the original runs on
        (the synthetic search validation uses): binding them all to 1 leaves an audio frontend or a
        strided CNN with inputs too short to run. Searched once per set."""
        if getattr(self, "_dims", None) is None:
            self._dims = dict(self.dims)
            if any(not (isinstance(d, int) and d > 0) for spec in input_specs(self.model) for d in spec.shape):
                from .synthetic import find_inputs

                probe = find_inputs(self.model, dims=self.dims, seed=self.seed)
                if probe.found:
                    self._dims = {**probe.binding, **self.dims}
        return self._dims

    @property
    def part(self) -> str:
        """Which samples this set reads: all of them (onnxopt/holdout.py cuts fitting and held-out parts)."""
        return "all"

    def expected_samples(self) -> Optional[int]:
        """Samples one pass yields, where the shapes tell without reading the data (for progress)."""
        if self.synthetic:
            return None
        return count_samples(self.source, self.model, batch_size=self.batch_size, limit=self.samples)


def calibration_set(ctx: Any, model: onnx.ModelProto, samples: Optional[int] = None) -> CalibrationSet:
    """The calibration set for a pass, from its context (``ctx.calibration``). A one-shot iterator is
    read into memory once and left on ``ctx`` as that list, so a second streaming run (or pass) sees it too."""
    source = ctx.calibration
    if isinstance(source, CalibrationSet):
        return source
    found = CalibrationSet(source, model, samples=samples or DEFAULT_SAMPLES, dims=dict(ctx.dims), seed=ctx.seed)
    if found.source is not source and isinstance(found.source, list):
        try:
            ctx.calibration = found.source
        except AttributeError:
            pass
    return found


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
                   on_batch: Optional[Callable[[int], None]] = None, desc: str = "calibrating") -> int:
    """Run ``data`` through ``model`` and hand each run's named tensors to ``reduce``.

    One ORT session per chunk of at most ``chunk`` tensors (not one per tensor) whose sizes add up
    to at most STREAM_BYTES (a larger tensor gets a chunk of its own), sized from the shapes the
    first batch gives: a detector's activations at 640x640 would otherwise come back from one run
    by the gigabyte. Where the model leaves its batch axis open, sizes are per sample and a feed is
    cut so that one run hands back at most RUN_BYTES: memory then depends on the model, not on how
    many samples the data holds or how it is batched. Graph optimizations are off so every
    intermediate keeps its name. Nothing is kept after ``reduce`` returns. Returns the number of
    feeds ``data`` gave on one pass. A progress bar ``desc`` counts samples over every chunk.
    """
    remaining = list(dict.fromkeys(names))
    per_pass = _expected_samples(data)
    cuttable = symbolic_batch(model)
    batches = 0
    sizes: Optional[dict[str, int]] = None
    with progress.task(desc, total=None, unit="sample") as bar:
        while True:
            session, part, batches, rows = None, remaining, 0, 0
            for feed in data:
                if session is None:
                    if sizes is None:
                        sizes = _sizes(model, remaining, feed, cuttable)
                        if per_pass:
                            bar.set_total(per_pass * len(plan_chunks(remaining, sizes, chunk)))
                    part = plan_chunks(remaining, sizes, chunk)[0] if remaining else []
                    rows = _run_rows(part, sizes) if cuttable else 0
                    session = _session(with_outputs(model, part))
                for piece in cut(feed, rows):
                    values = session.run(part, piece)
                    reduce(dict(zip(part, values)))
                    del values
                batches += 1
                bar.advance(_rows(feed))
                if on_batch is not None:
                    on_batch(batches)
            if batches == 0:
                raise InputError("calibration data gave no batches")
            remaining = remaining[len(part):]
            if not remaining:
                return batches


def _sizes(model: onnx.ModelProto, names: list[str], feed: dict, per_sample: bool) -> dict[str, int]:
    """Bytes of each named tensor on ``feed``, or on one of its samples (``per_sample``)."""
    sizes = tensor_sizes(model, names, feed)
    n = leading_axis(feed) if per_sample else None
    return {k: -(-v // n) for k, v in sizes.items()} if n else sizes


def _run_rows(part: list[str], per_sample: dict[str, int]) -> int:
    """Samples per run so that the run hands back at most RUN_BYTES (at least one; 0: unknown sizes, feeds whole)."""
    if not per_sample:
        return 0
    unknown = max(per_sample.values())
    total = sum(per_sample.get(name, unknown) for name in part)
    return max(1, RUN_BYTES // max(total, 1))


# intermediate tensors one chunk's session hands back at most (bytes, on one batch, or one sample
# where feeds can be cut)
STREAM_BYTES = 256 * 2**20
# ... and one run, where feeds can be cut along the batch axis: samples per run are chosen to stay
# within this (a sample whose chunk is larger runs alone). On mobilenetv2 at 224x224 (16 MB of
# intermediates a sample) runs of the data's batches of 16 and 32 peaked at 700 and 900 MB.
RUN_BYTES = 64 * 2**20
# initializers above this size are passed to shape inference as dims only
_LIGHT_BYTES = 4096


def plan_chunks(names: list[str], sizes: dict[str, int], chunk: int) -> list[list[str]]:
    """``names`` in order, cut into runs of at most ``chunk`` names and STREAM_BYTES (a tensor of
    unknown size counts as the largest known one)."""
    unknown = max(sizes.values(), default=0)
    out: list[list[str]] = []
    current: list[str] = []
    total = 0
    for name in names:
        size = sizes.get(name, unknown)
        if current and (len(current) >= chunk or total + size > STREAM_BYTES):
            out.append(current)
            current, total = [], 0
        current.append(name)
        total += size
    return out + [current] if current else out


def tensor_sizes(model: onnx.ModelProto, names: Sequence[str], feed: dict[str, np.ndarray]) -> dict[str, int]:
    """Bytes of each named tensor on ``feed``, by ONNX shape inference with the inputs fixed to the
    feed's shapes (weights passed as dims only); names it cannot size are left out."""
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g = light.graph
    g.node.extend(model.graph.node)
    g.output.extend(model.graph.output)
    for init in model.graph.initializer:
        light_init = init.ByteSize() <= _LIGHT_BYTES
        g.initializer.append(init if light_init else onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims))
    for value in model.graph.input:
        copy = g.input.add()
        copy.CopyFrom(value)
        if value.name in feed and copy.type.HasField("tensor_type"):
            shape = copy.type.tensor_type.shape
            shape.ClearField("dim")
            for d in np.shape(feed[value.name]):
                shape.dim.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception:  # noqa: BLE001 - sizes are a memory hint: without them chunks go by count
        return {}
    wanted = set(names)
    sizes = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = value.type.tensor_type
        if value.name not in wanted or not t.HasField("shape") or not t.elem_type:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if all(d >= 0 for d in dims):
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize
            sizes[value.name] = int(np.prod(dims, dtype=np.int64)) * itemsize
    return sizes


def _expected_samples(data: Any) -> Optional[int]:
    """The samples a pass over ``data`` gives, when it is a CalibrationSet or wraps one as ``.data``
    (CountedFeeds, qdq's input tap); None when that cannot be told cheaply."""
    for _ in range(4):
        if isinstance(data, CalibrationSet):
            return data.expected_samples()
        data = getattr(data, "data", None)
    return None


def _rows(feed: dict) -> int:
    """Samples in a feed: its inputs' leading dimension."""
    return max((int(np.shape(v)[0]) for v in feed.values() if np.ndim(v)), default=1)


def _session(model: onnx.ModelProto) -> "ort.InferenceSession":
    import onnxruntime as ort

    from .runtime import session_for

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # errors come back as exceptions, worded by onnxopt; no raw ORT lines
    try:
        return session_for(model, options)  # from files when large: never the bytes of a large model
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"ONNX Runtime cannot run the model for calibration: {first}") from None


# rows of a layer input handled at once: im2col chunks and their float64 copies stay within this
GRAM_BYTES = 64 * 2**20


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
        rows = np.asarray(rows).reshape(-1, self.k)
        step = max(1, GRAM_BYTES // (8 * self.k))  # the float64 copy stays within GRAM_BYTES
        for start in range(0, len(rows), step):
            x = np.asarray(rows[start:start + step], np.float64)
            self.add(x.T @ x, x.sum(axis=0), len(x))

    def add(self, gram: np.ndarray, column_sums: np.ndarray, rows: int) -> None:
        """Fold in XᵀX and the column sums of ``rows`` rows computed elsewhere."""
        self.gram += gram
        total = self.rows + rows
        if total:
            self.mean += (column_sums - rows * self.mean) / total
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
    cg = x.shape[1] // groups
    cols = conv_cols(x[:, group * cg:(group + 1) * cg], kernel, pads, strides, dilations)
    n, _, kh, kw, oh, ow = cols.shape
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * oh * ow, cg * kh * kw)


def grouped_rows(x: np.ndarray, kernel: Sequence[int], pads: Sequence[int], strides: Sequence[int],
                 dilations: Sequence[int], groups: int) -> np.ndarray:
    """:func:`conv_rows` of every group at once: [groups, N*OH*OW, C/groups*KH*KW]."""
    cols = conv_cols(x, kernel, pads, strides, dilations)
    n, c, kh, kw, oh, ow = cols.shape
    cg = c // groups
    return (cols.reshape(n, groups, cg, kh, kw, oh, ow).transpose(1, 0, 5, 6, 2, 3, 4)
            .reshape(groups, n * oh * ow, cg * kh * kw))


def conv_cols(x: np.ndarray, kernel: Sequence[int], pads: Sequence[int], strides: Sequence[int],
              dilations: Sequence[int]) -> np.ndarray:
    """The patches a 2-D Conv reads from [N, C, H, W]: [N, C, KH, KW, OH, OW]."""
    n, c = x.shape[:2]
    kh, kw = kernel
    top, left, bottom, right = pads[0], pads[1], pads[2], pads[3]
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    sh, sw = strides
    dh, dw = dilations
    oh = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, c, kh, kw, oh, ow), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = x[:, :, i * dh:i * dh + sh * oh:sh, j * dw:j * dw + sw * ow:sw]
    return cols


# ----------------------------------------------------------------- activation ranges (qdq)

RANGE_METHODS = ("minmax", "percentile", "entropy", "mse")
HIST_BINS = 2048
# Histogram work per batch is bounded: a tensor with more values than this in one batch is
# histogrammed from an evenly strided subset of them (its offset moving from batch to batch) and
# the batch's min and max.
# 65536 values fill 2048 bins with 32 values each per batch, far more than the threshold searches
# need, while numpy's bincount (~2-5 ns a value) over every value of a large CNN would cost more
# than running the model. min, max and the value count always cover every value.
HIST_VALUES = 1 << 16


class RangeStats:
    """Streaming statistics of one tensor for picking a quantization range.

    Keeps the running min and max and, for the histogram methods, one fixed-size
    signed histogram over ``[-limit, limit)`` with ``oversample * bins`` bins per
    sign (``pos``/``neg`` are views of its halves, as histograms of x >= 0 and of
    -x for x < 0). When a batch exceeds ``limit`` the range doubles (as often as
    needed) and the counts merge pairwise, which re-bins exactly; so memory is a
    fixed number of counters whatever the number of samples, and every batch is
    read once. Each batch costs one bincount over at most ``max_values`` values
    (see HIST_VALUES); float32 arithmetic. The threshold methods read a ``bins``-bin
    histogram of |x| over ``[0, max|x|]`` resampled from the fine bins.
    Non-finite values are ignored.
    """

    MIN_PER_BIN = 16  # entropy: fewest independent values per histogram bin on average

    def __init__(self, bins: int = HIST_BINS, histogram: bool = True, oversample: int = 2,
                 max_values: int = HIST_VALUES) -> None:
        self.bins = bins
        self.fine = bins * max(1, oversample)
        if self.fine % 2:
            raise ValueError("bins * oversample must be even")
        self.histogram = histogram
        self.max_values = max(1, int(max_values))
        self.min = np.inf
        self.max = -np.inf
        self.count = 0    # every finite value seen
        self.zeros = 0    # exact zeros among the histogrammed values: quantized exactly (the zero point),
        #                   so left out of the threshold searches
        self.batches = 0
        self.limit = 0.0
        # signed histogram: bin k counts x in [(k - fine) * width, (k - fine + 1) * width)
        self.hist = np.zeros(2 * self.fine, np.int64) if histogram else None

    @property
    def pos(self) -> Optional[np.ndarray]:
        """Counts of x >= 0 in bins of ``width`` from 0 up (a view)."""
        return None if self.hist is None else self.hist[self.fine:]

    @property
    def neg(self) -> Optional[np.ndarray]:
        """Counts of -x for x < 0 in bins of ``width`` from 0 up (a view)."""
        return None if self.hist is None else self.hist[self.fine - 1::-1]

    @property
    def width(self) -> float:
        """Width of the fine bins."""
        return self.limit / self.fine

    @property
    def sampled(self) -> int:
        """Values in the histogram (all finite values, unless batches were larger than ``max_values``)."""
        return int(self.hist.sum()) if self.hist is not None else 0

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values)
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float32)
        x = x.reshape(-1)
        if not x.size:
            return
        lo, hi = x.min(), x.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            x = x[np.isfinite(x)]
            if not x.size:
                return
            lo, hi = x.min(), x.max()
        lo, hi = float(lo), float(hi)
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += int(x.size)
        if not self.histogram:
            return
        if x.size > self.max_values:  # a strided subset, plus the batch's extremes so the histogram ends there
            stride = -(-x.size // self.max_values)
            x = np.concatenate((x[self.batches % stride::stride], np.array([lo, hi], x.dtype)))
        self.batches += 1
        self.zeros += int(np.count_nonzero(x == 0))
        peak = max(-lo, hi)
        if peak > self.limit:
            self._grow(peak)
        if self.limit <= 0:  # everything so far is exactly zero
            self.hist[self.fine] += x.size
            return
        # bin index floor(x * fine / limit) + fine, in [0, 2 fine]: x == limit (and float32 rounding just
        # below it) lands in one extra bin that belongs to the last. Rounding can also move a negative
        # value within 1/2000 of a bin of 0 into pos[0]: |x| bins are unaffected.
        t = x * x.dtype.type(self.fine / self.limit)
        t += x.dtype.type(self.fine)
        counts = np.bincount(t.astype(np.intp), minlength=2 * self.fine + 1)
        self.hist += counts[:2 * self.fine]
        self.hist[-1] += counts[2 * self.fine:].sum()

    def _grow(self, peak: float) -> None:
        if self.limit <= 0:
            self.limit = peak  # values seen so far were all 0: they stay in pos[0]
            return
        limit = self.limit
        half = self.fine // 2
        while limit < peak:
            limit *= 2
            for side in (self.pos, self.neg):  # views: merge pairs into the lower half
                merged = side.reshape(-1, 2).sum(axis=1)
                side[:] = 0
                side[:half] = merged
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

    def dispersion(self) -> float:
        """How many times over the histogram counts each independent value (>= 1).

        Counts of n independent draws from a smooth density are Poisson: the second
        difference of neighbouring fine bins has variance 6 x their count. Values that
        recur batch after batch (an activation that barely depends on the input, a
        constant border) or data with few distinct values (pixel levels) scatter r times
        more, so the ratio estimates r and ``sampled / dispersion`` the number of
        independent values the threshold searches really have.
        """
        if self.hist is None:
            return 1.0
        pos = self.pos.astype(np.float64)
        pos[0] -= self.zeros
        num = den = 0.0
        for side in (pos, self.neg.astype(np.float64)):
            d2 = side[:-2] - 2.0 * side[1:-1] + side[2:]
            num += float(d2 @ d2)
            den += 6.0 * float(side[1:-1].sum())
        return max(1.0, num / den) if den > 0 else 1.0

    def range(self, method: str = "minmax", percentile: float = 99.99, symmetric: bool = False,
              levels: Optional[int] = None) -> tuple[float, float]:
        """(lo, hi) to quantize to. ``symmetric`` asks for a range centred on 0 (int8).

        minmax: the observed extremes. percentile: the ``percentile``-th and
        ``100 - percentile``-th percentiles. entropy: the |x| threshold whose
        quantized distribution is closest in KL divergence to the observed one
        (TensorRT's search, see RangeStats.entropy_threshold). mse: the |x| threshold that
        minimises the expected squared quantization error. The threshold methods
        clip both sides at the threshold, never past the observed extremes, and
        leave exact zeros out (ReLU outputs, padding: quantized exactly at any
        threshold, a spike of them in the first bin would drive the searches to
        clip far too much). ``levels`` is the number of quantization steps
        (default 255 for one-sided data, else 127 per side).
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
            steps = levels or (255 if one_sided else 127)
            if method == "percentile":
                lo, hi = self.percentile_range(percentile)
            elif method == "entropy":
                t = self.entropy_threshold(steps + 1)
                lo, hi = max(lo, -t), min(hi, t)
            else:
                hist, width = self.abs_histogram(exact_zeros=False)
                t = mse_threshold(hist, width, steps)
                lo, hi = max(lo, -t), min(hi, t)
        else:
            raise ValueError(f"unknown range method '{method}'; known: {', '.join(RANGE_METHODS)}")
        if symmetric:
            m = max(abs(lo), abs(hi))
            return -m, m
        return lo, hi

    def entropy_threshold(self, levels: int) -> float:
        """The KL threshold on |x| for ``levels`` quantized bins (TensorRT: 128 for int8, 256 for
        uint8 of one-sided data), with the sample size the histogram really has.

        A KL divergence read off a histogram is biased by sampling noise: merging noisy
        fine bins into quantized bins looks like information loss, more so the more bins
        are merged, so a sparse histogram drives the search to clip (the larger the
        candidate, the more noise it merges). Two finite-sample rules, both on the
        number of independent values n = (non-zero values) / dispersion():
        the histogram gets at most n / MIN_PER_BIN bins (no search below two bins per
        quantized level: the whole range is kept), and the search subtracts the
        Miller-Madow bias of the estimate (see entropy_threshold(samples=)).
        """
        peak = max(abs(float(self.min)), abs(float(self.max)))
        n = (self.sampled - self.zeros) / self.dispersion()
        bins = min(self.bins, int(n // self.MIN_PER_BIN))
        if bins < 2 * levels:
            return peak
        hist, width = self.abs_histogram(exact_zeros=False, bins=bins)
        return entropy_threshold(hist, width, levels, samples=n)

    def percentile_range(self, p: float) -> tuple[float, float]:
        """The (100 - p)-th and p-th percentiles of the values seen, read off the histogram
        (within one bin width), never past the observed extremes."""
        signed = self.hist
        n = int(signed.sum())
        q = max(0.0, min(1.0, p / 100.0))
        edges = (np.arange(2 * self.fine + 1) - self.fine) * self.width
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


def entropy_threshold(hist: np.ndarray, width: float, levels: int = 128, stride: int = 0,
                      samples: Optional[float] = None) -> float:
    """TensorRT's entropy calibration on a histogram of |x| with bins of ``width``.

    As NVIDIA's reference (pytorch-quantization's ``_compute_amax_entropy``): for
    each candidate threshold of i bins (from ``levels`` up to the last non-empty
    bin, every ``stride``-th; 0: at most about 512 candidates), the reference
    distribution P is hist[:i] with the counts beyond folded into its last bin; Q
    is hist[:i] merged into ``levels`` quantized bins (bin j into level
    floor(j * levels / i)) and spread back evenly over the bins where hist[:i] is
    non-empty; the threshold minimising KL(P || Q) wins, the widest on ties. Q is
    non-zero wherever P is except when outliers fold into an empty last bin: that
    candidate is skipped (KL infinite), as in the reference. No additive smoothing:
    the eps smoothing of the MXNet/ONNX Runtime code (eps 1e-4) subtracts
    eps x (empty bins / full bins) from every full bin's share, which turns a
    one-value bin of an N-value histogram negative as soon as empty / full bins
    exceed 1e4 / N (on 60000 values: one empty bin in seven) and so drops every
    candidate wide enough to reach a sparse tail (it clipped the ReLU outputs of
    the digits CNN to 72% of their max, the plain search to 84-91%).

    ``samples``: the number of independent values behind ``hist``. Given, the
    plug-in estimate, which is an entropy difference H(Q) - H(P), is corrected
    for its Miller-Madow bias (m_P - m_Q) / (2 samples) (m: occupied bins of P,
    occupied quantized bins of Q), the sampling noise that merging otherwise
    reads as information loss.

    Computed for all candidates at once from prefix sums: O(candidates x levels).
    """
    h = np.asarray(hist, np.float64)
    nonzero = np.nonzero(h)[0]
    if not len(nonzero):
        return 0.0
    last = int(nonzero[-1]) + 1
    if last <= levels:
        return last * width
    stride = stride or max(1, -(-(last - levels) // 512))
    cand = np.arange(levels, last + 1, stride, dtype=np.int64)
    if cand[-1] != last:
        cand = np.append(cand, last)
    h = h[:last]
    full = h > 0
    cum = np.concatenate([[0.0], np.cumsum(h)])
    n = float(cum[-1])
    occupied = np.concatenate([[0], np.cumsum(full)])
    cum_hlogh = np.concatenate([[0.0], np.cumsum(np.where(full, h * np.log(np.where(full, h, 1.0)), 0.0))])
    # quantized level k of candidate i covers bins [ceil(k i / levels), ceil((k + 1) i / levels))
    k = np.arange(levels + 1, dtype=np.int64)
    bounds = -((-k[None, :] * cand[:, None]) // levels)
    mass = cum[bounds[:, 1:]] - cum[bounds[:, :-1]]           # counts per quantized level
    used = occupied[bounds[:, 1:]] - occupied[bounds[:, :-1]]  # non-empty bins per level
    ok = mass > 0
    # sum_j P_j log Q_j over the levels, with Q_j = mass / used on non-empty bins
    p_log_q = np.where(ok, mass * np.log(np.where(ok, mass, 1.0) / np.maximum(used, 1)), 0.0).sum(axis=1)
    tail = n - cum[cand]       # counts beyond the threshold, folded into P's last bin
    top = h[cand - 1]          # hist[i - 1]
    p_top = top + tail
    p_log_p = cum_hlogh[cand - 1] + np.where(p_top > 0, p_top * np.log(np.where(p_top > 0, p_top, 1.0)), 0.0)
    q_top = np.where(top > 0, mass[:, -1] / np.maximum(used[:, -1], 1), 1.0)
    p_log_q = p_log_q + tail * np.log(q_top)
    # P normalised by n, Q by its own total cum[i]
    kl = (p_log_p - p_log_q) / n - np.log(n) + np.log(cum[cand])
    if samples:
        kl -= (occupied[cand] - ok.sum(axis=1)) / (2.0 * samples)
    kl[(tail > 0) & (top <= 0)] = np.inf
    best = len(kl) - 1 - int(np.argmin(kl[::-1]))
    return float(cand[best] * width)


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
        return sum(0 if s.hist is None else s.hist.nbytes for s in self.stats.values())


# ----------------------------------------------------------------- per-layer statistics (prune, svd)
#
# A layer's input statistics are keyed by a GramRequest: the activation tensor, how its rows are
# cut (``layout``: im2col for Conv, rows for MatMul/Gemm, transposed for Gemm transA), the row
# length k and the number of groups. ``layer_grams`` collects any number of them in one streaming
# run (peak memory: one batch plus k x k per statistic, whatever the number of samples), and keeps
# them on the PassContext for the passes after it in the same pipeline while the model they were
# measured on is unchanged.

@dataclass(frozen=True)
class GramRequest:
    """XᵀX (per group) of the rows ``layout`` cuts from tensor ``name``."""

    name: str
    layout: tuple
    k: int
    groups: int = 1


def layer_layout(layer: Any) -> tuple:
    """How a layer's input is cut into rows whose columns match its ``matrix()`` columns:
    ``("conv", kernel, pads, strides, dilations, auto_pad, groups)`` (1-D Conv as 2-D with a
    unit height) or ``("rows", transposed)`` (Gemm transA reads its input transposed)."""
    return input_layout(layer.node, layer.kind == "conv", layer.shape, layer.groups)


def input_layout(node: Any, conv: bool, shape: Sequence[int], groups: int = 1) -> tuple:
    """:func:`layer_layout` for a node reading a weight of ``shape`` (``conv``: a Conv weight)."""
    if conv:
        kernel = tuple(int(k) for k in shape[2:])
        nd = len(kernel)
        pads = tuple(node.attrs.get("pads", [0] * 2 * nd))
        strides = tuple(node.attrs.get("strides", [1] * nd))
        dil = tuple(node.attrs.get("dilations", [1] * nd))
        auto_pad = node.attrs.get("auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if nd == 1:
            kernel, pads = (1, kernel[0]), (0, pads[0], 0, pads[1])
            strides, dil = (1, strides[0]), (1, dil[0])
        return ("conv", kernel, pads, strides, dil, auto_pad, groups)
    return ("rows", bool(node.op == "Gemm" and int(node.attrs.get("transA", 0))))


def gram_request(layer: Any) -> Optional[GramRequest]:
    """The statistic a layer's input gives, or None where rows cannot be cut (ConvTranspose,
    Conv beyond 2-D, a constant or unnamed input)."""
    if layer.kind == "convtranspose" or (layer.kind == "conv" and len(layer.shape) > 4):
        return None
    x = layer.x
    if not x.name or type(x).__name__ == "Constant":
        return None
    return GramRequest(x.name, layer_layout(layer), layer.in_features, layer.groups)


def layer_rows(x: np.ndarray, layout: tuple, group: int, k: int) -> Iterator[np.ndarray]:
    """Chunks of a layer input's rows (im2col for Conv) whose columns match the layer's matrix columns."""
    if layout[0] == "conv":
        _, kernel, pads, strides, dil, auto_pad, groups = layout
        x2 = x if x.ndim == 4 else x[:, :, None, :]
        p = resolve_pads(x2.shape[2:], kernel, pads, strides, dil, auto_pad)
        per_sample = _out_size(x2.shape[2:], kernel, p, strides, dil) * max(k, 1) * x2.dtype.itemsize
        step = max(1, GRAM_BYTES // max(1, per_sample))  # samples per im2col chunk
        for start in range(0, x2.shape[0], step):
            yield conv_rows(x2[start:start + step], kernel, p, strides, dil, group, groups)
        return
    rows = x.T if layout[1] else matmul_rows(x)
    if rows.shape[-1] != k:
        return
    for start in range(0, rows.shape[0], 65536):
        yield rows[start:start + 65536]


def update_grouped(stats: list, x: np.ndarray, layout: tuple) -> None:
    """Add a grouped Conv input's rows to one GramStats per group, a block of groups per im2col and
    batched XᵀX: a depthwise layer has hundreds of groups of a few columns each, and one numpy call
    per group cost more than running the model. Blocks are sized so the float64 rows, the patches
    and their reordered copy stay within GRAM_BYTES."""
    _, kernel, pads, strides, dil, auto_pad, groups = layout
    x2 = x if x.ndim == 4 else x[:, :, None, :]
    cg = x2.shape[1] // groups
    p = resolve_pads(x2.shape[2:], kernel, pads, strides, dil, auto_pad)
    budget = GRAM_BYTES // 4
    per_group = _out_size(x2.shape[2:], kernel, p, strides, dil) * max(stats[0].k, 1) * 8  # one sample's
    step = max(1, budget // max(1, per_group * groups))  # samples per chunk
    block = max(1, budget // max(1, per_group * step))   # groups per chunk
    for start in range(0, x2.shape[0], step):
        for g0 in range(0, groups, block):
            g1 = min(groups, g0 + block)
            part = x2[start:start + step, g0 * cg:g1 * cg]
            rows = grouped_rows(part, kernel, p, strides, dil, g1 - g0).astype(np.float64)
            grams = np.matmul(rows.transpose(0, 2, 1), rows)
            sums = rows.sum(axis=1)
            for g in range(g1 - g0):
                stats[g0 + g].add(grams[g], sums[g], rows.shape[1])


def resolve_pads(spatial, kernel, pads, strides, dil, auto_pad) -> tuple:
    """Explicit (top, left, bottom, right) pads of a 2-D Conv, auto_pad resolved for this input size."""
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for size, k, s, d in zip(spatial, kernel, strides, dil):
            total = max(0, (int(np.ceil(size / s)) - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            out.append((big, small) if auto_pad == "SAME_LOWER" else (small, big))
        return (out[0][0], out[1][0], out[0][1], out[1][1])
    if auto_pad == "VALID":
        return (0, 0, 0, 0)
    return tuple(pads)


def _out_size(spatial, kernel, pads, strides, dil) -> int:
    oh = (spatial[0] + pads[0] + pads[2] - dil[0] * (kernel[0] - 1) - 1) // strides[0] + 1
    ow = (spatial[1] + pads[1] + pads[3] - dil[1] * (kernel[1] - 1) - 1) // strides[1] + 1
    return max(1, oh * ow)


class CountedFeeds:
    """Calibration feeds passed through, counting the samples a full pass yields (the feeds'
    leading dimension) into ``samples`` (the most any one pass read)."""

    def __init__(self, data: Iterable[dict]) -> None:
        self.data, self.samples = data, 0

    def __iter__(self) -> Iterator[dict]:
        n = 0
        for feed in self.data:
            n += _rows(feed)
            yield feed
        self.samples = max(self.samples, n)


@dataclass
class Grams:
    """What ``layer_grams`` returns: per request, one GramStats per group; the samples read; the
    shape of each requested tensor in the first batch."""

    stats: dict
    samples: int = 0
    shapes: dict = field(default_factory=dict)


def layer_grams(ctx: Any, model: onnx.ModelProto, requests: Iterable[GramRequest],
                samples: Optional[int] = None, tied: Optional[dict[GramRequest, Any]] = None,
                keep: bool = True) -> Grams:
    """XᵀX per group for every request, in one streaming run over the calibration data.

    Statistics already collected on the same model (same ``samples``) in this pipeline are
    taken from ``ctx`` instead of running again (see :func:`shared`). ``tied`` maps requests to a
    key: the requests of one key (the inputs of the nodes reading one tied weight, such as an
    unrolled RNN's steps) add into one GramStats per group, returned for each of them and not
    kept in ``ctx`` — one K×K matrix instead of one per step. ``keep=False``: what this call
    collects is returned and not kept in ``ctx`` either (a caller that bounds its memory run by run).
    """
    requests = list(dict.fromkeys(requests))
    tied = dict(tied or {})
    cache = shared(ctx, model, ("grams", samples))
    if not keep:
        tied.update({r: ("own", r) for r in requests if r not in cache and r not in tied})
    missing = [r for r in requests if r in tied or r not in cache]
    read = 0
    stats: dict = {}
    if missing:
        pooled: dict = {}
        for r in missing:
            fresh = [GramStats(r.k) for _ in range(r.groups)]
            stats[r] = fresh if r not in tied else pooled.setdefault((tied[r], r.k, r.groups), fresh)
        shapes: dict[str, tuple] = {}
        by_name: dict[str, list] = {}
        for r in missing:
            by_name.setdefault(r.name, []).append(r)

        def reduce(values: dict[str, np.ndarray]) -> None:
            for name, x in values.items():
                shapes.setdefault(name, tuple(np.shape(x)))
                for r in by_name.get(name, []):
                    if r.groups > 1 and r.layout[0] == "conv":
                        update_grouped(stats[r], x, r.layout)
                        continue
                    for gi in range(r.groups):
                        for rows in layer_rows(x, r.layout, gi, r.k):
                            stats[r][gi].update(rows)

        data = CountedFeeds(calibration_set(ctx, model, samples=samples))
        stream_tensors(model, sorted(by_name), data, reduce, desc="calibrating: layer inputs")
        read = data.samples
        for r in missing:
            if r not in tied:
                cache[r] = (stats[r], read, shapes.get(r.name))
    found = {r: stats[r] if r in tied else cache[r][0] for r in requests}
    return Grams(found, max([read] + [cache[r][1] for r in requests if r not in tied]),
                 {r.name: shapes.get(r.name) if r in tied else cache[r][2] for r in requests})


def shared(ctx: Any, model: onnx.ModelProto, what: tuple) -> dict:
    """A dict on ``ctx`` (one pipeline run) for statistics of kind ``what`` measured on ``model``.

    Keyed by a fingerprint of the model (nodes, tensor names, and the bytes of every
    initializer, by CRC), so a pass that changes anything reads fresh statistics. Contexts
    without room for it (no ``cache`` attribute) get a fresh dict each time.
    """
    cache = getattr(ctx, "cache", None)
    if not isinstance(cache, dict):
        return {}
    # statistics fitted on part of the samples are not those of the whole set
    source = getattr(ctx, "calibration", None)
    part = source.part if isinstance(source, CalibrationSet) else "all"
    return cache.setdefault((fingerprint(model), part, what), {})


def fingerprint(model: onnx.ModelProto) -> str:
    """A digest of what a model computes: its nodes and the data of its tensors (external data by location)."""
    import hashlib
    import zlib

    h = hashlib.sha1()
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        for init in g.initializer:
            h.update(init.name.encode())
            h.update(bytes(str((init.data_type, tuple(init.dims))), "utf8"))
            h.update(zlib.crc32(init.raw_data).to_bytes(4, "little") if init.raw_data else
                     init.SerializeToString())
        for node in g.node:
            h.update(str((node.op_type, node.domain, tuple(node.input), tuple(node.output))).encode())
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(attr.graphs)
                else:
                    h.update(attr.SerializeToString())
    return h.hexdigest()


class CrossStats:
    """Streaming XₚᵀXₚ, XₚᵀX_d and the means of both: one layer's input as a changed (pruned)
    model makes it and as the dense model does, on the same samples."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.gram = np.zeros((k, k))
        self.cross = np.zeros((k, k))
        self.mean = np.zeros(k)
        self.mean_dense = np.zeros(k)
        self.rows = 0

    def update(self, xp: np.ndarray, xd: np.ndarray) -> None:
        xp, xd = np.asarray(xp, np.float64), np.asarray(xd, np.float64)
        self.gram += xp.T @ xp
        self.cross += xp.T @ xd
        total = self.rows + len(xp)
        if total:
            self.mean += (xp.sum(axis=0) - len(xp) * self.mean) / total
            self.mean_dense += (xd.sum(axis=0) - len(xd) * self.mean_dense) / total
        self.rows = total


def cross_grams(ctx: Any, current: onnx.ModelProto, dense: onnx.ModelProto, request: GramRequest,
                samples: Optional[int] = None) -> tuple[list[CrossStats], int]:
    """Per group, the CrossStats of one layer input between ``current`` and ``dense`` (one run of
    both side by side), and the samples read."""
    paired, twin = paired_model(current, dense, request.name)
    stats = [CrossStats(request.k) for _ in range(request.groups)]

    def reduce(values: dict[str, np.ndarray]) -> None:
        for gi in range(request.groups):
            for rp, rd in zip(layer_rows(values[request.name], request.layout, gi, request.k),
                              layer_rows(values[twin], request.layout, gi, request.k)):
                stats[gi].update(rp, rd)

    data = CountedFeeds(calibration_set(ctx, paired, samples=samples))
    stream_tensors(paired, [request.name, twin], data, reduce, desc="calibrating: refit inputs")
    return stats, data.samples


def paired_model(current: onnx.ModelProto, dense: onnx.ModelProto, name: str) -> tuple[onnx.ModelProto, str]:
    """One model running ``current`` and (prefixed) ``dense`` on the same inputs; the dense twin of ``name``."""
    import onnx.compose

    prefix = "dense__"
    twin = onnx.compose.add_prefix(dense, prefix)
    model = onnx.ModelProto()
    model.CopyFrom(current)
    feeds = [onnx.helper.make_node("Identity", [i.name], [prefix + i.name], name=f"{prefix}feed_{i.name}")
             for i in dense.graph.input]
    model.graph.node.extend(feeds)
    model.graph.node.extend(twin.graph.node)
    model.graph.initializer.extend(twin.graph.initializer)
    model.graph.sparse_initializer.extend(twin.graph.sparse_initializer)
    model.graph.value_info.extend(twin.graph.value_info)
    model.functions.extend(twin.functions)
    return model, prefix + name
