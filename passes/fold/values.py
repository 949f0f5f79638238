"""fold: the values it reads and stores (numpy arrays, the ONNX element types it can feed and store)."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from onnxopt import graph as G

try:  # onnx depends on ml_dtypes; ORT hands these types back as raw bytes
    import ml_dtypes

    _EXOTIC = {
        "tensor(bfloat16)": (onnx.TensorProto.BFLOAT16, np.dtype(ml_dtypes.bfloat16)),
        "tensor(float8e4m3fn)": (onnx.TensorProto.FLOAT8E4M3FN, np.dtype(ml_dtypes.float8_e4m3fn)),
        "tensor(float8e4m3fnuz)": (onnx.TensorProto.FLOAT8E4M3FNUZ, np.dtype(ml_dtypes.float8_e4m3fnuz)),
        "tensor(float8e5m2)": (onnx.TensorProto.FLOAT8E5M2, np.dtype(ml_dtypes.float8_e5m2)),
        "tensor(float8e5m2fnuz)": (onnx.TensorProto.FLOAT8E5M2FNUZ, np.dtype(ml_dtypes.float8_e5m2fnuz)),
    }
except ImportError:  # pragma: no cover - ml_dtypes ships with onnx
    _EXOTIC = {}
_EXOTIC_BY_DTYPE = {dtype: onnx_type for onnx_type, dtype in _EXOTIC.values()}

# Element types held packed (several per byte) or without a numpy form: never read nor made.
_PACKED = {getattr(onnx.TensorProto, n) for n in ("UINT4", "INT4", "FLOAT4E2M1", "UINT2", "INT2", "FLOAT8E8M0")
           if hasattr(onnx.TensorProto, n)}


def _const_value(tensor: gs.Constant) -> Optional[np.ndarray]:
    """A constant's values without caching them on the tensor (gs would re-encode them on export)."""
    values = tensor._values
    if isinstance(values, SparseValues):
        return None
    if isinstance(values, G.MappedValues) and values.tensor.data_type not in _PACKED:
        return values.load()  # left in the input's file: a read-only map, no copy
    if isinstance(values, LazyValues):
        proto = values.tensor
        if proto.data_type in _PACKED or proto.data_location == onnx.TensorProto.EXTERNAL:
            return None
        try:
            return numpy_helper.to_array(proto)
        except Exception:  # noqa: BLE001 - unreadable data: not a usable constant
            return None
    return np.asarray(values)


def _onnx_type(value: Any) -> Optional[int]:
    """The ONNX element type of an array we can feed and store, else None."""
    if not isinstance(value, np.ndarray):
        return None
    if value.dtype in _EXOTIC_BY_DTYPE:
        return _EXOTIC_BY_DTYPE[value.dtype]
    if value.dtype == object:
        return onnx.TensorProto.STRING if all(isinstance(v, (str, bytes)) for v in value.flat) else None
    try:
        onnx_type = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
    except Exception:  # noqa: BLE001 - complex or other unmapped numpy types
        return None
    return None if onnx_type in _PACKED else onnx_type


def _nbytes(value: Any) -> int:
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return int(sum(len(v) for v in value.flat if isinstance(v, (str, bytes))))
        return int(value.nbytes)
    return 0


def _make_constant(name: str, value: np.ndarray) -> gs.Constant:
    """A gs.Constant exported from its own TensorProto: dtype (fp16, bf16, strings...) and shape kept."""
    return gs.Constant(name, LazyValues(numpy_helper.from_array(value, name)))


def _loadable(tensor: gs.Constant) -> bool:
    """Whether a constant's data can be read as an array we can feed and store (without loading it)."""
    values = tensor._values
    if isinstance(values, SparseValues):
        return False
    if isinstance(values, G.MappedValues):
        return values.tensor.data_type not in _PACKED
    if isinstance(values, LazyValues):
        proto = values.tensor
        return (proto.data_type not in _PACKED and proto.data_type != onnx.TensorProto.UNDEFINED
                and proto.data_location != onnx.TensorProto.EXTERNAL)
    return _onnx_type(np.asarray(values)) is not None

