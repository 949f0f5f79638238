"""The accuracy guard: output cosine of a quantized model against the float one, and per-layer error contributions."""

from __future__ import annotations

import itertools
import time
from typing import Iterable, Iterator, NamedTuple, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.errors import InputError
from onnxopt.batching import cut, leading_axis
from onnxopt.pipeline import PassContext
from onnxopt.runtime import session_for

from .plan import Plan, _dq_source
from .writer import Writer


class Score(NamedTuple):
    """How close a quantized model's outputs are to the float one's: the lowest output cosine and the
    lowest argmax agreement over the outputs that are class or sequence scores (None when none is)."""

    cosine: float
    agreement: Optional[float]

    def __str__(self) -> str:
        agreement = "" if self.agreement is None else f", argmax agreement {self.agreement:.4f}"
        return f"cosine {self.cosine:.4f}{agreement}"


class Guard:
    """Output cosine and argmax agreement of a quantized model against the float one on a few
    calibration samples (ORT, optimizations on), and per-layer error contributions (optimizations
    off, names kept).

    Argmax agreement is measured on the outputs whose last axis holds class
    scores (made by a Softmax/LogSoftmax over the last axis, through layout
    ops); for a sequence ([N, T, C], CTC) it is the share of positions whose
    argmax agrees: whole-sequence identity on a few samples is a near-binary
    signal that no layer moves measurably, while positions count every flip."""

    BATCHES = 4     # feeds kept when the batch axis is fixed
    SAMPLES = 96    # samples kept when the batch axis is symbolic (joined into batches of up to 8): on 32 the
    # loop stopped where those samples happened to pass (0.992 of CTC positions) and held-out lines agreed at 0.985
    SECONDS = 2.0   # ... unless the float model takes longer than this on them
    QUICK = 16      # samples a quick measurement (ranking layers) runs on: enough that one layer's gain shows
    JOIN = 8        # samples per guard batch (a symbolic batch axis): one shape, so ORT's arena stays one size
    KEEP_BYTES = 16 * 2**20  # feeds kept in memory up to this; above, read again for each measurement, so the
    # guard's memory does not grow with its sample count (96 images at 224x224 hold 58 MB)
    split = True  # the batch axis is symbolic: sensitivities may run on a slice of a batch

    def __init__(self, model: onnx.ModelProto, data, ctx: PassContext, target: float,
                 min_agreement: Optional[float] = None, split: bool = True) -> None:
        self.model, self.ctx, self.target, self.split = model, ctx, target, split
        self.min_agreement = min_agreement
        self.data = data
        self.reference: list[dict] = []
        self.first: Optional[dict] = None  # the first feed (per-layer measurements run on it)
        kept: Optional[list[dict]] = []
        held = 0
        sess = self._session(model, True)
        start = time.monotonic()
        for feed in self._read():
            if self.reference and time.monotonic() - start > self.SECONDS:
                break  # a slow model: fewer samples, so each of the many measurements stays cheap
            if self.first is None:
                self.first = feed
            self.reference.append(self._run(model, feed, True, session=sess))
            held += sum(np.asarray(v).nbytes for v in feed.values())
            if kept is not None and held <= self.KEEP_BYTES:
                kept.append(feed)
            else:
                kept = None
        self._kept = kept
        # ranking layers needs less: the first few samples
        self.quick_feeds = _first(self.feeds(), self.QUICK) if split else [self.first] if self.first else []
        self.quick_reference = [self._run(model, f, True, session=sess) for f in self.quick_feeds]
        self.scored = score_outputs(model)
        self.runs = 0

    def _read(self) -> Iterator[dict]:
        return _collect(self.data, self.SAMPLES if self.split else 0, self.BATCHES)

    def feeds(self) -> Iterator[dict]:
        """The guard's feeds, one per reference: kept, or read again from the data when keeping them
        would cost more than KEEP_BYTES (the same feeds: reading the data is deterministic)."""
        if self._kept is not None:
            return iter(self._kept)
        return itertools.islice(self._read(), len(self.reference))

    def _session(self, model: onnx.ModelProto, optimize: bool):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        so.log_severity_level = 4  # errors come back as exceptions; no raw ORT lines
        # no memory arena: each candidate gets a short-lived session, and on mobilenetv2 the arenas of
        # sessions run on 11 guard batches rather than 2 left the peak 70 MB higher (none: the same)
        so.enable_cpu_mem_arena = False
        return session_for(model, so)  # from files when the model is large

    def _run(self, model, feed, optimize, names=None, session=None):
        sess = session or self._session(model, optimize)
        names = names or [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feed)))

    def cosine(self, candidate: onnx.ModelProto) -> float:
        return self.measure(candidate).cosine

    def measure(self, candidate: onnx.ModelProto, quick: bool = False) -> Score:
        """The candidate's score on every guard sample, or (quick) on the first few only: enough to
        rank layers, at a fraction of the time."""
        self.runs += 1
        sess = self._session(candidate, True)
        dots: dict[str, list[float]] = {}
        agree: dict[str, list[int]] = {}
        pairs = zip(self.quick_feeds, self.quick_reference) if quick else zip(self.feeds(), self.reference)
        for feed, ref in pairs:
            got = self._run(candidate, feed, True, list(ref), sess)
            for name, r in ref.items():
                if not np.issubdtype(np.asarray(r).dtype, np.floating):
                    continue
                a, b = np.asarray(r, np.float64).ravel(), np.asarray(got[name], np.float64).ravel()
                acc = dots.setdefault(name, [0.0, 0.0, 0.0])
                acc[0] += float(a @ b)
                acc[1] += float(a @ a)
                acc[2] += float(b @ b)
                if name in self.scored and np.ndim(r) >= 2 and np.shape(r)[-1] > 1:
                    same = _agreeing(np.asarray(r), np.asarray(got[name]))
                    counts = agree.setdefault(name, [0, 0])
                    counts[0] += int(same.sum())
                    counts[1] += int(same.size)
        values = [d[0] / np.sqrt(d[1] * d[2]) if d[1] > 0 and d[2] > 0 else (1.0 if d[1] == d[2] else 0.0)
                  for d in dots.values()]
        shares = [c[0] / c[1] for c in agree.values() if c[1]]
        return Score(float(min(values)) if values else 1.0, float(min(shares)) if shares else None)

    def holds(self, score: Score) -> bool:
        return score.cosine >= self.target and (score.agreement is None or self.min_agreement is None
                                                 or score.agreement >= self.min_agreement)

    def shortfall(self, score: Score) -> float:
        """How far a score is from the targets, each error over the error the target allows (1 or
        less on each: the tolerance holds); the sum, so a gain on either output metric counts."""
        loss = (1.0 - score.cosine) / max(1.0 - self.target, 1e-9)
        if score.agreement is not None and self.min_agreement is not None:
            loss += (1.0 - score.agreement) / max(1.0 - self.min_agreement, 1e-9)
        return float(loss)

    def sensitivities(self, graph: gs.Graph, plan: "Plan", writer: "Writer") -> list[tuple[int, str, float]]:
        """(position, name, local SNR dB) of every quantized node, the one whose quantization adds most
        error first: the noise power of its output relative to the float model, less its inputs'.
        Measured on one batch, with graph optimizations off so every tensor keeps its name."""
        from onnxopt.calibrate import with_outputs

        pairs = []  # (node, (q, float) names of its output, [(q, float) names of its inputs])
        for node in plan.nodes:
            out = node.outputs[0].name
            ins = []
            for slot in plan.act_inputs[id(node)]:
                src = _dq_source(node.inputs[slot])
                if src is not None:
                    ins.append((src.name, writer.renamed.get(src.name, src.name)))
            pairs.append((node, (out, writer.renamed.get(out, out)), ins))
        if not pairs:
            return []
        q_names = sorted({n for _, o, ins in pairs for n in [o[0], *[i[0] for i in ins]]})
        f_names = sorted({n for _, o, ins in pairs for n in [o[1], *[i[1] for i in ins]]})
        q_model = with_outputs(self.ctx.export(graph), q_names)
        f_model = with_outputs(self.model, f_names)
        q_sess, f_sess = self._session(q_model, False), self._session(f_model, False)
        noise: dict[str, float] = {}
        power: dict[str, float] = {}
        for feed in list(cut(self.first, 2 if self.split else 0))[:1] if self.first else []:
            q = self._run(q_model, feed, False, q_names, q_sess)
            f = self._run(f_model, feed, False, f_names, f_sess)
            for _, o, ins in pairs:
                for qn, fn in [o, *ins]:
                    a, b = np.asarray(f[fn], np.float64), np.asarray(q[qn], np.float64)
                    noise[qn] = noise.get(qn, 0.0) + float(((a - b) ** 2).sum())
                    power[qn] = power.get(qn, 0.0) + float((a ** 2).sum())
        rel = {n: noise[n] / power[n] if power[n] > 0 else 0.0 for n in noise}
        ranked = []
        for node, o, ins in pairs:
            local = rel[o[0]] - max([rel[i[0]] for i in ins], default=0.0)
            ranked.append((local, plan.position[id(node)], node.name or node.outputs[0].name))
        ranked.sort(key=lambda r: -r[0])
        return [(pos, name, float(-10 * np.log10(max(local, 1e-30)))) for local, pos, name in ranked]


class InputTap:
    """Re-iterable feeds that also hand the graph inputs wanted to ``reduce`` (first run only)."""

    # Every intermediate tensor of a batch is held at once, so calibration runs one sample at a
    # time: on mobilenetv2 (224x224) batch 1 peaked at 285 MiB against 873 MiB at batch 8, and
    # was no slower.
    max_batch = 1

    def __init__(self, data, names: list[str], reduce, max_batch: Optional[int] = None) -> None:
        self.data, self.names, self.reduce, self.runs = data, names, reduce, 0
        if max_batch is not None:
            self.max_batch = max_batch

    @property
    def synthetic(self) -> bool:
        return self.data.synthetic

    def __iter__(self):
        first = self.runs == 0
        self.runs += 1
        for batch in self.data:
            for feed in cut(batch, self.max_batch):
                if first and self.names:
                    self.reduce({n: feed[n] for n in self.names if n in feed})
                yield feed


def _drain(tap: InputTap) -> int:
    n = 0
    for _ in tap:
        n += 1
    if n == 0:
        raise InputError("calibration data gave no batches")
    return n


def _agreeing(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Whether the argmax over the last axis agrees: [N, C] class scores one per sample; a sequence
    ([N, T, C], time-major [T, N, C], CTC or token logits) one per position, so the share is per
    position: every flipped position counts, in any layout."""
    return (ref.argmax(-1) == got.argmax(-1)).ravel()


def _first(feeds: Iterable[dict], samples: int) -> list[dict]:
    """The first ``samples`` samples of the guard's feeds (batches cut where needed)."""
    out: list[dict] = []
    count = 0
    for feed in feeds:
        for part in cut(feed, samples - count):
            out.append(part)
            count += _batch_size(part)
            break
        if count >= samples:
            break
    return out


def _collect(data, samples: int, batches: int, join: int = Guard.JOIN) -> Iterator[dict]:
    """The guard's feeds: up to about ``samples`` samples in batches of ``join`` (a symbolic batch
    axis; the last may be smaller), or the first ``batches`` feeds as given (``samples`` 0: a fixed
    batch axis)."""
    if not samples:
        yield from itertools.islice(data, batches)
        return
    pending: list[dict] = []
    count = 0
    for feed in data:
        pending.append(feed)
        count += _batch_size(feed)
        if sum(_batch_size(f) for f in pending) >= join:
            pieces = list(cut(_join(pending), join))
            pending = [pieces.pop()] if len(pieces) > 1 and _batch_size(pieces[-1]) < join else []
            yield from pieces
        if count >= samples:
            break
    if pending:
        yield _join(pending)


def _batch_size(feed: dict) -> int:
    return leading_axis(feed) or 1


def _join(feeds: list[dict]) -> dict:
    if len(feeds) == 1:
        return feeds[0]
    try:
        return {k: np.concatenate([np.asarray(f[k]) for f in feeds]) for k in feeds[0]}
    except ValueError:  # samples of different shapes (sequence lengths): keep the first
        return feeds[0]


_LAYOUT = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")


def score_outputs(model: onnx.ModelProto) -> set[str]:
    """Names of the graph outputs whose last axis holds class scores: made (through layout ops other
    than Transpose) by a Softmax/LogSoftmax over the last axis. Raw logits are left to the cosine: a
    MatMul/Gemm output may as well be a regression or an embedding, where argmax means nothing."""
    g = model.graph
    made = {o: n for n in g.node for o in n.output}
    found = set()
    for out in g.output:
        name, hops = out.name, 0
        node = made.get(name)
        while node is not None and node.op_type in _LAYOUT and hops < 4 and node.op_type != "Transpose":
            node, hops = made.get(node.input[0]), hops + 1
        if node is None:
            continue
        rank = len(out.type.tensor_type.shape.dim)
        if node.op_type in ("Softmax", "LogSoftmax"):
            opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
            if axis == -1 or (rank and axis == rank - 1):
                found.add(out.name)
    return found
