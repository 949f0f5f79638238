"""Quantized blocks into the graph: com.microsoft.MatMulNBits and GatherBlockQuantized nodes."""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G

from .layers import Target
from .pack import pack
from .quantize import Blocks

DOMAIN = "com.microsoft"


def _act_dtype(layer: Target) -> np.dtype:
    """A's float type (scales, float zero points and bias must match it)."""
    x = layer.x
    if x.dtype is not None and np.dtype(x.dtype) in (np.dtype(np.float32), np.dtype(np.float16)):
        return np.dtype(x.dtype)
    return layer.dtype


def write_matmul(layer: Target, blocks: Optional[Blocks], names: G.Names, accuracy_level: int,
                 like: Optional[gs.Node] = None) -> gs.Node:
    """Replace a MatMul/Gemm by MatMulNBits(A, B, scales, zero_points, -, bias) reading ``blocks``,
    or the quantized weight of ``like`` (a node written for the same weight), bias its own."""
    dtype = _act_dtype(layer)
    base = layer.name
    if like is not None:
        inputs = [layer.x] + [t for t in like.inputs[1:4] if isinstance(t, gs.Constant)]
        bits, block_size = like.attrs["bits"], like.attrs["block_size"]
    else:
        bits, block_size = blocks.bits, blocks.block_size
        inputs = [layer.x,
                  gs.Constant(names.fresh(f"{base}_q{bits}"), pack(blocks.codes, bits)),
                  gs.Constant(names.fresh(f"{base}_scales"), (blocks.scales * np.float32(layer.alpha)).astype(dtype))]
        if blocks.zeros is not None:
            zeros = pack(blocks.zeros, bits) if blocks.zeros.dtype == np.uint8 else blocks.zeros.astype(dtype)
            inputs.append(gs.Constant(names.fresh(f"{base}_zero_points"), zeros))
    if layer.bias is not None:
        while len(inputs) < 5:
            inputs.append(gs.Variable.empty())
        inputs.append(gs.Constant(names.fresh(f"{base}_bias"), np.ascontiguousarray(layer.bias, dtype)))
    attrs = {"K": layer.k, "N": layer.n, "bits": bits, "block_size": block_size}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    node = gs.Node("MatMulNBits", name=names.fresh(f"{layer.node.name or base}_Q{bits}"), domain=DOMAIN,
                   attrs=attrs, inputs=inputs)
    layer.replace(node)
    return node


def write_gather(layer: Target, blocks: Optional[Blocks], names: G.Names, accuracy_level: int = 0,
                 like: Optional[gs.Node] = None) -> gs.Node:
    """Replace a Gather on a float table [rows, width] by GatherBlockQuantized, blocks along the width
    (or by the quantized table of ``like``, a node written for the same table).

    ``blocks`` come from the table's transpose (a block per row and ``block_size`` columns)."""
    if like is not None:
        node = gs.Node("GatherBlockQuantized", name=names.fresh(f"{layer.node.name or layer.name}_Q{like.attrs['bits']}"),
                       domain=DOMAIN, attrs=dict(like.attrs), inputs=[like.inputs[0], layer.x] + list(like.inputs[2:]))
        layer.replace(node)
        return node
    rows, width = layer.n, layer.k
    bits = blocks.bits
    base = layer.name
    codes = blocks.codes.reshape(rows, -1)[:, :width]
    inputs = [gs.Constant(names.fresh(f"{base}_q{bits}"), pack(codes, bits)), layer.x,
              gs.Constant(names.fresh(f"{base}_scales"), blocks.scales.astype(layer.dtype))]
    if blocks.zeros is not None:
        inputs.append(gs.Constant(names.fresh(f"{base}_zero_points"), pack(blocks.zeros, bits)))
    node = gs.Node("GatherBlockQuantized", name=names.fresh(f"{layer.node.name or base}_Q{bits}"), domain=DOMAIN,
                   attrs={"bits": bits, "block_size": blocks.block_size, "gather_axis": 0, "quantize_axis": 1},
                   inputs=inputs)
    layer.replace(node)
    return node
