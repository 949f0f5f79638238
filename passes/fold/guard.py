"""fold: the size guard, which keeps folding within the model's growth allowance."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import SparseValues

from .values import _nbytes

if TYPE_CHECKING:
    from . import _Folder

# Values whose stored form ORT may round differently once the chain is re-run
# (see _Folder._rerun_half_precision): never counted as a copy of another value.
_HALF_KINDS = ("float16", "bfloat16")


@dataclass
class _Plan:
    """What one decision made: node id -> outputs to store, what was left and why, the exact growth."""

    folded: dict[int, list[gs.Tensor]] = field(default_factory=dict)
    unsupported: list[gs.Node] = field(default_factory=list)
    too_large: list[gs.Node] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)  # the growth each too-large node would have made
    growth: int = 0


class _Guard:
    """Decides whether folding a node keeps the model within its growth allowance.

    Nodes are decided consumers first. Folding a node stores its needed outputs and
    frees the stored constants (initializers, Constant-node values) that nothing would
    read any more: those it reads, and those read by producers all of whose outputs
    only folded nodes read (those producers fold too, storing nothing). Intermediate
    values were never stored, so a Cast from int8 to float frees the int8 table, not
    the float copy it computes. Each freed constant counts once, and a value equal to
    one already stored by this decision costs nothing (one constant holds both). The
    allowance follows the net change of the file: bytes freed pay for bytes stored.
    ``optimistic`` also counts as folding the readers not decided yet.
    """

    def __init__(self, folder: "_Folder", candidates: list[gs.Node], left_out: set[int],
                 consumers: dict[int, list[gs.Node]], interface: set[int], sources: dict[int, gs.Constant],
                 held: set[int], folded: dict[int, list[gs.Tensor]], optimistic: bool = False) -> None:
        self.folder = folder
        self.foldable = {id(n) for n in candidates if id(n) not in left_out}
        self.consumers = consumers
        self.interface = interface
        self.sources = sources
        self.held = held
        self.folded = folded
        self.optimistic = optimistic
        self.decided: set[int] = set()  # node ids decided so far, folded or not
        self.left = folder.left
        self.refused: list[int] = []
        self.freed: set[int] = set()  # ids of constants already counted as freed
        self.stored: dict[int, int] = {}  # node id -> bytes its folding stores
        self.keys: set[Any] = set()  # values stored so far

    def stored_bytes(self, node: gs.Node, outputs: list[tuple[gs.Tensor, Any]]) -> int:
        """Bytes folding ``node`` stores for its needed ``outputs`` (tensor, value)."""
        total, keys = 0, []
        for t, value in outputs:
            key = None
            if id(t) not in self.interface and not self.folder.as_nodes:
                key = _value_key(value, exclude_half=True)
            if key is None or (key not in self.keys and key not in keys):
                total += _nbytes(value)
            if key is not None:
                keys.append(key)
        self._pending_keys = keys
        return total

    def admit(self, node: gs.Node, stored: int) -> bool:
        freed = self._freed_by(node)
        grown = stored - sum(nbytes for _, nbytes in freed)
        if grown > self.left:
            self.refused.append(grown)
            return False
        self.left -= grown  # what a fold frees pays for what the next stores: the file's size is what counts
        self.freed.update(key for key, _ in freed)
        self.stored[id(node)] = stored
        self.keys.update(self._pending_keys)
        return True

    def exact_growth(self, candidates: list[gs.Node]) -> int:
        """Bytes the folded nodes store less the stored constants nothing reads afterwards."""
        freed, seen = 0, set()
        for node in candidates:
            if id(node) not in self.folded:
                continue
            if id(node) in self.held and node.op == "Constant" and not self.folded[id(node)]:
                source = self.sources[id(node.outputs[0])]
                freed += _stored_nbytes(source) if id(source) not in seen else 0
                seen.add(id(source))
            for t in node.inputs:
                if (isinstance(t, gs.Constant) and id(t) not in seen and id(t) not in self.interface
                        and t.name not in self.folder.overridable
                        and all(id(c) in self.folded for c in self.consumers.get(id(t), []))):
                    seen.add(id(t))
                    freed += _stored_nbytes(t)
        return sum(self.stored.values()) - freed

    def _freed_by(self, node: gs.Node) -> list[tuple[int, int]]:
        """(constant id, bytes) of the stored constants folding ``node`` would leave unread."""
        dying = {id(node)}
        stack, found = [node], {}

        def unread(t: gs.Tensor) -> bool:
            return id(t) not in self.interface and all(
                id(c) in dying or id(c) in self.folded
                or (self.optimistic and id(c) in self.foldable and id(c) not in self.decided)
                for c in self.consumers.get(id(t), []))

        while stack:
            current = stack.pop()
            for t in {id(t): t for t in current.inputs if t.name}.values():
                if not unread(t):
                    continue
                if isinstance(t, gs.Constant):
                    if t.name not in self.folder.overridable:
                        found[id(t)] = _stored_nbytes(t)
                    continue
                producer = t.inputs[0] if t.inputs else None
                if (producer is None or id(producer) in dying or id(producer) not in self.foldable
                        or not all(unread(o) for o in producer.outputs if o.name)):
                    continue
                dying.add(id(producer))
                if producer.op == "Constant" and id(producer) in self.held:
                    source = self.sources[id(t)]
                    found[id(source)] = _stored_nbytes(source)
                stack.append(producer)
        return [(key, nbytes) for key, nbytes in found.items() if key not in self.freed]


def _stored_nbytes(tensor: gs.Constant) -> int:
    """Bytes a constant holds in the model, without loading it."""
    values = tensor._values
    if isinstance(values, SparseValues):
        return 0  # never read by fold
    return int(values.nbytes)


def _value_key(value: Any, exclude_half: bool = False) -> Optional[tuple]:
    """A key equal for arrays of the same type, shape and bytes; None for what is not shared."""
    if not isinstance(value, np.ndarray) or value.dtype == object:
        return None
    if exclude_half and value.dtype.name in _HALF_KINDS:
        return None
    digest = hashlib.blake2b(np.ascontiguousarray(value).data, digest_size=16).hexdigest()
    return value.dtype.str, value.shape, digest
