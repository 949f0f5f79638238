"""Which ops may be merged: domains, random ops, functions, and the order nodes are visited in."""

from __future__ import annotations

import functools
import heapq
from typing import Optional

import onnx
import onnx_graphsurgeon as gs

from onnxopt import graph as G

from .keys import _payload

_DEFAULT_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})

# Ops whose every run may give another result, or that act outside the graph: never merged.
_NONDETERMINISTIC = frozenset({
    ("", "RandomNormal"), ("", "RandomUniform"), ("", "RandomNormalLike"), ("", "RandomUniformLike"),
    ("", "Multinomial"), ("", "Bernoulli"),
    ("com.microsoft", "BiasDropout"), ("com.microsoft", "BitmaskDropout"),
    ("com.microsoft", "BitmaskBiasDropout"),
    ("com.microsoft", "PythonOp"), ("com.microsoft", "PythonOpGrad"), ("com.microsoft", "YieldOp"),
    ("com.microsoft", "RecordEvent"), ("com.microsoft", "WaitEvent"), ("com.microsoft", "Send"),
    ("com.microsoft", "Recv"),
})



def _domain(domain: Optional[str]) -> str:
    return "" if domain in (None, "", "ai.onnx") else domain


def _random_dropout(node: gs.Node, domain: str) -> bool:
    """Dropout in training mode (a training_mode input that is not a constant false) is random."""
    if domain != "" or node.op != "Dropout" or len(node.inputs) < 3 or not node.inputs[2].name:
        return False
    mode = node.inputs[2]
    if isinstance(mode, gs.Constant):
        values = _payload(mode)
        return values is None or values.size != 1 or bool(values.reshape(-1)[0])
    return True


@functools.lru_cache(maxsize=1)
def _ops_with_dropped_attributes() -> frozenset:
    """ONNX ops with attribute kinds onnx-graphsurgeon does not import (type protos, sparse
    tensors, lists of tensors or graphs): two such nodes may look alike when they are not."""
    dropped = {onnx.AttributeProto.TYPE_PROTO, onnx.AttributeProto.TYPE_PROTOS, onnx.AttributeProto.TENSORS,
               onnx.AttributeProto.GRAPHS, onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS}
    return frozenset((_domain(s.domain), s.name) for s in onnx.defs.get_all_schemas_with_history()
                     if any(int(a.type) in dropped for a in s.attributes.values()))


def _function_kinds(graph: gs.Graph, allowed: frozenset) -> dict:
    """(domain, name) of each model-local function -> "pure" when its body only holds mergeable
    ops, "random" when it holds (or calls a function holding) a nondeterministic op, else "unknown"."""
    functions = {(_domain(f.domain), f.name): f for f in getattr(graph, "functions", [])}
    ops = {key: [(_domain(n.domain), n.op, n) for g in G.iter_graphs(f, functions=False) for n in g.nodes]
           for key, f in functions.items()}
    kinds = {key: "unknown" for key in functions}
    for key, body in ops.items():
        if any((d, o) in _NONDETERMINISTIC or _random_dropout(n, d) for d, o, n in body):
            kinds[key] = "random"
    changed = True
    while changed:
        changed = False
        for key, body in ops.items():
            if kinds[key] != "unknown":
                continue
            called = [kinds.get((d, o)) for d, o, _ in body]
            if "random" in called:
                kinds[key] = "random"
                changed = True
            elif all(k == "pure" or (k is None and d in allowed) for k, (d, _, _) in zip(called, body)):
                kinds[key] = "pure"
                changed = True
    return kinds


def _topological(g: gs.Graph) -> list[gs.Node]:
    """The graph's nodes in topological order: as they are when sorted, else a stable sort."""
    if G.is_sorted(g):
        return list(g.nodes)
    maker = {id(t): i for i, n in enumerate(g.nodes) for t in n.outputs}
    users: list[list[int]] = [[] for _ in g.nodes]
    pending = [0] * len(g.nodes)
    for i, node in enumerate(g.nodes):
        reads = list(node.inputs)
        for sub in G.subgraphs_of(node):
            reads.extend(G.outer_reads(sub))
        deps = {maker[id(t)] for t in reads if id(t) in maker} - {i}
        pending[i] = len(deps)
        for d in deps:
            users[d].append(i)
    ready = [i for i in range(len(g.nodes)) if pending[i] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(g.nodes[i])
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    return order if len(order) == len(g.nodes) else list(g.nodes)
