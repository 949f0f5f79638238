"""Graph helpers over onnx-graphsurgeon: import/export, walking, everyday surgery.

Passes receive an ``onnx_graphsurgeon.Graph``. Tensors are shared objects:
a value read by an If/Loop/Scan body from the outer scope is the same
``Tensor`` object in both graphs, so rewiring or renaming it is seen in every
scope at once.

- ``roundtrip``: model <-> graph (import, export with stubbed weights, what graphsurgeon drops).
- ``surgery``: walking scopes, rewiring, removing, and reading constants and sizes.
"""

from __future__ import annotations

from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from .roundtrip import STUB_MARK, export_model, export_onnx, fill_stubs, import_graph, is_sorted
from .surgery import (MappedValues, Names, bypass, can_bypass, const_array, const_value, constant_node_value,
                      constant_source, constants, find_nodes, insert_after, iter_graphs, new_constant, node_count,
                      outer_reads, param_bytes, param_count, positions, producer, remove_node, remove_nodes,
                      rewire_input, sizes, subgraphs_of, tensors_named)

__all__ = [
    "import_graph", "export_model", "iter_graphs", "subgraphs_of", "find_nodes",
    "rewire_input", "insert_after", "can_bypass", "bypass", "remove_node", "remove_nodes", "outer_reads", "positions",
    "constants", "node_count", "Names", "param_count", "param_bytes", "producer",
    "constant_node_value", "constant_source", "const_value", "const_array", "sizes", "export_onnx", "fill_stubs",
    "new_constant", "tensors_named", "is_sorted", "MappedValues", "STUB_MARK", "LazyValues", "SparseValues",
]
