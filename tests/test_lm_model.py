"""The shipped tiny decoder LM (models/lm_tiny.onnx, made by tools/train_lm.py) in ONNX Runtime.

It has the KV-cache interface exporters give decoder LMs; these tests check that it runs, that
decoding through the cache gives the full sequence's logits, that padding is masked, and that its
held-out perplexity is the one models/README.md records.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

MODELS = Path(__file__).resolve().parent.parent / "models"
MODEL = MODELS / "lm_tiny.onnx"
SAMPLE = MODELS / "lm_tiny.heldout_sample.bin"


@pytest.fixture(scope="module")
def lm():
    model = onnx.load(str(MODEL))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(MODEL), opts, providers=["CPUExecutionProvider"])
    past = [vi for vi in model.graph.input if vi.name.startswith("past_key_values.")]
    dims = past[0].type.tensor_type.shape.dim
    return sess, [vi.name for vi in past], dims[1].dim_value, dims[3].dim_value


def feed(lm, ids, past=None, mask=None, positions=None):
    _, names, heads, hd = lm
    b, s = ids.shape
    plen = 0 if past is None else past[0].shape[2]
    out = {"input_ids": ids.astype(np.int64),
           "attention_mask": np.ones((b, plen + s), np.int64) if mask is None else mask,
           "position_ids": np.broadcast_to(np.arange(plen, plen + s), (b, s)).astype(np.int64)
           if positions is None else positions}
    for i, name in enumerate(names):
        out[name] = np.zeros((b, heads, 0, hd), np.float32) if past is None else past[i]
    return out


def sample_ids() -> np.ndarray:
    return np.frombuffer(SAMPLE.read_bytes(), np.uint8).astype(np.int64)


def test_interface_is_the_exporters_kv_cache_layout(lm):
    model = onnx.load(str(MODEL))
    inputs = [vi.name for vi in model.graph.input]
    outputs = [vi.name for vi in model.graph.output]
    layers = len(lm[1]) // 2
    assert layers == 2
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs[3:] == [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert outputs == ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    past_shape = [d.dim_param or d.dim_value for d in model.graph.input[3].type.tensor_type.shape.dim]
    assert past_shape == ["batch", lm[2], "past_sequence_length", lm[3]]


def test_runs_with_empty_past_and_returns_the_cache(lm):
    sess, _, heads, hd = lm
    ids = sample_ids()[:16].reshape(2, 8)
    out = sess.run(None, feed(lm, ids))
    assert out[0].shape == (2, 8, 256)
    assert np.isfinite(out[0]).all()
    assert all(p.shape == (2, heads, 8, hd) for p in out[1:])


def test_kv_cache_decode_gives_the_full_sequence_logits(lm):
    sess = lm[0]
    ids = sample_ids()[100:124].reshape(1, 24)
    full = sess.run(None, feed(lm, ids))[0]
    out = sess.run(None, feed(lm, ids[:, :16]))
    steps = [out[0]]
    for t in range(16, 24):
        out = sess.run(None, feed(lm, ids[:, t:t + 1], out[1:]))
        steps.append(out[0])
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4, rtol=1e-4)
    # and the cache changes the result: the last step without its past predicts differently
    alone = sess.run(None, feed(lm, ids[:, 23:24], positions=np.array([[23]])))[0]
    assert np.abs(alone[0, 0] - full[0, 23]).max() > 1e-2


def test_left_padding_is_masked(lm):
    sess = lm[0]
    ids = sample_ids()[200:210]
    plain = sess.run(None, feed(lm, ids[None, :]))[0][0]
    padded = np.concatenate([np.full(3, 32), ids])[None, :]  # three junk tokens the mask hides
    mask = np.array([[0, 0, 0] + [1] * 10], np.int64)
    positions = np.array([[0, 0, 0] + list(range(10))], np.int64)
    got = sess.run(None, feed(lm, padded, mask=mask, positions=positions))[0][0, 3:]
    np.testing.assert_allclose(got, plain, atol=1e-4, rtol=1e-4)


def recorded_perplexity() -> float:
    text = (MODELS / "README.md").read_text()
    found = re.search(r"lm_tiny\.heldout_sample\.bin`?: \*\*([0-9.]+)\*\*", text)
    assert found, "models/README.md does not record lm_tiny's held-out perplexity"
    return float(found.group(1))


def test_heldout_perplexity_is_the_recorded_one(lm):
    sess = lm[0]
    ids = sample_ids()
    length = 257  # context 256 + the byte each window predicts last
    win = ids[: ids.size // length * length].reshape(-1, length)
    logits = sess.run(["logits"], feed(lm, win[:, :-1]))[0].astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    loss = -np.take_along_axis(logp, win[:, 1:, None], -1).mean()
    perplexity = math.exp(loss)
    assert perplexity == pytest.approx(recorded_perplexity(), rel=1e-3)
    assert perplexity < 32  # trained: far below the 256 of a uniform guess over bytes
