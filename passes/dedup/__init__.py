"""Deduplication: merge identical constants and identical nodes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt.options import option
from onnxopt.pipeline import Pass, PassContext, PassResult, register_pass

from .entries import _ConstEntry, _lonely_shapes, _NodeEntry, _Scope
from .keys import _attr_key, _same_bytes, _Unhashable
from .ops import (
    _DEFAULT_DOMAINS,
    _NONDETERMINISTIC,
    _domain,
    _function_kinds,
    _ops_with_dropped_attributes,
    _random_dropout,
    _topological,
)


@dataclass
class DedupOptions:
    constants: bool = option(True, help="merge byte-identical initializers and Constant-node values")
    nodes: bool = option(True, help="merge nodes computing the same thing (common-subexpression elimination)")
    domains: list[str] = option(factory=lambda: ["com.microsoft"], help="op domains besides the ONNX ones whose nodes may be merged (others merge only when they call a model-local function made of mergeable ops)")


@register_pass
class Dedup(Pass):
    """Merge byte-identical constants and identical nodes (common-subexpression elimination). Exact.

    Constants: initializers and Constant-node values with the same element type, shape and bytes
    (hashed, then compared byte for byte) become one tensor that every consumer reads; an
    initializer is kept over a Constant node. Initializers are merged across all scopes (a
    subgraph may read any outer value); a Constant node is merged into an identical value
    visible from its scope (its own or an enclosing one, made before it).

    Nodes: a node with the same op, domain, attributes (values compared exactly, tensor
    attributes by bytes) and the very same input values as an earlier node visible from its
    scope is dropped, its consumers reading the kept node's outputs. Nodes are visited in
    topological order, so chains of duplicates collapse in one run; a subgraph node may reuse an
    outer node made before the node holding the subgraph.

    Never merged (each count is one duplicate left in place): random ops, Dropout in training
    mode, ops with side effects and functions holding them (``skipped_nondeterministic``); ops of
    domains other than ONNX's and ``domains``, unless they call a model-local function made of
    mergeable ops (``skipped_custom_domain``); ops whose attributes the graph importer drops, e.g.
    Optional (``skipped_unsupported``); nodes holding subgraphs (their bodies are deduplicated
    inside). When a duplicate's output is a graph output, the kept node's output takes over its
    name and declared type if it can (same scope, not an output itself); otherwise both stay
    (``kept_graph_io``, also counted for constants that are graph outputs).

    Merged Constant nodes and duplicate nodes are removed; ``bytes_saved`` counts the bytes of the
    constants merged away.
    """

    name = "dedup"
    Options = DedupOptions
    leaves_dangling = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        self.stats = {"constants_merged": 0, "bytes_saved": 0, "nodes_merged": 0,
                      "skipped_nondeterministic": 0, "skipped_custom_domain": 0, "skipped_unsupported": 0,
                      "kept_graph_io": 0}
        self.renamed = 0
        self.allowed = _DEFAULT_DOMAINS | {_domain(d) for d in self.options.domains}
        self.functions = _function_kinds(graph, self.allowed)
        self.digests: dict[int, tuple] = {}
        self.lonely = _lonely_shapes(graph)
        # Where each value is a graph output, every scope: id(tensor) -> [(graph, index)].
        self.out_slots: dict[int, list[tuple[gs.Graph, int]]] = {}
        for g in G.iter_graphs(graph):
            for i, t in enumerate(g.outputs):
                self.out_slots.setdefault(id(t), []).append((g, i))

        root = _Scope(None, graph)
        if self.options.constants:
            self._merge_initializers(graph, root)
        self._walk(graph, root)
        for func in getattr(graph, "functions", []):
            self._walk(func, _Scope(None, func))
        modified = bool(self.stats["constants_merged"] or self.stats["nodes_merged"] or self.renamed)
        # The per-run tables reference the graph's tensors: a pipeline keeps its pass objects,
        # and must not keep the graph (and the model it came from) alive with them.
        self.digests = self.out_slots = self.functions = self.lonely = None
        return PassResult(modified, dict(self.stats))

    # ------------------------------------------------------------- constants

    def _merge_initializers(self, graph: gs.Graph, root: "_Scope") -> None:
        """Initializers (gs.Constant inputs) of every scope but functions: one object per value.

        gs writes a Constant into every graph whose nodes read it, so an initializer is
        visible from any scope and merging them is safe across scopes. Initializers the model
        also lists as graph inputs (``graph.initializer_inputs``) may be overridden at run time:
        they are neither merged nor kept for others.
        """
        # (vars(): gs.Graph.__getattr__ logs an error for any name it lacks)
        overridable = set(vars(graph).get("initializer_inputs") or ())
        seen: set[int] = set()
        for g in G.iter_graphs(graph, functions=False):
            candidates = [t for node in g.nodes for t in node.inputs] + list(g.outputs)
            for tensor in candidates:
                if not isinstance(tensor, gs.Constant) or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                if tuple(tensor._values.shape) in self.lonely:
                    continue  # no other constant has its shape: nothing to merge with, nothing to hash
                entry = _ConstEntry.of_tensor(tensor, self.digests)
                if entry is None:
                    continue
                if tensor.name in overridable:
                    self.stats["kept_graph_io"] += root.find(entry.key, entry.same_as)[0] is not None
                    continue
                self._merge_constant(root, entry, tensor)

    def _constant_node(self, node: gs.Node, scope: "_Scope", doomed: list[gs.Node]) -> None:
        if len(node.outputs) != 1 or not node.outputs[0].name or node.inputs:
            return
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant) and tuple(value._values.shape) in self.lonely:
            return
        entry = _ConstEntry.of_node(node, self.digests)
        if entry is None:
            return
        if self._merge_constant(scope, entry, node.outputs[0]):
            doomed.append(node)

    def _merge_constant(self, scope: "_Scope", entry: "_ConstEntry", tensor: gs.Tensor) -> bool:
        """Point the readers of ``tensor`` at an equal constant already kept in ``scope``.
        False when it is kept instead: the first of its value, or a graph output."""
        kept, _ = scope.find(entry.key, entry.same_as)
        if kept is None:
            scope.add(entry.key, entry.trimmed())
            return False
        if id(tensor) in self.out_slots:
            self.stats["kept_graph_io"] += 1
            return False
        for consumer in list(tensor.outputs):
            G.rewire_input(consumer, tensor, kept.tensor)
        self.stats["constants_merged"] += 1
        self.stats["bytes_saved"] += entry.nbytes
        return True

    # ------------------------------------------------------------- nodes

    def _walk(self, g: gs.Graph, parent: "_Scope") -> None:
        scope = parent if parent.graph is g else _Scope(parent, g)
        doomed: list[gs.Node] = []
        for node in _topological(g):
            if node.op == "Constant" and _domain(node.domain) == "":
                if self.options.constants:
                    self._constant_node(node, scope, doomed)
                continue
            subgraphs = G.subgraphs_of(node)
            if subgraphs:
                for sub in subgraphs:
                    self._walk(sub, scope)
                continue
            if self.options.nodes:
                self._cse(g, node, scope, doomed)
        if doomed:
            G.remove_nodes(g, doomed)

    def _cse(self, g: gs.Graph, node: gs.Node, scope: "_Scope", doomed: list[gs.Node]) -> None:
        if not node.outputs or not any(t.name for t in node.outputs):
            return
        tensors: list[gs.Constant] = []
        try:
            attrs = tuple(sorted((k, _attr_key(v, tensors, self.digests)) for k, v in node.attrs.items()))
        except _Unhashable:
            return
        domain = _domain(node.domain)
        key = ("node", domain, node.op, attrs,
               tuple(id(t) if t.name else None for t in node.inputs),
               tuple(bool(t.name) for t in node.outputs))

        def same(entry: "_NodeEntry") -> bool:
            return all(_same_bytes(a, b) for a, b in zip(tensors, entry.tensors))

        kept, where = scope.find(key, same)
        if kept is None:
            scope.add(key, _NodeEntry(node, tensors))
            return
        reason = self._cannot_merge(node, domain)
        if reason:
            self.stats[reason] += 1
            return
        if not self._take_over_outputs(g, node, kept.node, where.graph is g):
            self.stats["kept_graph_io"] += 1
            return
        for dup, keep in zip(node.outputs, kept.node.outputs):
            if dup.name:
                for consumer in list(dup.outputs):
                    G.rewire_input(consumer, dup, keep)
        doomed.append(node)
        self.stats["nodes_merged"] += 1

    def _cannot_merge(self, node: gs.Node, domain: str) -> Optional[str]:
        kind = self.functions.get((domain, node.op))
        if (domain, node.op) in _NONDETERMINISTIC or _random_dropout(node, domain) or kind == "random":
            return "skipped_nondeterministic"
        if kind != "pure" and (kind is not None or domain not in self.allowed):
            return "skipped_custom_domain"
        if (domain, node.op) in _ops_with_dropped_attributes():
            return "skipped_unsupported"
        return None

    def _take_over_outputs(self, g: gs.Graph, dup: gs.Node, keep: gs.Node, same_scope: bool) -> bool:
        """Where ``dup``'s outputs are graph outputs, hand their names to ``keep``'s outputs.

        Only done when every such output is an output of ``dup``'s own graph once, the kept
        node lives in that graph, and its output is no graph output itself; else nothing changes.
        """
        moves = []
        for d_out, k_out in zip(dup.outputs, keep.outputs):
            slots = self.out_slots.get(id(d_out), []) if d_out.name else []
            if not slots:
                continue
            if (len(slots) != 1 or slots[0][0] is not g or not same_scope
                    or id(k_out) in self.out_slots):
                return False
            moves.append((d_out, k_out, slots[0][1]))
        for d_out, k_out, idx in moves:
            name = d_out.name
            d_out.name = f"{name}__dedup_dropped"
            k_out.name, k_out.dtype, k_out.shape = name, d_out.dtype, d_out.shape
            g.outputs[idx] = k_out
            self.out_slots[id(k_out)] = self.out_slots.pop(id(d_out))
            self.renamed += 1
        return True
