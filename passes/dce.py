"""Dead-node elimination."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt.options import option
from onnxopt.pipeline import Pass, PassContext, PassResult, register_pass


@dataclass
class DceOptions:
    identities: bool = option(True, help="also remove Identity nodes, reconnecting their consumers")


@register_pass
class DeadNodeElimination(Pass):
    """Remove nodes, initializers, functions and Identity chains that no output depends on. Exact.

    Works in every scope: If/Loop/Scan bodies are cleaned first, then the
    values they read from the outer scope keep their producers alive. Graph
    inputs and outputs, their names and types never change. Identity nodes
    whose output is a graph output stay when removing them would rename an
    input or another output; those are counted in ``identities_kept``.
    """

    name = "dce"
    Options = DceOptions

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats = {"nodes_removed": 0, "identities_removed": 0, "identities_kept": 0,
                 "initializers_removed": 0, "functions_removed": 0}
        consts_before = len(G.constants(graph))
        for g in _inner_first(graph):
            if self.options.identities:
                _drop_identities(g, stats)
            stats["nodes_removed"] += _drop_dead(g)
        stats["functions_removed"] = _drop_unused_functions(graph)
        unread = vars(graph).get("unread_initializers", [])
        stats["initializers_removed"] = consts_before - len(G.constants(graph)) + len(unread)
        graph.unread_initializers = []  # reported once
        modified = any(v for k, v in stats.items() if k != "identities_kept")
        return PassResult(modified, stats)


def _inner_first(graph: gs.Graph) -> list[gs.Graph]:
    """Subgraphs before the graphs that hold them, so outer liveness sees cleaned bodies."""
    order: list[gs.Graph] = []

    def visit(g: gs.Graph) -> None:
        for node in g.nodes:
            for sub in G.subgraphs_of(node):
                visit(sub)
        order.append(g)

    visit(graph)
    for func in getattr(graph, "functions", []):
        visit(func)
    return order


def _drop_identities(graph: gs.Graph, stats: dict) -> None:
    for node in [n for n in graph.nodes if n.op == "Identity" and (n.domain or "") in ("", "ai.onnx")]:
        if G.bypass(graph, node):
            stats["identities_removed"] += 1
        else:
            stats["identities_kept"] += 1


def _drop_dead(graph: gs.Graph) -> int:
    """Keep only nodes some graph output depends on, directly or through a subgraph's reads."""
    live: set[int] = set()
    owner = {id(out): node for node in graph.nodes for out in node.outputs}
    work = list(graph.outputs)
    seen: set[int] = set()
    while work:
        tensor = work.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        node = owner.get(id(tensor))
        if node is None or id(node) in live:
            continue
        live.add(id(node))
        work.extend(node.inputs)
        for sub in G.subgraphs_of(node):
            work.extend(G.outer_reads(sub))
    dead = [n for n in graph.nodes if id(n) not in live]
    G.remove_nodes(graph, dead)
    return len(dead)


def _drop_unused_functions(graph: gs.Graph) -> int:
    functions = list(getattr(graph, "functions", []))
    if not functions:
        return 0
    by_key = {(f.domain, f.name): f for f in functions}
    used: set[tuple[str, str]] = set()
    work = [graph]
    while work:
        g = work.pop()
        for sub in G.iter_graphs(g, functions=False):
            for node in sub.nodes:
                key = (node.domain or "", node.op)
                if key in by_key and key not in used:
                    used.add(key)
                    work.append(by_key[key])
    keep = [f for f in functions if (f.domain, f.name) in used]
    graph.functions = keep
    return len(functions) - len(keep)
