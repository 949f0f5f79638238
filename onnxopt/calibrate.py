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
import onnxruntime as ort

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


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
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
