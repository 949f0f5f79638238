"""Protobuf bytes of large models without a second copy of the model in memory.

``ModelProto.SerializeToString`` holds the whole encoding twice while it runs,
and ``ByteSize`` encodes the whole model to count it: for a model of a few
hundred MB that is the largest allocation of a run. Here the model is cut at
its main graph's initializers and their raw data: the rest is encoded on its
own (small), the raw bytes are written as they are, and the pieces go out in
field-number order, which is the byte stream ``SerializeToString`` gives.

Tensors :func:`io.load` left in their file (references, :func:`io.external_ref`) count and
write as their data inline would, copied file to file a chunk at a time.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import BinaryIO, Callable, Optional

import onnx

from . import io

# Below this many tensor bytes a model is simply encoded whole.
STREAM_BYTES = 32 * 2**20
# Initializers at least this big go to the mapped data file; smaller ones stay in the graph.
EXTERNAL_TENSOR_BYTES = 4096

_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
_EXTERNAL_FIELDS = {onnx.TensorProto.DESCRIPTOR.fields_by_name[n].number for n in ("external_data", "data_location")}


def _small(model: onnx.ModelProto) -> bool:
    """Encoded whole: little tensor data and none of it held as a reference."""
    return io.tensor_bytes(model) <= STREAM_BYTES and not io.external_refs(model)


def serialized_size(model: onnx.ModelProto) -> int:
    """``model.ByteSize()`` with every reference's data inline, counted piece by piece for a
    large model (what :func:`write_model` writes)."""
    if _small(model):
        return model.ByteSize()
    head, tail, graph_head, graph_tail, tensors = _layout(model)
    graph_size = len(graph_head) + len(graph_tail) + sum(_field_len(_INITIALIZER, t.size) + t.size for t in tensors)
    return len(head) + (_field_len(_GRAPH, graph_size) + graph_size if model.HasField("graph") else 0) + len(tail)


def write_model(model: onnx.ModelProto, path: Path) -> None:
    """``path.write_bytes(model.SerializeToString())``, one tensor's data in memory at a time."""
    with open(path, "wb") as handle:
        if _small(model):
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
                    if piece.ref is not None:
                        piece.ref.copy_to(handle)
                    else:
                        handle.write(tensor.raw_data)
                handle.write(piece.tail)
            handle.write(graph_tail)
        handle.write(tail)


class _Tensor:
    """One initializer's encoding around its raw data: head, raw length (None: no raw data,
    then head is the whole tensor), tail, and the total size."""

    def __init__(self, tensor: onnx.TensorProto) -> None:
        self.ref = io.external_ref(tensor)
        if self.ref is not None:  # encoded as the same tensor with its data inline
            inline = onnx.TensorProto()
            for fd, value in _fields_but(tensor, _RAW):
                if fd.number not in _EXTERNAL_FIELDS:
                    _copy_field(fd, value, inline)
            self.head, self.tail = _split(inline, _RAW)
            self.raw = self.ref.length
            self.size = len(self.head) + _field_len(_RAW, self.raw) + self.raw + len(self.tail)
        elif tensor.HasField("raw_data"):
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


Link = Callable[[str], Optional[str]]


def write_external(model: onnx.ModelProto, path: Path, data_name: str, *,
                   threshold: Optional[int] = None, link: Optional[Link] = None) -> None:
    """``model`` as a small graph file ``path`` plus the data file ``data_name`` beside it.

    Initializers with raw data of at least ``threshold`` bytes (all scopes) go to the data file,
    each at an offset ORT can map (a multiple of the page size) instead of reading it, copied out
    one at a time. References (:func:`io.external_ref`) are copied in file to file, unless
    ``link(path)`` names a file in ``path``'s folder that holds the same data (a hard link):
    then the graph points there and nothing is copied. ``threshold`` defaults to EXTERNAL_TENSOR_BYTES.
    """
    threshold = EXTERNAL_TENSOR_BYTES if threshold is None else threshold
    light = onnx.ModelProto()
    for fd, value in _fields_but(model, _GRAPH):
        _copy_field(fd, value, light)
    for fd, value in _fields_but(model.graph, _INITIALIZER):
        _copy_field(fd, value, light.graph)
    folder = Path(path).parent
    with open(folder / data_name, "wb") as data:
        for tensor in model.graph.initializer:
            _add_initializer(light.graph, tensor, data, data_name, threshold, link)
        for graph in list(io.iter_graph_protos(light.graph))[1:]:  # subgraphs' initializers, in place
            for i, tensor in enumerate(graph.initializer):
                if io.external_ref(tensor) is not None or io.stored_bytes(tensor) >= threshold:
                    moved = onnx.GraphProto()
                    _add_initializer(moved, tensor, data, data_name, threshold, link)
                    graph.initializer[i].CopyFrom(moved.initializer[0])
        for tensor in io.iter_tensors(light.graph):  # a reference anywhere else (a Constant's value)
            ref = io.external_ref(tensor)
            if ref is not None:
                _place(tensor, ref, None, data, data_name)
        written = data.tell()
    if not written:
        (folder / data_name).unlink()
    Path(path).write_bytes(light.SerializeToString())


def _add_initializer(graph: onnx.GraphProto, tensor: onnx.TensorProto, data: BinaryIO, data_name: str,
                     threshold: int, link: Optional[Link]) -> None:
    ref = io.external_ref(tensor)
    local = link(ref.path) if ref is not None and link is not None else None
    if local is not None:
        stub = graph.initializer.add()
        stub.CopyFrom(tensor)
        _set_location(stub, local)
        return
    if ref is None and (tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data")
                        or io._typed_bytes(tensor) < threshold):
        graph.initializer.add().CopyFrom(tensor)
        return
    stub = graph.initializer.add()
    for fd, value in _fields_but(tensor, _RAW):  # every field but the data, so read_mapped restores it
        if fd.number not in _EXTERNAL_FIELDS:
            _copy_field(fd, value, stub)
    _place(stub, ref, tensor, data, data_name)


def _place(stub: onnx.TensorProto, ref: Optional[io.ExternalRef], tensor: Optional[onnx.TensorProto],
           data: BinaryIO, data_name: str) -> None:
    """Write the data of a reference (or of ``tensor``'s raw data) at the next aligned offset of
    ``data`` and point ``stub`` there."""
    align = mmap.ALLOCATIONGRANULARITY
    offset = -(-data.tell() // align) * align
    data.seek(offset)
    if ref is not None:
        ref.copy_to(data)
        length = ref.length
    else:
        raw = tensor.raw_data
        data.write(raw)
        length = len(raw)
        del raw
    stub.ClearField("raw_data")
    del stub.external_data[:]
    stub.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
        stub.external_data.add(key=key, value=value)


def _set_location(tensor: onnx.TensorProto, location: str) -> None:
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location


def write_mapped(model: onnx.ModelProto, folder: Path, link: Optional[Link] = None) -> Path:
    """``model.onnx`` plus ``model.data`` in ``folder`` for ORT (:func:`write_external`, every
    initializer of at least EXTERNAL_TENSOR_BYTES in the data file)."""
    path = Path(folder) / "model.onnx"
    write_external(model, path, "model.data", link=link)
    return path


def read_mapped(path: Path, links: Optional[dict[str, str]] = None) -> onnx.ModelProto:
    """The model :func:`write_mapped` wrote, data back in place, one tensor read at a time;
    tensors pointing at a link (``links``: local name -> original path) become references again."""
    model = onnx.ModelProto()
    model.ParseFromString(Path(path).read_bytes())
    links = links or {}
    data_path = Path(path).parent / "model.data"
    for tensor in io.iter_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        if info.get("location") in links:
            _set_location(tensor, links[info["location"]])
            continue
        with open(data_path, "rb") as data:
            data.seek(int(info["offset"]))
            tensor.raw_data = data.read(int(info["length"]))
        tensor.ClearField("external_data")
        tensor.ClearField("data_location")
    return model
