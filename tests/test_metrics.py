"""Output kinds read from small hand-built graphs, the figures each kind gets, perplexity, KV-cache names."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt import metrics as M
from onnxopt.data import Dataset
from onnxopt.pipeline import Tolerance
from onnxopt.report import format_comparison, format_inspect, inspect_model
from onnxopt.validate import compare

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in dict(inits).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def classifier(scale: float = 1.0) -> onnx.ModelProto:
    """x [n, 8] -> Gemm -> logits [n, 4]."""
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32) * scale
    return _model([helper.make_node("Gemm", ["x", "w"], ["logits"])],
                  [helper.make_tensor_value_info("x", F, ["n", 8])],
                  [helper.make_tensor_value_info("logits", F, ["n", 4])], {"w": w})


def ctc(noise: float = 0.0) -> onnx.ModelProto:
    """x [time, batch, 6] -> MatMul -> LogSoftmax over 5 classes: a CTC head laid out [T, B, C]."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    w = w + noise * rng.standard_normal(w.shape).astype(np.float32)
    return _model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("LogSoftmax", ["h"], ["y"], axis=-1)],
                  [helper.make_tensor_value_info("x", F, ["time", "batch", 6])],
                  [helper.make_tensor_value_info("y", F, ["time", "batch", 5])], {"w": w})


def embedder(shift: float = 0.0) -> onnx.ModelProto:
    """x [n, tokens, 16] -> ReduceMean over tokens -> divided by its L2 norm: a sentence embedding."""
    nodes = [helper.make_node("Add", ["x", "s"], ["xs"]),
             helper.make_node("ReduceMean", ["xs"], ["pooled"], axes=[1], keepdims=0),
             helper.make_node("ReduceL2", ["pooled"], ["norm"], axes=[1], keepdims=1),
             helper.make_node("Div", ["pooled", "norm"], ["vec"])]
    s = np.linspace(0, shift, 16, dtype=np.float32)
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["n", "tokens", 16])],
                  [helper.make_tensor_value_info("vec", F, ["n", 16])], {"s": s})


def detector() -> onnx.ModelProto:
    """x [n, 8, 10]: boxes (first 4 rows) concatenated with Sigmoid class scores, as YOLO heads do."""
    nodes = [helper.make_node("Split", ["x", "split"], ["box", "cls"], axis=1),
             helper.make_node("Sigmoid", ["cls"], ["p"]),
             helper.make_node("Concat", ["box", "p"], ["out"], axis=1)]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["n", 8, 10])],
                  [helper.make_tensor_value_info("out", F, ["n", 8, 10])], {"split": np.array([4, 4], np.int64)})


def tiny_lm(table: np.ndarray) -> onnx.ModelProto:
    """logits[b, t] = table[input_ids[b, t]] + attention_mask[b, t] (a shift softmax ignores), with one
    layer of KV cache passed through: past_key_values.0.key/value in, present.0.key/value out."""
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["g"]),
             helper.make_node("Cast", ["attention_mask"], ["mf"], to=F),
             helper.make_node("Unsqueeze", ["mf", "axis"], ["mu"]),
             helper.make_node("Add", ["g", "mu"], ["logits"]),
             helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"]),
             helper.make_node("Identity", ["past_key_values.0.value"], ["present.0.value"])]
    v = table.shape[0]
    cache = ["batch", 2, "past", 4]
    inputs = [helper.make_tensor_value_info("input_ids", I64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", I64, ["batch", "seq"]),
              helper.make_tensor_value_info("past_key_values.0.key", F, cache),
              helper.make_tensor_value_info("past_key_values.0.value", F, cache)]
    outputs = [helper.make_tensor_value_info("logits", F, ["batch", "seq", v]),
               helper.make_tensor_value_info("present.0.key", F, cache),
               helper.make_tensor_value_info("present.0.value", F, cache)]
    return _model(nodes, inputs, outputs, {"table": table.astype(np.float32), "axis": np.array([-1], np.int64)})


def _feeds(shape, batches=2, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(batches)]


# ----------------------------------------------------------------- kinds from the graph

def test_kinds_from_small_graphs():
    assert M.detect(classifier())["logits"].kind == "classes"
    seq = M.detect(ctc())["y"]
    assert (seq.kind, seq.class_axis, seq.batch_axis) == ("sequence", -1, 1)
    assert "LogSoftmax" in seq.reason
    emb = M.detect(embedder())["vec"]
    assert emb.kind == "embedding" and "norm" in emb.reason
    box = M.detect(detector())["out"]
    assert box.kind == "other" and "Concat" in box.reason
    dynamic = _model([helper.make_node("MatMulInteger", ["q", "w"], ["i"]), helper.make_node("Cast", ["i"], ["f"], to=F),
                      helper.make_node("Mul", ["f", "scale"], ["scores"])],
                     [helper.make_tensor_value_info("q", TensorProto.UINT8, ["n", 8]),
                      helper.make_tensor_value_info("scale", F, [1])],
                     [helper.make_tensor_value_info("scores", F, ["n", 4])], {"w": np.ones((8, 4), np.uint8)})
    assert "MatMulInteger" in M.detect(dynamic)["scores"].reason  # dynamic quantization's computed scale
    lm = M.detect(tiny_lm(np.zeros((7, 7))))
    assert lm["logits"].kind == "lm" and "7 classes" in lm["logits"].reason
    assert lm["present.0.key"].kind == "other" and "KV cache (layer 0, key)" in lm["present.0.key"].reason


def test_a_graph_that_says_nothing_is_decided_by_the_data():
    kind = M.OutputKind("y", decided_by="none")
    probs = np.full((3, 4), 0.25, np.float32)
    assert M.refine(kind, probs, 3, None).kind == "classes"
    vectors = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert M.refine(M.OutputKind("y", decided_by="none"), unit, 3, None).kind == "embedding"
    plain = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert M.refine(M.OutputKind("y", decided_by="none"), plain, 3, None).kind == "other"
    # [T, B, C] found by the batch size when the dim names say nothing
    seq = M.OutputKind("y", kind="sequence", batch_axis=0)
    assert M.refine(seq, np.zeros((7, 2, 5), np.float32), 2, None).batch_axis == 1


# ----------------------------------------------------------------- figures per kind

def test_sequence_agreement_per_position_and_per_sequence_match_numpy():
    feeds = _feeds((9, 3, 6), batches=2)
    data = Dataset(feeds, source="test", samples=6)
    result = compare(ctc(), ctc(noise=0.3), data, Tolerance(min_cosine=0))
    m = result.outputs[0]
    assert m.kind == "sequence"
    ref = [onnxopt.validate.make_session(ctc(), "all").run(None, f)[0] for f in feeds]
    cand = [onnxopt.validate.make_session(ctc(noise=0.3), "all").run(None, f)[0] for f in feeds]
    same = np.concatenate([(r.argmax(-1) == c.argmax(-1)).T for r, c in zip(ref, cand)])  # [samples, T]
    assert m.top1_agreement == pytest.approx(same.mean())
    assert m.sequence_match == pytest.approx(same.all(axis=1).mean())
    assert 0 < m.top1_agreement < 1
    text = "\n".join(format_comparison(result))
    assert "per-position top-1 agreement" in text and "sequence match" in text
    assert "y sequence (made by LogSoftmax)" in text


def test_embedding_gets_cosine_and_never_top1():
    data = Dataset(_feeds((4, 5, 16)), labels=np.arange(8) % 16, source="test", samples=8)
    result = compare(embedder(), embedder(shift=0.5), data, Tolerance(min_cosine=0))
    m = result.outputs[0]
    assert m.kind == "embedding" and m.top1_agreement is None and m.accuracy_reference is None
    assert 0.5 < m.vector_cosine_min <= m.vector_cosine_mean < 1
    text = "\n".join(format_comparison(result))
    assert "top-1" not in text and "accuracy" not in text and "per-vector cosine mean" in text


def test_output_kind_override_and_its_errors():
    data = Dataset(_feeds((4, 5, 16)), source="test", samples=8)
    result = compare(embedder(), embedder(shift=0.5), data, Tolerance(), output_kinds={"vec": "classes"})
    m = result.outputs[0]
    assert m.kind == "classes" and m.top1_agreement is not None and m.kind_reason == "set by the user"
    with pytest.raises(onnxopt.InputError, match="not an output of the model; its outputs: vec"):
        compare(embedder(), embedder(), data, Tolerance(), output_kinds={"emb": "embedding"})
    with pytest.raises(onnxopt.InputError, match="is not one of: classes, sequence, lm, embedding, other"):
        compare(embedder(), embedder(), data, Tolerance(), output_kinds={"vec": "vectors"})


def test_classifier_top1_and_accuracy_as_before():
    feeds = _feeds((16, 8), batches=3)
    labels = np.random.default_rng(3).integers(0, 4, 48)
    result = compare(classifier(), classifier(scale=1.2), Dataset(feeds, labels, source="t", samples=48),
                     Tolerance(min_cosine=0.9))
    m = result.outputs[0]
    assert m.kind == "classes" and m.top1_agreement == 1.0  # a positive scale keeps every argmax
    ref = np.concatenate([f["x"] for f in feeds]) @ numpy_helper.to_array(classifier().graph.initializer[0])
    assert m.accuracy_reference == pytest.approx(np.mean(ref.argmax(1) == labels))
    assert m.sequence_match is None and m.vector_cosine_mean is None


# ----------------------------------------------------------------- perplexity

def _hand_perplexity(table: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> float:
    nll, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if not mask[b, t + 1]:
                continue
            row = table[ids[b, t]].astype(np.float64)
            nll += math.log(np.exp(row - row.max()).sum()) + row.max() - row[ids[b, t + 1]]
            count += 1
    return math.exp(nll / count)


def test_perplexity_against_a_hand_computed_value():
    rng = np.random.default_rng(5)
    vocab, n, seq = 11, 6, 7
    table = rng.standard_normal((vocab, vocab)).astype(np.float32) * 2
    worse = table + rng.standard_normal(table.shape).astype(np.float32)
    ids = rng.integers(0, vocab, (n, seq))
    mask = np.ones((n, seq), np.int64)
    mask[0, 4:] = 0  # padding: not scored
    mask[3, 5:] = 0
    cache = np.zeros((n, 2, 0, 4), np.float32)
    feeds = [{"input_ids": ids[i:i + 3], "attention_mask": mask[i:i + 3],
              "past_key_values.0.key": cache[i:i + 3], "past_key_values.0.value": cache[i:i + 3]} for i in (0, 3)]
    data = Dataset(feeds, source="t", samples=n)
    result = compare(tiny_lm(table), tiny_lm(worse), data, Tolerance(max_metric_drop={"perplexity": 1000.0}),
                     labels={"labels": ids})
    logits = result.outputs[0]
    assert logits.kind == "lm"
    assert logits.perplexity_reference == pytest.approx(_hand_perplexity(table, ids, mask), rel=1e-6)
    assert logits.perplexity_candidate == pytest.approx(_hand_perplexity(worse, ids, mask), rel=1e-6)
    (ppl,) = result.metrics
    assert ppl.name == "perplexity" and ppl.lower_is_better and ppl.passed
    assert ppl.drop == pytest.approx(logits.perplexity_candidate - logits.perplexity_reference)
    tight = compare(tiny_lm(table), tiny_lm(worse), data, Tolerance(max_metric_drop={"perplexity": 0.0}),
                    labels={"labels": ids})
    assert not tight.passed and "metric 'perplexity'" in tight.headline() and "rose" in tight.headline()
    # without labels: no perplexity, and a bound on it is a usage error
    assert compare(tiny_lm(table), tiny_lm(worse), data, Tolerance()).outputs[0].perplexity_reference is None
    with pytest.raises(onnxopt.InputError, match="max_metric_drop names 'perplexity', which was not measured"):
        compare(tiny_lm(table), tiny_lm(worse), data, Tolerance(max_metric_drop={"perplexity": 1.0}))


# ----------------------------------------------------------------- the metric hook (in process)

class Recall:
    """Streaming: keeps every batch's argmax, answers once."""

    lower_is_better = ("errors",)

    def __init__(self):
        self.hits, self.errors, self.n = 0, 0, 0

    def update(self, outputs, labels, inputs=None):
        assert inputs is not None and "x" in inputs
        top = outputs["logits"].argmax(1)
        self.hits += int(np.sum(top == labels["labels"]))
        self.errors += int(np.sum(top != labels["labels"]))
        self.n += len(top)

    def result(self):
        return {"recall": self.hits / self.n, "errors": self.errors}


def test_metric_hook_function_and_class_forms():
    feeds = _feeds((16, 8), batches=3)
    labels = np.random.default_rng(3).integers(0, 4, 48)
    data = Dataset(feeds, source="t", samples=48)
    batch_sizes = []

    def mean_top(outputs, labels):
        batch_sizes.append(len(labels["labels"]))
        return {"acc": np.mean(outputs["logits"].argmax(1) == labels["labels"])}

    result = compare(classifier(), classifier(scale=-1.0), data, Tolerance(max_metric_drop={"errors": 100}),
                     metric=Recall, labels={"labels": labels})
    values = {m.name: m for m in result.metrics}
    assert values["errors"].lower_is_better and values["errors"].drop == values["errors"].candidate - values["errors"].reference
    assert values["recall"].limit is None and values["recall"].passed
    assert values["errors"].passed and result.passed
    by_function = compare(classifier(), classifier(scale=-1.0), data, Tolerance(max_metric_drop={"*": 0.0}),
                          metric=mean_top, labels={"labels": labels})
    (acc,) = by_function.metrics
    assert acc.reference == pytest.approx(values["recall"].reference)  # the per-batch mean, sample-weighted
    assert batch_sizes == [16] * 6 and not by_function.passed


def test_metric_hook_mistakes_are_input_errors():
    data = Dataset(_feeds((4, 8)), source="t", samples=8)
    with pytest.raises(onnxopt.InputError, match=r"metric .* raised ZeroDivisionError: division by zero"):
        compare(classifier(), classifier(), data, Tolerance(), metric=lambda o, l: {"x": 1 / 0})
    with pytest.raises(onnxopt.InputError, match="returned 'x': str; expected a dict of names to numbers"):
        compare(classifier(), classifier(), data, Tolerance(), metric=lambda o, l: {"x": "high"})
    with pytest.raises(onnxopt.InputError, match="returned list"):
        compare(classifier(), classifier(), data, Tolerance(), metric=lambda o, l: [1.0])
    with pytest.raises(onnxopt.InputError, match="cannot import 'no_such_module_here'"):
        M.load_metric("no_such_module_here:f")
    with pytest.raises(onnxopt.InputError, match="expects module:function"):
        M.load_metric("justaname")
    with pytest.raises(onnxopt.InputError, match="'labels' has 3 rows for 8 samples"):
        compare(classifier(), classifier(), data, Tolerance(), labels={"labels": np.zeros(3)})


def test_tolerance_spells_metric_bounds():
    tol = Tolerance.parse("min_cosine=0.9,max_metric_drop=acc:1.5,max_metric_drop=f1:0.25")
    assert tol.max_metric_drop == {"acc": 1.5, "f1": 0.25}
    assert str(tol) == "min_cosine=0.9,max_metric_drop=acc:1.5,max_metric_drop=f1:0.25"
    assert Tolerance.parse(str(tol)) == tol
    assert Tolerance.parse("max_metric_drop=0.5").max_metric_drop == {"*": 0.5}
    assert Tolerance.parse({"max_metric_drop": {"acc": 1}}).max_metric_drop == {"acc": 1.0}
    assert tol.merged(Tolerance(max_metric_drop={"acc": 2.0})).max_metric_drop == {"acc": 2.0, "f1": 0.25}
    with pytest.raises(onnxopt.InputError, match="expected NAME:NUMBER or NUMBER"):
        Tolerance.parse("max_metric_drop=acc:lots")


# ----------------------------------------------------------------- KV cache in inspect

def test_inspect_groups_kv_cache_names(tmp_path):
    path = tmp_path / "lm.onnx"
    onnx.save(tiny_lm(np.zeros((5, 5))), path)
    info = inspect_model(path)
    (group,) = info["kv_cache"]["inputs"]
    assert group == {"pattern": "past_key_values.{layer}.{key|value}", "layers": [0], "roles": ["key", "value"],
                     "tensors": 2, "dtype": "float", "shape": ["batch", 2, "past", 4]}
    assert info["kv_cache"]["outputs"][0]["pattern"] == "present.{layer}.{key|value}"
    text = format_inspect(info)
    assert "  KV cache: past_key_values.{layer}.{key|value}: 2 tensors, layer 0, key and value; float [batch, 2, past, 4]" in text
    assert "past_key_values.0.key:" not in text and "  input_ids: int64 [batch, seq]" in text


@pytest.mark.parametrize("name,role", [
    ("past_key_values.3.key", (3, "key")), ("present.11.value", (11, "value")), ("past.2", (2, "key+value")),
    ("past_value_4", (4, "value")), ("key_cache.1", (1, "key")), ("past_sequence_length", None),
    ("input_ids", None), ("pastry_1", None)])
def test_kv_roles(name, role):
    assert M.kv_role(name) == role
