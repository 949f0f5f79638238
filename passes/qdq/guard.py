"""The accuracy guard: output cosine of a quantized model against the float one, and per-layer error contributions."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.errors import InputError
from onnxopt.pipeline import PassContext

from .plan import Plan, _dq_source
from .writer import Writer


class Guard:
    """Output cosine of a quantized model against the float one on a few calibration batches
    (ORT, optimizations on), and per-layer error contributions (optimizations off, names kept)."""

    BATCHES = 4
    split = True  # the batch axis is symbolic: sensitivities may run on a slice of a batch

    def __init__(self, model: onnx.ModelProto, data, ctx: PassContext, target: float) -> None:
        self.model, self.ctx, self.target = model, ctx, target
        self.feeds = []
        for feed in data:
            self.feeds.append(feed)
            if len(self.feeds) >= self.BATCHES:
                break
        self.reference = [self._run(model, f, optimize=True) for f in self.feeds]

    def _session(self, model: onnx.ModelProto, optimize: bool):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        so.log_severity_level = 4  # errors come back as exceptions; no raw ORT lines
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def _run(self, model, feed, optimize, names=None, session=None):
        sess = session or self._session(model, optimize)
        names = names or [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feed)))

    def cosine(self, candidate: onnx.ModelProto) -> float:
        sess = self._session(candidate, True)
        dots: dict[str, list[float]] = {}
        for feed, ref in zip(self.feeds, self.reference):
            got = self._run(candidate, feed, True, list(ref), sess)
            for name, r in ref.items():
                if not np.issubdtype(np.asarray(r).dtype, np.floating):
                    continue
                a, b = np.asarray(r, np.float64).ravel(), np.asarray(got[name], np.float64).ravel()
                acc = dots.setdefault(name, [0.0, 0.0, 0.0])
                acc[0] += float(a @ b)
                acc[1] += float(a @ a)
                acc[2] += float(b @ b)
        values = [d[0] / np.sqrt(d[1] * d[2]) if d[1] > 0 and d[2] > 0 else (1.0 if d[1] == d[2] else 0.0)
                  for d in dots.values()]
        return float(min(values)) if values else 1.0

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
        for feed in list(_split(self.feeds[0], 2 if self.split else 0))[:1] if self.feeds else []:
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

    def __init__(self, data, names: list[str], reduce) -> None:
        self.data, self.names, self.reduce, self.runs = data, names, reduce, 0

    @property
    def synthetic(self) -> bool:
        return self.data.synthetic

    def __iter__(self):
        first = self.runs == 0
        self.runs += 1
        for batch in self.data:
            for feed in _split(batch, self.max_batch):
                if first and self.names:
                    self.reduce({n: feed[n] for n in self.names if n in feed})
                yield feed


def _split(feed: dict, size: int):
    """A feed cut into feeds of at most ``size`` samples when every input has the same leading axis."""
    leading = {np.asarray(v).shape[0] if np.ndim(v) else None for v in feed.values()}
    n = leading.pop() if len(leading) == 1 else None
    if not size or not n or n <= size:
        yield feed
        return
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in feed.items()}


def _drain(tap: InputTap) -> int:
    n = 0
    for _ in tap:
        n += 1
    if n == 0:
        raise InputError("calibration data gave no batches")
    return n
