"""What a graph says about the inputs it accepts, for synthetic inputs (see :mod:`onnxopt.synthetic`).

- the role of each symbolic dimension (batch, image side, sequence, audio
  samples, ...), from its name, else from where it sits (axis 0 of a batched
  input, the last two axes of an NCHW image, the time axis of an RNN input);
- the geometry of the convolution/pooling stack fed by float inputs: its total
  stride and the smallest size every Conv/Pool still gives an output on, found by
  simulating sizes through the graph (a size that makes two branches disagree
  at a Concat or an Add is refused);
- Reshape targets and Slice bounds applied to an input directly;
- for integer inputs, the rows of the Gather tables they index (through
  Cast/Unsqueeze/Reshape/Add-constant and the like), the constants a scalar
  is compared with, and whether they look like masks, lengths or positions;
  float inputs that look like RNN states.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from ..data import InputSpec
from ..io import iter_graph_protos
from .geometry import Geometry, read_geometry, spatial_axes

log = logging.getLogger("onnxopt")

# Ops that keep the values of an integer tensor (possibly re-laid out): an index stays an index.
KEEP_VALUES = {"Cast", "CastLike", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand", "Tile",
               "Slice", "Transpose", "Concat", "Split", "Gather", "GatherElements", "Max", "Min", "Abs"}
COMPARE = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"}
RNN_OPS = {"LSTM", "GRU", "RNN"}
SAMPLE_RATES = {8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000}


@dataclass
class InputFacts:
    """How values for one input should look."""

    name: str
    low: int = 0
    high: Optional[int] = None  # exclusive bound from the tables it indexes
    mask_like: bool = False
    state_like: bool = False
    length_like: bool = False
    position_like: bool = False


@dataclass
class GraphFacts:
    """Everything ``read_graph`` learnt; ``role_of`` and ``ladder`` apply it to one dimension."""

    inputs: dict[str, InputFacts] = field(default_factory=dict)
    choices: dict[str, list[int]] = field(default_factory=dict)  # scalar input -> constants it is compared with
    axis_roles: dict[tuple[str, int], str] = field(default_factory=dict)
    hints: dict[str, list[int]] = field(default_factory=dict)    # dim key -> exact values a Reshape wants
    floors: dict[str, int] = field(default_factory=dict)         # dim key -> smallest size a Slice reads
    geometry: Optional[Geometry] = None
    spatial: dict[str, tuple[int, int]] = field(default_factory=dict)  # dim key -> (minimum size, stride)

    def role_of(self, spec: InputSpec, axis: int, dim) -> str:
        role = (name_role(dim) if isinstance(dim, str) else None) or self.axis_roles.get((spec.name, axis))
        if role:
            return role
        info = self.inputs.get(spec.name)
        if info is not None and info.state_like:
            return "batch"  # [layers, batch, hidden]: the sizes a state may vary in are the batch
        if self.audio and spec.dtype.kind == "f" and len(spec.shape) <= 2 and axis == len(spec.shape) - 1:
            return "audio"  # a waveform beside a sample-rate input
        return position_role(spec, axis)

    @property
    def audio(self) -> bool:
        """A scalar input is compared with sample rates: the float inputs are waveforms."""
        return any(set(values) & SAMPLE_RATES for values in self.choices.values())

    def ladder(self, key: str, role: str, base: list[int]) -> list[int]:
        """Role values, cheapest first; on a conv axis rounded to its stride and kept above its
        minimum, with that minimum itself second (some models accept only a narrow band)."""
        values = list(base)
        if key in self.spatial and role in ("spatial", "length", "audio", "generic"):
            low, step = self.spatial[key]
            least = _round_up(low, step)
            values = [max(_round_up(v, step), least) for v in values if v > 1 or role != "generic"]
            values = values[:1] + [least] + values[1:]
        if key in self.floors:
            values = [max(v, self.floors[key]) for v in values]
        return list(dict.fromkeys(self.hints.get(key, []) + values))

    def accepts(self, size_of) -> bool:
        """Whether the conv geometry allows a binding (``size_of(input, axis)``); True when unknown."""
        return self.geometry is None or self.geometry.accepts(size_of)


def _round_up(value: int, step: int) -> int:
    return max(step, -(-value // step) * step)


# ----------------------------------------------------------------- roles

def dim_key(input_name: str, axis: int, dim) -> tuple[str, bool]:
    """Named dims are shared by name; '?', '-1', '' and missing names are one axis each."""
    if isinstance(dim, str) and dim.strip() not in ("", "?", "-1"):
        return dim, True
    return f"{input_name}[{axis}]", False


def tokens(name: str) -> list[str]:
    name = re.sub(r"([a-z])([A-Z])", r"\1_\2", name)
    return [t for t in re.split(r"[^a-z0-9]+", name.lower()) if t]


def name_role(name: str) -> Optional[str]:
    """batch/N -> batch; height/width/h/w -> spatial; audio/samples -> audio; seq/len/tokens -> sequence."""
    words = tokens(name)
    if any(t.startswith("past") for t in words):
        return "past"
    if "total" in words:
        return "total"
    for t in words:
        if t in ("n", "b", "bs", "nbatch") or t.startswith("batch"):
            return "batch"
        if t in ("h", "w", "height", "width", "ih", "iw") or t.startswith(("height", "width", "img", "image")):
            return "spatial"
        if t.startswith(("audio", "sample", "wav", "pcm", "signal", "speech")):
            return "audio"
        if t in ("t", "l") or t.startswith(("seq", "sequence", "token", "len", "time", "frame", "step", "word",
                                             "char", "text")):
            return "sequence"
    return None


def position_role(spec: InputSpec, axis: int) -> str:
    """The role of an uninformatively named dim from its place in the input's shape."""
    rank, is_float = len(spec.shape), spec.dtype.kind == "f"
    if rank >= 2 and axis == 0:
        return "batch"
    if image_like(spec):
        return "spatial" if axis in spatial_axes(spec) else "generic"
    if is_float and rank == 3:
        return "length"
    if not is_float and rank in (1, 2):
        return "sequence"
    return "generic"


def image_like(spec: InputSpec) -> bool:
    """4-D or 5-D float or 8-bit data (uint8 pictures included)."""
    return len(spec.shape) in (4, 5) and (spec.dtype.kind == "f" or spec.dtype.itemsize == 1)


# ----------------------------------------------------------------- the graph's tables

class _Index:
    """Consumers, producers and constants over the graph and its subgraphs (outer-scope names included)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.values: dict[str, np.ndarray] = {}
        for g in iter_graph_protos(model.graph):
            for t in g.initializer:
                self._constant(t.name, t)
            for n in g.node:
                for i, name in enumerate(n.input):
                    if name:
                        self.consumers.setdefault(name, []).append((n, i))
                for out in n.output:
                    self.producer[out] = n
                if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                    self._constant_node(n)

    def _constant(self, name: str, tensor: onnx.TensorProto) -> None:
        self.shapes[name] = tuple(tensor.dims)
        if math.prod(tensor.dims) <= 64 and tensor.data_location != onnx.TensorProto.EXTERNAL:
            try:
                self.values[name] = numpy_helper.to_array(tensor)
            except Exception:  # an unusual dtype: the shape is what matters most
                pass

    def _constant_node(self, n: onnx.NodeProto) -> None:
        for a in n.attribute:
            if a.name == "value":
                self._constant(n.output[0], a.t)
            elif a.name in ("value_int", "value_ints", "value_float", "value_floats"):
                value = np.asarray(onnx.helper.get_attribute_value(a))
                self.shapes[n.output[0]], self.values[n.output[0]] = value.shape, value

    def reach(self, name: str, limit: int = 64) -> Iterator[tuple[onnx.NodeProto, int, int, int]]:
        """Consumers that read ``name``'s values, followed through value-keeping ops, as
        (node, input index, lowest offset added, highest offset added) on the way."""
        todo, seen = [(name, 0, 0)], set()
        while todo and len(seen) < limit:
            current, lo, hi = todo.pop(0)
            if current in seen:
                continue
            seen.add(current)
            for node, i in self.consumers.get(current, []):
                yield node, i, lo, hi
                nxt = self._follow(node, i, lo, hi)
                if nxt is not None:
                    todo.extend((out, nxt[0], nxt[1]) for out in node.output[:1 if node.op_type != "Split" else None])

    def _follow(self, node: onnx.NodeProto, i: int, lo: int, hi: int) -> Optional[tuple[int, int]]:
        op = node.op_type
        if op in KEEP_VALUES and (i == 0 or op in ("Concat", "Max", "Min")):
            return lo, hi
        if op in ("Add", "Sub") and len(node.input) == 2:
            other = self.values.get(node.input[1 - i])
            if other is None or other.size == 0 or other.dtype.kind not in "iuf" or (op == "Sub" and i == 1):
                return None
            sign = -1 if op == "Sub" else 1
            ends = sorted(sign * int(v) for v in (other.min(), other.max()))
            return lo + ends[0], hi + ends[1]
        return None

    def rows(self, table: str, axis: int, depth: int = 6) -> Optional[int]:
        """Rows along ``axis`` of a table: a constant, or one behind Cast/DequantizeLinear/scaling."""
        shape = self.shapes.get(table)
        if shape is not None:
            return shape[axis] if -len(shape) <= axis < len(shape) else None
        node = self.producer.get(table)
        if node is None or depth == 0 or node.op_type not in ("Cast", "Identity", "DequantizeLinear", "Mul", "Add",
                                                               "Sub", "Div"):
            return None
        return self.rows(node.input[0], axis, depth - 1)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


# ----------------------------------------------------------------- reading the graph

def read_graph(model: onnx.ModelProto, specs: list[InputSpec]) -> GraphFacts:
    """What the graph says about its inputs. The facts only order candidates (ONNX Runtime
    decides), so a graph they cannot be read from gets the plain ladders rather than an error."""
    try:
        return _read(model, specs)
    except Exception as exc:  # an exporter's oddity we did not foresee
        log.debug("synthetic inputs: graph not read (%s: %s); plain ladders", type(exc).__name__, exc)
        return GraphFacts()


def _read(model: onnx.ModelProto, specs: list[InputSpec]) -> GraphFacts:
    index = _Index(model)
    facts = GraphFacts()
    for spec in specs:
        facts.inputs[spec.name] = _input_facts(spec, index, facts)
        _shape_hints(spec, index, facts)
    facts.geometry = read_geometry(model, specs, index.shapes, index.values, _attr)
    if facts.geometry is not None:
        by_name = {spec.name: spec for spec in specs}
        for name, axes in facts.geometry.sources.items():
            for p, axis in enumerate(axes):
                key = dim_key(name, axis, by_name[name].shape[axis])[0]
                facts.spatial.setdefault(key, (facts.geometry.mins[p], facts.geometry.strides[p]))
    return facts


def _input_facts(spec: InputSpec, index: _Index, facts: GraphFacts) -> InputFacts:
    words = tokens(spec.name)
    info = InputFacts(spec.name)
    info.mask_like = any("mask" in t for t in words)
    scalar = all(isinstance(d, int) and d == 1 for d in spec.shape)
    for node, i, lo, hi in index.reach(spec.name):
        _rnn_roles(spec, node, i, info, facts)
        if spec.dtype.kind not in "iu":
            continue
        rows = _indexed_rows(node, i, index)
        if rows is not None:
            info.high = min(info.high if info.high is not None else rows, rows - hi)
            info.low = max(info.low, -lo)
        elif scalar and node.op_type in COMPARE:
            other = index.values.get(node.input[1 - i]) if len(node.input) == 2 else None
            if other is not None and other.size and other.size <= 8 and other.dtype.kind in "iuf":
                found = facts.choices.setdefault(spec.name, [])
                for v in other.ravel():
                    if int(v) - lo not in found:
                        found.append(int(v) - lo)
    if spec.dtype.kind == "f":
        info.state_like = info.state_like or any(
            t in ("h", "c", "h0", "c0", "hx", "cx", "hn", "cn") or t.startswith(("state", "hidden", "cell", "cache",
                                                                              "past", "memory"))
            for t in words)
    if spec.dtype.kind in "iu":
        info.length_like = info.length_like or (len(spec.shape) <= 1 and any(t.startswith(("len", "length"))
                                                                             or t.endswith("len") for t in words))
        info.position_like = any(t.startswith("pos") for t in words)
    return info


def _indexed_rows(node: onnx.NodeProto, i: int, index: _Index) -> Optional[int]:
    """Rows of the table that input ``i`` of ``node`` indexes, if it is an index there."""
    if node.op_type == "Gather" and i == 1:
        return index.rows(node.input[0], _attr(node, "axis", 0))
    if node.op_type == "EmbedLayerNormalization":  # com.microsoft: ids 0, segments 1, positions 8
        table = {0: 2, 1: 4, 8: 3}.get(i)
        return index.rows(node.input[table], 0) if table is not None and len(node.input) > table else None
    if node.op_type == "OneHot" and i == 0:
        depth = index.values.get(node.input[1])
        return int(depth.ravel()[0]) if depth is not None and depth.size == 1 else None
    return None


def _rnn_roles(spec: InputSpec, node: onnx.NodeProto, i: int, info: InputFacts, facts: GraphFacts) -> None:
    """LSTM/GRU/RNN: X is [seq, batch, features] (layout 0) or [batch, seq, features]; states are
    [directions, batch, hidden]; sequence_lens is a length per batch row."""
    if node.op_type not in RNN_OPS:
        return
    layout = _attr(node, "layout", 0)
    direct = node.input[i] == spec.name  # axes mean what the RNN says only when fed as is
    if i == 0 and direct:
        facts.axis_roles.setdefault((spec.name, 0), "batch" if layout else "sequence")
        facts.axis_roles.setdefault((spec.name, 1), "sequence" if layout else "batch")
    elif i in (5, 6):
        info.state_like = True
        if direct:
            facts.axis_roles.setdefault((spec.name, 0 if layout else 1), "batch")
    elif i == 4:
        info.length_like = True


def _direct_uses(name: str, index: _Index) -> Iterator[onnx.NodeProto]:
    """Consumers of an input, looking through Cast/Identity (which keep axes)."""
    for node, i in index.consumers.get(name, []):
        if node.op_type in ("Cast", "Identity"):
            yield from _direct_uses(node.output[0], index)
        elif i == 0:
            yield node


def _shape_hints(spec: InputSpec, index: _Index, facts: GraphFacts) -> None:
    """Reshape to a same-rank constant: exact sizes; Slice with constant bounds: a floor."""
    rank = len(spec.shape)
    for node in _direct_uses(spec.name, index):
        for axis, want in _weight_sizes(node, index, rank):
            dim = spec.shape[axis]
            if not (isinstance(dim, int) and dim > 0):
                facts.hints.setdefault(dim_key(spec.name, axis, dim)[0], []).append(int(want))
        if node.op_type == "Reshape" and len(node.input) > 1:
            target = index.values.get(node.input[1])
            if target is not None and target.ndim == 1 and len(target) == rank:
                for axis, (dim, want) in enumerate(zip(spec.shape, target.tolist())):
                    if not (isinstance(dim, int) and dim > 0) and want > 0:
                        facts.hints.setdefault(dim_key(spec.name, axis, dim)[0], []).append(int(want))
        elif node.op_type == "Slice":
            for axis, need in _slice_needs(node, index, rank):
                dim = spec.shape[axis]
                if not (isinstance(dim, int) and dim > 0):
                    key = dim_key(spec.name, axis, dim)[0]
                    facts.floors[key] = max(facts.floors.get(key, 1), need)


def _weight_sizes(node: onnx.NodeProto, index: _Index, rank: int) -> list[tuple[int, int]]:
    """The axis of the data input a constant weight fixes: Conv channels, MatMul/Gemm K, RNN features."""
    weight = index.shapes.get(node.input[1]) if len(node.input) > 1 else None
    if weight is None or rank < 1:
        return []
    op = node.op_type
    if op == "Conv" and len(weight) >= 3 and rank == len(weight):
        return [(1, weight[1] * _attr(node, "group", 1))]
    if op == "MatMul" and len(weight) >= 2 and rank >= 2:
        return [(rank - 1, weight[-2])]
    if op == "Gemm" and len(weight) == 2 and rank == 2:
        return [(0 if _attr(node, "transA", 0) else 1, weight[1] if _attr(node, "transB", 0) else weight[0])]
    if op in RNN_OPS and len(weight) == 3 and rank == 3:
        return [(2, weight[2])]
    return []


def _slice_needs(node: onnx.NodeProto, index: _Index, rank: int) -> list[tuple[int, int]]:
    if len(node.input) >= 3:
        starts, ends = index.values.get(node.input[1]), index.values.get(node.input[2])
        axes = index.values.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    else:
        starts, ends, axes = _attr(node, "starts"), _attr(node, "ends"), _attr(node, "axes")
    if starts is None or ends is None:
        return []
    starts, ends = np.asarray(starts).ravel().tolist(), np.asarray(ends).ravel().tolist()
    axes = list(range(len(starts))) if axes is None else np.asarray(axes).ravel().tolist()
    out = []
    for axis, start, end in zip(axes, starts, ends):
        need = max(start + 1 if start >= 0 else -start, end if 0 < end < 2 ** 30 else 0)
        if -rank <= axis < rank and need > 1:
            out.append((axis % rank, int(need)))
    return out
