"""Removal of operations that do nothing."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxopt.options import option
from onnxopt.pipeline import Pass, PassContext, PassResult, register_pass

from .facts import STAT_KEYS  # noqa: F401
from .rewriter import _Rewriter


@dataclass
class NoopOptions:
    infer_shapes: bool = option(True, help="learn static shapes/dtypes by ONNX shape inference on an exported copy")


@register_pass
class NoopElimination(Pass):
    """Remove operations that do nothing (Identity, Dropout, same-type Cast, x+0, x*1, no-op Reshape...). Exact.

    Every rewrite is taken only when it is provably a no-op: constant operands
    and statically known shapes and dtypes. Shapes come from constants, the
    top-level graph inputs, ONNX shape inference on a copy of the graph from
    which every declared intermediate/output shape was stripped, and, where
    inference says nothing, the graph's own value_info; declared graph-output
    shapes and shapes inside Loop/Scan bodies and functions are never trusted.
    Initializers the model also lists as graph inputs (overridable defaults)
    are not constants.

    Removed, each counted under its own stat: Identity; Dropout in inference
    mode whose mask is unused; Cast/CastLike to the input's own type;
    Reshape/Flatten/Squeeze that keep the shape; Expand/Tile that keep the
    shape; Transpose with the identity permutation, and Transpose pairs (both
    go when they cancel, merged into one otherwise); Pad with all-zero pads;
    Add/Sub of zeros and Mul/Div by ones whose constant does not broadcast the
    other operand (``x + 0.0`` turns -0.0 into +0.0, which compares equal);
    Slice over the whole tensor; Concat/Sum/Mean/Max/Min of one input, Split
    into one output; Where with an all-true/all-false constant condition.
    Reshape after Reshape/Flatten/Squeeze/Unsqueeze reads the first one's input
    (``reshape_chain_collapsed``).

    Works in every scope. Graph input/output names never change: a no-op
    feeding a graph output is removed by giving its producer the output's
    name; when that is impossible (its input is a graph input, an initializer,
    another output, or a value from an outer scope) it stays and is counted in
    ``kept_graph_io``. Candidates left for lack of shape or type information
    are counted in ``skipped_unknown_shape``/``skipped_unknown_type``; Dropout
    in training mode or with its mask read in ``skipped_dropout``.
    """

    name = "noop"
    Options = NoopOptions
    leaves_dangling = True  # Constant nodes that fed removed nodes

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        rewriter = _Rewriter(graph, ctx, self.options)
        modified = rewriter.run()
        return PassResult(modified, rewriter.stats())
