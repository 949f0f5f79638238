"""fold: the size guard, which keeps folding within the model's growth allowance."""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import SparseValues

if TYPE_CHECKING:
    from . import _Folder


class _Guard:
    """Decides whether folding a node keeps the model within its growth allowance.

    Nodes are decided consumers first. Folding a node stores its needed outputs and
    frees the stored constants (initializers, Constant-node values) that nothing would
    read any more: those it reads, and those read by producers all of whose outputs
    only folded nodes read (those producers fold too, storing nothing). Intermediate
    values were never stored, so a Cast from int8 to float frees the int8 table, not
    the float copy it computes. Each freed constant counts once.
    """

    def __init__(self, folder: "_Folder", candidates: list[gs.Node], left_out: set[int],
                 consumers: dict[int, list[gs.Node]], interface: set[int], sources: dict[int, gs.Constant],
                 held: set[int], folded: dict[int, list[gs.Tensor]]) -> None:
        self.folder = folder
        self.foldable = {id(n) for n in candidates if id(n) not in left_out}
        self.consumers = consumers
        self.interface = interface
        self.sources = sources
        self.held = held
        self.folded = folded
        self.freed: set[int] = set()  # ids of constants already counted as freed

    def admit(self, node: gs.Node, stored: int) -> bool:
        freed = self._freed_by(node)
        grown = stored - sum(nbytes for _, nbytes in freed)
        folder = self.folder
        if grown > folder.left:
            folder.refused.append(grown)
            return False
        folder.left -= max(grown, 0)
        self.freed.update(key for key, _ in freed)
        return True

    def _freed_by(self, node: gs.Node) -> list[tuple[int, int]]:
        """(constant id, bytes) of the stored constants folding ``node`` would leave unread."""
        dying = {id(node)}
        stack, found = [node], {}

        def unread(t: gs.Tensor) -> bool:
            return id(t) not in self.interface and all(
                id(c) in dying or id(c) in self.folded for c in self.consumers.get(id(t), []))

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

