"""Conv/Pool geometry of the float inputs' spatial axes, by pushing sizes through the graph.

Per spatial axis (height and width apart: text recognisers stride 16 down the
height and 4 along the width) it finds the total stride and the smallest size
on which every Conv and Pool still gives an output, and it says whether a
binding makes the branches that meet at a Concat or an Add agree. Sizes are
followed through elementwise, normalization and layout ops, Resize/Upsample
with constant scales, and stop at anything else (Reshape, MatMul, Shape, ...),
so the answers are hints for ordering candidates, never a verdict: ONNX
Runtime decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import onnx

from ..data import InputSpec

CONV_LIKE = {"Conv", "ConvInteger", "QLinearConv", "FusedConv", "NhwcConv", "MaxPool", "AveragePool", "LpPool"}
# Ops a spatial size passes through unchanged (elementwise, normalization, layout).
KEEP_SIZE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Relu", "LeakyRelu", "PRelu",
             "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu", "Celu", "Softplus", "Softsign",
             "Mish", "Gelu", "Erf", "Exp", "Log", "Sqrt", "Neg", "Abs", "Reciprocal", "BatchNormalization",
             "InstanceNormalization", "LayerNormalization", "GroupNormalization", "LpNormalization", "LRN", "Cast",
             "Identity", "Dropout", "Concat", "Transpose", "Unsqueeze", "Pad", "Softmax", "QuantizeLinear",
             "DequantizeLinear", "Split", "Floor", "Ceil", "Round", "Sign", "Not", "And", "Or", "Equal",
             "Greater", "Less", "ThresholdedRelu", "Shrink", "QLinearAdd", "QLinearMul", "QLinearSigmoid"}
JOINS = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Concat", "And", "Or",
         "Equal", "Greater", "Less", "QLinearAdd", "QLinearMul"}
MAX_SIZE = 8192
MAX_STRIDE = 64

Sizes = tuple[int, ...]


def spatial_axes(spec: InputSpec) -> list[int]:
    """The axes a convolution slides over: H, W of NCHW (or NHWC), D, H, W of 5-D, L of [N, C, L],
    the samples of a [N, samples] waveform."""
    rank, shape = len(spec.shape), spec.shape
    if rank == 4:
        last_is_channel = isinstance(shape[3], int) and 0 < shape[3] <= 4
        second_is_channel = isinstance(shape[1], int) and 0 < shape[1] <= 4
        return [1, 2] if last_is_channel and not second_is_channel else [2, 3]
    return {5: [2, 3, 4], 3: [2], 2: [1]}.get(rank, [])


@dataclass
class Geometry:
    """Per source input, its spatial axes; per position along them, the total stride and minimum size."""

    nodes: list[onnx.NodeProto]
    sources: dict[str, list[int]]
    attr: Callable
    shapes: dict
    values: dict
    strides: list[int]
    mins: list[int]
    trusted: bool = False

    def accepts(self, size_of: Callable[[str, int], int]) -> bool:
        """Whether a binding (``size_of(input, axis)``) runs every Conv/Pool and agrees at every join."""
        if not self.trusted:
            return True
        sizes = {name: tuple(size_of(name, a) for a in axes) for name, axes in self.sources.items()}
        return self.simulate(sizes)[0]

    def simulate(self, sources: dict[str, Sizes], check_joins: bool = True) -> tuple[bool, list[float]]:
        """(every Conv/Pool gives >= 1 and joins agree, total stride per position)."""
        sizes: dict[str, Sizes] = dict(sources)
        factor: dict[str, tuple[float, ...]] = {k: (1.0,) * len(v) for k, v in sources.items()}
        stride = [1.0] * max([len(v) for v in sources.values()] + [1])
        for node in self.nodes:
            known = [n for n in node.input if n in sizes]
            if not known:
                continue
            first = node.input[0]
            if node.op_type in CONV_LIKE and first in sizes:
                out, steps = self._conv(node, sizes[first])
                if min(out) < 1:
                    return False, stride
                result = (out, tuple(f * s for f, s in zip(_fit(factor[first], len(out)), steps)))
            elif node.op_type in ("Resize", "Upsample") and first in sizes:
                scales = self._scales(node, len(sizes[first]))
                if scales is None:
                    continue
                result = (tuple(int(s * k) for s, k in zip(sizes[first], scales)),
                          tuple(f / k for f, k in zip(factor[first], scales)))
            elif node.op_type in KEEP_SIZE:
                if check_joins and node.op_type in JOINS and not _agree([sizes[n] for n in known]):
                    return False, stride
                pick = max(known, key=lambda n: sizes[n])
                result = (sizes[pick], factor[pick])
            else:
                continue
            for p, f in enumerate(result[1][:len(stride)]):
                stride[p] = max(stride[p], f)
            for out_name in node.output:
                sizes[out_name], factor[out_name] = result
        return True, stride

    def _conv(self, node: onnx.NodeProto, size: Sizes) -> tuple[Sizes, Sizes]:
        kernel = self.attr(node, "kernel_shape")
        if kernel is None:
            w = self.shapes.get(node.input[3 if node.op_type == "QLinearConv" else 1]) if len(node.input) > 1 else None
            kernel = list(w[2:]) if w is not None and len(w) > 2 else [1] * len(size)
        n = len(kernel)
        size = _fit(size, n)
        strides = self.attr(node, "strides") or [1] * n
        dilations = self.attr(node, "dilations") or [1] * n
        pads = self.attr(node, "pads") or [0] * (2 * n)
        auto = self.attr(node, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        out = []
        for a in range(n):
            if auto in ("SAME_UPPER", "SAME_LOWER"):
                out.append(-(-size[a] // strides[a]))
                continue
            pad = 0 if auto == "VALID" else pads[a] + pads[a + n]
            out.append((size[a] + pad - ((kernel[a] - 1) * dilations[a] + 1)) // strides[a] + 1)
        return tuple(out), tuple(strides)

    def _scales(self, node: onnx.NodeProto, n: int) -> Optional[list[float]]:
        position = 1 if node.op_type == "Upsample" else 2
        scales = self.values.get(node.input[position]) if len(node.input) > position else None
        if scales is None:
            scales = self.attr(node, "scales")
        scales = None if scales is None else np.asarray(scales, np.float64).ravel()
        if scales is None or scales.size < n or (scales[-n:] <= 0).any():
            return None
        return [float(k) for k in scales[-n:]]


def _fit(values: tuple, n: int) -> tuple:
    """A size tuple for an op over ``n`` axes: the last ``n``, or the one value repeated."""
    if len(values) == n:
        return values
    return tuple(values[-n:]) if len(values) > n else (max(values),) * n


def _agree(tuples: list[Sizes]) -> bool:
    """Broadcasting joins: on each axis the sizes other than 1 are all equal."""
    width = min(len(t) for t in tuples)
    return all(len({t[-p - 1] for t in tuples} - {1}) <= 1 for p in range(width))


def read_geometry(model: onnx.ModelProto, specs: list[InputSpec], shapes: dict, values: dict,
                  attr: Callable) -> Optional[Geometry]:
    sources = {s.name: spatial_axes(s) for s in specs
               if (s.dtype.kind == "f" or (s.dtype.itemsize == 1 and len(s.shape) >= 4)) and spatial_axes(s)
               and any(not (isinstance(s.shape[a], int) and s.shape[a] > 0) for a in spatial_axes(s))}
    nodes = list(model.graph.node)
    if not sources or not any(n.op_type in CONV_LIKE for n in nodes):
        return None
    geo = Geometry(nodes, sources, attr, shapes, values, [], [])
    width = max(len(a) for a in sources.values())
    fits, stride = geo.simulate(_uniform(sources, MAX_SIZE), check_joins=False)
    if not fits:
        return None
    geo.strides = [max(1, min(MAX_STRIDE, int(round(s)))) for s in stride]
    geo.mins = [_smallest(geo, sources, p) for p in range(width)]
    # Joins are judged only where the simulation is trusted: it must accept a large multiple of the strides.
    big = {name: tuple(64 * geo.strides[p] for p in range(len(axes))) for name, axes in sources.items()}
    geo.trusted = geo.simulate(big)[0]
    return geo


def _uniform(sources: dict[str, list[int]], size: int) -> dict[str, Sizes]:
    return {name: (size,) * len(axes) for name, axes in sources.items()}


def _smallest(geo: Geometry, sources: dict[str, list[int]], position: int) -> int:
    """The smallest size at one position (the others large) on which every Conv/Pool gives an output."""
    def fits(size: int) -> bool:
        sizes = {name: tuple(size if p == position else MAX_SIZE for p in range(len(axes)))
                 for name, axes in sources.items()}
        return geo.simulate(sizes, check_joins=False)[0]

    low, high = 1, MAX_SIZE  # monotone: bisect
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid + 1, high)
    return low
