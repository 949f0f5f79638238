"""Merging nodes into fewer: sibling MatMul/Gemm, MatMul+Add into Gemm, consecutive Slices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt.options import option
from onnxopt.pipeline import Pass, PassContext, PassResult, register_pass

_DEFAULT_DOMAINS = ("", "ai.onnx")
_FLOATS = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64))


@dataclass
class MergeOptions:
    siblings: bool = option(False, help="MatMul/Gemm nodes reading one input with constant weights -> one node + Split")
    min_siblings: int = option(2, help="merge only groups of at least this many")
    gemm: bool = option(True, help="2-D MatMul followed by a constant bias Add -> Gemm")
    slices: bool = option(True, help="Slice of a Slice along other axes -> one Slice")


@register_pass
class Merge(Pass):
    """Merge nodes that can run as one. Exact within float rounding.

    - ``siblings``: MatMul nodes (or Gemm nodes with equal attributes) that read the same
      input, each with its own constant 2-D weight read by nothing else, become one
      MatMul/Gemm over the concatenated weights followed by a Split into the original
      outputs (attention Q/K/V). A constant bias Add after each MatMul is merged too.
      Off by default: ONNX Runtime on CPU runs the merged form no faster, and up to ~20-40%
      slower once activations are large (the Split copies the whole product;
      ``tools/bench_merge.py`` measures it); ``siblings=true`` trades that for fewer nodes.
      (``sibling_groups``, ``sibling_nodes``; groups mixing weight dtypes or contraction
      sizes: ``skipped_siblings``.)
    - ``gemm``: MatMul of a 2-D input and a 2-D constant weight whose only reader is an
      Add of a constant bias broadcastable to the output's rows becomes Gemm (``gemms_made``).
    - ``slices``: a Slice whose input is another Slice's output along different axes, with
      constant starts/ends/axes/steps, becomes one Slice when every reader of the inner
      Slice can merge (``slices_merged``).

    Only the default domain, opset 11 and above (optional Gemm bias, Slice sizes as inputs);
    older models are left alone (``skipped_opset``).
    """

    name = "merge"
    Options = MergeOptions
    leaves_dangling = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats = {"sibling_groups": 0, "sibling_nodes": 0, "skipped_siblings": 0, "gemms_made": 0,
                 "slices_merged": 0, "skipped_opset": 0}
        opset = ctx.opset or graph.opset or 0
        if opset < 11:
            stats["skipped_opset"] = 1
            return PassResult(False, stats)
        names = G.Names(graph)
        for g in G.iter_graphs(graph, functions=False):
            if self.options.slices:
                _merge_slices(g, names, stats)
            if self.options.siblings:
                _merge_siblings(g, names, stats, max(2, self.options.min_siblings), opset)
            if self.options.gemm:
                _matmul_add_to_gemm(g, names, stats)
        modified = any(stats[k] for k in ("sibling_groups", "gemms_made", "slices_merged"))
        return PassResult(modified, stats)


def _default(node: gs.Node) -> bool:
    return (node.domain or "") in _DEFAULT_DOMAINS


def _only_reader(tensor: gs.Tensor, graph: gs.Graph) -> Optional[gs.Node]:
    readers = list(tensor.outputs)
    if len(readers) != 1 or G.positions(graph.outputs, tensor):
        return None
    return readers[0]


def _weight(tensor: gs.Tensor, graph: gs.Graph) -> Optional[np.ndarray]:
    """A 2-D float constant that only one node reads (merging it then moves it, never copies it)."""
    if len(tensor.outputs) != 1 or G.positions(graph.outputs, tensor):
        return None
    value = G.const_value(tensor, vars(graph).get("initializer_inputs") or ())
    if value is None or value.ndim != 2 or value.dtype not in _FLOATS:
        return None
    return value


# ----------------------------------------------------------------- siblings

def _merge_siblings(graph: gs.Graph, names: G.Names, stats: dict, least: int, opset: int) -> None:
    groups: dict[tuple, list[gs.Node]] = {}
    for node in graph.nodes:
        key = _sibling_key(node, graph)
        if key is not None:
            groups.setdefault(key, []).append(node)
    for key, nodes in groups.items():
        if len(nodes) < least:
            continue
        weights = [_weight(n.inputs[1], graph) for n in nodes]
        trans_b = key[1] == "Gemm" and key[2][1]
        inner = [w.shape[1] if trans_b else w.shape[0] for w in weights]
        if len({w.dtype for w in weights}) != 1 or len(set(inner)) != 1:
            stats["skipped_siblings"] += 1
            continue
        _merge_group(graph, nodes, weights, trans_b, names, opset)
        stats["sibling_groups"] += 1
        stats["sibling_nodes"] += len(nodes)


def _sibling_key(node: gs.Node, graph: gs.Graph) -> Optional[tuple]:
    if not _default(node) or node.op not in ("MatMul", "Gemm") or len(node.outputs) != 1:
        return None
    if _weight(node.inputs[1], graph) is None:
        return None
    if node.op == "MatMul":
        return (id(node.inputs[0]), "MatMul", ())
    attrs = node.attrs
    if attrs.get("transA", 0):
        return None
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if bias is not None:
        value = G.const_value(bias)
        if value is None or value.ndim != 1:
            return None  # a scalar or 2-D bias does not split per output column
    return (id(node.inputs[0]), "Gemm",
            (float(attrs.get("alpha", 1.0)), int(attrs.get("transB", 0)), float(attrs.get("beta", 1.0)),
             bias is not None))


def _bias_after(node: gs.Node, graph: gs.Graph, width: int) -> Optional[tuple[gs.Node, np.ndarray]]:
    """The Add of a constant [width] bias that is the MatMul's only reader."""
    add = _only_reader(node.outputs[0], graph)
    if add is None or add.op != "Add" or not _default(add):
        return None
    other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
    value = G.const_value(other)
    if value is None or value.shape != (width,):
        return None
    return add, value


def _merge_group(graph: gs.Graph, nodes: list[gs.Node], weights: list[np.ndarray], trans_b: bool,
                 names: G.Names, opset: int) -> None:
    first = nodes[0]
    widths = [w.shape[0] if trans_b else w.shape[1] for w in weights]
    merged_w = np.concatenate(weights, axis=0 if trans_b else 1)
    base = first.outputs[0].name
    inputs = [first.inputs[0], G.new_constant(graph, names, f"{base}_merged_weight", merged_w)]
    outputs = [n.outputs[0] for n in nodes]
    tail: list[gs.Node] = []
    if first.op == "Gemm" and len(first.inputs) > 2 and first.inputs[2].name:
        biases = [G.const_value(n.inputs[2]) for n in nodes]
        merged_b = np.concatenate(biases).astype(merged_w.dtype)
        inputs.append(G.new_constant(graph, names, f"{base}_merged_bias", merged_b))
    elif first.op == "MatMul":
        adds = [_bias_after(n, graph, w) for n, w in zip(nodes, widths)]
        if all(a is not None and a[1].dtype == merged_w.dtype for a in adds):
            outputs = [a[0].outputs[0] for a in adds]
            tail = [a[0] for a in adds]
            bias = G.new_constant(graph, names, f"{base}_merged_bias", np.concatenate([a[1] for a in adds]))
    product = gs.Variable(names.fresh(f"{base}_merged"), dtype=first.outputs[0].dtype)
    made = [gs.Node(first.op, names.fresh(f"{first.name or base}_merged"), dict(first.attrs), inputs, [product])]
    split_input = product
    if tail:
        biased = gs.Variable(names.fresh(f"{base}_merged_biased"), dtype=product.dtype)
        made.append(gs.Node("Add", names.fresh(f"{base}_merged_add"), {}, [product, bias], [biased]))
        split_input = biased
    split_inputs: list[gs.Tensor] = [split_input]
    split_attrs: dict = {"axis": -1}
    if opset >= 13:  # sizes are an input from opset 13, an attribute before
        sizes = np.asarray(widths, dtype=np.int64)
        split_inputs.append(G.new_constant(graph, names, f"{base}_split_sizes", sizes))
    else:
        split_attrs["split"] = list(widths)
    at = min(G.positions(graph.nodes, n)[0] for n in nodes)
    G.remove_nodes(graph, nodes + tail)  # detaches the outputs from their old producers
    made.append(gs.Node("Split", names.fresh(f"{base}_split"), split_attrs, split_inputs, outputs))
    graph.nodes[at:at] = made


# ----------------------------------------------------------------- MatMul + Add -> Gemm

def _matmul_add_to_gemm(graph: gs.Graph, names: G.Names, stats: dict) -> None:
    for node in list(graph.nodes):
        if node.op != "MatMul" or not _default(node) or not node.outputs or _rank(node.inputs[0], graph) != 2:
            continue
        weight = _weight(node.inputs[1], graph)
        if weight is None:
            continue
        found = _bias_after(node, graph, weight.shape[1])
        if found is None or found[1].dtype != weight.dtype:
            continue
        add, bias = found
        other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
        result = add.outputs[0]
        G.remove_node(graph, add)
        node.op = "Gemm"
        node.inputs.append(other)
        node.outputs.clear()
        node.outputs.append(result)
        stats["gemms_made"] += 1


def _rank(tensor: gs.Tensor, graph: gs.Graph) -> Optional[int]:
    """The rank of a value: a graph input's (ORT enforces it), or read off its Reshape/Flatten/Gemm
    producer. Declared ranks of other values are not trusted: exporters get them wrong."""
    if G.positions(graph.inputs, tensor) and tensor.shape is not None:
        return len(tensor.shape)
    maker = G.producer(tensor)
    if maker is None or not _default(maker):
        return None
    if maker.op in ("Flatten", "Gemm"):
        return 2
    if maker.op == "Reshape" and len(maker.inputs) > 1:
        target = G.const_value(maker.inputs[1])
        return None if target is None else int(target.size)
    return None


# ----------------------------------------------------------------- Slices

def _slice_parts(node: gs.Node) -> Optional[dict[int, tuple[int, int, int]]]:
    """axis -> (start, end, step) of a Slice with constant, non-negative axes."""
    if node.op != "Slice" or not _default(node) or len(node.inputs) < 3:
        return None
    values = [G.const_value(t) if t.name else None for t in node.inputs[1:5]]
    starts, ends = values[0], values[1]
    if starts is None or ends is None:
        return None
    axes = values[2] if len(values) > 2 and values[2] is not None else np.arange(len(starts))
    if len(values) > 2 and node.inputs[3].name and values[2] is None:
        return None
    steps = values[3] if len(values) > 3 and values[3] is not None else np.ones(len(starts), np.int64)
    if len(values) > 3 and node.inputs[4].name and values[3] is None:
        return None
    if any(int(a) < 0 for a in axes) or len(set(int(a) for a in axes)) != len(axes):
        return None
    return {int(a): (int(s), int(e), int(p)) for a, s, e, p in zip(axes, starts, ends, steps)}


def _merge_slices(graph: gs.Graph, names: G.Names, stats: dict) -> None:
    for inner in list(graph.nodes):
        inner_parts = _slice_parts(inner)
        if inner_parts is None or not inner.outputs or G.positions(graph.outputs, inner.outputs[0]):
            continue
        readers = list(inner.outputs[0].outputs)
        outer_parts = [_slice_parts(r) for r in readers]
        if not readers or any(p is None or set(p) & set(inner_parts) or r.inputs[0] is not inner.outputs[0]
                              for r, p in zip(readers, outer_parts)):
            continue
        for reader, parts in zip(readers, outer_parts):
            both = {**inner_parts, **parts}
            axes = sorted(both)
            arrays = [np.asarray([both[a][i] for a in axes], dtype=np.int64) for i in range(3)]
            base = reader.outputs[0].name
            reader.inputs.clear()
            reader.inputs.extend([inner.inputs[0],
                                  G.new_constant(graph, names, f"{base}_starts", arrays[0]),
                                  G.new_constant(graph, names, f"{base}_ends", arrays[1]),
                                  G.new_constant(graph, names, f"{base}_axes", np.asarray(axes, dtype=np.int64)),
                                  G.new_constant(graph, names, f"{base}_steps", arrays[2])])
            stats["slices_merged"] += 1
