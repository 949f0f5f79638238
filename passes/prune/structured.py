"""Structured pruning: whole output channels removed from a layer, the per-channel region after
it (onnxopt.channels traces it) and its consumer's input channels, with the removed channels'
constant contribution folded into the consumer's bias or refit by least squares."""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import channels as channels_mod
from onnxopt import graph as G

from . import masks as budget  # the sparsity budget
from .masks import _floor
from .units import _Unit, _Use


class Structured:
    def structured(self, units: list[_Unit], stats: dict) -> bool:
        plans = []
        for u in units:
            if u.kind not in ("conv", "matmul", "gemm_t") or len(u.uses) != 1 or u.groups != 1 \
                    or u.holder is not None or u.via is not None:
                self.skips["structured_unsupported_layer"] += 1
                continue
            plan = self.follow(u)
            if plan is not None:
                plans.append((u, plan))
        if self.reconstruct and plans:  # the consumers' inputs, for a least-squares refit of what they keep
            for u, plan in plans:
                cons = plan["consumer"]
                g = u.uses[0].graph
                plan["cunit"] = _Unit(cons.inputs[1], None, cons.inputs[1], [_Use(cons, g, g is self.graph)],
                                      plan["ckind"], tuple(cons.inputs[1].shape), name=cons.name)
            self.collect([plan["cunit"] for _, plan in plans], count=False)
        for u in units:
            if all(u is not p for p, _ in plans):
                self.dense[id(u)] = "not_followed"
        channel_plans = self.channel_budget(plans)
        originals = {id(u.tensor): u for u in self.candidates}  # before consumers' shrinking replaces them
        modified = False
        done = []
        for (u, plan), cp in zip(plans, channel_plans):
            current = u.uses[0].node.inputs[1]
            if isinstance(current, gs.Constant) and current is not u.tensor:  # shrunk as a consumer already
                u.const = u.tensor = current
                u.shape = tuple(current.shape)
            if self.shrink(u, plan, stats, cp.drop):
                modified = True
                done.append(cp)
        # what went, by the original tensors: the producers' rows, the consumers' (and depthwise) columns
        sizes = {k: self.sizes[id(u)] for k, u in originals.items()}
        gone = budget.removed_by_tensor(done, sizes, [cp.drop for cp in done])
        self.pruned = {id(originals[k]): n for k, n in gone.items() if n}
        return modified

    def channel_budget(self, plans: list) -> list:
        """Channels each followed layer loses: about one ratio for all, the removed weights closest to the request."""
        sizes = {id(u.tensor): self.sizes[id(u)] for u in self.candidates}
        out = []
        for u, plan in plans:
            o = u.shape[0] if u.kind == "conv" else u.matrix(np.empty(u.shape, np.int8)).shape[0]
            rows = [id(u.tensor)] + [id(n.inputs[1]) for n in plan["chain"] if n.op == "Conv"]
            out.append(budget.ChannelPlan(o, min(_floor(self.cap() * o), o - 1), rows, [id(plan["consumer"].inputs[1])]))
        for cp, drop in zip(out, budget.channel_drops(out, sizes, self.want())):
            cp.drop = drop
        self.slack = budget.channel_step(out, sizes)  # whole channels: the request is met to within one
        return out

    def follow(self, u: _Unit) -> Optional[dict]:
        """The per-channel region between a layer's output and the next weighted layer
        (onnxopt.channels), or None (counted)."""
        channels = u.shape[0] if u.kind == "conv" else u.matrix(np.empty(u.shape, np.int8)).shape[0]
        region = channels_mod.trace(u.uses[0].node, u.uses[0].graph, channels, u.kind != "conv")
        if isinstance(region, str):
            self.skips[f"structured_{region}"] += 1
            return None
        ckind = {"conv": "conv", "kn": "matmul", "nk": "gemm_t"}[region.consumer_layout]
        return {"chain": region.chain, "consumer": region.consumer, "ckind": ckind, "state": region.state,
                "start": region.start}

    def shrink(self, u: _Unit, plan: dict, stats: dict, drop: int) -> bool:
        node = u.uses[0].node
        w = u.matrix(u.const.values.astype(np.float64))
        o = w.shape[0]
        if drop == 0 or drop >= o:
            self.skips["structured_too_small"] += 1 if drop >= o else 0
            return False
        norms = np.abs(w).sum(axis=1) if self.o.norm == "l1" else np.sqrt((w * w).sum(axis=1))
        # channels scaled by a following BatchNormalization count with that scale
        for n in plan["chain"]:
            if n.op == "BatchNormalization":
                scale, _, _, var = (x.values.astype(np.float64) for x in n.inputs[1:5])
                norms = norms * np.abs(scale / np.sqrt(var + float(n.attrs.get("epsilon", 1e-5))))
        order = np.argsort(norms, kind="stable")
        removed = np.sort(order[:drop])
        keep = np.sort(order[drop:])
        # the value the removed channels still carry: the producer bias pushed through the chain
        bias = None
        if node.op in ("Conv", "Gemm") and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
            b = node.inputs[2].values.astype(np.float64).reshape(-1)
            if node.op == "Gemm":
                b = b * float(node.attrs.get("beta", 1.0))
            bias = np.broadcast_to(b, (o,)).copy() if b.size in (1, o) else None
            if bias is None:
                self.skips["structured_unsupported_layer"] += 1
                return False
        values_of = {id(plan["start"]): np.zeros(o) if bias is None else bias.copy()}
        for n in plan["chain"]:
            out = _through(n, [values_of.get(id(x)) for x in n.inputs])
            if out is None:
                self.skips["structured_unsupported_op"] += 1
                return False
            values_of[id(n.outputs[0])] = out
        carried = values_of[id(plan["consumer"].inputs[0])]
        # rewrite: producer weight and bias
        values = u.const.values
        if u.kind == "conv":
            kept_w = values[keep]
        elif u.kind == "matmul":
            kept_w = values[:, keep]
        else:
            kept_w = values[keep]
        G.rewire_input(node, u.tensor, gs.Constant(self.fresh(f"{u.const.name}_pruned"), np.ascontiguousarray(kept_w)))
        if bias is not None:
            bt = node.inputs[2]
            bv = bt.values
            nb = bv.reshape(-1)[keep] if bv.size == o else bv
            node.inputs[2] = gs.Constant(self.fresh(f"{bt.name}_pruned"), np.ascontiguousarray(nb.reshape(-1) if bv.size == o else bv))
        # the region
        for n in plan["chain"]:
            if n.op == "Conv":  # depthwise
                for i in range(1, len(n.inputs)):
                    c = n.inputs[i]
                    n.inputs[i] = gs.Constant(self.fresh(f"{c.name}_pruned"), np.ascontiguousarray(c.values[keep]))
                n.attrs["group"] = len(keep)
            elif n.op == "BatchNormalization":
                for i in range(1, 5):
                    c = n.inputs[i]
                    n.inputs[i] = gs.Constant(self.fresh(f"{c.name}_pruned"), np.ascontiguousarray(c.values[keep]))
            elif n.op in channels_mod.BINARY:
                for slot, c in enumerate(n.inputs):
                    if id(c) not in plan["state"] and isinstance(c, gs.Constant) and c.values.size > 1:
                        # the layout of the operand in the region
                        last = plan["state"][id(n.inputs[1 - slot])][0]
                        n.inputs[slot] = gs.Constant(self.fresh(f"{c.name}_pruned"), _slice_channels(c.values, keep, o, last))
        for key, t in [(id(plan["start"]), plan["start"])] + [(id(n.outputs[0]), n.outputs[0]) for n in plan["chain"]]:
            _set_channels(t, len(keep), plan["state"][key][0])
        # the consumer: its input channels, and the removed channels' constant contribution
        cons = plan["consumer"]
        cw = cons.inputs[1].values
        ckind = plan["ckind"]
        if ckind == "conv":
            contrib = np.einsum("ocij,c->o", cw[:, removed].astype(np.float64), carried[removed])
            new_cw = cw[:, keep]
        elif ckind == "matmul":
            contrib = carried[removed] @ cw[removed].astype(np.float64)
            new_cw = cw[keep]
        else:
            contrib = cw[:, removed].astype(np.float64) @ carried[removed]
            new_cw = cw[:, keep]
        cu = plan.get("cunit")
        if cu is not None and cu.grams:
            new_cw, contrib = self.refit(cu, cw, keep, ckind)
            stats["layers_reconstructed"] += 1
        elif not self.o.fold_removed:
            contrib = np.zeros_like(contrib)
        if cons.op == "Gemm":
            contrib = contrib * float(cons.attrs.get("alpha", 1.0))
        cname = cons.inputs[1].name
        cons.inputs[1] = gs.Constant(self.fresh(f"{cname}_pruned"), np.ascontiguousarray(new_cw))
        if np.any(contrib != 0):
            if cons.op == "Conv":
                if not self.add_to_bias(cons, 2, contrib, (contrib.size,)):
                    self.skips["bias_correction"] += 1
            elif cons.op == "Gemm":
                beta = float(cons.attrs.get("beta", 1.0)) if len(cons.inputs) > 2 and cons.inputs[2].name else 1.0
                if len(cons.inputs) <= 2 or not cons.inputs[2].name:
                    cons.attrs["beta"] = 1.0
                if not self.add_to_bias(cons, 2, contrib / beta, (contrib.size,)):
                    self.skips["bias_correction"] += 1
            else:
                self.matmul_bias(cons, contrib)
        stats["layers_pruned"] += 1
        stats["channels_removed"] += len(removed)
        return True

    def matmul_bias(self, cons: gs.Node, contrib: np.ndarray) -> None:
        y = cons.outputs[0]
        if len(y.outputs) == 1 and y.outputs[0].op == "Add":
            add = y.outputs[0]
            other = [i for i, t in enumerate(add.inputs) if t is not y]
            if len(other) == 1 and self.add_to_bias(add, other[0], contrib, (contrib.size,), required=True):
                return
        g = next(gg for gg in G.iter_graphs(self.graph) if G.positions(gg.nodes, cons))
        dtype = cons.inputs[1].values.dtype
        G.insert_after(g, y, "Add", extra_inputs=[gs.Constant(self.fresh(f"{cons.name}_bias"), contrib.astype(dtype))],
                       name=self.fresh(f"{cons.name}_bias_add"))


def _through(n: gs.Node, inputs: list) -> Optional[np.ndarray]:
    """Per-channel constants pushed through one region node (pools keep a constant constant);
    ``inputs`` holds the region operands' values, None for the others."""
    op = n.op
    v = next((x for x in inputs if x is not None), None)
    if v is None:
        return None
    if op == "Conv":  # depthwise: a constant input gives sum(W[c]) * v + b inside the padding border
        w = n.inputs[1].values.astype(np.float64)
        b = n.inputs[2].values.astype(np.float64) if len(n.inputs) > 2 and n.inputs[2].name else 0.0
        return v * w.reshape(w.shape[0], -1).sum(axis=1) + b
    if op in channels_mod.POOLS or op in ("Flatten", "Identity", "Dropout"):
        return v
    if op == "BatchNormalization":
        scale, bias, mean, var = (x.values.astype(np.float64).reshape(-1) for x in n.inputs[1:5])
        eps = float(n.attrs.get("epsilon", 1e-5))
        return (v - mean) / np.sqrt(var + eps) * scale + bias
    if op == "Relu":
        return np.maximum(v, 0)
    if op == "LeakyRelu":
        return np.where(v >= 0, v, v * float(n.attrs.get("alpha", 0.01)))
    if op == "PRelu":
        a = float(G.const_value(n.inputs[1]).reshape(-1)[0])
        return np.where(v >= 0, v, v * a)
    if op == "Sigmoid":
        return 1 / (1 + np.exp(-v))
    if op == "Tanh":
        return np.tanh(v)
    if op == "Clip":
        lo = G.const_value(n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1].name else n.attrs.get("min", -np.inf)
        hi = G.const_value(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2].name else n.attrs.get("max", np.inf)
        return np.clip(v, float(np.asarray(lo).reshape(-1)[0]), float(np.asarray(hi).reshape(-1)[0]))
    if op == "HardSwish":
        return v * np.clip(v / 6 + 0.5, 0, 1)
    if op == "HardSigmoid":
        return np.clip(v * float(n.attrs.get("alpha", 0.2)) + float(n.attrs.get("beta", 0.5)), 0, 1)
    if op in ("Gelu", "Erf"):
        from math import erf
        e = np.vectorize(erf)
        return e(v) if op == "Erf" else 0.5 * v * (1 + e(v / np.sqrt(2)))
    if op == "Softplus":
        return np.log1p(np.exp(v))
    if op == "Abs":
        return np.abs(v)
    if op == "Neg":
        return -v
    if op == "Exp":
        return np.exp(v)
    if op == "Sqrt":
        return np.sqrt(np.maximum(v, 0))
    if op == "Pow":
        return np.power(v, float(G.const_value(n.inputs[1]).reshape(-1)[0]))
    if op in channels_mod.BINARY:
        a, b = (x if x is not None else np.broadcast_to(G.const_value(t).astype(np.float64).reshape(-1), v.shape)
                for x, t in zip(inputs, n.inputs))
        return {"Add": np.add, "Mul": np.multiply, "Sub": np.subtract, "Div": np.divide}[op](a, b)
    return None


def _slice_channels(c: np.ndarray, keep: np.ndarray, channels: int, axis_last: bool) -> np.ndarray:
    if c.size == 1:
        return c
    return np.ascontiguousarray(np.take(c, keep, axis=-1 if axis_last else c.ndim - 3))


def _set_channels(t: gs.Tensor, channels: int, axis_last: bool) -> None:
    """Update the channel dimension of a tensor's declared shape, or forget the shape."""
    if t.shape is None:
        return
    shape = list(t.shape)
    axis = -1 if axis_last else 1
    if len(shape) >= 2 and isinstance(shape[axis], int):
        shape[axis] = channels
        t.shape = shape
    else:
        t.shape = None
