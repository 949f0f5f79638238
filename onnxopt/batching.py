"""Cutting calibration feeds along their batch axis.

A feed's samples lie along the leading axis its inputs share. Where the model's inputs leave that
axis symbolic, a feed may be cut into smaller ones and the statistics that add over samples
(ranges, Gram matrices) do not change; where the model fixes it, feeds run as the data gives them.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import onnx


def leading_axis(feed: dict) -> Optional[int]:
    """The shared leading axis of every input of a feed, or None when they differ or one is a scalar."""
    sizes = {np.asarray(v).shape[0] if np.ndim(v) else None for v in feed.values()}
    n = sizes.pop() if len(sizes) == 1 else None
    return n or None


def symbolic_batch(model: onnx.ModelProto) -> bool:
    """Whether every graph input has a leading axis the model leaves open (symbolic, or written as
    -1 or 0 by an exporter): the axis feeds may be cut along."""
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if not dims or (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            return False
    return True


def cut(feed: dict, size: int) -> Iterator[dict]:
    """``feed`` cut into feeds of at most ``size`` samples along its shared leading axis; whole when
    ``size`` is 0, the feed is no larger, or its inputs do not share a leading axis."""
    n = leading_axis(feed)
    if not size or not n or n <= size:
        yield feed
        return
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in feed.items()}
