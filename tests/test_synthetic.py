"""Synthetic inputs the original runs on: graphs that fail with every dim at 1 and random integers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import FLOAT, INT64, init, make_model, node, session, vi
from onnxopt.data import input_specs, synthetic_dataset
from onnxopt.synthetic import find_inputs, ort_message
from onnxopt.synthetic.graph import read_graph


def _conv(x: str, out: str, cin: int, cout: int, k: int, s: int, p: int, seed: int) -> tuple[list, list]:
    w = np.random.default_rng(seed).standard_normal((cout, cin, k, k)).astype(np.float32) * 0.1
    return ([node("Conv", [x, f"{out}_w"], [out], kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)],
            [init(f"{out}_w", w)])


def detector() -> onnx.ModelProto:
    """Stride-2 and stride-8 branches joined by a Concat after a 4x Resize: needs H, W multiples of 8."""
    nodes, inits = [], []
    for x, out, cin, seed in (("image", "a", 3, 1), ("a", "b", 4, 2), ("b", "c", 4, 3)):
        n, i = _conv(x, out, cin, 4, 3, 2, 1, seed)
        nodes += n
        inits += i
    nodes += [node("Resize", ["c", "", "scales"], ["up"], mode="nearest"),
              node("Conv", ["a", "a_w2"], ["a2"], kernel_shape=[1, 1]),
              node("Concat", ["a2", "up"], ["y"], axis=1)]
    inits += [init("scales", [1, 1, 4, 4]), init("a_w2", np.ones((4, 4, 1, 1)) * 0.1)]
    return make_model(nodes, [vi("image", ["batch", 3, "height", "width"])], [vi("y", ["b", 8, "h", "w"])], inits)


def conv_stack() -> onnx.ModelProto:
    """Four unpadded 7x7 stride-2 convolutions on an input whose every dim is symbolic."""
    nodes, inits, x = [], [], "x"
    for i in range(4):
        n, w = _conv(x, f"c{i}", 3 if i == 0 else 4, 4, 7, 2, 0, i)
        nodes, inits, x = nodes + n + [node("Relu", [f"c{i}"], [f"r{i}"])], inits + w, f"r{i}"
    return make_model(nodes, [vi("x", ["p2o.DynamicDimension.0", "unk__12", "?", "-1"])], [vi(x, ["b", 4, "h", "w"])], inits)


def audio() -> onnx.ModelProto:
    """A 400-sample, hop-160 front end; the sample rate must be 16000 or the else-branch fails."""
    fail = helper.make_graph([node("Reshape", ["feat", "bad_shape"], ["bad"])], "else", [], [vi("bad", [7, 11, 13, 17])],
                             [init("bad_shape", [7, 11, 13, 17], np.int64)])
    good = helper.make_graph([node("Identity", ["feat"], ["ok"])], "then", [], [vi("ok", ["b", 4, "t"])])
    nodes = [node("Unsqueeze", ["audio", "one"], ["wave"]),
             node("Conv", ["wave", "filters"], ["feat"], kernel_shape=[400], strides=[160]),
             node("Equal", ["sr", "rate"], ["is_16k"]),
             node("If", ["is_16k"], ["y"], then_branch=good, else_branch=fail)]
    inits = [init("one", [1], np.int64), init("rate", 16000, np.int64),
             init("filters", np.random.default_rng(0).standard_normal((4, 1, 400)) * 0.05)]
    return make_model(nodes, [vi("audio", ["batch", "samples"]), vi("sr", [], INT64)], [vi("y", None)], inits,
                      check=False)


def embedding() -> onnx.ModelProto:
    """BERT-like embeddings: word (30522 rows), position (512) and segment (2) tables, and a mask."""
    rng = np.random.default_rng(0)
    nodes = [node("Gather", ["words", "input_ids"], ["w"]),
             node("Gather", ["positions", "position_ids"], ["p"]),
             node("Gather", ["types", "token_type_ids"], ["t"]),
             node("Add", ["w", "p"], ["wp"]), node("Add", ["wp", "t"], ["e"]),
             node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             node("Unsqueeze", ["m", "last"], ["m3"]), node("Mul", ["e", "m3"], ["y"])]
    inits = [init("words", rng.standard_normal((30522, 4))), init("positions", rng.standard_normal((512, 4))),
             init("types", rng.standard_normal((2, 4))), init("last", [-1], np.int64)]
    inputs = [vi(n, ["batch", "sequence"], INT64) for n in ("input_ids", "position_ids", "token_type_ids",
                                                             "attention_mask")]
    return make_model(nodes, inputs, [vi("y", ["batch", "sequence", 4])], inits)


def rnn() -> onnx.ModelProto:
    """An LSTM with initial hidden and cell state inputs; its dims are unnamed."""
    rng = np.random.default_rng(0)
    inits = [init("W", rng.standard_normal((1, 32, 5)) * 0.1), init("R", rng.standard_normal((1, 32, 8)) * 0.1)]
    nodes = [node("LSTM", ["X", "W", "R", "", "", "h0", "c0"], ["Y", "Y_h"], hidden_size=8)]
    inputs = [vi("X", ["unk__1", "unk__2", "unk__3"]), vi("h0", [1, "unk__4", 8]), vi("c0", [1, "unk__5", 8])]
    return make_model(nodes, inputs, [vi("Y", ["s", 1, "b", 8]), vi("Y_h", [1, "b", 8])], inits)


def never_runs() -> onnx.ModelProto:
    """A Reshape to 1001 values of an input with 5 values per row: no binding fits."""
    return make_model([node("Reshape", ["x", "shape"], ["y"])], [vi("x", ["batch", 5])], [vi("y", [7, 11, 13])],
                      [init("shape", [7, 11, 13], np.int64)])


def _runs(model: onnx.ModelProto, feed: dict) -> bool:
    try:
        session(model, "all").run(None, feed)
        return True
    except Exception:
        return False


@pytest.mark.parametrize("build", [detector, conv_stack, audio, embedding, rnn])
def test_found_inputs_run_where_ones_do_not(build):
    model = build()
    probe = find_inputs(model)
    assert probe.found, probe.error
    assert _runs(model, probe.feed)
    again = find_inputs(model)
    assert all(np.array_equal(probe.feed[k], again.feed[k]) for k in probe.feed)  # seeded


@pytest.mark.parametrize("build", [detector, conv_stack, audio, embedding])
def test_every_dim_at_one_fails_on_these_graphs(build):
    model = build()
    assert not _runs(model, synthetic_dataset(model, seed=0).feeds[0] if build is not embedding
                     else {k: np.full((1, 16), 7, np.int64) for k in ("input_ids", "position_ids", "token_type_ids",
                                                                       "attention_mask")})


def test_detector_gets_a_multiple_of_its_stride():
    probe = find_inputs(detector())
    h, w = probe.feed["image"].shape[2:]
    assert h == w and h % 8 == 0 and probe.dims == {"batch": 1, "height": h, "width": w}
    assert f"dims batch=1, height={h}, width={w}" in probe.description


def test_conv_stack_gets_its_channels_and_minimum_size():
    facts = read_graph(conv_stack(), input_specs(conv_stack()))
    assert facts.spatial["x[2]"] == facts.spatial["x[3]"] == (91, 16)  # 91 -> 43 -> 19 -> 7 -> 1
    feed = find_inputs(conv_stack()).feed
    assert feed["x"].shape[:2] == (1, 3) and feed["x"].shape[2] == feed["x"].shape[3] >= 91


def test_audio_gets_enough_samples_and_the_rate_it_checks():
    probe = find_inputs(audio())
    assert probe.feed["sr"].shape == () and int(probe.feed["sr"]) == 16000
    assert probe.feed["audio"].shape[1] >= 400 and "values sr=16000" in probe.description


def test_embedding_ids_stay_inside_their_tables():
    feed = find_inputs(embedding()).feed
    assert feed["token_type_ids"].max() < 2 and feed["position_ids"].max() < 512
    assert feed["input_ids"].max() < 30522 and (feed["attention_mask"] == 1).all()
    assert np.array_equal(feed["position_ids"][0], np.arange(feed["position_ids"].shape[1]))
    assert feed["input_ids"].shape[1] == 16


def test_rnn_states_are_zeros_and_batches_agree():
    feed = find_inputs(rnn()).feed
    seq, batch, features = feed["X"].shape
    assert features == 5 and seq > 1 and feed["h0"].shape == (1, batch, 8) == feed["c0"].shape
    assert not feed["h0"].any() and not feed["c0"].any()


def test_gather_offsets_and_comparisons_are_read():
    model = make_model([node("Add", ["pos", "two"], ["p2"]), node("Gather", ["table", "p2"], ["y"]),
                        node("Less", ["k", "limit"], ["z"])],
                       [vi("pos", ["n"], INT64), vi("k", [1], INT64)], [vi("y", ["n", 3]), vi("z", [1], TensorProto.BOOL)],
                       [init("two", 2, np.int64), init("table", np.zeros((10, 3))), init("limit", [3], np.int64)])
    facts = read_graph(model, input_specs(model))
    assert (facts.inputs["pos"].low, facts.inputs["pos"].high) == (0, 8)
    assert facts.choices == {"k": [3]}


def test_no_binding_runs_and_the_reason_is_one_line():
    probe = find_inputs(never_runs())
    assert not probe.found and probe.feed is None
    assert "cannot run the original model on synthetic inputs" in probe.error
    assert "node 'n_y' (Reshape)" in probe.error and "\n" not in probe.error and ".cc:" not in probe.error


def test_user_dims_are_kept():
    probe = find_inputs(detector(), dims={"height": 96, "width": 96})
    assert probe.feed["image"].shape == (1, 3, 96, 96)


def test_ort_message_keeps_the_words():
    exc = RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Concat node. "
                       "Name:'cat' Status Message: /src/onnxruntime/core/providers/cpu/tensor/concat.cc:139 "
                       "onnxruntime::common::Status onnxruntime::ConcatBase::PrepareForCompute(onnxruntime::"
                       "OpKernelContext*, const InlinedTensorsVector&, onnxruntime::Prepare&) const Non concat axis "
                       "dimensions must match: Axis 2 has mismatched dimensions of 3 and 2\nmore")
    assert ort_message(exc) == ("node 'cat' (Concat): Non concat axis dimensions must match: "
                                "Axis 2 has mismatched dimensions of 3 and 2")


def test_state_dims_follow_the_batch_and_a_sample_rate_marks_waveforms():
    model = make_model([node("Equal", ["sr", "rate"], ["ok"]), node("ReduceSum", ["input"], ["s"]),
                        node("ReduceSum", ["state"], ["t"])],
                       [vi("input", [None, None]), vi("state", [2, None, 4]), vi("sr", [], INT64)],
                       [vi("ok", [], TensorProto.BOOL), vi("s", [1, 1]), vi("t", [1, 1, 1])],
                       [init("rate", 8000, np.int64)])
    specs = {s.name: s for s in input_specs(model)}
    facts = read_graph(model, list(specs.values()))
    assert facts.role_of(specs["state"], 1, None) == "batch" and facts.role_of(specs["input"], 1, None) == "audio"
    feed = find_inputs(model).feed
    assert feed["input"].shape == (1, 512) and feed["state"].shape == (2, 1, 4) and int(feed["sr"]) == 8000


def decoder(total: str) -> onnx.ModelProto:
    """A decoder step: new keys appended to cached ones, masked by a mask over past + new steps."""
    rng = np.random.default_rng(0)
    nodes = [node("Gather", ["table", "input_ids"], ["e"]), node("Reshape", ["e", "split"], ["e4"]),
             node("Transpose", ["e4"], ["k"], perm=[0, 2, 1, 3]), node("Concat", ["past", "k"], ["present"], axis=2),
             node("ReduceSum", ["present", "axes"], ["s"], keepdims=0), node("Cast", ["mask"], ["m"], to=FLOAT),
             node("Mul", ["s", "m"], ["y"])]
    inits = [init("table", rng.standard_normal((50, 8))), init("split", [0, 0, 2, 4], np.int64),
             init("axes", [1, 3], np.int64)]
    inputs = [vi("input_ids", ["batch", "sequence_length"], INT64),
              vi("past", ["batch", 2, "past_sequence_length", 4]), vi("mask", ["batch", total], INT64)]
    return make_model(nodes, inputs, [vi("y", ["batch", total]), vi("present", ["batch", 2, total, 4])], inits)


@pytest.mark.parametrize("total", ["past_sequence_length + sequence_length", "total_sequence_length"])
def test_decoder_masks_cover_past_and_new_steps(total):
    model = decoder(total)
    probe = find_inputs(model)
    assert probe.found, probe.error
    past, steps = probe.feed["past"].shape[2], probe.feed["input_ids"].shape[1]
    assert probe.feed["mask"].shape[1] == past + steps and probe.feed["input_ids"].max() < 50


def test_uint8_pictures_get_image_sizes_and_full_range_pixels():
    n, w = _conv("f", "y", 3, 4, 7, 2, 0, 0)
    model = make_model([node("Cast", ["image"], ["f"], to=FLOAT)] + n,
                       [vi("image", ["?", 3, "?", "?"], TensorProto.UINT8)], [vi("y", ["b", 4, "h", "w"])], w)
    feed = find_inputs(model).feed
    assert feed["image"].shape == (1, 3, 64, 64) and feed["image"].max() > 200


def test_calibration_without_data_reads_the_found_binding():
    import onnxopt
    result = onnxopt.optimize(conv_stack(), "qdq")  # calibrates and validates on synthetic inputs
    assert result.passed and result.inputs["kind"] == "synthetic"
    assert result.inputs["shapes"]["x"] == ["float32", [1, 3, 96, 96]]
    assert result.records[0].stats["calibration_synthetic"] == 1


def test_reshape_targets_and_slice_bounds_are_read():
    model = make_model([node("Reshape", ["x", "target"], ["a"]),
                        node("Slice", ["t", "starts", "ends", "axes"], ["s"]), node("Reshape", ["s", "rows"], ["b"])],
                       [vi("x", ["n", "k"]), vi("t", ["m", "unk__7"])], [vi("a", [2, 12]), vi("b", [None, 300])],
                       [init("target", [2, 12], np.int64), init("starts", [0], np.int64),
                        init("ends", [300], np.int64), init("axes", [1], np.int64), init("rows", [-1, 300], np.int64)])
    facts = read_graph(model, input_specs(model))
    assert facts.hints == {"n": [2], "k": [12]} and facts.floors == {"unk__7": 300}
    probe = find_inputs(model)
    assert probe.feed["x"].shape == (2, 12) and probe.feed["t"].shape[1] >= 300


def test_huge_candidates_are_not_tried():
    from onnxopt.synthetic import MAX_VALUES, candidates, symbols
    model = make_model([node("Relu", ["v"], ["y"])], [vi("v", ["n", 2, "d", "h", "w"])], [vi("y", ["n", 2, "d", "h", "w"])])
    specs = input_specs(model)
    facts = read_graph(model, specs)
    sizes = [2 * c.dims["d"] * c.dims["h"] * c.dims["w"] for c in candidates(symbols(specs, facts, {}), facts,
                                                                             {s.name: s for s in specs})]
    assert sizes and max(sizes) <= MAX_VALUES
