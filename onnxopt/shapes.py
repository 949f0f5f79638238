"""Symbolic shapes: the shape of every value and the contents of small shape tensors, with
batch/sequence dims kept as sympy symbols.

Built on ONNX Runtime's symbolic shape inference (``onnxruntime.tools.symbolic_shape_infer``):
it propagates sympy expressions through Shape, Gather, Slice, Concat, Unsqueeze, Squeeze,
arithmetic, Reshape, Range, ConstantOfShape, Expand and the common compute ops, and records
the *values* of shape tensors (``sympy_data_``), which onnx's own ``infer_shapes(data_prop=True)``
does only for a few ops and never with symbols. We read its results; we never take the model it
writes (it may guess ranks and merge symbols).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import onnx

Dim = Union[int, Any]  # an int or a sympy expression


@dataclass
class SymbolicShapes:
    """What inference knew: ``shapes[name]`` (a list of dims, None when unknown) and ``values[name]``
    (an int/expression for a scalar shape value, a list of them for a 1-D one), and ``types[name]``
    (the ONNX element type)."""

    shapes: dict[str, list[Optional[Dim]]] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    types: dict[str, int] = field(default_factory=dict)  # ONNX element types
    # what inference knew inside If branches: (the If's first output, "then_branch"/"else_branch")
    branches: dict[tuple[str, str], "SymbolicShapes"] = field(default_factory=dict)

    def branch(self, node_output: str, attr: str) -> Optional["SymbolicShapes"]:
        return self.branches.get((node_output, attr))

    def shape(self, name: str) -> Optional[list[Optional[Dim]]]:
        return self.shapes.get(name)

    def value(self, name: str) -> Any:
        return self.values.get(name)


def as_int(dim: Any) -> Optional[int]:
    """The integer a dim or value element is, or None when it is symbolic."""
    if isinstance(dim, bool):
        return None
    if isinstance(dim, int):
        return dim
    try:
        if getattr(dim, "is_Integer", False):
            return int(dim)
    except TypeError:
        return None
    return None


def as_bool(value: Any) -> Optional[bool]:
    """The truth a computed value is (Python or sympy True/False), or None when it is symbolic."""
    if isinstance(value, bool) or type(value).__name__ in ("BooleanTrue", "BooleanFalse"):
        return bool(value)
    if isinstance(value, (int, np.integer)) or getattr(value, "is_Integer", False):
        return bool(int(value))
    return None


def same(a: Any, b: Any) -> bool:
    """Whether two dims are provably equal (equal ints, or expressions whose difference is 0)."""
    if a is None or b is None:
        return False
    if a is b or (isinstance(a, str) and a == b):
        return True
    ia, ib = as_int(a), as_int(b)
    if ia is not None or ib is not None:
        return ia is not None and ia == ib
    try:
        import sympy

        return sympy.simplify(a - b) == 0
    except Exception:  # noqa: BLE001 - not comparable
        return False


def infer(model: onnx.ModelProto, merge_symbols: bool = False) -> Optional[SymbolicShapes]:
    """Symbolic shapes of the main graph's values, or None when inference fails.

    ``merge_symbols`` lets inference equate two symbols where broadcasting or a
    Concat needs them equal (ORT's ``auto_merge``); off, such a model is not inferred.
    """
    from onnxruntime.tools import symbolic_shape_infer as ssi

    quiet = logging.getLogger(ssi.__name__)
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        engine = _engine_class(ssi)(2**31 - 1, merge_symbols, False, 0)
        engine._preprocess(model)
        while engine.run_:
            engine._infer_impl()
    except Exception:  # noqa: BLE001 - unsupported ops, conflicting symbols: no knowledge
        return None
    finally:
        quiet.setLevel(level)
    return _collect(engine)


def _engine_class(ssi: Any) -> type:
    class Engine(ssi.SymbolicShapeInference):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.branch_results_: dict[tuple[str, str], SymbolicShapes] = {}
            # onnx has no schema for ORT's quantized LSTM; its shapes are LSTM's
            self.dispatcher_.setdefault("DynamicQuantizeLSTM", self._infer_lstm_like)
            # ConvInteger's output dims follow Conv's rule (input 0 and weight input 1, same attributes)
            self.dispatcher_.setdefault("ConvInteger", self._infer_Conv)

        def _onnx_infer_subgraph(self, node: onnx.NodeProto, subgraph: onnx.GraphProto, *args: Any,
                                 **kwargs: Any) -> Any:
            # ORT builds its own engine for a body; have it build this one, so bodies get
            # the same fixes, and keep what it knew inside If branches.
            base = ssi.SymbolicShapeInference
            ssi.SymbolicShapeInference = Engine
            try:
                inner = super()._onnx_infer_subgraph(node, subgraph, *args, **kwargs)
            finally:
                ssi.SymbolicShapeInference = base
            if node.op_type == "If" and node.output:
                attr = next((a.name for a in node.attribute if a.g is subgraph), None)
                cond = self._try_get_value(node, 0)
                if cond is not None:
                    # ORT has copied the branch taken over the other: the other's names are not its own
                    taken = "then_branch" if ssi.as_scalar(cond) > 0 else "else_branch"
                    attr = attr if attr == taken else None
                if attr is not None:
                    self.branch_results_[(node.output[0], attr)] = _collect(inner)
            return inner

        def _infer_symbolic_compute_ops(self, node: onnx.NodeProto) -> None:
            # ORT computes Equal with sympy's ==, which is structural: two different symbols
            # compare False though they may be equal at run time (and a Where on that picks a
            # side). Only Equal of known integers is computed.
            if node.op_type == "Equal":
                values = [self._try_get_value(node, i) for i in range(len(node.input))]
                items = [v for value in values for v in _flat(value)]
                if not all(ssi.is_literal(v) for v in items):
                    return None
            return super()._infer_symbolic_compute_ops(node)

        def _fuse_tensor_type(self, node: onnx.NodeProto, out_idx: int, dst_type: Any, src_type: Any) -> None:
            # If branches whose outputs declare no type (ORT asserts on them): take the other's
            kinds = ("tensor_type", "sequence_type")
            if dst_type.WhichOneof("value") not in kinds or src_type.WhichOneof("value") not in kinds:
                if dst_type.WhichOneof("value") is None and src_type.WhichOneof("value") in kinds:
                    dst_type.CopyFrom(src_type)
                return None
            try:
                return super()._fuse_tensor_type(node, out_idx, dst_type, src_type)
            except AssertionError:  # a sequence of untyped elements: keep what is known
                return None

        def _infer_Resize(self, node: onnx.NodeProto) -> None:  # noqa: N802
            # ORT simplifies floor(dim * scale) with sympy, seconds per node on symbolic dims;
            # integer scales need no simplification.
            shape = self._get_sympy_shape(node, 0)
            scales = self._try_get_value(node, 1 if ssi.get_opset(self.out_mp_) <= 10 else 2)
            sizes = None if ssi.get_opset(self.out_mp_) <= 10 else self._try_get_value(node, 3)
            cropped = ssi.get_attribute(node, "coordinate_transformation_mode") == b"tf_crop_and_resize"
            if (sizes is not None and len(sizes)) or scales is None or not len(scales) or cropped \
                    or len(scales) != len(shape) or not all(float(v).is_integer() for v in scales):
                return super()._infer_Resize(node)
            new_shape = [d * int(float(v)) for d, v in zip(shape, scales)]
            self._update_computed_dims(new_shape)
            self.known_vi_[node.output[0]].CopyFrom(onnx.helper.make_tensor_value_info(
                node.output[0], self.known_vi_[node.input[0]].type.tensor_type.elem_type,
                ssi.get_shape_from_sympy_shape(new_shape)))

        def _infer_lstm_like(self, node: onnx.NodeProto) -> None:
            x = self._get_sympy_shape(node, 0)
            hidden = ssi.get_attribute(node, "hidden_size")
            direction = ssi.get_attribute(node, "direction")
            if isinstance(direction, bytes):
                direction = direction.decode()
            dirs = 2 if direction == "bidirectional" else 1
            if len(x) != 3 or not hidden:
                raise ValueError("LSTM input of unknown rank")
            seq, batch = (x[1], x[0]) if ssi.get_attribute(node, "layout", 0) else (x[0], x[1])
            shapes = [[seq, dirs, batch, hidden], [dirs, batch, hidden], [dirs, batch, hidden]]
            elem = self.known_vi_[node.input[0]].type.tensor_type.elem_type
            for name, shape in zip(node.output, shapes):
                if name:
                    self.known_vi_[name].CopyFrom(onnx.helper.make_tensor_value_info(
                        name, elem, ssi.get_shape_from_sympy_shape(shape)))

        def _infer_Concat(self, node: onnx.NodeProto) -> None:  # noqa: N802
            # ORT asserts that a Concat of shape values is along axis 0; a 1-D Concat along -1
            # is the same, and one of higher rank carries no shape values.
            axis = ssi.get_attribute(node, "axis")
            rank = len(self._get_shape(node, 0) or [])
            if axis == 0 or rank == 0:
                return super()._infer_Concat(node)
            if rank == 1:
                for attr in node.attribute:
                    if attr.name == "axis":
                        attr.i = 0  # the node is inference's own copy
                return super()._infer_Concat(node)
            hidden = {n: self.sympy_data_.pop(n) for n in node.input if n in self.sympy_data_}
            held = {n: self.initializers_.pop(n) for n in node.input if n in self.initializers_}
            try:
                return super()._infer_Concat(node)
            finally:
                self.sympy_data_.update(hidden)
                self.initializers_.update(held)

    return Engine


def _flat(value: Any) -> list:
    if isinstance(value, np.ndarray):
        return value.reshape(-1).tolist()
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _collect(engine: Any) -> SymbolicShapes:
    out = SymbolicShapes()
    for name, info in engine.known_vi_.items():
        if not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
            continue
        out.shapes[name] = [_dim(engine, d) for d in info.type.tensor_type.shape.dim]
        out.types[name] = info.type.tensor_type.elem_type
    for name, value in engine.sympy_data_.items():
        out.values[name] = list(value) if isinstance(value, (list, tuple)) else value
    out.branches = dict(getattr(engine, "branch_results_", {}))
    return out


def _dim(engine: Any, dim: onnx.TensorShapeProto.Dimension) -> Optional[Dim]:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    if dim.HasField("dim_param"):
        merged = engine.suggested_merge_.get(dim.dim_param, dim.dim_param)
        if not isinstance(merged, str):
            return int(merged)
        return engine.symbolic_dims_.get(merged)
    return None
