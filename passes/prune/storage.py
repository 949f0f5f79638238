"""How a pruned tensor is written: dense, or a Constant with a COO sparse_value where that is
smaller (ORT densifies it at load), with the byte and gzip figures of both."""

from __future__ import annotations

import gzip
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import graph as G

from .units import _Unit


class Storage:
    def store(self, u: _Unit, values: np.ndarray, stats: dict) -> None:
        dense_bytes = int(values.nbytes)
        stats["dense_bytes"] += dense_bytes
        stats["gzip_bytes_dense"] += len(gzip.compress(np.ascontiguousarray(u.const.values).tobytes(), 6))
        sparse = _sparse_proto(values, u.const.name) if self.o.storage == "auto" else None
        if sparse is not None and sparse.ByteSize() >= dense_bytes:
            sparse = None
        readers = [u.via] if u.via is not None else [x.node for x in u.uses]
        if sparse is not None and len({id(x.graph) for x in u.uses}) != 1:
            self.skips["sparse_storage_shared"] += 1
            sparse = None
        if sparse is None:
            stats["written_bytes"] += dense_bytes
            stats["gzip_bytes"] += len(gzip.compress(values.tobytes(), 6))
            new = gs.Constant(self.fresh(f"{u.const.name}_pruned"), values)
            if u.holder is not None:
                u.holder.attrs["value"] = new
            else:
                for reader in readers:
                    G.rewire_input(reader, u.tensor, new)
            return
        stats["written_bytes"] += int(sparse.ByteSize())
        stats["gzip_bytes"] += len(gzip.compress(sparse.SerializeToString(), 6))
        stats["sparse_tensors"] += 1
        g = u.uses[0].graph
        if u.holder is not None:
            u.holder.attrs = {"sparse_value": sparse}
            return
        out = gs.Variable(self.fresh(f"{u.const.name}_sparse"), dtype=values.dtype, shape=list(values.shape))
        sparse.values.name = out.name
        g.nodes.append(gs.Node("Constant", name=self.fresh(f"{u.const.name}_sparse_const"),
                               attrs={"sparse_value": sparse}, outputs=[out]))
        for reader in readers:
            G.rewire_input(reader, u.tensor, out)
        # the new Constant node must come before its readers
        g.nodes.insert(0, g.nodes.pop())


def _sparse_proto(values: np.ndarray, name: str) -> Optional[onnx.SparseTensorProto]:
    """COO with linear int64 indices (the form onnx.checker accepts), or None when not smaller."""
    flat = values.reshape(-1)
    idx = np.flatnonzero(flat)
    if idx.size * (values.itemsize + 8) >= values.nbytes:
        return None
    vals = onnx.numpy_helper.from_array(flat[idx].copy(), name)
    ind = onnx.numpy_helper.from_array(idx.astype(np.int64), "")
    return onnx.helper.make_sparse_tensor(vals, ind, list(values.shape))
