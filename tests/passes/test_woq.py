"""The ``woq`` pass: weight-only int4/int8 into com.microsoft.MatMulNBits and GatherBlockQuantized.

woq is lossy. Rewrites run through ``onnxopt.optimize`` (pass manager, contracts,
checker, validation in ORT) and are then compared with the float model in ORT with
real cosine thresholds; the packed blocks are dequantized in numpy and must give what
ORT computes from them, so the packing is checked against ONNX Runtime itself.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import onnxopt
from helpers import INT64, init, make_model, node, run_model, run_pass_direct, vi
from onnxopt.errors import InputError
from onnxopt.serialize import serialized_size
from onnxopt.passes.woq.pack import dequantize_matmulnbits, pack, unpack
from onnxopt.passes.woq.quantize import gptq, hqq, rtn

SKIPS = ("excluded", "dynamic_weight", "overridable_weight", "weight_not_folded", "constant_input", "weight_dtype",
         "weight_rank", "in_function", "gemm_trans_a", "gemm_bias", "input_1d", "embeddings_off", "gather_axis",
         "gather_odd_width")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def matmul_model(w: np.ndarray, rows: int = 4, name: str = "fc") -> onnx.ModelProto:
    k, n = w.shape
    return make_model([node("MatMul", ["x", "w"], ["y"], name=name)], [vi("x", ["batch", rows, k])],
                      [vi("y", ["batch", rows, n])], [init("w", w)])


def two_layer_model(w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    k, h = w1.shape
    n = w2.shape[1]
    return make_model([node("MatMul", ["x", "w1"], ["h"], name="fc1"), node("Relu", ["h"], ["r"]),
                       node("MatMul", ["r", "w2"], ["y"], name="fc2")],
                      [vi("x", ["batch", k])], [vi("y", ["batch", n])], [init("w1", w1), init("w2", w2)])


def woq(model: onnx.ModelProto, spec: str = "woq", calibration=None, inputs=None):
    """Run the pass through optimize(); the result must pass the pass's own tolerance. Returns (model, stats, notes)."""
    inputs = inputs if inputs is not None else [feed(model, s) for s in range(2)]
    result = onnxopt.optimize(model, spec, inputs=inputs, calibration=calibration)
    assert result.validation is not None and result.passed, result.validation.headline()
    record = next(r for r in result.records if r.name == "woq")
    json.dumps(result.to_dict())
    onnx.checker.check_model(result.model)
    return result.model, dict(record.stats), list(record.notes), result


def feed(model: onnx.ModelProto, seed: int = 0, batch: int = 8) -> dict:
    rng = np.random.default_rng(100 + seed)
    out = {}
    for v in model.graph.input:
        t = v.type.tensor_type
        shape = [d.dim_value or batch for d in t.shape.dim]
        if t.elem_type == TensorProto.INT64:
            out[v.name] = rng.integers(0, 16, shape).astype(np.int64)
        else:
            out[v.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def ops_of(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def weights(seed: int, k: int, n: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)


# ----------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("length", [1, 7, 32, 33])
def test_pack_round_trips(bits, length):
    codes = np.random.default_rng(length).integers(0, 2 ** bits, (3, 5, length)).astype(np.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (3, 5, -(-length * bits // 8))
    np.testing.assert_array_equal(unpack(packed, bits, length), codes)


def test_pack_puts_the_first_value_in_the_low_nibble():
    assert pack(np.array([[1, 2]], np.uint8), 4).tolist() == [[0x21]]


@pytest.mark.parametrize("k", [64, 70])
@pytest.mark.parametrize("spec", ["woq", "woq(bits=8)", "woq(algo=hqq)", "woq(symmetric=true)",
                                  "woq(block_size=16,accuracy_level=1)"])
def test_packed_blocks_dequantize_to_what_ort_computes(k, spec):
    """The numpy reading of B, scales and zero points times x equals ORT's MatMulNBits output."""
    model = matmul_model(weights(1, k, 24))
    out, stats, _, _ = woq(model, spec)
    assert ops_of(out) == ["MatMulNBits"] and stats["quantized_matmul"] == 1
    q = out.graph.node[0]
    attrs = {a.name: a.i for a in q.attribute}
    assert (attrs["K"], attrs["N"]) == (k, 24)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    b, scales = inits[q.input[1]], inits[q.input[2]]
    zeros = inits[q.input[3]] if len(q.input) > 3 and q.input[3] else None
    assert b.dtype == np.uint8 and b.shape == (24, -(-k // attrs["block_size"]), attrs["block_size"] * attrs["bits"] // 8)
    assert (zeros is None) == ("symmetric" in spec)
    if "hqq" in spec:
        assert zeros.dtype == np.float32 and zeros.shape == scales.shape
    w = dequantize_matmulnbits(b, scales, zeros, k, attrs["bits"], attrs["block_size"])
    x = feed(model, 5)
    np.testing.assert_allclose(run_model(out, x)["y"], x["x"] @ w, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------- accuracy

@pytest.mark.parametrize("spec, floor", [("woq", 0.99), ("woq(block_size=128)", 0.99), ("woq(algo=hqq)", 0.99),
                                         ("woq(symmetric=true)", 0.99), ("woq(bits=8)", 0.9999),
                                         ("woq(accuracy_level=4)", 0.99)])
def test_quantized_layers_stay_close_to_float(spec, floor):
    model = two_layer_model(weights(2, 128, 256), weights(3, 256, 64))
    out, stats, _, _ = woq(model, spec)
    assert ops_of(out) == ["MatMulNBits", "Relu", "MatMulNBits"]
    assert stats["quantized_matmul"] == 2 and 0 < stats["bytes_after"] < stats["bytes_before"] / 3
    x = feed(model, 7, batch=64)
    assert cosine(run_model(model, x)["y"], run_model(out, x)["y"]) > floor
    assert stats["max_weight_error"] < (0.01 if "bits=8" in spec else 0.15)


def test_hqq_and_the_range_search_lower_the_weight_error():
    w = weights(4, 256, 64)
    plain = rtn(w, 4, 64, search=False)
    searched = rtn(w, 4, 64)
    fitted = hqq(w, 4, 64)

    def err(blocks):
        return float(np.linalg.norm(w - blocks.dequantize()))

    assert err(searched) < 0.97 * err(plain)
    assert err(fitted) < 0.97 * err(plain)


def correlated(n: int, k: int, seed: int) -> np.ndarray:
    """Inputs with strongly correlated channels (a low-dimensional signal plus a little noise), the
    same distribution for every seed."""
    mix = np.random.default_rng(1234).standard_normal((8, k))
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 8)) @ mix + 0.05 * rng.standard_normal((n, k))).astype(np.float32)


def test_gptq_beats_rtn_on_correlated_inputs():
    """GPTQ uses the calibration Hessian: on held-out inputs from the same distribution its
    output error is well below round-to-nearest's."""
    w = weights(5, 64, 32)
    model = matmul_model(w, rows=16)
    calib = {"x": correlated(64 * 16, 64, 0).reshape(64, 16, 64)}
    held = {"x": correlated(16 * 16, 64, 1).reshape(16, 16, 64)}
    ref = run_model(model, held)["y"]
    errors = {}
    for algo in ("rtn", "gptq"):
        out, stats, notes, _ = woq(model, f"woq(algo={algo},block_size=32)", calibration=calib, inputs=[held])
        errors[algo] = float(np.sum((run_model(out, held)["y"] - ref) ** 2))
    assert errors["gptq"] < 0.5 * errors["rtn"], errors
    assert any("gptq: input statistics of 1 distinct" in n for n in notes)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reduces_the_output_error_it_minimises(act_order):
    x = correlated(512, 96, 2)
    w = weights(6, 96, 40)
    gram = x.T.astype(np.float64) @ x
    base = rtn(w, 4, 32, search=False).dequantize()
    got = gptq(w, gram, 4, 32, act_order=act_order).dequantize()
    assert np.sum((x @ (got - w)) ** 2) < 0.5 * np.sum((x @ (base - w)) ** 2)


def test_gptq_without_calibration_runs_rtn_and_says_so():
    model = matmul_model(weights(7, 64, 16))
    result = onnxopt.optimize(model, "woq(algo=gptq)", inputs=[feed(model)])
    assert result.passed
    record = result.records[0]
    assert "algo=rtn" in result.pipeline
    assert any("algo=gptq needs calibration data" in n for n in record.notes)


def test_gptq_in_an_if_branch_falls_back_to_rtn():
    """Calibration reaches the main graph only: a MatMul in an If branch gets rtn, counted."""
    w = weights(8, 16, 8)
    branch = onnx.helper.make_graph([node("MatMul", ["h", "wb"], ["yb"], name="inner")], "then", [],
                                    [vi("yb", [4, 8])], [init("wb", w)])
    other = onnx.helper.make_graph([node("MatMul", ["h", "wb2"], ["yc"], name="inner2")], "else", [],
                                   [vi("yc", [4, 8])], [init("wb2", w)])
    model = make_model([node("MatMul", ["x", "w"], ["h"], name="outer"), node("ReduceSum", ["h"], ["s"], keepdims=0),
                        node("Greater", ["s", "zero"], ["c"]),
                        node("If", ["c"], ["y"], then_branch=branch, else_branch=other)],
                       [vi("x", [4, 32])], [vi("y", [4, 8])], [init("w", weights(9, 32, 16)), init("zero", 0.0)])
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((4, 32)).astype(np.float32)} for _ in range(8)]
    out, stats, _, _ = woq(model, "woq(algo=gptq)", calibration=calib, inputs=calib[:1])
    assert stats["quantized_matmul"] == 3 and stats["gptq_as_rtn"] == 2


# ----------------------------------------------------------------- Gemm

def gemm_model(w: np.ndarray, trans_b: int, c=None, trans_a: int = 0, alpha=1.0, beta=1.0) -> onnx.ModelProto:
    k, n = (w.shape[1], w.shape[0]) if trans_b else w.shape
    inputs = ["x", "w"] + (["c"] if c is not None else [])
    inits = [init("w", w)] + ([init("c", c)] if c is not None else [])
    x_shape = [k, 8] if trans_a else [8, k]
    return make_model([node("Gemm", inputs, ["y"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)],
                      [vi("x", x_shape)], [vi("y", [8, n])], inits)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", ["none", "vector", "scalar"])
def test_gemm_maps_exactly_onto_matmulnbits(trans_b, bias):
    """transB, alpha and beta*C become the weight's transpose, the scales and the bias input."""
    w = weights(10, 64, 48)
    w = w.T.copy() if trans_b else w
    c = {"none": None, "vector": np.linspace(-1, 1, 48).astype(np.float32), "scalar": np.array([0.5], np.float32)}[bias]
    model = gemm_model(w, trans_b, c, alpha=0.5, beta=2.0)
    out, stats, _, _ = woq(model, "woq(bits=8)")
    assert ops_of(out) == ["MatMulNBits"] and stats["quantized_gemm"] == 1
    assert (len(out.graph.node[0].input) == 6) == (c is not None)
    x = feed(model, 3)
    assert cosine(run_model(model, x)["y"], run_model(out, x)["y"]) > 0.9999


def test_gemm_it_cannot_map_is_left_and_counted():
    w = weights(11, 32, 16)
    out, stats, _, _ = woq(gemm_model(w, 0, trans_a=1), "woq")
    assert ops_of(out) == ["Gemm"] and stats["skipped_gemm_trans_a"] == 1
    model = gemm_model(w, 0, c=np.ones((8, 16), np.float32))
    result = onnxopt.optimize(model, "woq", inputs=[feed(model)])
    assert ops_of(result.model) == ["Gemm"] and result.records[0].stats["skipped_gemm_bias"] == 1


# ----------------------------------------------------------------- what is skipped

def test_attention_matmuls_and_odd_weights_are_counted_not_touched():
    rng = np.random.default_rng(0)
    model = make_model([node("MatMul", ["x", "xt"], ["att"], name="att"),       # activation x activation
                        node("MatMul", ["att", "w3"], ["y3"], name="batched"),  # 3-D weight
                        node("MatMul", ["xi", "wi"], ["yi"], name="intw")],     # integer weight
                       [vi("x", [4, 16]), vi("xt", [16, 4]), vi("xi", [4, 16], TensorProto.INT32)], [vi("y3", [2, 4, 8]), vi("yi", [4, 8], TensorProto.INT32)],
                       [init("w3", rng.standard_normal((2, 4, 8))), init("wi", rng.integers(-3, 3, (16, 8)), np.int32)],
                       check=False)
    out, result = run_pass_direct(model, "woq")
    assert not result.modified
    s = result.stats
    assert (s["skipped_dynamic_weight"], s["skipped_weight_rank"], s["skipped_weight_dtype"]) == (1, 1, 1)
    assert s["quantized_matmul"] == 0 and any("1 MatMul/Gemm without a constant weight" in n for n in result.notes)


def test_exclude_leaves_named_layers_in_float():
    model = two_layer_model(weights(12, 64, 64), weights(13, 64, 32))
    out, stats, _, _ = woq(model, "woq(exclude=fc2)")
    assert ops_of(out) == ["MatMulNBits", "Relu", "MatMul"]
    assert stats["skipped_excluded"] == 1 and stats["quantized_matmul"] == 1
    out, stats, _, _ = woq(model, "woq(exclude=fc*)")
    assert ops_of(out) == ["MatMul", "Relu", "MatMul"] and stats["skipped_excluded"] == 2


def test_every_skip_reason_is_reported():
    _, result = run_pass_direct(matmul_model(weights(14, 32, 8)), "woq")
    assert all(f"skipped_{k}" in result.stats for k in SKIPS)


def test_a_fp16_layer_keeps_fp16_scales():
    w = weights(15, 64, 16).astype(np.float16)
    model = make_model([node("MatMul", ["x", "w"], ["y"], name="fc")], [vi("x", [4, 64], TensorProto.FLOAT16)],
                       [vi("y", [4, 16], TensorProto.FLOAT16)], [init("w", w, np.float16)])
    out, result = run_pass_direct(model, "woq")
    scales = next(t for t in out.graph.initializer if t.name.endswith("_scales"))
    assert scales.data_type == TensorProto.FLOAT16
    x = {"x": np.random.default_rng(0).standard_normal((4, 64)).astype(np.float16)}
    assert cosine(run_model(model, x)["y"], run_model(out, x)["y"]) > 0.99


# ----------------------------------------------------------------- embeddings

def embedding_model(rows: int = 50, width: int = 64) -> onnx.ModelProto:
    table = np.random.default_rng(16).standard_normal((rows, width)).astype(np.float32)
    return make_model([node("Gather", ["table", "ids"], ["e"], name="embed"),
                       node("MatMul", ["e", "w"], ["y"], name="proj")],
                      [vi("ids", ["batch", 5], INT64)], [vi("y", ["batch", 5, 32])],
                      [init("table", table), init("w", weights(17, width, 32))])


@pytest.mark.parametrize("bits", [4, 8])
def test_embeddings_become_gather_block_quantized(bits):
    model = embedding_model()
    out, stats, _, _ = woq(model, f"woq(bits={bits})")
    assert ops_of(out) == ["GatherBlockQuantized", "MatMulNBits"]
    assert stats["quantized_gather"] == 1
    gbq = out.graph.node[0]
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    data, scales, zeros = (inits[gbq.input[i]] for i in (0, 2, 3))
    assert data.shape == (50, 64 * bits // 8) and scales.shape == (50, 2)
    # the table GatherBlockQuantized reads, dequantized in numpy, is what it returns
    codes = unpack(data, bits, 64).reshape(50, 2, 32).astype(np.float32)
    zero = unpack(zeros, bits, 2).astype(np.float32)
    table = ((codes - zero[..., None]) * scales[..., None]).reshape(50, 64)
    ids = feed(model, 1)
    lookup = onnx.helper.make_model(onnx.helper.make_graph(
        [gbq], "g", [vi("ids", ["batch", 5], INT64)], [vi("e", None)], [t for t in out.graph.initializer if t.name in gbq.input]),
        opset_imports=list(out.opset_import))
    np.testing.assert_allclose(run_model(lookup, ids)["e"], table[ids["ids"]], rtol=1e-6, atol=1e-6)
    original = numpy_helper.to_array(model.graph.initializer[0])
    assert cosine(table, original) > (0.99 if bits == 4 else 0.9999)


def test_embeddings_off_leaves_gather_and_counts_it():
    out, stats, _, _ = woq(embedding_model(), "woq(embeddings=false)")
    assert ops_of(out) == ["Gather", "MatMulNBits"] and stats["skipped_embeddings_off"] == 1


def test_a_table_whose_rows_are_not_whole_bytes_is_skipped():
    _, result = run_pass_direct(embedding_model(width=63), "woq")
    assert result.stats["skipped_gather_odd_width"] == 1 and result.stats["quantized_gather"] == 0


# ----------------------------------------------------------------- options

@pytest.mark.parametrize("spec, message", [("woq(bits=3)", "bits must be 4 or 8"),
                                           ("woq(block_size=48)", "block_size must be"),
                                           ("woq(accuracy_level=5)", "accuracy_level must be"),
                                           ("woq(algo=hqq,symmetric=true)", "hqq fits the zero point")])
def test_bad_options_are_refused(spec, message):
    with pytest.raises(InputError, match=message):
        onnxopt.optimize(matmul_model(weights(18, 32, 8)), spec)


def test_the_pipeline_string_reproduces_the_run():
    model = matmul_model(weights(19, 64, 16))
    _, _, _, result = woq(model, "woq(bits=8,block_size=64,accuracy_level=4,exclude=a*;b)")
    assert result.pipeline == ("woq(bits=8,block_size=64,algo=rtn,accuracy_level=4,symmetric=false,embeddings=true,"
                               "exclude=a*;b,only=,samples=128,damp=0.01,act_order=false)")
    assert any(o.domain == "com.microsoft" and o.version == 1 for o in result.model.opset_import)


@pytest.mark.parametrize("spec", ["woq", "woq(algo=hqq)", "woq(algo=gptq)"])
def test_quantizing_in_chunks_of_outputs_gives_the_same_blocks(spec, monkeypatch):
    """A layer is quantized a few outputs at a time (bounded memory on large weights): the blocks
    are those of one pass over the whole weight (float sums may round differently in the last bit)."""
    import onnxopt.passes.woq as woq_pass

    model = two_layer_model(weights(20, 64, 48), weights(21, 48, 16))
    calib = [feed(model, s) for s in range(4)]
    whole, _, _, _ = woq(model, spec, calibration=calib)
    monkeypatch.setattr(woq_pass, "CHUNK", 64 * 5)   # 5 outputs a chunk
    chunked, _, _, _ = woq(model, spec, calibration=calib)
    for a, b in zip(whole.graph.initializer, chunked.graph.initializer):
        np.testing.assert_allclose(numpy_helper.to_array(a), numpy_helper.to_array(b), rtol=1e-6, atol=0)


def test_a_weight_read_through_transpose_and_identity_is_quantized_as_the_node_reads_it():
    """Exports without constant folding read W as Transpose(Identity(stored [N, K])); the chain goes with dce."""
    w = weights(22, 64, 24)
    model = make_model([node("Identity", ["wt"], ["w_t"]), node("Transpose", ["w_t"], ["w"], perm=[1, 0]),
                        node("MatMul", ["x", "w"], ["y"], name="fc")],
                       [vi("x", ["batch", 64])], [vi("y", ["batch", 24])], [init("wt", w.T.copy())])
    out, stats, _, _ = woq(model, "woq(bits=8,prerequisites=false)")
    assert ops_of(out) == ["MatMulNBits"] and stats["quantized_matmul"] == 1
    x = feed(model, 4)
    assert cosine(run_model(model, x)["y"], run_model(out, x)["y"]) > 0.9999


def test_the_new_node_is_the_producer_of_the_layer_output():
    from onnxopt import graph as G
    from onnxopt.pipeline import PassContext, get_pass

    graph = G.import_graph(two_layer_model(weights(23, 32, 32), weights(24, 32, 8)))
    get_pass("woq")().run(graph, PassContext())
    relu = next(n for n in graph.nodes if n.op == "Relu")
    assert G.producer(relu.inputs[0]).op == "MatMulNBits"
    assert [n.op for n in graph.nodes] == ["MatMulNBits", "Relu", "MatMulNBits"]


def test_weights_are_read_without_being_kept_by_the_graph():
    """Streaming: each float weight is read for its layer only; none is loaded into the graph
    (gs's ``values`` would cache it), so one float weight at a time is in memory besides the model."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    from onnxopt import graph as G
    from onnxopt.pipeline import PassContext, get_pass

    graph = G.import_graph(embedding_model())
    originals = [t for t in graph.tensors().values() if t.name in ("table", "w")]
    assert len(originals) == 2 and all(isinstance(t._values, LazyValues) for t in originals)
    result = get_pass("woq")().run(graph, PassContext())
    assert result.stats["quantized_gather"] == 1 and result.stats["quantized_matmul"] == 1
    assert all(isinstance(t._values, LazyValues) for t in originals)


def test_a_tied_weight_is_quantized_and_stored_once():
    """An unrolled recurrence: one weight read by three steps (two MatMuls and a Gemm with its own
    bias). Each step becomes a MatMulNBits reading the same packed weight; the file shrinks instead
    of holding one copy per step."""
    w = weights(21, 64, 64)
    bias = np.linspace(-1, 1, 64).astype(np.float32)
    model = make_model([node("MatMul", ["x", "w"], ["h1"], name="step1"), node("Tanh", ["h1"], ["t1"]),
                        node("MatMul", ["t1", "w"], ["h2"], name="step2"), node("Tanh", ["h2"], ["t2"]),
                        node("Gemm", ["t2", "w", "b"], ["y"], name="step3")],
                       [vi("x", ["batch", 64])], [vi("y", ["batch", 64])], [init("w", w), init("b", bias)])
    out, stats, _, result = woq(model, "woq(bits=8)")
    assert ops_of(out) == ["MatMulNBits", "Tanh", "MatMulNBits", "Tanh", "MatMulNBits"]
    assert stats["quantized_matmul"] == 2 and stats["quantized_gemm"] == 1 and stats["shared_weights"] == 2
    packed = {n.input[1] for n in out.graph.node if n.op_type == "MatMulNBits"}
    assert len(packed) == 1 and len(out.graph.node[4].input) == 6  # one weight; the Gemm keeps its bias
    assert stats["bytes_before"] == w.nbytes and stats["bytes_after"] < w.nbytes / 3
    assert serialized_size(out) < w.nbytes
    x = feed(model, 3)
    assert cosine(run_model(model, x)["y"], run_model(out, x)["y"]) > 0.999


def test_a_tied_embedding_table_is_quantized_once():
    table = weights(22, 32, 16)
    model = make_model([node("Gather", ["table", "ids"], ["e1"], name="emb1"),
                        node("Gather", ["table", "ids2"], ["e2"], name="emb2"), node("Add", ["e1", "e2"], ["y"])],
                       [vi("ids", ["batch", 4], INT64), vi("ids2", ["batch", 4], INT64)], [vi("y", ["batch", 4, 16])],
                       [init("table", table)])
    out, stats, _, _ = woq(model, "woq(bits=8)")
    assert stats["quantized_gather"] == 2 and stats["shared_weights"] == 1
    assert len({n.input[0] for n in out.graph.node if n.op_type == "GatherBlockQuantized"}) == 1
    x = feed(model, 1)
    assert cosine(run_model(model, x)["y"], run_model(out, x)["y"]) > 0.999


def test_only_quantizes_the_named_layers():
    """only= names the layers quantized; the others stay float Gemms (digits MLP, three Gemms)."""
    model = onnx.load("models/digits_mlp.onnx")
    result = onnxopt.optimize(model, "woq(bits=4,block_size=16,only=/3/Gemm;/5/*)", validate=False)
    ops_after = [(n.op_type, n.name) for n in result.model.graph.node]
    assert sum(op == "MatMulNBits" for op, _ in ops_after) == 2
    assert ("Gemm", "/1/Gemm") in ops_after
    stats = next(r for r in result.records if r.name == "woq").stats
    assert stats["quantized_gemm"] == 2 and stats["skipped_excluded"] == 1
