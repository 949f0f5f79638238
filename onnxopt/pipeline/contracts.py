"""What every pass must keep: the graph's interface, unique names, a model the checker accepts, and
the size allowance (``max_growth``)."""

from __future__ import annotations

from typing import Any, Optional

import onnx
import onnx_graphsurgeon as gs

from .. import graph as G
from ..errors import InputError, PassError


def interface_of(graph: gs.Graph) -> list[tuple[str, str, str, Any]]:
    """(role, name, dtype, shape) for every graph input and output."""
    rows = []
    for role, tensors in (("input", graph.inputs), ("output", graph.outputs)):
        for t in tensors:
            shape = None if t.shape is None else tuple(t.shape)
            rows.append((role, t.name, str(t.dtype), shape))
    return rows


def duplicate_names(graph: gs.Graph) -> set[str]:
    """Value names held by more than one tensor object, and node names used twice, all scopes."""
    owners: dict[str, int] = {}
    dups: set[str] = set()
    seen_nodes: set[str] = set()
    for g in G.iter_graphs(graph, functions=False):
        for node in g.nodes:
            if node.name:
                if node.name in seen_nodes:
                    dups.add(f"node {node.name}")
                seen_nodes.add(node.name)
            for t in [*node.inputs, *node.outputs]:
                if t.name and owners.setdefault(t.name, id(t)) != id(t):
                    dups.add(f"value {t.name}")
    return dups


def check_contracts(graph: gs.Graph, interface: list, dups_before: set[str], who: str) -> None:
    """Raise PassError when ``who`` changed the interface or introduced duplicate names."""
    now = interface_of(graph)
    if now != interface:
        for old, new in zip(interface, now):
            if old != new:
                raise PassError(f"pass '{who}' broke a contract: graph {old[0]} '{old[1]}' "
                                f"(dtype {old[2]}, shape {old[3]}) became '{new[1]}' (dtype {new[2]}, shape {new[3]})")
        raise PassError(f"pass '{who}' broke a contract: the number of graph inputs or outputs changed "
                        f"({len(interface)} -> {len(now)})")
    new_dups = duplicate_names(graph) - dups_before
    if new_dups:
        raise PassError(f"pass '{who}' broke a contract: names no longer unique: {', '.join(sorted(new_dups)[:5])}")


def checker_error(model: onnx.ModelProto, structure_only: bool = False) -> Optional[str]:
    """The ONNX checker's first complaint, or None.

    ``structure_only`` checks the graph without the initializers' bytes (their
    types and shapes stay): enough after passes, whose tensors gs writes whole,
    and it saves serialising every weight again.
    """
    from ..io import external_refs, fits_in_proto, skeleton

    try:
        # weights left in the input's file (checked when loaded): the checker would look for
        # their file relative to the working folder, so such a model is checked without them
        if structure_only or external_refs(model):
            onnx.checker.check_model(skeleton(model))
        elif fits_in_proto(model):
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        return str(exc).strip().splitlines()[0]
    return None


# ----------------------------------------------------------------- growth limit
# How much larger than its input the optimized model may be, unless the user says otherwise:
# a fraction of the input's size, and at least GROWTH_FLOOR_BYTES (tiny models).
MAX_GROWTH = 0.01
GROWTH_FLOOR_BYTES = 64 << 10


def parse_max_growth(spec: Any) -> Optional[float]:
    """``max_growth`` from '1%', '0.01', 0.01, or 'none' (no limit, also inf); None means no limit."""
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("none", "off", "inf", "unlimited"):
            return None
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise InputError(f"max_growth: expected a fraction (0.05), a percentage (5%) or 'none', "
                             f"got {spec!r}") from None
    elif isinstance(spec, (int, float)) and not isinstance(spec, bool):
        value = float(spec)
    else:
        raise InputError(f"max_growth: expected a fraction (0.05), a percentage (5%) or 'none', got {spec!r}")
    if value != value or value < 0:
        raise InputError(f"max_growth must be 0 or more, got {spec!r}")
    return None if value == float("inf") else value


def growth_limit(input_bytes: int, max_growth: Optional[float] = MAX_GROWTH) -> Optional[int]:
    """The bytes a model of ``input_bytes`` may grow by: ``max_growth`` of it, at least
    GROWTH_FLOOR_BYTES; None when unlimited."""
    if max_growth is None:
        return None
    return max(int(max_growth * input_bytes), GROWTH_FLOOR_BYTES)


# ----------------------------------------------------------------- manager
