"""The weights prune works on: each weight tensor with the layers that read it (onnxopt.layers
finds them), seen as one matrix W[out, in], and the calibration statistics of their inputs
(onnxopt.calibrate)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt import layers as L
from onnxopt.calibrate import GramRequest, cross_grams, input_layout, layer_grams

_LAYOUTS = {"conv": "conv", "convtranspose": "convtranspose", "matmul": "kn", "gemm_t": "nk"}


@dataclass
class _Use:
    node: gs.Node
    graph: gs.Graph
    top: bool  # in the top-level graph (activations can be read)


@dataclass
class _Unit:
    """One weight tensor and the targeted nodes that read it, seen as a matrix W[O, K]."""

    const: gs.Constant
    holder: Optional[gs.Node]  # Constant node holding the value, or None for an initializer
    tensor: gs.Tensor  # what the layer nodes read (the Constant, or the holder's output)
    uses: list[_Use]
    kind: str  # conv, convtranspose, matmul (W[K,N]), gemm_t (W[N,K])
    shape: tuple
    groups: int = 1
    order: int = 0
    name: str = ""
    grams: list = field(default_factory=list)  # per group: list of GramStats to sum
    ratio: float = 0.0
    via: Optional[gs.Node] = None  # a Transpose between the stored constant and the layers

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def layout(self) -> str:
        """The stored constant's layout in onnxopt.layers' terms."""
        return _LAYOUTS[self.kind]

    def matrix(self, w: np.ndarray) -> np.ndarray:
        return L.as_matrix(w, self.layout)

    def unmatrix(self, m: np.ndarray) -> np.ndarray:
        return L.from_matrix(m, self.layout, self.shape)

    def cross(self, g: int) -> Optional[np.ndarray]:
        stats = self.grams[g] if g < len(self.grams) else None
        return getattr(stats[0], "cross", None) if stats and len(stats) == 1 else None

    def gram(self, g: int) -> Optional[Any]:
        stats = self.grams[g] if g < len(self.grams) else None
        if not stats:
            return None
        total = sum(s.gram for s in stats)
        rows = sum(s.rows for s in stats)
        mean = sum(s.mean * s.rows for s in stats) / max(rows, 1)
        return total, rows, mean


class Units:
    """Finding the units and collecting their inputs' statistics (a mixin of the pruner)."""

    def find_units(self) -> list[_Unit]:
        found = L.find_layers(self.graph, ops=self.o.ops)
        consumers: dict[int, list[tuple[gs.Node, gs.Graph]]] = {}
        for g in G.iter_graphs(self.graph):
            for n in g.nodes:
                for t in n.inputs:
                    consumers.setdefault(id(t), []).append((n, g))
        for node, _, reason in found.skipped:  # weights that are not fixed are not prune's to count
            if reason == "overridable_weight":
                self.skips["overridable"] += 1
            elif reason == "weight_dtype":
                self.skips["unsupported_dtype"] += 1
            elif reason == "weight_rank":
                self.skips["shared_weight" if len(consumers[id(node.inputs[1])]) > 1 else "unsupported_shape"] += 1
        top_nodes = {id(n): i for i, n in enumerate(self.graph.nodes)}
        units: dict[int, _Unit] = {}
        for layer in found.layers:
            w, weight = layer.weight.read, layer.weight
            if id(w) in units:
                continue
            via = weight.via
            if via is not None and len(via.inputs[0].outputs) != 1:
                continue  # the Transpose's input is read elsewhere too
            unit = self.make_unit(layer.node, layer.graph, w, weight.const, weight.holder, consumers, via)
            if unit is None:
                continue
            unit.order = min(top_nodes.get(id(u.node), 10**9) for u in unit.uses)
            units[id(w)] = unit
        found_units = sorted(units.values(), key=lambda u: u.order)
        top = [u for u in found_units if u.order < 10**9]
        edge = {id(top[0]), id(top[-1])} if self.o.keep_first_last and not self.o.only and top else set()
        if self.o.only:  # layers not named are outside the budget, as if they were not prunable
            chosen = [u for u in found_units if not L.left_out(_names(u), only=self.o.only)]
            self.skips["excluded"] += len(found_units) - len(chosen)
            found_units = chosen
        self.candidates = found_units
        self.sizes = {id(u): u.size for u in found_units}
        kept = []
        for u in found_units:
            if L.left_out(_names(u), self.o.exclude):
                self.skips["excluded"] += 1
                self.dense[id(u)] = "excluded"
            elif id(u) in edge:
                self.skips["first_last"] += 1
                self.dense[id(u)] = "first_last"
            else:
                kept.append(u)
        return kept

    def make_unit(self, n, g, w, const, holder, consumers, via=None) -> Optional[_Unit]:
        """The unit of weight ``w`` (read by ``n`` in ``g``): every targeted node reading it must read it
        the same way, in one graph, and nothing else may read it."""
        shape = tuple(const._values.shape)
        uses, kinds = [], set()
        for node, gg in consumers.get(id(w), []):
            kind = self.kind_of(node, w, shape[::-1] if via is not None else shape)
            if kind is None:
                self.skips["shared_weight" if len(consumers[id(w)]) > 1 else "unsupported_shape"] += 1
                return None
            kinds.add(kind)
            uses.append(_Use(node, gg, gg is self.graph))
        if len(kinds) != 1 or (holder is not None and via is None and len(holder.outputs[0].outputs) != len(uses)):
            self.skips["shared_weight"] += 1
            return None
        if len(uses) > 1 and len({id(u.graph) for u in uses}) > 1:
            self.skips["shared_weight"] += 1
            return None
        kind, groups = kinds.pop()
        if kind == "convtranspose" and groups != 1:
            self.skips["unsupported_shape"] += 1
            return None
        name = n.name or const.name
        if via is not None:  # the stored constant is the transpose of what the layers read
            kind = {"matmul": "gemm_t", "gemm_t": "matmul"}[kind]
            return _Unit(const, holder, via.inputs[0], uses, kind, shape, groups, name=name, via=via)
        return _Unit(const, holder, w, uses, kind, shape, groups, name=name)

    def kind_of(self, node: gs.Node, w: gs.Tensor, shape: tuple) -> Optional[tuple[str, int]]:
        if node.op not in self.o.ops or (node.domain or "") not in ("", "ai.onnx"):
            return None
        slots = G.positions(node.inputs, w)
        if slots != [1]:
            return None
        if node.op == "Conv":
            return ("conv", int(node.attrs.get("group", 1))) if len(shape) >= 3 else None
        if node.op == "ConvTranspose":
            return ("convtranspose", int(node.attrs.get("group", 1))) if len(shape) >= 3 else None
        if len(shape) != 2:
            return None
        if node.op == "MatMul":
            return ("matmul", 1)
        return ("gemm_t", 1) if int(node.attrs.get("transB", 0)) else ("matmul", 1)

    # -------------------------------------------------------------- calibration

    def collect(self, units: list[_Unit], count: bool = True) -> None:
        """Each unit's XᵀX per group (summed over the nodes that read it) from calibrate.layer_grams."""
        requests: dict[int, list[GramRequest]] = {}
        for u in units:
            if not all(x.top for x in u.uses) or u.kind == "convtranspose" or (u.kind == "conv" and len(u.shape) > 4):
                self.skips["no_activations"] += count
                continue
            wanted = []
            for use in u.uses:
                x = use.node.inputs[0]
                if isinstance(x, gs.Constant) or not x.name:
                    wanted = []
                    break
                k = int(np.prod(u.shape[1:])) if u.kind == "conv" else int(u.matrix(np.empty(u.shape, np.int8)).shape[1])
                wanted.append(GramRequest(x.name, self.layout(use.node, u), k, u.groups))
            if wanted:
                requests[id(u)] = wanted
            else:
                u.grams = []
                self.skips["no_activations"] += count
        if not requests:
            return
        model = self.ctx.export(self.graph)
        # a weight read by several nodes sums its inputs' statistics: one matrix, not one per reader
        wanted_by = Counter(r for rs in requests.values() for r in set(rs))
        tied = {r: key for key, rs in requests.items() if len(rs) > 1 for r in rs if wanted_by[r] == 1}
        grams = layer_grams(self.ctx, model, [r for rs in requests.values() for r in rs], samples=self.o.samples,
                            tied=tied)
        self.samples_read = max(self.samples_read, grams.samples)
        for u in units:
            if id(u) not in requests:
                continue
            u.grams = [list({id(s): s for s in (grams.stats[r][gi] for r in requests[id(u)])}.values())
                       for gi in range(u.groups)]
            if any(s.rows == 0 for grp in u.grams for s in grp):
                u.grams = []
                self.skips["no_activations"] += count

    def collect_cross(self, u: _Unit, dense: onnx.ModelProto) -> bool:
        """XᵀX of the layer's input as the pruned layers before it now make it, and its cross product
        with the dense model's input (one run of both models side by side), so the refit aims at the
        dense output."""
        if not u.grams or len(u.uses) != 1:
            return False
        node = u.uses[0].node
        request = GramRequest(node.inputs[0].name, self.layout(node, u), u.grams[0][0].k, u.groups)
        stats, samples = cross_grams(self.ctx, self.ctx.export(self.graph), dense, request, samples=self.o.samples)
        self.samples_read = max(self.samples_read, samples)
        if any(st.rows == 0 for st in stats):
            return False
        u.grams = [[st] for st in stats]
        return True

    def layout(self, node: gs.Node, u: _Unit) -> tuple:
        return input_layout(node, u.kind == "conv", u.shape, u.groups)


def _names(u: _Unit) -> list[str]:
    """What an exclude/only glob may name a unit by: its constant, the tensor read, the nodes reading it."""
    return [u.const.name, u.tensor.name, *(x.node.name for x in u.uses)]
