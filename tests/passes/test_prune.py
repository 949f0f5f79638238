"""The ``prune`` pass: unstructured, global, N:M and structured pruning, scores, reconstruction, storage.

prune is lossy. Every rewriting case runs through ``onnxopt.optimize`` (pass manager,
contracts, checker, validation in ORT) with an explicit tolerance, and the tests check
what pruning promises exactly: the number of zeros, the N:M pattern in every group, the
shapes after structured shrinking, and, where the removed channels' contribution can be
folded exactly, outputs equal to the model with those channels zeroed.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from helpers import FLOAT, init, make_model, node, random_feed, run_model, run_pass_direct, vi

FLOAT16 = TensorProto.FLOAT16


def rand(shape, seed, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every weight as written: initializers and Constant nodes (dense or sparse_value), by reader-visible name."""
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
                elif a.name == "sparse_value":
                    sp = a.sparse_tensor
                    dense = np.zeros(int(np.prod(sp.dims)), numpy_helper.to_array(sp.values).dtype)
                    dense[numpy_helper.to_array(sp.indices)] = numpy_helper.to_array(sp.values)
                    out[n.output[0]] = dense.reshape(list(sp.dims))
    return out


def weight_of(model: onnx.ModelProto, node_name: str, slot: int = 1) -> np.ndarray:
    n = next(n for n in model.graph.node if n.name == node_name)
    return weights(model)[n.input[slot]]


def prune(model, spec, feeds=None, calibration=None, min_cosine=0.0):
    feeds = feeds if feeds is not None else [random_feed(model, seed=s) for s in range(2)]
    result = onnxopt.optimize(model, spec, inputs=feeds, calibration=calibration,
                              tolerance=f"min_cosine={min_cosine}")
    assert result.validation is not None and result.passed, result.validation.headline()
    onnx.checker.check_model(result.model, full_check=True)
    assert result.records[0].name == "prune"
    return result.model, dict(result.records[0].stats), result


def mlp(k=16, h=32, n=8, dtype=np.float32, constant_node=False) -> onnx.ModelProto:
    """x[b,k] -> MatMul W1[k,h] + b1 -> Relu -> Gemm(transB) W2[n,h] -> Relu -> MatMul W3[n,n]."""
    et = FLOAT16 if dtype == np.float16 else FLOAT
    inits = [init("W1", rand((k, h), 1, dtype), dtype), init("b1", rand(h, 2, dtype), dtype),
             init("W2", rand((n, h), 3, dtype), dtype), init("W3", rand((n, n), 5, dtype), dtype)]
    nodes = [node("MatMul", ["x", "W1"], ["m1"], name="fc1"), node("Add", ["m1", "b1"], ["a1"], name="bias1"),
             node("Relu", ["a1"], ["r1"], name="relu1"),
             node("Gemm", ["r1", "W2"], ["g2"], name="fc2", transB=1), node("Relu", ["g2"], ["r2"], name="relu2"),
             node("MatMul", ["r2", "W3"], ["y"], name="fc3")]
    if constant_node:
        inits = [i for i in inits if i.name != "W2"]
        nodes.insert(0, helper.make_node("Constant", [], ["W2"], name="w2_const",
                                         value=numpy_helper.from_array(rand((n, h), 3, dtype))))
    return make_model(nodes, [vi("x", ["batch", k], et)], [vi("y", ["batch", n], et)], inits)


def count_zeros(a: np.ndarray) -> int:
    return int(np.count_nonzero(a == 0))


# ----------------------------------------------------------------- unstructured

@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_layer_sparsity_is_exact(sparsity):
    model = mlp()
    out, st, _ = prune(model, f"prune(sparsity={sparsity},keep_first_last=false,reconstruct=false)")
    for name, w in (("fc1", weights(model)["W1"]), ("fc2", weights(model)["W2"]), ("fc3", weights(model)["W3"])):
        new = weight_of(out, name)
        assert new.shape == w.shape
        assert abs(count_zeros(new) - sparsity * w.size) < 1, name  # one ratio, rounded by largest remainders
        kept = new != 0
        np.testing.assert_array_equal(new[kept], w[kept])  # magnitude without reconstruction: survivors unchanged
        assert np.abs(w[~kept]).max() <= np.abs(w[kept]).min()  # the smallest were removed
    total = 16 * 32 + 8 * 32 + 64
    assert st["layers_pruned"] == 3 and st["weights_total"] == total
    assert st["weights_zeroed"] == round(sparsity * total) == sum(count_zeros(weight_of(out, n)) for n in ("fc1", "fc2", "fc3"))
    assert st["sparsity_requested"] == sparsity and st["sparsity_achieved"] == round(round(sparsity * total) / total, 4)
    assert st["skipped_first_last"] == 0


def test_first_and_last_layers_stay_dense_by_default_and_exclude_globs():
    model = mlp()  # fc1 512 weights, fc2 256, fc3 64: 832 prunable
    out, st, result = prune(model, "prune(sparsity=0.5,reconstruct=false)")
    assert count_zeros(weight_of(out, "fc1")) == 0 and count_zeros(weight_of(out, "fc3")) == 0
    # 416 asked of fc2 alone: it stops at its cap, 0.95 of 256, and the run says so
    assert count_zeros(weight_of(out, "fc2")) == 243
    assert st["skipped_first_last"] == 2 and st["layers_pruned"] == 1
    assert st["target_reached"] == 0 and st["sparsity_achieved"] == round(243 / 832, 4)
    assert result.records[0].notes == ["sparsity 0.5 requested over all prunable weights, 0.2921 reached: 1 pruned "
                                       "layer(s) take at most 0.95 of their weights each; layers kept dense: first_last 2"]
    assert "note (prune): sparsity 0.5 requested" in result.summary()
    assert [(r["layer"], r["pruned"], r.get("dense")) for r in st["layers"]] == \
        [("fc1", 0, "first_last"), ("fc2", 243, None), ("fc3", 0, "first_last")]
    out, st, _ = prune(model, "prune(sparsity=0.5,reconstruct=false,keep_first_last=false,exclude=fc2;W3)")
    assert count_zeros(weight_of(out, "fc1")) == 416  # half of all 832, from the one layer pruned
    assert count_zeros(weight_of(out, "fc2")) == 0 and count_zeros(weight_of(out, "fc3")) == 0
    assert st["skipped_excluded"] == 2 and st["target_reached"] == 1 and st["sparsity_achieved"] == 0.5


def test_global_scope_reaches_the_total_exactly():
    model = mlp()
    out, st, _ = prune(model, "prune(sparsity=0.6,scope=global,keep_first_last=false,reconstruct=false)")
    zeros = [count_zeros(weight_of(out, n)) for n in ("fc1", "fc2", "fc3")]
    assert sum(zeros) == round(0.6 * (512 + 256 + 64)) == st["weights_zeroed"]
    # global_norm=none: one threshold over the raw |W| of all layers
    raw, st, _ = prune(model, "prune(sparsity=0.6,scope=global,global_norm=none,keep_first_last=false,reconstruct=false)")
    every = np.concatenate([np.abs(weights(model)[n]).reshape(-1) for n in ("W1", "W2", "W3")])
    threshold = np.sort(every)[round(0.6 * every.size) - 1]
    for name, node_name in (("W1", "fc1"), ("W2", "fc2"), ("W3", "fc3")):
        w = weights(model)[name]
        np.testing.assert_array_equal(weight_of(raw, node_name) == 0, np.abs(w) <= threshold)
    with pytest.raises(onnxopt.InputError, match="global_norm applies to scope=global"):
        onnxopt.optimize(model, "prune(global_norm=none)")


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_nm_holds_in_every_group_along_k(pattern, n, m):
    model = mlp()
    out, st, _ = prune(model, f"prune(pattern={pattern},keep_first_last=false,reconstruct=false)")
    w1 = weight_of(out, "fc1")  # MatMul W[K, N]: groups run along K
    groups = w1.T.reshape(-1, m)
    assert ((groups != 0).sum(axis=1) == n).all()
    w2 = weight_of(out, "fc2")  # Gemm transB: W[N, K]
    assert ((w2.reshape(-1, m) != 0).sum(axis=1) == n).all()
    assert st["weights_zeroed"] == (512 + 256 + 64) * (m - n) // m
    # the largest of each group survive
    orig = weights(model)["W1"].T.reshape(-1, m)
    kept = groups != 0
    assert (np.sort(np.abs(orig), axis=1)[:, m - n:] == np.sort(np.abs(np.where(kept, orig, 0)), axis=1)[:, m - n:]).all()


def conv_chain(cin=8, mid=8, cout=4, pads=1, group=1) -> onnx.ModelProto:
    inits = [init("Wa", rand((mid, cin // group, 3, 3), 1)), init("Ba", rand(mid, 2)),
             init("Wb", rand((cout, mid, 3, 3), 3)), init("Bb", rand(cout, 4))]
    return make_model([node("Conv", ["x", "Wa", "Ba"], ["c1"], name="conva", pads=[pads] * 4, group=group),
                       node("Relu", ["c1"], ["r1"], name="relu"),
                       node("Conv", ["r1", "Wb", "Bb"], ["y"], name="convb", pads=[pads] * 4)],
                      [vi("x", ["batch", cin, 6, 6])], [vi("y", ["batch", cout, 6 if pads else 2, 6 if pads else 2])],
                      inits)


def test_nm_on_conv_groups_input_channels_at_each_kernel_position():
    model = conv_chain()
    out, st, _ = prune(model, "prune(pattern=2:4,keep_first_last=false,reconstruct=false)")
    for name in ("conva", "convb"):
        w = weight_of(out, name)  # [O, C, kh, kw]
        groups = w.transpose(0, 2, 3, 1).reshape(-1, 4)
        assert ((groups != 0).sum(axis=1) == 2).all()
    assert st["layers_pruned"] == 2 and st["skipped_nm_indivisible"] == 0


def test_nm_skips_layers_whose_reduction_axis_does_not_divide():
    model = mlp(k=6)  # fc1 K=6, not a multiple of 4
    out, st, _ = prune(model, "prune(pattern=2:4,keep_first_last=false,reconstruct=false)")
    assert st["skipped_nm_indivisible"] == 1
    np.testing.assert_array_equal(weight_of(out, "fc1"), weights(model)["W1"])


def test_fp16_and_constant_node_weights():
    model = mlp(dtype=np.float16, constant_node=True)
    out, st, _ = prune(model, "prune(sparsity=0.5,keep_first_last=false,reconstruct=false)")
    w2 = weight_of(out, "fc2")
    assert w2.dtype == np.float16 and count_zeros(w2) == 128
    assert count_zeros(weight_of(out, "fc1")) == 256
    assert st["layers_pruned"] == 3


def test_shared_weight_is_pruned_once_or_skipped():
    w = init("W", rand((8, 8), 1))
    shared = make_model([node("MatMul", ["x", "W"], ["a"], name="m1"), node("Relu", ["a"], ["r"], name="relu"),
                         node("MatMul", ["r", "W"], ["y"], name="m2")],
                        [vi("x", ["batch", 8])], [vi("y", ["batch", 8])], [w])
    out, st, _ = prune(shared, "prune(sparsity=0.5,keep_first_last=false,reconstruct=false)")
    assert weight_of(out, "m1").tobytes() == weight_of(out, "m2").tobytes()
    assert count_zeros(weight_of(out, "m1")) == 32 and st["layers_pruned"] == 1
    mixed = make_model([node("MatMul", ["x", "W"], ["a"], name="m1"), node("Add", ["a", "W"], ["y"], name="add")],
                       [vi("x", [8, 8])], [vi("y", [8, 8])], [w])
    out, st = run_pass_direct(mixed, "prune", sparsity=0.5, keep_first_last=False, reconstruct=False)
    assert st.modified is False and st.stats["skipped_shared_weight"] == 1
    np.testing.assert_array_equal(weights(out)["W"], numpy_helper.to_array(w))


def test_subgraph_layers_are_pruned():
    body = helper.make_graph([node("MatMul", ["x", "Wi"], ["t"], name="inner")], "then", [],
                             [vi("t", ["batch", 8])], initializer=[init("Wi", rand((8, 8), 7))])
    other = helper.make_graph([node("Identity", ["x"], ["e"], name="id")], "else", [], [vi("e", ["batch", 8])])
    model = make_model([node("If", ["c"], ["y"], name="if", then_branch=body, else_branch=other)],
                       [vi("c", [], TensorProto.BOOL), vi("x", ["batch", 8])], [vi("y", ["batch", 8])])
    feeds = [{"c": np.array(True), "x": rand((3, 8), 0)}]
    out, st, _ = prune(model, "prune(sparsity=0.25,keep_first_last=false)", feeds=feeds)
    inner = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    w = numpy_helper.to_array(inner.initializer[0])
    assert count_zeros(w) == 16 and st["layers_pruned"] == 1


# ----------------------------------------------------------------- data-driven

def correlated(n, k, seed, rank=6):
    """Activations of low effective rank with uneven column scales, like real layer inputs."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((rank, k))
    scale = np.exp(rng.standard_normal(k))  # uneven column norms: where wanda differs from magnitude
    x = rng.standard_normal((n, rank)) @ mix + 0.05 * rng.standard_normal((n, k))
    return (x * scale).astype(np.float32)


def test_wanda_and_reconstruction_reduce_the_output_error():
    model = make_model([node("MatMul", ["x", "W"], ["y"], name="fc")], [vi("x", ["batch", 32])],
                       [vi("y", ["batch", 16])], [init("W", rand((32, 16), 2))])
    calib = {"x": correlated(256, 32, 1)}
    test = {"x": correlated(64, 32, 1)}
    ref = run_model(model, test)["y"]

    def err(spec):
        out, st, _ = prune(model, spec, feeds=[test], calibration=calib)
        assert st["weights_zeroed"] == round(0.6 * 512)
        return float(np.linalg.norm(run_model(out, test)["y"] - ref)), st

    base = "prune(sparsity=0.6,keep_first_last=false"
    magnitude, _ = err(base + ",reconstruct=false)")
    wanda, _ = err(base + ",score=wanda,scope=layer,reconstruct=false)")  # the same group as magnitude
    rebuilt, st = err(base + ")")  # calibration given: reconstruction is on by default
    assert st["layers_reconstructed"] == 1
    assert wanda < magnitude and rebuilt < 0.5 * wanda


def test_conv_reconstruction_and_bias_correction():
    model = conv_chain()
    base = rand((20, 3, 6, 6), 3)  # 8 channels mixed from 3: the case reconstruction exploits
    mixed = np.einsum("nchw,cd->ndhw", base, rand((3, 8), 4)).astype(np.float32)
    calib, test = {"x": mixed[:16]}, {"x": mixed[16:]}
    ref = run_model(model, test)["y"]
    errs = {}
    for spec in ("reconstruct=false", "reconstruct=true", "reconstruct=true,bias_correction=true"):
        # conva alone prunes; max_layer_sparsity=0.5 keeps it at half (convb's share does not fit)
        out, st, _ = prune(model, f"prune(sparsity=0.5,max_layer_sparsity=0.5,keep_first_last=false,exclude=convb,"
                                  f"{spec})", feeds=[test], calibration=calib)
        assert st["weights_zeroed"] == count_zeros(weight_of(out, "conva")) == 288 and st["target_reached"] == 0
        errs[spec] = float(np.linalg.norm(run_model(out, test)["y"] - ref))
    assert errs["reconstruct=true"] < 0.5 * errs["reconstruct=false"]
    assert st["biases_corrected"] == 1


def test_auto_allocates_ratios_that_reach_the_target():
    model = mlp()
    calib = {"x": rand((64, 16), 9)}
    out, st, _ = prune(model, "prune(sparsity=auto,target=0.7,keep_first_last=false)", calibration=calib)
    zeros = sum(count_zeros(weight_of(out, n)) for n in ("fc1", "fc2", "fc3"))
    assert abs(zeros - 0.7 * 832) <= 3 and st["target_reached"] == 1
    assert len(st["auto_ratios"].split(";")) == 3


# ----------------------------------------------------------------- storage

def test_storage_is_sparse_only_when_smaller():
    model = mlp(k=64, h=64)
    dense, st, _ = prune(model, "prune(sparsity=0.5,reconstruct=false,ops=Gemm,keep_first_last=false)")  # fc2 alone
    assert st["sparse_tensors"] == 0 and st["written_bytes"] == st["dense_bytes"] == 64 * 8 * 4
    out, st, _ = prune(model, "prune(sparsity=0.9,reconstruct=false,ops=Gemm,keep_first_last=false)")
    assert st["sparse_tensors"] == 1 and st["written_bytes"] < 0.4 * st["dense_bytes"]
    assert st["gzip_bytes"] < st["gzip_bytes_dense"]
    const = [n for n in out.graph.node if n.op_type == "Constant"]
    assert len(const) == 1 and const[0].attribute[0].name == "sparse_value"
    assert const[0].attribute[0].sparse_tensor.indices.data_type == TensorProto.INT64
    assert count_zeros(weight_of(out, "fc2")) == round(0.9 * 512)
    assert len(out.SerializeToString()) < len(dense.SerializeToString())
    out, st, _ = prune(model, "prune(sparsity=0.9,reconstruct=false,ops=Gemm,keep_first_last=false,storage=dense)")
    assert st["sparse_tensors"] == 0


# ----------------------------------------------------------------- structured

def zero_channels(model: onnx.ModelProto, weight: str, bias: str, channels, axis=0) -> onnx.ModelProto:
    """The original model with those output channels' weights and biases zeroed (the dense equivalent)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for i in copy.graph.initializer:
        if i.name in (weight, bias):
            a = numpy_helper.to_array(i).copy()
            np.moveaxis(a, axis if i.name == weight else 0, 0)[channels] = 0
            i.CopyFrom(numpy_helper.from_array(a, i.name))
    return copy


def cnn(pool="MaxPool") -> onnx.ModelProto:
    c = 8
    inits = [init("W0", rand((c, 2, 3, 3), 1)), init("W1", rand((c, c, 3, 3), 2)), init("B1", rand(c, 3))]
    inits += [init(f"bn_{p}", rand(c, 10 + i) if p != "var" else 0.5 + np.abs(rand(c, 14))) for i, p in
              enumerate(("scale", "bias", "mean", "var"))]
    inits += [init("W2", rand((6, c, 1, 1), 5)), init("Wf", rand((6, 3), 6)), init("Bf", rand(3, 7))]
    nodes = [node("Conv", ["x", "W0"], ["c0"], name="conv0", pads=[1] * 4), node("Relu", ["c0"], ["r0"], name="relu0"),
             node("Conv", ["r0", "W1", "B1"], ["c1"], name="conv1", pads=[1] * 4),
             node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["b1"], name="bn1"),
             node("Relu", ["b1"], ["r1"], name="relu1"), node(pool, ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2],
                                                             strides=[2, 2]),
             node("Conv", ["p1", "W2"], ["c2"], name="conv2"), node("Relu", ["c2"], ["r2"], name="relu2"),
             node("GlobalAveragePool", ["r2"], ["g"], name="gap"), node("Flatten", ["g"], ["f"], name="flat"),
             node("Gemm", ["f", "Wf", "Bf"], ["y"], name="fc")]
    model = make_model(nodes, [vi("x", ["batch", 2, 6, 6])], [vi("y", ["batch", 3])], inits, check=False)
    return onnx.shape_inference.infer_shapes(model)


def test_structured_shrinks_conv_bn_pool_conv_and_flatten_gemm():
    # prerequisites off: BatchNormalization stays, and structured pruning shrinks it with the conv
    model = cnn()
    out, st, _ = prune(model, "prune(pattern=structured,sparsity=0.5,prerequisites=false)")
    w = weights(out)
    conv1, conv2, fc = (next(n for n in out.graph.node if n.name == nm) for nm in ("conv1", "conv2", "fc"))
    # 786 prunable weights (conv0 144, conv1 576, conv2 48, fc 18), 393 asked: one channel ratio for conv1 (8)
    # and conv2 (6); 5 and 3 channels remove 5*72 + (48 - 3*3) + 3*3 = 408, the nearest to 393 (4 and 3: 333)
    assert w[conv1.input[1]].shape == (3, 8, 3, 3) and w[conv1.input[2]].shape == (3,)
    bn = next(n for n in out.graph.node if n.op_type == "BatchNormalization")
    assert all(w[i].shape == (3,) for i in bn.input[1:])
    assert w[conv2.input[1]].shape == (3, 3, 1, 1)
    assert w[fc.input[1]].shape == (3, 3)
    assert st["layers_pruned"] == 2 and st["channels_removed"] == 8
    left = sum(w[n.input[1]].size for n in out.graph.node if n.op_type in ("Conv", "Gemm"))
    assert st["weights_total"] == 786 and st["weights_zeroed"] == 786 - left == 408
    assert st["sparsity_achieved"] == round(408 / 786, 4) and st["target_reached"] == 1
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(out, strict_mode=True), full_check=True)
    feed = random_feed(model, seed=3, dims={"batch": 5})
    assert run_model(out, feed)["y"].shape == (5, 3)


def test_structured_removed_channels_fold_exactly_into_the_consumer():
    # conv1's removed channels carry only their bias through BN/Relu/pool into a 1x1 conv (no padding)
    model = cnn()
    out, st, _ = prune(model, "prune(pattern=structured,sparsity=0.5,exclude=conv2,prerequisites=false)")
    w1 = weights(model)["W1"]
    bn_scale = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "bn_scale"))
    bn_var = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "bn_var"))
    norms = np.sqrt((w1.reshape(8, -1).astype(np.float64) ** 2).sum(1)) * np.abs(bn_scale / np.sqrt(bn_var + 1e-5))
    removed = np.argsort(norms, kind="stable")[:5]  # 393 of 786 asked; a channel is 72 + 6 weights: 5 remove 390
    reference = zero_channels(model, "W1", "__none__", removed)
    feed = random_feed(model, seed=1, dims={"batch": 3})
    np.testing.assert_allclose(run_model(out, feed)["y"], run_model(reference, feed)["y"], rtol=1e-4, atol=1e-4)
    assert st["channels_removed"] == 5 and st["weights_zeroed"] == 390
    # fold_removed=false: the same channels go and conv2 (no bias) gets none; folded, it gets their constant
    plain, st2, _ = prune(model, "prune(pattern=structured,sparsity=0.5,exclude=conv2,fold_removed=false,prerequisites=false)")
    plain_conv2, folded_conv2 = (next(n for n in m.graph.node if n.name == "conv2") for m in (plain, out))
    assert st2["channels_removed"] == 5
    assert len(plain_conv2.input) == 2 and len(folded_conv2.input) == 3
    assert np.array_equal(weight_of(plain, "conv2"), weight_of(out, "conv2"))
    assert not np.allclose(run_model(plain, feed)["y"], run_model(out, feed)["y"], rtol=1e-4, atol=1e-4)


def test_structured_matmul_chain_with_bias_add():
    model = mlp()
    out, st, _ = prune(model, "prune(pattern=structured,sparsity=0.25,keep_first_last=false,exclude=fc2;fc3)")
    # 208 of 832 weights asked; a channel of fc1 is 16 weights there and 8 in fc2: 9 channels remove 216
    assert weight_of(out, "fc1").shape == (16, 23)
    assert weights(out)[next(n for n in out.graph.node if n.name == "bias1").input[1]].shape == (23,)
    assert weight_of(out, "fc2").shape == (8, 23)
    removed = np.argsort(np.sqrt((weights(model)["W1"].astype(np.float64) ** 2).sum(0)), kind="stable")[:9]
    reference = zero_channels(model, "W1", "__none__", removed, axis=1)
    feed = random_feed(model, seed=2, dims={"batch": 4})
    np.testing.assert_allclose(run_model(out, feed)["y"], run_model(reference, feed)["y"], rtol=1e-4, atol=1e-4)
    assert st["channels_removed"] == 9 and st["weights_zeroed"] == 216


def test_structured_skips_paths_it_cannot_follow():
    w = init("W", rand((8, 8), 1))
    residual = make_model([node("MatMul", ["x", "W"], ["a"], name="m1"), node("Add", ["a", "x"], ["s"], name="res"),
                           node("MatMul", ["s", "W2"], ["y"], name="m2")],
                          [vi("x", ["batch", 8])], [vi("y", ["batch", 8])], [w, init("W2", rand((8, 8), 2))])
    out, st = run_pass_direct(residual, "prune", pattern="structured", keep_first_last=False)
    assert st.modified is False and st.stats["skipped_structured_residual"] == 1
    shape = init("shape", np.array([-1, 2, 4]), np.int64)
    reshape = make_model([node("MatMul", ["x", "W"], ["a"], name="m1"),
                          node("Reshape", ["a", "shape"], ["y"], name="rs")],
                         [vi("x", ["batch", 8])], [vi("y", ["batch", 2, 4])], [w, shape])
    out, st = run_pass_direct(reshape, "prune", pattern="structured", keep_first_last=False)
    assert st.modified is False and st.stats["skipped_structured_reshape"] == 1
    concat = make_model([node("MatMul", ["x", "W"], ["a"], name="m1"),
                         node("Concat", ["a", "x"], ["y"], name="cat", axis=1)],
                        [vi("x", ["batch", 8])], [vi("y", ["batch", 16])], [w])
    out, st = run_pass_direct(concat, "prune", pattern="structured", keep_first_last=False)
    assert st.modified is False and st.stats["skipped_structured_concat"] == 1


# ----------------------------------------------------------------- options

@pytest.mark.parametrize("spec,message", [
    ("prune(sparsity=1.5)", "sparsity must be in [0, 1)"),
    ("prune(sparsity=half)", "option 'sparsity'"),
    ("prune(pattern=3:4)", "option 'pattern'"),
    ("prune(sparsity=auto,pattern=2:4)", "sparsity=auto works with pattern=unstructured only"),
    ("prune(tolerance=0.1)", "tolerance applies to sparsity=auto only"),
    ("prune(pattern=2:4,scope=global)", "scope=global does not apply"),
    ("prune(ops=Add)", "cannot prune Add"),
])
def test_bad_options_get_a_clear_error(spec, message):
    with pytest.raises(onnxopt.InputError) as info:
        onnxopt.optimize(mlp(), spec)
    assert message in str(info.value)


def test_nothing_to_prune_leaves_the_graph_untouched():
    model = mlp()
    out, st = run_pass_direct(model, "prune", sparsity=0.0, keep_first_last=False)
    assert st.modified is False and st.stats["weights_zeroed"] == 0


# ----------------------------------------------------------------- a real model

def test_digits_mlp_half_magnitude_costs_at_most_one_point():
    model = onnx.load("models/digits_mlp.onnx")
    data = np.load("models/digits_test.npz")
    x, labels = data["input"], data["labels"]
    out, st, _ = prune(model, "prune(sparsity=0.5,keep_first_last=false,reconstruct=false)", feeds=[{"input": x[:32]}])
    acc = lambda m: float((run_model(m, {"input": x})["logits"].argmax(1) == labels).mean() * 100)
    assert st["sparsity_achieved"] == 0.5
    assert acc(out) >= acc(model) - 1.0


def test_weight_read_through_a_transpose_is_pruned_in_place():
    # exports without constant folding: MatMul(x, Transpose(W[N, K]))
    model = make_model([node("Transpose", ["W"], ["Wt"], name="tr", perm=[1, 0]),
                        node("MatMul", ["x", "Wt"], ["y"], name="fc")],
                       [vi("x", ["batch", 8])], [vi("y", ["batch", 4])], [init("W", rand((4, 8), 1))])
    out, st, _ = prune(model, "prune(pattern=2:4,keep_first_last=false,reconstruct=false)")
    w = weights(out)[next(n for n in out.graph.node if n.op_type == "Transpose").input[0]]
    assert w.shape == (4, 8) and ((w.reshape(-1, 4) != 0).sum(axis=1) == 2).all()  # groups along K
    assert st["layers_pruned"] == 1


def test_structured_with_calibration_refits_the_consumer():
    model = cnn()
    calib = {"x": rand((32, 2, 6, 6), 11)}
    feed = {"x": rand((8, 2, 6, 6), 12)}
    ref = run_model(model, feed)["y"]
    plain, st0, _ = prune(model, "prune(pattern=structured,sparsity=0.5,reconstruct=false,prerequisites=false)", feeds=[feed])
    refit, st1, _ = prune(model, "prune(pattern=structured,sparsity=0.5,prerequisites=false)", feeds=[feed], calibration=calib)
    assert st0["layers_reconstructed"] == 0 and st1["layers_reconstructed"] == 2
    assert st1["channels_removed"] == st0["channels_removed"] == 8
    assert [weights(refit)[n.input[1]].shape for n in refit.graph.node if n.op_type in ("Conv", "Gemm")] == \
        [weights(plain)[n.input[1]].shape for n in plain.graph.node if n.op_type in ("Conv", "Gemm")]
    err = lambda m: float(np.linalg.norm(run_model(m, feed)["y"] - ref))
    assert err(refit) < err(plain)


def test_sequential_refit_aims_at_the_dense_output():
    model = conv_chain()
    base = rand((20, 3, 6, 6), 3)
    mixed = np.einsum("nchw,cd->ndhw", base, rand((3, 8), 4)).astype(np.float32)
    calib, test = {"x": mixed[:16]}, {"x": mixed[16:]}
    ref = run_model(model, test)["y"]
    errs = {}
    for seq in ("true", "false"):
        out, st, _ = prune(model, f"prune(sparsity=0.5,keep_first_last=false,sequential={seq})", feeds=[test],
                           calibration=calib)
        assert st["layers_reconstructed"] == 2 and st["weights_zeroed"] == 288 + 144
        errs[seq] = float(np.linalg.norm(run_model(out, test)["y"] - ref))
    assert errs["true"] < errs["false"]


def test_structured_follows_channels_through_a_depthwise_conv():
    c = 8
    inits = [init("W0", rand((c, 2, 1, 1), 1)), init("Wd", rand((c, 1, 3, 3), 3)),
             init("Bd", rand(c, 4)), init("W2", rand((4, c, 1, 1), 5)), init("W3", rand((3, 4, 1, 1), 6))]
    model = make_model([node("Conv", ["x", "W0"], ["a"], name="first"), node("Relu", ["a"], ["b"], name="relu0"),
                        node("Conv", ["b", "Wd", "Bd"], ["d"], name="dw", group=c),
                        node("Clip", ["d", "lo", "hi"], ["e"], name="relu6"),
                        node("Conv", ["e", "W2"], ["f"], name="project"),
                        node("Conv", ["f", "W3"], ["y"], name="last")],
                       [vi("x", ["batch", 2, 6, 6])], [vi("y", ["batch", 3, 4, 4])],
                       inits + [init("lo", 0.0), init("hi", 6.0)])
    model = onnx.shape_inference.infer_shapes(model)
    out, st, _ = prune(model, "prune(pattern=structured,sparsity=0.25,keep_first_last=false,exclude=project;last)")
    w = weights(out)
    dw = next(n for n in out.graph.node if n.name == "dw")
    assert w[dw.input[1]].shape == (6, 1, 3, 3) and w[dw.input[2]].shape == (6,)
    assert next(a.i for a in dw.attribute if a.name == "group") == 6
    assert weight_of(out, "project").shape == (4, 6, 1, 1) and weight_of(out, "first").shape == (6, 2, 1, 1)
    removed = np.argsort(np.sqrt((weights(model)["W0"].reshape(c, -1).astype(np.float64) ** 2).sum(1)),
                         kind="stable")[:2]
    reference = zero_channels(model, "W0", "B0", removed)  # no bias on W0: zero weights only
    feed = random_feed(model, seed=4, dims={"batch": 2})
    np.testing.assert_allclose(run_model(out, feed)["y"], run_model(reference, feed)["y"], rtol=1e-4, atol=1e-4)
    assert st["channels_removed"] == 2


def test_zero_sparsity_with_calibration_changes_nothing():
    model = mlp()
    graph_before = model.SerializeToString()
    result = onnxopt.optimize(model, "prune(sparsity=0.0,keep_first_last=false)", calibration={"x": rand((16, 16), 1)},
                              inputs=[random_feed(model)])
    assert result.records[0].modified is False and result.validation.identical
    assert model.SerializeToString() == graph_before


def test_auto_stops_at_the_tolerance():
    model = mlp()
    out, st, _ = prune(model, "prune(sparsity=auto,target=0.9,tolerance=0.05,keep_first_last=false)",
                       calibration={"x": rand((64, 16), 9)})
    assert st["target_reached"] == 0 and st["weights_zeroed"] < 0.9 * 832
    for pair in st["auto_ratios"].split(";"):
        assert 0.0 <= float(pair.split("=")[1]) <= 0.95


def test_structured_follows_a_decomposed_gelu_that_branches_and_merges():
    # MatMul -> Add(bias) -> x * 0.5 * (1 + erf(x / sqrt 2)) -> MatMul, as exporters write GELU
    inits = [init("W1", rand((8, 16), 1)), init("b1", rand(16, 2)), init("W2", rand((16, 8), 3)),
             init("sqrt2", np.float32(np.sqrt(2))), init("one", np.float32(1.0)), init("half", np.float32(0.5))]
    model = make_model([node("MatMul", ["x", "W1"], ["m"], name="fc1"), node("Add", ["m", "b1"], ["h"], name="bias"),
                        node("Div", ["h", "sqrt2"], ["d"], name="div"), node("Erf", ["d"], ["e"], name="erf"),
                        node("Add", ["e", "one"], ["p"], name="plus"), node("Mul", ["h", "p"], ["q"], name="mul"),
                        node("Mul", ["q", "half"], ["g"], name="halve"), node("MatMul", ["g", "W2"], ["y"], name="fc2")],
                       [vi("x", ["batch", 2, 8])], [vi("y", ["batch", 2, 8])], inits)
    out, st, _ = prune(model, "prune(pattern=structured,sparsity=0.25,keep_first_last=false,exclude=fc2)")
    assert weight_of(out, "fc1").shape == (8, 12) and weight_of(out, "fc2").shape == (12, 8)
    assert st["channels_removed"] == 4 and st["layers_pruned"] == 1
    removed = np.argsort(np.sqrt((weights(model)["W1"].astype(np.float64) ** 2).sum(0)), kind="stable")[:4]
    reference = zero_channels(model, "W1", "__none__", removed, axis=1)
    feed = random_feed(model, seed=5, dims={"batch": 3})
    np.testing.assert_allclose(run_model(out, feed)["y"], run_model(reference, feed)["y"], rtol=1e-4, atol=1e-4)


def test_structured_skips_a_merge_with_an_outside_value():
    inits = [init("W1", rand((8, 8), 1)), init("W2", rand((8, 8), 3))]
    model = make_model([node("MatMul", ["x", "W1"], ["m"], name="fc1"), node("Relu", ["m"], ["r"], name="relu"),
                        node("Mul", ["r", "x"], ["g"], name="gate"), node("MatMul", ["g", "W2"], ["y"], name="fc2")],
                       [vi("x", ["batch", 8])], [vi("y", ["batch", 8])], inits)
    out, st = run_pass_direct(model, "prune", pattern="structured", keep_first_last=False, exclude=["fc2"])
    assert st.modified is False and st.stats["skipped_structured_residual"] == 1


def test_row_scope_prunes_the_same_share_of_every_output():
    """scope=row: each output row (MatMul column, Gemm transB row, Conv filter) loses round(s*K) weights."""
    model = mlp()
    out, st, _ = prune(model, "prune(sparsity=0.5,scope=row,keep_first_last=false,reconstruct=false)")
    w1, w2, w3 = (weight_of(out, n) for n in ("fc1", "fc2", "fc3"))
    assert all(count_zeros(w1[:, j]) == 8 for j in range(w1.shape[1]))  # MatMul W[K, N]: outputs are columns
    assert all(count_zeros(w2[i]) == 16 for i in range(w2.shape[0]))  # Gemm transB=1: outputs are rows
    assert all(count_zeros(w3[:, j]) == 4 for j in range(w3.shape[1]))
    dense = weights(model)["W1"]
    for j in range(w1.shape[1]):  # the smallest of each output were removed
        kept = w1[:, j] != 0
        assert np.abs(dense[~kept, j]).max() <= np.abs(dense[kept, j]).min()
    assert st["weights_zeroed"] == 16 * 32 // 2 + 8 * 32 // 2 + 8 * 8 // 2
    with pytest.raises(onnxopt.InputError, match="scope=row does not apply"):
        onnxopt.optimize(model, "prune(pattern=2:4,scope=row)")


# ----------------------------------------------------------------- wanda as published

def wanda_reference(w_nk: np.ndarray, x: np.ndarray, sparsity: float) -> np.ndarray:
    """Sun et al. 2023: keep-mask from |W_ij|·‖X_j‖₂, the round(s·K) lowest of every output row dropped."""
    score = np.abs(w_nk.astype(np.float64)) * np.linalg.norm(x.astype(np.float64), axis=0)[None, :]
    keep = np.ones(w_nk.shape, bool)
    np.put_along_axis(keep, np.argsort(score, axis=1, kind="stable")[:, :round(sparsity * w_nk.shape[1])], False, 1)
    return keep


def two_gemms(k=24, h=20, n=12):
    """x -> Gemm(transB) W1[h,k] + b1 -> Relu -> MatMul W2[h,n]: the second layer's input is the first's output."""
    inits = [init("W1", rand((h, k), 11)), init("b1", rand(h, 12)), init("W2", rand((h, n), 13))]
    nodes = [node("Gemm", ["x", "W1", "b1"], ["g"], name="fc1", transB=1), node("Relu", ["g"], ["r"], name="relu"),
             node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    return make_model(nodes, [vi("x", ["batch", k])], [vi("y", ["batch", n])], inits)


def test_wanda_row_is_the_published_score_on_the_dense_inputs_of_all_samples():
    """scope=row, score=wanda: the mask is exactly Wanda's, with column norms of every layer's input in the
    dense model over all the calibration samples (300: more than a batch, fewer than ``samples``)."""
    model = two_gemms()
    x = correlated(300, 24, 7)
    out, st, _ = prune(model, "prune(sparsity=0.5,scope=row,score=wanda,keep_first_last=false,reconstruct=false)",
                       feeds=[{"x": x[:16]}], calibration={"x": x})
    assert st["calibration_samples"] == 300
    w1, w2 = weights(model)["W1"], weights(model)["W2"]
    r = np.maximum(x.astype(np.float64) @ w1.T.astype(np.float64) + weights(model)["b1"], 0)  # dense input of fc2
    np.testing.assert_array_equal(weight_of(out, "fc1") != 0, wanda_reference(w1, x, 0.5))
    np.testing.assert_array_equal((weight_of(out, "fc2") != 0).T, wanda_reference(w2.T, r, 0.5))
    assert st["weights_zeroed"] == 20 * 12 + 12 * 10
    # score=wanda compares within output rows by default (scope=auto), magnitude within the layer
    default, _, _ = prune(model, "prune(sparsity=0.5,score=wanda,keep_first_last=false,reconstruct=false)",
                          feeds=[{"x": x[:16]}], calibration={"x": x})
    np.testing.assert_array_equal(weight_of(default, "fc1"), weight_of(out, "fc1"))
    layer, _, _ = prune(model, "prune(sparsity=0.5,score=wanda,scope=layer,keep_first_last=false,reconstruct=false)",
                        feeds=[{"x": x[:16]}], calibration={"x": x})
    assert not np.array_equal(weight_of(layer, "fc1") != 0, weight_of(out, "fc1") != 0)


def test_wanda_reads_at_most_samples():
    model = two_gemms()
    x = correlated(300, 24, 7)
    spec = "prune(sparsity=0.5,scope=row,score=wanda,keep_first_last=false,reconstruct=false,samples=64)"
    out, st, _ = prune(model, spec, feeds=[{"x": x[:16]}], calibration={"x": x})
    assert st["calibration_samples"] == 64
    np.testing.assert_array_equal(weight_of(out, "fc1") != 0, wanda_reference(weights(model)["W1"], x[:64], 0.5))


def dead_input_layer():
    """A MatMul [8, 6] whose calibration inputs 0, 1, 2 and 5 are zero on every sample."""
    k, n = 8, 6
    w = rand((k, n), 21)
    model = make_model([node("MatMul", ["x", "W"], ["y"], name="fc")], [vi("x", ["batch", k])],
                       [vi("y", ["batch", n])], [init("W", w)])
    x = correlated(64, k, 3)
    dead = np.array([0, 1, 2, 5])
    x[:, dead] = 0
    return k, n, w, model, x, dead


def test_wanda_ranks_weights_of_inputs_dead_on_the_calibration_data_by_magnitude():
    """Inputs that are zero on every calibration sample carry no evidence: their weights rank below every
    live input's and, among themselves, by |W| (not by position), for row, layer and 2:4 groups alike."""
    k, n, w, model, x, dead = dead_input_layer()
    feeds = [{"x": correlated(8, k, 4)}]  # test inputs where the dead columns are not zero
    base = "prune(keep_first_last=false,score=wanda,reconstruct=false,"
    out, st, _ = prune(model, base + "sparsity=0.25,scope=row)", feeds=feeds, calibration={"x": x})
    got = weight_of(out, "fc") != 0
    for j in range(n):  # 2 of each output column go: the two dead inputs with the smallest |W|
        order = dead[np.argsort(np.abs(w[dead, j]), kind="stable")]
        assert set(np.flatnonzero(~got[:, j])) == set(order[:2]), j
    out, st, _ = prune(model, base + "sparsity=0.25,scope=layer)", feeds=feeds, calibration={"x": x})
    got = weight_of(out, "fc") != 0
    cells = sorted(((i, j) for i in dead for j in range(n)), key=lambda c: abs(w[c]))  # 24 dead weights
    assert set(zip(*np.nonzero(~got))) == set(cells[:12])  # round(0.25 * 48) go: the 12 smallest of them
    out, st, _ = prune(model, base.replace("score=wanda,", "score=wanda,pattern=2:4,") + "sparsity=0.5)",
                       feeds=feeds, calibration={"x": x})
    got = weight_of(out, "fc") != 0
    for j in range(n):  # group 0..3 has 3 dead inputs: keeps input 3 and the dead one with the largest |W|
        assert got[3, j] and got[[0, 1, 2], j].sum() == 1 and got[np.argmax(np.abs(w[:3, j])), j], j
        # group 4..7 has one dead input (5): it goes with the live one of the smallest score
        assert not got[5, j] and got[4:8, j].sum() == 2


# ----------------------------------------------------------------- obs (SparseGPT's saliency)

def obs_reference(w_nk: np.ndarray, x: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Frantar & Alistarh 2023: w_ij² / [(XᵀX + λI)⁻¹]_jj, λ = damp x the mean diagonal of XᵀX."""
    x = x.astype(np.float64)
    h = x.T @ x
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    return w_nk.astype(np.float64) ** 2 / np.diag(np.linalg.inv(h))[None, :]


def drop_lowest_per_row(score: np.ndarray, drop: int) -> np.ndarray:
    keep = np.ones(score.shape, bool)
    np.put_along_axis(keep, np.argsort(score, axis=1, kind="stable")[:, :drop], False, 1)
    return keep


def test_obs_mask_is_the_sparsegpt_saliency_on_the_dense_inputs():
    """score=obs: per output row, per layer (its default group), and in 2:4 groups along K, the weights
    kept are exactly those of the highest w²/[H⁻¹]_jj, H the dense model's XᵀX of each layer plus the ridge."""
    model = two_gemms()
    x = correlated(300, 24, 7)
    w1, w2 = weights(model)["W1"], weights(model)["W2"]
    r = np.maximum(x.astype(np.float64) @ w1.T.astype(np.float64) + weights(model)["b1"], 0)  # dense input of fc2
    s1, s2 = obs_reference(w1, x), obs_reference(w2.T, r)
    assert not np.array_equal(drop_lowest_per_row(s1, 12), drop_lowest_per_row(np.abs(w1), 12))  # not magnitude
    assert not np.array_equal(drop_lowest_per_row(s1, 12), wanda_reference(w1, x, 0.5))  # nor wanda
    base = "prune(sparsity=0.5,score=obs,keep_first_last=false,reconstruct=false"
    kw = dict(feeds=[{"x": x[:16]}], calibration={"x": x})

    out, st, _ = prune(model, base + ",scope=row)", **kw)
    np.testing.assert_array_equal(weight_of(out, "fc1") != 0, drop_lowest_per_row(s1, 12))
    np.testing.assert_array_equal((weight_of(out, "fc2") != 0).T, drop_lowest_per_row(s2, 10))
    assert st["weights_zeroed"] == 20 * 12 + 12 * 10 and st["skipped_no_activations"] == 0

    out, st, _ = prune(model, base + ")", **kw)  # scope=auto: layer, one group as SparseGPT's shared threshold
    for got, s in ((weight_of(out, "fc1") != 0, s1), ((weight_of(out, "fc2") != 0).T, s2)):
        keep = np.ones(s.size, bool)
        keep[np.argsort(s, axis=None, kind="stable")[:s.size // 2]] = False
        np.testing.assert_array_equal(got, keep.reshape(s.shape))
    assert not np.array_equal(weight_of(out, "fc1") != 0, drop_lowest_per_row(s1, 12))

    out, st, _ = prune(model, base.replace("sparsity=0.5", "pattern=2:4") + ")", **kw)
    for got, s in ((weight_of(out, "fc1") != 0, s1), ((weight_of(out, "fc2") != 0).T, s2)):
        groups = s.reshape(-1, 4)
        want = np.zeros(groups.shape, bool)
        np.put_along_axis(want, np.argsort(-groups, axis=1, kind="stable")[:, :2], True, 1)
        np.testing.assert_array_equal(got, want.reshape(s.shape))


def test_obs_with_reconstruction_beats_magnitude_with_reconstruction():
    """Inputs of uneven scale and strong correlation: the OBS mask leaves a refit with less output error than
    the magnitude mask (2 layers, 60% and 2:4)."""
    model = two_gemms()
    calib = {"x": correlated(512, 24, 1)}
    test = {"x": correlated(128, 24, 2)}
    ref = run_model(model, test)["y"]

    def err(spec):
        out, st, _ = prune(model, spec, feeds=[test], calibration=calib)
        assert st["layers_reconstructed"] == 2
        return float(np.linalg.norm(run_model(out, test)["y"] - ref) / np.linalg.norm(ref))

    for extra in ("sparsity=0.6", "pattern=2:4"):
        base = f"prune(keep_first_last=false,reconstruct=true,{extra}"
        magnitude, obs = err(base + ")"), err(base + ",score=obs)")
        assert obs < 0.9 * magnitude, (extra, obs, magnitude)


def test_obs_ranks_weights_of_inputs_dead_on_the_calibration_data_first_by_magnitude():
    k, n, w, model, x, dead = dead_input_layer()
    out, st, _ = prune(model, "prune(keep_first_last=false,score=obs,reconstruct=false,sparsity=0.25)",
                       feeds=[{"x": correlated(8, k, 4)}], calibration={"x": x})
    got = weight_of(out, "fc") != 0
    cells = sorted(((i, j) for i in dead for j in range(n)), key=lambda c: abs(w[c]))  # 24 dead weights
    assert set(zip(*np.nonzero(~got))) == set(cells[:12])  # round(0.25 * 48) go: the 12 smallest of them


def test_refit_ridge_pulls_towards_the_dense_weights():
    """The refit's ridge is towards the dense weights: an output row that loses no weight keeps its weights
    exactly (one pass, where its target is its own dense output); one that does is re-solved."""
    w = rand((16, 8), 31)
    w[:, :4] *= 10  # the 6 smallest weights all lie in columns 4..7 (output rows of the matrix W[N, K])
    model = make_model([node("MatMul", ["x", "W"], ["y"], name="fc")], [vi("x", ["batch", 16])],
                       [vi("y", ["batch", 8])], [init("W", w)])
    out, st, _ = prune(model, "prune(keep_first_last=false,sparsity=0.05,reconstruct=true,sequential=false)",
                       calibration={"x": correlated(128, 16, 5)})
    got = weight_of(out, "fc")
    assert st["layers_reconstructed"] == 1 and count_zeros(got) == round(0.05 * 128)
    untouched = np.all(got != 0, axis=0)
    assert untouched[:4].all() and not untouched.all()
    np.testing.assert_allclose(got[:, untouched], w[:, untouched], rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[:, ~untouched], np.where(got[:, ~untouched] == 0, 0, w[:, ~untouched]), atol=1e-4)


# ----------------------------------------------------------------- sparsity over all prunable weights

def masked_like(model: onnx.ModelProto, pruned: onnx.ModelProto) -> onnx.ModelProto:
    """The original with every weight zeroed where the pruned model's is: the model its masks describe."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for n in model.graph.node:
        if n.op_type in ("Conv", "MatMul", "Gemm"):
            zero = weight_of(pruned, n.name) == 0
            for i in copy.graph.initializer:
                if i.name == n.input[1]:
                    i.CopyFrom(numpy_helper.from_array(np.where(zero, 0, numpy_helper.to_array(i)), i.name))
    return copy


def layer_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {n.name: weight_of(model, n.name) for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")}


DIGITS_PRUNABLE = 64 * 300 + 300 * 100 + 100 * 10  # 50,200: the first layer holds 38%, the last 2%


@pytest.mark.parametrize("spec", ["sparsity=0.5", "sparsity=0.5,scope=row", "sparsity=0.5,scope=global",
                                  "sparsity=0.3,scope=global,global_norm=none", "sparsity=auto,target=0.5"])
def test_sparsity_holds_over_all_prunable_weights_of_the_digits_mlp(spec):
    model = onnx.load("models/digits_mlp.onnx")
    data = np.load("models/digits_test.npz")
    feed = {"input": data["input"][:64]}
    calib = {"input": np.load("models/digits_calib.npz")["input"][:128]} if "auto" in spec else None
    out, st, _ = prune(model, f"prune({spec},reconstruct=false)", feeds=[feed], calibration=calib)
    requested = 0.5 if "auto" in spec else float(spec.split(",")[0].split("=")[1])
    zeros = sum(count_zeros(w) for w in layer_weights(out).values())
    slack = 3 if "auto" in spec else 0  # auto rounds each layer's ratio
    assert abs(zeros - round(requested * DIGITS_PRUNABLE)) <= slack
    assert count_zeros(weight_of(out, "/1/Gemm")) == 0 and count_zeros(weight_of(out, "/5/Gemm")) == 0
    assert st["weights_total"] == DIGITS_PRUNABLE and st["weights_zeroed"] == zeros
    assert st["sparsity_requested"] == requested and st["sparsity_achieved"] == round(zeros / DIGITS_PRUNABLE, 4)
    assert st["target_reached"] == 1
    assert {r["layer"]: r["pruned"] for r in st["layers"]} == {"/1/Gemm": 0, "/3/Gemm": zeros, "/5/Gemm": 0}
    # the rewritten model computes what its masks say (no reconstruction: survivors unchanged)
    np.testing.assert_allclose(run_model(out, feed)["logits"], run_model(masked_like(model, out), feed)["logits"],
                               rtol=1e-5, atol=1e-5)


def test_row_scope_spreads_the_budget_evenly_over_rows():
    model = mlp()  # fc2 alone prunes (Gemm transB: 8 output rows of 32); 0.2 * 832 = 166 of its 256
    out, st, _ = prune(model, "prune(sparsity=0.2,scope=row,reconstruct=false)")
    per_row = (weight_of(out, "fc2") == 0).sum(axis=1)
    assert sorted(per_row.tolist()) == [20, 20] + [21] * 6
    assert st["target_reached"] == 1


def test_global_scope_stops_a_layer_at_its_cap_and_moves_on():
    # raw magnitudes: fc3's weights are 100x smaller, so one threshold would take all of them first
    model = mlp()
    for i in model.graph.initializer:
        if i.name == "W3":
            i.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(i) * 0.01, "W3"))
    out, st, _ = prune(model, "prune(sparsity=0.5,scope=global,global_norm=none,keep_first_last=false,reconstruct=false)")
    zeros = {n: count_zeros(w) for n, w in layer_weights(out).items()}
    assert zeros["fc3"] == 60  # 0.95 of 64
    assert sum(zeros.values()) == 416 and st["target_reached"] == 1
    with pytest.raises(onnxopt.InputError, match="max_layer_sparsity must be in"):
        onnxopt.optimize(model, "prune(max_layer_sparsity=1)")


def test_nm_fixes_the_ratio_and_reports_the_overall_figure():
    model = mlp()
    out, st, result = prune(model, "prune(pattern=2:4,reconstruct=false)")
    assert count_zeros(weight_of(out, "fc2")) == 128 and st["sparsity_requested"] == 0.5
    assert st["sparsity_achieved"] == round(128 / 832, 4) and st["target_reached"] == 0
    assert "pattern=2:4 zeroes half of each pruned layer" in result.records[0].notes[0]
    with pytest.raises(onnxopt.InputError, match="fixes the sparsity of every pruned layer at 0.5"):
        onnxopt.optimize(model, "prune(pattern=2:4,sparsity=0.7)")


def test_structured_sparsity_counts_the_weights_the_graph_loses():
    model = onnx.load("models/digits_mlp.onnx")
    feed = {"input": np.load("models/digits_test.npz")["input"][:32]}
    out, st, _ = prune(model, "prune(pattern=structured,sparsity=0.5)", feeds=[feed])
    left = sum(w.size for w in layer_weights(out).values())
    # /3/Gemm's outputs go (300 weights each) and /5/Gemm's inputs with them (10 each)
    assert st["weights_zeroed"] == DIGITS_PRUNABLE - left
    assert abs(st["weights_zeroed"] - 0.5 * DIGITS_PRUNABLE) <= 310
    assert st["channels_removed"] == round(0.5 * DIGITS_PRUNABLE / 310)
    assert weight_of(out, "/3/Gemm").shape[0] == 100 - st["channels_removed"]


def test_spread_fills_layers_up_to_their_caps_and_rounds_by_largest_remainder():
    from onnxopt.passes.prune.masks import spread

    assert spread([100, 100, 10], [95, 95, 9], 150) == [72, 71, 7]  # 71.4, 71.4, 7.1: the first tie takes the one
    assert spread([100, 100, 10], [95, 95, 9], 195) == [93, 93, 9]  # the small layer full, the others share the rest
    assert spread([100, 100, 10], [95, 95, 9], 500) == [95, 95, 9]  # more than the caps hold: the caps
    assert spread([100, 0], [95, 0], 10) == [10, 0]


def test_channel_drops_meet_the_request_to_within_one_channel():
    from onnxopt.passes.prune.masks import ChannelPlan, channel_drops, removed_weights

    # four layers of 10 channels x 10 weights: one ratio moves all four at once (120 or 160 for 150)
    plans = [ChannelPlan(10, 9, [f"w{i}"]) for i in range(4)]
    sizes = {f"w{i}": 100 for i in range(4)}
    drops = channel_drops(plans, sizes, 150)
    assert sorted(drops) == [3, 4, 4, 4] and removed_weights(plans, sizes, drops) == 150
    assert channel_drops(plans, sizes, 10_000) == [9, 9, 9, 9]  # the caps
    # a consumer loses its input columns with the producer's channels: 10 + 5 weights a channel
    plans = [ChannelPlan(10, 9, ["a"], ["b"])]
    assert channel_drops(plans, {"a": 100, "b": 50}, 44) == [3]  # 45, nearer than 30


def test_an_integer_model_has_no_prunable_weight_and_reaches_no_target():
    """A dynamically quantized layer (MatMulInteger over int8 weights): nothing to prune, the
    graph is left as it was, and the stats do not claim the requested sparsity was reached."""
    rng = np.random.default_rng(2)
    model = make_model(
        [node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
         node("MatMulInteger", ["xq", "wq", "xz"], ["acc"]), node("Cast", ["acc"], ["accf"], to=FLOAT),
         node("Mul", ["accf", "xs"], ["y"])],
        [vi("x", [4, 16])], [vi("y", [4, 8])], [init("wq", rng.integers(-100, 100, (16, 8)), np.int8)])
    out, st = run_pass_direct(model, "prune", sparsity=0.3, keep_first_last=False)
    assert st.modified is False and st.stats["weights_total"] == 0
    assert st.stats["target_reached"] == 0 and "no prunable weight" in st.notes[0]
    feed = random_feed(model)
    np.testing.assert_array_equal(run_model(out, feed)["y"], run_model(model, feed)["y"])


def test_a_tied_weight_sums_its_readers_statistics_in_one_matrix(monkeypatch):
    """Wanda on a weight read by three steps of an unrolled recurrence: the readers' inputs add
    into one XᵀX (not one K×K matrix per step) and the scores use their sum."""
    import onnxopt.calibrate as C

    k = 16
    model = make_model([node("MatMul", ["x", "W"], ["a"], name="m1"), node("Tanh", ["a"], ["t1"]),
                        node("MatMul", ["t1", "W"], ["b"], name="m2"), node("Tanh", ["b"], ["t2"]),
                        node("MatMul", ["t2", "W"], ["y"], name="m3")],
                       [vi("x", ["batch", k])], [vi("y", ["batch", k])], [init("W", rand((k, k), 1) * 0.5)])
    feeds = [random_feed(model, seed=s) for s in range(3)]
    made: list[C.GramStats] = []
    original = C.GramStats.__init__
    monkeypatch.setattr(C.GramStats, "__init__", lambda self, n: made.append(self) or original(self, n))
    out, st, _ = prune(model, "prune(sparsity=0.5,keep_first_last=false,score=wanda,reconstruct=false)",
                       feeds=feeds, calibration=feeds)
    assert st["layers_pruned"] == 1 and count_zeros(weight_of(out, "m3")) == k * k // 2
    pooled = [g for g in made if g.rows]
    x = np.concatenate([f["x"] for f in feeds])
    assert len(pooled) == 1 and pooled[0].rows == 3 * len(x)  # the rows of all three readers
    t1 = np.tanh(x @ numpy_helper.to_array(model.graph.initializer[0]))
    t2 = np.tanh(t1 @ numpy_helper.to_array(model.graph.initializer[0]))
    inputs = np.concatenate([x, t1, t2]).astype(np.float64)
    np.testing.assert_allclose(pooled[0].gram, inputs.T @ inputs, rtol=1e-4)


def test_sequential_refits_stop_at_their_time_budget(monkeypatch):
    """Past SEQUENTIAL_BUDGET_S the remaining layers refit on the dense model's inputs: with no
    budget at all the result is exactly sequential=false's, counted and noted."""
    prune_module = __import__("onnxopt.passes.prune", fromlist=["prune"])
    model = conv_chain()
    base = rand((20, 3, 6, 6), 3)
    mixed = np.einsum("nchw,cd->ndhw", base, rand((3, 8), 4)).astype(np.float32)
    calib, test = {"x": mixed[:16]}, {"x": mixed[16:]}
    plain, _, _ = prune(model, "prune(sparsity=0.5,keep_first_last=false,sequential=false)", feeds=[test],
                        calibration=calib)
    monkeypatch.setattr(prune_module, "SEQUENTIAL_BUDGET_S", 0.0)
    out, st, result = prune(model, "prune(sparsity=0.5,keep_first_last=false)", feeds=[test], calibration=calib)
    assert st["skipped_sequential_budget"] == 1 and st["layers_reconstructed"] == 2
    assert any("sequential refits stopped" in n for n in result.records[0].notes)
    for name, w in weights(plain).items():
        np.testing.assert_array_equal(weights(out)[name], w)


def test_conjugate_gradient_refits_stop_at_their_flop_budget(monkeypatch):
    """A wide layer with an ill-conditioned XᵀX (fewer rows than inputs): under a tiny budget the
    solve runs CG_MIN_ITER iterations, and what it returns already fits better than the pruned
    weights it started from."""
    rec = __import__("onnxopt.passes.prune.reconstruction", fromlist=["reconstruction"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 64))
    gram = x.T @ x
    w = rng.standard_normal((8, 64))
    keep = rng.random((8, 64)) > 0.5
    full = rec._cg_solve(w, keep, gram, 1e-3, gram)
    ten = rec._cg_solve(w, keep, gram, 1e-3, gram, max_iter=rec.CG_MIN_ITER)
    monkeypatch.setattr(rec, "CG_FLOPS", 1.0)
    capped = rec._cg_solve(w, keep, gram, 1e-3, gram)
    np.testing.assert_array_equal(capped, ten)
    assert not np.allclose(capped, full)  # the full solve needed more iterations

    def loss(v):
        return float(np.linalg.norm(x @ v.T - x @ w.T))

    assert np.all(capped[~keep] == 0) and loss(full) <= loss(capped) < loss(w * keep)


def test_refits_stop_at_their_time_budget(monkeypatch):
    """Past RECONSTRUCT_BUDGET_S the remaining layers keep their pruned weights unrefit, counted and
    noted; with no budget at all every layer does."""
    prune_module = __import__("onnxopt.passes.prune", fromlist=["prune"])
    model = conv_chain()
    data = {"x": rand((8, 8, 6, 6), 3)}
    monkeypatch.setattr(prune_module, "RECONSTRUCT_BUDGET_S", 0.0)
    out, st, result = prune(model, "prune(sparsity=0.5,keep_first_last=false,bias_correction=false)", feeds=[data],
                            calibration=data)
    assert st["layers_reconstructed"] == 0 and st["skipped_reconstruct_budget"] == 2
    assert any("least-squares refits stopped" in n for n in result.records[0].notes)
    for name in ("conva", "convb"):
        w, dense = weight_of(out, name), weight_of(model, name)
        np.testing.assert_array_equal(w[w != 0], dense[w != 0])  # survivors as they were


def test_only_prunes_the_named_layers_at_their_own_ratio():
    """only= names the layers pruned; the sparsity is theirs alone (the others are outside the budget),
    and keep_first_last does not apply to a layer named there."""
    model = mlp()  # fc1 512 weights, fc2 256, fc3 64
    out, st, result = prune(model, "prune(sparsity=0.5,reconstruct=false,only=fc1)")
    assert count_zeros(weight_of(out, "fc1")) == 256  # half of fc1, the first layer
    assert count_zeros(weight_of(out, "fc2")) == 0 and count_zeros(weight_of(out, "fc3")) == 0
    assert st["skipped_excluded"] == 2 and st["layers_pruned"] == 1
    assert "only=fc1" in result.pipeline
