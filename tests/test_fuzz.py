"""Fuzz tier: mutated models and data files through the CLI; every case must end in exit 0, 1 or 2.

A case fails on exit 3 (internal error), a traceback, a hang, an output file left after a
failure (or an unreadable one after success), a temporary left behind, or a modified input.
The default run takes a short seeded slice of each kind; ``pytest -m fuzz`` runs
ONNXOPT_FUZZ_CASES cases per kind (default 500). Every case is seeded by its id: a failure
names the case, and ``pytest tests/test_fuzz.py -k 'structural and 123'`` reruns it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io as _io
import os
import pickle
import random
import shutil
import signal
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.cli import main

pytestmark = pytest.mark.fuzz

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
DEFAULT_SLICE = 4       # cases per kind in the default run
CASE_TIMEOUT = 120      # seconds before a case counts as a hang
KINDS = ("bytes_shipped", "bytes_subgraph", "structural", "data")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    markexpr = metafunc.config.getoption("markexpr", "") or ""
    full = "fuzz" in markexpr and "not fuzz" not in markexpr
    count = int(os.environ.get("ONNXOPT_FUZZ_CASES", 500 if full else DEFAULT_SLICE))
    metafunc.parametrize("case", range(count))


# ----------------------------------------------------------------- base models

def subgraph_model() -> onnx.ModelProto:
    """x[batch,4] -> If(sum>0: x+c, else x-c) -> Loop(3: v*0.5+1) -> custom.Scale (a local function) -> y."""
    c = numpy_helper.from_array(np.arange(4, dtype=np.float32), "c")
    then_g = helper.make_graph([helper.make_node("Add", ["x", "c"], ["t_out"], name="then_add")], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, ["batch", 4])])
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "c"], ["e_out"], name="else_sub")], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, ["batch", 4])])
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    body = helper.make_graph(
        [helper.make_node("Mul", ["v_in", "half"], ["v_half"], name="body_mul"),
         helper.make_node("Add", ["v_half", "one"], ["v_out"], name="body_add"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["batch", 4])], [half, one])
    scale = helper.make_function(
        "custom", "Scale", ["a"], ["b"],
        [helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
         helper.make_node("Mul", ["a", "two"], ["b"])],
        [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"], name="positive"),
             helper.make_node("If", ["cond"], ["branch"], name="if", then_branch=then_g, else_branch=else_g),
             helper.make_node("Loop", ["trips", "true", "branch"], ["looped"], name="loop", body=body),
             helper.make_node("Scale", ["looped"], ["y"], name="scale", domain="custom")]
    inits = [c, numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(3, np.int64), "trips"),
             numpy_helper.from_array(np.array(True), "true")]
    graph = helper.make_graph(nodes, "subgraphs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)],
                              functions=[scale], producer_name="fuzz")
    model.ir_version = 8
    return model


def _base_models() -> dict[str, bytes]:
    return {"cnn": (MODELS / "digits_cnn.onnx").read_bytes(), "mlp": (MODELS / "digits_mlp.onnx").read_bytes(),
            "subgraphs": subgraph_model().SerializeToString()}


BASES = _base_models()
PIPELINES = ["cleanup", "cleanup", "fold,noop,dedup,dce", "qdq(samples=32)", "prune(sparsity=0.5)",
             "svd(rank_ratio=0.5)"]


# ----------------------------------------------------------------- running a case

class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def run_case(tmp: Path, argv: list[str], watched: list[Path], output: Path | None) -> tuple[int, str]:
    """Run the CLI in-process; assert the invariants every case must keep. Returns (code, stderr)."""
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in watched if p.is_file()}
    listing = set(os.listdir(tmp))
    out, err = _io.StringIO(), _io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_TIMEOUT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as exc:  # argparse
                code = exc.code
    except Hang:
        pytest.fail(f"hang (> {CASE_TIMEOUT} s): {argv}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    text = err.getvalue()
    where = f"{argv}\nstderr: {text[-2000:]}"
    assert code in (0, 1, 2), where
    assert "Traceback" not in text and "internal error" not in text, where
    errors = [line for line in text.splitlines() if line.startswith("onnxopt: error:")]
    if code == 2:
        assert len(errors) == 1, where
    elif code == 1:
        assert errors, where
    for path, digest in before.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"input modified: {path}\n{where}"
    left = set(os.listdir(tmp)) - listing
    assert not [n for n in left if n.startswith(".onnxopt-")], f"temporary left: {left}\n{where}"
    if output is not None:
        if code == 0:
            onnx.load(str(output))  # a whole model
        else:
            assert not output.exists(), f"output written on exit {code}\n{where}"
    return code, text


def optimize_argv(model: Path, output: Path, rng: random.Random, calib: Path | None = None) -> list:
    argv = ["optimize", model, "-o", output, "--latency-runs", "0", "--passes", rng.choice(PIPELINES)]
    if calib is not None:
        argv += ["--calib", calib]
    if rng.random() < 0.2:
        argv.append("--verify-each")
    return argv


# ----------------------------------------------------------------- byte mutations

def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        kind = rng.random()
        pos = rng.randrange(len(b))
        if kind < 0.5:
            b[pos] = rng.randrange(256)
        elif kind < 0.75:
            b[pos] ^= 1 << rng.randrange(8)
        elif kind < 0.85:
            del b[pos:pos + rng.randint(1, 8)]
        elif kind < 0.95:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            b[pos:pos + 4] = rng.choice([b"\xff\xff\xff\x7f", b"\x00\x00\x00\x00", b"\x80\x80\x80\x80"])
    return bytes(b)


def _bytes_case(tmp: Path, case: int, bases: list[str]) -> None:
    rng = random.Random(f"bytes-{bases}-{case}")
    name = rng.choice(bases)
    model = tmp / f"{name}.onnx"
    model.write_bytes(mutate_bytes(BASES[name], rng))
    output = tmp / "out.onnx"
    if rng.random() < 0.15:
        run_case(tmp, ["inspect", model] + (["--json"] if rng.random() < 0.5 else []), [model], None)
        return
    calib = tmp / "calib.npz"
    if name != "subgraphs":
        shutil.copy(MODELS / "digits_calib.npz", calib)
    run_case(tmp, optimize_argv(model, output, rng, calib if calib.exists() else None), [model], output)


def test_bytes_shipped(tmp_path, case):
    _bytes_case(tmp_path, case, ["cnn", "mlp"])


def test_bytes_subgraph(tmp_path, case):
    _bytes_case(tmp_path, case, ["subgraphs"])


# ----------------------------------------------------------------- structural mutations

def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    out = [graph]
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                out.extend(_graphs(attr.g))
            for sub in attr.graphs:
                out.extend(_graphs(sub))
    return out


def _pick_node(model: onnx.ModelProto, rng: random.Random) -> tuple[onnx.GraphProto, int] | None:
    options = [(g, i) for g in _graphs(model.graph) for i in range(len(g.node))]
    return rng.choice(options) if options else None


def _delete_node(m, rng):
    found = _pick_node(m, rng)
    if found:
        del found[0].node[found[1]]


def _dangling_input(m, rng):
    found = _pick_node(m, rng)
    if found and found[0].node[found[1]].input:
        node = found[0].node[found[1]]
        node.input[rng.randrange(len(node.input))] = rng.choice(["missing", "", "x", "y", "input"])


def _wrong_initializer_dims(m, rng):
    inits = [t for g in _graphs(m.graph) for t in g.initializer]
    if inits:
        t = rng.choice(inits)
        dims = list(t.dims)
        choice = rng.random()
        if choice < 0.3 and dims:
            dims[rng.randrange(len(dims))] += rng.choice([-1, 1, 7])
        elif choice < 0.6:
            dims = dims + [1] if rng.random() < 0.5 else dims[1:]
        elif choice < 0.8:
            dims = [rng.choice([0, -1, 2**40])] + dims[1:]
        else:
            t.data_type = rng.choice([TensorProto.INT8, TensorProto.DOUBLE, TensorProto.STRING, TensorProto.UNDEFINED,
                                      TensorProto.FLOAT16, TensorProto.BOOL, 99])
        del t.dims[:]
        t.dims.extend(dims)


def _impossible_opset(m, rng):
    if rng.random() < 0.7 and m.opset_import:
        rng.choice(list(m.opset_import)).version = rng.choice([0, -1, 1, 5, 99, 2**40])
    elif rng.random() < 0.5:
        del m.opset_import[:]
    else:
        m.ir_version = rng.choice([0, 1, 3, 99])


def _unknown_op(m, rng):
    found = _pick_node(m, rng)
    if found:
        node = found[0].node[found[1]]
        if rng.random() < 0.5:
            node.op_type = rng.choice(["NoSuchOp", "Conv", "If", "Loop", "Scan", "MatMul", ""])
        else:
            node.domain = rng.choice(["unknown.domain", "com.microsoft", "custom", "ai.onnx.ml"])


def _renamed_output(m, rng):
    g = rng.choice(_graphs(m.graph))
    values = list(g.output) + list(g.input)
    if values:
        v = rng.choice(values)
        v.name = rng.choice(["renamed", "", "x", "c", v.name + "_2"])


def _duplicated_node(m, rng):
    found = _pick_node(m, rng)
    if found:
        g, i = found
        g.node.insert(rng.randrange(len(g.node) + 1), copy.deepcopy(g.node[i]))


def _subgraph_arity(m, rng):
    subs = [(node, attr) for g in _graphs(m.graph) for node in g.node for attr in node.attribute if attr.HasField("g")]
    if not subs:
        _delete_node(m, rng)
        return
    node, attr = rng.choice(subs)
    body = attr.g
    choice = rng.random()
    if choice < 0.3 and body.output:
        del body.output[rng.randrange(len(body.output))]
    elif choice < 0.5:
        body.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    elif choice < 0.7 and body.input:
        del body.input[rng.randrange(len(body.input))]
    elif choice < 0.85:
        body.input.append(helper.make_tensor_value_info("extra_in", TensorProto.FLOAT, [1]))
    else:
        node.input.append(node.input[-1] if node.input else "x")


def _wrong_value_type(m, rng):
    values = list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info)
    if values:
        v = rng.choice(values)
        t = v.type.tensor_type
        if rng.random() < 0.5:
            t.elem_type = rng.choice([TensorProto.INT64, TensorProto.STRING, TensorProto.FLOAT16, 0, 40])
        elif t.HasField("shape") and t.shape.dim:
            d = rng.choice(list(t.shape.dim))
            if rng.random() < 0.5:
                d.dim_value = rng.choice([0, 3, 2**31])
            else:
                d.dim_param = rng.choice(["?", "unk__12", "p2o.DynamicDimension.0", ""])
        else:
            t.ClearField("shape")


def _attribute(m, rng):
    found = _pick_node(m, rng)
    if found and found[0].node[found[1]].attribute:
        node = found[0].node[found[1]]
        attr = rng.choice(list(node.attribute))
        choice = rng.random()
        if choice < 0.4:
            node.attribute.remove(attr)
        elif choice < 0.7:
            attr.ints[:] = [rng.choice([-5, 0, 99])] * rng.randint(0, 5)
            attr.type = onnx.AttributeProto.INTS
        else:
            attr.name = rng.choice(["bogus", "axis", "perm", ""])


def _shuffle_nodes(m, rng):
    g = rng.choice(_graphs(m.graph))
    nodes = list(g.node)
    rng.shuffle(nodes)
    del g.node[:]
    g.node.extend(nodes)


def _truncate_raw(m, rng):
    tensors = [t for g in _graphs(m.graph) for t in g.initializer if t.raw_data]
    if tensors:
        t = rng.choice(tensors)
        t.raw_data = t.raw_data[: rng.randrange(len(t.raw_data) + 1)] + (b"\x00" * rng.choice([0, 0, 4]))


def _function_break(m, rng):
    if m.functions and rng.random() < 0.6:
        f = m.functions[0]
        choice = rng.random()
        if choice < 0.3:
            del f.node[:]
        elif choice < 0.6:
            f.output.append("nothing")
        else:
            del m.functions[:]
    else:
        _unknown_op(m, rng)


STRUCTURAL = [_delete_node, _dangling_input, _wrong_initializer_dims, _impossible_opset, _unknown_op,
              _renamed_output, _duplicated_node, _subgraph_arity, _wrong_value_type, _attribute,
              _shuffle_nodes, _truncate_raw, _function_break]


def test_structural(tmp_path, case):
    rng = random.Random(f"structural-{case}")
    name = rng.choice(list(BASES))
    model = onnx.ModelProto()
    model.ParseFromString(BASES[name])
    for _ in range(rng.randint(1, 3)):
        rng.choice(STRUCTURAL)(model, rng)
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    calib = None
    if name != "subgraphs":
        calib = tmp_path / "calib.npz"
        shutil.copy(MODELS / "digits_calib.npz", calib)
    run_case(tmp_path, optimize_argv(path, tmp_path / "out.onnx", rng, calib), [path], tmp_path / "out.onnx")


# ----------------------------------------------------------------- data mutations

def _mutate_array(a: np.ndarray, rng: random.Random) -> np.ndarray:
    choice = rng.randrange(12)
    a = a.copy() if a.dtype.kind == "f" or choice > 4 else a.astype(np.float32)  # labels get NaN too
    if choice == 0:
        a[...] = np.nan
    elif choice == 1:
        a.flat[rng.randrange(a.size)] = np.nan if a.dtype.kind == "f" else a.flat[0]
    elif choice == 2:
        a[...] = rng.choice([np.inf, -np.inf]) if a.dtype.kind == "f" else a
    elif choice == 3:
        return a.astype(rng.choice([np.float64, np.int32, np.int64, np.float16, np.bool_, np.uint8, np.complex64]))
    elif choice == 4:
        return (a * np.float32(3e38)).astype(a.dtype) if a.dtype.kind == "f" else a
    elif choice == 5:
        return a[:0]
    elif choice == 6:
        return a.reshape(-1)
    elif choice == 7:
        return a[..., None]
    elif choice == 8:
        return np.array([str(v) for v in a.reshape(-1)[:8]])
    elif choice == 9:
        return np.array(a.reshape(-1)[0])
    elif choice == 10:
        return a[:, :, :4] if a.ndim >= 3 else a[:1]
    return a[: rng.randint(1, 3)]


def _write_data(path: Path, arrays: dict, rng: random.Random) -> None:
    choice = rng.random()
    if choice < 0.08:
        obj = np.empty(2, dtype=object)
        obj[0], obj[1] = {"a": 1}, [1, 2]
        arrays = {**arrays, rng.choice(["input", "labels", "x"]): obj}
        np.savez(path, **arrays)
    elif choice < 0.12:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("input.npy", pickle.dumps(arrays))
    elif choice < 0.16:
        np.savez(path, **arrays)
        data = path.read_bytes()
        path.write_bytes(data[: rng.randrange(len(data))])
    elif choice < 0.2:
        np.savez(path, **{rng.choice(["images", "Input", "input.npy", "", "labels"]): v for v in arrays.values()})
    elif choice < 0.25:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("input.npy", b"\x93NUMPY" + bytes(rng.randrange(256) for _ in range(64)))
    elif choice < 0.35:
        np.savez_compressed(path, **arrays)
    else:
        np.savez(path, **arrays)


def test_data(tmp_path, case):
    rng = random.Random(f"data-{case}")
    name = rng.choice(["cnn", "mlp"])
    model = tmp_path / f"{name}.onnx"
    model.write_bytes(BASES[name])
    source = dict(np.load(MODELS / ("digits_test.npz" if rng.random() < 0.6 else "digits_calib.npz")))
    arrays = {k: v[: rng.choice([1, 4, 32])] for k, v in source.items()}
    key = rng.choice(list(arrays))
    arrays[key] = _mutate_array(arrays[key], rng)
    if rng.random() < 0.2:
        arrays[rng.choice(["extra", "labels"])] = _mutate_array(np.zeros(max(1, np.asarray(arrays["input"]).reshape(-1).size // 64), np.int64), rng)
    data = tmp_path / "data.npz"
    _write_data(data, arrays, rng)
    output = tmp_path / "out.onnx"
    use = rng.random()
    if use < 0.4:
        argv = ["optimize", model, "-o", output, "--latency-runs", "0", "--inputs", data]
    elif use < 0.8:
        argv = ["optimize", model, "-o", output, "--latency-runs", "0", "--calib", data,
                "--passes", rng.choice(["qdq(samples=32)", "prune(sparsity=0.5,score=wanda)", "svd(rank_ratio=0.5,aware=true)"])]
    else:
        argv = ["compare", model, model, "--inputs", data, "--latency-runs", "0"]
        output = None
    run_case(tmp_path, argv, [model, data], output)
