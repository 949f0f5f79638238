"""fold: walking scopes in dependency order, and static shapes from onnx shape inference."""

from __future__ import annotations

import math

import onnx
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt.io import iter_graph_protos
from onnxopt.pipeline import PassContext

_LOOP_OPS = {"Loop", "Scan"}
_DEFAULT_DOMAINS = ("", "ai.onnx")


def _scopes(graph: gs.Graph) -> list[tuple[gs.Graph, set[int]]]:
    """Every graph (no function bodies), outer before inner, with the ids of values made inside
    an enclosing Loop/Scan body (their shapes may change from one iteration to the next)."""
    found: list[tuple[gs.Graph, set[int]]] = []

    def visit(g: gs.Graph, loop_local: set[int]) -> None:
        found.append((g, loop_local))
        for node in g.nodes:
            for sub in G.subgraphs_of(node):
                inner = loop_local | _defined(sub) if node.op in _LOOP_OPS else loop_local
                visit(sub, inner)

    visit(graph, set())
    return found


def _defined(graph: gs.Graph) -> set[int]:
    """Ids of values a graph and its nested graphs take as inputs or make."""
    ids = set()
    for g in G.iter_graphs(graph, functions=False):
        ids.update(id(t) for t in g.inputs)
        for node in g.nodes:
            ids.update(id(t) for t in node.outputs)
    return ids


def _topo(nodes: list[gs.Node]) -> list[gs.Node]:
    """Nodes in dependency order (the given order when already sorted); nodes in cycles last."""
    made = {id(t): i for i, n in enumerate(nodes) for t in n.outputs}
    waiting = [0] * len(nodes)
    users: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        deps = {made[id(t)] for t in node.inputs if id(t) in made and made[id(t)] != i}
        waiting[i] = len(deps)
        for d in deps:
            users.setdefault(d, []).append(i)
    ready = [i for i in range(len(nodes)) if waiting[i] == 0]
    ready.reverse()
    order = []
    while ready:
        i = ready.pop()
        order.append(i)
        for u in reversed(users.get(i, [])):
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    placed = set(order)
    order += [i for i in range(len(nodes)) if i not in placed]
    return [nodes[i] for i in order]


def _fresh(taken: set[str], base: str) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def _infer_shapes(graph: gs.Graph, domains: dict[str, int], ctx: PassContext) -> dict[str, list]:
    """Name -> dims (int, or None when unknown) from onnx shape inference with data propagation.

    Declared shapes of graph outputs and value_info are dropped first: exporters get
    them wrong. Large initializers become graph inputs (their shapes are all that
    inference needs) so the model stays small.
    """
    template = onnx.helper.make_model(onnx.helper.make_graph([], "t", [], []),
                                      opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in domains.items()])
    try:
        model = G.export_model(graph, template)
        for g in iter_graph_protos(model.graph):
            del g.value_info[:]
            for out in g.output:
                if out.type.HasField("tensor_type"):
                    out.type.tensor_type.ClearField("shape")
            for n in g.node:  # loop-carried values change shape: trust no declared body input shape
                if n.op_type in _LOOP_OPS and (n.domain or "") in _DEFAULT_DOMAINS:
                    for attr in n.attribute:
                        for vi in (attr.g.input if attr.HasField("g") else []):
                            if vi.type.HasField("tensor_type"):
                                vi.type.tensor_type.ClearField("shape")
        top = model.graph
        kept = []
        for init in top.initializer:
            if init.data_type == onnx.TensorProto.INT64 and _elements(init) <= 4096:
                kept.append(init)
            else:
                top.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        del top.initializer[:]
        top.initializer.extend(kept)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - no static shapes then
        ctx.log.debug("fold: shape inference failed: %s", exc)
        return {}
    shapes: dict[str, list] = {}
    for g in iter_graph_protos(inferred.graph):
        for vi in [*g.input, *g.value_info, *g.output]:
            t = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
            if t is None or not t.HasField("shape"):
                continue
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                               for d in t.shape.dim]
    return shapes


def _elements(init: onnx.TensorProto) -> int:
    return math.prod(init.dims)

