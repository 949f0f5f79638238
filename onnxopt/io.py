"""Model I/O: loading with checks, external data, and atomic saving.

Every failure a user can cause (missing file, truncated or corrupt bytes,
missing external data, an opset this onnx does not know, a model the checker
rejects) becomes one :class:`InputError` whose message names the problem.
Saving never leaves a partial file behind and never overwrites the input
unless asked to.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Union

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from .errors import InputError

log = logging.getLogger("onnxopt")

ModelSource = Union[str, os.PathLike, onnx.ModelProto]

# Protobuf cannot serialise a message past 2 GiB; leave headroom for the graph.
PROTO_LIMIT = 2**31 - 1
EXTERNAL_THRESHOLD = 1_800_000_000
# A model whose external data totals at least LAZY_MODEL_BYTES is loaded with its main-graph
# initializers of at least LAZY_TENSOR_BYTES left in their file: the ModelProto holds a
# reference (the data file's absolute path, offset, length), read on demand (memory-mapped),
# copied file to file on save and handed to ONNX Runtime as a file, never held in memory.
LAZY_MODEL_BYTES = 64 * 2**20
LAZY_TENSOR_BYTES = 2**20


def fits_in_proto(model: onnx.ModelProto) -> bool:
    """Whether the model serialises under protobuf's 2 GiB limit (with its external data inline).

    Tensor bytes are counted first (cheap); the exact size is only counted near the limit.
    """
    if tensor_bytes(model) < EXTERNAL_THRESHOLD:
        return True
    from .serialize import serialized_size  # serialize builds on this module

    return serialized_size(model) < PROTO_LIMIT


def load(source: ModelSource, *, check: bool = True) -> onnx.ModelProto:
    """Load a model from a path or take a ModelProto, with its external data (large external
    weights stay in their file as references: see LAZY_MODEL_BYTES).

    Raises InputError with one clear message when the model cannot be used.
    """
    if isinstance(source, onnx.ModelProto):
        model, label, base_dir = source, "model", None
    else:
        path = Path(source)
        label = str(path)
        model = _read(path)
        base_dir = path.parent
        _load_external(model, base_dir, label)
    bad = first_invalid_string(model)
    if bad:
        raise InputError(f"{label}: not a valid ONNX model (corrupt file: {bad} is not valid UTF-8)")
    if check:
        check_model(model, label)
    return model


def first_invalid_string(message: Any, where: str = "") -> Optional[str]:
    """Where the first string field that is not valid UTF-8 sits, or None.

    onnx.proto is proto2, so protobuf loads such a field unchecked and hands it out
    as bytes; every later use of the name (checker, graph import) would fail on it.
    """
    for desc, value in message.ListFields():
        if desc.type == _STRING:
            values = value if _repeated(desc) else [value]
            for item in values:
                if isinstance(item, bytes):
                    return f"{where}{desc.name} {item[:40]!r}"
        elif desc.type == _MESSAGE:
            values = value if _repeated(desc) else [value]
            for i, item in enumerate(values):
                found = first_invalid_string(item, f"{where}{desc.name}[{i}]." if _repeated(desc)
                                             else f"{where}{desc.name}.")
                if found:
                    return found
    return None


_STRING, _MESSAGE = FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE


def _repeated(desc: FieldDescriptor) -> bool:
    # protobuf >= 5.28 has is_repeated; older versions only label
    flag = getattr(desc, "is_repeated", None)
    return flag if flag is not None else desc.label == FieldDescriptor.LABEL_REPEATED


def _read(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an ONNX model file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InputError(f"{path}: not a valid ONNX model (truncated or corrupt file: {exc})") from exc
    if not model.HasField("graph") or model.ir_version == 0:
        raise InputError(f"{path}: not a valid ONNX model (truncated or corrupt file: no graph or IR version)")
    return model


def iter_graph_protos(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """A GraphProto and every subgraph nested in its nodes' attributes."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from iter_graph_protos(attr.g)
            for sub in attr.graphs:
                yield from iter_graph_protos(sub)


def iter_sparse_tensors(graph: onnx.GraphProto) -> Iterator[onnx.SparseTensorProto]:
    """Sparse tensors: sparse initializers and Constant(sparse_value), subgraphs included."""
    for g in iter_graph_protos(graph):
        yield from g.sparse_initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("sparse_tensor"):
                    yield attr.sparse_tensor


def parameter_count(model: onnx.ModelProto) -> int:
    """Weights as a dense model holds them: dense tensors plus the full size of sparse ones."""
    dense = sum(math.prod(t.dims) for g in iter_graph_protos(model.graph) for t in _dense_tensors(g))
    return dense + sum(math.prod(s.dims) for s in iter_sparse_tensors(model.graph))


def _dense_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors


def iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in a graph: initializers and attribute tensors, subgraphs included."""
    for g in iter_graph_protos(graph):
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def _external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    tensors = list(iter_tensors(model.graph))
    for func in model.functions:
        for node in func.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    tensors.append(attr.t)
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _load_external(model: onnx.ModelProto, base_dir: Path, label: str) -> None:
    external = list(_external_tensors(model))
    if not external:
        return
    for tensor in external:
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = (base_dir / location).resolve()
        if not location:
            raise InputError(f"{label}: tensor '{tensor.name}' is marked as external data but names no data file")
        if os.path.isabs(location) or not target.is_relative_to(base_dir.resolve()):
            raise InputError(f"{label}: tensor '{tensor.name}' points at external data outside the model's folder: '{location}'")
        if not target.is_file():
            raise InputError(f"{label}: missing external data file '{location}' for tensor '{tensor.name}' (looked in {base_dir})")
        offset, length = (_external_number(info, key, tensor.name, label) for key in ("offset", "length"))
        end = offset + length
        if end > target.stat().st_size:
            raise InputError(f"{label}: external data file '{location}' is truncated: tensor '{tensor.name}' needs bytes up to {end}, file has {target.stat().st_size}")
    lazy = set()
    if sum(_external_number(_info(t), "length", t.name, label) for t in external) >= LAZY_MODEL_BYTES:
        lazy = {id(t) for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                and _external_number(_info(t), "length", t.name, label) >= LAZY_TENSOR_BYTES}
    try:
        for tensor in external:
            if id(tensor) in lazy:  # a reference to the file, by absolute path (see external_ref)
                _set_location(tensor, str((base_dir / _info(tensor)["location"]).resolve()))
            else:
                onnx.external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))
    except (OSError, ValueError) as exc:
        raise InputError(f"{label}: cannot read external data: {exc}") from exc


def _info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _set_location(tensor: onnx.TensorProto, location: str) -> None:
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location


class ExternalRef:
    """Where a tensor left in its file by :func:`load` keeps its data."""

    def __init__(self, path: str, offset: int, length: int) -> None:
        self.path, self.offset, self.length = path, offset, length

    def read(self) -> bytes:
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            return handle.read(self.length)

    def copy_to(self, out: BinaryIO, chunk: int = 16 * 2**20) -> None:
        """Copy the data into ``out`` a chunk at a time (through the page cache, not this process)."""
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            left = self.length
            while left:
                piece = handle.read(min(chunk, left))
                if not piece:
                    raise InputError(f"{self.path}: external data file is truncated")
                out.write(piece)
                left -= len(piece)


def external_ref(tensor: onnx.TensorProto) -> Optional[ExternalRef]:
    """The file, offset and length of a tensor :func:`load` left in its file, else None
    (inline data, or external data relative to a folder this process does not know)."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = _info(tensor)
    location = info.get("location", "")
    if not os.path.isabs(location):
        return None
    return ExternalRef(location, int(info.get("offset", "0") or 0), int(info.get("length", "0") or 0))


def external_refs(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The tensors of ``model`` whose data is a reference to a file (see :func:`external_ref`)."""
    return [t for t in _external_tensors(model) if external_ref(t) is not None]


def _external_number(info: dict[str, str], key: str, tensor: str, label: str) -> int:
    text = info.get(key, "0").strip()
    if not text.isdigit():
        raise InputError(f"{label}: tensor '{tensor}' has external data {key} '{text}'; expected a non-negative integer")
    return int(text)


def check_model(model: onnx.ModelProto, label: str = "model") -> None:
    """Opset, checker and shape-inference checks; errors become InputError.

    Shape inference failures are only logged: exporters often declare wrong
    output shapes that ONNX Runtime ignores, and such models must still work.
    """
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise InputError(f"{label}: uses opset {opset.version} of the default domain; the installed onnx knows up to {newest}")
    try:
        # the checker reads the graph; weight bytes are checked here, without serialising them again
        onnx.checker.check_model(skeleton(model))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(f"{label}: fails the ONNX checker: {first}") from exc
    except UnicodeDecodeError as exc:
        # protobuf keeps proto2 strings unchecked; the checker's message quotes the bad bytes
        raise InputError(f"{label}: not a valid ONNX model (corrupt file: a name or string field "
                         f"is not valid UTF-8, byte {exc.object[exc.start:exc.start + 1].hex()})") from exc
    problem = _type_problem(model)
    if problem:
        raise InputError(f"{label}: {problem}")
    for tensor in iter_tensors(model.graph):
        problem = _data_size_problem(tensor)
        if problem:
            raise InputError(f"{label}: tensor '{tensor.name}' is corrupt: {problem}")
    try:
        onnx.shape_inference.infer_shapes(skeleton(model), strict_mode=True)
    except Exception as exc:  # inference raises several types; none is fatal
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("%s: shape inference reports a problem (continuing): %s", label, first)


_KNOWN_TYPES = frozenset(onnx.TensorProto.DataType.values())


def _type_problem(model: onnx.ModelProto) -> Optional[str]:
    """A tensor or a declared value whose element type no onnx release defines (the checker lets
    some through, and every later step would fail on them), or a graph input without one."""
    for tensor in iter_tensors(model.graph):
        if tensor.data_type == onnx.TensorProto.UNDEFINED:
            return f"tensor '{tensor.name}' has no data type"
        if tensor.data_type not in _KNOWN_TYPES:
            return f"tensor '{tensor.name}' has an unknown data type ({tensor.data_type})"
    for g in iter_graph_protos(model.graph):
        for value in [*g.input, *g.output, *g.value_info]:
            if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type not in _KNOWN_TYPES:
                return f"value '{value.name}' has an unknown element type ({value.type.tensor_type.elem_type})"
    for value in [*model.graph.input, *model.graph.output]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type == onnx.TensorProto.UNDEFINED:
            return f"graph {'input' if value in model.graph.input else 'output'} '{value.name}' has no element type"
    return None


def _data_size_problem(tensor: onnx.TensorProto) -> Optional[str]:
    """Why a tensor's raw bytes do not fit its shape and type (whole-byte types), or None."""
    # HasField, and len() once: every read of raw_data copies the bytes out of the proto
    if not tensor.HasField("raw_data") or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    if tensor.data_type in PACKED_TYPES or tensor.data_type == onnx.TensorProto.STRING:
        return None
    want = math.prod(tensor.dims) * itemsize
    have = len(tensor.raw_data)
    if have != want:
        return f"{have} bytes of data for shape {list(tensor.dims)} ({want} expected)"
    return None


# Types packing several values per byte, where the byte count is not shape × itemsize.
PACKED_TYPES = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2",
                                                      "FLOAT6E2M3", "FLOAT6E3M2")
                 if hasattr(onnx.TensorProto, n)}


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with initializer data left out (types and shapes kept as graph inputs).

    Shape inference needs only the types and shapes of weights; leaving their
    bytes out saves serialising the whole model again for it.
    """
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph) if not model.graph.initializer else _copy_without_initializers(model.graph, graph)
    light = onnx.ModelProto(ir_version=max(model.ir_version, 4), graph=graph)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    return light


def _copy_without_initializers(src: onnx.GraphProto, dst: onnx.GraphProto) -> None:
    dst.name = src.name
    dst.node.extend(src.node)
    listed = {vi.name for vi in src.input}
    dst.input.extend(src.input)
    dst.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                     for t in src.initializer if t.name not in listed)
    dst.output.extend(src.output)
    dst.value_info.extend(src.value_info)
    dst.sparse_initializer.extend(src.sparse_initializer)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by tensors in the model (initializers, Constant values, subgraphs), counted
    without reading their data."""
    return sum(stored_bytes(tensor) for tensor in iter_tensors(model.graph))


def stored_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data: raw data where present, else its typed values. Plain numeric raw
    data is sized from the shape (reading the field copies it); loaded models have had that checked
    (tensor_data_problem), rewrites write it whole."""
    if tensor.HasField("raw_data") and (tensor.data_type in PACKED_TYPES
                                        or tensor.data_type == onnx.TensorProto.STRING):
        return len(tensor.raw_data)
    return _typed_bytes(tensor)


def _typed_bytes(tensor: onnx.TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError):
        itemsize = 1
    return count * itemsize


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two paths name the same file (following links)."""
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def save(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    input_path: str | os.PathLike | None = None,
    in_place: bool = False,
) -> Path:
    """Write a model atomically; external data when asked or when it is too big.

    The model and its data file are written into a temporary folder beside the
    target and renamed into place, so a failure leaves nothing partial. The
    caller's ModelProto is not modified.
    """
    target = Path(path)
    if input_path is not None and same_file(target, input_path) and not in_place:
        raise InputError(f"{target}: output path is the input model; pass --in-place to overwrite it")
    check_output_path(target)
    refs = {external_ref(t).path for t in external_refs(model)}
    if external_data is None:  # a model that kept its weights in a file keeps them in one
        external_data = bool(refs) or tensor_bytes(model) > EXTERNAL_THRESHOLD
    data_path = target.parent / (target.name + ".data")
    if external_data and any(same_file(data_path, ref) for ref in refs) and not in_place:
        raise InputError(f"{data_path}: would overwrite the input's external data; choose another output "
                         f"name (or pass --in-place)")
    remove_stale_temporaries(target.parent)
    tmp_dir = Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=target.parent))
    try:
        data_name = target.name + ".data"
        _write(model, tmp_dir / target.name, data_name if external_data else None)
        if external_data and (tmp_dir / data_name).exists():
            os.replace(tmp_dir / data_name, target.parent / data_name)
        os.replace(tmp_dir / target.name, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


def check_output_path(target: Path, what: str = "output") -> None:
    """InputError unless ``target`` can be written as a file: its folder exists, it is not a folder."""
    if target.is_dir():
        raise InputError(f"{target}: {what} path is a directory; name a file")
    if not target.parent.is_dir():
        raise InputError(f"{target.parent}: {what} folder does not exist")


# Temporaries beside an output are named .onnxopt-<pid>@<host>.<random>: a run killed mid-write
# leaves one behind, and a later run removes those whose owner, on this host, is gone.
_TEMP_NAME = re.compile(r"\.onnxopt-(\d+)@(.*)\.[A-Za-z0-9_]{8}")


def temp_prefix() -> str:
    """Prefix for temporary files and folders: names this process and host as the owner."""
    return f".onnxopt-{os.getpid()}@{socket.gethostname()}."


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove temporaries in ``folder`` left by dead onnxopt runs of this user on this host.

    Only names in onnxopt's own format count; a live owner, another host or another
    user's file keeps it. Returns what was removed.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    host, uid = socket.gethostname(), os.getuid()
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if not match or match.group(2) != host or _alive(int(match.group(1))):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != uid:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            continue  # racing another cleaner, or not ours to remove
        removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists (another user's) or not a pid we can judge: keep
    return True


def _write(model: onnx.ModelProto, path: Path, data_name: str | None) -> None:
    # one tensor at a time, references copied file to file: no second copy of a large model
    from .serialize import write_external, write_model

    if data_name is None:
        if not fits_in_proto(model):
            raise InputError("model is larger than 2 GB; save it with external data")
        write_model(model, path)
        return
    write_external(model, path, data_name, threshold=1024)
