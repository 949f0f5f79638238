"""Shape reasoning: whether a broadcast, Reshape, Transpose or Unsqueeze leaves its input as it is."""

from __future__ import annotations

from typing import Optional

import onnx_graphsurgeon as gs



from .facts import Shape, _Facts


def _broadcast_keeps(base: Shape, other: Shape) -> Optional[bool]:
    """Does broadcasting ``other`` against ``base`` leave ``base``'s shape? None when unknown.

    An unknown dim of ``other`` facing a static dim other than 1 is fine: in a
    model that runs it can only be 1 or that dim.
    """
    if other is not None and len(other) == 0:
        return True
    if base is None or other is None:
        return None
    if len(other) > len(base):
        return False
    unknown = False
    for d, o in zip(base[len(base) - len(other):], other):
        if o == 1 or (d is not None and o is not None and o == d):
            continue
        if d is not None and o is None and d != 1:
            continue
        if d is not None and o is not None:
            return False
        unknown = True
    return None if unknown else True


def _reshape_keeps(shape: Shape, target: list[int], allowzero: bool) -> Optional[bool]:
    if shape is None:
        return None
    if len(target) != len(shape):
        return False
    minus = None
    unknown = False
    for i, (d, t) in enumerate(zip(shape, target)):
        if t == 0 and not allowzero:
            continue  # copies the input dim
        if t == -1:
            if minus is not None:
                return False
            minus = i
            continue
        if d is None:
            unknown = True
        elif d != t:
            return False
    if unknown:
        return None
    if minus is not None:
        # Every other dim equals the input's, so -1 recovers the input dim wherever the
        # original runs (it fails when the other dims multiply to 0).
        if any(shape[j] == 0 for j in range(len(shape)) if j != minus):
            return False
    return True


def _perm(node: gs.Node, facts: _Facts) -> Optional[list[int]]:
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    shape = facts.shape(node.inputs[0])
    return list(reversed(range(len(shape)))) if shape is not None else None


def _merge_unsqueeze(rank: int, first: list[int], second: list[int]) -> Optional[list[int]]:
    """Axes of one Unsqueeze equal to Unsqueeze(first) then Unsqueeze(second) on a rank-``rank`` input."""
    mid_rank, out_rank = rank + len(first), rank + len(first) + len(second)
    a1 = sorted(a + mid_rank if a < 0 else a for a in first)
    a2 = sorted(a + out_rank if a < 0 else a for a in second)
    if len(set(a1)) != len(a1) or len(set(a2)) != len(a2) or not all(0 <= a < mid_rank for a in a1) \
            or not all(0 <= a < out_rank for a in a2):
        return None
    new_mid = iter([i in a1 for i in range(mid_rank)])
    marks = [True if i in a2 else next(new_mid) for i in range(out_rank)]
    return [i for i, new in enumerate(marks) if new]


def _is_identity_perm(perm: list[int]) -> bool:
    return list(perm) == list(range(len(perm)))
