"""Channel tracing: which nodes a layer's output channels flow through, each channel on its own,
up to the next weighted layer (its consumer).

A graph analysis for rewrites that act per channel (structured pruning removes channels at the
producer and the consumer and slices everything in between). :func:`trace` follows the output
of one Conv/MatMul/Gemm through per-channel ops (activations, BatchNormalization, pools,
depthwise Convs, Flatten after a global pool, Add/Mul/Sub/Div with per-channel constants or
with each other) and returns the :class:`Region`, or the reason it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G

# ops a channel passes through unchanged (per-channel or elementwise on one input)
UNARY = ("Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Clip", "Gelu", "Erf",
          "Softplus", "Identity", "Dropout", "Abs", "Neg", "Sqrt", "Exp", "Pow")


POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool")


BINARY = ("Add", "Mul", "Sub", "Div")


def depthwise(n: gs.Node, t: gs.Tensor, channels: int) -> bool:
    """A Conv with one filter per input channel (group = channels), constant single-use parameters, reading t."""
    if n.op != "Conv" or (n.domain or "") not in ("", "ai.onnx") or G.positions(n.inputs, t) != [0] or len(n.inputs) < 2:
        return False
    w = n.inputs[1]
    if not isinstance(w, gs.Constant) or len(w.shape) < 3 or int(n.attrs.get("group", 1)) != channels:
        return False
    if w.shape[0] != channels or w.shape[1] != 1:
        return False
    params = [x for x in n.inputs[1:] if x.name]
    return all(isinstance(x, gs.Constant) and len(x.outputs) == 1 for x in params)


def per_channel(c: np.ndarray, channels: int, axis_last: bool) -> bool:
    if c.size == 1:
        return True
    shape = c.shape
    if axis_last:
        return shape[-1] == channels and c.size == channels
    # [C,1,1] or [1,C,1,1] style (channel axis 1 of a rank-4 tensor, counted from the end: -3)
    return c.size == channels and len(shape) >= 3 and shape[-3] == channels


@dataclass
class Region:
    """The per-channel region after a layer: ``start`` (the layer's output), ``chain`` (the nodes in
    it, in the order found), ``consumer`` (the next weighted layer, reading it as input 0),
    ``consumer_layout`` (its weight in onnxopt.layers' terms: ``conv`` W[O, C, k...], ``kn`` W[K, N],
    ``nk`` W[N, K]) and ``state`` (per tensor id: whether the channel axis is last, whether
    the spatial dims are 1)."""

    start: gs.Tensor
    chain: list
    consumer: gs.Node
    consumer_layout: str
    state: dict


def trace(node: gs.Node, g: gs.Graph, channels: int, axis_last: bool) -> Union[Region, str]:
    """The region between ``node``'s output (``channels`` channels, on axis 1 or, ``axis_last``, on the
    last axis) and the next weighted layer, or why it cannot be followed: ``graph_output``,
    ``no_consumer``, ``unsupported_op``, ``shared_param``, ``branch`` (two consumers),
    ``reshape``, ``concat``, ``split``, ``residual`` (an operand from outside the region).

    The region may branch and re-merge (a decomposed GELU: x * 0.5 * (1 + erf(x / √2))) as
    long as every op in it is per-channel and all of it ends in one consumer.
    """
    outs = {id(t) for t in g.outputs}
    start = node.outputs[0]
    state = {id(start): (axis_last, False)}  # per tensor: (channel axis is last, spatial dims are 1)
    region: list[gs.Node] = []
    done: set[int] = set()
    pending: dict[int, gs.Node] = {}
    queue = [start]
    consumer = None

    while queue:
        t = queue.pop(0)
        if id(t) in outs:
            return "graph_output"
        if not t.outputs:
            return "no_consumer"
        axis_last, spatial_one = state[id(t)]
        for n in list(t.outputs):
            if id(n) in done:
                continue
            if (n.domain or "") not in ("", "ai.onnx") or G.subgraphs_of(n):
                return "unsupported_op"
            if n.op in ("Conv", "MatMul", "Gemm") and G.positions(n.inputs, t) == [0] and len(n.inputs) > 1 \
                    and not depthwise(n, t, channels if not axis_last else -1):
                if len(n.inputs[1].outputs) != 1 or (len(n.inputs) > 2 and n.inputs[2].name
                                                      and len(n.inputs[2].outputs) != 1):
                    return "shared_param"
                ckind = None
                if n.op == "Conv" and isinstance(n.inputs[1], gs.Constant) and int(n.attrs.get("group", 1)) == 1 \
                        and not axis_last:
                    ckind = "conv"
                elif n.op in ("MatMul", "Gemm") and isinstance(n.inputs[1], gs.Constant) and \
                        (axis_last or spatial_one) and len(n.inputs[1].shape) == 2 and \
                        not (n.op == "Gemm" and int(n.attrs.get("transA", 0))):
                    ckind = "nk" if n.op == "Gemm" and int(n.attrs.get("transB", 0)) else "kn"
                if ckind is None:
                    return "unsupported_op"
                if consumer is not None:
                    return "branch"
                consumer, plan_kind = n, ckind
                done.add(id(n))
                continue
            if depthwise(n, t, channels) and not axis_last:
                new_state = (axis_last, False)
            elif n.op in UNARY or (n.op == "BatchNormalization" and not axis_last):
                if n.op == "BatchNormalization" and (len(n.outputs) != 1 or not all(
                        isinstance(x, gs.Constant) and len(x.outputs) == 1 for x in n.inputs[1:])):
                    return "shared_param"
                if n.op != "BatchNormalization" and any(G.const_value(x) is None for x in n.inputs[1:] if x.name):
                    return "unsupported_op"
                if n.op in ("PRelu", "Pow") and G.const_value(n.inputs[1]).size != 1:
                    return "unsupported_op"
                new_state = (axis_last, spatial_one)
            elif n.op in POOLS and not axis_last:
                new_state = (False, n.op.startswith("Global"))
            elif n.op == "Flatten" and not axis_last and spatial_one and int(n.attrs.get("axis", 1)) == 1:
                new_state = (True, False)
            elif n.op in BINARY and len(n.inputs) == 2:
                others = [x for x in n.inputs if id(x) not in state]
                if not others:  # both operands in the region: per-channel if they agree on the layout
                    if len({state[id(x)] for x in n.inputs}) != 1:
                        return "unsupported_op"
                    new_state = (axis_last, spatial_one)
                else:
                    c = others[0]
                    value = G.const_value(c)
                    if value is None:
                        pending[id(n)] = n  # maybe both operands come from the region later
                        continue
                    if value.size != 1 and (not isinstance(c, gs.Constant) or len(c.outputs) != 1):
                        return "shared_param"
                    if not per_channel(value, channels, axis_last):
                        return "unsupported_op"
                    new_state = (axis_last, spatial_one)
            elif n.op == "Reshape":
                return "reshape"
            elif n.op == "Concat":
                return "concat"
            elif n.op == "Split":
                return "split"
            else:
                return "unsupported_op"
            if len(n.outputs) != 1:
                return "unsupported_op"
            pending.pop(id(n), None)
            done.add(id(n))
            region.append(n)
            state[id(n.outputs[0])] = new_state
            queue.append(n.outputs[0])
            # a deferred binary op whose other operand just joined the region
            for m in list(pending.values()):
                if all(id(x) in state for x in m.inputs) and id(m) not in done:
                    pending.pop(id(m))
                    queue.append(next(x for x in m.inputs if id(x) in state))
    if pending:
        return "residual"
    if consumer is None:
        return "no_consumer"
    return Region(start, region, consumer, plan_kind, state)
