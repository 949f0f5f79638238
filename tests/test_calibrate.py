"""Calibration plumbing: re-iterable sets, streaming intermediate tensors, Gram statistics, im2col."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import onnxopt
from onnxopt.calibrate import CalibrationSet, GramStats, conv_rows, stream_tensors

ROOT = Path(__file__).resolve().parent.parent


def test_stream_tensors_matches_a_full_run_and_keeps_nothing():
    model = onnxopt.load(ROOT / "models" / "digits_cnn.onnx")
    data = CalibrationSet(ROOT / "models" / "digits_calib.npz", model, samples=100, batch_size=25)
    names = [n.output[0] for n in model.graph.node]
    seen: dict[str, float] = {}
    batches = stream_tensors(model, names, data, lambda v: seen.update(
        {k: max(seen.get(k, -np.inf), float(a.max())) for k, a in v.items()}), chunk=5)
    assert batches == 4  # 100 samples in batches of 25, once per chunk of tensors
    x = np.load(ROOT / "models" / "digits_calib.npz")["input"][:100]
    logits = ort.InferenceSession(str(ROOT / "models" / "digits_cnn.onnx")).run(None, {"input": x})[0]
    assert seen["logits"] == pytest.approx(float(logits.max()), rel=1e-6)
    assert set(seen) == set(names)


def test_one_shot_iterators_are_kept_for_re_reading():
    model = onnxopt.load(ROOT / "models" / "digits_mlp.onnx")
    gen = ({"input": np.full((4, 1, 8, 8), i, np.float32)} for i in range(10))
    data = CalibrationSet(gen, model, samples=12)
    first = [f["input"][0, 0, 0, 0] for f in data]
    assert first == [f["input"][0, 0, 0, 0] for f in data] == [0, 1, 2]


def test_synthetic_set_warns(caplog):
    model = onnxopt.load(ROOT / "models" / "digits_mlp.onnx")
    data = CalibrationSet(None, model, samples=64)
    assert data.synthetic and "no calibration data given" in caplog.text
    assert len(list(data)) == 2


def test_gram_stats_stream_equals_batch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 40, 6))
    stats = GramStats(6)
    for part in np.split(x, 3):
        stats.update(part)
    flat = x.reshape(-1, 6)
    assert np.allclose(stats.gram, flat.T @ flat) and stats.rows == 120
    assert np.allclose(stats.mean, flat.mean(0)) and np.allclose(stats.column_norms, np.linalg.norm(flat, axis=0))


@pytest.mark.parametrize("group", [1, 2])
def test_conv_rows_reproduce_ort_conv(group):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 9, 7)).astype(np.float32)
    w = rng.standard_normal((6, 4 // group, 3, 2)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 0, 2, 1], strides=[2, 1], dilations=[1, 2], group=group)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, None)],
                              [helper.make_tensor_value_info("y", 1, None)], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    per = 6 // group
    for g in range(group):
        rows = conv_rows(x, (3, 2), (1, 0, 2, 1), (2, 1), (1, 2), g, group)
        got = rows @ w[g * per:(g + 1) * per].reshape(per, -1).T
        want = y[:, g * per:(g + 1) * per].transpose(0, 2, 3, 1).reshape(-1, per)
        assert np.allclose(got, want, atol=1e-5)


# ----------------------------------------------------------------- per-layer statistics


def _digits_layers(name):
    from onnxopt import graph as G
    from onnxopt import layers as L

    model = onnxopt.load(ROOT / "models" / name)
    graph = G.import_graph(model)
    return model, graph, L.find_layers(graph).layers


@pytest.mark.parametrize("name", ["digits_mlp.onnx", "digits_cnn.onnx"])
def test_layer_grams_equal_the_grams_of_the_layer_inputs(name):
    from onnxopt.calibrate import gram_request, layer_grams, layer_rows, with_outputs
    from onnxopt.pipeline import PassContext

    model, _, layers = _digits_layers(name)
    x = np.load(ROOT / "models" / "digits_calib.npz")["input"][:64]
    ctx = PassContext(calibration={"input": x})
    requests = [gram_request(l) for l in layers]
    grams = layer_grams(ctx, model, requests, samples=64)
    assert grams.samples == 64
    sess = ort.InferenceSession(with_outputs(model, [r.name for r in requests]).SerializeToString())
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))
    for layer, r in zip(layers, requests):
        for gi in range(r.groups):
            rows = np.concatenate(list(layer_rows(values[r.name], r.layout, gi, r.k))).astype(np.float64)
            assert rows.shape[1] == layer.in_features
            np.testing.assert_allclose(grams.stats[r][gi].gram, rows.T @ rows, rtol=1e-5, atol=1e-6)  # ORT: batch 32 vs 64
        assert grams.shapes[r.name][0] == 32  # the first batch (calibration batches of 32)


def test_layer_grams_are_shared_within_a_run_until_the_model_changes(monkeypatch):
    import onnxopt.calibrate as C
    from onnxopt.pipeline import PassContext

    model, _, layers = _digits_layers("digits_mlp.onnx")
    ctx = PassContext(calibration=ROOT / "models" / "digits_calib.npz")
    runs = []
    real = C.stream_tensors
    monkeypatch.setattr(C, "stream_tensors", lambda *a, **k: runs.append(1) or real(*a, **k))
    requests = [C.gram_request(l) for l in layers]
    first = C.layer_grams(ctx, model, requests[:2], samples=64)
    again = C.layer_grams(ctx, model, requests, samples=64)  # two cached, one new
    assert len(runs) == 2 and again.stats[requests[0]] is first.stats[requests[0]]
    assert again.samples == first.samples == 64
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    changed.graph.initializer[0].raw_data = bytes(len(changed.graph.initializer[0].raw_data))
    C.layer_grams(ctx, changed, requests[:1], samples=64)
    assert len(runs) == 3  # other weights: measured again
    C.layer_grams(PassContext(calibration=ctx.calibration), model, requests[:1], samples=64)
    assert len(runs) == 4  # another run (context): measured again


def test_cross_grams_pair_a_changed_model_with_the_dense_one():
    from onnxopt.calibrate import cross_grams, gram_request, layer_grams
    from onnxopt.pipeline import PassContext

    model, _, layers = _digits_layers("digits_mlp.onnx")
    ctx = PassContext(calibration=ROOT / "models" / "digits_calib.npz")
    r = gram_request(layers[1])
    (same,), samples = cross_grams(ctx, model, model, r, samples=64)
    plain = layer_grams(ctx, model, [r], samples=64).stats[r][0]
    assert samples == 64
    np.testing.assert_allclose(same.gram, plain.gram, rtol=1e-9)
    np.testing.assert_allclose(same.cross, plain.gram, rtol=1e-9)  # identical models: the cross term is XᵀX
    np.testing.assert_allclose(same.mean_dense, same.mean)


def test_synthetic_calibration_binds_open_dims_to_inputs_the_model_runs_on():
    """An audio frontend: a length-16 Conv over [1, 1, samples]. With every open dim bound to 1 its
    synthetic calibration feeds would not run; the set takes the binding the synthetic search finds."""
    from helpers import init, make_model, node, run_model, vi

    rng = np.random.default_rng(0)
    model = make_model(
        [node("Conv", ["x", "k"], ["c"], strides=[8]), node("Transpose", ["c"], ["t"], perm=[0, 2, 1]),
         node("MatMul", ["t", "w"], ["y"])],
        [vi("x", [1, 1, "samples"])], [vi("y", [1, "frames", 128])],
        [init("k", rng.standard_normal((32, 1, 16)) * 0.2), init("w", rng.standard_normal((32, 128)))])
    feeds = list(CalibrationSet(None, model, samples=32))
    assert feeds and all(f["x"].shape[2] >= 16 for f in feeds)
    for feed in feeds:
        assert run_model(model, feed)["y"].shape[2] == 128
    real = [{"x": rng.standard_normal((1, 1, 400)).astype(np.float32)} for _ in range(3)]
    result = onnxopt.optimize(model, "qdq", inputs=real)  # auto mode's guard reads the synthetic set
    assert result.passed and any(r.name == "qdq" and r.modified for r in result.records)


def test_stream_tensors_hands_back_at_most_the_byte_budget_per_run(monkeypatch):
    """The digits CNN's activations on batches of 25 samples: with a budget of 6 KiB per run, each
    run returns tensors adding up to at most that (a larger tensor of one sample alone), and the
    values seen are those of one full run."""
    from onnxopt import calibrate

    budget = 6 * 1024

    model = onnxopt.load(ROOT / "models" / "digits_cnn.onnx")
    data = CalibrationSet(ROOT / "models" / "digits_calib.npz", model, samples=50, batch_size=25)
    names = [n.output[0] for n in model.graph.node]
    sizes = calibrate.tensor_sizes(model, names, next(iter(data)))
    assert sizes["logits"] == 25 * 10 * 4 and set(sizes) == set(names)
    monkeypatch.setattr(calibrate, "STREAM_BYTES", budget)
    monkeypatch.setattr(calibrate, "RUN_BYTES", budget)
    runs: list[int] = []
    seen: dict[str, float] = {}

    def reduce(values):
        runs.append(sum(a.nbytes for a in values.values()))
        assert len(values) == 1 or runs[-1] <= budget
        seen.update({k: max(seen.get(k, -np.inf), float(a.max())) for k, a in values.items()})

    stream_tensors(model, names, data, reduce)
    assert len(runs) > 2 * 2 and max(runs) > budget  # several chunks; the largest tensor alone
    full: dict[str, float] = {}
    stream_tensors(model, names, data, lambda v: full.update(
        {k: max(full.get(k, -np.inf), float(a.max())) for k, a in v.items()}))
    assert seen == full and set(seen) == set(names)


def test_stream_tensors_cuts_feeds_to_the_run_budget_where_the_batch_axis_is_open(monkeypatch):
    """Runs hand back at most RUN_BYTES, whatever the data's batches: a batch of 25 runs as pieces
    (the statistics unchanged); with the batch axis fixed by the model, feeds run as given."""
    from onnxopt import calibrate

    model = onnxopt.load(ROOT / "models" / "digits_cnn.onnx")
    data = CalibrationSet(ROOT / "models" / "digits_calib.npz", model, samples=50, batch_size=25)
    names = [n.output[0] for n in model.graph.node]
    per_sample = sum(calibrate.tensor_sizes(model, names, next(iter(data))).values()) // 25
    monkeypatch.setattr(calibrate, "RUN_BYTES", 4 * per_sample)
    rows: list[int] = []
    seen: dict[str, float] = {}

    def reduce(values):
        rows.append(len(values[names[-1]]))
        seen.update({k: max(seen.get(k, -np.inf), float(a.max())) for k, a in values.items()})

    assert stream_tensors(model, names, data, reduce) == 2  # the feeds the data gave
    assert rows == [4] * 6 + [1] + [4] * 6 + [1]
    from onnxopt.calibrate import with_outputs

    whole = ort.InferenceSession(with_outputs(model, names).SerializeToString()).run(
        names, {"input": np.concatenate([f["input"] for f in data])})
    assert seen == pytest.approx({k: float(v.max()) for k, v in zip(names, whole)}, rel=1e-5)

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 25
    rows.clear()
    stream_tensors(fixed, names, data, reduce)
    assert rows == [25, 25]


def test_grouped_conv_grams_equal_those_of_each_group(monkeypatch):
    """update_grouped (one im2col for a block of groups) gives each group the Gram matrix, mean and
    row count of its own rows: a strided, padded depthwise conv and a 2-group one, all groups in one
    block, and in blocks of two groups of one sample."""
    from onnxopt.calibrate import layer_rows, update_grouped

    import onnxopt.calibrate as C

    x = np.random.default_rng(2).standard_normal((3, 6, 9, 7)).astype(np.float32)
    for groups, cg, budget in ((6, 1, C.GRAM_BYTES), (2, 3, C.GRAM_BYTES), (6, 1, 4 * 2 * 35 * 9 * 8)):
        monkeypatch.setattr(C, "GRAM_BYTES", budget)  # the last: two groups of one sample per block
        layout = ("conv", (3, 3), (1, 0, 1, 2), (2, 1), (1, 1), "NOTSET", groups)
        k = cg * 9
        stats = [GramStats(k) for _ in range(groups)]
        update_grouped(stats, x, layout)
        update_grouped(stats, x[:1], layout)
        for g, stat in enumerate(stats):
            rows = np.concatenate(list(layer_rows(x, layout, g, k)) + list(layer_rows(x[:1], layout, g, k)))
            rows = rows.astype(np.float64)
            np.testing.assert_allclose(stat.gram, rows.T @ rows, rtol=1e-10)
            np.testing.assert_allclose(stat.mean, rows.mean(0), rtol=1e-8, atol=1e-12)
            assert stat.rows == len(rows)


def test_conv_rows_and_grams_are_cut_to_the_byte_budget(monkeypatch):
    """im2col of a Conv input comes in chunks of at most GRAM_BYTES (one sample at least) and
    GramStats converts at most that many bytes to float64 at once; the statistics are unchanged."""
    import onnxopt.calibrate as C
    from onnxopt.calibrate import gram_request, layer_rows

    model, _, layers = _digits_layers("digits_cnn.onnx")
    conv = next(l for l in layers if l.kind == "conv" and l.in_features > 1)
    r = gram_request(conv)
    x = np.random.default_rng(1).standard_normal((16, *[d for d in _conv_input_shape(model, r.name)])).astype(np.float32)
    full = np.concatenate(list(layer_rows(x, r.layout, 0, r.k))).astype(np.float64)
    monkeypatch.setattr(C, "GRAM_BYTES", 2 * full.shape[0] // 16 * r.k * 4)  # two samples' rows
    chunks = list(layer_rows(x, r.layout, 0, r.k))
    assert len(chunks) == 8 and all(c.nbytes <= C.GRAM_BYTES for c in chunks)
    stats = GramStats(r.k)
    for c in chunks:
        stats.update(c)  # each chunk in float64 slices of half its rows
    np.testing.assert_allclose(stats.gram, full.T @ full, rtol=1e-10)
    np.testing.assert_allclose(stats.mean, full.mean(0), rtol=1e-8, atol=1e-12)
    assert stats.rows == full.shape[0]


def _conv_input_shape(model, name):
    """The [C, H, W] of an intermediate tensor, from ONNX shape inference with batch 1."""
    from onnxopt.calibrate import tensor_sizes  # noqa: F401 - same inference the chunks use

    inferred = onnx.shape_inference.infer_shapes(model)
    for v in list(inferred.graph.value_info) + list(inferred.graph.input):
        if v.name == name:
            return [d.dim_value for d in v.type.tensor_type.shape.dim][1:]
    raise KeyError(name)
