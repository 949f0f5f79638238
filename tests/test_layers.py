"""onnxopt.layers: weighted layers found in every scope, their weights wherever they live,
the [out, in] view and its inverse, skip reasons, and replacing a weight or a whole layer."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from helpers import init, make_model, node, run_model, vi
from onnx import TensorProto, helper, numpy_helper

from onnxopt import graph as G
from onnxopt import layers as L

RNG = np.random.default_rng(0)


def _w(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def _found(model, **kw):
    graph = G.import_graph(model)
    return graph, L.find_layers(graph, **kw)


def _roundtrip(graph, model):
    return G.export_model(graph, model)


def test_matmul_initializer_and_matrix_view():
    w = _w(4, 3)
    model = make_model([node("MatMul", ["x", "w"], ["y"])], [vi("x", [2, 4])], [vi("y", [2, 3])], [init("w", w)])
    _, found = _found(model)
    (layer,) = found.layers
    assert (layer.kind, layer.layout, layer.scope, layer.top) == ("matmul", "kn", "", True)
    assert layer.weight.holder is None and not layer.weight.transposed and layer.weight.single_use
    assert (layer.out_features, layer.in_features) == (3, 4)
    np.testing.assert_array_equal(layer.matrix(), w.T)
    np.testing.assert_array_equal(layer.unmatrix(layer.matrix()), w)
    assert layer.x.name == "x" and layer.bias is None
    assert L.weight_axis("MatMul", 2) == 1


def test_gemm_trans_b_bias_and_attributes():
    w, c = _w(3, 4), _w(3)
    model = make_model([node("Gemm", ["x", "w", "c"], ["y"], transB=1, alpha=0.5, beta=2.0)],
                       [vi("x", [2, 4])], [vi("y", [2, 3])], [init("w", w), init("c", c)])
    _, found = _found(model)
    (layer,) = found.layers
    assert (layer.kind, layer.layout, layer.trans_b, layer.alpha, layer.beta) == ("gemm", "nk", True, 0.5, 2.0)
    assert layer.bias.name == "c"
    np.testing.assert_array_equal(layer.matrix(), w)
    assert L.weight_axis("Gemm", 2, trans_b=True) == 0 and L.weight_axis("Gemm", 2) == 1


def test_weight_behind_constant_node_identity_and_transpose():
    w = _w(3, 4)  # stored [N, K]; the MatMul reads its transpose [K, N]
    nodes = [helper.make_node("Constant", [], ["wc"], name="const", value=numpy_helper.from_array(w, "wv")),
             node("Identity", ["wc"], ["wi"]), node("Transpose", ["wi"], ["wt"], perm=[1, 0]),
             node("MatMul", ["x", "wt"], ["y"])]
    model = make_model(nodes, [vi("x", [2, 4])], [vi("y", [2, 3])])
    _, found = _found(model)
    (layer,) = found.layers
    weight = layer.weight
    assert weight.holder is not None and weight.holder.name == "const" and weight.transposed
    assert [n.op for n in weight.identities] == ["Identity"]
    assert weight.shape == (4, 3) and weight.stored_shape == (3, 4) and layer.layout == "nk"
    np.testing.assert_array_equal(weight.value(), w.T)
    np.testing.assert_array_equal(layer.matrix(), w)


def test_fp16_weight_keeps_its_dtype():
    w = _w(4, 3, dtype=np.float16)
    model = make_model([node("MatMul", ["x", "w"], ["y"])], [vi("x", [2, 4], TensorProto.FLOAT16)],
                       [vi("y", [2, 3], TensorProto.FLOAT16)], [init("w", w, np.float16)])
    graph, found = _found(model)
    (layer,) = found.layers
    assert layer.weight.dtype == np.float16
    layer.replace_stored(np.zeros((4, 3), np.float16), G.Names(graph))
    out = run_model(_roundtrip(graph, model), {"x": np.ones((2, 4), np.float16)})["y"]
    assert out.dtype == np.float16 and not out.any()


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_groups_matrix_and_replacement_in_ort(groups):
    w = _w(4, 4 // groups, 3, 3)
    model = make_model([node("Conv", ["x", "w", "b"], ["y"], group=groups, pads=[1, 1, 1, 1])],
                       [vi("x", [1, 4, 5, 5])], [vi("y", [1, 4, 5, 5])], [init("w", w), init("b", _w(4))])
    graph, found = _found(model)
    (layer,) = found.layers
    assert (layer.kind, layer.groups, layer.out_features, layer.in_features) == ("conv", groups, 4, 4 // groups * 9)
    m = layer.matrix().copy()
    m[0] = 0.0  # output channel 0 loses its weights: the output is its bias alone
    layer.replace_stored(layer.unmatrix(m), G.Names(graph))
    y = run_model(_roundtrip(graph, model), {"x": _w(1, 4, 5, 5)})["y"]
    b = numpy_helper.to_array(model.graph.initializer[1])
    np.testing.assert_allclose(y[0, 0], np.full((5, 5), b[0]), rtol=1e-6)


def test_convtranspose_groups_rows_are_output_channels():
    g, c, og = 2, 4, 3
    w = _w(c, og, 2, 2)  # [C, O/g, k, k]
    model = make_model([node("ConvTranspose", ["x", "w"], ["y"], group=g)],
                       [vi("x", [1, c, 3, 3])], [vi("y", [1, g * og, 4, 4])], [init("w", w)])
    graph, found = _found(model)
    (layer,) = found.layers
    assert (layer.out_features, layer.in_features) == (g * og, c // g * 4)
    m = layer.matrix()
    # row for output channel 4 (group 1, local 1): input channels 2..3 of that group, all kernel taps
    np.testing.assert_array_equal(m[4], w[2:4, 1].reshape(-1))
    np.testing.assert_array_equal(layer.unmatrix(m), w)
    m2 = m.copy()
    m2[4] = 0.0
    layer.replace_stored(layer.unmatrix(m2), G.Names(graph))
    y = run_model(_roundtrip(graph, model), {"x": _w(1, c, 3, 3)})["y"]
    assert not y[0, 4].any() and y[0, 3].any()
    assert L.weight_axis("ConvTranspose", 4) == 1


def test_layer_in_if_branch_has_its_scope():
    branch = helper.make_graph([node("MatMul", ["x", "w_in"], ["t"], name="inner")], "then",
                               [], [vi("t", [2, 3])], [init("w_in", _w(4, 3))])
    other = helper.make_graph([node("Identity", ["z"], ["e"])], "else", [], [vi("e", [2, 3])])
    nodes = [node("MatMul", ["x", "w"], ["z"], name="outer"),
             node("If", ["c"], ["y"], name="cond", then_branch=branch, else_branch=other)]
    model = make_model(nodes, [vi("x", [2, 4]), vi("c", [], TensorProto.BOOL)], [vi("y", [2, 3])], [init("w", _w(4, 3))])
    _, found = _found(model)
    scopes = {l.node.name: l.scope for l in found.layers}
    assert scopes == {"outer": "", "inner": "If 'cond'/then_branch"}
    assert [l.top for l in found.layers if l.node.name == "inner"] == [False]


def test_skip_reasons():
    big = _w(4, 3)
    nodes = [node("MatMul", ["x", "a"], ["y1"], name="dyn"),           # activation x activation
             node("MatMul", ["x", "ov"], ["y2"], name="over"),         # overridable initializer
             node("MatMul", ["x", "iw"], ["y3"], name="ints"),         # int weight
             node("Conv", ["img", "w2"], ["y4"], name="flat"),         # 2-D Conv weight
             node("Reshape", ["big", "shape"], ["rw"]),
             node("MatMul", ["x", "rw"], ["y5"], name="unfolded"),     # weight computed from constants
             node("MatMul", ["x", "big2"], ["y6"], name="skipme")]
    model = make_model(nodes, [vi("x", [2, 4]), vi("a", [4, 3]), vi("ov", [4, 3]), vi("img", [1, 1, 4, 4])],
                       [vi(n, None) for n in ("y1", "y2", "y3", "y5", "y6")] + [vi("y4", None)],
                       [init("ov", big), init("iw", np.ones((4, 3), np.int64), np.int64), init("w2", _w(1, 1)),
                        init("big", big.reshape(-1)), init("shape", [4, 3], np.int64), init("big2", big)], check=False)
    graph = G.import_graph(model)
    graph.initializer_inputs = ["ov"]
    found = L.find_layers(graph, exclude=["skip*"])
    assert found.layers == []
    assert {n.name: r for n, _, r in found.skipped} == {
        "dyn": "dynamic_weight", "over": "overridable_weight", "ints": "weight_dtype", "flat": "weight_rank",
        "unfolded": "weight_not_folded", "skipme": "excluded"}
    assert set(found.skips) <= set(L.SKIPS)


def test_constant_input_only_when_asked():
    nodes = [node("MatMul", ["a", "w"], ["y"])]
    model = make_model(nodes, [], [vi("y", [2, 3])], [init("a", _w(2, 4)), init("w", _w(4, 3))])
    assert len(_found(model)[1].layers) == 1
    assert _found(model, check_input=True)[1].skips == {"constant_input": 1}


def test_shared_weight_is_not_single_use():
    model = make_model([node("MatMul", ["x", "w"], ["y"]), node("MatMul", ["x", "w"], ["z"])],
                       [vi("x", [2, 4])], [vi("y", [2, 3]), vi("z", [2, 3])], [init("w", _w(4, 3))])
    _, found = _found(model)
    assert [l.weight.single_use for l in found.layers] == [False, False]
    assert found.layers[0].weight.const is found.layers[1].weight.const


def test_replace_weight_reads_a_fresh_constant_of_the_read_shape():
    w = _w(3, 4)
    nodes = [node("Transpose", ["w"], ["wt"], perm=[1, 0]), node("MatMul", ["x", "wt"], ["y"])]
    model = make_model(nodes, [vi("x", [2, 4])], [vi("y", [2, 3])], [init("w", w)])
    graph, found = _found(model)
    (layer,) = found.layers
    new = np.ones((4, 3), np.float32)
    layer.replace_weight(new, G.Names(graph))
    x = _w(2, 4)
    y = run_model(_roundtrip(graph.cleanup(), model), {"x": x})["y"]
    np.testing.assert_allclose(y, x @ new, rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        layer.replace_weight(np.ones((3, 4), np.float32), G.Names(graph))


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_factor_replaces_the_layer_by_two_factors(op):
    w = _w(6, 5)
    attrs = {"transB": 1, "alpha": 0.5} if op == "Gemm" else {}
    stored = w.T.copy() if op == "Gemm" else w
    inputs = ["x", "w"] + (["c"] if op == "Gemm" else [])
    inits = [init("w", stored)] + ([init("c", _w(5))] if op == "Gemm" else [])
    model = make_model([node(op, inputs, ["y"], **attrs)], [vi("x", [2, 6])], [vi("y", [2, 5])], inits)
    graph, found = _found(model)
    (layer,) = found.layers
    u, s, vt = np.linalg.svd(w, full_matrices=False)  # full rank: the product is W again
    a = (u * s * layer.alpha).astype(np.float32)
    layer.factor(a, vt.astype(np.float32), G.Names(graph))
    out = _roundtrip(graph, model)
    assert [n.op_type for n in out.graph.node] == [op, op]
    x = _w(2, 6)
    np.testing.assert_allclose(run_model(out, {"x": x})["y"], run_model(model, {"x": x})["y"], rtol=1e-4, atol=1e-5)


def test_replace_puts_a_custom_node_in_place():
    w = _w(4, 3)
    model = make_model([node("MatMul", ["x", "w"], ["y"]), node("Relu", ["y"], ["z"])],
                       [vi("x", [2, 4])], [vi("z", [2, 3])], [init("w", w)])
    graph, found = _found(model)
    (layer,) = found.layers
    doubled = gs.Constant("w2", w * 2)
    layer.replace([gs.Node("MatMul", name="mm2", inputs=[layer.x, doubled], outputs=list(layer.node.outputs))])
    assert [n.op for n in graph.nodes] == ["MatMul", "Relu"] and graph.nodes[0].name == "mm2"
    x = _w(2, 4)
    np.testing.assert_allclose(run_model(_roundtrip(graph, model), {"x": x})["z"], np.maximum(x @ (w * 2), 0), rtol=1e-6)
    with pytest.raises(ValueError, match="do not write"):
        L.find_layers(graph).layers[0].replace([])


def test_excluded_matches_node_and_weight_names():
    model = make_model([node("MatMul", ["x", "w_head"], ["y"], name="mm")], [vi("x", [2, 4])], [vi("y", [2, 3])],
                       [init("w_head", _w(4, 3))])
    (layer,) = _found(model)[1].layers
    assert L.excluded(layer, ["*head"]) and L.excluded(layer, ["mm"]) and not L.excluded(layer, ["other"])


def test_array_reads_the_stored_values_untransposed():
    w = _w(3, 4)
    nodes = [node("Transpose", ["w"], ["wt"], perm=[1, 0]), node("MatMul", ["x", "wt"], ["y"])]
    model = make_model(nodes, [vi("x", [2, 4])], [vi("y", [2, 3])], [init("w", w)])
    (layer,) = _found(model)[1].layers
    np.testing.assert_array_equal(layer.weight.array(), w)
    np.testing.assert_array_equal(layer.weight.value(), w.T)


def test_find_embeddings_tables_behind_identity_and_what_is_not_one():
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])
    table = _w(10, 4)
    nodes = [node("Identity", ["table"], ["table_id"]),
             node("Gather", ["table_id", "ids"], ["emb"]),           # an embedding behind an Identity
             node("Shape", ["emb"], ["shape"]),
             node("Gather", ["shape", "zero"], ["dim"], axis=0),      # a Gather on a shape: not one
             node("Gather", ["fed", "ids"], ["emb2"]),                # a table a caller may feed
             node("Gather", ["vec", "ids"], ["emb3"])]                # a 1-D table: not one
    fed = helper.make_tensor_value_info("fed", TensorProto.FLOAT, [10, 4])
    model = make_model(nodes, [ids, fed], [vi("emb", [2, 3, 4]), vi("dim", [], TensorProto.INT64), vi("emb2", [2, 3, 4]),
                                           vi("emb3", [2, 3])],
                       [init("table", table), init("zero", 0, np.int64), init("fed", _w(10, 4)),
                        init("vec", _w(10))])
    graph = G.import_graph(model)
    found, skips = L.find_embeddings(graph)
    (emb,) = found
    assert emb.node.outputs[0].name == "emb" and emb.top and emb.axis == 0
    assert emb.shape == (10, 4) and emb.dtype == np.float32 and emb.table.name == "table"
    np.testing.assert_array_equal(emb.table.values, table)
    assert skips == {"overridable_weight": 1}
