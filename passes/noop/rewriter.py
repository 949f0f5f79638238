"""The rewriter: one method per op type, each removing or merging the node when it provably does nothing."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt.pipeline import PassContext

from typing import TYPE_CHECKING

from .facts import INT32_MAX, STAT_KEYS, _Facts, _MAX_LOAD, _MAX_ROUNDS, _default_domain, _has_attr_refs, _ints, _present
from .shapes import _broadcast_keeps, _is_identity_perm, _merge_unsqueeze, _perm, _reshape_keeps

if TYPE_CHECKING:
    from . import NoopOptions




class _Rewriter:
    def __init__(self, graph: gs.Graph, ctx: PassContext, options: NoopOptions) -> None:
        self.graph = graph
        self.opset = ctx.opset or getattr(graph, "opset", 0) or 0
        self.facts = _Facts(graph, options.infer_shapes)
        self.counts = {k: 0 for k in STAT_KEYS}
        self.flagged: dict[str, set[int]] = defaultdict(set)  # reason -> ids of the nodes left for it
        self.removed: set[int] = set()
        self.rules: dict[str, Callable[[gs.Graph, gs.Node], bool]] = {
            "Identity": self._identity, "Dropout": self._dropout, "Cast": self._cast, "CastLike": self._castlike,
            "Reshape": self._reshape, "Flatten": self._flatten, "Squeeze": self._squeeze,
            "Unsqueeze": self._unsqueeze,
            "Expand": self._expand, "Tile": self._tile, "Transpose": self._transpose, "Pad": self._pad,
            "Add": self._arith, "Sub": self._arith, "Mul": self._arith, "Div": self._arith,
            "Slice": self._slice, "Concat": self._concat, "Split": self._split,
            "Sum": self._single_input, "Mean": self._single_input, "Max": self._single_input,
            "Min": self._single_input, "Where": self._where,
        }

    def run(self) -> bool:
        modified = False
        for _ in range(_MAX_ROUNDS):
            changed = False
            self.flagged.clear()  # the last round, which changes nothing, says what is left
            for g in self.facts.graphs:
                for node in list(g.nodes):
                    if id(node) in self.removed or not node.outputs:
                        continue
                    rule = self.rules.get(node.op)
                    if rule is None or not _default_domain(node) or _has_attr_refs(node):
                        continue
                    if rule(g, node):
                        changed = True
            modified |= changed
            if not changed:
                break
        return modified

    def stats(self) -> dict[str, int]:
        out = dict(self.counts)
        out["kept_graph_io"] = len(self.flagged["kept_graph_io"])
        for reason in ("skipped_unknown_shape", "skipped_unknown_type", "skipped_dropout"):
            out[reason] = len(self.flagged[reason])
        return out

    # ------------------------------------------------------------- plumbing

    def _const(self, tensor: Optional[gs.Tensor], max_elems: int = _MAX_LOAD) -> Optional[np.ndarray]:
        return G.const_value(tensor, self.facts.overridable, max_elems)

    def _ints(self, tensor: Optional[gs.Tensor]) -> Optional[list[int]]:
        return _ints(tensor, self.facts.overridable)

    def _flag(self, reason: str, node: gs.Node) -> bool:
        self.flagged[reason].add(id(node))
        return False

    def _unused(self, tensor: gs.Tensor) -> bool:
        return not tensor.outputs and not self.facts.is_output(tensor)

    def _can_bypass(self, graph: gs.Graph, src: gs.Tensor, out: gs.Tensor) -> bool:
        """What onnxopt.graph.bypass needs, checked before touching the node; also refuses
        when ``out`` is an output of another scope (a branch returning an outer value)."""
        owners = self.facts.output_of.get(id(out), [])
        if any(g != id(graph) for g in owners):
            return False
        return G.can_bypass(graph, G.producer(out), src)

    def _remove(self, graph: gs.Graph, node: gs.Node, src: gs.Tensor, stat: str) -> bool:
        """Bypass ``node`` (its first output equals ``src``) unless the interface forbids it."""
        if len(node.outputs) > 1 and any(not self._unused(t) for t in node.outputs[1:]):
            return False
        out = node.outputs[0]
        if not self._can_bypass(graph, src, out):
            return self._flag("kept_graph_io", node)
        if len(node.inputs) != 1 or node.inputs[0] is not src:
            node.inputs.clear()
            node.inputs.append(src)
        was_output = bool(G.positions(graph.outputs, out))
        if not G.bypass(graph, node, src):  # pragma: no cover - _can_bypass mirrors bypass
            return self._flag("kept_graph_io", node)
        if was_output:  # src now stands in the graph's outputs
            self.facts.output_of.pop(id(out), None)
            self.facts.output_of[id(src)].append(id(graph))
        self.removed.add(id(node))
        self.flagged["kept_graph_io"].discard(id(node))
        self.counts[stat] += 1
        return True

    def _drop_if_dead(self, node: gs.Node) -> bool:
        """Remove a node (from whichever scope holds it) whose outputs nothing reads any more."""
        if id(node) in self.removed or not all(self._unused(t) for t in node.outputs):
            return False
        if G.subgraphs_of(node):
            return False
        owner = self.facts.graph_of.get(id(node))
        if owner is None or not G.positions(owner.nodes, node):
            return False
        G.remove_node(owner, node)
        self.removed.add(id(node))
        return True

    def _producer_op(self, tensor: gs.Tensor, ops: tuple[str, ...]) -> Optional[gs.Node]:
        maker = G.producer(tensor)
        if (maker is None or maker.op not in ops or not _default_domain(maker) or _has_attr_refs(maker)
                or id(maker) in self.removed):
            return None
        return maker

    # ------------------------------------------------------------- rules

    def _identity(self, graph: gs.Graph, node: gs.Node) -> bool:
        return bool(node.inputs) and self._remove(graph, node, node.inputs[0], "identity_removed")

    def _dropout(self, graph: gs.Graph, node: gs.Node) -> bool:
        if not node.inputs:
            return False
        if len(node.outputs) > 1 and not self._unused(node.outputs[1]):
            return self._flag("skipped_dropout", node)  # the mask is read
        if "is_test" in node.attrs:
            inference = int(node.attrs["is_test"]) == 1
        elif 0 < self.opset < 7:
            inference = False  # opset 1-6: is_test defaults to 0 (training)
        else:
            mode = _present(node, 2)
            value = self._const(mode, 1) if mode is not None else np.array(False)
            inference = value is not None and value.size == 1 and not bool(value.reshape(-1)[0])
        if not inference:
            return self._flag("skipped_dropout", node)
        return self._remove(graph, node, node.inputs[0], "dropout_removed")

    def _cast(self, graph: gs.Graph, node: gs.Node) -> bool:
        if not node.inputs or "to" not in node.attrs:
            return False
        have = self.facts.dtype(node.inputs[0])
        if have is None:
            return self._flag("skipped_unknown_type", node)
        if have != int(node.attrs["to"]):
            return False
        return self._remove(graph, node, node.inputs[0], "cast_removed")

    def _castlike(self, graph: gs.Graph, node: gs.Node) -> bool:
        if len(node.inputs) < 2:
            return False
        have, want = self.facts.dtype(node.inputs[0]), self.facts.dtype(node.inputs[1])
        if have is None or want is None:
            return self._flag("skipped_unknown_type", node)
        return have == want and self._remove(graph, node, node.inputs[0], "cast_removed")

    def _reshape(self, graph: gs.Graph, node: gs.Node) -> bool:
        if not node.inputs:
            return False
        data = node.inputs[0]
        target = self._ints(_present(node, 1)) if len(node.inputs) > 1 else (
            [int(v) for v in node.attrs["shape"]] if "shape" in node.attrs else None)
        if target is None:
            return False
        allowzero = bool(int(node.attrs.get("allowzero", 0)))
        # Reshape of a reshape-like op: read that op's input, when the target does not copy dims (0).
        first = self._producer_op(data, ("Reshape", "Flatten", "Squeeze", "Unsqueeze"))
        if (first is not None and first.inputs and (allowzero or 0 not in target)
                and len(data.outputs) == 1 and not self.facts.is_output(data)):
            node.inputs[0] = first.inputs[0]
            self._drop_if_dead(first)
            self.counts["reshape_chain_collapsed"] += 1
            return True
        keeps = _reshape_keeps(self.facts.shape(data), target, allowzero)
        if keeps is None:
            return self._flag("skipped_unknown_shape", node)
        return keeps and self._remove(graph, node, data, "reshape_removed")

    def _flatten(self, graph: gs.Graph, node: gs.Node) -> bool:
        if not node.inputs:
            return False
        shape = self.facts.shape(node.inputs[0])
        if shape is None:
            return self._flag("skipped_unknown_shape", node)
        if len(shape) != 2:
            return False
        axis = int(node.attrs.get("axis", 1))
        axis = axis + 2 if axis < 0 else axis
        keeps = axis == 1 or (axis == 0 and shape[0] == 1) or (axis == 2 and shape[1] == 1)
        return keeps and self._remove(graph, node, node.inputs[0], "reshape_removed")

    def _squeeze(self, graph: gs.Graph, node: gs.Node) -> bool:
        if not node.inputs or _present(node, 1) is not None or "axes" in node.attrs:
            return False  # with axes it always drops a dim
        shape = self.facts.shape(node.inputs[0])
        if shape is None or (None in shape and 1 not in shape):
            return self._flag("skipped_unknown_shape", node)
        if 1 in shape:
            return False
        return self._remove(graph, node, node.inputs[0], "reshape_removed")

    def _unsqueeze(self, graph: gs.Graph, node: gs.Node) -> bool:
        """Unsqueeze of an Unsqueeze (``mask[:, None, None, :]``) becomes one Unsqueeze."""
        if not node.inputs:
            return False
        mid = node.inputs[0]
        first = self._producer_op(mid, ("Unsqueeze",))
        if first is None or not first.inputs or len(mid.outputs) != 1 or self.facts.is_output(mid):
            return False
        rank = self.facts.shape(first.inputs[0])
        a1, a2 = self._unsqueeze_axes(first), self._unsqueeze_axes(node)
        if rank is None or a1 is None or a2 is None:
            return False
        axes = _merge_unsqueeze(len(rank), a1, a2)
        if axes is None:
            return False
        node.inputs[0] = first.inputs[0]
        if "axes" in node.attrs:
            node.attrs["axes"] = axes
        else:
            node.inputs[1] = gs.Constant(f"{node.outputs[0].name}_axes", np.array(axes, np.int64))
        self._drop_if_dead(first)
        self.counts["unsqueeze_merged"] += 1
        return True

    def _unsqueeze_axes(self, node: gs.Node) -> Optional[list[int]]:
        if "axes" in node.attrs:
            return [int(a) for a in node.attrs["axes"]]
        return self._ints(_present(node, 1)) if len(node.inputs) > 1 else None

    def _expand(self, graph: gs.Graph, node: gs.Node) -> bool:
        target = self._ints(_present(node, 1))
        if target is None or any(t < 0 for t in target):
            return False
        keeps = _broadcast_keeps(self.facts.shape(node.inputs[0]), tuple(target))
        if keeps is None:
            return self._flag("skipped_unknown_shape", node)
        return keeps and self._remove(graph, node, node.inputs[0], "expand_removed")

    def _tile(self, graph: gs.Graph, node: gs.Node) -> bool:
        repeats = self._ints(_present(node, 1))
        if repeats is None or any(r != 1 for r in repeats):
            return False
        return self._remove(graph, node, node.inputs[0], "tile_removed")

    def _transpose(self, graph: gs.Graph, node: gs.Node) -> bool:
        if not node.inputs:
            return False
        perm = _perm(node, self.facts)
        if perm is None:
            return self._flag("skipped_unknown_shape", node)
        if _is_identity_perm(perm):
            return self._remove(graph, node, node.inputs[0], "transpose_removed")
        mid = node.inputs[0]
        first = self._producer_op(mid, ("Transpose",))
        if first is None or not first.inputs:
            return False
        p1 = _perm(first, self.facts)
        if p1 is None or len(p1) != len(perm):
            return False
        composed = [p1[p] for p in perm]
        first_dies = len(mid.outputs) == 1 and not self.facts.is_output(mid)
        if _is_identity_perm(composed) and self._can_bypass(graph, first.inputs[0], node.outputs[0]):
            self._remove(graph, node, first.inputs[0], "transpose_removed")
            if self._drop_if_dead(first):
                self.counts["transpose_removed"] += 1
            return True
        if not first_dies:
            return False
        node.inputs[0] = first.inputs[0]
        node.attrs["perm"] = composed
        self._drop_if_dead(first)
        self.counts["transpose_merged"] += 1
        return True

    def _pad(self, graph: gs.Graph, node: gs.Node) -> bool:
        if not node.inputs:
            return False
        if len(node.inputs) > 1:
            pads = self._ints(_present(node, 1))
        else:
            raw = node.attrs.get("pads", node.attrs.get("paddings"))
            pads = [int(p) for p in raw] if raw is not None else None
        if pads is None or any(p != 0 for p in pads):
            return False
        return self._remove(graph, node, node.inputs[0], "pad_removed")

    def _arith(self, graph: gs.Graph, node: gs.Node) -> bool:
        if len(node.inputs) != 2:
            return False
        neutral = 0 if node.op in ("Add", "Sub") else 1
        slots = (1,) if node.op in ("Sub", "Div") else (1, 0)
        unknown = False
        for k in slots:
            value = self._const(node.inputs[k])
            if value is None or value.dtype.kind not in "fiu" or not np.all(value == neutral):
                continue
            other = node.inputs[1 - k]
            keeps = _broadcast_keeps(self.facts.shape(other), tuple(value.shape))
            if keeps:
                return self._remove(graph, node, other, "arith_removed")
            unknown |= keeps is None
        return self._flag("skipped_unknown_shape", node) if unknown else False

    def _slice(self, graph: gs.Graph, node: gs.Node) -> bool:
        if not node.inputs:
            return False
        if len(node.inputs) > 1:
            starts, ends = self._ints(_present(node, 1)), self._ints(_present(node, 2))
            axes_t, steps_t = _present(node, 3), _present(node, 4)
            axes = self._ints(axes_t) if axes_t is not None else None
            steps = self._ints(steps_t) if steps_t is not None else None
            if starts is None or ends is None or (axes_t is not None and axes is None) or \
                    (steps_t is not None and steps is None):
                return False
        else:
            if "starts" not in node.attrs or "ends" not in node.attrs:
                return False
            starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
            axes = list(node.attrs["axes"]) if "axes" in node.attrs else None
            steps = None
        axes = axes if axes is not None else list(range(len(starts)))
        steps = steps if steps is not None else [1] * len(starts)
        if not (len(starts) == len(ends) == len(axes) == len(steps)):
            return False
        if any(s != 1 for s in steps):
            return False
        shape = self.facts.shape(node.inputs[0])
        unknown = False
        for axis, start, end in zip(axes, starts, ends):
            if axis < 0:
                if shape is None:
                    unknown = True
                    continue
                axis += len(shape)
            dim = shape[axis] if shape is not None and 0 <= axis < len(shape) else None
            if start < 0 and (dim is None or start + dim > 0):
                unknown |= dim is None
                if dim is not None:
                    return False
                continue
            if start > 0:
                return False
            if dim is not None:
                if end < dim:
                    return False
            elif end < INT32_MAX:
                unknown = True
        if unknown:
            return self._flag("skipped_unknown_shape", node)
        return self._remove(graph, node, node.inputs[0], "slice_removed")

    def _concat(self, graph: gs.Graph, node: gs.Node) -> bool:
        return len(node.inputs) == 1 and self._remove(graph, node, node.inputs[0], "concat_removed")

    def _split(self, graph: gs.Graph, node: gs.Node) -> bool:
        return len(node.outputs) == 1 and bool(node.inputs) and \
            self._remove(graph, node, node.inputs[0], "split_removed")

    def _single_input(self, graph: gs.Graph, node: gs.Node) -> bool:
        return len(node.inputs) == 1 and self._remove(graph, node, node.inputs[0], "single_input_removed")

    def _where(self, graph: gs.Graph, node: gs.Node) -> bool:
        if len(node.inputs) != 3:
            return False
        cond = self._const(node.inputs[0])
        if cond is None or cond.dtype != np.bool_ or cond.size == 0:
            return False
        if cond.all():
            chosen, other = node.inputs[1], node.inputs[2]
        elif not cond.any():
            chosen, other = node.inputs[2], node.inputs[1]
        else:
            return False
        base = self.facts.shape(chosen)
        keeps = [_broadcast_keeps(base, tuple(cond.shape)), _broadcast_keeps(base, self.facts.shape(other))]
        if False in keeps:
            return False
        if None in keeps:
            return self._flag("skipped_unknown_shape", node)
        return self._remove(graph, node, chosen, "where_removed")
