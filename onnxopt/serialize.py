"""Protobuf bytes of large models without a second copy of the model in memory.

``ModelProto.SerializeToString`` holds the whole encoding twice while it runs,
and ``ByteSize`` encodes the whole model to count it: for a model of a few
hundred MB that is the largest allocation of a run. Here the model is cut at
its main graph's initializers and their raw data: the rest is encoded on its
own (small), the raw bytes are written as they are, and the pieces go out in
field-number order, which is the byte stream ``SerializeToString`` gives.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import BinaryIO

import onnx

from . import io

# Below this many tensor bytes a model is simply encoded whole.
STREAM_BYTES = 32 * 2**20
# Initializers at least this big go to the mapped data file; smaller ones stay in the graph.
EXTERNAL_TENSOR_BYTES = 4096

_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


def serialized_size(model: onnx.ModelProto) -> int:
    """``model.ByteSize()``, counted piece by piece for a large model."""
    if io.tensor_bytes(model) <= STREAM_BYTES:
        return model.ByteSize()
    head, tail, graph_head, graph_tail, tensors = _layout(model)
    graph_size = len(graph_head) + len(graph_tail) + sum(_field_len(_INITIALIZER, t.size) + t.size for t in tensors)
    return len(head) + (_field_len(_GRAPH, graph_size) + graph_size if model.HasField("graph") else 0) + len(tail)


def write_model(model: onnx.ModelProto, path: Path) -> None:
    """``path.write_bytes(model.SerializeToString())``, one tensor's data in memory at a time."""
    with open(path, "wb") as handle:
        if io.tensor_bytes(model) <= STREAM_BYTES:
            handle.write(model.SerializeToString())
            return
        head, tail, graph_head, graph_tail, tensors = _layout(model)
        graph_size = len(graph_head) + len(graph_tail) + sum(_field_len(_INITIALIZER, t.size) + t.size
                                                             for t in tensors)
        handle.write(head)
        if model.HasField("graph"):
            handle.write(_tag(_GRAPH) + _varint(graph_size) + graph_head)
            for tensor, piece in zip(model.graph.initializer, tensors):
                handle.write(_tag(_INITIALIZER) + _varint(piece.size) + piece.head)
                if piece.raw is not None:
                    handle.write(_tag(_RAW) + _varint(piece.raw))
                    handle.write(tensor.raw_data)
                handle.write(piece.tail)
            handle.write(graph_tail)
        handle.write(tail)


class _Tensor:
    """One initializer's encoding around its raw data: head, raw length (None: no raw data,
    then head is the whole tensor), tail, and the total size."""

    def __init__(self, tensor: onnx.TensorProto) -> None:
        if tensor.HasField("raw_data"):
            self.head, self.tail = _split(tensor, _RAW)
            self.raw: int | None = io.stored_bytes(tensor)
            self.size = len(self.head) + _field_len(_RAW, self.raw) + self.raw + len(self.tail)
        else:
            self.head, self.tail, self.raw = tensor.SerializeToString(), b"", None
            self.size = len(self.head)


def _layout(model: onnx.ModelProto) -> tuple:
    """The encoding of ``model`` cut into pieces: fields before and after the graph, the
    graph's fields before and after its initializers, and each initializer's pieces."""
    head, tail = _split(model, _GRAPH)
    graph_head, graph_tail = _split(model.graph, _INITIALIZER)
    return head, tail, graph_head, graph_tail, [_Tensor(t) for t in model.graph.initializer]


def _split(message, number: int) -> tuple[bytes, bytes]:
    """Encodings of the fields numbered below and above ``number``."""
    head, tail = type(message)(), type(message)()
    for fd, value in _fields_but(message, number):
        _copy_field(fd, value, head if fd.number < number else tail)
    return head.SerializeToString(), tail.SerializeToString()


def _fields_but(message, number: int):
    """(field, value) of the set fields except field ``number``, whose value is never read
    (ListFields would hand out a copy of a tensor's raw data)."""
    for fd in message.DESCRIPTOR.fields:
        if fd.number == number:
            continue
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        if (len(getattr(message, fd.name)) if repeated else message.HasField(fd.name)):
            yield fd, getattr(message, fd.name)


def _copy_field(fd, value, dst) -> None:
    repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
    if repeated:
        getattr(dst, fd.name).extend(value)
    elif fd.message_type is not None:
        getattr(dst, fd.name).CopyFrom(value)
    else:
        setattr(dst, fd.name, value)


def _tag(number: int) -> bytes:
    return _varint(number << 3 | 2)  # wire type 2: length-delimited


def _field_len(number: int, n: int) -> int:
    return len(_tag(number)) + len(_varint(n))


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def write_mapped(model: onnx.ModelProto, folder: Path) -> Path:
    """``model.onnx`` plus ``model.data`` in ``folder``, every main-graph initializer of at least
    EXTERNAL_TENSOR_BYTES in the data file at an offset ORT can map (a multiple of the page
    size) instead of reading it; tensors are copied out one at a time."""
    light = onnx.ModelProto()
    for fd, value in _fields_but(model, _GRAPH):
        _copy_field(fd, value, light)
    for fd, value in _fields_but(model.graph, _INITIALIZER):
        _copy_field(fd, value, light.graph)
    with open(folder / "model.data", "wb") as data:
        for tensor in model.graph.initializer:
            _add_initializer(light.graph, tensor, data)
    path = folder / "model.onnx"
    path.write_bytes(light.SerializeToString())
    return path


def _add_initializer(graph: onnx.GraphProto, tensor: onnx.TensorProto, data: BinaryIO) -> None:
    if (tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data")
            or io._typed_bytes(tensor) < EXTERNAL_TENSOR_BYTES):
        graph.initializer.add().CopyFrom(tensor)
        return
    raw = tensor.raw_data
    align = mmap.ALLOCATIONGRANULARITY
    offset = -(-data.tell() // align) * align
    data.seek(offset)
    data.write(raw)
    stub = graph.initializer.add()
    for fd, value in _fields_but(tensor, _RAW):  # every field but the data, so read_mapped restores it
        _copy_field(fd, value, stub)
    stub.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "model.data"), ("offset", str(offset)), ("length", str(len(raw)))):
        stub.external_data.add(key=key, value=value)


def read_mapped(path: Path) -> onnx.ModelProto:
    """The model :func:`write_mapped` wrote, data back in place, one tensor read at a time."""
    model = onnx.ModelProto()
    model.ParseFromString(Path(path).read_bytes())
    with open(Path(path).parent / "model.data", "rb") as data:
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            data.seek(int(info["offset"]))
            tensor.raw_data = data.read(int(info["length"]))
            tensor.ClearField("external_data")
            tensor.ClearField("data_location")
    return model
